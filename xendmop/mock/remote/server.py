"""The mock host's server: ``MockHostServer`` accepts clients on a unix socket and runs one
``_Connection`` per client, carrying its device requests to the ``MockXen`` it serves and
reaching the client's memory while an ioctl is in flight (``_ClientMemory``).

The host's bounds (``MEMORY_TIMEOUT``, ``MAX_HANDLES``, ``MAX_COPY``, ``MAX_MAP_COUNT``,
``MAX_CLIENTS``, ``MAX_CLIENTS_PER_UID``, ``IDLE_TIMEOUT``) are this module's globals and
are read at each use.  The protocol: ``docs/mock-host-protocol.md``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ...abi.evtchn import (
    IOCTL_EVTCHN_NOTIFY,
    ioctl_evtchn_notify,
)
from ...abi.ioctl import _IOC_SIZE
from ...abi.privcmd import (
    HYPERCALL_PATH,
    IOCTL_PRIVCMD_DM_OP,
    IOCTL_PRIVCMD_HYPERCALL,
    IOCTL_PRIVCMD_MMAPBATCH_V2,
    privcmd_dm_op,
    privcmd_hypercall,
    privcmd_mmapbatch_v2,
)
from ...abi.xen import __HYPERVISOR_dm_op as _HYPERVISOR_DM_OP
from ..evtchn import (
    MockEvtchnDevice,
)
from ..privcmd import GATHER_MAX, PrivcmdDevice, gather_chunks
from ..usermem import PAGE_SIZE, access_ok
from .admin import _CALLS, _GuestRaised
from .wire import (
    _ADDR,
    _ADDR_N,
    _CHUNK,
    _ERROR,
    _HANDLE,
    _HANDLE_ADDR,
    _HANDLE_N,
    _IOCTL,
    _KIND,
    _MAX_FDS,
    _MMAP,
    _NOTIFY_SIZE,
    _OK,
    _OK_KIND,
    _POSTED,
    _REMAP_BATCH,
    _REMAP_HEAD,
    _REMAP_PAGE,
    _UCRED,
    MAX_ARG,
    MAX_MESSAGE,
    Msg,
    _Broken,
    _error,
    _jsonable,
    _kind_name,
    _pack,
    _readable,
    _recv,
    _send,
    _TooLong,
)

log = logging.getLogger("xendmop.mock.remote")  # one logger for the whole host (the CLI sets its level)

#: seconds the host waits for a client to answer a memory request during its ioctl
MEMORY_TIMEOUT = 5.0
#: open devices per connection
MAX_HANDLES = 256
#: the most bytes one copy_{from,to}_user of a client may move (an MMAPBATCH of 2M frames, 8 GiB).
#: Linux's gather_array (privcmd.c) takes any count its page allocator can serve; the host bounds
#: it instead, so that a client's claimed length cannot make it gather gigabytes.
MAX_COPY = 16 << 20
#: privcmd VMAs one client may announce (MMAP): Linux's default ``vm.max_map_count``, beyond which
#: mm/mmap.c's do_mmap fails with ENOMEM
MAX_MAP_COUNT = 65530
#: connected clients (one thread each); a further one is closed at once and logged
MAX_CLIENTS = 128
#: connections one uid may hold (``SO_PEERCRED``), so that one user cannot take every place
MAX_CLIENTS_PER_UID = 64
#: seconds a connection with no open device may stay silent before the host closes it (one with
#: devices keeps them, as a process keeps its fds: a device model waiting for events sends nothing)
IDLE_TIMEOUT = 60.0
#: the largest dm_op buffer the host reads ahead of an ioctl on the HYPERCALL path (privcmd's own
#: DM_OP bounds each by ``dm_op_buf_max_size``)
_PREFETCH_BUF_MAX = 64 * 1024

# --- the host side ------------------------------------------------------------------------------


def _check_copy(what: str, addr: int, nbytes: int) -> None:
    """``access_ok`` (EFAULT), then the host's own bound on one copy (``MAX_COPY``, ENOMEM)."""
    if not access_ok(addr, nbytes):
        raise OSError(errno.EFAULT, f"{what}: {addr:#x}+{nbytes} outside user space")
    if nbytes > MAX_COPY:
        raise OSError(errno.ENOMEM, f"{what}: {nbytes} bytes at {addr:#x}, more than the host copies ({MAX_COPY})")


