"""The mock ``/dev/xen/privcmd`` and ``/dev/xen/hypercall``: Linux ``drivers/xen/privcmd.c``
and ``privcmd-buf.c`` in front of the mock hypervisor.

The ioctl argument is what ``fcntl.ioctl(fd, request, arg, True)`` would take: a
mutable ctypes object (or buffer), or an int used as a user address.  Pointers
inside it (``ubufs``, ``uptr``, ``arr``, ``err``, ``addr``) are user addresses,
read and written with ``usermem.UserMemory``: the kernel's copy_{from,to}_user.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from ..abi.privcmd import (
    HYPERCALL_PATH,
    IOCTL_PRIVCMD_DM_OP,
    IOCTL_PRIVCMD_HYPERCALL,
    IOCTL_PRIVCMD_MMAP_RESOURCE,
    IOCTL_PRIVCMD_MMAPBATCH_V2,
    IOCTL_PRIVCMD_RESTRICT,
    PRIVCMD_PATH,
    privcmd_dm_op,
    privcmd_dm_op_buf,
    privcmd_hypercall,
    privcmd_mmap_resource,
    privcmd_mmapbatch_v2,
)
from ..abi.xen import DOMID_INVALID, domid_t
from ..abi.xen import __HYPERVISOR_dm_op as HYPERVISOR_DM_OP
from .usermem import PAGE_SIZE, access_ok

if TYPE_CHECKING:
    from . import MockXen


S = TypeVar("S", bound=ctypes.Structure)


def raise_errno(err: int) -> NoReturn:
    """Deliver ``-err`` from a syscall as Python does: ``OSError(err, strerror)``."""
    raise OSError(err, os.strerror(err))


def _arg_view(arg: Any) -> memoryview:
    return memoryview(arg).cast("B")


def read_arg(arg: Any, struct: type[S], memory: Any = None) -> S:
    """copy_from_user of the ioctl argument (an int is a user address)."""
    size = ctypes.sizeof(struct)
    if isinstance(arg, int):
        if memory is None:
            from .usermem import UserMemory

            memory = UserMemory()
        return struct.from_buffer_copy(memory.read(arg, size))
    try:
        raw = bytes(_arg_view(arg)[:size])
    except TypeError:
        raise_errno(errno.EFAULT)
    if len(raw) < size:
        raise_errno(errno.EFAULT)
    return struct.from_buffer_copy(raw)


def write_arg(arg: Any, offset: int, data: bytes, memory: Any) -> None:
    """copy_to_user into the ioctl argument at ``offset``."""
    if isinstance(arg, int):
        memory.write(arg + offset, data)
        return
    view = _arg_view(arg)
    if view.readonly or offset + len(data) > view.nbytes:
        raise_errno(errno.EFAULT)
    view[offset : offset + len(data)] = data


@dataclass
class Vma:
    """A privcmd VMA: an mmap of the device, and whether a mapping ioctl claimed it.

    ``mapping`` is None for a VMA that lives in another process (``xendmop.mock.remote``):
    that process reports its unmapping, which sets ``released``.
    """

    mapping: mmap.mmap | None
    start: int
    length: int
    locked: bool = False  # vm_private_data = PRIV_VMA_LOCKED
    released: bool = False

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def alive(self) -> bool:
        return not self.released and (self.mapping is None or not self.mapping.closed)


def _address_of(mapping: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # release the buffer export so the caller can still close the mmap


class _DeviceBase:
    path: str

    def __init__(self, host: MockXen, memory: Any = None) -> None:
        self._host = host
        #: the opener's memory, reached as the kernel reaches it (copy_{from,to}_user, remap):
        #: the host's own ``UserMemory``, or a client process's over ``xendmop.mock.remote``
        self.memory = host.memory if memory is None else memory
        self._fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)  # a real fd to hand out

    def fileno(self) -> int:
        if self._fd < 0:
            raise_errno(errno.EBADF)
        return self._fd

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
            self._host._forget(self)


class HypercallDevice(_DeviceBase):
    """``/dev/xen/hypercall`` (privcmd-buf.c): zeroed shared pages, no ioctls."""

    path = HYPERCALL_PATH

    def ioctl(self, request: int, arg: Any = 0) -> int:
        raise_errno(errno.ENOTTY)

    def mmap(self, length: int, offset: int = 0) -> mmap.mmap:
        """``privcmd_buf_mmap``: anonymous shared zeroed pages (MAP_SHARED is the only mode offered).

        Linux ignores the offset: ``privcmd_buf_mmap`` (``drivers/xen/privcmd-buf.c``) checks
        only VM_SHARED and maps fresh pages with ``vm_map_pages_zero``, which does not
        read ``vm_pgoff``.  A negative offset never gets here (``do_mmap`` refuses it)."""
        if length <= 0 or offset < 0:  # mm/mmap.c do_mmap: no length, or an offset that wraps
            raise_errno(errno.EINVAL)
        return mmap.mmap(-1, length, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)


class PrivcmdDevice(_DeviceBase):
    """One open of ``/dev/xen/privcmd`` (``privcmd_open``: unrestricted, ``DOMID_INVALID``)."""

    path = PRIVCMD_PATH

    def __init__(self, host: MockXen, memory: Any = None) -> None:
        super().__init__(host, memory)
        self.restrict_domid = DOMID_INVALID
        self._vmas: list[Vma] = []

    # --- mmap ------------------------------------------------------------------------

    def mmap(self, length: int, offset: int = 0) -> mmap.mmap:
        """``privcmd_mmap``: an empty VMA that MMAPBATCH_V2 / MMAP_RESOURCE later fill.

        The mock backs it with anonymous shared memory; filling it remaps a memfd's
        pages over the same addresses (``usermem.remap``), so the returned object then
        reads and writes the guest's or the ioreq server's frames themselves.
        """
        if length <= 0:
            raise_errno(errno.EINVAL)
        mapping = mmap.mmap(-1, length, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        with self._host.lock:
            self._vmas = [v for v in self._vmas if v.alive]
            self._vmas.append(Vma(mapping, _address_of(mapping), length))
        return mapping

    def adopt_vma(self, start: int, length: int) -> None:
        """``privcmd_mmap`` done by another process: its anonymous VMA at ``start`` is ours to fill."""
        if length <= 0 or start % PAGE_SIZE or length % PAGE_SIZE or not access_ok(start, length):
            raise_errno(errno.EINVAL)
        with self._host.lock:
            self._vmas = [v for v in self._vmas if v.alive and (v.end <= start or v.start >= start + length)]
            self._vmas.append(Vma(None, start, length))

    def release_vma(self, start: int) -> None:
        """That process unmapped the VMA starting at ``start`` (``munmap``)."""
        with self._host.lock:
            for vma in self._vmas:
                if vma.start == start:
                    vma.released = True
            self._vmas = [v for v in self._vmas if v.alive]

    def find_vma(self, addr: int) -> Vma | None:
        """``find_vma`` restricted to this device's live VMAs containing ``addr``."""
        for vma in self._vmas:
            if vma.alive and vma.start <= addr < vma.end:
                return vma
        return None

    # --- ioctl -----------------------------------------------------------------------

    def ioctl(self, request: int, arg: Any = 0) -> int:
        """``privcmd_ioctl``: dispatch, log, and raise ``OSError`` for a negative result."""
        if self._fd < 0:  # the fd is closed
            raise_errno(errno.EBADF)
        with self._host.lock:
            call = self._decode(request)
            detail: dict[str, Any] = {}
            rc = call(arg, detail) if call is not None else -errno.ENOTTY
            self._host.log("privcmd", request, detail, rc)
        if rc < 0:
            raise_errno(-rc)
        return rc

    def _decode(self, request: int) -> Any:
        if request == IOCTL_PRIVCMD_DM_OP and not self._host.dm_op_ioctl:
            return None  # a pre-4.11 kernel: the ioctl does not exist
        return {
            IOCTL_PRIVCMD_HYPERCALL: self._hypercall,
            IOCTL_PRIVCMD_DM_OP: self._dm_op,
            IOCTL_PRIVCMD_RESTRICT: self._restrict,
            IOCTL_PRIVCMD_MMAP_RESOURCE: self._mmap_resource,
            IOCTL_PRIVCMD_MMAPBATCH_V2: self._mmapbatch_v2,
        }.get(request)

    @property
    def _restricted(self) -> bool:
        return self.restrict_domid != DOMID_INVALID

    def _hypercall(self, arg: Any, detail: dict[str, Any]) -> int:
        """``privcmd_ioctl_hypercall``: never on a restricted fd; only dm_op reaches the mock Xen."""
        if self._restricted:
            return -errno.EPERM
        try:
            call = read_arg(arg, privcmd_hypercall, self.memory)
        except OSError:
            return -errno.EFAULT
        detail.update(op=int(call.op), args=[int(a) for a in call.arg])
        # The op is compared whole: privcmd passes the __u64 on and the lab's Xen 4.17.7 / Linux 6.1
        # answered ENOSYS for op 200 and for 2**32+41 alike (no truncation into a dm_op), as here
        # (integration/scenarios.py "raw privcmd hypercall")
        if call.op != HYPERVISOR_DM_OP:
            return -errno.ENOSYS  # the mock implements no other hypercall
        domid, nr_bufs, bufs = int(call.arg[0]), int(call.arg[1]), int(call.arg[2])
        detail.update(dm_op=self._host.peek_op(bufs, nr_bufs, self.memory))
        return self._host.hypervisor.do_dm_op(self._host.caller, domid, nr_bufs, bufs, self.memory)

    def _dm_op(self, arg: Any, detail: dict[str, Any]) -> int:
        """``privcmd_ioctl_dm_op``, step by step in the kernel's order."""
        memory = self.memory
        try:
            kdata = read_arg(arg, privcmd_dm_op, memory)
        except OSError:
            return -errno.EFAULT
        detail.update(dom=int(kdata.dom), num=int(kdata.num))
        if self._restricted and kdata.dom != self.restrict_domid:  # before the num == 0 shortcut
            return -errno.EPERM
        if kdata.num == 0:
            return 0
        if kdata.num > self._host.dm_op_max_nr_bufs:
            return -errno.E2BIG
        try:
            raw = memory.read(kdata.ubufs or 0, ctypes.sizeof(privcmd_dm_op_buf) * kdata.num)
        except OSError:
            return -errno.EFAULT
        kbufs = [(int(b.uptr or 0), int(b.size)) for b in (privcmd_dm_op_buf * kdata.num).from_buffer_copy(raw)]
        detail.update(bufs=kbufs)
        for uptr, size in kbufs:
            if size > self._host.dm_op_buf_max_size:
                return -errno.E2BIG
            if not access_ok(uptr, size):
                return -errno.EFAULT
        for uptr, size in kbufs:  # lock_pages: pin_user_pages_fast(FOLL_WRITE)
            # lock_pages asks for DIV_ROUND_UP(offset_in_page(uptr) + size, PAGE_SIZE) pages:
            # a page-aligned 0-byte buffer asks for none, and pinning nothing is -EFAULT
            # (on Debian's 6.1 it also corrupted dom0 memory: HAZARD 2, integration/scenarios.py).
            if size == 0 and uptr % PAGE_SIZE == 0:
                return -errno.EFAULT
            try:
                memory.check_writable(uptr, size)
            except OSError:
                return -errno.EFAULT
        detail.update(dm_op=self._host.peek_op(kbufs, len(kbufs), memory))
        return self._host.hypervisor.do_dm_op(self._host.caller, int(kdata.dom), len(kbufs), kbufs, memory)

    def _restrict(self, arg: Any, detail: dict[str, Any]) -> int:
        """``privcmd_ioctl_restrict``: set once; the same domid again is fine, another is -EINVAL."""
        try:
            dom = int(read_arg(arg, _domid_box, self.memory).domid)
        except OSError:
            return -errno.EFAULT
        detail.update(dom=dom)
        if self._restricted and self.restrict_domid != dom:
            return -errno.EINVAL
        self.restrict_domid = dom
        return 0

    def _mmap_resource(self, arg: Any, detail: dict[str, Any]) -> int:
        """``privcmd_ioctl_mmap_resource`` → ``XENMEM_acquire_resource`` → remap the frames."""
        memory = self.memory
        try:
            kdata = read_arg(arg, privcmd_mmap_resource, memory)
        except OSError:
            return -errno.EFAULT
        detail.update(
            dom=int(kdata.dom),
            type=int(kdata.type),
            id=int(kdata.id),
            idx=int(kdata.idx),
            num=int(kdata.num),
            addr=int(kdata.addr),
        )
        if self._restricted and kdata.dom != self.restrict_domid:
            return -errno.EPERM
        if bool(kdata.addr) != bool(kdata.num):
            return -errno.EINVAL
        hv = self._host.hypervisor
        rtype = kdata.type & 0xFFFF  # xen_mem_acquire_resource.type is a uint16_t
        if not kdata.addr:  # size query: Xen writes nr_frames, privcmd put_user()s it into num
            got = hv.acquire_resource(self._host.caller, kdata.dom, rtype, kdata.id, 0, 0, query=True)
            if not isinstance(got, int) or got < 0:
                return got if isinstance(got, int) else -errno.EINVAL
            try:
                write_arg(arg, privcmd_mmap_resource.num.offset, got.to_bytes(8, "little"), memory)
            except OSError:
                return -errno.EFAULT
            return 0
        vma = self.find_vma(kdata.addr)
        if vma is None or kdata.addr + kdata.num * PAGE_SIZE > vma.end:
            return -errno.EINVAL
        if kdata.num > 0xFFFFFFFF:  # kcalloc(kdata.num) of pfns
            return -errno.ENOMEM
        frames = hv.acquire_resource(
            self._host.caller, kdata.dom, rtype, kdata.id, kdata.idx, int(kdata.num), query=False
        )
        if isinstance(frames, int):
            return frames
        vma.locked = True
        memory.remap_pages([(kdata.addr + i * PAGE_SIZE, ref.store.fd, ref.offset) for i, ref in enumerate(frames)])
        return 0

    def _mmapbatch_v2(self, arg: Any, detail: dict[str, Any]) -> int:
        """``privcmd_ioctl_mmap_batch`` (version 2): guest frames with per-frame errors."""
        memory = self.memory
        try:
            m = read_arg(arg, privcmd_mmapbatch_v2, memory)
        except OSError:
            return -errno.EFAULT
        num, addr = int(m.num), int(m.addr)
        detail.update(dom=int(m.dom), num=num, addr=addr)
        if not access_ok(m.err or 0, 4 * num):
            return -errno.EFAULT
        if self._restricted and m.dom != self.restrict_domid:
            return -errno.EPERM
        # (m.num <= 0) || nr_pages > (LONG_MAX >> PAGE_SHIFT): m.num is an unsigned int, so
        # nr_pages (DIV_ROUND_UP(m.num, XEN_PFN_PER_PAGE)) never exceeds the bound: only 0 is
        # EINVAL (the lab: num 2**31+1 over a short array is EFAULT, "raw mmapbatch array bounds")
        if num == 0:
            return -errno.EINVAL
        try:  # gather_array, then clear_user(m.err)
            gfns = _gather_array(memory, m.arr or 0, num)
            memory.clear(m.err or 0, 4 * num)
        except OSError as e:  # gather_array: ENOMEM when its pages cannot be had, else copy_from_user's EFAULT
            return -(errno.ENOMEM if e.errno == errno.ENOMEM else errno.EFAULT)
        vma = self.find_vma(addr)
        if vma is None:
            return -errno.EINVAL
        end = addr + num * PAGE_SIZE
        if not vma.locked and (addr != vma.start or end != vma.end):  # a virgin VMA is mapped whole
            return -errno.EINVAL
        if end > vma.end:
            return -errno.EINVAL
        vma.locked = True
        errs = self._host.foreign_map(int(m.dom), gfns, addr, memory)
        if any(errs):
            memory.write(m.err or 0, b"".join(ctypes.c_int32(e).value.to_bytes(4, "little", signed=True) for e in errs))
            if -errno.ENOENT in errs:
                return -errno.ENOENT
        return 0


