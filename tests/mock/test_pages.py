"""``mock.pages.PageStore``: a guest's or a server's pages as one shared memfd."""

from __future__ import annotations

import os

import pytest

from xendmop.mock.pages import PageStore


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_store_that_cannot_be_mapped_leaves_no_memfd_behind() -> None:
    """A host process out of memory or fds must not also lose the memfd it just made."""
    before = _open_fds()
    for _ in range(5):
        with pytest.raises(OSError):
            PageStore("too-big", 1 << 50)  # 4 EiB: ftruncate or mmap refuses it
    assert _open_fds() == before


def test_a_store_is_shared_memory_behind_its_fd() -> None:
    store = PageStore("shared", 2)
    try:
        store.page(1)[:4] = b"xen!"
        assert os.pread(store.fd, 4, 4096) == b"xen!"
        with pytest.raises(IndexError, match="page 2 of 2"):
            store.page(2)
    finally:
        store.close()
    assert store.closed
