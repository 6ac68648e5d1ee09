"""Smoke tests on a real Xen with nothing but raw ioctls and libxendevicemodel (via ctypes):
they hold whether or not xendmop works, and pin down what the library must match."""

from __future__ import annotations

import errno
import json
import os
import time

import pytest
import xenlab


def test_dm_op_probe_with_no_buffers(privcmd_fd: int) -> None:
    # libxendevicemodel's probe at open: num=0 never reaches Xen and succeeds.
    xenlab.raw_dm_op(privcmd_fd, xenlab.DOMID_INVALID, [])


def test_nr_vcpus_on_a_paused_pvh_guest(privcmd_fd: int, guest: xenlab.Guest, libxdm: xenlab.LibXDM) -> None:
    assert xenlab.raw_nr_vcpus(privcmd_fd, guest.domid) == guest.vcpus == 2
    assert libxdm.nr_vcpus(guest.domid) == 2


def test_nr_vcpus_on_dom0_is_eperm(privcmd_fd: int, libxdm: xenlab.LibXDM) -> None:
    with pytest.raises(OSError) as raw:
        xenlab.raw_nr_vcpus(privcmd_fd, 0)
    with pytest.raises(OSError) as lib:
        libxdm.nr_vcpus(0)
    assert raw.value.errno == lib.value.errno == errno.EPERM


def test_nr_vcpus_on_a_missing_domain_is_esrch(privcmd_fd: int, libxdm: xenlab.LibXDM, missing_domid: int) -> None:
    with pytest.raises(OSError) as raw:
        xenlab.raw_nr_vcpus(privcmd_fd, missing_domid)
    with pytest.raises(OSError) as lib:
        libxdm.nr_vcpus(missing_domid)
    assert raw.value.errno == lib.value.errno == errno.ESRCH


def test_unknown_op_is_eopnotsupp(privcmd_fd: int, guest: xenlab.Guest) -> None:
    with pytest.raises(OSError) as e:
        xenlab.raw_dm_op(privcmd_fd, guest.domid, [xenlab.raw_op_buffer(xenlab.XEN_DMOP_OP_COUNT)])
    assert e.value.errno == errno.EOPNOTSUPP


def test_nonzero_pad_is_einval(privcmd_fd: int, guest: xenlab.Guest) -> None:
    with pytest.raises(OSError) as e:
        xenlab.raw_dm_op(privcmd_fd, guest.domid, [xenlab.raw_op_buffer(xenlab.XEN_DMOP_NR_VCPUS, pad=1)])
    assert e.value.errno == errno.EINVAL


def test_dm_op_round_trip_time(privcmd_fd: int, guest: xenlab.Guest, libxdm: xenlab.LibXDM) -> None:
    """Not a pass/fail figure: recorded in the results share for the lab's README."""
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        xenlab.raw_nr_vcpus(privcmd_fd, guest.domid)
    t1 = time.perf_counter()
    for _ in range(n):
        libxdm.nr_vcpus(guest.domid)
    t2 = time.perf_counter()
    figures = {"raw_ioctl_nr_vcpus_us": (t1 - t0) / n * 1e6, "libxendevicemodel_nr_vcpus_us": (t2 - t1) / n * 1e6}
    print(figures)
    out = os.environ.get("XENDMOP_LAB_RESULTS")
    if out:
        with open(os.path.join(out, "dm_op_timings.json"), "w") as f:
            json.dump(figures, f)


@pytest.mark.x86_only("port IO, and IO no server claims completed with all ones: on Arm that MMIO is a data abort")
def test_tiny_guest_runs_its_script_without_a_device_model(make_guest) -> None:  # type: ignore[no-untyped-def]
    # With no ioreq server claiming them, Xen completes IO itself: reads give all ones,
    # writes vanish.  This checks the guest interpreter and the harness, not xendmop.
    s = xenlab.Script()
    s.print("smoke")
    s.out(0x5600, 1, 0x12)
    b = s.inp(0x5600, 1, expect=0xFF)
    w = s.inp(0x5602, 2, expect=0xFFFF)
    d = s.inp(0x5604, 4, expect=0xFFFFFFFF)
    m = s.mmio_read(0xFE000000, 4, expect=0xFFFFFFFF)
    s.mmio_write(0xFE000000, 2, 0x1234)
    p = s.pci_read(0, 3, 0, 0, 4, expect=0xFFFFFFFF)
    st = s.ins(0x5600, 1, 8, expect=b"\xff" * 8)
    s.outs(0x5600, 1, b"abcdefgh")
    guest = make_guest(s)
    t0 = time.monotonic()
    guest.unpause()
    lines = guest.wait_done(timeout=60)
    elapsed = time.monotonic() - t0
    print(f"guest ran {len(s.records)} records in {elapsed:.2f} s: {lines}")
    assert "smoke" in lines
    reads = xenlab.parse_reads(lines)
    assert reads[b].value == 0xFF and reads[w].value == 0xFFFF and reads[d].value == 0xFFFFFFFF
    assert reads[m].value == 0xFFFFFFFF and reads[p].value == 0xFFFFFFFF and reads[st].ok
    assert xenlab.guest_failures(lines) == 0
