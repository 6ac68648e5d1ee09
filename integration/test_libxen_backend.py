"""The libxen backend (Xen's C libraries through ctypes) against the privcmd backend on a
real Xen: every scenario of scenarios.py through ``DeviceModel.open("libxen")`` and
``DeviceModel.open("privcmd")``, all on the same paused PVH guest where the scenario leaves
the guest as it found it (else one fresh guest each); same values, same errnos, same outputs.

HAZARD: the scenarios issue only REJECTED set_isa_irq_level calls (an accepted one against
a PVH guest crashed Xen 4.17.7), and stop VRAM tracking only with the empty bitmap inside a
page (a page-aligned 0-byte buffer oopsed the dom0 kernel once): see scenarios.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
import scenarios
import xenlab

xendmop = pytest.importorskip("xendmop", reason="xendmop is not importable (PYTHONPATH should be the checkout)")


def _open_libxen() -> Any:
    try:
        return xendmop.DeviceModel.open("libxen")
    except OSError as e:  # FileNotFoundError: a library is missing; NotXenHostError
        pytest.skip(f"libxen backend unavailable: {e}")


def test_every_scenario_gives_the_same_outcomes_through_libxen_and_privcmd(
    make_guest: Callable[..., xenlab.Guest], missing_domid: int, pv_domid: int | None
) -> None:
    _open_libxen().close()
    others = {scenarios.DOM0: 0, scenarios.MISSING: missing_domid}
    if pv_domid is not None:
        others[scenarios.PV] = pv_domid
    runs: dict[str, scenarios.Runs] = {"privcmd": {}, "libxen": {}}
    shared = make_guest(vcpus=scenarios.GUEST_VCPUS, memory_mb=scenarios.GUEST_MEMORY_MB)
    chosen = scenarios.SCENARIOS if xenlab.X86 else (scenarios.ARM,)  # each architecture's ops
    for scenario in chosen:
        for backend in ("privcmd", "libxen"):
            guest = shared
            if not scenario.reuses_guest:
                guest = make_guest(vcpus=scenarios.GUEST_VCPUS, memory_mb=scenarios.GUEST_MEMORY_MB)
            with _open_libxen() if backend == "libxen" else xendmop.DeviceModel.open("privcmd") as dm:
                assert dm.backend.name == backend
                runs[backend][scenario.name] = scenarios.run_scenario(scenario, dm, {**others, "guest": guest.domid})
    report = scenarios.compare(("privcmd", "libxen"), runs["privcmd"], runs["libxen"], known={}, scenarios=chosen)
    print("\n".join(report.lines()))
    reused = sum(s.reuses_guest for s in chosen)
    print(f"libxen vs privcmd: {report.summary()} ({reused} scenarios on one guest, both backends)")
    out = os.environ.get("XENDMOP_LAB_RESULTS")
    if out:
        with open(os.path.join(out, "libxen_vs_privcmd.json"), "w") as f:
            json.dump(report.as_json(), f, indent=1)
    assert [(r.scenario, r.step, r.got) for r in report.differences] == []
    assert report.count("identical") > (100 if xenlab.X86 else 20)  # the comparison ran, not skipped


def test_errors_name_the_op_and_domain(guest: xenlab.Guest, missing_domid: int) -> None:
    with _open_libxen() as dm:
        assert dm.nr_vcpus(guest.domid) == guest.vcpus
        with pytest.raises(ProcessLookupError) as missing:
            dm.nr_vcpus(missing_domid)
        with pytest.raises(PermissionError) as dom0:
            dm.nr_vcpus(0)
    assert (missing.value.op, missing.value.domid) == ("nr_vcpus", missing_domid)
    assert (dom0.value.op, dom0.value.domid) == ("nr_vcpus", 0)
