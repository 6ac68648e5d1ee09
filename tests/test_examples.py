"""The README's Python example and the examples/ device models run as written, on the mock."""

from __future__ import annotations

import io
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_blocks_run_on_the_mock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XENDMOP_BACKEND", "mock")  # never touch a real domain from a test
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_debugcon_serves_a_simulated_guest() -> None:
    debugcon = runpy.run_path(str(ROOT / "examples" / "debugcon.py"))
    out = io.StringIO()
    received = debugcon["run_on_mock"](b"ping\n", out)
    assert received == b"ping\n" and out.getvalue() == "ping\n"


def test_debugcon_command_line() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "debugcon.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Hello from the guest, through port 0x402!\n"