#: the most bytes of frame numbers one MMAPBATCH gathers (2M frames, 8 GiB of guest memory):
#: Linux's ``gather_array`` (drivers/xen/privcmd.c) copies the array a page at a time into pages
#: from ``alloc_page`` and fails with ENOMEM when they run out; the mock runs out here, instead of
#: allocating what a caller's ``num`` claims (``num=0x17727a23`` was 3 GiB and a MemoryError)
GATHER_MAX = 16 << 20
_GATHER_CHUNK = 16 * PAGE_SIZE


def gather_chunks(arr: int, num: int) -> list[tuple[int, int]]:
    """The reads ``_gather_array`` makes, in order: ``(address, nbytes)``."""
    total = min(8 * num, GATHER_MAX)
    return [(arr + off, min(_GATHER_CHUNK, total - off)) for off in range(0, total, _GATHER_CHUNK)]


def _gather_array(memory: Any, arr: int, num: int) -> list[int]:
    """``gather_array(&pagelist, num, sizeof(xen_pfn_t), arr)``: the array copied in order, so a
    short array faults (EFAULT) where its memory ends, whatever ``num`` claims; an array still
    readable after ``GATHER_MAX`` bytes is ENOMEM (the kernel's pages ran out first)."""
    parts = [memory.read(addr, n) for addr, n in gather_chunks(arr, num)]
    if 8 * num > GATHER_MAX:
        raise OSError(errno.ENOMEM, f"MMAPBATCH: {num} frames, more than the mock gathers ({GATHER_MAX // 8})")
    return list(memoryview(b"".join(parts)).cast("Q"))


class _domid_box(ctypes.Structure):
    _fields_ = [("domid", domid_t)]
