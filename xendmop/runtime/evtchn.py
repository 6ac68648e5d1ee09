"""``EventChannel``: one open of ``/dev/xen/evtchn`` (libxenevtchn's ``xenevtchn_handle``).

Linux ``drivers/xen/evtchn.c``: the BIND ioctls return the local port; ``read()``
returns pending ports as ``uint32_t``\\ s, each masked until it is written back
(``write()`` = unmask); ``poll()`` says POLLIN while ports are pending, so
``fileno()`` goes into selectors and asyncio.  Errors are ``XenError`` with layer
``"evtchn"``, the ioctl's name and the remote domain where there is one.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from struct import Struct
from typing import Any, Protocol

from ..abi.evtchn import (
    IOCTL_EVTCHN_BIND_INTERDOMAIN,
    IOCTL_EVTCHN_BIND_UNBOUND_PORT,
    IOCTL_EVTCHN_NOTIFY,
    IOCTL_EVTCHN_RESET,
    IOCTL_EVTCHN_RESTRICT_DOMID,
    IOCTL_EVTCHN_UNBIND,
    ioctl_evtchn_bind_interdomain,
    ioctl_evtchn_bind_unbound_port,
    ioctl_evtchn_notify,
    ioctl_evtchn_restrict_domid,
    ioctl_evtchn_unbind,
)
from ..backends.device import EVTCHN_PATH, NOT_XEN, OsDevice
from ..checks import MAX_PENDING_PORTS, check_domid, check_int, check_port
from ..errors import ArgumentError, ClosedHandleError, NotXenHostError, XenError, xen_error
from ..handle import OwnedHandle

__all__ = ["EVTCHN_PATH", "EventChannel", "EvtchnDevice", "EvtchnDeviceFile", "open_evtchn_device"]


class EvtchnDevice(Protocol):
    """What ``EventChannel`` needs of the device: the ``Device`` interface plus read/write."""

    path: str

    def fileno(self) -> int: ...

    def ioctl(self, request: int, arg: Any) -> int: ...

    def read(self, nbytes: int) -> bytes: ...

    def write(self, data: bytes) -> int: ...

    def close(self) -> None: ...


class EvtchnDeviceFile(OsDevice):
    """The real ``/dev/xen/evtchn``: ``OsDevice`` plus ``os.read``/``os.write`` on its fd.

    Opened ``O_NONBLOCK`` so ``read`` answers ``EAGAIN`` instead of blocking when no
    port is pending (the loop polls the fd first, as QEMU does).
    """

    # The fd straight from the attribute: read, write and ioctl run once per guest access
    # each, and fileno()'s closed check is one more Python call (a closed device's fd is
    # -1, so the syscall fails with EBADF; EventChannel refuses a closed handle first).

    def read(self, nbytes: int) -> bytes:
        return os.read(self._fd, nbytes)

    def write(self, data: bytes) -> int:
        return os.write(self._fd, data)

    def ioctl(self, request: int, arg: Any) -> int:
        return int(fcntl.ioctl(self._fd, request, arg, True))  # NOTIFY: once per access


def open_evtchn_device(path: str = EVTCHN_PATH) -> EvtchnDevice:
    """Open the real evtchn device read-write, close-on-exec, non-blocking."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        if e.errno in NOT_XEN:
            raise NotXenHostError(e.errno, f"{path}: not a Xen host ({os.strerror(e.errno)})", path) from None
        raise
    return EvtchnDeviceFile(path, fd)


def _set_nonblocking(device: EvtchnDevice) -> None:
    if hasattr(device, "nonblocking"):  # the mock's device models the O_NONBLOCK file flag
        device.nonblocking = True
        return
    fd = device.fileno()
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)


#: one evtchn port as the device reads and writes it (``evtchn_port_t``, host order on x86)
_PORT = Struct("<I")
_CACHED_PORTS = 1024  # bounds the per-port caches (a DM binds one port per vCPU, plus one)


