"""restrict_all: every handle restricted, the rest neutered, failures fail closed."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from xendmop.depriv import DeprivConfigError, DeprivError, RestrictError, neuter_fd, restrict_all
from xendmop.errors import ClosedHandleError, xen_error


class FakeHandle:
    """Has ``restrict(domid)``; fails with ``err`` when given."""

    def __init__(self, err: int | None = None, exc: Exception | None = None) -> None:
        self.err, self.exc, self.calls = err, exc, []

    def restrict(self, domid: int) -> None:
        self.calls.append(domid)
        if self.exc is not None:
            raise self.exc
        if self.err is not None:
            raise OSError(self.err, os.strerror(self.err))


def is_devnull(fd: int) -> bool:
    got, null = os.fstat(fd), os.stat(os.devnull)
    return stat.S_ISCHR(got.st_mode) and got.st_rdev == null.st_rdev


@pytest.fixture
def scratch_fd(tmp_path: Path):
    path = tmp_path / "privileged"
    path.write_bytes(b"secret")
    fd = os.open(path, os.O_RDWR)
    yield fd
    os.close(fd)


def test_every_handle_restricted_and_fd_neutered(scratch_fd):
    a, b = FakeHandle(), FakeHandle()
    report = restrict_all(5, {"devicemodel": a, "evtchn": b}, neuter=[scratch_fd])
    assert a.calls == b.calls == [5]
    assert report.restricted == ["devicemodel", "evtchn"] and report.neutered == [scratch_fd]
    assert is_devnull(scratch_fd) and os.read(scratch_fd, 10) == b""
    assert not os.get_inheritable(scratch_fd), "the neutered fd keeps close-on-exec"


@pytest.mark.parametrize(
    ("err", "why"),
    [
        (errno.ENOTTY, "lacks the restrict ioctl"),
        (errno.EOPNOTSUPP, "cannot restrict"),
        (errno.EINVAL, "already restricted to another domain"),
    ],
)
def test_refused_restrict_fails_closed(scratch_fd, err, why):
    first, bad, last = FakeHandle(), FakeHandle(err), FakeHandle()
    with pytest.raises(RestrictError) as info:
        restrict_all(5, {"devicemodel": first, "evtchn": bad, "foreignmemory": last}, neuter=[scratch_fd])
    e = info.value
    assert isinstance(e, DeprivError) and isinstance(e, OSError)
    assert e.handle == "evtchn" and e.errno == err and why in str(e) and "evtchn" in str(e)
    assert e.failures == [("evtchn", err, e.failures[0][2])]
    # everything else was still done: the process is as restricted as it can be
    assert first.calls == last.calls == [5]
    assert is_devnull(scratch_fd)


def test_all_failures_are_listed():
    with pytest.raises(RestrictError) as info:
        restrict_all(5, {"a": FakeHandle(errno.ENOTTY), "b": FakeHandle(errno.EINVAL)})
    assert [h for h, _, _ in info.value.failures] == ["a", "b"]
    assert "and 1 more: b" in str(info.value)


def test_library_errors_are_failures_too():
    xen = FakeHandle(exc=xen_error(errno.EPERM, "restrict", 5, layer="privcmd"))
    closed = FakeHandle(exc=ClosedHandleError("the privcmd handle is closed"))
    with pytest.raises(RestrictError) as info:
        restrict_all(5, {"xen": xen, "closed": closed})
    (h1, e1, _), (h2, e2, why2) = info.value.failures
    assert (h1, e1) == ("xen", errno.EPERM)
    assert (h2, e2) == ("closed", None) and "ClosedHandleError" in why2


def test_handles_are_named_without_a_mapping():
    with pytest.raises(RestrictError) as info:
        restrict_all(5, [FakeHandle(errno.ENOTTY)])
    assert info.value.handle == "FakeHandle"


def test_neutering_a_closed_fd_fails_and_creates_nothing(tmp_path):
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR)
    os.close(fd)
    with pytest.raises(RestrictError) as info:
        restrict_all(5, [], neuter=[fd])
    assert info.value.errno == errno.EBADF and info.value.handle == f"fd {fd}"
    with pytest.raises(OSError):
        os.fstat(fd)


def test_neuter_accepts_objects_with_fileno(tmp_path):
    with open(tmp_path / "f", "wb") as f:
        restrict_all(5, [], neuter=[f])
        assert is_devnull(f.fileno())


def test_neuter_fd_alone(scratch_fd):
    neuter_fd(scratch_fd)
    assert is_devnull(scratch_fd)


@pytest.mark.parametrize("domid", [0, -1, 0x7FF0, 0x7FF4, True, "5"])
def test_bad_domid_changes_nothing(scratch_fd, domid):
    handle = FakeHandle()
    with pytest.raises(DeprivConfigError):
        restrict_all(domid, [handle], neuter=[scratch_fd])
    assert handle.calls == [] and not is_devnull(scratch_fd)
