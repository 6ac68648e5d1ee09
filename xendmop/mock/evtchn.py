"""The mock ``/dev/xen/evtchn``: Linux ``drivers/xen/evtchn.c`` over the mock's event channels.

Each open is one ``struct per_user_data``: the ports it bound, a ring of pending
ports, an optional domid restriction.  ``fileno()`` is a real eventfd that is
readable while the ring is non-empty, so ``select``/``poll``/asyncio work on it.
A delivered port stays masked (``enabled = False``) until user space writes it
back, as Linux does with its lateeoi handling.  The ring holds ``ring_size`` ports
(64, doubled whenever more ports are bound than it holds: ``evtchn_resize_ring``);
a port arriving at a full ring is lost and the ring is marked overflowed: ``read``
fails with EFBIG (and ``poll`` reports POLLERR) until ``IOCTL_EVTCHN_RESET``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import threading
from typing import TYPE_CHECKING, Any

from ..abi.evtchn import (
    IOCTL_EVTCHN_BIND_INTERDOMAIN,
    IOCTL_EVTCHN_BIND_UNBOUND_PORT,
    IOCTL_EVTCHN_BIND_VIRQ,
    IOCTL_EVTCHN_NOTIFY,
    IOCTL_EVTCHN_RESET,
    IOCTL_EVTCHN_RESTRICT_DOMID,
    IOCTL_EVTCHN_UNBIND,
    ioctl_evtchn_bind_interdomain,
    ioctl_evtchn_bind_unbound_port,
    ioctl_evtchn_bind_virq,
    ioctl_evtchn_notify,
    ioctl_evtchn_restrict_domid,
    ioctl_evtchn_unbind,
)
from ..abi.xen import DOMID_FIRST_RESERVED
from .privcmd import raise_errno, read_arg
from .state import NR_EVTCHN_PORTS, EvtchnPort, WakeAfterUnlock
from .usermem import PAGE_SIZE

if TYPE_CHECKING:
    from . import MockXen

EVTCHN_PATH = "/dev/xen/evtchn"
#: ``NR_VIRQS`` (xen/include/public/xen.h)
NR_VIRQS = 24
UNRESTRICTED_DOMID = DOMID_FIRST_RESERVED
#: ``evtchn_resize_ring``: the first ring holds 64 ports
FIRST_RING_SIZE = 64
_EAGAIN_TEXT = os.strerror(errno.EAGAIN)


class EvtchnDevice:
    """One open of ``/dev/xen/evtchn`` in dom0 (``evtchn_open``)."""

    path = EVTCHN_PATH

    def __init__(self, host: MockXen, memory: Any = None) -> None:
        self._host = host
        #: the opener's memory, for an ioctl argument given as a user address
        self.memory = host.memory if memory is None else memory
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ring: list[int] = []
        self.ring_size = 0  # u->ring_size: no ring until the first bind
        self.ring_overflow = False  # u->ring_overflow
        self._ports: dict[int, bool] = {}  # bound port -> enabled (unmasked)
        self.restrict_domid = UNRESTRICTED_DOMID
        self.nonblocking = False
        self._cond = threading.Condition(host.lock)
        self._sleepers = 0  # blocking reads waiting on _cond: only they need a notify_all
        self._closed = False

    # --- the fd ---------------------------------------------------------------------

    def fileno(self) -> int:
        if self._closed:
            raise_errno(errno.EBADF)
        return self._efd

    @property
    def bound_ports(self) -> tuple[int, ...]:
        return tuple(sorted(self._ports))

    def port_pending(self, port: int) -> None:
        """``evtchn_interrupt``: a bound port fired; queue it once and mask it until written back."""
        if not self._ports.get(port, False):
            return  # masked: stays pending in Xen until unmasked
        self._ports[port] = False
        self._host.dom0.ports[port].pending = False
        if len(self._ring) >= self.ring_size:  # the event is consumed and lost
            self.ring_overflow = True
            return
        self._ring.append(port)
        os.eventfd_write(self._efd, 1)
        if self._sleepers:
            self._cond.notify_all()

    def read(self, nbytes: int) -> bytes:
        """``evtchn_read``: pending ports as native uint32s (count rounded down to 4, at most a page)."""
        nbytes = min(nbytes & ~3, PAGE_SIZE)
        if nbytes == 0:
            return b""
        if self.nonblocking and not self._ring and not self.ring_overflow:
            # The dispatch loop's common "anything more?" read: EAGAIN without taking the host
            # lock.  A port queued meanwhile is not lost: the eventfd stays readable for it.
            raise BlockingIOError(errno.EAGAIN, _EAGAIN_TEXT)
        with self._cond:
            while True:
                if self.ring_overflow:  # checked before the ring, every round
                    raise_errno(errno.EFBIG)
                if self._ring:
                    break
                if self.nonblocking:
                    raise_errno(errno.EAGAIN)
                self._sleepers += 1
                try:
                    self._cond.wait()
                finally:
                    self._sleepers -= 1
            take, self._ring = self._ring[: nbytes // 4], self._ring[nbytes // 4 :]
            if not self._ring:
                self._drain_efd()
            return struct.pack(f"<{len(take)}I", *take)  # one pack, not a bytes object per port

    def write(self, data: bytes) -> int:
        """``evtchn_write``: unmask each written port that this fd bound; re-deliver if pending."""
        nbytes = min(len(data) & ~3, PAGE_SIZE)
        with self._host.lock:
            for i in range(0, nbytes, 4):
                port = int.from_bytes(data[i : i + 4], "little")
                if port in self._ports and not self._ports[port]:
                    self._ports[port] = True
                    chn = self._host.dom0.ports.get(port)
                    if chn is not None and chn.pending:  # xen_irq_lateeoi: fires again
                        self.port_pending(port)
        return nbytes

    def _drain_efd(self) -> None:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass

    def readable(self) -> bool:
        return bool(select.select([self._efd], [], [], 0)[0])

    def poll(self) -> int:
        """``evtchn_poll``: POLLOUT always, POLLIN while ports are queued, only POLLERR after an overflow."""
        if self.ring_overflow:
            return select.POLLERR
        mask = select.POLLOUT | select.POLLWRNORM
        if self._ring:
            mask |= select.POLLIN | select.POLLRDNORM
        return mask

    # --- ioctl ------------------------------------------------------------------------

    def ioctl(self, request: int, arg: Any = 0) -> int:
        if self._closed:
            raise_errno(errno.EBADF)
        if request == IOCTL_EVTCHN_NOTIFY and arg.__class__ is ioctl_evtchn_notify:
            # A device model's notify after each access: its one field is read as is (the
            # struct is already the kernel's copy), then the same rule as _notify.
            port = arg.port
            with WakeAfterUnlock(), self._host.lock:  # the vCPU's wake-up after the unlock
                rc = self._notify_port(port)
                self._host.log("evtchn", request, {"arg": {"port": port}}, rc)
        else:
            with WakeAfterUnlock(), self._host.lock:
                rc = self._ioctl(request, arg)
                self._host.log("evtchn", request, {"arg": _show(arg)}, rc)
        if rc < 0:
            raise_errno(-rc)
        return rc

    def _ioctl(self, request: int, arg: Any) -> int:
        """``evtchn_ioctl``."""
        handler = _IOCTLS.get(request)
        if handler is None:
            return -errno.ENOSYS
        struct, fn = handler
        if struct is None:
            return int(fn(self, None))
        try:
            data = read_arg(arg, struct, self.memory)
        except OSError:
            return -errno.EFAULT
        return int(fn(self, data))

    def _bind(self, port: int) -> None:
        """``evtchn_bind_to_user``: ``evtchn_resize_ring`` first, so the ring holds every bound port."""
        if len(self._ports) + 1 > self.ring_size:
            self.ring_size = self.ring_size * 2 if self.ring_size else FIRST_RING_SIZE
        self._ports[port] = True
        self._host.dom0.ports[port].user = self
        if self._host.dom0.ports[port].pending:
            self.port_pending(port)

    def _bind_virq(self, data: Any) -> int:
        if self.restrict_domid != UNRESTRICTED_DOMID:
            return -errno.EACCES
        if data.virq >= NR_VIRQS:  # evtchn_bind_virq
            return -errno.EINVAL
        hv, dom0 = self._host.hypervisor, self._host.dom0
        port = hv.get_free_port(dom0)
        if port < 0:
            return port
        dom0.ports[port] = EvtchnPort(port, "virq")
        self._bind(port)
        return port

    def _bind_interdomain(self, data: Any) -> int:
        if self.restrict_domid != UNRESTRICTED_DOMID and data.remote_domain != self.restrict_domid:
            return -errno.EACCES
        if data.remote_domain >= 1 << 16:  # domid_t in evtchn_bind_interdomain
            return -errno.ESRCH
        port = self._host.hypervisor.bind_interdomain(self._host.dom0, data.remote_domain, data.remote_port)
        if port > 0:
            self._bind(port)
        return port

    def _bind_unbound(self, data: Any) -> int:
        if self.restrict_domid != UNRESTRICTED_DOMID:
            return -errno.EACCES
        if data.remote_domain not in self._host.hypervisor.domains:  # evtchn_alloc_unbound
            return -errno.ESRCH
        port = self._host.hypervisor.alloc_unbound(self._host.dom0, data.remote_domain)
        if port > 0:
            self._bind(port)
        return port

    def _unbind(self, data: Any) -> int:
        if data.port >= NR_EVTCHN_PORTS:
            return -errno.EINVAL
        if data.port not in self._ports:
            return -errno.ENOTCONN
        self._unbind_port(data.port)
        return 0

    def _unbind_port(self, port: int) -> None:
        del self._ports[port]
        self._ring = [p for p in self._ring if p != port]
        if not self._ring:
            self._drain_efd()
        self._host.hypervisor.close_port(self._host.dom0, port)

    def _notify(self, data: Any) -> int:
        return self._notify_port(data.port)

    def _notify_port(self, port: int) -> int:
        """``evtchn_ioctl`` IOCTL_EVTCHN_NOTIFY: only a port this fd bound, then ``notify_remote_via_evtchn``."""
        if port >= NR_EVTCHN_PORTS or port not in self._ports:
            return -errno.ENOTCONN
        return self._host.hypervisor.evtchn_send(self._host.dom0, port)

    def _reset(self, _: Any) -> int:
        """``IOCTL_EVTCHN_RESET``: empty the ring and clear the overflow (queued ports stay masked)."""
        self._ring = []
        self.ring_overflow = False
        self._drain_efd()
        return 0

    def _restrict(self, data: Any) -> int:
        if self.restrict_domid != UNRESTRICTED_DOMID:
            return -errno.EACCES
        if data.domid == 0 or data.domid >= DOMID_FIRST_RESERVED:
            return -errno.EINVAL
        self.restrict_domid = int(data.domid)
        return 0

    def mmap(self, length: int, offset: int = 0) -> Any:
        raise_errno(errno.ENODEV)

    def close(self) -> None:
        """``evtchn_release``: unbind every port, free the fd."""
        if self._closed:
            return
        with self._host.lock:
            for port in list(self._ports):
                self._unbind_port(port)
            self._closed = True
            self._cond.notify_all()
            self._host._forget(self)
        os.close(self._efd)


def _show(arg: Any) -> Any:
    if isinstance(arg, ctypes.Structure):
        return {name: getattr(arg, name) for name, *_ in arg._fields_}
    return arg


_IOCTLS: dict[int, tuple[type[ctypes.Structure] | None, Any]] = {
    IOCTL_EVTCHN_BIND_VIRQ: (ioctl_evtchn_bind_virq, EvtchnDevice._bind_virq),
    IOCTL_EVTCHN_BIND_INTERDOMAIN: (ioctl_evtchn_bind_interdomain, EvtchnDevice._bind_interdomain),
    IOCTL_EVTCHN_BIND_UNBOUND_PORT: (ioctl_evtchn_bind_unbound_port, EvtchnDevice._bind_unbound),
    IOCTL_EVTCHN_UNBIND: (ioctl_evtchn_unbind, EvtchnDevice._unbind),
    IOCTL_EVTCHN_NOTIFY: (ioctl_evtchn_notify, EvtchnDevice._notify),
    IOCTL_EVTCHN_RESET: (None, EvtchnDevice._reset),
    IOCTL_EVTCHN_RESTRICT_DOMID: (ioctl_evtchn_restrict_domid, EvtchnDevice._restrict),
}
