"""The mock simulates one Xen release: each difference between releases, on both sides of its change.

Every case drives raw bytes through the mock's privcmd at two versions and asserts the errno
each release's code gives (the Xen commit that changed it is cited in xendmop/mock/hypervisor.py).
"""

from __future__ import annotations

import ctypes
import errno as E

import pytest

from xendmop.abi.privcmd import IOCTL_PRIVCMD_MMAP_RESOURCE, privcmd_mmap_resource
from xendmop.mock import MockXen
from xendmop.mock.hypervisor import DEFAULT_XEN_VERSION, OLD_ACQUIRE_RESOURCE_FRAMES, Hypervisor
from xendmop.ops import BY_NAME, NR_OPS, OPS

from .conftest import HVM, PV, make_host
from .raw import Raw, errno_of


def raw_at(version: tuple[int, int] | str, arch: str = "x86") -> Raw:
    return Raw(make_host(xen_version=version, arch=arch))


def header_only(raw: Raw, op: int) -> int:
    """``dm_op`` with ``bufs[0]`` only the 8-byte header: EFAULT if the release has a case for
    ``op`` (its ``op_size`` is not met), EOPNOTSUPP if it has none."""
    raw.build(op)
    return raw.ioctl_dm_op(HVM, raw.bufs(size0=8))


@pytest.mark.parametrize(
    "value, parsed",
    [((4, 17), (4, 17)), ("4.17", (4, 17)), ("4.20.5-pre", (4, 20)), ((4, 21, 2), (4, 21))],
)
def test_a_version_is_taken_as_a_tuple_or_as_xen_prints_it(value, parsed):
    assert Hypervisor(xen_version=value).xen_version == parsed


