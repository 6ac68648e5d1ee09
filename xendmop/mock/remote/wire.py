"""The mock host's wire format: message kinds, their ``struct`` layouts, framing over a
``SOCK_SEQPACKET`` socket with fds, and the bounds both sides share.

The protocol is described in ``docs/mock-host-protocol.md``.
"""

from __future__ import annotations

import array
import ctypes
import errno
import math
import os
import select
import socket
import struct
from collections.abc import Sequence
from enum import IntEnum
from typing import Any

from ...abi.evtchn import (
    ioctl_evtchn_notify,
)

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
#: the longest ioctl argument carried by value (the largest privcmd/evtchn struct is far smaller)
MAX_ARG = 4096

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
