"""What the mock host process tests share: waiting for a condition, counting posted messages."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from xendmop.mock.remote import RemoteXen


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