class _ClientMemory:
    """A client process's memory as the host's devices reach it: each access is a
    request to the client, answered from its own memory while its ioctl is in flight.
    No copy is larger than ``MAX_COPY``, checked before the first request.

    Read-ahead (``prefetch``/``prefetch_check`` between ``begin`` and ``end``): what an ioctl
    will read is asked for before it takes the host lock, and what it writes is sent after
    the lock is released, so a client that stalls on its copies stalls alone.  Under the
    lock, an access inside what was read ahead is served from it (a fault recorded then is
    raised again); anything else is asked for as before."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        #: read ahead: (addr, bytes) and (addr, nbytes, errno) of the reads that faulted
        self._ahead: list[tuple[int, bytearray]] | None = None
        self._faults: list[tuple[int, int, int]] = []
        #: pinned-for-writing answers: (addr, nbytes, errno or 0)
        self._checked: list[tuple[int, int, int]] = []
        #: copy_to_user / remap requests held until ``end`` (in their order)
        self._held: list[tuple[bytes, list[int]]] = []

    # --- read-ahead ----------------------------------------------------------------------

    def begin(self) -> None:
        self._ahead, self._faults, self._checked, self._held = [], [], [], []

    def prefetch(self, addr: int, nbytes: int) -> bytes | None:
        """Read ahead (None when it faults: the fault is recorded and raised at its use)."""
        assert self._ahead is not None
        try:
            data = self._fetch(addr, nbytes)
        except OSError as e:
            if isinstance(e, _Broken):
                raise
            self._faults.append((addr, nbytes, e.errno or errno.EFAULT))
            return None
        self._ahead.append((addr, bytearray(data)))
        return data

    def prefetch_check(self, addr: int, nbytes: int) -> None:
        """Ask now whether ``check_writable`` will pass, and remember the answer."""
        try:
            self._check(addr, nbytes)
        except OSError as e:
            if isinstance(e, _Broken):
                raise
            self._checked.append((addr, nbytes, e.errno or errno.EFAULT))
        else:
            self._checked.append((addr, nbytes, 0))

    def end(self) -> None:
        """Send the held writes and remaps (the ioctl is done, the host lock released)."""
        held, self._held = self._held, []
        self._ahead, self._faults, self._checked = None, [], []
        if self._conn.broken:
            return  # nobody left to write to
        for request, fds in held:
            self._conn.rpc(request, fds)

    def _found(self, addr: int, nbytes: int) -> tuple[bytearray, int] | None:
        for start, data in self._ahead or ():
            if start <= addr and addr + nbytes <= start + len(data):
                return data, addr - start
        return None

    def _checked_answer(self, addr: int, nbytes: int) -> int | None:
        for start, n, err in self._checked:
            if start <= addr and addr + nbytes <= start + n:
                return err
        return None

    # --- the kernel's accessors ------------------------------------------------------------

    def read(self, addr: int, nbytes: int) -> bytes:
        """copy_from_user, chunked: an absurd length faults at its first bad chunk."""
        if self._ahead is not None:
            found = self._found(addr, nbytes)
            if found is not None:
                data, at = found
                return bytes(data[at : at + nbytes])
            for start, n, err in self._faults:
                if start <= addr and addr + nbytes <= start + n:
                    raise OSError(err, os.strerror(err))
        return self._fetch(addr, nbytes)

    def _fetch(self, addr: int, nbytes: int) -> bytes:
        _check_copy("copy_from_user", addr, nbytes)
        parts = []
        for off in range(0, nbytes, _CHUNK):
            n = min(_CHUNK, nbytes - off)
            got = self._conn.rpc(_pack(Msg.MEM_READ, _ADDR_N.pack(addr + off, n)))
            if len(got) != n:
                raise _Broken(f"client answered {len(got)} bytes for {n}")
            parts.append(got)
        return b"".join(parts)

    def write(self, addr: int, data: bytes) -> None:
        """copy_to_user (held until ``end`` inside memory checked writable ahead)."""
        _check_copy("copy_to_user", addr, len(data))
        answer = self._checked_answer(addr, len(data)) if self._ahead is not None else None
        if answer:  # pinned for writing ahead, and refused: copy_to_user's fault, without asking again
            raise OSError(answer, os.strerror(answer))
        hold = answer == 0
        if self._ahead is not None:
            found = self._found(addr, len(data))
            if found is not None:  # later reads of the ioctl see what it wrote
                mirror, at = found
                mirror[at : at + len(data)] = data
        for off in range(0, len(data), _CHUNK):
            request = _pack(Msg.MEM_WRITE, _ADDR.pack(addr + off), bytes(data[off : off + _CHUNK]))
            if hold:
                self._held.append((request, []))
            else:
                self._conn.rpc(request)

    def clear(self, addr: int, nbytes: int) -> None:
        """clear_user."""
        _check_copy("clear_user", addr, nbytes)
        for off in range(0, nbytes, _CHUNK):
            self.write(addr + off, bytes(min(_CHUNK, nbytes - off)))

    def check_writable(self, addr: int, nbytes: int) -> None:
        """pin_user_pages_fast(FOLL_WRITE) of privcmd.c ``lock_pages``, probed by the client on its own memory."""
        if self._ahead is not None:
            err = self._checked_answer(addr, nbytes)
            if err == 0:
                return
            if err is not None:
                raise OSError(err, os.strerror(err))
        self._check(addr, nbytes)

    def _check(self, addr: int, nbytes: int) -> None:
        _check_copy("pin_user_pages", addr, nbytes)
        for off in range(0, nbytes, _CHUNK):
            self._conn.rpc(_pack(Msg.MEM_CHECK, _ADDR_N.pack(addr + off, min(_CHUNK, nbytes - off))))

    def remap_pages(self, pages: Sequence[tuple[int, int, int]]) -> None:
        """The frames mapped into the client's privcmd VMA (privcmd.c: ``xen_remap_domain_gfn_array``
        for MMAPBATCH, ``xen_remap_domain_mfn_array`` for MMAP_RESOURCE): the client maps each
        memfd page over its VMA itself, up to ``_REMAP_BATCH`` pages and ``_MAX_FDS`` memfds a message."""
        fds: list[int] = []
        entries: list[bytes] = []

        def flush() -> None:
            if entries:
                request = _pack(Msg.MEM_REMAP, _REMAP_HEAD.pack(len(entries)), *entries)
                if self._ahead is not None:  # after the lock too (the memfds stay open: the frames hold them)
                    self._held.append((request, list(fds)))
                else:
                    self._conn.rpc(request, fds)
            fds.clear()
            entries.clear()

        for addr, fd, offset in pages:
            if (fd not in fds and len(fds) == _MAX_FDS) or len(entries) == _REMAP_BATCH:
                flush()
            if fd not in fds:
                fds.append(fd)
            entries.append(_REMAP_PAGE.pack(addr, fds.index(fd), offset))
        flush()


@dataclasses.dataclass
class ClientInfo:
    """One connected client as the host knows it (``SO_PEERCRED`` at connect time)."""

    pid: int
    uid: int
    gid: int
    devices: dict[int, str]


class _Connection:
    """One client: its devices, its memory, and the thread that serves it.

    No lock of its own: ``devices``, ``_guests`` and the socket's reads belong to the
    connection's thread alone (``MockHostServer.close`` only shuts the socket down, and the
    ``clients`` request copies ``info.devices`` in one step).  Its requests take the host's
    locks in the order given at ``MockHostServer.__init__``.
    """

    def __init__(self, server: MockHostServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        # A client that stops reading fills its socket: a send then fails after MEMORY_TIMEOUT
        # (EAGAIN) and the client is cut off, instead of blocking this thread forever, perhaps
        # inside an ioctl that holds the host lock (a copy request of a DM_OP).
        seconds = int(MEMORY_TIMEOUT)
        sock.setsockopt(
            socket.SOL_SOCKET,
            socket.SO_SNDTIMEO,
            struct.pack("ll", seconds, int((MEMORY_TIMEOUT - seconds) * 1_000_000)),
        )
        self.info = ClientInfo(pid, uid, gid, {})
        self.memory = _ClientMemory(self)
        #: seconds left for the client to answer the copies of the request being handled: only
        #: its own answering time is charged (``rpc``), never a wait for the host lock
        self._copy_budget = MEMORY_TIMEOUT
        self.devices: dict[int, Any] = {}
        self._next_handle = 1
        #: one simulated guest per domain (a request's timeout is set on it each time: keyed by
        #: the timeout too, a client could make the host keep one per distinct float)
        self._guests: dict[int, Any] = {}
        #: this client's evtchn fds with a NOTIFY doorbell, and how many posted messages it sent
        #: that were handled (published in each one's ring: ``DOORBELL_POSTED_DONE``)
        self._bells: list[MockEvtchnDevice] = []
        self._posted_done = 0
        #: posted requests that failed: the first is logged, the rest counted and logged at the
        #: disconnect (a client must not be able to flood the host's log)
        self._posted_failed = 0
        self.broken = False
        self._released = False
        self.thread = threading.Thread(target=self.run, name=f"mock-host client pid {pid}", daemon=True)

    # --- memory requests while an ioctl is in flight ------------------------------------

    def rpc(self, request: bytes, fds: Sequence[int] = ()) -> bytes:
        """Send a memory request and wait for the client's MEM_REPLY: its data, or OSError.

        Departs from Linux, where a copy cannot stall (the kernel reads the memory itself): a
        client that has taken more than ``MEMORY_TIMEOUT`` in all to answer the memory requests
        of one request of its own gets EFAULT (copy_from_user's answer for memory it cannot
        reach) and is disconnected, however many chunks its ioctl copies and however slowly it
        answers each.  Only its own answering time counts: a request that waited for the host
        lock behind another client is not charged for it.  The copies of the ioctls that matter
        (DM_OP, the dm_op hypercall, MMAPBATCH, evtchn arguments) are read ahead of the host
        lock and written after it (``_ClientMemory``), so a stall holds no lock."""
        if self.broken:
            raise _Broken("client gone")
        try:
            started = time.monotonic()
            _send(self.sock, request, fds)
            answered = _readable(self.sock.fileno(), self._copy_budget)
            self._copy_budget -= time.monotonic() - started
            if not answered:
                raise _Broken(f"client did not answer its memory requests within {MEMORY_TIMEOUT}s")
            data, _, _ = _recv(self.sock)
            if len(data) < _KIND.size + _ERROR.size or _KIND.unpack_from(data)[0] != Msg.MEM_REPLY:
                raise _Broken("client sent something else than a memory reply")
        except Exception as e:
            # Any failure between the request and its reply leaves the exchange out of step (the
            # client's reply would be read as its next request): the client is cut off.
            self.broken = True
            if isinstance(e, _Broken):
                raise
            raise _Broken(f"{type(e).__name__}: {e}") from None
        (err,) = _ERROR.unpack_from(data, _KIND.size)
        if err:
            raise OSError(err, os.strerror(err) if 0 < err < 4096 else "error")
        return data[_KIND.size + _ERROR.size :]

    # --- the request loop ------------------------------------------------------------

    def run(self) -> None:
        reply: bytes
        fds: list[int]
        try:
            while not self.broken and not self.server.closing:
                if not self.devices and not _readable(self.sock.fileno(), IDLE_TIMEOUT):
                    # a silent connection holding nothing: closed, so that idle ones cannot
                    # keep every place (MAX_CLIENTS) from the clients that would use them
                    log.info("mock-host: client pid %d silent for %.0f s: closed", self.info.pid, IDLE_TIMEOUT)
                    break
                try:
                    data, _, cred = _recv(self.sock)
                except _TooLong as e:  # refused; the client may go on
                    reply, fds = _error(errno.EMSGSIZE, e.strerror or ""), []
                except OSError:
                    break
                else:
                    # NOTIFYs the client queued in a doorbell went before this message (each
                    # returned before it was sent): applied first, if no waiting vCPU did already.
                    for dev in self._bells:
                        dev.answer_doorbell()
                    try:
                        reply, fds = self._handle(data, cred)
                    except _Broken:
                        break
                    if data[: _KIND.size] in _POSTED:
                        if reply[: _KIND.size] != _OK_KIND:  # nobody waits for it: say it here, once
                            self._posted_failed += 1
                            if self._posted_failed == 1:
                                log.warning(
                                    "posted request from pid %d failed: %r (further failures are counted)",
                                    self.info.pid,
                                    reply[_KIND.size :],
                                )
                        self._posted_done += 1
                        for dev in self._bells:
                            dev.posted_done(self._posted_done)
                        continue
                    if len(reply) > MAX_MESSAGE:  # the client would refuse it (and lose the request's result)
                        why = f"{_kind_name(data)}: reply of {len(reply)} bytes (limit {MAX_MESSAGE})"
                        reply, fds = _error(errno.EMSGSIZE, why), []
                try:
                    _send(self.sock, reply, fds)
                except OSError:
                    break
        finally:
            self.release()

    def release(self) -> None:
        """The client's exit: close its devices as the kernel does at exit (do_exit closes every
        fd; privcmd.c ``privcmd_release``, evtchn.c ``evtchn_release`` unbinding its ports).
        Its ioreq servers stay registered: Xen destroys a server only on request or with the
        domain (xen/common/ioreq.c ``ioreq_server_destroy``/``ioreq_server_destroy_all``)."""
        if not self._released:
            self._released = True
            log.info("mock-host: client pid %d uid %d disconnected", self.info.pid, self.info.uid)
        self.broken = True
        self._bells = []
        if self._posted_failed > 1:
            log.warning("%d more posted requests from pid %d failed", self._posted_failed - 1, self.info.pid)
        for handle in list(self.devices):
            dev = self.devices.pop(handle)
            try:
                dev.close()
            except Exception:
                log.exception("closing %s of pid %d", dev.path, self.info.pid)
        self.info.devices.clear()
        try:
            self.sock.close()
        finally:
            self.server._forget(self)

    def _handle(self, data: bytes, cred: tuple[int, int, int] | None) -> tuple[bytes, list[int]]:
        if len(data) < _KIND.size:
            return _error(errno.EPROTO, f"message of {len(data)} bytes has no kind"), []
        (kind,) = _KIND.unpack_from(data)
        body = data[_KIND.size :]
        handler = _HANDLERS.get(kind)
        if handler is None:
            return _error(errno.EPROTO, f"unknown request kind {kind}"), []
        self._copy_budget = MEMORY_TIMEOUT  # for every copy this request makes
        try:
            return handler(self, body, cred)
        except _Broken:
            raise
        except struct.error as e:
            return _error(errno.EPROTO, f"{Msg(kind).name}: malformed ({e})"), []
        except OSError as e:
            return _error(e.errno or errno.EIO, str(e)), []
        except Exception as e:  # a bug or bad input must not take the host down
            log.exception("request %s from pid %d", Msg(kind).name, self.info.pid)
            return _error(errno.EIO, f"{Msg(kind).name}: {type(e).__name__}: {e}"), []

    def _device(self, handle: int) -> Any:
        dev = self.devices.get(handle)
        if dev is None:
            raise OSError(errno.EBADF, f"no open device with handle {handle}")
        return dev

    def _ok(self, value: int = 0, data: bytes = b"") -> tuple[bytes, list[int]]:
        return _pack(Msg.OK, _OK.pack(value), data), []

    def _privileged(self, cred: tuple[int, int, int] | None) -> bool:
        uid = cred[1] if cred is not None else self.info.uid
        return uid in (0, os.geteuid())

    def _open(self, body: bytes, cred: tuple[int, int, int] | None) -> tuple[bytes, list[int]]:
        try:
            path = body.decode()
        except UnicodeDecodeError:
            return _error(errno.EINVAL, "OPEN: path is not UTF-8"), []
        if len(body) >= 4096:  # fs/namei.c getname_flags: PATH_MAX (4096) counts the NUL
            return _error(errno.ENAMETOOLONG, f"OPEN: path of {len(body)} bytes"), []
        # The device nodes are root's, mode 0600 (privcmd.c privcmd_dev and evtchn.c evtchn_miscdev
        # are misc devices with no .mode): open's inode_permission (fs/namei.c may_open) is checked
        # against the sender's uid of this message (SCM_CREDENTIALS), not the uid at connect time.
        if not self._privileged(cred):
            uid = cred[1] if cred else self.info.uid
            return _error(errno.EACCES, f"OPEN {path}: uid {uid} may not open it (root's device)"), []
        if len(self.devices) >= MAX_HANDLES:  # fs/file.c alloc_fd: EMFILE at RLIMIT_NOFILE (here a fixed bound)
            return _error(errno.EMFILE, f"OPEN {path}: {MAX_HANDLES} devices already open"), []
        dev = self.server.xen.open_device(path, memory=self.memory)
        fds: list[int] = []
        if isinstance(dev, MockEvtchnDevice):
            dev.nonblocking = True  # the host thread never sleeps for a client
            try:
                fds = [dev.fileno(), dev.share_ring()]  # the wake-up and the pending-port ring
                assert dev.doorbell is not None
                fds.append(dev.doorbell.fd)  # and the NOTIFY doorbell's eventfd
                dev.posted_done(self._posted_done)
            except BaseException:
                dev.close()
                raise
            self._bells.append(dev)
        handle, self._next_handle = self._next_handle, self._next_handle + 1
        self.devices[handle] = dev
        self.info.devices[handle] = path
        return _pack(Msg.OK, _OK.pack(handle)), fds

    def _ioctl_posted(self, body: bytes, cred: tuple[int, int, int] | None) -> tuple[bytes, list[int]]:
        """A posted ioctl: only an evtchn NOTIFY with its argument by value (nothing to
        copy from a client that is not waiting to answer).

        Departs from Linux, where the NOTIFY returns only once ``evtchn_ioctl`` (evtchn.c) has
        sent the event: its result depends only on the fd's own port table, which the client
        keeps (``RemoteEvtchn._bound``), so it answers itself and does not wait a round trip
        per access; the host runs it in order before the connection's next request, so no
        later call of that client can see it undone."""
        handle, request, by_address, _ = _IOCTL.unpack_from(body)
        dev = self._device(handle)
        if by_address or request != IOCTL_EVTCHN_NOTIFY or not isinstance(dev, MockEvtchnDevice):
            raise OSError(errno.EINVAL, f"IOCTL_POSTED: request {request:#x} cannot be posted")
        arg = body[_IOCTL.size :]
        if len(arg) != _NOTIFY_SIZE:
            raise OSError(errno.EINVAL, f"IOCTL_POSTED: NOTIFY argument of {len(arg)} bytes (want {_NOTIFY_SIZE})")
        # as the struct itself, the device's NOTIFY path reads its port with no copy or log rendering
        return self._ok(dev.ioctl(request, ioctl_evtchn_notify.from_buffer_copy(arg)))

    def _ioctl(self, body: bytes, cred: tuple[int, int, int] | None) -> tuple[bytes, list[int]]:
        handle, request, by_address, address = _IOCTL.unpack_from(body)
        arg_bytes = body[_IOCTL.size :]
        # Not a Linux rule (the kernel copies exactly the struct the request names): an argument
        # carried by value longer than any privcmd/evtchn struct is refused before it is copied.
        if len(arg_bytes) > MAX_ARG:
            return _error(errno.EINVAL, f"IOCTL: argument of {len(arg_bytes)} bytes (limit {MAX_ARG})"), []
        dev = self._device(handle)
        arg: Any = address if by_address else bytearray(arg_bytes)
        memory = self.memory
        memory.begin()
        try:
            try:
                self._read_ahead(dev, request, address if by_address else None, arg_bytes)
            except _Broken as e:  # it stalled or broke step: EFAULT, as its copy would, then cut off
                return _error(errno.EFAULT, f"IOCTL: {e.strerror}"), []
            rc = dev.ioctl(request, arg)  # the host lock is taken and released in here
        finally:
            memory.end()  # the writes it held, whether it succeeded or not (as copy_to_user did)
        return self._ok(rc, b"" if by_address else bytes(arg))

    def _read_ahead(self, dev: Any, request: int, address: int | None, arg_bytes: bytes) -> None:
        """Ask the client now, without the host lock, for what the ioctl will read: the same
        copies in the same order as the device's path (privcmd.c ``privcmd_ioctl_dm_op``,
        ``privcmd_ioctl_hypercall`` with Xen's ``do_dm_op``, ``privcmd_ioctl_mmap_batch``; any
        ioctl's argument).  A fault is recorded and met again where the device meets it."""
        memory = self.memory
        if address is not None:
            # the argument itself, as large as the request says (privcmd and evtchn copy their
            # struct in, MMAP_RESOURCE's size query copies ``num`` back out): read and pinned ahead
            size = min(_IOC_SIZE(request), MAX_ARG)
            if size and access_ok(address, size) and memory.prefetch(address, size) is not None:
                memory.prefetch_check(address, size)

        def argument(struct_type: Any) -> Any:
            size = ctypes.sizeof(struct_type)
            try:
                raw = memory.read(address, size) if address is not None else arg_bytes[:size]
            except OSError as e:
                if isinstance(e, _Broken):
                    raise
                return None  # a faulting argument: the device fails on it, nothing more to read ahead
            return struct_type.from_buffer_copy(raw) if len(raw) >= size else None

        def buffers(ubufs: int, num: int, limit: int) -> None:
            raw = memory.prefetch(ubufs, 16 * num)
            if raw is None:
                return
            for i in range(num):
                uptr, size = struct.unpack_from("<QQ", raw, 16 * i)
                if 0 < size <= limit and access_ok(uptr, size):
                    memory.prefetch_check(uptr, size)
                    memory.prefetch(uptr, size)

        if isinstance(dev, PrivcmdDevice):
            xen = self.server.xen
            if request == IOCTL_PRIVCMD_DM_OP:
                kdata = argument(privcmd_dm_op)
                if kdata is not None and 0 < kdata.num <= xen.dm_op_max_nr_bufs:
                    buffers(kdata.ubufs or 0, kdata.num, xen.dm_op_buf_max_size)
            elif request == IOCTL_PRIVCMD_HYPERCALL:
                call = argument(privcmd_hypercall)
                if call is not None and call.op == _HYPERVISOR_DM_OP and 0 < call.arg[1] <= xen.dm_op_max_nr_bufs:
                    buffers(int(call.arg[2]), int(call.arg[1]), _PREFETCH_BUF_MAX)
            elif request == IOCTL_PRIVCMD_MMAPBATCH_V2:
                m = argument(privcmd_mmapbatch_v2)
                if m is not None and m.num > 0:
                    for addr, n in gather_chunks(m.arr or 0, m.num):  # up to its first fault
                        if memory.prefetch(addr, n) is None:
                            break
                    if 8 * m.num <= GATHER_MAX:
                        memory.prefetch_check(m.err or 0, 4 * m.num)

    def _mmap(self, body: bytes, cred: tuple[int, int, int] | None) -> tuple[bytes, list[int]]:
        handle, addr, length, offset = _MMAP.unpack_from(body)
        dev = self._device(handle)
        if isinstance(dev, PrivcmdDevice):
            # privcmd.c privcmd_mmap ignores vm_pgoff (the VMA is filled by ioctls later), as the
            # in-process PrivcmdDevice.mmap does: any offset is accepted.
            # mm/mmap.c do_mmap: ENOMEM past sysctl_max_map_count mappings in one process; here the
            # VMAs this client announced and has not unmapped (each is a record the host keeps)
            mapped = sum(len(d._vmas) for d in self.devices.values() if isinstance(d, PrivcmdDevice))
            if mapped >= MAX_MAP_COUNT:
                raise OSError(errno.ENOMEM, f"MMAP: {mapped} privcmd mappings already (limit {MAX_MAP_COUNT})")
            dev.adopt_vma(addr, length)
        elif dev.path == HYPERCALL_PATH:
            # privcmd_buf_mmap (privcmd-buf.c): the client maps its own zeroed shared pages; any
            # offset is accepted (vm_map_pages_zero does not read vm_pgoff), as HypercallDevice.mmap
            if length <= 0:  # mm/mmap.c do_mmap
                raise OSError(errno.EINVAL, f"MMAP: length {length} on {dev.path}")
        else:
            dev.mmap(length, offset)  # evtchn has no .mmap: mm/mmap.c do_mmap's ENODEV
        return self._ok()

    def _munmap(self, body: bytes, cred: tuple[int, int, int] | None) -> tuple[bytes, list[int]]:
        handle, addr = _HANDLE_ADDR.unpack_from(body)
        dev = self._device(handle)
        if isinstance(dev, PrivcmdDevice):
            dev.release_vma(addr)
        return self._ok()

    def _read(self, body: bytes, cred: tuple[int, int, int] | None) -> tuple[bytes, list[int]]:
        handle, nbytes = _HANDLE_N.unpack_from(body)
        dev = self._device(handle)
        if not isinstance(dev, MockEvtchnDevice):  # no .read: fs/read_write.c vfs_read's EINVAL (!FMODE_CAN_READ)
            raise OSError(errno.EINVAL, f"READ: {dev.path} is not readable")
        # evtchn.c evtchn_read caps a read at PAGE_SIZE; a shared ring's device refuses (EINVAL):
        # its client reads the ring itself
        return self._ok(0, dev.read(min(nbytes, PAGE_SIZE)))

    def _write(self, body: bytes, cred: tuple[int, int, int] | None) -> tuple[bytes, list[int]]:
        (handle,) = _HANDLE.unpack_from(body)
        dev = self._device(handle)
        if not isinstance(dev, MockEvtchnDevice):  # no .write: fs/read_write.c vfs_write's EINVAL (!FMODE_CAN_WRITE)
            raise OSError(errno.EINVAL, f"WRITE: {dev.path} is not writable")
        return self._ok(dev.write(body[_HANDLE.size :]))  # evtchn.c evtchn_write, as WRITE_POSTED too

    def _kick(self, body: bytes, cred: tuple[int, int, int] | None) -> tuple[bytes, list[int]]:
        """The second half of an unmask the client did in the shared mask words (``evtchn_write``'s
        re-delivery of a port that fired while masked): no Linux call of its own, posted for the
        same reason as a NOTIFY (``_ioctl_posted``)."""
        (handle,) = _HANDLE.unpack_from(body)
        dev = self._device(handle)
        if not isinstance(dev, MockEvtchnDevice):
            raise OSError(errno.EINVAL, f"KICK_POSTED: {dev.path} is not an event channel")
        return self._ok(dev.kick(body[_HANDLE.size :]))

    def _close(self, body: bytes, cred: tuple[int, int, int] | None) -> tuple[bytes, list[int]]:
        """The last close of the fd: privcmd.c ``privcmd_release`` / evtchn.c ``evtchn_release``."""
        (handle,) = _HANDLE.unpack_from(body)
        dev = self._device(handle)
        del self.devices[handle]
        self.info.devices.pop(handle, None)
        if dev in self._bells:
            self._bells.remove(dev)
        dev.close()
        return self._ok()

    def _call(self, body: bytes, cred: tuple[int, int, int] | None) -> tuple[bytes, list[int]]:
        try:
            request = json.loads(body)
        except (ValueError, RecursionError) as e:
            return _error(errno.EINVAL, f"CALL: not JSON ({e})"), []
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return _error(errno.EINVAL, "CALL: want an object with a string 'op'"), []
        op, args = request["op"], request.get("args", {})
        entry = _CALLS.get(op)
        if entry is None:
            return _error(errno.EINVAL, f"CALL: unknown request {op!r}"[:200]), []
        if not isinstance(args, dict):
            return _error(errno.EINVAL, f"CALL {op}: 'args' must be an object"), []
        fn, mutates = entry
        if mutates and not self._privileged(cred):
            return _error(errno.EPERM, f"CALL {op}: only root or the host's user may do this"), []
        try:
            result: Any = {"ok": _jsonable(fn(self, **args))}
        except (TypeError, ValueError) as e:
            return _error(errno.EINVAL, f"CALL {op}: bad arguments ({e})"), []
        except LookupError as e:
            return _error(errno.ESRCH, f"CALL {op}: {e}"), []
        except _GuestRaised as e:
            result = e.reply
        return self._ok(0, json.dumps(result).encode())

    # --- admin and guest requests -------------------------------------------------------

    def _guest(self, domid: int, timeout: float) -> Any:
        from ..simguest import SimGuest

        guest = self._guests.get(domid)
        if guest is None:
            self.server.xen.domain(domid)  # LookupError for a domain that does not exist
            guest = self._guests[domid] = SimGuest(self.server.xen, domid, timeout=timeout)
        guest.timeout = timeout  # only this connection's thread uses it
        return guest


