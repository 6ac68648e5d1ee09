"""Runs the atheris fuzz target briefly (bounded) so CI notices a finding or a broken target."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TARGET = Path(__file__).resolve().parents[2] / "fuzz" / "fuzz_privcmd.py"


def test_fuzz_target_short_run() -> None:
    pytest.importorskip("atheris")
    env = dict(os.environ, PYTHONPATH=str(TARGET.parents[1]))
    proc = subprocess.run(
        [sys.executable, str(TARGET), "-runs=2000", "-seed=1", "-max_len=256"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done 2000 runs" in proc.stderr
