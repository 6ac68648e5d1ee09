"""Classify open file descriptors and prove privcmd/evtchn restriction by trying them.

Shared by ``restrict_all`` (auditing this process) and ``depriv-check`` (auditing
another process through ``pidfd_getfd``).

Every probe is chosen so that it has **no side effect whether or not the fd is
restricted**, and so that a restricted and an unrestricted fd answer with
*different* errnos (the kernel checks the restriction before doing anything):

``privcmd`` (Linux ``drivers/xen/privcmd.c``)
    1. ``IOCTL_PRIVCMD_DM_OP {dom=DOMID_INVALID, num=0}``: a restricted fd gives
       ``EPERM`` (the domid check comes before the ``num == 0`` shortcut); an
       unrestricted fd returns 0 without calling Xen (the same empty call
       ``xendevicemodel_open`` uses as a probe).  ``DOMID_INVALID`` can never be a
       restriction target (restricting to it leaves the fd unrestricted), so it is
       "another domain" for every restricted fd.  ``ENOTTY``/``EINVAL``: the
       kernel lacks DM_OP, so nothing is proven by this probe.
    2. ``IOCTL_PRIVCMD_HYPERCALL`` of ``xen_version(XENVER_version, NULL)``: a
       restricted fd gives ``EPERM`` for every hypercall; an unrestricted one
       returns Xen's version (a read-only hypercall).
    3. Only when the expected target is known: ``DM_OP {dom=target, num=0}``
       returns 0 when the fd is restricted to the target and ``EPERM`` when it is
       restricted to some other domain; no hypercall is made either way.

``evtchn`` (Linux ``drivers/xen/evtchn.c``, Xen ``common/event_channel.c``)
    ``IOCTL_EVTCHN_BIND_INTERDOMAIN {remote_domain=DOMID_INVALID, remote_port=0}``:
    a restricted fd gives ``EACCES`` before any hypercall; on an unrestricted fd
    Xen looks the remote domain up first and answers ``ESRCH``, before allocating
    a local port.  Should a port ever be bound (it cannot be), it is unbound at
    once and the fd reported unrestricted.  Which domain an evtchn fd is
    restricted to cannot be learnt without side effects, so it is not checked.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..abi.evtchn import (
    EVTCHN_PATH,
    IOCTL_EVTCHN_BIND_INTERDOMAIN,
    IOCTL_EVTCHN_UNBIND,
    ioctl_evtchn_bind_interdomain,
    ioctl_evtchn_unbind,
)
from ..abi.privcmd import (
    HYPERCALL_PATH,
    IOCTL_PRIVCMD_DM_OP,
    IOCTL_PRIVCMD_HYPERCALL,
    PRIVCMD_PATH,
    privcmd_dm_op,
    privcmd_hypercall,
)
from ..abi.xen import DOMID_INVALID

__all__ = [
    "DEVICE_PATHS",
    "FdInfo",
    "FdKind",
    "ProbeResult",
    "Verdict",
    "classify_fd",
    "device_table",
    "list_fds",
    "pidfd_getfd",
    "pidfd_open",
    "probe",
    "probe_evtchn",
    "probe_privcmd",
]

# xen/include/public/xen.h and public/version.h (not mirrored in abi/ yet)
__HYPERVISOR_xen_version = 17
XENVER_version = 0

# Linux: the syscall numbers are the same on every architecture (unified table, ≥ 5.1)
SYS_pidfd_open = 434
SYS_pidfd_getfd = 438

Ioctl = Callable[[int, int, Any], int]


class FdKind(enum.Enum):
    PRIVCMD = "privcmd"
    EVTCHN = "evtchn"
    HYPERCALL = "hypercall"
    GNTDEV = "gntdev"
    GNTALLOC = "gntalloc"
    XENBUS = "xenbus"
    TAP = "tap"
    DEVNULL = "devnull"
    CHARDEV = "chardev"
    BLOCKDEV = "blockdev"
    MEMFD = "memfd"
    REGULAR = "regular"
    DIRECTORY = "directory"
    SOCKET = "socket"
    PIPE = "pipe"
    EVENTFD = "eventfd"
    ANON = "anon_inode"
    OTHER = "other"


#: well-known device paths; matched by device number first, so a node with
#: another name (made inside a chroot) is still recognised
DEVICE_PATHS: Mapping[str, FdKind] = {
    PRIVCMD_PATH: FdKind.PRIVCMD,
    "/proc/xen/privcmd": FdKind.PRIVCMD,
    EVTCHN_PATH: FdKind.EVTCHN,
    HYPERCALL_PATH: FdKind.HYPERCALL,
    "/dev/xen/gntdev": FdKind.GNTDEV,
    "/dev/xen/gntalloc": FdKind.GNTALLOC,
    "/dev/xen/xenbus": FdKind.XENBUS,
    "/dev/xen/xenbus_backend": FdKind.XENBUS,
    "/proc/xen/xenbus": FdKind.XENBUS,
    "/dev/net/tun": FdKind.TAP,
    "/dev/null": FdKind.DEVNULL,
}


def device_table(paths: Mapping[str, FdKind] = DEVICE_PATHS) -> dict[int, FdKind]:
    """``st_rdev -> kind`` for each of ``paths`` that is a character device on this host."""
    table: dict[int, FdKind] = {}
    for path, kind in paths.items():
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode):
            table.setdefault(st.st_rdev, kind)
    return table


@dataclass
class FdInfo:
    """One open fd of a process, as /proc shows it."""

    fd: int
    target: str
    kind: FdKind
    flags: int | None = None  # open flags from fdinfo (octal there)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def access(self) -> str | None:
        if self.flags is None:
            return None
        return {os.O_RDONLY: "r", os.O_WRONLY: "w", os.O_RDWR: "rw"}.get(self.flags & os.O_ACCMODE, "?") + (
            "a" if self.flags & os.O_APPEND else ""
        )


def classify_fd(target: str, st: os.stat_result | None, devices: Mapping[int, FdKind]) -> FdKind:
    """The kind of an fd from its ``/proc/PID/fd`` link text and ``stat`` (``None``: unknown)."""
    if st is not None and stat.S_ISCHR(st.st_mode) and st.st_rdev in devices:
        return devices[st.st_rdev]
    if target in DEVICE_PATHS:
        return DEVICE_PATHS[target]
    if target.startswith("socket:"):
        return FdKind.SOCKET
    if target.startswith("pipe:"):
        return FdKind.PIPE
    if target == "anon_inode:[eventfd]":
        return FdKind.EVENTFD
    if target.startswith("anon_inode:"):
        return FdKind.ANON
    if target.startswith("/memfd:"):
        return FdKind.MEMFD
    if st is None:
        return FdKind.OTHER
    if stat.S_ISCHR(st.st_mode):
        return FdKind.CHARDEV
    if stat.S_ISBLK(st.st_mode):
        return FdKind.BLOCKDEV
    if stat.S_ISDIR(st.st_mode):
        return FdKind.DIRECTORY
    if stat.S_ISREG(st.st_mode):
        return FdKind.REGULAR
    if stat.S_ISSOCK(st.st_mode):
        return FdKind.SOCKET
    if stat.S_ISFIFO(st.st_mode):
        return FdKind.PIPE
    return FdKind.OTHER


def _fdinfo(proc: str, fd: int) -> tuple[int | None, dict[str, str]]:
    try:
        with open(f"{proc}/fdinfo/{fd}") as f:
            lines = f.read().splitlines()
    except OSError:
        return None, {}
    flags: int | None = None
    extra: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        value = value.strip()
        if key == "flags":
            flags = int(value, 8)
        elif key in ("iff", "eventfd-count", "tfd", "Pid"):
            extra[key] = value
    return flags, extra


def list_fds(pid: int | str = "self", devices: Mapping[int, FdKind] | None = None) -> list[FdInfo]:
    """Every open fd of ``pid`` (``"self"``: this process), classified.

    Raises ``OSError`` when ``/proc/PID/fd`` cannot be read (no such process, or no
    permission: reading another user's fds needs root or ptrace rights)."""
    table = device_table() if devices is None else devices
    proc = f"/proc/{pid}"
    result = []
    for name in os.listdir(f"{proc}/fd"):
        fd = int(name)
        try:
            target = os.readlink(f"{proc}/fd/{fd}")
        except OSError:  # closed meanwhile (e.g. the fd listdir itself used)
            continue
        try:
            st: os.stat_result | None = os.stat(f"{proc}/fd/{fd}")
        except OSError:
            st = None
        flags, extra = _fdinfo(proc, fd)
        result.append(FdInfo(fd, target, classify_fd(target, st, table), flags, extra))
    return sorted(result, key=lambda i: i.fd)


# --- probes ---------------------------------------------------------------------------------


class Verdict(enum.Enum):
    RESTRICTED = "restricted"
    UNRESTRICTED = "unrestricted"
    WRONG_DOMAIN = "restricted to another domain"
    UNKNOWN = "unknown"


@dataclass
class ProbeResult:
    kind: FdKind
    verdict: Verdict
    #: each call made, as ``(what, result)``: an errno name or ``"returned N"``
    calls: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.RESTRICTED

    def describe(self) -> str:
        return f"{self.verdict.value}: " + "; ".join(f"{what} -> {res}" for what, res in self.calls)


def _ioctl(fd: int, request: int, arg: Any) -> int:
    return int(fcntl.ioctl(fd, request, arg, True))


def _try(ioctl: Ioctl, fd: int, request: int, arg: Any) -> tuple[int, int]:
    """``(errno, 0)`` on failure, ``(0, result)`` on success."""
    try:
        return 0, ioctl(fd, request, arg)
    except OSError as e:
        return e.errno or errno.EIO, 0


def _show(err: int, result: int) -> str:
    return errno.errorcode.get(err, str(err)) if err else f"returned {result}"


def probe_privcmd(fd: int, target: int | None = None, ioctl: Ioctl = _ioctl) -> ProbeResult:
    """Is privcmd ``fd`` restricted (to ``target``, when given)?  See the module doc."""
    res = ProbeResult(FdKind.PRIVCMD, Verdict.UNKNOWN)
    err, rc = _try(ioctl, fd, IOCTL_PRIVCMD_DM_OP, privcmd_dm_op(dom=DOMID_INVALID, num=0, ubufs=None))
    res.calls.append(("DM_OP(dom=DOMID_INVALID, num=0)", _show(err, rc)))
    if err == 0:  # proven unrestricted; no need for a real hypercall
        res.verdict = Verdict.UNRESTRICTED
        return res
    call = privcmd_hypercall(op=__HYPERVISOR_xen_version)
    call.arg[0] = XENVER_version
    herr, hrc = _try(ioctl, fd, IOCTL_PRIVCMD_HYPERCALL, call)
    res.calls.append(("HYPERCALL(xen_version)", _show(herr, hrc)))
    if herr == 0:
        res.verdict = Verdict.UNRESTRICTED
    elif err == errno.EPERM and herr == errno.EPERM:
        res.verdict = Verdict.RESTRICTED
    elif herr == errno.EPERM and err in (errno.ENOTTY, errno.EINVAL):
        res.verdict = Verdict.RESTRICTED  # old kernel without DM_OP: the hypercall refusal proves it
    if res.verdict is Verdict.RESTRICTED and target is not None and err == errno.EPERM:
        terr, trc = _try(ioctl, fd, IOCTL_PRIVCMD_DM_OP, privcmd_dm_op(dom=target, num=0, ubufs=None))
        res.calls.append((f"DM_OP(dom={target}, num=0)", _show(terr, trc)))
        if terr == errno.EPERM:
            res.verdict = Verdict.WRONG_DOMAIN
        elif terr != 0:
            res.verdict = Verdict.UNKNOWN
    return res


def probe_evtchn(fd: int, ioctl: Ioctl = _ioctl) -> ProbeResult:
    """Is evtchn ``fd`` restricted?  See the module doc."""
    res = ProbeResult(FdKind.EVTCHN, Verdict.UNKNOWN)
    bind = ioctl_evtchn_bind_interdomain(remote_domain=DOMID_INVALID, remote_port=0)
    err, port = _try(ioctl, fd, IOCTL_EVTCHN_BIND_INTERDOMAIN, bind)
    res.calls.append(("BIND_INTERDOMAIN(DOMID_INVALID, port 0)", _show(err, port)))
    if err == errno.EACCES:
        res.verdict = Verdict.RESTRICTED
    elif err == errno.ESRCH:
        res.verdict = Verdict.UNRESTRICTED
    elif err == 0:  # must not happen; undo the side effect, then report
        uerr, _ = _try(ioctl, fd, IOCTL_EVTCHN_UNBIND, ioctl_evtchn_unbind(port=port))
        res.calls.append((f"UNBIND({port})", _show(uerr, 0)))
        res.verdict = Verdict.UNRESTRICTED
    return res


def probe(kind: FdKind, fd: int, target: int | None = None, ioctl: Ioctl = _ioctl) -> ProbeResult | None:
    """Probe ``fd`` if ``kind`` is one that can be restricted (privcmd, evtchn), else ``None``."""
    if kind is FdKind.PRIVCMD:
        return probe_privcmd(fd, target, ioctl)
    if kind is FdKind.EVTCHN:
        return probe_evtchn(fd, ioctl)
    return None


# --- pidfd ------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def pidfd_open(pid: int) -> int:
    """``pidfd_open(pid, 0)`` (Linux ≥ 5.3); raises ``OSError``."""
    rc = _syscall(ctypes.c_long(SYS_pidfd_open), ctypes.c_long(pid), ctypes.c_long(0))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_open({pid}): {os.strerror(err)}")
    return int(rc)


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """``pidfd_getfd(pidfd, targetfd, 0)`` (Linux ≥ 5.6): a close-on-exec copy in this
    process of the target's fd, sharing its open file description (so its
    restriction).  Needs ptrace-attach rights over the target; raises ``OSError``."""
    rc = _syscall(ctypes.c_long(SYS_pidfd_getfd), ctypes.c_long(pidfd), ctypes.c_long(targetfd), ctypes.c_long(0))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd(fd {targetfd}): {os.strerror(err)}")
    return int(rc)
