"""Xen on Arm64 (the lab's ``--arch arm64``): what exists only there, against real Xen/Arm.

- Every DMOP Xen/Arm has, and x86's refused (``scenarios.ARM``), through xendmop and
  libxendevicemodel alike and on the mock (``MockXen(arch="arm")``) for the same guest shape;
  the report is out/mock_vs_xen_arm.json.  ``XEN_DMOP_set_irq_level`` (xen/arch/arm/dm.c,
  ``dm_op``) takes SPIs only: irq < 32 (SGIs and PPIs, ``NR_LOCAL_IRQS``) and irq >= the
  domain's vGIC size (``vgic_num_irqs``) are EINVAL, as are a level other than 0/1 and an SPI
  Xen itself gave the guest (``allocated_irqs``: the SBSA UART's SPI 32).
- An ioreq server for MMIO on an Arm guest: the tiny Arm64 guest (integration/lab/guest/arm64)
  writes and reads a device page served by ``xendmop.runtime.IoreqServer`` and echoes what it
  read to a report page the same server serves.

Skipped on x86, saying so: there ``set_irq_level`` does not exist (EOPNOTSUPP, in the x86 tests).
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections.abc import Callable

import pytest
import scenarios
import xenlab

xendmop = pytest.importorskip("xendmop", reason="xendmop is not importable (PYTHONPATH should be the checkout)")
from xendmop.cli import xen_version  # noqa: E402
from xendmop.mock.hypervisor import parse_xen_version  # noqa: E402
from xendmop.runtime import IoreqServer, ServeLoop  # noqa: E402

pytestmark = pytest.mark.skipif(xenlab.X86, reason="Arm only: XEN_DMOP_set_irq_level and the Arm64 guest")


def _save(name: str, data: object) -> None:
    out = os.environ.get("XENDMOP_LAB_RESULTS")
    if out:
        with open(os.path.join(out, name), "w") as f:
            json.dump(data, f, indent=1)


def test_arm_dmops_xendmop_libxendevicemodel_and_the_mock_agree(
    make_guest: Callable[..., xenlab.Guest], missing_domid: int
) -> None:
    """scenarios.ARM (Arm's ops, set_irq_level's SPI rules, x86's ops refused) through xendmop's
    privcmd backend and libxendevicemodel on real Arm guests, and on the mock's Arm guest."""
    only = (scenarios.ARM,)
    domids = {scenarios.DOM0: 0, scenarios.MISSING: missing_domid}

    def real_guest(scenario: scenarios.Scenario) -> int:
        return make_guest(vcpus=scenarios.GUEST_VCPUS, memory_mb=scenarios.GUEST_MEMORY_MB).domid

    ours = scenarios.run_all(lambda: xendmop.DeviceModel.open("privcmd"), real_guest, domids, only)
    theirs = scenarios.run_all(xenlab.LibXDM, real_guest, domids, only)
    running = xen_version()
    with scenarios.MockLab(xen_version=parse_xen_version(running or "4.17"), arch="arm") as lab:
        mock = lab.run(only)
    reports = {
        "xendmop_vs_libxendevicemodel": scenarios.compare(("xendmop", "libxendevicemodel"), ours, theirs,
                                                          known={}, scenarios=only),
        "mock_vs_xen": scenarios.compare(("xen", "mock"), ours, mock, known={}, scenarios=only),
        "xen_vs_declared": scenarios.compare(("declared", "xen"), scenarios.expected_runs(only), ours,
                                             known={}, scenarios=only),
    }  # fmt: skip
    for name, report in reports.items():
        print(f"{name}: {report.summary()}")
        print("\n".join(report.lines()))
    _save("mock_vs_xen_arm.json", {"xen_version": running, **{k: r.as_json() for k, r in reports.items()}})
    assert {k: [(r.step, r.got) for r in v.differences] for k, v in reports.items()} == {k: [] for k in reports}
    assert reports["mock_vs_xen"].count("identical") == len(scenarios.ARM.steps)


def test_set_irq_level_errors_name_the_op_and_the_domain(guest: xenlab.Guest) -> None:
    with xendmop.DeviceModel.open("privcmd") as dm, pytest.raises(xendmop.XenError) as e:
        dm.set_irq_level(guest.domid, 16, 1)
    assert (e.value.errno, e.value.op, e.value.domid) == (errno.EINVAL, "set_irq_level", guest.domid)


class Report:
    """The Arm64 guest's report page: offset 0 the failure count (its last write), 4 + 4*i the
    value record i read."""

    def __init__(self) -> None:
        self.values: dict[int, int] = {}
        self.failures: int | None = None
        self.done = threading.Event()

    def read(self, addr: int, size: int) -> int:
        return 0

    def write(self, addr: int, size: int, value: int) -> None:
        if addr == 0:
            self.failures = value
            self.done.set()
        else:
            self.values[(addr - 4) // 4] = value


def test_ioreq_server_serves_an_arm_guests_mmio(make_guest: Callable[..., xenlab.Guest]) -> None:
    s = xenlab.Script()
    s.mmio_write(scenarios.ARM_MMIO + 0x20, 4, 0x01020304)
    w = s.mmio_read(scenarios.ARM_MMIO + 0x20, 4, expect=0x01020304)
    h = s.mmio_read(scenarios.ARM_MMIO + 0x22, 2, expect=0x0102)
    s.mmio_write(scenarios.ARM_MMIO + 0x31, 1, 0xA5)
    b = s.mmio_read(scenarios.ARM_MMIO + 0x31, 1, expect=0xA5)
    s.mmio_write(scenarios.ARM_MMIO + 0x40, 2, 0xBEEF)
    first = s.mmio_read(scenarios.ARM_MMIO + 0x40, 2, expect=0xBEEF)
    s.loop(first, 50)  # 50 more round trips of one read
    guest = make_guest(s, vcpus=1, on_poweroff="preserve")
    page, report = xenlab.RegisterFile(4096), Report()
    with xendmop.DeviceModel.open("privcmd") as dm:
        server = IoreqServer(dm, guest.domid)
        server.add_mmio_range(scenarios.ARM_MMIO, scenarios.ARM_MMIO + 0xFFF, page, "device")
        server.add_mmio_range(xenlab.ARM_REPORT, xenlab.ARM_REPORT + xenlab.ARM_REPORT_SIZE - 1, report, "report")
        with xenlab.running_in_thread(ServeLoop(server)):
            deadline = time.monotonic() + 60
            while not server.running and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.running, "the server did not come up"
            t0 = time.monotonic()
            guest.unpause()
            assert report.done.wait(120), f"the guest never reported; device accesses so far: {page.seen[:20]}"
            elapsed = time.monotonic() - t0
    print(f"Arm guest served: {len(page.seen)} device accesses in {elapsed:.2f} s; reads echoed {report.values}")
    assert report.failures == 0
    assert {i: report.values.get(i) for i in (w, h, b, first)} == {w: 0x01020304, h: 0x0102, b: 0xA5, first: 0xBEEF}
    in_order = [("w", 0x20, 4), ("r", 0x20, 4), ("r", 0x22, 2), ("w", 0x31, 1), ("r", 0x31, 1), ("w", 0x40, 2)]
    assert page.seen[:6] == in_order
    assert page.seen.count(("r", 0x40, 2)) == 50
    _save("arm_ioreq.json", {"device_accesses": len(page.seen), "seconds": round(elapsed, 3)})
