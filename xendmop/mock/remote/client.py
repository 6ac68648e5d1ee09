"""The mock host's clients: ``RemoteXen`` (a connection: ``open_device`` and admin requests,
``connect_from_env``) and the devices it opens, ``RemotePrivcmd`` and ``RemoteEvtchn``, which
carry each request as the kernel would copy it and answer the host's memory requests.

The protocol: ``docs/mock-host-protocol.md``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import mmap
import os
import socket
import struct
import threading
from typing import Any

from ...abi.evtchn import (
    EVTCHN_PATH,
    IOCTL_EVTCHN_BIND_INTERDOMAIN,
    IOCTL_EVTCHN_BIND_UNBOUND_PORT,
    IOCTL_EVTCHN_BIND_VIRQ,
    IOCTL_EVTCHN_NOTIFY,
    IOCTL_EVTCHN_UNBIND,
    ioctl_evtchn_bind_interdomain,
    ioctl_evtchn_bind_unbound_port,
    ioctl_evtchn_notify,
    ioctl_evtchn_unbind,
)
from ...abi.privcmd import PRIVCMD_PATH
from ..evtchn import (
    DOORBELL_BROKEN,
    DOORBELL_CAPACITY,
    DOORBELL_CONS,
    DOORBELL_ENTRIES,
    DOORBELL_POSTED_DONE,
    DOORBELL_PROD,
    DOORBELL_WANTED,
    PORT_FIRED,
    RING_BYTES,
    RING_CAPACITY,
    RING_CONS,
    RING_ENTRIES,
    RING_FEATURE_DOORBELL,
    RING_FEATURE_MASKS,
    RING_FEATURES,
    RING_OVERFLOW,
    RING_PROD,
    RING_SIZE,
    PortMaskWords,
)
from ..state import NR_EVTCHN_PORTS
from ..usermem import PAGE_SIZE, UserMemory, remap
from .wire import (
    _ADDR,
    _ADDR_N,
    _CHUNK,
    _ERROR,
    _HANDLE,
    _HANDLE_ADDR,
    _IOCTL,
    _KIND,
    _MMAP,
    _OK,
    _REMAP_HEAD,
    _REMAP_PAGE,
    ENV_SOCKET,
    MAX_ARG,
    MockHostError,
    Msg,
    _Broken,
    _close_fds,
    _pack,
    _readable,
    _recv,
    _send,
)

log = logging.getLogger("xendmop.mock.remote")  # one logger for the whole host (the CLI sets its level)

# --- the client side --------------------------------------------------------------------------


class RemoteXen:
    """A connection to a mock host process: ``open_device`` and admin requests.

    One request at a time per connection (a lock); the process's own memory answers
    the host's copy requests.  No thread of its own, so a device model may drop
    privileges (``no_new_privs`` wants a single thread) while connected.
    """

    def __init__(self, socket_path: str) -> None:
        self.path = os.fspath(socket_path)
        self.memory = UserMemory()
        # One transaction at a time.  Lock order: an evtchn fd's ``_cons_lock`` (taken by its
        # BIND/UNBIND/RESET) before this one, never the other way (MockHostServer.__init__).
        self._lock = threading.Lock()
        self._vmas: list[tuple[mmap.mmap, int, int, int]] = []  # (mapping, start, length, handle)
        #: a NOTIFY that may raise a dom0 port was posted and the host has not answered anything
        #: since: an evtchn unmask must then be queued behind it (``RemoteEvtchn.write``)
        self.dom0_notify_posted = False
        #: posted messages sent (a NOTIFY rings a doorbell only once the host has handled them all)
        self.posted = 0
        self._sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self._sock.connect(self.path)
        except OSError:
            self._sock.close()
            raise

    # --- transactions -----------------------------------------------------------------

    @property
    def sock(self) -> socket.socket:
        if self._sock is None:
            raise MockHostError(f"connection to {self.path} is closed")
        return self._sock

    def transact(self, request: bytes) -> tuple[int, bytes, list[int]]:
        """Send one request; answer the host's memory requests until its reply.
        Returns ``(value, data, fds)`` or raises ``OSError`` with the host's errno."""
        with self._lock:
            sock = self.sock
            _send(sock, request)
            while True:
                try:
                    data, fds, _ = _recv(sock, want_fds=True)
                except _Broken as e:
                    raise MockHostError(f"mock host at {self.path}: {e.strerror}") from None
                kind = _KIND.unpack_from(data)[0] if len(data) >= _KIND.size else -1
                body = data[_KIND.size :]
                if kind in (Msg.OK, Msg.ERROR):
                    self.dom0_notify_posted = False  # answered: every earlier posted request was handled
                if kind == Msg.OK:
                    (value,) = _OK.unpack_from(body)
                    return value, body[_OK.size :], fds
                if kind != Msg.MEM_REMAP:
                    _close_fds(fds)
                    fds = []
                if kind == Msg.ERROR:
                    (err,) = _ERROR.unpack_from(body)
                    raise OSError(err, body[_ERROR.size :].decode(errors="replace") or os.strerror(err))
                _send(sock, self._serve_memory(kind, body, fds))

    def post(self, request: bytes) -> None:
        """Send a request the host answers with nothing (``Msg.WRITE_POSTED``): for a call
        whose result the caller knows and that reaches no memory of ours.  The host
        handles it before this connection's next request, as the kernel would have
        finished the syscall before the next one."""
        with self._lock:
            try:
                _send(self.sock, request)
            except OSError as e:
                raise MockHostError(f"mock host at {self.path}: {e.strerror}") from None
            self.posted = (self.posted + 1) & 0xFFFFFFFF

    def _serve_memory(self, kind: int, body: bytes, fds: list[int]) -> bytes:
        """The host's copy_{from,to}_user or remap during our ioctl, done on our own memory."""
        try:
            if kind == Msg.MEM_READ:
                addr, n = _ADDR_N.unpack_from(body)
                if n > _CHUNK:
                    raise OSError(errno.EINVAL, "read too long")
                return _pack(Msg.MEM_REPLY, _ERROR.pack(0), self.memory.read(addr, n))
            if kind == Msg.MEM_WRITE:
                (addr,) = _ADDR.unpack_from(body)
                self.memory.write(addr, body[_ADDR.size :])
            elif kind == Msg.MEM_CHECK:
                addr, n = _ADDR_N.unpack_from(body)
                self.memory.check_writable(addr, min(n, _CHUNK))
            elif kind == Msg.MEM_REMAP:
                self._remap(body, fds)
            else:
                raise OSError(errno.EPROTO, f"unexpected message kind {kind}")
        except (OSError, struct.error) as e:
            err = e.errno if isinstance(e, OSError) and e.errno else errno.EFAULT
            return _pack(Msg.MEM_REPLY, _ERROR.pack(err))
        finally:
            if kind == Msg.MEM_REMAP:
                _close_fds(fds)  # the mappings hold their own references
        return _pack(Msg.MEM_REPLY, _ERROR.pack(0))

    def _remap(self, body: bytes, fds: list[int]) -> None:
        (count,) = _REMAP_HEAD.unpack_from(body)
        pages = [_REMAP_PAGE.unpack_from(body, _REMAP_HEAD.size + i * _REMAP_PAGE.size) for i in range(count)]
        for addr, index, _ in pages:  # only over our own live privcmd VMAs
            if index >= len(fds) or not any(
                not m.closed and start <= addr and addr + PAGE_SIZE <= start + length
                for m, start, length, _ in self._vmas
            ):
                raise OSError(errno.EFAULT, f"remap at {addr:#x}: not in a privcmd mapping")
        for addr, index, offset in pages:
            remap(addr, PAGE_SIZE, fds[index], offset)

    def call(self, op: str, **args: Any) -> Any:
        """One admin request (``ping``, ``domains``, ``servers``, ``snapshot``, ``gsi_level``,
        ``events``, ``clients``, ``create_domain``, ``destroy_domain``); its JSON result."""
        _, data, fds = self.transact(_pack(Msg.CALL, json.dumps({"op": op, "args": args}).encode()))
        _close_fds(fds)
        reply = json.loads(data)
        if "raise" in reply:
            raise _rebuild(reply)
        return reply["ok"]

    # --- admin helpers ----------------------------------------------------------------

    def create_domain(self, vcpus: int = 1, hvm: bool = True, memory_mb: int = 64, **kw: Any) -> int:
        return int(self.call("create_domain", vcpus=vcpus, hvm=hvm, memory_mb=memory_mb, **kw))

    def destroy_domain(self, domid: int) -> None:
        self.call("destroy_domain", domid=domid)

    def servers(self, domid: int) -> dict[int, dict[str, Any]]:
        """The domain's registered ioreq servers by id, as Xen sees them."""
        return {int(k): v for k, v in self.call("servers", domid=domid).items()}

    def snapshot(self, domid: int) -> dict[str, Any]:
        return dict(self.call("snapshot", domid=domid))

    def gsi_level(self, domid: int, gsi: int) -> bool:
        return bool(self.call("gsi_level", domid=domid, gsi=gsi))

    def events(self, last: int = 100) -> list[dict[str, Any]]:
        return list(self.call("events", last=last))

    # --- devices ----------------------------------------------------------------------

    def open_device(self, path: str) -> Any:
        """Open a device of the host (``/dev/xen/privcmd``, ``/dev/xen/hypercall``, ``/dev/xen/evtchn``)."""
        handle, _, fds = self.transact(_pack(Msg.OPEN, path.encode()))
        if path == EVTCHN_PATH:
            if len(fds) != 3:
                _close_fds(fds)
                raise MockHostError(
                    f"mock host sent {len(fds)} fds for {path} (want the eventfd, the ring and the doorbell)"
                )
            try:
                return RemoteEvtchn(self, path, handle, fds[0], fds[1], fds[2])
            finally:
                os.close(fds[1])  # the ring's mapping holds its own reference
        _close_fds(fds)
        if path == PRIVCMD_PATH:
            return RemotePrivcmd(self, path, handle)
        return RemoteDevice(self, path, handle)

    def _prune_vmas(self) -> None:
        """Tell the host which privcmd VMAs we unmapped since the last ioctl."""
        gone = [v for v in self._vmas if v[0].closed]
        if not gone:
            return
        self._vmas = [v for v in self._vmas if not v[0].closed]
        for _, start, _, handle in gone:
            try:
                self.transact(_pack(Msg.MUNMAP, _HANDLE_ADDR.pack(handle, start)))
            except OSError:
                pass  # the device was closed meanwhile: its VMAs went with it

    def close(self) -> None:
        """Disconnect: the host closes every device this connection opened."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> RemoteXen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_from_env() -> RemoteXen:
    """Connect to the mock host named by ``$XENDMOP_MOCK_SOCKET``."""
    path = os.environ.get(ENV_SOCKET)
    if not path:
        raise MockHostError(f"{ENV_SOCKET} is not set")
    return RemoteXen(path)


def _rebuild(reply: dict[str, Any]) -> Exception:
    from ...abi.ioreq_slot import Ioreq
    from ..simguest import GuestCrash, GuestTimeout

    name, message = reply.get("raise"), str(reply.get("message", ""))
    if name == "GuestTimeout":
        req = Ioreq(*reply["req"])
        return GuestTimeout(int(reply["domid"]), int(reply["vcpu"]), req, reply["timeout"], int(reply["state"]))
    if name == "GuestCrash":
        return GuestCrash(message)
    if name == "ValueError":
        return ValueError(message)
    if name == "LookupError":
        return LookupError(message)
    return MockHostError(f"{name}: {message}")


class RemoteDevice:
    """A device of the mock host, opened over a ``RemoteXen`` connection."""

    def __init__(self, xen: RemoteXen, path: str, handle: int) -> None:
        self.path = path
        self._xen = xen
        self._handle = handle
        self._fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)  # a real fd to hand out, as the mock does

    def fileno(self) -> int:
        if self._fd < 0:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return self._fd

    def ioctl(self, request: int, arg: Any = 0) -> int:
        """``ioctl(fd, request, arg)``: ``arg`` a mutable buffer (updated in place) or a user address."""
        self.fileno()
        if isinstance(arg, int):
            head = _IOCTL.pack(self._handle, request & 0xFFFFFFFF, 1, arg & ((1 << 64) - 1))
            value, _, _ = self._xen.transact(_pack(Msg.IOCTL, head))
            return value
        view = memoryview(arg).cast("B")
        if view.nbytes > MAX_ARG:
            raise OSError(errno.EINVAL, f"ioctl argument of {view.nbytes} bytes (limit {MAX_ARG})")
        head = _IOCTL.pack(self._handle, request & 0xFFFFFFFF, 0, 0)
        value, data, _ = self._xen.transact(_pack(Msg.IOCTL, head, view.tobytes()))
        if not view.readonly and len(data) == view.nbytes:
            view[:] = data  # what the kernel copied back
        return value

    def mmap(self, length: int, offset: int = 0) -> mmap.mmap:
        """Our own shared anonymous pages, announced to the host (privcmd fills them by ioctl)."""
        self.fileno()
        if length <= 0 or offset < 0:  # mm/mmap.c do_mmap: no length (or an offset that wraps) is EINVAL
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        mapping = mmap.mmap(-1, length, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        start = _address_of(mapping)
        try:
            self._xen.transact(_pack(Msg.MMAP, _MMAP.pack(self._handle, start, length, offset)))
        except BaseException:
            mapping.close()
            raise
        if self.path == PRIVCMD_PATH:
            self._xen._vmas.append((mapping, start, length, self._handle))
        return mapping

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        os.close(fd)
        self._xen._vmas = [v for v in self._xen._vmas if v[3] != self._handle]
        try:
            self._xen.transact(_pack(Msg.CLOSE, _HANDLE.pack(self._handle)))
        except (OSError, MockHostError):
            pass  # the host is gone: nothing is left open there

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} handle={self._handle} fd={self._fd}>"


class RemotePrivcmd(RemoteDevice):
    """``/dev/xen/privcmd`` of the mock host."""

    def ioctl(self, request: int, arg: Any = 0) -> int:
        self._xen._prune_vmas()
        return super().ioctl(request, arg)


_BINDS = frozenset((IOCTL_EVTCHN_BIND_VIRQ, IOCTL_EVTCHN_BIND_INTERDOMAIN, IOCTL_EVTCHN_BIND_UNBOUND_PORT))
_DOM0_BINDS = (ioctl_evtchn_bind_interdomain, ioctl_evtchn_bind_unbound_port)


class RemoteEvtchn(RemoteDevice):
    """``/dev/xen/evtchn`` of the mock host; ``fileno()`` is the host device's eventfd and
    ``read`` takes the pending ports from the ring the host shares (``SharedPortRing``).

    This is the consumer side of Linux ``evtchn_read``: under the fd's consumer lock
    (``ring_cons_mutex``), EFBIG while ``ring_overflow`` is set, the entries from
    ``ring_cons`` to ``ring_prod`` copied out, then ``ring_cons`` advanced.  The host
    rewrites the ring only inside a BIND, UNBIND or RESET, which hold the same lock here.
    """

    def __init__(self, xen: RemoteXen, path: str, handle: int, eventfd: int, ring_fd: int, doorbell_fd: int) -> None:
        super().__init__(xen, path, handle)
        os.close(self._fd)
        self._fd = eventfd
        #: the NOTIFY doorbell's eventfd (written after an entry is queued), -1 once closed
        self._bell = doorbell_fd
        self._bell_lock = threading.Lock()  # one producer at a time
        self._db_prod = 0  # our own db_prod
        try:
            size = os.fstat(ring_fd).st_size
            if size != RING_BYTES:
                raise MockHostError(f"evtchn ring of {size} bytes from the mock host (want {RING_BYTES})")
            self._ring_map = mmap.mmap(ring_fd, RING_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            self.close()
            raise
        self._words = memoryview(self._ring_map).cast("I")
        if not self._words[RING_FEATURES] & RING_FEATURE_DOORBELL:
            os.close(self._bell)
            self._bell = -1
        #: the port mask words, if the host offers them and we have libatomic: an unmask is then
        #: an exchange on our own mapping, and a message only for a port that fired while masked
        self._masks: PortMaskWords | None = None
        if self._words[RING_FEATURES] & RING_FEATURE_MASKS:
            try:
                self._masks = PortMaskWords(self._ring_map)
            except OSError:
                pass
        #: ``ring_cons_mutex``: one reader at a time, and no read while the host rewrites the ring;
        #: taken before the connection's ``RemoteXen._lock`` (an ioctl under it transacts), never after
        self._cons_lock = threading.Lock()
        #: the O_NONBLOCK file flag, modelled here: a blocking read waits on the eventfd
        self.nonblocking = False
        #: the ports this fd bound, as the kernel's per-fd port table (``get_port_user``);
        #: None once a bind or unbind went by address (its port is then unknown here)
        self._bound: set[int] | None = set()
        #: bound ports whose peer may be a dom0 port (remote domain 0): a NOTIFY on one may raise
        #: a port of ours, so an unmask after it must not overtake it
        self._dom0_facing: set[int] = set()

    def ioctl(self, request: int, arg: Any = 0) -> int:
        """As ``RemoteDevice.ioctl``; a NOTIFY on a port this fd bound is posted.

        ``evtchn_ioctl`` answers a NOTIFY from its own port table alone (ENOTCONN for a
        port this fd did not bind, else 0), a table only this fd's binds and unbinds
        change: kept here, it gives the same answer without waiting for the host, which
        a device model does after every access.  Any other ioctl holds the consumer lock:
        a bind may grow the ring, an unbind drop its entries, a reset empty it."""
        bound = self._bound
        if request == IOCTL_EVTCHN_NOTIFY and arg.__class__ is ioctl_evtchn_notify and bound is not None:
            self.fileno()
            port = arg.port
            if port not in bound:
                raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))
            words = self._words
            if (
                words[DOORBELL_WANTED + port]
                and self._bell >= 0
                and words[DOORBELL_POSTED_DONE] == self._xen.posted
                and not words[DOORBELL_BROKEN]
                and port not in self._dom0_facing
                and self._ring_doorbell(port)
            ):
                return 0
            head = _IOCTL.pack(self._handle, request & 0xFFFFFFFF, 0, 0)
            self._xen.post(_pack(Msg.IOCTL_POSTED, head, bytes(arg)))
            if arg.port in self._dom0_facing:
                self._xen.dom0_notify_posted = True
            return 0
        with self._cons_lock:
            rc = super().ioctl(request, arg)
        if bound is not None:
            if request in _BINDS:
                bound.add(rc)
                if arg.__class__ in _DOM0_BINDS and arg.remote_domain == 0:
                    self._dom0_facing.add(rc)
            elif request == IOCTL_EVTCHN_UNBIND:
                if arg.__class__ is ioctl_evtchn_unbind:
                    bound.discard(arg.port)
                else:
                    self._bound = None
        return rc

    def _ring_doorbell(self, port: int) -> bool:
        """Queue a NOTIFY of ``port`` in the doorbell and write its eventfd; False when it is full.

        Only while a vCPU of the host waits for this port (``DOORBELL_WANTED``), every posted
        message sent before was handled (``DOORBELL_POSTED_DONE``: it cannot overtake one), and
        the port cannot raise a dom0 port (an unmask after it must not overtake it).  The host's
        waiting vCPU thread applies it with the same rule and log entry as any NOTIFY, so the
        connection thread is not on the path.  Entry, then ``db_prod``, then the eventfd: the
        order ``SharedPortRing`` keeps for the ports the other way (x86 only, as it)."""
        words = self._words
        with self._bell_lock:
            prod = self._db_prod
            if (prod - words[DOORBELL_CONS]) & 0xFFFFFFFF >= DOORBELL_CAPACITY:
                return False
            words[DOORBELL_ENTRIES + (prod & (DOORBELL_CAPACITY - 1))] = port
            self._db_prod = prod = (prod + 1) & 0xFFFFFFFF
            words[DOORBELL_PROD] = prod
            os.eventfd_write(self._bell, 1)
        return True

    def read(self, nbytes: int) -> bytes:
        """``evtchn_read``: pending ports as native uint32s (count rounded down to 4, at most
        a page), from the shared ring with no request to the host; EAGAIN when none is
        queued and non-blocking, EFBIG after an overflow until RESET.

        The eventfd is drained before ``ring_prod`` is read: a port the host publishes after
        that read comes with a write of the eventfd after the drain, so the fd stays readable
        while the ring is not empty (at worst once more with an empty ring).  A read that
        leaves ports queued writes the eventfd itself, so it stays readable for them."""
        nbytes = min(nbytes & ~3, PAGE_SIZE)
        if nbytes == 0:
            return b""
        efd = self.fileno()
        words = self._words
        while True:
            with self._cons_lock:
                if words[RING_OVERFLOW]:  # before the ring, every round; the eventfd stays readable
                    raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
                try:
                    os.eventfd_read(efd)
                except BlockingIOError:
                    pass
                prod, cons, size = words[RING_PROD], words[RING_CONS], words[RING_SIZE]
                queued = (prod - cons) & 0xFFFFFFFF
                if queued > size or size > RING_CAPACITY or size & (size - 1):
                    # our own process wrote over the ring: what it holds is lost, as after an overflow
                    os.eventfd_write(efd, 1)
                    raise OSError(
                        errno.EFBIG, f"evtchn ring corrupt: prod={prod} cons={cons} size={size}; IOCTL_EVTCHN_RESET"
                    )
                if queued:
                    take = min(queued, nbytes // 4)
                    first = cons & (size - 1)
                    head = min(take, size - first)  # up to the end of the ring, then from its start
                    out = words[RING_ENTRIES + first : RING_ENTRIES + first + head].tobytes()
                    if head < take:
                        out += words[RING_ENTRIES : RING_ENTRIES + take - head].tobytes()
                    words[RING_CONS] = (cons + take) & 0xFFFFFFFF  # after the entries are copied
                    if take < queued or words[RING_OVERFLOW]:
                        os.eventfd_write(efd, 1)  # still readable: for the rest, or to report EFBIG
                    return out
            if self.nonblocking:
                raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
            _readable(efd, None)

    def write(self, data: bytes) -> int:
        """``evtchn_write``: unmask the ports written; returns the bytes taken (whole ports,
        at most a page).

        Posted without waiting for the host: Linux's ``evtchn_write`` has no per-port
        error (a port this fd did not bind is skipped), so its result is known here, and
        a device model unmasks before it handles the slot, on every access: a round trip
        there is one the kernel does not make."""
        self.fileno()  # EBADF on a closed handle, as before any syscall
        chunk = bytes(data[:PAGE_SIZE])
        nbytes = len(chunk) & ~3
        masks = self._masks
        if masks is None or self._xen.dom0_notify_posted:
            # The host unmasks, in order after the posted NOTIFY that may be raising one of these
            # ports (Linux's NOTIFY has delivered by the time it returns; a posted one has not).
            self._xen.post(_pack(Msg.WRITE_POSTED, _HANDLE.pack(self._handle), chunk))
            return nbytes
        # Unmask in the shared mask words; only a port that fired while masked needs the host.
        fired = []
        for i in range(0, nbytes, 4):
            port = int.from_bytes(chunk[i : i + 4], "little")
            if port < NR_EVTCHN_PORTS and masks.exchange(port, 0) & PORT_FIRED:
                fired.append(chunk[i : i + 4])
        if fired:
            self._xen.post(_pack(Msg.KICK_POSTED, _HANDLE.pack(self._handle), *fired))
        return nbytes

    def close(self) -> None:
        with self._bell_lock:
            bell, self._bell = self._bell, -1
        if bell >= 0:
            os.close(bell)
        words = getattr(self, "_words", None)
        if words is not None:
            if self._masks is not None:
                self._masks.release()
            words.release()
            self._ring_map.close()
            del self._words
        super().close()


def _address_of(mapping: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # release the export so the mapping can still be closed
