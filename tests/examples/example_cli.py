"""Running an example's command line from a test: its environment, reading up to a line, a held run ended by signal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import IO

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
