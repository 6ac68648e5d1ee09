"""Property tests: random valid call sequences keep Xen's invariants; random bytes never escape as
anything but OSError and never corrupt state."""

from __future__ import annotations

import ctypes
import errno
import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xendmop import DeviceModel
from xendmop.mock import MockXen
from xendmop.mock.state import MAX_NR_IO_RANGES, MAX_NR_IOREQ_SERVERS, Domain
from xendmop.ops import BY_NAME, OPS

from .conftest import HVM, make_host
from .raw import Raw

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

small = st.integers(0, 40)
calls = st.one_of(
    st.tuples(st.just("create"), st.integers(0, 2)),
    st.tuples(st.just("destroy"), st.integers(0, 9)),
    st.tuples(st.just("map"), st.integers(0, 9), st.integers(0, 2), small, small),
    st.tuples(st.just("unmap"), st.integers(0, 9), st.integers(0, 2), small, small),
    st.tuples(st.just("state"), st.integers(0, 9), st.booleans()),
    st.tuples(st.just("isa"), st.integers(0, 15), st.integers(0, 1)),
    st.tuples(st.just("intx"), st.integers(0, 31), st.integers(0, 3), st.integers(0, 1)),
    st.tuples(st.just("link"), st.integers(0, 3), st.integers(0, 15)),
)


def apply(dm: DeviceModel, call: tuple[object, ...]) -> None:
    kind, *a = call
    try:
        if kind == "create":
            dm.create_ioreq_server(HVM, a[0])  # type: ignore[arg-type]
        elif kind == "destroy":
            dm.destroy_ioreq_server(HVM, a[0])  # type: ignore[arg-type]
        elif kind in ("map", "unmap"):
            sid, rtype, x, y = a
            op = "map_io_range_to_ioreq_server" if kind == "map" else "unmap_io_range_from_ioreq_server"
            dm._call(BY_NAME[op], HVM, {"id": sid, "type": rtype, "start": min(x, y), "end": max(x, y)})  # type: ignore[type-var]
        elif kind == "state":
            dm.set_ioreq_server_state(HVM, a[0], a[1])  # type: ignore[arg-type]
        elif kind == "isa":
            dm.set_isa_irq_level(HVM, a[0], a[1])  # type: ignore[arg-type]
        elif kind == "intx":
            dm.set_pci_intx_level(HVM, 0, 0, a[0], a[1], a[2])  # type: ignore[arg-type]
        elif kind == "link":
            dm.set_pci_link_route(HVM, a[0], a[1])  # type: ignore[arg-type]
    except OSError:
        pass  # refusals are fine; the invariants must hold either way


def check_invariants(d: Domain) -> None:
    servers = [s for s in d.ioreq_servers if s is not None]
    assert len(servers) <= MAX_NR_IOREQ_SERVERS
    for s in servers:
        for r in s.ranges:
            assert len(r) <= MAX_NR_IO_RANGES
            spans = sorted(r.ranges)
            assert all(a[1] < b[0] for a, b in itertools.pairwise(spans)), spans  # disjoint within a server
        assert len(s.vcpu_ports) == d.max_vcpus
        for port in s.vcpu_ports:
            assert d.ports[port].xen_consumer is not None
    # the GSI counts are exactly what the asserted ISA lines and INTx pins imply
    want = [0] * len(d.gsi_assert_count)
    for irq in range(16):
        if d.isa_irq >> irq & 1:
            want[irq if irq else 2] += 1
    links = [0] * 4
    for dev in range(32):
        for pin in range(4):
            if d.pci_intx >> (dev * 4 + pin) & 1:
                want[(((dev << 2) + (dev >> 3) + pin) & 31) + 16] += 1
                links[(dev + pin) & 3] += 1
    assert links == d.pci_link_assert_count
    for link, count in enumerate(links):
        if count and d.pci_link_route[link]:
            want[d.pci_link_route[link]] += 1
    assert want == d.gsi_assert_count


@SETTINGS
@given(st.lists(calls, max_size=40))
def test_random_valid_sequences_keep_invariants(seq: list[tuple[object, ...]]) -> None:
    with make_host() as host, DeviceModel.open("mock", xen=host) as dm:
        for call in seq:
            apply(dm, call)
            check_invariants(host.hypervisor.domains[HVM])


def _state(host: MockXen) -> dict[int, object]:
    return {i: d.snapshot() for i, d in host.hypervisor.domains.items()}


PARTIAL = {"set_mem_type", "modified_memory", "relocate_memory", "track_dirty_vram"}


@SETTINGS
@given(
    st.integers(0, 25),
    st.binary(min_size=0, max_size=40),
    st.lists(st.binary(max_size=64), max_size=2),
    st.integers(0, 4),
)
def test_random_bytes_only_raise_oserror(op: int, body: bytes, extra: list[bytes], domid: int) -> None:
    with make_host() as host:
        _random_bytes(host, op, body, extra, domid)


def _random_bytes(host: MockXen, op: int, body: bytes, extra: list[bytes], domid: int) -> None:
    host.set_log_dirty(HVM)
    raw = Raw(host)
    raw.build(op)
    payload = (ctypes.c_char * 32).from_buffer(raw.op)
    payload[8 : 8 + min(24, len(body))] = body[:24]
    before = _state(host)
    try:
        raw.dev.ioctl(0x105005, _req(raw, domid, len(body), extra))
    except OSError as e:
        assert e.errno in errno.errorcode
        # Xen keeps partial progress of these ops on error (no rollback), and
        # track_dirty_vram arms tracking before its bitmap copy can fault.
        partial = OPS.get(op) is not None and OPS[op].name in PARTIAL
        assert partial or _state(host) == before, "refusal changed state"
    for d in host.hypervisor.domains.values():
        check_invariants(d)


def _req(raw: Raw, domid: int, size0: int, extra: list[bytes]) -> object:
    from xendmop.abi.privcmd import privcmd_dm_op, privcmd_dm_op_buf

    bufs = raw.bufs(min(size0, 32), extra)
    array = (privcmd_dm_op_buf * len(bufs))(*[privcmd_dm_op_buf(a, s) for a, s in bufs])
    raw._keep = array  # type: ignore[attr-defined]
    return privcmd_dm_op(dom=domid, num=len(bufs), ubufs=ctypes.addressof(array))


@SETTINGS
@given(st.binary(min_size=0, max_size=48), st.sampled_from([0x105005, 0x305000, 0x25006, 0x205007, 0x205004, 0x99]))
def test_random_ioctl_argument_bytes(blob: bytes, request: int) -> None:
    """Garbage as the ioctl argument itself (pointers included) is refused with an errno."""
    with make_host() as host:
        dev = host.open_device("/dev/xen/privcmd")
        arg = ctypes.create_string_buffer(blob.ljust(48, b"\0"), 48)
        try:
            dev.ioctl(request, arg)
        except OSError as e:
            assert e.errno in errno.errorcode
        for d in host.hypervisor.domains.values():
            check_invariants(d)
        assert isinstance(host, MockXen)