class EventChannel(OwnedHandle[EvtchnDevice]):
    """An open ``/dev/xen/evtchn``; owns its fd; a context manager.

    ``opener(path)`` gives the device (``open_evtchn_device`` for the real one, the
    mock host's ``open_device``); the fd is switched to non-blocking so ``pending``
    never blocks.  Every call raises ``ClosedHandleError`` after ``close``.
    """

    def __init__(self, opener: Callable[[str], Any] = open_evtchn_device, path: str = EVTCHN_PATH) -> None:
        super().__init__(opener(path))
        self.restricted_to: int | None = None
        # per port, made once: the NOTIFY argument (the kernel only reads it) and the
        # 4 bytes that unmask it; the per-access path builds neither
        self._notify_args: dict[int, ioctl_evtchn_notify] = {}
        self._port_bytes: dict[int, bytes] = {}
        try:
            _set_nonblocking(self.device)
        except BaseException:
            self.close()
            raise

    # --- plumbing ----------------------------------------------------------------------

    @property
    def device(self) -> EvtchnDevice:
        return self._use()

    def _ioctl(self, name: str, request: int, arg: Any, domid: int | None = None, **shown: int) -> int:
        try:
            return self.device.ioctl(request, arg)
        except OSError as e:
            if isinstance(e, XenError) or e.errno is None:
                raise
            raise xen_error(e.errno, name, domid, shown, layer="evtchn") from None

    def fileno(self) -> int:
        """The fd to poll: readable while a bound port is pending."""
        return self.device.fileno()

    # close (the kernel unbinds every port this handle bound), closed, with: OwnedHandle's

    def __repr__(self) -> str:
        return f"<EventChannel {'closed' if self._resource is None else f'fd={self._resource.fileno()}'}>"

    # --- ioctls -------------------------------------------------------------------------

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        """IOCTL_EVTCHN_BIND_INTERDOMAIN: connect to ``domid``'s unbound ``remote_port``;
        returns the local port.  EACCES on a handle restricted to another domain."""
        check_domid("bind_interdomain", domid)
        check_port("bind_interdomain", remote_port)
        arg = ioctl_evtchn_bind_interdomain(remote_domain=domid, remote_port=remote_port)
        return self._ioctl("bind_interdomain", IOCTL_EVTCHN_BIND_INTERDOMAIN, arg, domid, remote_port=remote_port)

    def bind_unbound_port(self, domid: int) -> int:
        """IOCTL_EVTCHN_BIND_UNBOUND_PORT: a new local port ``domid`` may bind; returns it.
        EACCES on a restricted handle."""
        check_domid("bind_unbound_port", domid)
        arg = ioctl_evtchn_bind_unbound_port(remote_domain=domid)
        return self._ioctl("bind_unbound_port", IOCTL_EVTCHN_BIND_UNBOUND_PORT, arg, domid)

    def unbind(self, port: int) -> None:
        """IOCTL_EVTCHN_UNBIND: ENOTCONN for a port this handle did not bind."""
        check_port("unbind", port)
        self._ioctl("unbind", IOCTL_EVTCHN_UNBIND, ioctl_evtchn_unbind(port=port), port=port)

    def notify(self, port: int) -> None:
        """IOCTL_EVTCHN_NOTIFY: raise the remote end of local ``port`` (ENOTCONN if not ours)."""
        arg = self._notify_args.get(port) if port.__class__ is int else None
        if arg is None:
            arg = ioctl_evtchn_notify(port=check_port("notify", port))
            if len(self._notify_args) < _CACHED_PORTS:
                self._notify_args[port] = arg
        dev = self._resource
        if dev is None:
            raise ClosedHandleError("EventChannel is closed", "notify")
        try:
            dev.ioctl(IOCTL_EVTCHN_NOTIFY, arg)
        except OSError as e:
            if isinstance(e, XenError) or e.errno is None:
                raise
            raise xen_error(e.errno, "notify", None, {"port": port}, layer="evtchn") from None

    def reset(self) -> None:
        """IOCTL_EVTCHN_RESET: empty the pending ring (after an EFBIG overflow)."""
        self._ioctl("reset", IOCTL_EVTCHN_RESET, 0)

    def restrict(self, domid: int) -> None:
        """IOCTL_EVTCHN_RESTRICT_DOMID: from now on only interdomain binds to ``domid``
        (once per handle: EACCES the second time; ports bound before stay usable)."""
        check_domid("restrict", domid, guest_only=True)
        if domid == 0:
            raise ArgumentError("restrict", "domid", domid, "must be a guest domid, not dom0")
        self._ioctl("restrict", IOCTL_EVTCHN_RESTRICT_DOMID, ioctl_evtchn_restrict_domid(domid=domid), domid)
        self.restricted_to = domid

    # --- read / write ------------------------------------------------------------------

    def pending_ports(self, limit: int) -> list[int]:
        """Up to ``limit`` pending ports in one ``read`` (``[]`` when none is pending): what
        ``pending`` gives one by one, without a failing read to learn that the ring is empty.
        Each port stays masked until ``unmask``; EFBIG means the ring overflowed."""
        check_int("pending_ports", "limit", limit, 1, MAX_PENDING_PORTS)
        dev = self._resource
        if dev is None:
            raise ClosedHandleError("EventChannel is closed", "pending_ports")
        try:
            raw = dev.read(4 * limit)
        except OSError as e:  # BlockingIOError included: nothing pending
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return []
            raise xen_error(e.errno or errno.EIO, "pending", layer="evtchn") from None
        if len(raw) == 4:  # the usual case: one port
            return [_PORT.unpack(raw)[0]]
        usable = len(raw) & ~3
        return [int.from_bytes(raw[i : i + 4], "little") for i in range(0, usable, 4)]

    def pending(self) -> int | None:
        """One pending port (``read`` of 4 bytes), or None when none is pending.
        The port stays masked until ``unmask``; EFBIG means the ring overflowed."""
        try:
            raw = self.device.read(4)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return None
            raise xen_error(e.errno or errno.EIO, "pending", layer="evtchn") from None
        if len(raw) != 4:
            return None
        return int.from_bytes(raw, "little")

    def unmask(self, port: int) -> None:
        """Write ``port`` back so it can fire again (libxenevtchn's ``xenevtchn_unmask``)."""
        raw = self._port_bytes.get(port) if port.__class__ is int else None
        if raw is None:
            raw = check_port("unmask", port).to_bytes(4, "little")
            if len(self._port_bytes) < _CACHED_PORTS:
                self._port_bytes[port] = raw
        dev = self._resource
        if dev is None:
            raise ClosedHandleError("EventChannel is closed", "unmask")
        try:
            dev.write(raw)
        except OSError as e:
            raise xen_error(e.errno or errno.EIO, "unmask", args={"port": port}, layer="evtchn") from None
