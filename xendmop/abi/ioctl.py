"""Linux ioctl request encoding, as in ``include/uapi/asm-generic/ioctl.h``.

x86_64 uses the generic layout: 8 bits number, 8 bits type, 14 bits size, 2 bits
direction.  The request numbers of privcmd and evtchn are computed from these
helpers, never typed in.
"""

from __future__ import annotations

import ctypes

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2

_nr_shift = 0
_type_shift = 8
_size_shift = 16
_dir_shift = 30
_size_max = (1 << 14) - 1


def _IOC(direction: int, kind: str | int, nr: int, size: int) -> int:
    """Encode an ioctl request: ``_IOC(dir, type, nr, size)``."""
    code = ord(kind) if isinstance(kind, str) else kind
    if not 0 <= size <= _size_max:
        raise ValueError(f"ioctl size {size} does not fit in 14 bits")
    return (direction << _dir_shift) | (code << _type_shift) | (nr << _nr_shift) | (size << _size_shift)


def _IOW(kind: str | int, nr: int, ctype: type[ctypes._CData]) -> int:
    """``_IOW(type, nr, T)``: user space writes a T to the kernel."""
    return _IOC(_IOC_WRITE, kind, nr, ctypes.sizeof(ctype))


def _IOC_SIZE(request: int) -> int:
    """The argument size a request encodes (``_IOC_SIZE`` of ``ioctl.h``)."""
    return (request >> _size_shift) & _size_max
