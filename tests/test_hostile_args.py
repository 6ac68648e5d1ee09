"""Issue 17: arguments that were silently coerced, aliased or allowed to allocate without bound
are refused before any syscall, naming the argument as the caller spelled it."""

from __future__ import annotations

import tracemalloc
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest

from xendmop import ArgumentError, ClosedHandleError, DeviceModel
from xendmop.mock import MockXen
from xendmop.types import BufIoreq, CacheAttr, EventType, HvmMemType, ShutdownReason


class Recorder:
    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


COERCIBLE = [1.5, 2.0, "3", b"2", Decimal(1), Fraction(2, 1)]


@pytest.fixture
def host() -> Any:
    with MockXen() as xen:
        yield xen


@pytest.fixture
def dm(host: MockXen) -> Any:
    with DeviceModel.open("mock", xen=host) as handle:
        yield handle


@pytest.fixture
def domid(host: MockXen) -> int:
    return int(host.create_domain(vcpus=2, hvm=True, memory_mb=8))


# (method, arguments after the domid with {} where the bad value goes, the argument's name)
ENUM_ARGS = [
    ("create_ioreq_server", ({},), "handle_bufioreq"),
    ("shutdown", ({},), "reason"),
    ("set_mem_type", ({}, 0x800, 1), "mem_type"),
    ("pin_memory_cacheattr", (0x800, 0x800, {}), "type"),
    ("inject_event", (0, 14, {}, 0, 0, 0), "type"),
    ("map_mem_type_to_ioreq_server", (0, {}, 1), "type"),
]


def _fill(args: tuple[Any, ...], value: object) -> list[Any]:
    return [value if a == {} else a for a in args]


@pytest.mark.parametrize("value", COERCIBLE, ids=repr)
@pytest.mark.parametrize(("method", "args", "name"), ENUM_ARGS, ids=[m for m, _, _ in ENUM_ARGS])
def test_no_coercion_of_int_and_enum_arguments(
    dm: DeviceModel, host: MockXen, domid: int, method: str, args: tuple[Any, ...], name: str, value: object
) -> None:
    servers = host.domain(domid).snapshot()["servers"]
    with pytest.raises(TypeError, match=rf"{method}: {name} must be an int"):
        getattr(dm, method)(domid, *_fill(args, value))
    assert host.domain(domid).snapshot()["servers"] == servers  # nothing created
    assert host.domain(domid).snapshot()["shutdown_reason"] is None


@pytest.mark.parametrize(
    ("method", "args", "name"),
    [
        ("create_ioreq_server", (True,), "handle_bufioreq"),
        ("shutdown", (True,), "reason"),
        ("pin_memory_cacheattr", (0x800, 0x800, HvmMemType.ram_rw), "type"),
        ("shutdown", (CacheAttr.WB,), "reason"),
    ],
)
def test_bools_and_other_enums_are_not_an_enum_value(
    dm: DeviceModel, domid: int, method: str, args: tuple[Any, ...], name: str
) -> None:
    with pytest.raises(TypeError, match=rf"{method}: {name} must be an int or a"):
        getattr(dm, method)(domid, *args)


def test_ints_and_the_ops_own_enums_are_accepted(dm: DeviceModel, host: MockXen, domid: int) -> None:
    assert dm.create_ioreq_server(domid, BufIoreq.ATOMIC) == 0
    assert dm.create_ioreq_server(domid, 1) == 1
    dm.set_mem_type(domid, HvmMemType.ram_ro, 0x100, 1)
    dm.set_mem_type(domid, 0, 0x100, 1)
    dm.pin_memory_cacheattr(domid, 0x100, 0x100, CacheAttr.WB)
    dm.inject_event(domid, 0, 14, EventType.hw_exc, 0, 0, 0)
    dm.shutdown(domid, ShutdownReason.poweroff)


