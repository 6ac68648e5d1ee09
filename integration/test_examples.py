"""The examples' HVM guard on real Xen: a device model that raises interrupts refuses a PVH
or PV domain before it creates anything (an accepted ISA IRQ change against a PVH guest
crashed Xen 4.17.7: see scenarios.py).  The guard reads the kind through libxenctrl, so
this also proves `xendmop.runtime.dm_program.guest_kind` and `xendmop info DOMID` against the
real hypervisor."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import xenlab

xendmop = pytest.importorskip("xendmop", reason="xendmop is not importable (PYTHONPATH should be the checkout)")
from xendmop.runtime import dm_program  # noqa: E402

pytestmark = pytest.mark.x86_only("the examples' guard reads PVH and PV guests, x86's kinds")

REPO = Path(__file__).resolve().parent.parent
#: the examples that raise interrupts, hence refuse anything but HVM
GUARDED = ("uart16550.py", "pci_edu.py", "tapnet.py")


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, env=env, check=False)


def test_guest_kind_reads_pvh_and_pv_from_the_hypervisor(
    make_guest: Callable[..., xenlab.Guest], pv_domid: int | None
) -> None:
    guest = make_guest()
    assert dm_program.guest_kind(guest.domid) == "pvh"
    if pv_domid is not None:
        assert dm_program.guest_kind(pv_domid) == "pv"
    info = _run("-m", "xendmop", "info", str(guest.domid))
    assert info.returncode == 0, info.stderr
    assert f"dom{guest.domid}: PVH" in info.stdout, info.stdout


@pytest.mark.parametrize("example", GUARDED)
def test_an_interrupting_example_refuses_a_pvh_guest_before_creating_anything(
    make_guest: Callable[..., xenlab.Guest], example: str
) -> None:
    guest = make_guest()
    done = _run(str(REPO / "examples" / example), "--domid", str(guest.domid))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "pvh, not HVM" in done.stderr, done.stderr
    with xendmop.DeviceModel.open("privcmd") as dm:  # nothing left behind: all 8 slots free
        ids = [dm.create_ioreq_server(guest.domid) for _ in range(8)]
        for sid in ids:
            dm.destroy_ioreq_server(guest.domid, sid)