@pytest.mark.parametrize("value", ["four", "4", (4,), ("4", "17"), 4.17])
def test_a_malformed_version_is_refused_naming_it(value):
    with pytest.raises(ValueError, match=r"xen_version="):
        MockXen(xen_version=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("arch, too_old", [("x86", (4, 8)), ("arm", (4, 14))])
def test_a_release_without_dmop_is_refused(arch, too_old):
    with pytest.raises(ValueError, match=rf"xen_version={too_old[0]}\.{too_old[1]}: Xen on {arch} has DMOP from"):
        MockXen(arch=arch, xen_version=too_old)


def test_the_default_is_the_newest_release_the_lab_checks():
    assert MockXen().hypervisor.xen_version == DEFAULT_XEN_VERSION == (4, 20)


@pytest.mark.parametrize("version", [(4, 9), (4, 10), (4, 11), (4, 14), (4, 15), (4, 17), (4, 20)])
def test_ops_exist_from_their_since_on(version):
    raw = raw_at(version)
    known = {n for n, decl in OPS.items() if "x86" in decl.arch and decl.since <= version}
    for number in range(NR_OPS + 2):
        got = header_only(raw, number)
        if version >= (4, 11):
            assert got == (E.EFAULT if number in known else E.EOPNOTSUPP), (version, number)
        else:  # 4.9/4.10 want the whole struct: the header alone is short for every op
            assert got == E.EFAULT, (version, number)
    assert raw.host.hypervisor.nr_ops == 1 + max(d.number for d in OPS.values() if d.since <= version)


def test_op_size_array_grows_with_the_release():
    assert [Hypervisor(xen_version=v).nr_ops for v in [(4, 9), (4, 10), (4, 11), (4, 15)]] == [16, 17, 19, NR_OPS]


@pytest.mark.parametrize("version, expected", [((4, 10), E.EOPNOTSUPP), ((4, 11), 0)])
def test_an_op_newer_than_the_release_is_unknown_there(version, expected):
    # pin_memory_cacheattr came in 4.11: 4.10's switch has no case for it
    raw = raw_at(version)
    assert raw.call(HVM, "pin_memory_cacheattr", end=2, type=6) == expected


@pytest.mark.parametrize("version, expected", [((4, 10), E.EINVAL), ((4, 11), E.EOPNOTSUPP)])
def test_before_4_11_the_pad_is_checked_before_the_op(version, expected):
    raw = raw_at(version)
    raw.build(NR_OPS + 5)
    raw.op.pad = 1
    assert raw.ioctl_dm_op(HVM, raw.bufs()) == expected


@pytest.mark.parametrize("version, size0, expected", [((4, 10), 31, E.EFAULT), ((4, 10), 32, 0), ((4, 11), 10, 0)])
def test_before_4_11_the_whole_struct_is_copied_in(version, size0, expected):
    raw = raw_at(version)
    raw.build("set_isa_irq_level", isa_irq=3)  # op_size 2: 10 bytes are enough from 4.11
    assert raw.ioctl_dm_op(HVM, raw.bufs(size0=size0)) == expected


@pytest.mark.parametrize("version, expected", [((4, 14), 0), ((4, 15), E.EINVAL)])
def test_a_pv_target_was_a_silent_success_before_4_15(version, expected):
    raw = raw_at(version)
    assert raw.call(PV, "create_ioreq_server") == expected
    assert raw.host.hypervisor.domains[PV].ioreq_servers == [None] * len(raw.host.hypervisor.domains[PV].ioreq_servers)


@pytest.mark.parametrize("version, expected", [((4, 10), E.EINVAL), ((4, 11), 0)])
def test_no_gfns_flag_was_a_pad_before_4_11(version, expected):
    raw = raw_at(version)
    assert raw.call(HVM, "create_ioreq_server") == 0
    assert raw.call(HVM, "get_ioreq_server_info", id=0, flags=1) == expected


@pytest.mark.parametrize("version, expected", [((4, 20), 0), ((4, 21), E.EPERM)])
def test_uncached_pins_need_an_iommu_from_4_21(version, expected):
    assert raw_at(version).call(HVM, "pin_memory_cacheattr", end=2, type=0) == expected


def _pages(host: MockXen, gfns: range) -> list[object]:
    p2m = host.hypervisor.domains[HVM].p2m
    return [p2m[g].page if g in p2m else None for g in gfns]


@pytest.mark.parametrize("version", [(4, 21), (4, 22)])
def test_overlapping_relocation_moves_backwards_from_4_22(version):
    raw = raw_at(version)
    before = _pages(raw.host, range(10, 14))
    assert raw.call(HVM, "relocate_memory", size=4, src_gfn=10, dst_gfn=12) == 0
    after = _pages(raw.host, range(10, 16))
    if version >= (4, 22):  # the range shifts whole
        assert after == [None, None, *before]
    else:  # forwards: gfn 10 and 11 land on 12 and 13 first, then move on; 12 and 13's pages are lost
        assert after == [None, None, None, None, before[0], before[1]]


def _resource(raw: Raw, num: int = 0, addr: int = 0) -> tuple[int, int]:
    arg = privcmd_mmap_resource(dom=HVM, type=0, id=0, idx=0, num=num, addr=addr)
    return errno_of(raw.dev.ioctl, IOCTL_PRIVCMD_MMAP_RESOURCE, arg), int(arg.num)


@pytest.mark.parametrize(
    "version, expected", [((4, 10), (E.ENOSYS, 0)), ((4, 14), (0, OLD_ACQUIRE_RESOURCE_FRAMES)), ((4, 15), (0, 2))]
)
def test_the_resource_size_query_by_release(version, expected):
    raw = raw_at(version)
    assert raw.call(HVM, "create_ioreq_server", handle_bufioreq=0) == 0
    assert _resource(raw) == expected  # 4.11-4.14 answered the per-call limit; 4.15 the server's frames


def test_more_frames_than_4_14_took_in_one_call():
    raw = raw_at((4, 14))
    assert raw.call(HVM, "create_ioreq_server") == 0
    mapping = raw.dev.mmap(33 * 4096)  # type: ignore[attr-defined]
    anchor = ctypes.c_char.from_buffer(mapping)
    addr = ctypes.addressof(anchor)
    del anchor
    assert _resource(raw, num=33, addr=addr)[0] == E.E2BIG
    assert _resource(raw, num=32, addr=addr)[0] != E.E2BIG


def test_arm_has_its_ops_from_4_15():
    raw = raw_at((4, 15), arch="arm")
    assert header_only(raw, BY_NAME["set_irq_level"].number) == E.EFAULT
    assert header_only(raw, BY_NAME["track_dirty_vram"].number) == E.EOPNOTSUPP  # x86 only


def test_mock_host_refuses_a_release_it_does_not_simulate(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "xendmop", "mock-host", "--socket", str(tmp_path / "s"), "--xen-version", "4.8"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "xen_version=4.8: Xen on x86 has DMOP from 4.9 on" in done.stderr
    assert not (tmp_path / "s").exists()
