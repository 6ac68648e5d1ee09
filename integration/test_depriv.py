"""On a real Xen dom0 only: restrict real privcmd/evtchn fds and probe them from outside.

Skipped (with the reason) without ``/dev/xen/privcmd`` and ``/dev/xen/evtchn`` or without
root.  Run in dom0 by the lab (integration/lab/run.py).  No domain needs to exist:
restriction only records a domid, and every probe is side-effect free.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.depriv.helpers import Child  # the same child-process harness as tests/depriv
from xendmop.depriv import check

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(
        not (os.path.exists("/dev/xen/privcmd") and os.path.exists("/dev/xen/evtchn")),
        reason="needs a Xen dom0 (/dev/xen/privcmd and /dev/xen/evtchn)",
    ),
]

DOMID = 3


@pytest.fixture
def spawn():
    children = []

    def make(code, *args):
        children.append(Child(code, *args))
        return children[-1]

    yield make
    for child in children:
        child.kill()

# Opens privcmd through the library and evtchn raw; restricts both (or not); blocks.
CHILD = r"""
import fcntl, json, os, sys
from xendmop.abi.evtchn import IOCTL_EVTCHN_RESTRICT_DOMID, ioctl_evtchn_restrict_domid
from xendmop.backends.privcmd import PrivcmdBackend
from xendmop.devicemodel import DeviceModel
from xendmop.depriv import restrict_all

class Evtchn:
    def __init__(self):
        self.fd = os.open("/dev/xen/evtchn", os.O_RDWR | os.O_CLOEXEC)
    def fileno(self):
        return self.fd
    def restrict(self, domid):
        fcntl.ioctl(self.fd, IOCTL_EVTCHN_RESTRICT_DOMID, ioctl_evtchn_restrict_domid(domid))

dm, ev = DeviceModel(PrivcmdBackend()), Evtchn()
if sys.argv[1] == "restrict":
    restrict_all(int(sys.argv[2]), {"devicemodel": dm, "evtchn": ev})
print(json.dumps({"privcmd": dm.backend.device.fileno(), "evtchn": ev.fileno()}), flush=True)
sys.stdin.read()
"""


def probe_statuses(pid: int, fds: dict[str, int], capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, str]:
    code = check.main([str(pid), "--json", *extra])
    result = json.loads(capsys.readouterr().out)
    by_fd = {f["fd"]: f for f in result["fds"]}
    assert by_fd[fds["privcmd"]]["kind"] == "privcmd" and by_fd[fds["evtchn"]]["kind"] == "evtchn"
    statuses = {name: by_fd[fd]["status"] for name, fd in fds.items()}
    statuses["exit"] = str(code)
    return statuses


def test_restricted_fds_prove_restricted(spawn, capsys):
    child = spawn(CHILD, "restrict", str(DOMID))
    fds = child.ready()
    got = probe_statuses(child.pid, fds, capsys, "--domid", str(DOMID))
    assert got["privcmd"] == "pass" and got["evtchn"] == "pass"
    # restricted to DOMID, so "must be restricted to DOMID + 1" is a finding
    assert probe_statuses(child.pid, fds, capsys, "--domid", str(DOMID + 1))["privcmd"] == "fail"
    assert child.finish()[0] == 0


def test_unrestricted_fds_are_findings(spawn, capsys):
    child = spawn(CHILD, "open-only", str(DOMID))
    fds = child.ready()
    got = probe_statuses(child.pid, fds, capsys)
    assert got["privcmd"] == "fail" and got["evtchn"] == "fail" and got["exit"] == "1"
    assert child.finish()[0] == 0


def test_restrict_all_audits_this_process():
    from xendmop.depriv import audit_self

    fd = os.open("/dev/xen/privcmd", os.O_RDWR | os.O_CLOEXEC)
    try:
        report = audit_self(DOMID)
        result = next(r for i, r in report.probed if i.fd == fd)
        assert not result.ok, "a fresh privcmd fd is unrestricted"
    finally:
        os.close(fd)
