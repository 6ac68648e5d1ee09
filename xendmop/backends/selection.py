"""Backend selection: a backend by name, or ``auto`` (``$XENDMOP_BACKEND``, privcmd, libxen, then
the mock only off Xen).  Where ``DeviceModel.open`` and the CLI choose, reading
``XENDMOP_BACKEND`` and, for the mock, ``XENDMOP_MOCK_SOCKET``; it logs what it chose.
"""

from __future__ import annotations

import errno
import logging
import os
import warnings
from typing import Any

from ..errors import ArgumentError, NotXenHostError
from .base import Backend, Limits
from .device import PRIVCMD_PATH, xen_host_signs

__all__ = ["BACKENDS", "MockFallbackWarning", "auto_backend", "make_backend"]

log = logging.getLogger("xendmop")

BACKENDS = ("auto", "privcmd", "libxen", "mock")


def make_backend(name: str, *, xen: Any = None, limits: Limits = Limits()) -> Backend:
    """Construct one named backend (no fallback)."""
    if name == "privcmd":
        from .privcmd import PrivcmdBackend

        return PrivcmdBackend(limits=limits)
    if name == "libxen":
        from .libxen import LibxenBackend

        return LibxenBackend.from_env(limits=limits)
    if name == "mock":
        from ..mock import default_host
        from .privcmd import PrivcmdBackend

        if xen is None and os.environ.get("XENDMOP_MOCK_SOCKET"):  # a mock host process (xendmop mock-host)
            from ..mock.remote import connect_from_env

            remote = connect_from_env()
            try:
                backend = PrivcmdBackend(remote.open_device, limits=limits, on_close=remote.close)
            except BaseException:
                remote.close()
                raise
            log.info("xendmop: mock Xen host at %s (from XENDMOP_MOCK_SOCKET)", remote.path)
            opener = remote.open_device
        elif xen is not None:
            backend = PrivcmdBackend(xen.open_device, limits=limits)
            opener = xen.open_device
        else:  # a host of our own: closed with the backend
            host = default_host()
            backend = PrivcmdBackend(host.open_device, limits=limits, on_close=host.close)
            opener = host.open_device
        backend.name = "mock"
        # How the simulated host opens its devices: an IoreqServer on this DeviceModel opens its
        # privcmd and evtchn the same way, not the real /dev/xen ones.
        backend.host_opener = opener
        return backend
    raise ArgumentError("open", "backend", name, f"must be one of {', '.join(BACKENDS)}")


class MockFallbackWarning(UserWarning):
    """``backend="auto"`` chose the mock because this is not a Xen host: nothing reaches a real
    guest.  Said once per process; ``warnings.simplefilter("ignore", MockFallbackWarning)``
    (the CLI's ``--quiet``) silences it."""


_mock_warned = False


def auto_backend(xen: Any, limits: Limits) -> Backend:
    """``$XENDMOP_BACKEND`` if set; else privcmd, then libxen; the mock only where nothing shows a
    Xen host (``xen_host_signs``), with a ``MockFallbackWarning``.  On a Xen host where neither
    real backend opens, the privcmd failure is raised again (its errno's ``OSError`` subclass:
    ``PermissionError`` for a user without access), naming the device and what to do."""
    global _mock_warned
    forced = os.environ.get("XENDMOP_BACKEND")
    if forced:
        if forced not in BACKENDS or forced == "auto":
            raise ArgumentError(
                "open", "$XENDMOP_BACKEND", forced, f"must be one of {', '.join(b for b in BACKENDS if b != 'auto')}"
            )
        log.info("xendmop: backend %s (from XENDMOP_BACKEND)", forced)
        return make_backend(forced, xen=xen, limits=limits)
    failures: list[tuple[str, BaseException]] = []
    for name in ("privcmd", "libxen"):
        try:
            backend = make_backend(name, xen=xen, limits=limits)
        except (NotXenHostError, OSError, ImportError) as e:
            failures.append((name, e))
            continue
        log.info("xendmop: backend %s", name)
        return backend
    reasons = "; ".join(f"{name}: {e}" for name, e in failures)
    signs = xen_host_signs()
    if signs:
        first = failures[0][1]
        err = first.errno if isinstance(first, OSError) and first.errno else errno.EACCES
        raise OSError(
            err,
            f"this is a Xen host ({', '.join(signs)}) but {PRIVCMD_PATH} cannot be used ({reasons}); "
            f"run as root or as a user given access to {PRIVCMD_PATH}, or ask for the simulated Xen by name "
            "(backend='mock', XENDMOP_BACKEND=mock, --backend mock)",
            PRIVCMD_PATH,
        ) from None
    log.info("xendmop: not a Xen host (%s); using the mock Xen", reasons)
    if not _mock_warned:
        _mock_warned = True
        warnings.warn(
            MockFallbackWarning(
                f"xendmop: not a Xen host (no {PRIVCMD_PATH}, no /proc/xen, /sys/hypervisor/type not xen): "
                "using the simulated Xen (the mock); nothing reaches a real guest"
            ),
            stacklevel=3,
        )
    return make_backend("mock", xen=xen, limits=limits)