_HANDLERS: dict[int, Callable[[_Connection, bytes, Any], tuple[bytes, list[int]]]] = {
    Msg.OPEN: _Connection._open,
    Msg.IOCTL: _Connection._ioctl,
    Msg.MMAP: _Connection._mmap,
    Msg.MUNMAP: _Connection._munmap,
    Msg.READ: _Connection._read,
    Msg.WRITE: _Connection._write,
    Msg.WRITE_POSTED: _Connection._write,
    Msg.IOCTL_POSTED: _Connection._ioctl_posted,
    Msg.KICK_POSTED: _Connection._kick,
    Msg.CLOSE: _Connection._close,
    Msg.CALL: _Connection._call,
}


class MockHostServer:
    """Serve ``xen`` (a ``MockXen``) on a unix seqpacket socket at ``socket_path``.

    The socket is created with ``mode`` (0600: only its owner may connect; a
    deprivileged device model running as another uid needs a wider mode or a chown).
    ``start()`` accepts in a background thread; ``serve_forever()`` in the calling
    one until ``stop()`` (safe from a signal handler).  ``close()`` disconnects every
    client (closing its devices), removes the socket and leaves ``xen`` to its owner.
    """

    def __init__(self, xen: Any, socket_path: str, *, mode: int = 0o600, backlog: int = 16) -> None:
        self.xen = xen
        self.path = os.fspath(socket_path)
        self.closing = False
        # Lock order, host side (outermost first):
        #   1. a SimGuest's per-vCPU lock (a guest request: one vCPU's access at a time)
        #   2. ``xen.lock``, the host lock (an RLock; an evtchn fd's Condition is built on it),
        #      held across a whole ioctl, including the copy requests to its client
        #   3. leaves, taken with nothing acquired under them: this ``_lock`` (the connection
        #      list), an ioreq server's ``_notify_fds_lock``
        # A connection has no lock (its thread alone touches its state), so no per-connection
        # lock can invert with the host lock.  ``_lock`` is never held across a send, a join or
        # ``xen.lock``; ``close`` copies the list and works on the copy.
        # Client side (``RemoteXen``): ``RemoteEvtchn._cons_lock`` before ``RemoteXen._lock``;
        # nothing takes ``_cons_lock`` while holding ``RemoteXen._lock``.
        self._lock = threading.Lock()
        self._conns: list[_Connection] = []
        self._accept_failing = False
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            old = os.umask(0o777 & ~mode)  # no window in which the socket is wider than asked
            try:
                self._listener.bind(self.path)
            finally:
                os.umask(old)
            os.chmod(self.path, mode)
            # Set on the listener, so accepted sockets inherit it (unix_sock_inherit_flags): set after
            # accept(), a message sent in between would carry no credentials (read back as nobody).
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self._listener.listen(backlog)
        except BaseException:
            self._listener.close()
            os.close(self._wake)
            raise

    def start(self) -> MockHostServer:
        """Accept clients in a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="mock-host accept", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Accept clients (one thread each) until ``stop()``."""
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake, selectors.EVENT_READ)
        try:
            while not self.closing:
                for key, _ in sel.select():
                    if key.fileobj is self._listener and not self.closing:
                        self._accept()
        finally:
            sel.close()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except OSError as e:
            # Out of fds (EMFILE/ENFILE) or memory: the connection stays queued and the listener
            # stays readable, so wait a little (or for stop()) instead of spinning on select.
            if not self._accept_failing:  # once per streak: it may last
                log.warning("mock-host: accept failed (%s); retrying every 0.1 s", e.strerror or e)
                self._accept_failing = True
            _readable(self._wake, 0.1)
            return
        self._accept_failing = False
        if len(self.clients()) >= MAX_CLIENTS:
            log.warning("mock-host: %d clients already; a new connection is closed", MAX_CLIENTS)
            sock.close()
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the sender's ids on every message
            conn = _Connection(self, sock)
        except OSError as e:
            log.warning("mock-host: dropping a new connection: %s", e.strerror or e)
            sock.close()
            return
        same_uid = sum(c.info.uid == conn.info.uid for c in self.clients())
        if same_uid >= min(MAX_CLIENTS_PER_UID, MAX_CLIENTS):
            log.warning("mock-host: uid %d has %d clients already; a new connection is closed", conn.info.uid, same_uid)
            sock.close()
            return
        with self._lock:
            self._conns.append(conn)
        try:
            conn.thread.start()
        except RuntimeError:  # no thread to serve it: the host goes on without this client
            log.exception("mock-host: cannot serve client pid %d", conn.info.pid)
            conn.release()
            return
        log.info("mock-host: client pid %d uid %d connected", conn.info.pid, conn.info.uid)

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            if conn in self._conns:
                self._conns.remove(conn)

    def clients(self) -> list[_Connection]:
        with self._lock:
            return list(self._conns)

    def stop(self) -> None:
        """Stop accepting (async-signal-safe: a flag and an eventfd write)."""
        self.closing = True
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            pass  # already closed: nothing left to wake

    def close(self) -> None:
        """Stop, disconnect every client (their devices close), remove the socket.

        Every connection's socket is shut down first (a thread in recv, send or a copy
        request wakes at once), then all threads are joined within one ``MEMORY_TIMEOUT + 1``
        deadline; one still busy then (a guest request waiting for its device model) is a
        daemon thread and does not hold the process's exit."""
        if self._listener.fileno() < 0:
            return
        self.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        self._listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        conns = self.clients()
        for conn in conns:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)  # its thread sees EOF and releases its devices
            except OSError:
                pass
        deadline = time.monotonic() + MEMORY_TIMEOUT + 1
        for conn in conns:
            if conn.thread.is_alive() and conn.thread is not threading.current_thread():
                conn.thread.join(max(0.0, deadline - time.monotonic()))
        late = [c.info.pid for c in conns if c.thread.is_alive()]
        if late:
            log.warning("mock-host: closing with requests of pids %s still running", late)
        os.close(self._wake)

    def __enter__(self) -> MockHostServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
