"""Deprivileged device models: restrict every handle, drop privileges, check a process.

A device model that has set up its ioreq server, mapped its pages and bound its event
channels calls, **before handling the first guest access**::

    from xendmop.depriv import DropConfig, deprivilege, fail_closed, libxl_range_ids

    ids = libxl_range_ids(domid)                     # uid = xen-qemuuser-range-base + domid
    config = DropConfig(uid=ids.uid, gid=ids.gid, chroot=empty_root_dir)
    with fail_closed():                              # any failure: message on stderr, _exit(70)
        deprivilege(domid, [dm, foreign, evtchn], config, neuter=[hypercall_fd])

``restrict_all`` (privcmd ``IOCTL_PRIVCMD_RESTRICT``, evtchn ``IOCTL_EVTCHN_RESTRICT_DOMID``,
``/dev/null`` over what cannot be restricted, then every privcmd/evtchn fd of the
process probed) and ``drop_privileges`` (the steps of Xen's
``docs/designs/qemu-deprivilege.md`` in a fixed order, each verified) can also be
used alone.  ``xendmop depriv-check PID`` (``xendmop.depriv.check``) audits a running
process from outside.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from .drop import (
    QEMU_USER_RANGE_BASE,
    QEMU_USER_SHARED,
    STEPS,
    DropConfig,
    DropReport,
    Ids,
    RLimits,
    drop_privileges,
    fixed_user_ids,
    libxl_range_ids,
)
from .errors import DeprivConfigError, DeprivError, DropError, RestrictError, VerifyError
from .restrict import HasFileno, Restrictable, RestrictReport, audit_self, neuter_fd, restrict_all

__all__ = [
    "EXIT_DEPRIV_FAILED",
    "QEMU_USER_RANGE_BASE",
    "QEMU_USER_SHARED",
    "STEPS",
    "DeprivConfigError",
    "DeprivError",
    "DeprivReport",
    "DropConfig",
    "DropError",
    "DropReport",
    "HasFileno",
    "Ids",
    "RLimits",
    "RestrictError",
    "RestrictReport",
    "Restrictable",
    "VerifyError",
    "audit_self",
    "deprivilege",
    "drop_privileges",
    "fail_closed",
    "fixed_user_ids",
    "libxl_range_ids",
    "neuter_fd",
    "restrict_all",
]

#: exit status of ``fail_closed`` (``EX_SOFTWARE``)
EXIT_DEPRIV_FAILED = 70


@dataclass
class DeprivReport:
    restrict: RestrictReport
    drop: DropReport


def deprivilege(
    domid: int,
    handles: Iterable[Restrictable] | Mapping[str, Restrictable],
    config: DropConfig,
    *,
    neuter: Sequence[int | HasFileno] = (),
) -> DeprivReport:
    """``restrict_all(domid, handles, neuter=neuter)`` then ``drop_privileges(config)``.

    The runtime calls this after setup and before the first guest access.  The drop
    configuration is validated first, so a bad configuration (``DeprivConfigError``)
    changes nothing.  Raises ``RestrictError``/``DropError``/``VerifyError``, after
    which the process is half-deprivileged and must exit (``fail_closed``)."""
    config.validate()
    restricted = restrict_all(domid, handles, neuter=neuter)
    return DeprivReport(restricted, drop_privileges(config))


@contextmanager
def fail_closed(exit_code: int = EXIT_DEPRIV_FAILED) -> Iterator[None]:
    """Run a deprivilege block; on **any** exception, write it to stderr and
    ``os._exit(exit_code)`` at once: no ``finally`` blocks, atexit handlers or other
    threads get to run in a half-deprivileged process."""
    try:
        yield
    except BaseException as e:  # whatever it was, the process must not go on
        try:
            sys.stderr.write(f"xendmop: deprivileging failed, exiting: {type(e).__name__}: {e}\n")
            sys.stderr.flush()
        finally:
            os._exit(exit_code)
