"""A deprivileged device model against the mock host in another process: it keeps serving its
guest after dropping root, and every DMOP/evtchn attempt on another domain is refused."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from xendmop.depriv import check
from xendmop.mock.remote import RemoteGuest, RemoteXen

from .helpers import TIMEOUT, Child, needs_root

DOMID = 1
UID = GID = 60100 + DOMID
UART = 0x3F8

# Sets up its ioreq server over the mock host socket, deprivileges (IoreqServer(deprivilege=)),
# then tries other domains and reports; serves until SIGTERM.
DM_CHILD = r"""
import json, os, sys
from xendmop import DeviceModel
from xendmop.abi.privcmd import IOCTL_PRIVCMD_DM_OP, privcmd_dm_op
from xendmop.depriv import DropConfig
from xendmop.mock.remote import connect_from_env
from xendmop.runtime.server import IoreqServer, ServeLoop

cfg = json.loads(sys.argv[1])
domid, other = cfg["domid"], cfg["other"]


class Regs:
    def __init__(self):
        self.values = {}

    def read(self, off, size):
        return self.values.get(off, 0)

    def write(self, off, size, value):
        self.values[off] = value


def attempt(fn):
    try:
        fn()
        return 0
    except OSError as e:
        return e.errno


remote = connect_from_env()
dm = DeviceModel.open("mock", xen=remote)
drop = DropConfig(uid=cfg["uid"], gid=cfg["gid"], chroot=cfg["chroot"])
server = IoreqServer(dm, domid, opener=remote.open_device, deprivilege=drop)
server.add_port_range(0x3F8, 0x3FF, Regs(), "regs")
server.start()
evtchn = server._evtchn
raw_dm_op = privcmd_dm_op(dom=other, num=0)
report = {
    "ids": os.getresuid() + os.getresgid(),
    "root": os.listdir("/"),
    # the raw ioctl reaches the mock's privcmd rule; the typed call is refused before it
    "dm_op_other_raw": attempt(lambda: dm.backend.device.ioctl(IOCTL_PRIVCMD_DM_OP, raw_dm_op)),
    "dm_op_other": attempt(lambda: dm.nr_vcpus(other)),
    "dm_op_own": dm.nr_vcpus(domid),
    "bind_interdomain_other": attempt(lambda: evtchn.bind_interdomain(other, 1)),
    "bind_unbound_other": attempt(lambda: evtchn.bind_unbound_port(other)),
    "open_privcmd": attempt(lambda: remote.open_device("/dev/xen/privcmd")),
    "server": server.id,
}
print(json.dumps(report), flush=True)
ServeLoop(server).run()
print(json.dumps({"stopped": True}), flush=True)
"""


def _by_name(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in result["checks"]}


@needs_root
def test_deprivileged_dm_keeps_serving_and_is_confined_to_its_domain(
    mock_host_process: str, empty_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XENDMOP_MOCK_SOCKET", mock_host_process)  # the child's environment is ours
    with RemoteXen(mock_host_process) as admin:
        other = admin.create_domain(vcpus=1, hvm=True, memory_mb=4)
        cfg = {"domid": DOMID, "other": other, "uid": UID, "gid": GID, "chroot": str(empty_root)}
        dm = Child(DM_CHILD, json.dumps(cfg))
        try:
            report = dm.ready()
            assert report["ids"] == [UID] * 3 + [GID] * 3
            assert report["root"] == []  # chrooted into the empty directory
            assert report["dm_op_other_raw"] == errno.EPERM  # privcmd restricted to dom1 (privcmd_ioctl_dm_op)
            assert report["dm_op_other"] == errno.EPERM
            assert report["dm_op_own"] == 2
            assert report["bind_interdomain_other"] == errno.EACCES  # evtchn restricted (evtchn_ioctl)
            assert report["bind_unbound_other"] == errno.EACCES
            assert report["open_privcmd"] == errno.EACCES  # no longer root: the device node is root's

            with RemoteGuest(mock_host_process, DOMID, timeout=5.0) as guest:  # the guest is still served
                guest.outl(UART, 0xC0FFEE)
                assert guest.inl(UART) == 0xC0FFEE
                assert guest.inb(UART + 1, vcpu=1) == 0

            code = check.main([str(dm.pid), "--json", "--uid", str(UID), "--gid", str(GID)])
            result = json.loads(capsys.readouterr().out)
            checks = _by_name(result)
            for name in ("uids", "gids", "groups", "capabilities", "no_new_privs", "root", "root-empty"):
                assert checks[name]["status"] == "pass", checks[name]
            rlimits = [c["status"] for n, c in checks.items() if n.startswith("rlimit:")]
            assert "pass" in rlimits and set(rlimits) <= {"pass", "info"}, checks
            # privcmd/evtchn here are a socket and an eventfd: no Xen device fd to probe
            assert checks["xen-fds"]["status"] == "skip", checks["xen-fds"]
            assert code == 0, result

            os.kill(dm.pid, signal.SIGTERM)  # the deprivileged DM still tears its server down
            assert json.loads(dm.proc.stdout.readline()) == {"stopped": True}  # type: ignore[union-attr]
            assert dm.proc.wait(TIMEOUT) == 0
            assert admin.servers(DOMID) == {}
        finally:
            dm.kill()
            for stream in (dm.proc.stdin, dm.proc.stdout, dm.proc.stderr):
                if stream is not None:
                    stream.close()
