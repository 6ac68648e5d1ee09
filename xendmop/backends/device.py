"""The device interface every backend stands on: open / ioctl / mmap / close.

A device is what ``open("/dev/xen/…")`` gives: the real one wraps a file
descriptor and calls ``fcntl.ioctl``/``mmap``; the mock host's devices
(``xendmop.mock``) have the same methods and decode the same bytes.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from collections.abc import Callable
from typing import Any, Protocol

from ..abi.evtchn import EVTCHN_PATH as EVTCHN_PATH
from ..abi.privcmd import HYPERCALL_PATH as HYPERCALL_PATH
from ..abi.privcmd import PRIVCMD_PATH as PRIVCMD_PATH
from ..errors import ClosedHandleError, NotXenHostError

PAGE_SIZE = mmap.PAGESIZE


#: errno of ``open()`` that means "this kernel is not running under Xen"
NOT_XEN = {errno.ENOENT, errno.ENXIO, errno.ENODEV}


class FrameViews:
    """What every mapping of foreign frames answers, over its ``view`` and ``errors``."""

    nr_frames: int
    errors: tuple[int, ...]
    view: memoryview

    @property
    def ok(self) -> bool:
        return not any(self.errors)

    def page(self, index: int) -> memoryview:
        if not 0 <= index < self.nr_frames:
            raise IndexError(f"frame {index} of {self.nr_frames}")
        return self.view[index * PAGE_SIZE : (index + 1) * PAGE_SIZE]


class Device(Protocol):
    """One open Xen device file."""

    path: str

    def fileno(self) -> int: ...

    def ioctl(self, request: int, arg: Any) -> int:
        """``ioctl(fd, request, arg)``; ``arg`` is a mutable ctypes object, as for ``fcntl.ioctl``."""
        ...

    def mmap(self, length: int, offset: int = 0) -> mmap.mmap:
        """``mmap(NULL, length, PROT_READ|PROT_WRITE, MAP_SHARED, fd, offset)``."""
        ...

    def close(self) -> None: ...


Opener = Callable[[str], Device]


class OsDevice:
    """A real device file: an owned fd, ``fcntl.ioctl`` and ``mmap``."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd

    def fileno(self) -> int:
        if self._fd < 0:
            raise ClosedHandleError(f"{self.path} is closed")
        return self._fd

    def ioctl(self, request: int, arg: Any) -> int:
        return int(fcntl.ioctl(self.fileno(), request, arg, True))

    def mmap(self, length: int, offset: int = 0) -> mmap.mmap:
        return mmap.mmap(self.fileno(), length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __repr__(self) -> str:
        return f"OsDevice({self.path!r}, fd={self._fd})"


def xen_host_signs(root: str = "/") -> list[str]:
    """What shows this machine is a Xen host (a dom0, or a guest of Xen), even when nothing of
    Xen can be opened by this user: the privcmd device node, ``/proc/xen`` (the xenfs mount
    point Linux creates when it runs on Xen) and ``/sys/hypervisor/type`` reading ``xen``.
    Empty off Xen.  ``root``: where ``/`` is (tests)."""
    signs = []
    if os.path.exists(os.path.join(root, PRIVCMD_PATH.lstrip("/"))):
        signs.append(f"{PRIVCMD_PATH} exists")
    if os.path.exists(os.path.join(root, "proc/xen")):
        signs.append("/proc/xen exists")
    try:
        with open(os.path.join(root, "sys/hypervisor/type")) as f:
            kind = f.read().strip()
    except OSError:
        kind = ""
    if kind == "xen":
        signs.append("/sys/hypervisor/type is xen")
    return signs


def open_device(path: str) -> Device:
    """Open a Xen device read-write, close-on-exec, as libxencall and libxendevicemodel do."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in NOT_XEN:
            raise NotXenHostError(e.errno, f"{path}: not a Xen host ({os.strerror(e.errno)})", path) from None
        raise
    return OsDevice(path, fd)
