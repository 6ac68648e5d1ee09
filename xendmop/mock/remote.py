"""The mock Xen as a separate host process, and the clients that reach it over a socket.

``MockHostServer(xen, path)`` serves one ``MockXen`` on a unix ``SOCK_SEQPACKET``
socket (``xendmop mock-host --socket PATH``); ``RemoteXen(path)`` (or
``connect_from_env()``, which reads ``XENDMOP_MOCK_SOCKET``) opens its devices from
another process, so a device model and a guest can live in different processes:

- ``RemoteXen.open_device(path)`` gives ``Device``-protocol objects
  (``ioctl``/``mmap``/``fileno``/``read``/``write``/``close``), usable as
  ``DeviceModel.open("mock", xen=remote)`` and ``IoreqServer(dm, domid, opener=remote.open_device)``.
- Requests are carried as the kernel would copy them: an ioctl sends its argument
  bytes (or the user address it was given); while it is in flight the host's device
  reaches the caller's memory (the dm_op buffer array, the buffers, MMAPBATCH arrays)
  through ``copy_from_user``/``copy_to_user`` requests that the client answers from
  its own memory with ``usermem.UserMemory`` (a bad pointer is EFAULT, never a
  crash), then the client gets ``(result, updated argument bytes)`` or the errno.
  No ``process_vm_readv`` of another pid: that would need ptrace rights over a
  deprivileged device model.
- Pages and event channels are real file descriptors: MMAP_RESOURCE/MMAPBATCH send
  ``(addr, fd, offset)`` remap instructions with the memfds (``SCM_RIGHTS``) and the
  client remaps them over its privcmd VMA before the ioctl returns, so its mmap and
  the host's view of the ioreq page or guest RAM are the same physical memory; an
  evtchn open passes the device's eventfd, so the client's ``fileno()`` is a real fd
  for ``select``/``add_reader``, and the memfd of its pending-port ring
  (``evtchn.SharedPortRing``), so the client's ``read`` takes the ports from its own
  mapping with no request, as Linux's ``evtchn_read`` copies them out of the fd's ring.
- A connection that closes (client exit, crash, SIGKILL) closes its devices as the
  kernel does at process exit (``privcmd_release``/``evtchn_release``): event channels
  are unbound, ioreq servers stay registered, as on Xen.
- Admin requests (create/destroy a domain, server list, domain snapshot, GSI level,
  the event log) and a guest's accesses (``RemoteGuest``: a ``SimGuest`` run by the host
  thread serving that connection) are a small JSON RPC with a fixed table of requests.

The socket is a trust boundary: every message is parsed with ``struct``/``json``,
sizes are bounded before anything is allocated for them (a message and a reply:
``MAX_MESSAGE``; an ioctl argument: ``MAX_ARG``; one copy from or to the client's memory:
``MAX_COPY``; open devices: ``MAX_HANDLES``; privcmd mappings: ``MAX_MAP_COUNT``; clients:
``MAX_CLIENTS``, of one uid ``MAX_CLIENTS_PER_UID``), unknown requests are refused with an
error naming them, fds a client sends are dropped, a client that has taken ``MEMORY_TIMEOUT``
in all to answer the memory requests of its ioctl gets EFAULT and is disconnected, as is one
that leaves its replies unread that long, and a connection holding no device that sends
nothing for ``IDLE_TIMEOUT`` is closed.  An ioctl's copies are read ahead of the host lock and
its writes sent after it (``_ClientMemory``): one client's stall holds up nobody else.  Opening a device needs the
sender's uid to be root or the host's own (``SCM_CREDENTIALS``, checked at every open):
the device nodes are root's, so a device model that dropped privileges keeps its
handles but cannot open new ones.  Admin and guest requests that change state need the
same uid.

Wire format: one datagram per message, ``<H`` kind then a payload per kind (``Msg``).
Every request is answered, except the two a device model makes on every access whose
result the client knows without the host: an evtchn unmask (``WRITE_POSTED``) and a
NOTIFY on a port the fd bound (``IOCTL_POSTED``).  They are sent without waiting; the
host handles them in order before the connection's next request, and logs a failure.
The third per-access call, the evtchn ``read``, sends nothing: the ring is shared.  With
libatomic on both sides the unmask sends nothing either: it clears the port's mask word in
the same memfd, and only a port that fired while masked is sent (``KICK_POSTED``).  An
unmask that follows a posted NOTIFY able to raise a dom0 port is still sent as
``WRITE_POSTED``, so it cannot overtake that NOTIFY.  While a vCPU of the host waits for the
NOTIFY of a port, the NOTIFY sends nothing either: the client queues the port in a second ring
of the memfd and writes an eventfd (the doorbell, ``evtchn.Doorbell``) that the waiting vCPU
thread watches and answers with the device's NOTIFY rules; the connection's thread takes what
is queued there before each message, so no later request overtakes it.

Guest requests run ``xendmop.mock.simguest.SimGuest`` in the host; that module is
imported only when the first one arrives.
"""

