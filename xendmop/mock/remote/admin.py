"""The mock host's admin requests (``CALL``): one function per request, run on the host for a
client's ``RemoteXen.call(op, **args)``, and the table ``_CALLS`` naming them and saying which
change state (root or the host's uid only).  Guest requests run ``SimGuest`` in the host.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .wire import (
    _CHUNK,
)

if TYPE_CHECKING:
    from .server import _Connection


class _GuestRaised(Exception):
    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(reply.get("message"))
        self.reply = reply


def _int(name: str, value: Any, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise TypeError(f"{name}={value!r}: want an integer in {lo}..{hi}")
    return value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: want true or false")
    return value


def _ping(conn: _Connection) -> dict[str, Any]:
    return {"pid": os.getpid(), "clients": len(conn.server.clients())}


def _create_domain(
    conn: _Connection,
    vcpus: int = 1,
    hvm: bool = True,
    memory_mb: int = 64,
    hap: bool = True,
    log_dirty: bool = False,
    domid: int | None = None,
) -> int:
    xen = conn.server.xen
    return int(
        xen.create_domain(
            _int("vcpus", vcpus, 1, 128),
            _bool("hvm", hvm),
            _int("memory_mb", memory_mb, 1, 1024),
            hap=_bool("hap", hap),
            log_dirty=_bool("log_dirty", log_dirty),
            domid=None if domid is None else _int("domid", domid, 1, 0x7FEF),
        )
    )


def _destroy_domain(conn: _Connection, domid: int) -> None:
    conn.server.xen.destroy_domain(_int("domid", domid, 1, 0x7FEF))


def _domains(conn: _Connection) -> list[int]:
    with conn.server.xen.lock:
        return sorted(conn.server.xen.hypervisor.domains)


def _servers(conn: _Connection, domid: int) -> dict[str, Any]:
    """Registered ioreq servers by id (Xen's view, whatever their device model became)."""
    snap = conn.server.xen.domain(_int("domid", domid, 0, 0x7FEF)).snapshot()
    return {str(s["id"]): s for s in snap["servers"] if s is not None}


def _snapshot(conn: _Connection, domid: int) -> dict[str, Any]:
    """The domain's state without its p2m (one entry per page: too big to ship)."""
    snap = conn.server.xen.domain(_int("domid", domid, 0, 0x7FEF)).snapshot()
    snap.pop("p2m", None)
    return dict(snap)


def _gsi_level(conn: _Connection, domid: int, gsi: int) -> bool:
    return bool(conn.server.xen.domain(_int("domid", domid, 0, 0x7FEF)).gsi_level(_int("gsi", gsi, 0, 47)))


def _events(conn: _Connection, last: int = 100) -> list[dict[str, Any]]:
    n = _int("last", last, 0, 1000)
    with conn.server.xen.lock:
        events = list(conn.server.xen.events)[-n:] if n else []
    return [dataclasses.asdict(e) for e in events]


def _clients(conn: _Connection) -> list[dict[str, Any]]:
    # dict() copies another connection's table in one step (its thread may be changing it)
    return [
        {"pid": c.info.pid, "uid": c.info.uid, "gid": c.info.gid, "devices": dict(c.info.devices)}
        for c in conn.server.clients()
    ]


#: guest methods: name -> (integer positional arguments, keyword arguments allowed)
_GUEST_METHODS: dict[str, tuple[int, tuple[str, ...]]] = {
    "outb": (2, ("vcpu",)),
    "outw": (2, ("vcpu",)),
    "outl": (2, ("vcpu",)),
    "inb": (1, ("vcpu",)),
    "inw": (1, ("vcpu",)),
    "inl": (1, ("vcpu",)),
    "mmio_read": (2, ("vcpu",)),
    "mmio_write": (3, ("vcpu",)),
    "pci_config_read": (3, ("vcpu",)),
    "pci_config_write": (4, ("vcpu",)),
    "rep_outsb": (3, ("df", "vcpu")),
    "rep_insb": (3, ("df", "vcpu")),
    "rep_movs_to_mmio": (4, ("df", "vcpu")),
    "send_buffered": (4, ()),
    "read_ram": (2, ()),
    "write_ram": (1, ()),  # plus "data": hex
}


def _guest_call(
    conn: _Connection,
    domid: int,
    method: str,
    args: list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    timeout: float = 5.0,
    data: str | None = None,
) -> Any:
    """Run one ``SimGuest`` method in this thread (the guest's vCPU); its exceptions travel back typed."""
    from ..simguest import GuestCrash, GuestTimeout

    shape = _GUEST_METHODS.get(method) if isinstance(method, str) else None
    if shape is None:
        raise TypeError(f"method={method!r}: not a guest method")
    nargs, allowed = shape
    args, kwargs = list(args or []), dict(kwargs or {})
    if len(args) != nargs:
        raise TypeError(f"{method}: want {nargs} arguments, got {len(args)}")
    ints = [_int(f"{method} argument {i}", a) for i, a in enumerate(args)]
    kw: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key not in allowed:
            raise TypeError(f"{method}: unexpected keyword {key!r}")
        kw[key] = _bool(key, value) if key == "df" else _int(key, value, 0, 127)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 60:
        raise TypeError(f"timeout={timeout!r}: want seconds in (0, 60]")
    guest = conn._guest(_int("domid", domid, 1, 0x7FEF), float(timeout))
    vcpus = int(conn.server.xen.domain(guest.domid).max_vcpus)
    if kw.get("vcpu", 0) >= vcpus:  # a vCPU the domain does not have (d->vcpu[] has max_vcpus entries)
        raise TypeError(f"vcpu={kw['vcpu']}: dom{guest.domid} has {vcpus} vCPUs")
    if method == "write_ram":
        if not isinstance(data, str) or len(data) > 2 * _CHUNK:
            raise TypeError(f"write_ram: data must be a hex string of at most {_CHUNK} bytes")
        payload = bytes.fromhex(data)
        _raising(lambda: guest.write_ram(ints[0], payload))
        return None
    if method == "read_ram" and ints[1] > _CHUNK:
        raise TypeError(f"read_ram: at most {_CHUNK} bytes, not {ints[1]}")
    try:
        result = _raising(lambda: getattr(guest, method)(*ints, **kw))
    except GuestTimeout as e:
        raise _GuestRaised(
            {
                "raise": "GuestTimeout",
                "message": str(e),
                "domid": guest.domid,
                "vcpu": e.vcpu,
                "req": list(dataclasses.astuple(e.req)),
                "timeout": timeout,
                "state": _slot_state(str(e)),
            }
        ) from None
    except GuestCrash as e:
        raise _GuestRaised({"raise": "GuestCrash", "message": str(e)}) from None
    return result.hex() if isinstance(result, bytes) else result


def _slot_state(message: str) -> int:
    """The slot state a ``GuestTimeout`` message names (it keeps no attribute for it)."""
    found = re.search(r"slot state (\d+)\)$", message)
    return int(found.group(1)) if found else -1


def _raising(fn: Callable[[], Any]) -> Any:
    """A guest's ValueError/LookupError (bad gpa, vanished domain) travel back by name."""
    try:
        return fn()
    except (ValueError, LookupError) as e:
        name = "ValueError" if isinstance(e, ValueError) else "LookupError"
        raise _GuestRaised({"raise": name, "message": str(e)}) from None


#: request name -> (function, changes state: needs root or the host's uid)
_CALLS: dict[str, tuple[Callable[..., Any], bool]] = {
    "ping": (_ping, False),
    "domains": (_domains, False),
    "servers": (_servers, False),
    "snapshot": (_snapshot, False),
    "gsi_level": (_gsi_level, False),
    "events": (_events, False),
    "clients": (_clients, False),
    "create_domain": (_create_domain, True),
    "destroy_domain": (_destroy_domain, True),
    "guest": (_guest_call, True),
}
