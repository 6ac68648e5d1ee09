"""Argument checks shared by the handles (event channels, foreign memory) of every backend.

Each raises before any syscall or library call: ``TypeError`` for a non-int (``bool``
included: ``True`` is no domid), ``ArgumentError`` naming the operation, the argument
and the value when it is out of range.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from .abi.xen import DOMID_FIRST_RESERVED
from .errors import ArgumentError

#: evtchn_port_t is a uint32; port 0 is never a bound port (Xen's ECS_FREE sentinel)
PORT_MAX = 0xFFFFFFFF
#: ports one ``pending_ports`` read may return: Linux's ``evtchn_read`` (drivers/xen/evtchn.c)
#: copies at most PAGE_SIZE bytes of its ring per read, 1024 four-byte ports
MAX_PENDING_PORTS = 4096 // 4


def check_int(op: str, name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ArgumentError(op, name, value, f"must be {lo}..{hi:#x}")
    return value


def check_port(op: str, port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"{op}: port must be an int, not {type(port).__name__}")
    if not 0 < port <= PORT_MAX:
        raise ArgumentError(op, "port", port, "must be a port number (1..2**32-1)")
    return port


def check_domid(op: str, domid: object, *, guest_only: bool = False) -> int:
    """A ``domid_t`` (uint16), the one domid check of every handle and of ``DeviceModel``;
    ``guest_only``: no DOMID_SELF/IO/XEN… (what restriction can name)."""
    if isinstance(domid, bool) or not isinstance(domid, int):
        raise TypeError(f"{op}: domid must be an int, not {type(domid).__name__}")
    if guest_only:
        if not 0 <= domid < DOMID_FIRST_RESERVED:
            raise ArgumentError(op, "domid", domid, f"must be 0..{DOMID_FIRST_RESERVED - 1:#x}")
    elif not 0 <= domid <= 0xFFFF:
        raise ArgumentError(op, "domid", domid, "does not fit domid_t (uint16)")
    return domid


def check_int_or_enum(op: str, name: str, value: object, kind: type[enum.Enum] | None = None) -> int:
    """``value`` as a plain int for an argument a C integer or enum field takes: an ``int``, or
    a member of the op's enum ``kind``; never a float, str, bytes, ``Decimal`` or ``Fraction``
    (which ``int()`` would coerce silently: ``1.5`` is 1, ``b'2'`` is 2), a ``bool`` (``True``
    would be the enum's value 1) nor another enum's member.  The range is the op's to check."""
    cls = value.__class__
    if cls is int:
        return value  # type: ignore[return-value]
    if kind is not None and isinstance(value, kind) and isinstance(value, int):
        return int(value)
    if isinstance(value, int) and not isinstance(value, (bool, enum.Enum)):
        return int(value)  # an int subclass of the caller's own
    want = f"an int or a {kind.__name__}" if kind is not None else "an int"
    raise TypeError(f"{op}: {name} must be {want}, not {cls.__name__}")


#: (part, largest value) of ``XEN_DMOP_PCI_SBDF`` in its argument order
#: (``xen/include/public/hvm/dm_op.h``: segment 16 bits, bus 8, device 5, function 3)
_SBDF_PARTS = (("segment", 0xFFFF), ("bus", 0xFF), ("device", 0x1F), ("function", 7))


def check_sbdf(
    op: str, segment: object, bus: object, device: object, function: object, names: Sequence[str] = ()
) -> int:
    """``XEN_DMOP_PCI_SBDF(segment, bus, device, function)``, refusing what the macro would mask
    into another function (device 32 is 01:00.0, function 8 is 00:01.0, bus 256 is segment 1).
    ``names``: the arguments as the caller spells them, in the same order (default: the macro's).
    The one check behind ``DeviceModel``'s pcidev calls and ``IoreqServer.add_pci``."""
    parts = []
    for (part, top), name, value in zip(
        _SBDF_PARTS, names or [p for p, _ in _SBDF_PARTS], (segment, bus, device, function)
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{op}: {name} must be an int, not {type(value).__name__}")
        if not 0 <= value <= top:
            raise ArgumentError(op, name, value, f"must be 0..{top:#x} (the {part} of a PCI SBDF)")
        parts.append(int(value))
    s, b, d, f = parts
    return (s << 16) | (b << 8) | (d << 3) | f
