"""Raw privcmd calls built by hand in ctypes, bypassing DeviceModel's argument checks."""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Sequence
from typing import Any

from xendmop.abi.dm_op import xen_dm_op
from xendmop.abi.privcmd import (
    IOCTL_PRIVCMD_DM_OP,
    IOCTL_PRIVCMD_HYPERCALL,
    privcmd_dm_op,
    privcmd_dm_op_buf,
    privcmd_hypercall,
)
from xendmop.mock import MockXen
from xendmop.ops import BY_NAME

#: an address no process has mapped (kernel half on x86_64)
BAD = 0xFFFF_8000_0000_0000
#: a user address that is almost certainly unmapped
UNMAPPED = 0x10


def errno_of(fn: Any, *args: Any) -> int:
    """0 if the call succeeds, else its errno (only OSError may escape)."""
    try:
        fn(*args)
    except OSError as e:
        return e.errno or -1
    return 0


class Raw:
    """One privcmd fd and the buffers of the last call (kept alive for inspection)."""

    def __init__(self, host: MockXen) -> None:
        self.host = host
        self.dev = host.open_device("/dev/xen/privcmd")
        self.op = xen_dm_op()
        self.extra: list[Any] = []

    def build(self, op: int | str, **fields: int) -> xen_dm_op:
        """A zeroed 32-byte xen_dm_op with ``fields`` set in the op's union member."""
        self.op = xen_dm_op()
        decl = BY_NAME[op] if isinstance(op, str) else None
        self.op.op = decl.number if decl else int(op)
        if decl is not None:
            member = getattr(self.op.u, decl.name)
            for name, value in fields.items():
                setattr(member, name, value)
        return self.op

    def bufs(self, size0: int = 32, extra: Sequence[bytes | int] = ()) -> list[tuple[int, int]]:
        """``bufs[0]`` (the op, ``size0`` bytes) plus extra buffers (bytes, or a zeroed size)."""
        contents = [bytes(e) for e in extra]  # an int gives that many zero bytes
        self.extra = [ctypes.create_string_buffer(c, max(1, len(c))) for c in contents]
        out = [(ctypes.addressof(self.op), size0)]
        for e, raw in zip(extra, self.extra):
            out.append((ctypes.addressof(raw), e if isinstance(e, int) else len(e)))
        return out

    def ioctl_dm_op(self, domid: int, bufs: Sequence[tuple[int, int]], num: int | None = None) -> int:
        array = (privcmd_dm_op_buf * max(1, len(bufs)))()
        for entry, (addr, size) in zip(array, bufs):
            entry.uptr, entry.size = addr, size
        self._array = array
        req = privcmd_dm_op(dom=domid, num=len(bufs) if num is None else num, ubufs=ctypes.addressof(array))
        return errno_of(self.dev.ioctl, IOCTL_PRIVCMD_DM_OP, req)

    def call(
        self,
        domid: int,
        op: int | str,
        size0: int = 32,
        extra: Sequence[bytes | int] = (),
        num: int | None = None,
        **fields: int,
    ) -> int:
        self.build(op, **fields)
        return self.ioctl_dm_op(domid, self.bufs(size0, extra), num)

    def hypercall(self, domid: int, nr_bufs: int, bufs_addr: int, op: int = 41) -> int:
        call = privcmd_hypercall(op=op)
        call.arg[0], call.arg[1], call.arg[2] = domid, nr_bufs, bufs_addr
        return errno_of(self.dev.ioctl, IOCTL_PRIVCMD_HYPERCALL, call)

    def hypercall_op(self, domid: int, op: int | str, nr_bufs: int = 1, **fields: int) -> int:
        self.build(op, **fields)
        self._xbufs = (ctypes.c_uint64 * 4)(ctypes.addressof(self.op), 32, 0, 0)
        return self.hypercall(domid, nr_bufs, ctypes.addressof(self._xbufs))

    def member(self, name: str) -> Any:
        return getattr(self.op.u, name)


def snapshot(host: MockXen) -> dict[int, Any]:
    with host.lock:
        return {domid: d.snapshot() for domid, d in host.hypervisor.domains.items()}


__all__ = ["BAD", "UNMAPPED", "Raw", "errno", "errno_of", "snapshot"]
