"""The op table's `since` and `arch`, checked against the running hypervisor.

Each DMOP number, sent with only the 8-byte header in `bufs[0]`, tells whether this Xen's
`dm_op` has a case for it: a known op's `op_size[op]` is not met (EFAULT), an unknown one is
EOPNOTSUPP (xen/arch/x86/hvm/dm.c, dm_op, from 4.11 on; on Arm xen/arch/arm/dm.c, dm_op, whose
op_size has only the ops Arm has, the others reaching ioreq_server_dm_op's EOPNOTSUPP).  The
answers of the real Xen, of the mock simulating the same release and architecture, and of the
table (`since` <= release, this architecture in `arch`) must be one and the same.  The report is
saved as op_table_vs_xen.json.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
from collections.abc import Callable
from typing import Any

import pytest
import scenarios
import xenlab

xendmop = pytest.importorskip("xendmop", reason="xendmop is not importable (PYTHONPATH should be the checkout)")
from xendmop.abi.privcmd import IOCTL_PRIVCMD_DM_OP, privcmd_dm_op, privcmd_dm_op_buf  # noqa: E402
from xendmop.cli import xen_version  # noqa: E402
from xendmop.mock import MockXen  # noqa: E402
from xendmop.mock.hypervisor import Hypervisor, parse_xen_version  # noqa: E402
from xendmop.ops import NR_OPS, OPS  # noqa: E402

Ioctl = Callable[[int, Any], Any]
#: this dom0's architecture by the op table's and the mock's name
ARCH = "x86" if xenlab.X86 else "arm"


def header_only(ioctl: Ioctl, domid: int, number: int) -> str:
    """The errno name of DM_OP `number` with a header-only `bufs[0]` ("0" if it succeeded)."""
    header = ctypes.create_string_buffer(number.to_bytes(4, "little") + bytes(4), 8)
    bufs = (privcmd_dm_op_buf * 1)(privcmd_dm_op_buf(uptr=ctypes.addressof(header), size=8))
    req = privcmd_dm_op(dom=domid, num=1, ubufs=ctypes.addressof(bufs))
    try:
        ioctl(IOCTL_PRIVCMD_DM_OP, req)
    except OSError as e:
        return scenarios.errno_name(e.errno or 0)
    return "0"


def test_op_table_since_matches_xen(guest: xenlab.Guest, privcmd_fd: int) -> None:
    running = xen_version()
    assert running is not None, "no /sys/hypervisor/version in dom0"
    version = parse_xen_version(running)
    numbers = range(NR_OPS + 3)
    xen = {n: header_only(lambda code, arg: fcntl.ioctl(privcmd_fd, code, arg), guest.domid, n) for n in numbers}
    with MockXen(arch=ARCH, xen_version=version) as host:
        domid = host.create_domain(vcpus=2, hvm=True, memory_mb=16)
        dev = host.open_device("/dev/xen/privcmd")
        mock = {n: header_only(dev.ioctl, domid, n) for n in numbers}
    known = Hypervisor(arch=ARCH, xen_version=version).ops
    table = {n: "EFAULT" if n in known else "EOPNOTSUPP" for n in numbers}
    rows = [
        {"op": n, "name": OPS[n].name if n in OPS else None, "xen": xen[n], "mock": mock[n], "table": table[n]}
        for n in numbers
    ]
    differ = [r for r in rows if not r["xen"] == r["mock"] == r["table"]]
    summary = f"{len(rows)} op numbers at Xen {running} ({ARCH}): " + (
        "table, mock and Xen agree" if not differ else f"{len(differ)} differ"
    )
    out = os.environ.get("XENDMOP_LAB_RESULTS")
    if out:
        with open(os.path.join(out, "op_table_vs_xen.json"), "w") as f:
            json.dump({"summary": summary, "xen_version": running, "ops": rows}, f, indent=1)
    print(summary)
    assert not differ, differ
    # every op the table gives this architecture at this release exists in it, and nothing past the table does
    assert {n for n, v in xen.items() if v == "EFAULT"} == {n for n, d in OPS.items() if ARCH in d.arch}
