"""Restrict every Xen handle to one domain, neuter the rest, and prove it (fail closed).

The Python counterpart of ``xentoolcore_restrict_all()``: handles that can be
restricted (privcmd behind a ``DeviceModel`` or a foreign-memory handle:
``IOCTL_PRIVCMD_RESTRICT``; event channels: ``IOCTL_EVTCHN_RESTRICT_DOMID``) get their
``restrict(domid)``; fds that cannot be (the hypercall-buffer device, Xenstore, any
other privileged fd) are *neutered*: ``/dev/null`` is ``dup2``-ed over them, so the fd
number stays valid (no other code can later be handed it by ``open``) but now leads
nowhere.  Existing ``mmap``s of a neutered fd stay usable; new ones fail.

Then the whole process is audited (``audit_self``): every privcmd and evtchn fd
in ``/proc/self/fd`` — including ones no handle was passed for — is probed
(``xendmop.depriv.probe``) and must prove restricted, and no Xenstore fd may remain.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..abi.xen import DOMID_FIRST_RESERVED
from .errors import DeprivConfigError, RestrictError
from .probe import FdInfo, FdKind, ProbeResult, list_fds, probe

log = logging.getLogger(__name__)

__all__ = ["HasFileno", "Restrictable", "RestrictReport", "audit_self", "neuter_fd", "restrict_all"]


@runtime_checkable
class Restrictable(Protocol):
    """Anything restrictable to one domain: ``DeviceModel``, a foreign-memory or an
    event-channel handle (raises ``OSError`` when the kernel refuses)."""

    def restrict(self, domid: int) -> None: ...


@runtime_checkable
class HasFileno(Protocol):
    def fileno(self) -> int: ...


#: kinds that must not stay open unrestricted/un-neutered after restrict_all
_MUST_CLOSE = {FdKind.XENBUS}
#: kinds left open with a warning: no privilege of their own (hypercall: a memory
#: allocator) or no restriction mechanism exists (grant devices)
_WARN = {FdKind.HYPERCALL, FdKind.GNTDEV, FdKind.GNTALLOC}


@dataclass
class RestrictReport:
    domid: int
    restricted: list[str]
    neutered: list[int]
    #: every privcmd/evtchn fd of the process and how it answered
    probed: list[tuple[FdInfo, ProbeResult]]
    #: Xenstore fds still open (a failure)
    xenstore: list[FdInfo]
    warnings: list[str]


def _name(handle: object) -> str:
    describe = getattr(handle, "describe", None)
    if callable(describe):
        try:
            d = describe()
            if isinstance(d, Mapping) and d.get("device"):
                return f"{type(handle).__name__}({d.get('backend', '')}:{d['device']})"
        except Exception:  # a closed handle: fall through to the plain name
            pass
    fileno = getattr(handle, "fileno", None)
    if callable(fileno):
        try:
            return f"{type(handle).__name__}(fd {fileno()})"
        except Exception:
            pass
    return type(handle).__name__


def _fd_of(item: int | HasFileno) -> int:
    return item if isinstance(item, int) else item.fileno()


def neuter_fd(fd: int, null_fd: int | None = None) -> None:
    """``dup2`` ``/dev/null`` over ``fd`` (close-on-exec), as xentoolcore does for libxencall
    and Xenstore, then check that ``fd`` now is ``/dev/null``.  Raises ``OSError``."""
    own = null_fd is None
    src = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC) if null_fd is None else null_fd
    try:
        os.fstat(fd)  # EBADF for an fd that is not open: never create one
        if fd == src:
            raise OSError(errno.EBADF, f"fd {fd} is the /dev/null fd itself")
        os.dup2(src, fd, inheritable=False)
        got, want = os.fstat(fd), os.fstat(src)
        if not stat.S_ISCHR(got.st_mode) or (got.st_rdev, got.st_ino) != (want.st_rdev, want.st_ino):
            raise OSError(errno.EIO, f"fd {fd} is not /dev/null after dup2")
    finally:
        if own:
            os.close(src)


def audit_self(domid: int | None = None) -> RestrictReport:
    """Probe every privcmd/evtchn fd of this process; list Xenstore fds and warn about
    hypercall and grant fds.

    Never raises for findings; ``restrict_all`` turns them into errors."""
    report = RestrictReport(domid if domid is not None else -1, [], [], [], [], [])
    for info in list_fds("self"):
        result = probe(info.kind, info.fd, domid)
        if result is not None:
            report.probed.append((info, result))
        elif info.kind in _MUST_CLOSE:
            report.xenstore.append(info)
        elif info.kind in _WARN:
            report.warnings.append(f"fd {info.fd} ({info.kind.value}, {info.target}) is still open")
    return report


def restrict_all(
    domid: int,
    handles: Iterable[Restrictable] | Mapping[str, Restrictable],
    *,
    neuter: Sequence[int | HasFileno] = (),
    audit: bool = True,
) -> RestrictReport:
    """Restrict every handle to ``domid``, neuter every fd in ``neuter``, then audit.

    ``handles``: objects with ``restrict(domid)`` (a mapping gives them names for
    errors).  ``neuter``: fds (or objects with ``fileno()``) that cannot be restricted:
    ``/dev/null`` is dup2-ed over each.  ``audit``: afterwards probe every privcmd and
    evtchn fd of the process (``audit_self``): each must answer as restricted (to
    ``domid`` for privcmd), and no Xenstore fd may remain open.

    **Fail closed**: every handle and fd is attempted even after a failure, so the
    process ends as restricted as it can be; then ``RestrictError`` is raised naming
    the first failing handle, its errno (``ENOTTY``/``EINVAL``: kernel without the
    restrict ioctl; ``EOPNOTSUPP``: backend without it) and listing all failures in
    ``.failures``.  The process is then half-restricted and **must exit** without
    serving its guest (``with fail_closed(): …`` does that).

    Raises ``DeprivConfigError`` (before any change) for a domid that is not a guest
    domain (1..0x7fef; event channels cannot be restricted to dom0).
    """
    if isinstance(domid, bool) or not isinstance(domid, int) or not 0 < domid < DOMID_FIRST_RESERVED:
        raise DeprivConfigError(f"restrict_all: domid={domid!r}: must be a guest domid (1..0x7fef)")
    named = list(handles.items()) if isinstance(handles, Mapping) else [(_name(h), h) for h in handles]
    failures: list[tuple[str, int | None, str]] = []
    report = RestrictReport(domid, [], [], [], [], [])

    for name, handle in named:
        try:
            handle.restrict(domid)
        except OSError as e:
            why = {
                errno.ENOTTY: "the kernel lacks the restrict ioctl (Linux < 4.11?)",
                errno.EINVAL: "refused (already restricted to another domain, or an old kernel)",
                errno.EACCES: "refused (already restricted)",
                errno.EOPNOTSUPP: "this backend cannot restrict",
            }.get(e.errno or 0, "refused")
            failures.append((name, e.errno, f"{why}: {e}"))
        except Exception as e:  # a closed handle, a misbehaving object: still a failure
            failures.append((name, None, f"{type(e).__name__}: {e}"))
        else:
            report.restricted.append(name)

    # every fd to neuter must be open *before* /dev/null is opened, or /dev/null
    # could take the number of one that was not
    targets: list[tuple[str, int]] = []
    for item in neuter:
        label = f"fd {item}" if isinstance(item, int) else _name(item)
        try:
            fd = _fd_of(item)
            os.fstat(fd)
        except OSError as e:
            failures.append((label, e.errno, f"cannot neuter: {e.strerror or e}"))
        except Exception as e:
            failures.append((label, None, f"cannot neuter: {type(e).__name__}: {e}"))
        else:
            targets.append((label, fd))
    null_fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for label, fd in targets:
            try:
                neuter_fd(fd, null_fd)
            except OSError as e:
                failures.append((label, e.errno, f"cannot neuter: {e.strerror or e}"))
            else:
                report.neutered.append(fd)
    finally:
        os.close(null_fd)

    if audit:
        found = audit_self(domid)
        report.probed, report.xenstore, report.warnings = found.probed, found.xenstore, found.warnings
        for info, result in found.probed:
            if not result.ok:
                failures.append((f"fd {info.fd} ({info.target})", None, result.describe()))
        for info in found.xenstore:
            failures.append((f"fd {info.fd} ({info.target})", None, "Xenstore fd still open: close or neuter it"))
        for w in found.warnings:
            log.warning("restrict_all: %s", w)

    if failures:
        name, err, why = failures[0]
        raise RestrictError(name, err, why, failures)
    log.info("restricted to domain %d: %s; neutered fds %s", domid, ", ".join(report.restricted), report.neutered)
    return report
