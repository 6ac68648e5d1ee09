"""Running an example's command line from a test: its environment, reading up to a line with a
deadline, a held run ended by signal, a stand-in tool on PATH."""

from __future__ import annotations

import codecs
import contextlib
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]
#: how long a test waits for a line an example is expected to print (it starts a Python and a server)
READ_TIMEOUT = 30.0


def example_env(**extra: str) -> dict[str, str]:
    """This environment, with the repository importable and ``extra`` on top."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def read_until(stream: IO[str] | IO[bytes] | None, needle: str, timeout: float = READ_TIMEOUT) -> str:
    """Read ``stream`` (a process's pipe) up to the end of the first line holding ``needle``;
    return all read, decoded as UTF-8.

    ``AssertionError`` with what was read if the stream ends first, or if ``timeout``
    seconds pass first: a missing line fails the test instead of hanging it.  The pipe's
    fd is read directly, one byte at a time, so nothing past that line is consumed (a
    later ``communicate()`` or ``read_until`` gets the rest) and no data can wait unseen in
    the file object's buffer while ``select`` says the fd is empty; so read this stream
    only through fds (``os.read``, ``communicate``), never its ``readline`` before this."""
    assert stream is not None, "the process has no such pipe"
    fd = stream.fileno()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    seen = ""
    line = ""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} in {timeout}s; the output so far:\n{seen}"
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            continue  # the deadline check above fails the test
        byte = os.read(fd, 1)  # readable: does not block
        if not byte:
            seen += decoder.decode(b"", final=True)
            raise AssertionError(f"no {needle!r} before the end of the output:\n{seen}")
        text = decoder.decode(byte)
        seen += text
        line += text
        if text == "\n":
            if needle in line:
                return seen
            line = ""


def read_bytes(source: IO[bytes] | int | None, count: int, timeout: float = READ_TIMEOUT) -> bytes:
    """Exactly ``count`` bytes from ``source`` (a process's binary pipe, or an fd: a pty's
    master), read from its fd; ``AssertionError`` with what came if it ends, or if
    ``timeout`` seconds pass, first."""
    assert source is not None, "the process has no such pipe"
    fd = source if isinstance(source, int) else source.fileno()
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"{len(got)} of {count} bytes in {timeout}s: {got!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, count - len(got))
            assert chunk, f"the end of the output after {len(got)} of {count} bytes: {got!r}"
            got += chunk
    return got


def hold_until_signal(script: Path, *args: str, signum: int) -> tuple[int, str, str]:
    """Run ``script --hold *args``, send ``signum`` once its guest script is done; (status, stdout, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, str(script), "--hold", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=example_env(),
    )
    try:
        seen = read_until(proc.stdout, "guest script done")
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, seen + out, err


#: the ids a deprivileged example drops to (nobody:nogroup)
NOBODY = "65534:65534"


@contextlib.contextmanager
def deprivileged(
    script: Path, mock_socket: str, *args: str, ready: str, stdin: bool = False, text: bool = True
) -> Iterator[subprocess.Popen[Any]]:
    """``script --domid 1 --depriv 65534:65534 *args`` serving the mock host process at
    ``mock_socket``, handed over once ``ready`` is on its stderr and /proc shows it running
    as 65534:65534; killed on the way out if still running."""
    proc = subprocess.Popen(
        [sys.executable, str(script), "--domid", "1", "--depriv", NOBODY, *args],
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=text,
        env=example_env(XENDMOP_MOCK_SOCKET=mock_socket),
    )
    try:
        read_until(proc.stderr, ready)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert "Uid:\t65534\t65534\t65534\t65534" in status and "Gid:\t65534\t65534\t65534\t65534" in status, status
        yield proc
    finally:
        proc.kill()
        proc.wait()


def stand_in_tool(directory: Path, name: str, script: str) -> Path:
    """An executable ``directory/name``: a ``/bin/sh`` script running ``script`` (a stand-in
    for ``xenstore-read`` on PATH, say).

    Written by a child process, not by this one: exec fails with ETXTBSY while any process
    holds the file open for writing, and a process forked meanwhile by another thread of
    this one (a test's serving thread, a library) would keep a copy of a writable fd of
    ours until it execs or exits.  The writing child has exited before the tool is run,
    and this process never opens the file for writing."""
    tool = directory / name
    subprocess.run(
        ["/bin/sh", "-c", 'cat > "$1" && chmod 755 "$1"', "sh", str(tool)],
        input=f"#!/bin/sh\n{script}\n",
        text=True,
        check=True,
        timeout=READ_TIMEOUT,
    )
    return tool
