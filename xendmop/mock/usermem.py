"""The mock kernel's copy_from_user / copy_to_user, and its page remapping.

User memory is read and written with ``process_vm_readv``/``process_vm_writev`` on
our own pid: a bad address comes back as a short transfer or ``EFAULT`` instead of a
segfault, exactly the property ``copy_{from,to}_user`` gives the real kernel, so
fuzzed garbage pointers cannot crash the interpreter.

``remap`` is the mock's ``remap_pfn_range``: it replaces pages of an existing
mapping (a privcmd VMA) with pages of a memfd using ``mmap(MAP_FIXED)``, so the
Python ``mmap`` object the caller holds and the mock's own view of the page are
the same physical memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import platform
from collections.abc import Sequence

PAGE_SIZE = mmap.PAGESIZE
#: ``TASK_SIZE_MAX`` of the kernel the mock stands for, the host's: ``access_ok`` refuses anything
#: above it.  x86_64 (4-level paging): ``(1 << 47) - PAGE_SIZE`` (arch/x86/include/asm/page_64_types.h);
#: arm64: ``1 << VA_BITS`` (arch/arm64/include/asm/processor.h), 48 in Debian's arm64 kernels, whose
#: processes are mapped near the top (a Python heap at 0xffff_b6xx_xxxx, seen in the Arm lab).
TASK_SIZE = (1 << 48) if platform.machine() == "aarch64" else (1 << 47) - PAGE_SIZE

_CHUNK = 1 << 16
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_process_vm_readv = _libc.process_vm_readv
_process_vm_writev = _libc.process_vm_writev
for _fn in (_process_vm_readv, _process_vm_writev):
    _fn.restype = ctypes.c_ssize_t
    _fn.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(_iovec),
        ctypes.c_ulong,
        ctypes.POINTER(_iovec),
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]

_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10


def _fault(why: str) -> OSError:
    return OSError(errno.EFAULT, f"{os.strerror(errno.EFAULT)}: {why}")


def access_ok(addr: int, size: int) -> bool:
    """Linux ``access_ok``: the range lies in the user half of the address space."""
    return 0 <= addr and 0 <= size and addr + size <= TASK_SIZE


class UserMemory:
    """This process's memory, reached the way a kernel reaches a caller's."""

    def __init__(self) -> None:
        self._pid = os.getpid()

    def _transfer(self, fn: object, addr: int, local: ctypes.Array[ctypes.c_char], nbytes: int) -> None:
        if nbytes == 0:
            return
        if not access_ok(addr, nbytes):
            raise _fault(f"{addr:#x}+{nbytes} outside user space")
        liov = _iovec(ctypes.addressof(local), nbytes)
        riov = _iovec(addr, nbytes)
        ctypes.set_errno(0)
        done = fn(self._pid, ctypes.byref(liov), 1, ctypes.byref(riov), 1, 0)  # type: ignore[operator]
        if done != nbytes:
            raise _fault(f"{addr:#x}+{nbytes}: {done} bytes transferred")

    def read(self, addr: int, nbytes: int) -> bytes:
        """copy_from_user: ``nbytes`` at ``addr`` or ``OSError(EFAULT)``.

        Chunked, so an absurd length over garbage faults at its first chunk
        instead of allocating the whole length first.
        """
        if not access_ok(addr, nbytes):
            raise _fault(f"{addr:#x}+{nbytes} outside user space")
        parts = []
        for off in range(0, nbytes, _CHUNK):
            n = min(_CHUNK, nbytes - off)
            local = ctypes.create_string_buffer(n)
            self._transfer(_process_vm_readv, addr + off, local, n)
            parts.append(local.raw[:n])
        return b"".join(parts)

    def clear(self, addr: int, nbytes: int) -> None:
        """clear_user, chunked like ``read``."""
        if not access_ok(addr, nbytes):
            raise _fault(f"{addr:#x}+{nbytes} outside user space")
        for off in range(0, nbytes, _CHUNK):
            self.write(addr + off, bytes(min(_CHUNK, nbytes - off)))

    def write(self, addr: int, data: bytes) -> None:
        """copy_to_user: ``data`` at ``addr`` or ``OSError(EFAULT)``."""
        local = ctypes.create_string_buffer(bytes(data), len(data))
        self._transfer(_process_vm_writev, addr, local, len(data))

    def check_writable(self, addr: int, nbytes: int) -> None:
        """``pin_user_pages_fast(FOLL_WRITE)``: every page must be present and writable.

        Reading the bytes and writing them back is a probe no other thread can
        observe: the values stored are the ones already there.
        """
        self.write(addr, self.read(addr, nbytes))

    def remap_pages(self, pages: Sequence[tuple[int, int, int]]) -> None:
        """``remap_pfn_range`` of each ``(addr, fd, offset)``: one page of ``fd`` over ``addr``."""
        for addr, fd, offset in pages:
            remap(addr, PAGE_SIZE, fd, offset)


def remap(addr: int, length: int, fd: int, offset: int) -> None:
    """Replace ``[addr, addr+length)`` of this process by ``fd``'s pages at ``offset`` (MAP_SHARED)."""
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    got = _mmap(addr, length, prot, mmap.MAP_SHARED | _MAP_FIXED, fd, offset)
    if got == _MAP_FAILED or got != addr:
        err = ctypes.get_errno() or errno.ENOMEM
        raise OSError(err, os.strerror(err))
