"""Running an example's command line from a test: its environment, reading up to a line, a held run ended by signal."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]


def example_env(**extra: str) -> dict[str, str]:
    """This environment, with the repository importable and ``extra`` on top."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def read_until(stream: IO[str] | IO[bytes] | None, needle: str) -> str:
    """Read ``stream`` (a process's pipe) line by line up to the first line holding ``needle``;
    return all read.  ``AssertionError`` with what was read if the stream ends first."""
    assert stream is not None, "the process has no such pipe"
    seen = ""
    while needle not in seen:
        line = stream.readline()
        text = line.decode() if isinstance(line, bytes) else line
        assert text, f"no {needle!r} before end of output:\n{seen}"
        seen += text
    return seen


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
        assert proc.stdout is not None
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
