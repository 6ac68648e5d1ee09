"""What the mock host process tests share: the child processes' environment, starting a
``xendmop mock-host``, waiting for a condition, counting posted messages."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from xendmop.mock.remote import RemoteXen

REPO = Path(__file__).resolve().parents[2]


def child_env(**extra: str) -> dict[str, str]:
    """This environment, with the repository first on a child Python's path."""
    return dict(os.environ, PYTHONPATH=str(REPO), **extra)


def start_mock_host(path: str, **popen: Any) -> subprocess.Popen[bytes]:
    """``python -m xendmop mock-host --socket path`` in a child process (stdout and stderr
    piped; ``popen`` adds to ``subprocess.Popen``'s arguments); its first line unread."""
    return subprocess.Popen(
        [sys.executable, "-m", "xendmop", "mock-host", "--socket", path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
        cwd=str(REPO),
        **popen,
    )


def wait_for(predicate: Callable[[], object], timeout: float) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        time.sleep(0.02)


def count_posts(xen: RemoteXen, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The kinds of the messages ``xen`` posts from now on (sent without waiting for a reply)."""
    kinds: list[int] = []
    real = xen.post

    def counting(request: bytes) -> None:
        kinds.append(int.from_bytes(request[:2], "little"))
        real(request)

    monkeypatch.setattr(xen, "post", counting)
    return kinds
