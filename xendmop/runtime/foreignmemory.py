"""``ForeignMemory``: another domain's frames mapped through ``/dev/xen/privcmd``
(libxenforeignmemory), and ``GuestRam``, the dispatch core's view of guest RAM.

Linux privcmd maps foreign frames into a VMA that an ``mmap`` of the device made:
first the ``mmap``, then an ioctl naming that VMA's address
(``IOCTL_PRIVCMD_MMAP_RESOURCE`` or ``IOCTL_PRIVCMD_MMAPBATCH_V2``), as
``xenforeignmemory_map_resource``/``xenforeignmemory_map`` do in
``tools/libs/foreignmemory/linux.c``.  Mappings are returned as ``ForeignMapping``
objects that expose the bytes as a ``memoryview`` without copying.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..abi.memory import XENMEM_resource_ioreq_server
from ..abi.privcmd import (
    IOCTL_PRIVCMD_MMAP_RESOURCE,
    IOCTL_PRIVCMD_MMAPBATCH_V2,
    IOCTL_PRIVCMD_RESTRICT,
    privcmd_mmap_resource,
    privcmd_mmapbatch_v2,
)
from ..abi.xen import DOMID_FIRST_RESERVED, domid_t
from ..backends.device import PAGE_SIZE, PRIVCMD_PATH, Device, FrameViews, open_device
from ..checks import check_domid, check_int
from ..errors import ArgumentError, XenError, xen_error
from ..handle import OwnedHandle
from .dispatch import GuestMemoryError

__all__ = ["ForeignMemory", "GuestRam", "ForeignMapping"]

_PAGE_SHIFT = PAGE_SIZE.bit_length() - 1
#: frames per MMAPBATCH_V2 call (the kernel's ``num`` is an unsigned int; keep calls small)
MAX_BATCH = 1 << 20


def _address_of(mapping: mmap.mmap) -> int:
    """The user address of an ``mmap`` (what the kernel knows the VMA by)."""
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # drop the buffer export so the mapping can still be closed


@dataclass(eq=False)
class ForeignMapping(FrameViews):
    """Foreign frames mapped in this process.  ``view`` is the live memory (no copy);
    ``errors[i]`` is 0 or the ``-errno`` for frame ``i`` (``map`` only)."""

    domid: int
    nr_frames: int
    mm: mmap.mmap
    errors: tuple[int, ...] = ()
    view: memoryview = field(init=False)

    def __post_init__(self) -> None:
        self.view = memoryview(self.mm)

    @property
    def closed(self) -> bool:
        return self.mm.closed

    def close(self) -> None:
        """munmap.  Views taken from ``view`` must have been released first."""
        if self.mm.closed:
            return
        self.view.release()
        self.mm.close()


class ForeignMemory(OwnedHandle[Device]):
    """An open ``/dev/xen/privcmd`` used for mapping; owns its device; a context manager.

    ``opener(path)`` gives the device (``backends.device.open_device`` on a dom0, the
    mock host's ``open_device`` on the mock).  Errors are ``XenError`` with layer
    ``"privcmd"``; misuse is ``ArgumentError``/``ClosedHandleError``.
    """

    def __init__(self, opener: Callable[[str], Any] = open_device, path: str = PRIVCMD_PATH) -> None:
        super().__init__(opener(path))
        self._maps: list[ForeignMapping] = []
        self.restricted_to: int | None = None

    @property
    def device(self) -> Device:
        return self._use()

    def _ioctl(self, name: str, request: int, arg: Any, domid: int, **shown: int) -> int:
        try:
            return self.device.ioctl(request, arg)
        except OSError as e:
            if isinstance(e, XenError) or e.errno is None:
                raise
            raise xen_error(e.errno, name, domid, shown, layer="privcmd") from None

    def _mmap(self, nr_frames: int) -> mmap.mmap:
        try:
            return self.device.mmap(nr_frames * PAGE_SIZE)
        except OSError as e:
            if isinstance(e, XenError) or e.errno is None:
                raise
            raise xen_error(e.errno, "mmap", None, {"nr_frames": nr_frames}, layer="privcmd") from None

    # --- mapping ------------------------------------------------------------------------

    def map_resource(
        self, domid: int, type: int = XENMEM_resource_ioreq_server, id: int = 0, frame: int = 0, nr_frames: int = 1
    ) -> ForeignMapping:
        """IOCTL_PRIVCMD_MMAP_RESOURCE (XENMEM_acquire_resource): map ``nr_frames`` frames
        of resource ``type``/``id`` from ``frame`` (ioreq server: frame 0 is the
        buffered page, 1 the synchronous page).  EOPNOTSUPP/ENOTTY: no resource
        mapping here (old Xen or kernel); ENOENT: no such frame (e.g. bufioreq off)."""
        check_domid("map_resource", domid)
        for name, value, top in (("type", type, 0xFFFF), ("id", id, 0xFFFFFFFF), ("frame", frame, 0xFFFFFFFF)):
            check_int("map_resource", name, value, 0, top)
        check_int("map_resource", "nr_frames", nr_frames, 1, 0xFFFFFFFF)
        mm = self._mmap(nr_frames)  # the VMA first: the ioctl fills it (privcmd_ioctl_mmap_resource)
        arg = privcmd_mmap_resource(dom=domid, type=type, id=id, idx=frame, num=nr_frames, addr=_address_of(mm))
        try:
            self._ioctl(
                "map_resource", IOCTL_PRIVCMD_MMAP_RESOURCE, arg, domid, type=type, id=id, frame=frame, nr=nr_frames
            )
        except BaseException:
            mm.close()
            raise
        return self._track(ForeignMapping(domid, nr_frames, mm))

    def map(self, domid: int, gfns: Sequence[int]) -> ForeignMapping:
        """IOCTL_PRIVCMD_MMAPBATCH_V2: map guest frames ``gfns`` contiguously.

        Per-frame failures do not raise: they are in ``ForeignMapping.errors`` (``-errno``
        per frame; touching such a page faults).  Raises when the whole call fails
        (``ENOENT`` too: a frame is paged out, retry later)."""
        check_domid("map", domid)
        n = len(gfns)
        check_int("map", "len(gfns)", n, 1, MAX_BATCH)
        arr = (ctypes.c_uint64 * n)()
        for i, gfn in enumerate(gfns):
            arr[i] = check_int("map", f"gfns[{i}]", gfn, 0, (1 << 64) - 1)
        err = (ctypes.c_int * n)()
        mm = self._mmap(n)
        arg = privcmd_mmapbatch_v2(
            num=n, dom=domid, addr=_address_of(mm), arr=ctypes.addressof(arr), err=ctypes.addressof(err)
        )
        try:
            self._ioctl("map", IOCTL_PRIVCMD_MMAPBATCH_V2, arg, domid, nr=n)
        except BaseException:
            mm.close()
            raise
        return self._track(ForeignMapping(domid, n, mm, tuple(int(e) for e in err)))

    def unmap(self, mapping: ForeignMapping) -> None:
        """munmap a mapping made by this handle."""
        if mapping in self._maps:
            self._maps.remove(mapping)
        mapping.close()

    def _track(self, m: ForeignMapping) -> ForeignMapping:
        self._maps = [x for x in self._maps if not x.closed]
        self._maps.append(m)
        return m

    def restrict(self, domid: int) -> None:
        """IOCTL_PRIVCMD_RESTRICT: this handle may map only ``domid`` from now on."""
        check_domid("restrict", domid)
        if domid >= DOMID_FIRST_RESERVED:
            raise ArgumentError("restrict", "domid", domid, "must be a guest domid (< 0x7ff0)")
        self._ioctl("restrict", IOCTL_PRIVCMD_RESTRICT, domid_t(domid), domid)
        self.restricted_to = domid

    # --- lifetime -----------------------------------------------------------------------

    def fileno(self) -> int:
        return self.device.fileno()

    def _release(self, dev: Device) -> None:
        """Unmap what this handle mapped, then close the device (``close``)."""
        maps, self._maps = self._maps, []
        try:
            for m in maps:
                try:
                    m.close()
                except BufferError:  # someone still holds a view: the GC unmaps it later
                    pass
        finally:
            dev.close()


class GuestRam:
    """Guest-physical memory for the dispatch core, foreign-mapped on first use.

    Frames are mapped ``bucket`` at a time (an aligned group, one ``MMAPBATCH`` call, as
    QEMU's mapcache maps buckets: a device streaming through a guest's buffers pays one
    mapping per group, not per page) and kept in a small LRU of at most ``max_pages`` pages
    in all, so the memory held never depends on what the guest asks for.  A frame Xen
    refuses (not RAM, not the guest's) raises ``GuestMemoryError`` when it is touched, not
    its neighbours; so does an address above ``limit`` (when given) before any mapping is
    tried.  ``max_pages`` must hold two buckets (an access may straddle two).
    """

    def __init__(
        self, fmem: ForeignMemory, domid: int, *, max_pages: int = 64, limit: int | None = None, bucket: int = 1
    ) -> None:
        if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1 or bucket & (bucket - 1):
            raise ValueError(f"bucket={bucket!r}: must be a power of two >= 1 (frames)")
        if isinstance(max_pages, bool) or not isinstance(max_pages, int) or max_pages < 2 * bucket:
            raise ValueError(f"max_pages={max_pages!r}: must hold two buckets of {bucket} frames")
        self.fmem = fmem
        self.domid = domid
        self.max_pages = max_pages
        self.limit = limit
        self.bucket = bucket
        self._shift = bucket.bit_length() - 1
        self._pages: OrderedDict[int, ForeignMapping] = OrderedDict()  # bucket number -> its mapping

    def _page(self, gfn: int) -> memoryview:
        number = gfn >> self._shift
        m = self._pages.get(number)
        if m is not None:
            self._pages.move_to_end(number)
        else:
            first = number << self._shift
            try:
                m = self.fmem.map(self.domid, range(first, first + self.bucket))
            except (XenError, ArgumentError) as e:
                raise GuestMemoryError(f"dom{self.domid} gfn {gfn:#x}: {e}") from None
            if not any(e == 0 for e in m.errors):  # nothing there is the guest's RAM: keep nothing
                err = -m.errors[0]
                self.fmem.unmap(m)
                raise GuestMemoryError(
                    f"dom{self.domid} gfn {gfn:#x}: {os.strerror(err)} [{errno.errorcode.get(err, err)}]"
                )
            self._pages[number] = m
            while len(self._pages) > self.max_pages >> self._shift:
                _, old = self._pages.popitem(last=False)
                try:
                    self.fmem.unmap(old)
                except BufferError:  # a view of it is still in use (an access wider than the
                    pass  # cache): it goes when that view does, as ForeignMemory.close leaves it
        index = gfn - (number << self._shift)
        err = -m.errors[index]
        if err:
            raise GuestMemoryError(
                f"dom{self.domid} gfn {gfn:#x}: {os.strerror(err)} [{errno.errorcode.get(err, err)}]"
            )
        # A slice, not ``m.view``: it stays usable if the LRU lets ``m`` go before it is dropped.
        return m.view[index * PAGE_SIZE : (index + 1) * PAGE_SIZE]

    def _check_range(self, gpa: int, size: int) -> None:
        """Refuse a range that is not all guest RAM before anything is allocated for it: outside
        ``limit``, or (when it spans pages) one whose last page Xen will not map, so that
        ``read(0, 2**40)`` costs one mapping, not gigabytes gathered until the first hole."""
        for name, value in (("gpa", gpa), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"GuestRam: {name} must be an int, not {type(value).__name__}")
        if gpa < 0 or size < 0 or (self.limit is not None and gpa + size > self.limit):
            raise GuestMemoryError(f"gpa {gpa:#x}+{size} outside guest RAM")
        if size > PAGE_SIZE - (gpa & (PAGE_SIZE - 1)):
            self._page((gpa + size - 1) >> _PAGE_SHIFT)  # GuestMemoryError when it is not RAM

    def _chunks(self, gpa: int, size: int) -> Iterator[tuple[int, int, int]]:
        """``(gfn, offset, nbytes)`` page by page, made as they are used."""
        while size:
            gfn, off = gpa >> _PAGE_SHIFT, gpa & (PAGE_SIZE - 1)
            n = min(size, PAGE_SIZE - off)
            yield gfn, off, n
            gpa, size = gpa + n, size - n

    def read(self, gpa: int, size: int) -> bytes:
        """``size`` bytes of guest RAM at ``gpa``: ``GuestMemoryError`` when any of it is not RAM
        (a range past the guest's last page before anything is read or allocated)."""
        if type(gpa) is int and type(size) is int:  # a bool or an int subclass: the checked path
            off = gpa & (PAGE_SIZE - 1)
            if 0 < size <= PAGE_SIZE - off and gpa >= 0 and (self.limit is None or gpa + size <= self.limit):
                # Within one page (a ring's index, a descriptor): what _check_range and
                # _chunks would find, without them.
                return bytes(self._page(gpa >> _PAGE_SHIFT)[off : off + size])
        self._check_range(gpa, size)
        out = bytearray()  # grows with what was read: a hole midway costs what came before it
        for gfn, off, n in self._chunks(gpa, size):
            out += self._page(gfn)[off : off + n]
        return bytes(out)

    def write(self, gpa: int, data: bytes) -> None:
        size = len(data)
        if type(gpa) is int:
            off = gpa & (PAGE_SIZE - 1)
            if 0 < size <= PAGE_SIZE - off and gpa >= 0 and (self.limit is None or gpa + size <= self.limit):
                self._page(gpa >> _PAGE_SHIFT)[off : off + size] = data  # within one page, as in read
                return
        self._check_range(gpa, size)
        chunks = list(self._chunks(gpa, size))
        views = [self._page(gfn) for gfn, _, _ in chunks]  # map every page first: all or nothing
        done = 0
        for view, (_, off, n) in zip(views, chunks):
            view[off : off + n] = data[done : done + n]
            done += n

    def iter_views(self, gpa: int, size: int) -> Iterator[memoryview]:
        """Writable views of guest RAM covering ``size`` bytes at ``gpa``, page by page (each
        within one page), mapped as they are taken: a device hands them to ``preadv``/``pwritev``
        with no copy.  A page that is not RAM raises ``GuestMemoryError`` when reached (the range
        past ``limit``, or whose last page Xen will not map, before the first view)."""
        self._check_range(gpa, size)
        for gfn, off, n in self._chunks(gpa, size):
            yield self._page(gfn)[off : off + n]

    def invalidate(self) -> None:
        """Unmap every cached page (IOREQ_TYPE_INVALIDATE)."""
        while self._pages:
            _, m = self._pages.popitem()
            self.fmem.unmap(m)

    close = invalidate
