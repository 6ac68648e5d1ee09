"""Machine memory of the mock host: memfd-backed page stores.

A guest's RAM and an ioreq server's pages each live in one memfd.  Everyone who
needs the bytes maps the same file: the mock's own view (``PageStore.page``), a
device model's privcmd mapping (``usermem.remap`` of the memfd into its VMA), and
later a simulated vCPU, so a write through one is seen through all of them, as
with real shared frames.
"""

from __future__ import annotations

import gc
import mmap
import os
from dataclasses import dataclass

from .usermem import PAGE_SIZE


class PageStore:
    """``npages`` zeroed pages in a memfd, mapped once for the mock's own use."""

    def __init__(self, name: str, npages: int) -> None:
        self.name = name
        self.npages = npages
        self.fd = os.memfd_create(f"xendmop-mock-{name}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, npages * PAGE_SIZE)  # sparse: untouched pages cost nothing
            self._map = mmap.mmap(self.fd, npages * PAGE_SIZE, mmap.MAP_SHARED)
        except BaseException:  # e.g. ENOMEM or EMFILE: the memfd goes with the failure
            os.close(self.fd)
            self.fd = -1
            raise
        self.view = memoryview(self._map)

    def page(self, index: int) -> memoryview:
        """The bytes of page ``index`` (a live view of the shared memory)."""
        if not 0 <= index < self.npages:
            raise IndexError(f"{self.name}: page {index} of {self.npages}")
        return self.view[index * PAGE_SIZE : (index + 1) * PAGE_SIZE]

    def clear(self, index: int) -> None:
        """``clear_page``."""
        self.page(index)[:] = bytes(PAGE_SIZE)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        """Free the memfd and the mock's mapping (idempotent).

        ``mmap.mmap`` holds its own dup of the fd until the mapping is closed, which
        it refuses while a page view (``page()``) is alive.  Views that are merely
        unreachable are collected first; if one is still really held, that mapping
        (and its fd) goes when the holder drops it.
        """
        if self.fd < 0:
            return
        self.view.release()
        try:
            self._map.close()
        except BufferError:
            gc.collect()  # page views in reference cycles (dead domains, servers)
            try:
                self._map.close()
            except BufferError:
                pass  # still exported: closed with the mmap object
        fd, self.fd = self.fd, -1
        os.close(fd)


@dataclass(frozen=True)
class PageRef:
    """One machine frame: page ``index`` of ``store`` (the mock's mfn)."""

    store: PageStore
    index: int

    @property
    def offset(self) -> int:
        return self.index * PAGE_SIZE

    def view(self) -> memoryview:
        return self.store.page(self.index)
