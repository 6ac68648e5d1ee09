"""The kvm-ioctls trick: aim every DeviceModel method at a device that cannot work.

A privcmd backend on ``/dev/null`` gets ENOTTY from the kernel for every request, on
a closed fd number EBADF; each method must raise a ``XenError`` with that errno,
the op's name and the domid, on both request paths (``IOCTL_PRIVCMD_DM_OP`` and the
``IOCTL_PRIVCMD_HYPERCALL`` fallback).  No fake and no Xen needed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import resource
from collections.abc import Iterator

import pytest
from golden.calls import CALLS, Call, uncovered

from xendmop import DeviceModel, XenError
from xendmop.backends import OsDevice, PrivcmdBackend
from xendmop.backends.device import PRIVCMD_PATH, Device

CASES = [pytest.param(call, id=f"{i:02}-{call.label}") for i, call in enumerate(CALLS)]


def _no_hypercall_device(path: str) -> Device:
    """Pretend /dev/xen/hypercall is missing: buffers come from anonymous memory, no fd."""
    raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)


def _backend(fd: int, *, dm_op_ioctl: bool) -> PrivcmdBackend:
    backend = PrivcmdBackend.from_device(OsDevice(PRIVCMD_PATH, fd), opener=_no_hypercall_device)
    # /dev/null answers the open-time probe with ENOTTY, so the backend chose the
    # HYPERCALL fallback; the DM_OP path is exercised by switching it back.
    assert backend.uses_hypercall
    backend.uses_hypercall = not dm_op_ioctl
    return backend


@pytest.fixture(params=[True, False], ids=["DM_OP", "HYPERCALL"])
def dm_op_ioctl(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def devnull(dm_op_ioctl: bool) -> Iterator[DeviceModel]:
    dm = DeviceModel(_backend(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC), dm_op_ioctl=dm_op_ioctl))
    yield dm
    dm.close()


def _unused_fd_number() -> int:
    """An fd number well above every open one, so nothing takes it while a test runs."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    number = max(int(fd) for fd in os.listdir("/proc/self/fd")) + 64
    if number >= soft:
        pytest.skip(f"no fd number free above the {len(os.listdir('/proc/self/fd'))} open ones (RLIMIT_NOFILE {soft})")
    return number


@pytest.fixture
def closed_fd(dm_op_ioctl: bool) -> Iterator[DeviceModel]:
    """A backend whose fd number was closed underneath it.

    The number is above every open fd so nothing reuses it while the test runs;
    that is checked at the end, before the backend's close (which then fails with
    EBADF too, and is ignored)."""
    null = os.open(os.devnull, os.O_RDWR)
    number = fcntl.fcntl(null, fcntl.F_DUPFD_CLOEXEC, _unused_fd_number())
    os.close(null)
    dm = DeviceModel(_backend(number, dm_op_ioctl=dm_op_ioctl))
    os.close(number)
    yield dm
    with pytest.raises(OSError) as still_closed:
        os.fstat(number)
    assert still_closed.value.errno == errno.EBADF, "the test's closed fd number was reused"
    with contextlib.suppress(OSError):
        dm.close()


def test_every_devicemodel_method_has_a_case() -> None:
    assert uncovered() == set()


def _expect(dm: DeviceModel, call: Call, err: int) -> None:
    with pytest.raises(XenError) as caught:
        getattr(dm, call.method)(*call.args, **call.kwargs)
    e = caught.value
    assert (e.errno, e.op, e.domid) == (err, call.op, call.args[0]), str(e)
    assert call.op in str(e)


@pytest.mark.parametrize("call", CASES)
def test_devnull_is_enotty(devnull: DeviceModel, call: Call) -> None:
    _expect(devnull, call, errno.ENOTTY)


@pytest.mark.parametrize("call", CASES)
def test_closed_fd_is_ebadf(closed_fd: DeviceModel, call: Call) -> None:
    _expect(closed_fd, call, errno.EBADF)


def test_opening_on_a_closed_fd_fails_with_ebadf() -> None:
    """The open-time probe already meets the bad fd."""
    with pytest.raises(OSError) as caught:
        PrivcmdBackend.from_device(OsDevice(PRIVCMD_PATH, _unused_fd_number()), opener=_no_hypercall_device)
    assert caught.value.errno == errno.EBADF
