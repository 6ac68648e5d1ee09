"""Request memory, pooled: one arena per call in flight, no mmap per call.

Which memory depends on who reads it:

- ``IOCTL_PRIVCMD_DM_OP`` (every kernel since 4.11): the kernel pins the buffers itself
  (``lock_pages`` in Linux ``drivers/xen/privcmd.c``) and Xen copies through the kernel's
  mapping, so ordinary anonymous memory is right, as libxendevicemodel hands the ioctl its
  caller's own buffers.  Hypercall-device pages are *not*: they are a ``VM_IO`` mapping, and
  pinning them failed with EFAULT on Linux 6.12 (Debian 13 in the lab), although 6.1 let it by.
- ``IOCTL_PRIVCMD_HYPERCALL`` (the fallback): Xen reads user memory directly, so pages come
  from ``/dev/xen/hypercall`` (kernel pages that page migration cannot move: Linux
  ``drivers/xen/privcmd-buf.c``); where that device is missing, from locked anonymous memory
  with ``MADV_DONTFORK``, as libxencall's ``osdep_alloc_pages`` does
  (``tools/libs/call/linux.c``).

Arena layout (offsets in bytes):

    0     struct privcmd_dm_op                 (IOCTL_PRIVCMD_DM_OP argument)
    16    privcmd_dm_op_buf / xen_dm_op_buf[2] (same 16-byte layout)
    48    struct xen_dm_op                     (bufs[0], 32 bytes)
    80    struct privcmd_hypercall             (fallback path)
    PAGE  slot data                            (bufs[1], up to max_buf_size)
    PAGE + EMPTY_SLOT_OFFSET                   (bufs[1] when it is 0 bytes long)

Two buffers are all a DMOP uses, the op and at most one slot: Xen refuses more with
E2BIG (``do_dm_op`` in ``xen/common/dm.c``; ``buf[2]`` in ``xen/include/xen/dm.h``).
The DM_OP request, both buffers and the op are one run of 80 bytes, so a generated
call writes them with one ``Struct.pack_into`` (``backends/privcmd.py``).

A 0-byte buffer is never handed over page-aligned: privcmd's ``lock_pages``
(Linux ``drivers/xen/privcmd.c``) pins the pages the buffer spans, which for an
aligned empty buffer is none; the Debian 6.1 dom0 kernel answered that with EFAULT
and once an oops (``integration/scenarios.py``, HAZARD 2), where libxendevicemodel's
unaligned pointer pinned one page and the call succeeded.

Everything in it that no call changes is written once, when the arena is made:
``ubufs``, ``bufs[0]`` (the op, 32 bytes), and the hypercall's ``op`` and ``arg[2]``.
The kernel only reads these (``copy_from_user`` in ``privcmd_ioctl_dm_op``).  A call on
the HYPERCALL path writes just the domid, the buffer count, ``bufs[1]`` and the op; one
on the DM_OP path writes the first 80 bytes whole, the fixed values as they were.  The op
(``bufs[0]``) is always written whole: Xen writes progress back into it on a
continuation (``do_dm_op``, ``xen/common/dm.c``).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import threading

from ..abi import CONSTANTS
from ..abi.privcmd import privcmd_dm_op, privcmd_dm_op_buf, privcmd_hypercall
from .device import HYPERCALL_PATH, NOT_XEN, PAGE_SIZE, Device, Opener

log = logging.getLogger(__name__)

MAX_BUFS = 2  # the op and one slot
_BUFS_AT = 16
_OP_AT = _BUFS_AT + MAX_BUFS * ctypes.sizeof(privcmd_dm_op_buf)
_OP_SIZE = 32  # sizeof(struct xen_dm_op)
_HYPERCALL_AT = _OP_AT + _OP_SIZE
#: offsets of what a call writes: (dom, num) of the DM_OP request, bufs[1], arg[0..1] of the hypercall
HEAD_AT = 0
SLOT_BUF_AT = _BUFS_AT + ctypes.sizeof(privcmd_dm_op_buf)  # bufs[1]: uptr, size
HYPERCALL_ARGS_AT = _HYPERCALL_AT + privcmd_hypercall.arg.offset
OP_AT = _OP_AT
#: where an empty bufs[1] points, inside the slot page: one page is pinned for it
EMPTY_SLOT_OFFSET = 16
_MAP_LOCKED = getattr(mmap, "MAP_LOCKED", 0x2000)  # x86 value from <asm-generic/mman.h>


class Arena:
    """One call's worth of hypercall-safe memory with precomputed views."""

    def __init__(self, memory: mmap.mmap, slot_room: int) -> None:
        self._memory = memory
        self.view = memoryview(memory)
        self._anchor = ctypes.c_char.from_buffer(memory)  # pins the mapping while views exist
        self.base = ctypes.addressof(self._anchor)
        self.dm_op = privcmd_dm_op.from_address(self.base)
        self.bufs_addr = self.base + _BUFS_AT
        self.bufs = (privcmd_dm_op_buf * MAX_BUFS).from_address(self.bufs_addr)
        self.hypercall = privcmd_hypercall.from_address(self.base + _HYPERCALL_AT)
        self.op_addr = self.base + _OP_AT
        self.slot_room = slot_room
        # the parts no call changes (see the module docstring)
        self.dm_op.ubufs = self.bufs_addr
        self.bufs[0].uptr, self.bufs[0].size = self.op_addr, _OP_SIZE
        self.slot_addr = self.base + PAGE_SIZE  # bufs[1].uptr, rewritten with its size per call
        self.bufs[1].uptr = self.slot_addr
        self.hypercall.op = CONSTANTS["__HYPERVISOR_dm_op"]
        self.hypercall.arg[2] = self.bufs_addr

    def slot_offset(self, index: int, nbytes: int) -> int:
        if index != 0 or nbytes > self.slot_room:
            raise ValueError(f"slot {index} of {nbytes} bytes does not fit the arena ({self.slot_room})")
        return PAGE_SIZE if nbytes else PAGE_SIZE + EMPTY_SLOT_OFFSET

    def set_bufs(self, bufs: list[tuple[int, int]]) -> None:
        if len(bufs) > MAX_BUFS:
            raise ValueError(f"{len(bufs)} buffers do not fit the arena ({MAX_BUFS})")
        for entry, (addr, size) in zip(self.bufs, bufs):
            entry.uptr = addr
            entry.size = size

    def close(self) -> None:
        del self.dm_op, self.bufs, self.hypercall, self._anchor
        self.view.release()
        self._memory.close()