from __future__ import annotations

import array
import ctypes
import dataclasses
import errno
import json
import logging
import math
import mmap
import os
import re
import select
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Any

from ..abi.evtchn import (
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
from ..abi.ioctl import _IOC_SIZE
from ..abi.privcmd import (
    IOCTL_PRIVCMD_DM_OP,
    IOCTL_PRIVCMD_HYPERCALL,
    IOCTL_PRIVCMD_MMAPBATCH_V2,
    privcmd_dm_op,
    privcmd_hypercall,
    privcmd_mmapbatch_v2,
)
from ..abi.xen import __HYPERVISOR_dm_op as _HYPERVISOR_DM_OP
from .evtchn import (
    DOORBELL_BROKEN,
    DOORBELL_CAPACITY,
    DOORBELL_CONS,
    DOORBELL_ENTRIES,
    DOORBELL_POSTED_DONE,
    DOORBELL_PROD,
    DOORBELL_WANTED,
    EVTCHN_PATH,
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
    EvtchnDevice,
    PortMaskWords,
)
from .privcmd import GATHER_MAX, HYPERCALL_PATH, PRIVCMD_PATH, PrivcmdDevice, gather_chunks
from .state import NR_EVTCHN_PORTS
from .usermem import PAGE_SIZE, UserMemory, access_ok, remap

__all__ = [
    "ENV_SOCKET",
    "IDLE_TIMEOUT",
    "MAX_CLIENTS",
    "MAX_CLIENTS_PER_UID",
    "MAX_COPY",
    "MAX_MAP_COUNT",
    "MAX_MESSAGE",
    "MEMORY_TIMEOUT",
    "MockHostError",
    "MockHostServer",
    "Msg",
    "RemoteGuest",
    "RemoteXen",
    "connect_from_env",
]

log = logging.getLogger("xendmop.mock.remote")

#: the environment variable clients read to find the host
ENV_SOCKET = "XENDMOP_MOCK_SOCKET"
#: the largest datagram either side accepts (a longer one is refused, never truncated silently)
MAX_MESSAGE = 64 * 1024
#: bytes per copy_{from,to}_user request (fits one datagram with its header)
_CHUNK = 32 * 1024
#: pages per remap instruction message
_REMAP_BATCH = 2048
#: fds one message may carry (remap memfds, an eventfd)
_MAX_FDS = 16
#: seconds the host waits for a client to answer a memory request during its ioctl
MEMORY_TIMEOUT = 5.0
#: open devices per connection
MAX_HANDLES = 256
#: the longest ioctl argument carried by value (the largest privcmd/evtchn struct is far smaller)
MAX_ARG = 4096
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

_KIND = struct.Struct("<H")
_IOCTL = struct.Struct("<IIBQ")  # handle, request, arg is an address (1) or bytes (0), address
_MMAP = struct.Struct("<IQQQ")  # handle, addr, length, offset
_HANDLE_ADDR = struct.Struct("<IQ")  # handle, addr (MUNMAP)
_HANDLE_N = struct.Struct("<II")  # handle, nbytes (READ)
_HANDLE = struct.Struct("<I")  # CLOSE, WRITE (data follows)
_OK = struct.Struct("<q")  # value, data follows
_ERROR = struct.Struct("<i")  # errno, message follows
_ADDR_N = struct.Struct("<QQ")  # MEM_READ, MEM_CHECK
_ADDR = struct.Struct("<Q")  # MEM_WRITE, data follows
_REMAP_HEAD = struct.Struct("<I")
_REMAP_PAGE = struct.Struct("<QIQ")  # addr, index into the fds, offset
_UCRED = struct.Struct("<iII")  # pid, uid, gid


class Msg(IntEnum):
    """Message kinds (client → host below 100, host → client from 100)."""

    OPEN = 1  # path
    IOCTL = 2  # _IOCTL + argument bytes
    MMAP = 3  # _MMAP: the client made an anonymous shared VMA for this device
    MUNMAP = 4  # _HANDLE_ADDR: the client unmapped it
    READ = 5  # _HANDLE_N (refused for evtchn: its client reads the shared ring)
    WRITE = 6  # _HANDLE + data
    CLOSE = 7  # _HANDLE
    CALL = 8  # JSON {"op": name, "args": {...}}
    MEM_REPLY = 9  # _ERROR (0 = done) + data read
    WRITE_POSTED = 10  # _HANDLE + data, like WRITE but answered with nothing (an evtchn unmask)
    IOCTL_POSTED = 11  # like IOCTL (argument by value), answered with nothing (an evtchn notify)
    KICK_POSTED = 12  # _HANDLE + ports: unmasked in the shared ring, fired meanwhile; answered with nothing
    OK = 100  # _OK + data (+ fds)
    ERROR = 101  # _ERROR + utf-8 message
    MEM_READ = 102  # copy_from_user
    MEM_WRITE = 103  # copy_to_user
    MEM_CHECK = 104  # pin_user_pages(FOLL_WRITE)
    MEM_REMAP = 105  # remap_pfn_range, fds attached


class MockHostError(RuntimeError):
    """The host refused or failed a request in a way that has no errno (protocol, admin)."""


class _Broken(OSError):
    """The peer broke the protocol or went away mid-transaction."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.EFAULT, f"{os.strerror(errno.EFAULT)}: {why}")


class _TooLong(_Broken):
    """A datagram longer than ``MAX_MESSAGE`` (already consumed: the connection can go on)."""


_POSTED = (_KIND.pack(Msg.WRITE_POSTED), _KIND.pack(Msg.IOCTL_POSTED), _KIND.pack(Msg.KICK_POSTED))
_NOTIFY_SIZE = ctypes.sizeof(ioctl_evtchn_notify)
_OK_KIND = _KIND.pack(Msg.OK)


def _pack(kind: Msg, *parts: bytes) -> bytes:
    return _KIND.pack(kind) + b"".join(parts)


def _error(err: int, message: str = "") -> bytes:
    return _pack(Msg.ERROR, _ERROR.pack(err), message.encode()[:1024])


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


def _recv(sock: socket.socket, *, want_fds: bool = False) -> tuple[bytes, list[int], tuple[int, int, int] | None]:
    """One datagram: ``(data, fds, (pid, uid, gid) of the sender if the socket passes credentials)``.

    Raises ``_Broken`` for end of file or a datagram longer than ``MAX_MESSAGE``.
    Fds are kept only when ``want_fds`` (the host never takes a client's fds).
    """
    anc = socket.CMSG_SPACE(_UCRED.size) + (socket.CMSG_SPACE(_MAX_FDS * 4) if want_fds else 0)
    data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE + 1, anc)
    fds: list[int] = []
    cred = None
    for level, ctype, cdata in ancdata:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(cdata[: len(cdata) - len(cdata) % 4])
            fds.extend(got)
        elif level == socket.SOL_SOCKET and ctype == socket.SCM_CREDENTIALS and len(cdata) >= _UCRED.size:
            cred = _UCRED.unpack_from(cdata)
    if not want_fds:
        _close_fds(fds)
        fds = []
    if not data:
        _close_fds(fds)
        raise _Broken("connection closed")
    if len(data) > MAX_MESSAGE:
        _close_fds(fds)
        raise _TooLong(f"message longer than {MAX_MESSAGE} bytes")
    if want_fds and flags & socket.MSG_CTRUNC:
        _close_fds(fds)
        raise _Broken(f"message with more than {_MAX_FDS} fds")
    return data, fds, cred


def _readable(fd: int, timeout: float | None) -> bool:
    """``fd`` is readable (or at end of file) within ``timeout`` seconds (None: no limit).

    ``poll``, not ``select.select``: select refuses an fd past ``FD_SETSIZE`` (1024, ValueError),
    and a host serving many clients and devices, or a device model with many fds, reaches it."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0, math.ceil(timeout * 1000))))


def _send(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
    else:
        sock.sendall(data)


def _kind_name(data: bytes) -> str:
    """The request kind of a message, for an error (a number when unknown)."""
    kind = _KIND.unpack_from(data)[0] if len(data) >= _KIND.size else -1
    return Msg(kind).name if kind in Msg._value2member_map_ else f"kind {kind}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


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
        self._bells: list[EvtchnDevice] = []
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
        if isinstance(dev, EvtchnDevice):
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
        if by_address or request != IOCTL_EVTCHN_NOTIFY or not isinstance(dev, EvtchnDevice):
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
        if not isinstance(dev, EvtchnDevice):  # no .read: fs/read_write.c vfs_read's EINVAL (!FMODE_CAN_READ)
            raise OSError(errno.EINVAL, f"READ: {dev.path} is not readable")
        # evtchn.c evtchn_read caps a read at PAGE_SIZE; a shared ring's device refuses (EINVAL):
        # its client reads the ring itself
        return self._ok(0, dev.read(min(nbytes, PAGE_SIZE)))

    def _write(self, body: bytes, cred: tuple[int, int, int] | None) -> tuple[bytes, list[int]]:
        (handle,) = _HANDLE.unpack_from(body)
        dev = self._device(handle)
        if not isinstance(dev, EvtchnDevice):  # no .write: fs/read_write.c vfs_write's EINVAL (!FMODE_CAN_WRITE)
            raise OSError(errno.EINVAL, f"WRITE: {dev.path} is not writable")
        return self._ok(dev.write(body[_HANDLE.size :]))  # evtchn.c evtchn_write, as WRITE_POSTED too

    def _kick(self, body: bytes, cred: tuple[int, int, int] | None) -> tuple[bytes, list[int]]:
        """The second half of an unmask the client did in the shared mask words (``evtchn_write``'s
        re-delivery of a port that fired while masked): no Linux call of its own, posted for the
        same reason as a NOTIFY (``_ioctl_posted``)."""
        (handle,) = _HANDLE.unpack_from(body)
        dev = self._device(handle)
        if not isinstance(dev, EvtchnDevice):
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
        from .simguest import SimGuest

        guest = self._guests.get(domid)
        if guest is None:
            self.server.xen.domain(domid)  # LookupError for a domain that does not exist
            guest = self._guests[domid] = SimGuest(self.server.xen, domid, timeout=timeout)
        guest.timeout = timeout  # only this connection's thread uses it
        return guest


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
    from .simguest import GuestCrash, GuestTimeout

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
    from ..abi.ioreq_slot import Ioreq
    from .simguest import GuestCrash, GuestTimeout

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


class RemoteGuest:
    """A guest's vCPUs driven from this process, run by the host (``SimGuest`` there).

    Same methods as ``xendmop.mock.simguest.SimGuest``; ``GuestTimeout`` and
    ``GuestCrash`` come back as themselves, naming the vCPU and the ioreq.
    """

    def __init__(self, socket_path: str | RemoteXen, domid: int, *, timeout: float = 5.0) -> None:
        self.xen = socket_path if isinstance(socket_path, RemoteXen) else RemoteXen(socket_path)
        self.domid = domid
        self.timeout = timeout

    def _do(self, method: str, *args: int, data: bytes | None = None, **kw: Any) -> Any:
        extra: dict[str, Any] = {"data": data.hex()} if data is not None else {}
        return self.xen.call(
            "guest", domid=self.domid, method=method, args=list(args), kwargs=kw, timeout=self.timeout, **extra
        )

    def outb(self, port: int, value: int, vcpu: int = 0) -> None:
        self._do("outb", port, value, vcpu=vcpu)

    def outw(self, port: int, value: int, vcpu: int = 0) -> None:
        self._do("outw", port, value, vcpu=vcpu)

    def outl(self, port: int, value: int, vcpu: int = 0) -> None:
        self._do("outl", port, value, vcpu=vcpu)

    def inb(self, port: int, vcpu: int = 0) -> int:
        return int(self._do("inb", port, vcpu=vcpu))

    def inw(self, port: int, vcpu: int = 0) -> int:
        return int(self._do("inw", port, vcpu=vcpu))

    def inl(self, port: int, vcpu: int = 0) -> int:
        return int(self._do("inl", port, vcpu=vcpu))

    def mmio_read(self, addr: int, size: int, vcpu: int = 0) -> int:
        return int(self._do("mmio_read", addr, size, vcpu=vcpu))

    def mmio_write(self, addr: int, size: int, value: int, vcpu: int = 0) -> None:
        self._do("mmio_write", addr, size, value, vcpu=vcpu)

    def pci_config_read(self, sbdf: int, reg: int, size: int, vcpu: int = 0) -> int:
        return int(self._do("pci_config_read", sbdf, reg, size, vcpu=vcpu))

    def pci_config_write(self, sbdf: int, reg: int, size: int, value: int, vcpu: int = 0) -> None:
        self._do("pci_config_write", sbdf, reg, size, value, vcpu=vcpu)

    def rep_outsb(self, port: int, gpa: int, count: int, *, df: bool = False, vcpu: int = 0) -> None:
        self._do("rep_outsb", port, gpa, count, df=df, vcpu=vcpu)

    def rep_insb(self, port: int, gpa: int, count: int, *, df: bool = False, vcpu: int = 0) -> None:
        self._do("rep_insb", port, gpa, count, df=df, vcpu=vcpu)

    def rep_movs_to_mmio(self, addr: int, gpa: int, size: int, count: int, *, df: bool = False, vcpu: int = 0) -> None:
        self._do("rep_movs_to_mmio", addr, gpa, size, count, df=df, vcpu=vcpu)

    def send_buffered(self, type: int, addr: int, size: int, data: int) -> bool:
        return bool(self._do("send_buffered", type, addr, size, data))

    def write_ram(self, gpa: int, data: bytes) -> None:
        self._do("write_ram", gpa, data=bytes(data))

    def read_ram(self, gpa: int, n: int) -> bytes:
        return bytes.fromhex(self._do("read_ram", gpa, n))

    def close(self) -> None:
        self.xen.close()

    def __enter__(self) -> RemoteGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _address_of(mapping: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # release the export so the mapping can still be closed
