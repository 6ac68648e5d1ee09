"""Argument checks shared by the handles (event channels, foreign memory) of every backend.

Each raises before any syscall or library call: ``TypeError`` for a non-int (``bool``
included: ``True`` is no domid), ``ArgumentError`` naming the operation, the argument
and the value when it is out of range.
"""

from __future__ import annotations

from .abi.xen import DOMID_FIRST_RESERVED
from .errors import ArgumentError

#: evtchn_port_t is a uint32; port 0 is never a bound port (Xen's ECS_FREE sentinel)
PORT_MAX = 0xFFFFFFFF


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
    """A domid_t; ``guest_only``: no DOMID_SELF/IO/XEN… (what restriction can name)."""
    return check_int(op, "domid", domid, 0, DOMID_FIRST_RESERVED - 1 if guest_only else 0xFFFF)
