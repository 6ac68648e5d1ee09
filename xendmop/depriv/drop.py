"""Drop privileges after setup, following Xen's ``docs/designs/qemu-deprivilege.md``.

The steps, in this fixed order (each optional, each verified right after it is taken):

1. ``no_new_privs``  ``prctl(PR_SET_NO_NEW_PRIVS)``; verified with ``PR_GET_NO_NEW_PRIVS``.
   First, so nothing later can gain privileges through ``execve`` of a set-uid or
   file-capability binary.
2. ``chroot``        ``chroot(dir)`` + ``chdir("/")`` into an empty root-owned directory
   (needs root, so before the uid change); verified by comparing the inode of ``/``
   and of the working directory with the directory's, and that ``/`` is empty.
3. ``setgroups``     ``setgroups([])``; verified with ``getgroups()``.
4. ``setresgid``     real, effective and saved gid; verified with ``getresgid()``
   (before the uid change, which removes the right to change gids).
5. ``setresuid``     real, effective and saved uid; verified with ``getresuid()``, with
   ``capget`` (no effective or permitted capability left) and by the "no way back"
   test: ``setuid(0)`` and ``setgid(0)`` must now fail with ``EPERM``.
6. ``rlimits``       ``RLIMIT_FSIZE``, ``RLIMIT_NPROC``, ``RLIMIT_CORE``, ``RLIMIT_NOFILE``,
   ``RLIMIT_MSGQUEUE`` (soft = hard; a limit is only ever lowered, never raised);
   after the uid change so that they cannot be raised again and ``RLIMIT_NPROC``
   counts the new (per-domain) uid.  Verified with ``getrlimit`` and, when the uid
   was changed, by checking that raising a hard limit now fails with ``EPERM``.

Caveats for the caller:

* Import everything the process will need **before** dropping: inside the empty
  chroot no module, ``/etc/passwd`` or ``/proc`` can be opened.
* Call it with a **single thread** running: ``no_new_privs`` is per thread (threads
  started afterwards inherit it); ``validate`` refuses otherwise.
* ``RLimits.nproc`` counts threads too: the default 1 forbids new processes *and*
  new threads for the uid (``threading`` then raises ``RuntimeError``).  Give the
  number of tasks the device model needs.
* After a ``DropError`` the process is half-dropped: it must exit (``fail_closed``).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import pwd
import resource
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from ..abi.xen import DOMID_FIRST_RESERVED
from .errors import DeprivConfigError, DropError, VerifyError

log = logging.getLogger(__name__)

__all__ = [
    "QEMU_USER_RANGE_BASE",
    "QEMU_USER_SHARED",
    "STEPS",
    "DropConfig",
    "DropReport",
    "Ids",
    "RLimits",
    "drop_privileges",
    "fixed_user_ids",
    "libxl_range_ids",
]

#: libxl's user names (``tools/libs/light/libxl_dm.c``): uid = range base's uid + domid
QEMU_USER_RANGE_BASE = "xen-qemuuser-range-base"
#: libxl's fallback: one uid shared by every device model (cannot be killed by uid)
QEMU_USER_SHARED = "xen-qemuuser-shared"

STEPS = ("no_new_privs", "chroot", "setgroups", "setresgid", "setresuid", "rlimits")

PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_ID_MAX = 0xFFFFFFFE  # (uid_t)-1 means "unchanged" to setres*id


# --- who to become ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ids:
    uid: int
    gid: int
    #: where the ids came from, for logs
    source: str


Getpwnam = Callable[[str], pwd.struct_passwd]
Getpwuid = Callable[[int], pwd.struct_passwd]


def libxl_range_ids(
    domid: int,
    base_user: str = QEMU_USER_RANGE_BASE,
    *,
    per_domain_gid: bool = False,
    getpwnam: Getpwnam = pwd.getpwnam,
    getpwuid: Getpwuid = pwd.getpwuid,
) -> Ids:
    """The libxl convention: uid = ``base_user``'s uid + ``domid``, gid = its gid (or, with
    ``per_domain_gid``, its gid + ``domid``).  Like libxl, refuses (``DeprivConfigError``)
    a missing base user, a uid that already belongs to a user and uid 0."""
    if not 0 < domid < DOMID_FIRST_RESERVED:
        raise DeprivConfigError(f"libxl_range_ids: domid={domid}: must be a guest domid (1..0x7fef)")
    try:
        base = getpwnam(base_user)
    except KeyError:
        raise DeprivConfigError(f"no user {base_user!r}: create it (the uid range base) or pass ids") from None
    uid = base.pw_uid + domid
    gid = base.pw_gid + domid if per_domain_gid else base.pw_gid
    try:
        clash = getpwuid(uid)
    except KeyError:
        pass
    else:
        raise DeprivConfigError(f"wanted uid {uid} ({base_user} + {domid}) but that is user {clash.pw_name!r}")
    if uid == 0 or gid == 0 or uid > _ID_MAX or gid > _ID_MAX:
        raise DeprivConfigError(f"uid {uid} / gid {gid} from {base_user} + {domid} is root or out of range")
    return Ids(uid, gid, f"{base_user} + {domid}")


def fixed_user_ids(name: str = QEMU_USER_SHARED, *, getpwnam: Getpwnam = pwd.getpwnam) -> Ids:
    """A fixed user (libxl's ``device_model_user``, or the shared fallback)."""
    try:
        user = getpwnam(name)
    except KeyError:
        raise DeprivConfigError(f"no user {name!r}") from None
    if user.pw_uid == 0 or user.pw_gid == 0:
        raise DeprivConfigError(f"user {name!r} is root")
    return Ids(user.pw_uid, user.pw_gid, f"user {name}")


# --- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RLimits:
    """Hard = soft limits to set; ``None`` leaves that limit alone.  Defaults follow
    qemu-deprivilege.md: 256 KiB files, no core dumps, no new tasks, no POSIX queues."""

    fsize: int | None = 256 * 1024
    nproc: int | None = 1
    core: int | None = 0
    nofile: int | None = 256
    msgqueue: int | None = 0

    def items(self) -> list[tuple[str, int, int]]:
        """``(NAME, RLIMIT_x, value)`` for every limit that is set."""
        names = {
            "FSIZE": (resource.RLIMIT_FSIZE, self.fsize),
            "NPROC": (resource.RLIMIT_NPROC, self.nproc),
            "CORE": (resource.RLIMIT_CORE, self.core),
            "NOFILE": (resource.RLIMIT_NOFILE, self.nofile),
            "MSGQUEUE": (resource.RLIMIT_MSGQUEUE, self.msgqueue),
        }
        return [(name, res, value) for name, (res, value) in names.items() if value is not None]


@dataclass(frozen=True)
class DropConfig:
    """What ``drop_privileges`` does; every step can be turned off (``None``/``False``)."""

    uid: int | None
    gid: int | None
    clear_groups: bool = True
    no_new_privs: bool = True
    #: an empty directory owned by root and writable by nobody else
    chroot: str | os.PathLike[str] | None = None
    require_empty_root: bool = True
    rlimits: RLimits | None = field(default_factory=RLimits)

    def validate(self) -> None:
        """Check the configuration and the environment without changing anything;
        raises ``DeprivConfigError``."""
        if (self.uid is None) != (self.gid is None):
            raise DeprivConfigError("uid and gid must both be given, or neither")
        for name, value in (("uid", self.uid), ("gid", self.gid)):
            if value is not None and (isinstance(value, bool) or not 0 < value <= _ID_MAX):
                raise DeprivConfigError(f"{name}={value!r}: must be a non-root id (1..{_ID_MAX})")
        if self.chroot is not None:
            path = os.fspath(self.chroot)
            try:
                st = os.stat(path)
            except OSError as e:
                raise DeprivConfigError(f"chroot {path!r}: {e.strerror}") from None
            if not stat.S_ISDIR(st.st_mode):
                raise DeprivConfigError(f"chroot {path!r} is not a directory")
            if st.st_uid != 0 or st.st_mode & 0o022:
                raise DeprivConfigError(f"chroot {path!r} must be owned by root and writable by nobody else")
            if self.require_empty_root and os.listdir(path):
                raise DeprivConfigError(f"chroot {path!r} is not empty")
        if self.no_new_privs:
            try:
                tasks = len(os.listdir("/proc/self/task"))
            except OSError:
                tasks = 1  # no /proc: cannot tell
            if tasks > 1:
                raise DeprivConfigError(
                    f"{tasks} threads are running: no_new_privs is per thread; drop privileges before starting threads"
                )


@dataclass
class DropReport:
    #: ``(step, what was verified)``, in order
    steps: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# --- libc -------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_capget = _libc.capget
_capget.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_capget.restype = ctypes.c_int


def prctl(option: int, arg2: int = 0) -> int:
    """``prctl(option, arg2, 0, 0, 0)``; raises ``OSError``."""
    rc = int(_prctl(option, arg2, 0, 0, 0))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


def capabilities() -> tuple[int, int, int]:
    """This thread's (effective, permitted, inheritable) capability sets (64-bit masks)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _capget(ctypes.byref(header), data) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))

    def join(name: str) -> int:
        return int(getattr(data[0], name)) | int(getattr(data[1], name)) << 32

    return join("effective"), join("permitted"), join("inheritable")


# --- the steps --------------------------------------------------------------------------------


def _fail(step: str, e: OSError) -> DropError:
    return DropError(step, e.errno or errno.EIO, f"refused: {e.strerror or e}")


def _must_fail(step: str, what: str, action: Callable[[], object]) -> None:
    """The "no way back" test: ``action`` must raise ``PermissionError``."""
    try:
        action()
    except PermissionError:
        return
    except OSError as e:
        raise VerifyError(step, None, f"{what} failed with {errno.errorcode.get(e.errno or 0)}, not EPERM") from None
    raise VerifyError(step, None, f"{what} succeeded: privileges can be regained")


def drop_privileges(config: DropConfig) -> DropReport:
    """Take every configured step in the order of the module doc, verifying each.

    Raises ``DeprivConfigError`` before any change for a bad configuration,
    ``DropError`` (``.step`` names it, ``.errno`` why) when the kernel refuses a step,
    ``VerifyError`` when a step did not take effect.  After a ``DropError`` the
    process must exit.
    """
    config.validate()
    report = DropReport()
    done = report.steps.append

    if config.no_new_privs:
        try:
            prctl(PR_SET_NO_NEW_PRIVS, 1)
            got = prctl(PR_GET_NO_NEW_PRIVS)
        except OSError as e:
            raise _fail("no_new_privs", e) from None
        if got != 1:
            raise VerifyError("no_new_privs", None, f"PR_GET_NO_NEW_PRIVS says {got}")
        done(("no_new_privs", "PR_GET_NO_NEW_PRIVS = 1"))
    else:
        report.skipped.append("no_new_privs")

    if config.chroot is not None:
        path = os.fspath(config.chroot)
        try:
            want = os.stat(path)
            os.chroot(path)
            os.chdir("/")
            root, cwd = os.stat("/"), os.stat(".")
            entries = os.listdir("/")
        except OSError as e:
            raise _fail("chroot", e) from None
        ident = (want.st_dev, want.st_ino)
        if (root.st_dev, root.st_ino) != ident or (cwd.st_dev, cwd.st_ino) != ident:
            raise VerifyError("chroot", None, f"/ or the working directory is not {path!r}")
        if config.require_empty_root and entries:
            raise VerifyError("chroot", None, f"the new root is not empty: {sorted(entries)[:5]}")
        done(("chroot", f"/ and cwd are {path!r} (inode {want.st_ino}), {len(entries)} entries"))
    else:
        report.skipped.append("chroot")

    if config.clear_groups:
        try:
            os.setgroups([])
            groups = os.getgroups()
        except OSError as e:
            raise _fail("setgroups", e) from None
        if groups:
            raise VerifyError("setgroups", None, f"groups are still {groups}")
        done(("setgroups", "no supplementary groups"))
    else:
        report.skipped.append("setgroups")

    uid_changed = False
    if config.uid is not None and config.gid is not None:
        gid, uid = config.gid, config.uid
        try:
            os.setresgid(gid, gid, gid)
            gids = os.getresgid()
        except OSError as e:
            raise _fail("setresgid", e) from None
        if gids != (gid, gid, gid):
            raise VerifyError("setresgid", None, f"getresgid() = {gids}, wanted {gid} thrice")
        done(("setresgid", f"real = effective = saved = {gid}"))

        try:
            os.setresuid(uid, uid, uid)
            uids = os.getresuid()
            caps = capabilities()
        except OSError as e:
            raise _fail("setresuid", e) from None
        if uids != (uid, uid, uid):
            raise VerifyError("setresuid", None, f"getresuid() = {uids}, wanted {uid} thrice")
        if caps[0] or caps[1]:
            raise VerifyError("setresuid", None, f"capabilities left: effective {caps[0]:#x} permitted {caps[1]:#x}")
        _must_fail("setresuid", "setuid(0)", lambda: os.setuid(0))
        _must_fail("setresuid", "setgid(0)", lambda: os.setgid(0))
        if config.clear_groups:
            _must_fail("setresuid", "setgroups([0])", lambda: os.setgroups([0]))
        uid_changed = True
        done(("setresuid", f"real = effective = saved = {uid}; no capabilities; setuid(0) -> EPERM"))
    else:
        report.skipped.extend(["setresgid", "setresuid"])

    if config.rlimits is not None:
        shown = []
        for name, res, value in config.rlimits.items():
            step = f"rlimit:{name}"
            try:
                _, hard = resource.getrlimit(res)
                new = value if hard == resource.RLIM_INFINITY else min(value, hard)  # never raise a limit
                resource.prlimit(0, res, (new, new))
                now = resource.getrlimit(res)
            except OSError as e:
                raise _fail(step, e) from None
            except ValueError as e:
                raise DropError(step, errno.EINVAL, f"refused: {e}") from None
            if now != (new, new):
                raise VerifyError(step, None, f"getrlimit = {now}, wanted {(new, new)}")
            if uid_changed:

                def raise_hard(res: int = res, new: int = new) -> object:
                    return resource.prlimit(0, res, (new, new + 1))

                _must_fail(step, f"raising RLIMIT_{name}", raise_hard)
            shown.append(f"{name}={new}")
        done(("rlimits", ", ".join(shown) + ("; cannot be raised" if uid_changed else "")))
    else:
        report.skipped.append("rlimits")

    log.info("privileges dropped: %s", "; ".join(f"{s}: {d}" for s, d in report.steps))
    return report