@pytest.mark.parametrize(
    ("method", "args", "name"),
    [
        ("set_isa_irq_level", (16 * 16, 0), "irq"),
        ("set_pci_link_route", (0, 256), "irq"),
        ("inject_event", (2**32, 14, 3, 0, 0, 0), "vcpu"),
        ("inject_event", (0, 14, 3, 0, 0, 2**64), "extra"),
        ("inject_msi", (2**64, 0), "msi_addr"),
        ("inject_msi", (0, 2**32), "msi_data"),
        ("set_pci_intx_level", (2**16, 0, 0, 0, 0), "segment"),
    ],
)
def test_errors_name_the_python_argument_not_the_c_field(
    dm: DeviceModel, domid: int, method: str, args: tuple[Any, ...], name: str
) -> None:
    for _ in range(2):  # twice: the call holds no state from the first refusal
        with pytest.raises(ArgumentError) as raised:
            getattr(dm, method)(domid, *args)
        assert raised.value.name == name
        assert f" {name}=" in str(raised.value)


@pytest.mark.parametrize(
    ("call", "op"),
    [
        (lambda dm: dm.nr_vcpus(1), "nr_vcpus"),
        (lambda dm: dm.shutdown(1, 0), "shutdown"),
        (lambda dm: dm.set_isa_irq_level(1, 3, 1), "set_isa_irq_level"),
        (lambda dm: dm.track_dirty_vram(1, 0, 8), "track_dirty_vram"),
        (lambda dm: dm.map_pcidev_to_ioreq_server(1, 0, 0, 0, 3, 0), "map_io_range_to_ioreq_server"),
        (lambda dm: dm.restrict(1), "restrict"),
    ],
)
def test_closed_handle_error_names_the_operation(host: MockXen, call: Any, op: str) -> None:
    dm = DeviceModel.open("mock", xen=host)
    early = dm.set_isa_irq_level  # an entry taken while open, called after the close
    dm.close()
    with pytest.raises(ClosedHandleError, match=rf"^{op}: ") as raised:
        call(dm)
    assert raised.value.op == op
    with pytest.raises(ClosedHandleError, match=r"^set_isa_irq_level: "):
        early(1, 3, 1)


# --- item 3: one SBDF check -----------------------------------------------------------------------

ALIASES = [
    ({"slot": 32}, "slot"),
    ({"slot": 1, "function": 8}, "function"),
    ({"slot": 1, "bus": 256}, "bus"),
    ({"slot": 1, "segment": 0x10000}, "segment"),
    ({"slot": -1}, "slot"),
]


@pytest.mark.parametrize(("where", "name"), ALIASES, ids=[n for _, n in ALIASES])
def test_add_pci_refuses_what_would_alias_another_function(
    dm: DeviceModel, host: MockXen, domid: int, where: dict[str, int], name: str
) -> None:
    from xendmop.runtime.server import IoreqServer

    server = IoreqServer(dm, domid, opener=host.open_device)
    with pytest.raises(ArgumentError) as raised:
        server.add_pci(Recorder(), **where)
    assert raised.value.name == name
    assert server.dispatcher.pci == {}
    # DeviceModel refuses the same values with the same check (its own argument names)
    sbdf = [where.get(k, 0) for k in ("segment", "bus", "slot", "function")]
    with pytest.raises(ArgumentError) as direct:
        dm.map_pcidev_to_ioreq_server(domid, 0, *sbdf)
    assert direct.value.name == {"slot": "device"}.get(name, name)
    with pytest.raises(TypeError, match="slot must be an int"):
        server.add_pci(Recorder(), slot=1.0)  # type: ignore[arg-type]


# --- item 5: track_dirty_vram bounded before any DMOP ------------------------------------------------


def test_track_dirty_vram_past_xens_per_call_limit_is_refused_before_any_dmop(
    dm: DeviceModel, host: MockXen, domid: int
) -> None:
    host.events.clear()
    tracemalloc.start()
    try:
        with pytest.raises(ArgumentError, match=r"nr=4294967295: more than the 262144 pages .*xen/arch/x86/hvm/dm.c"):
            dm.track_dirty_vram(domid, 0, 2**32 - 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(host.events) == 0  # no DMOP issued
    assert peak < 1 << 20
    assert len(dm.track_dirty_vram(domid, 0, 262144)) == 262144 // 8  # the limit itself is fine
