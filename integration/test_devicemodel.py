"""xendmop.DeviceModel on a real Xen, compared call by call with libxendevicemodel (ctypes).

The same scenario (scenarios.DEVICEMODEL) runs once through each, each on its own fresh
paused PVH guest; every step's outcome (value or errno) must agree, and must be what Xen
4.17 was seen to do.  HAZARD: the scenario issues only REJECTED set_isa_irq_level calls;
an accepted one against a PVH guest crashed Xen 4.17.7 (see scenarios.py).
"""

from __future__ import annotations

import errno
import importlib.util

import pytest
import scenarios
import xenlab

if importlib.util.find_spec("xendmop") is None:
    pytest.skip("xendmop is not importable (PYTHONPATH should be the checkout)", allow_module_level=True)
import xendmop

if not hasattr(xendmop, "DeviceModel"):
    pytest.skip("this xendmop has no DeviceModel yet", allow_module_level=True)

pytestmark = pytest.mark.x86_only(
    "scenarios.DEVICEMODEL's x86 ops on a PVH guest; Arm's are scenarios.ARM in test_arm.py"
)

def test_scenario_matches_libxendevicemodel(make_guest, libxdm: xenlab.LibXDM) -> None:  # type: ignore[no-untyped-def]
    """The step list is scenarios.DEVICEMODEL, shared with the mock-vs-Xen and libxen-backend tests."""
    scenario = scenarios.DEVICEMODEL
    ours_guest, theirs_guest = make_guest(vcpus=2), make_guest(vcpus=2)
    dom0 = {scenarios.DOM0: 0}
    with xendmop.DeviceModel.open(backend="privcmd") as dm:
        ours = scenarios.run_scenario(scenario, dm, {**dom0, scenarios.GUEST: ours_guest.domid})
    theirs = scenarios.run_scenario(scenario, libxdm, {**dom0, scenarios.GUEST: theirs_guest.domid})
    rows = []
    for step, o, t in zip(scenario.steps, ours, theirs):
        # xendmop may refuse out-of-range arguments itself, where C passes them to Xen.
        agree = scenarios.equivalent(o.key, t.key)
        rows.append((step.label, o.key, t.key, step.expect, agree and t.key == step.expect))
    print("\n".join(f"{'ok ' if good else 'BAD'} {label}: xendmop={o!r} libxdm={t!r} expected={e!r}"
                    for label, o, t, e, good in rows))  # fmt: skip
    assert [r[0] for r in rows if not r[4]] == []


def test_nr_vcpus_matches(guest: xenlab.Guest, libxdm: xenlab.LibXDM) -> None:
    with xendmop.DeviceModel.open(backend="privcmd") as dm:
        assert dm.nr_vcpus(guest.domid) == libxdm.nr_vcpus(guest.domid) == guest.vcpus


def test_errors_carry_errno_op_domid(missing_domid: int) -> None:
    with xendmop.DeviceModel.open(backend="privcmd") as dm:
        with pytest.raises(xendmop.XenError) as e:
            dm.nr_vcpus(missing_domid)
        assert isinstance(e.value, ProcessLookupError)
        assert (e.value.errno, e.value.op, e.value.domid) == (errno.ESRCH, "nr_vcpus", missing_domid)
        with pytest.raises(PermissionError):
            dm.nr_vcpus(0)


def test_restricted_handle(guest: xenlab.Guest, missing_domid: int) -> None:
    with xendmop.DeviceModel.open(backend="privcmd") as dm:
        dm.restrict(guest.domid)
        assert dm.nr_vcpus(guest.domid) == guest.vcpus
        with pytest.raises(PermissionError):
            dm.nr_vcpus(missing_domid)  # another domain: EPERM from the restriction, not ESRCH


def test_auto_backend_is_privcmd_in_dom0() -> None:
    with xendmop.DeviceModel.open() as dm:
        assert dm.backend.name == "privcmd"
