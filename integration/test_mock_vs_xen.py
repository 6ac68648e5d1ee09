"""The mock against real Xen: every scenario of scenarios.py on real PVH guests and on a
MockXen guest of the same shape, in the same dom0 process, compared step by step.

A difference fails unless scenarios.KNOWN_DIFFERENCES lists it (with the reason and the Xen
source); real Xen must also give the outcome each step declares.  The report (every step,
both sides) is saved as mock_vs_xen.json in the lab's results share.

HAZARD: the scenarios issue only REJECTED set_isa_irq_level calls (an accepted one against
a PVH guest crashed Xen 4.17.7), and stop VRAM tracking only with the empty bitmap inside a
page (a page-aligned 0-byte buffer oopsed the dom0 kernel once): see scenarios.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest
import scenarios
import xenlab

xendmop = pytest.importorskip("xendmop", reason="xendmop is not importable (PYTHONPATH should be the checkout)")

pytestmark = pytest.mark.x86_only(
    "scenarios.SCENARIOS are x86 ops on PVH and PV guests; Arm's comparison is test_arm.py"
)

def _trace(line: str) -> None:
    # Straight to the results share: if a step takes dom0 down, the last line says which.
    out = os.environ.get("XENDMOP_LAB_RESULTS")
    if out:
        with open(os.path.join(out, "mock_vs_xen.trace"), "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


def test_mock_agrees_with_xen(
    make_guest: Callable[..., xenlab.Guest], missing_domid: int, pv_domid: int | None
) -> None:
    domids = {scenarios.DOM0: 0, scenarios.MISSING: missing_domid}
    if pv_domid is not None:
        domids[scenarios.PV] = pv_domid

    def real_guest(scenario: scenarios.Scenario) -> int:
        return make_guest(vcpus=scenarios.GUEST_VCPUS, memory_mb=scenarios.GUEST_MEMORY_MB).domid

    xen = scenarios.run_all(lambda: xendmop.DeviceModel.open("privcmd"), real_guest, domids, trace=_trace)
    from xendmop.cli import xen_version

    running = xen_version()
    assert running is not None, "no /sys/hypervisor/version in dom0"
    with scenarios.MockLab(xen_version=running) as lab:  # the mock simulates the release it is held to
        mock = lab.run()
    report = scenarios.compare(("xen", "mock"), xen, mock)
    as_declared = scenarios.compare(("declared", "xen"), scenarios.expected_runs(), xen, known={})
    print("\n".join(report.lines()))
    print(f"mock vs xen: {report.summary()}")
    saved = {
        "mock_vs_xen": report.as_json(),
        "xen_vs_declared": as_declared.as_json(),
        "pv_guest": pv_domid is not None,
        "xen_version": running,
    }
    out = os.environ.get("XENDMOP_LAB_RESULTS")
    if out:
        path = os.path.join(out, "mock_vs_xen.json")
        with open(path, "w") as f:
            json.dump(saved, f, indent=1)
        print(f"report saved as {path} (out/mock_vs_xen.json in the run's results folder)")
    assert [(r.scenario, r.step, r.got) for r in report.differences] == []
    assert [(r.scenario, r.step, r.got) for r in as_declared.differences] == []
    assert report.count("identical") > 100