class HypercallBuffers:
    """A pool of arenas: for the HYPERCALL path (``hypercall=True``) from the hypercall
    device or locked anonymous memory; for the DM_OP path from anonymous memory."""

    def __init__(self, opener: Opener, max_buf_size: int, *, hypercall: bool = True) -> None:
        self.slot_room = -(-max_buf_size // PAGE_SIZE) * PAGE_SIZE
        self._size = PAGE_SIZE + self.slot_room
        self._free: list[Arena] = []
        self._all: list[Arena] = []
        self._lock = threading.Lock()
        self._device: Device | None = None
        self._locked = hypercall
        if not hypercall:
            self.source = "anonymous memory (pinned by the kernel per call)"
            return
        try:
            self._device = opener(HYPERCALL_PATH)
            self.source = HYPERCALL_PATH
        except OSError as e:
            if e.errno not in NOT_XEN:
                raise
            self._device = None
            self.source = "locked anonymous memory"
            log.debug("%s missing: using %s", HYPERCALL_PATH, self.source)

    def _new_arena(self) -> Arena:
        if self._device is not None:
            memory = self._device.mmap(self._size)
        else:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
            try:
                memory = mmap.mmap(-1, self._size, flags | (_MAP_LOCKED if self._locked else 0))
            except OSError as e:  # RLIMIT_MEMLOCK without CAP_IPC_LOCK
                if e.errno not in (errno.EAGAIN, errno.EPERM, errno.ENOMEM):
                    raise
                log.warning("cannot lock hypercall buffers (%s); Xen may return EFAULT", e.strerror)
                memory = mmap.mmap(-1, self._size, flags)
            memory.madvise(mmap.MADV_DONTFORK)
            memory[:] = bytes(self._size)  # touch every page, as libxencall does
        arena = Arena(memory, self.slot_room)
        self._all.append(arena)
        return arena

    def acquire(self) -> Arena:
        # list.pop/append are atomic under the GIL: no lock on the per-call path
        try:
            return self._free.pop()
        except IndexError:
            with self._lock:
                return self._new_arena()

    def release(self, arena: Arena) -> None:
        self._free.append(arena)

    def close(self) -> None:
        with self._lock:
            for arena in self._all:
                arena.close()
            self._all.clear()
            self._free.clear()
            if self._device is not None:
                self._device.close()
                self._device = None
