"""Child Python processes with hard time limits, for the depriv tests."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 20.0

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot, setresuid, other users' /proc)")


class Child:
    """A ``python -c CODE ARGS`` child.  It prints one JSON line when ready, then blocks
    reading stdin until the test closes it."""

    def __init__(self, code: str, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=str(REPO),
        )
        self.pid = self.proc.pid

    def ready(self, timeout: float = TIMEOUT) -> Any:
        """The child's JSON line (fails the test if none comes in time)."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.kill()
            pytest.fail(f"child did not report within {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait(timeout)
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            pytest.fail(f"child exited with {rc} before reporting: {err}")
        return json.loads(line)

    def finish(self, timeout: float = TIMEOUT) -> tuple[int, str]:
        """Close its stdin and wait: ``(exit status, stderr)``."""
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"child did not exit within {timeout}s")
        return self.proc.returncode, err.decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
