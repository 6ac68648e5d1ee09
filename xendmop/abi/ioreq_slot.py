"""One ``struct ioreq`` slot as bytes: the layout every reader and writer of the shared page uses.

``ioreq.py`` mirrors the C struct (ctypes, checked against the real header); this module is
the same layout for code that reads a slot in one ``Struct.unpack_from`` (the dispatch core)
or fills one (the mock's simulated guest), and the private decoded copy ``Ioreq``.  The
offsets here are asserted against the mirror at import, so the two cannot drift.  Not in
``abi.MODULES``: none of these names is a C name.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from struct import Struct

from .ioreq import IOREQ_READ, ioreq

__all__ = ["IOREQ_SIZE", "IOREQ_SLOT", "STATE_BYTE", "TYPE_BYTE", "Ioreq", "all_ones"]

IOREQ_SIZE = 32
#: byte of ``struct ioreq`` holding ``state:4, data_is_ptr:1, dir:1, df:1``
STATE_BYTE = 30
TYPE_BYTE = 31
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1
#: struct ioreq in one unpack: addr, data, count, size, vp_eport, (2 pad bytes), flags, type
IOREQ_SLOT = Struct("<QQIII2xBB")
assert IOREQ_SLOT.size == IOREQ_SIZE == ctypes.sizeof(ioreq)
assert ioreq.type.offset == TYPE_BYTE and ioreq._pad0.offset + ioreq._pad0.size == STATE_BYTE
_new_object = object.__new__


def all_ones(size: int) -> int:
    """What a read from nothing returns (x86 floating bus): ``size`` bytes of 0xff."""
    return (1 << (8 * size)) - 1 if 1 <= size <= 8 else _U64


@dataclass(frozen=True)
class Ioreq:
    """A private copy of one ``struct ioreq`` (decoded from its 32 bytes)."""

    addr: int
    data: int
    count: int
    size: int
    vp_eport: int
    state: int
    data_is_ptr: bool
    dir: int
    df: bool
    type: int

    @classmethod
    def from_bytes(cls, raw: bytes | memoryview, offset: int = 0) -> Ioreq:
        """Decode the 32 bytes at ``offset``, each read exactly once (one ``unpack_from``),
        so a guest rewriting the shared slot meanwhile cannot make two reads disagree."""
        return cls.from_fields(*IOREQ_SLOT.unpack_from(raw, offset))

    @classmethod
    def from_fields(cls, addr: int, data: int, count: int, size: int, vp_eport: int, flags: int, type_: int) -> Ioreq:
        """The copy from fields already read out of the slot (``flags`` is byte 30 whole)."""
        # The fields straight into the new instance's __dict__: what the generated frozen
        # __init__ does one object.__setattr__ at a time, at twice the cost (no __post_init__
        # or slots here to skip).
        req = _new_object(cls)
        req.__dict__.update(
            addr=addr,
            data=data,
            count=count,
            size=size,
            vp_eport=vp_eport,
            state=flags & 0xF,
            data_is_ptr=bool(flags & 0x10),
            dir=(flags >> 5) & 1,
            df=bool(flags & 0x40),
            type=type_,
        )
        return req

    def to_bytes(self) -> bytes:
        """The 32 bytes of this ioreq (for tests and the simulated guest)."""
        flags = (self.state & 0xF) | (self.data_is_ptr << 4) | ((self.dir & 1) << 5) | (self.df << 6)
        return b"".join(
            (
                (self.addr & _U64).to_bytes(8, "little"),
                (self.data & _U64).to_bytes(8, "little"),
                (self.count & _U32).to_bytes(4, "little"),
                (self.size & _U32).to_bytes(4, "little"),
                (self.vp_eport & _U32).to_bytes(4, "little"),
                b"\0\0",
                bytes((flags, self.type & 0xFF)),
            )
        )

    def __str__(self) -> str:
        kind = {0: "pio", 1: "copy", 2: "pci", 7: "timeoffset", 8: "invalidate"}.get(self.type, f"type{self.type}")
        d = "read" if self.dir == IOREQ_READ else "write"
        ptr = " ptr" if self.data_is_ptr else ""
        df = " df" if self.df else ""
        return (
            f"{kind} {d}{ptr}{df} addr={self.addr:#x} data={self.data:#x} size={self.size} "
            f"count={self.count} state={self.state}"
        )
