"""Probes (against a fake ioctl), fd classification and the pidfd_getfd path on real fds."""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

import pytest

from xendmop.abi.evtchn import IOCTL_EVTCHN_BIND_INTERDOMAIN, IOCTL_EVTCHN_UNBIND
from xendmop.abi.privcmd import IOCTL_PRIVCMD_DM_OP, IOCTL_PRIVCMD_HYPERCALL
from xendmop.abi.xen import DOMID_INVALID
from xendmop.depriv import check
from xendmop.depriv.probe import (
    FdKind,
    Verdict,
    device_table,
    list_fds,
    pidfd_getfd,
    pidfd_open,
    probe_evtchn,
    probe_privcmd,
)

HOLDER = r"""
import json, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
os.lseek(fd, 123, os.SEEK_SET)
print(json.dumps({"fd": fd}), flush=True)
sys.stdin.read()
"""


class FakeKernel:
    """An ioctl that answers per request number: an errno, or a return value."""

    def __init__(self, answers: dict[int, list[int | str]]) -> None:
        self.answers = answers
        self.calls: list[tuple[int, int, Any]] = []

    def __call__(self, fd: int, request: int, arg: Any) -> int:
        self.calls.append((fd, request, type(arg).from_buffer_copy(arg)))
        answer = self.answers[request].pop(0)
        if isinstance(answer, str):
            err = getattr(errno, answer)
            raise OSError(err, os.strerror(err))
        return answer

    def requests(self) -> list[int]:
        return [r for _, r, _ in self.calls]


DM, HC = IOCTL_PRIVCMD_DM_OP, IOCTL_PRIVCMD_HYPERCALL


def test_restricted_privcmd():
    k = FakeKernel({DM: ["EPERM"], HC: ["EPERM"]})
    result = probe_privcmd(3, ioctl=k)
    assert result.verdict is Verdict.RESTRICTED and result.ok
    dm = k.calls[0][2]
    assert (dm.dom, dm.num, dm.ubufs) == (DOMID_INVALID, 0, None), "an empty DM_OP to another domain"
    assert k.calls[1][2].op == 17, "xen_version"


def test_unrestricted_privcmd_makes_no_hypercall():
    k = FakeKernel({DM: [0]})
    assert probe_privcmd(3, ioctl=k).verdict is Verdict.UNRESTRICTED
    assert k.requests() == [DM]


def test_privcmd_on_a_kernel_without_dm_op():
    assert probe_privcmd(3, ioctl=FakeKernel({DM: ["ENOTTY"], HC: ["EPERM"]})).verdict is Verdict.RESTRICTED
    assert probe_privcmd(3, ioctl=FakeKernel({DM: ["ENOTTY"], HC: [0x40011]})).verdict is Verdict.UNRESTRICTED
    assert probe_privcmd(3, ioctl=FakeKernel({DM: ["ENOTTY"], HC: ["ENOTTY"]})).verdict is Verdict.UNKNOWN


def test_inconsistent_answers_are_not_restricted():
    assert probe_privcmd(3, ioctl=FakeKernel({DM: ["EPERM"], HC: [0x40011]})).verdict is Verdict.UNRESTRICTED
    assert probe_privcmd(3, ioctl=FakeKernel({DM: ["EFAULT"], HC: ["EPERM"]})).verdict is Verdict.UNKNOWN


def test_privcmd_target_domain():
    k = FakeKernel({DM: ["EPERM", 0], HC: ["EPERM"]})
    assert probe_privcmd(3, target=5, ioctl=k).verdict is Verdict.RESTRICTED
    assert k.calls[2][2].dom == 5 and k.calls[2][2].num == 0
    k = FakeKernel({DM: ["EPERM", "EPERM"], HC: ["EPERM"]})
    assert probe_privcmd(3, target=5, ioctl=k).verdict is Verdict.WRONG_DOMAIN


def test_evtchn():
    k = FakeKernel({IOCTL_EVTCHN_BIND_INTERDOMAIN: ["EACCES"]})
    assert probe_evtchn(4, ioctl=k).verdict is Verdict.RESTRICTED
    bind = k.calls[0][2]
    assert (bind.remote_domain, bind.remote_port) == (DOMID_INVALID, 0)
    assert probe_evtchn(4, ioctl=FakeKernel({IOCTL_EVTCHN_BIND_INTERDOMAIN: ["ESRCH"]})).verdict is Verdict.UNRESTRICTED
    assert probe_evtchn(4, ioctl=FakeKernel({IOCTL_EVTCHN_BIND_INTERDOMAIN: ["EINVAL"]})).verdict is Verdict.UNKNOWN


def test_evtchn_bound_port_is_undone():
    k = FakeKernel({IOCTL_EVTCHN_BIND_INTERDOMAIN: [7], IOCTL_EVTCHN_UNBIND: [0]})
    assert probe_evtchn(4, ioctl=k).verdict is Verdict.UNRESTRICTED
    assert k.requests()[1] == IOCTL_EVTCHN_UNBIND and k.calls[1][2].port == 7


def test_classification_of_own_fds(tmp_path):
    memfd = os.memfd_create("ram")
    a, b = socket.socketpair()
    r, w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    f = os.open(tmp_path / "x", os.O_CREAT | os.O_WRONLY | os.O_APPEND)
    try:
        kinds = {i.fd: i for i in list_fds("self")}
        assert kinds[memfd].kind is FdKind.MEMFD
        assert kinds[a.fileno()].kind is FdKind.SOCKET
        assert kinds[r].kind is FdKind.PIPE and kinds[w].access == "w"
        assert kinds[null].kind is FdKind.DEVNULL and kinds[null].access == "r"
        assert kinds[d].kind is FdKind.DIRECTORY
        assert kinds[f].kind is FdKind.REGULAR and kinds[f].access == "wa"
    finally:
        for fd in (memfd, r, w, null, d, f):
            os.close(fd)
        a.close()
        b.close()


def test_device_numbers_win_over_names():
    """A node with another name (made in a chroot) is recognised by its device number."""
    zero = os.stat("/dev/zero").st_rdev
    fd = os.open("/dev/zero", os.O_RDONLY)
    try:
        kinds = {i.fd: i.kind for i in list_fds("self", {zero: FdKind.PRIVCMD})}
        assert kinds[fd] is FdKind.PRIVCMD
        assert device_table({"/dev/zero": FdKind.EVTCHN, "/nonexistent": FdKind.PRIVCMD}) == {zero: FdKind.EVTCHN}
    finally:
        os.close(fd)


def test_pidfd_getfd_copies_the_open_file(spawn, tmp_path):
    path = tmp_path / "shared"
    path.write_bytes(bytes(4096))
    child = spawn(HOLDER, str(path))
    their = child.ready()["fd"]
    try:
        pidfd = pidfd_open(child.pid)
    except OSError as e:
        pytest.skip(f"pidfd_open: {e} (Linux < 5.3?)")
    try:
        try:
            copy = pidfd_getfd(pidfd, their)
        except OSError as e:
            if e.errno in (errno.ENOSYS, errno.EPERM):
                pytest.skip(f"pidfd_getfd: {e} (Linux < 5.6, or no ptrace rights)")
            raise
        with pytest.raises(OSError) as bad:
            pidfd_getfd(pidfd, 999)
        assert bad.value.errno == errno.EBADF
    finally:
        os.close(pidfd)
    try:
        mine, st = os.fstat(copy), os.stat(path)
        assert (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)
        assert os.lseek(copy, 0, os.SEEK_CUR) == 123, "the same open file description (shared offset)"
        assert not os.get_inheritable(copy)
    finally:
        os.close(copy)
    assert child.finish()[0] == 0


def test_checker_probes_a_stolen_fd(spawn, tmp_path):
    """The whole probe path on a real fd of another process: /dev/zero posing as privcmd."""
    child = spawn(HOLDER, "/dev/zero")
    their = child.ready()["fd"]
    devices = {os.stat("/dev/zero").st_rdev: FdKind.PRIVCMD}
    seen: list[int] = []

    def restricted(fd: int, request: int, arg: Any) -> int:
        seen.append(fd)
        raise OSError(errno.EPERM, "restricted")

    try:
        report = check.inspect(child.pid, devices=devices, ioctl=restricted, xen_host=True)
    except check.InspectError as e:
        pytest.skip(f"cannot inspect a child: {e}")
    fd = next(f for f in report.fds if f.info.fd == their)
    if fd.status is check.Status.ERROR and "copy" in fd.detail:
        pytest.skip(fd.detail)
    assert fd.info.kind is FdKind.PRIVCMD and fd.status is check.Status.PASS
    assert len(seen) == 2, "DM_OP then HYPERCALL, on the copy"
    assert next(c for c in report.checks if c.name == "xen-fds").status is check.Status.PASS

    # the real /dev/zero answers ENOTTY: nothing proven -> error, exit 2 unless other findings
    report = check.inspect(child.pid, devices=devices, xen_host=True)
    fd = next(f for f in report.fds if f.info.fd == their)
    assert fd.status is check.Status.ERROR and "ENOTTY" in fd.detail
    assert status_of(report, "xen-fds") is check.Status.FAIL

    # an fd that answers like an unrestricted privcmd is a finding
    report = check.inspect(child.pid, devices=devices, ioctl=lambda fd, req, arg: 0, xen_host=True)
    fd = next(f for f in report.fds if f.info.fd == their)
    assert fd.status is check.Status.FAIL and "unrestricted" in fd.detail
    assert report.exit_code() == 1
    assert child.finish()[0] == 0


def status_of(report: check.Report, name: str) -> check.Status:
    return next(c for c in report.checks if c.name == name).status
