"""Issue 17: the runtime's handles bound what a caller's numbers make them allocate or accept
(GuestRam.read, EventChannel.pending_ports, IoreqServer's max_rep)."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from xendmop import DeviceModel
from xendmop.errors import ArgumentError, ClosedHandleError
from xendmop.mock import MockXen
from xendmop.runtime.dispatch import MAX_REP_LIMIT, Dispatcher, GuestMemoryError
from xendmop.runtime.evtchn import EventChannel
from xendmop.runtime.foreignmemory import ForeignMemory, GuestRam
from xendmop.runtime.server import IoreqServer


@pytest.fixture
def host() -> Iterator[MockXen]:
    with MockXen() as xen:
        yield xen


@pytest.fixture
def ram(host: MockXen) -> Iterator[GuestRam]:
    domid = host.create_domain(vcpus=1, hvm=True, memory_mb=8)
    with ForeignMemory(host.open_device) as fmem:
        ram = GuestRam(fmem, domid)
        yield ram
        ram.close()


@pytest.mark.parametrize("size", [2**36, 2**40, (16 << 20) + 1])
def test_guest_ram_read_past_the_guest_is_refused_before_allocating(ram: GuestRam, size: int) -> None:
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(GuestMemoryError):
            ram.read(0, size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 2  # was 27 s and 2.2 GiB for 2**36 on an 8 MiB guest
    assert peak < 1 << 20


def test_guest_ram_reads_and_writes_within_the_guest(ram: GuestRam) -> None:
    ram.write(0x1FF0, b"x" * 0x20)  # across a page boundary
    assert ram.read(0x1FF0, 0x20) == b"x" * 0x20
    assert len(ram.read(0, 8 << 20)) == 8 << 20  # all of it
    with pytest.raises(GuestMemoryError):
        ram.write((16 << 20) - 4, b"12345678")  # past the mock guest's frames (its RAM and special pages)
    with pytest.raises(TypeError, match="size must be an int"):
        ram.read(0, 4.0)  # type: ignore[arg-type]


@pytest.fixture
def evtchn(host: MockXen) -> Iterator[EventChannel]:
    with EventChannel(host.open_device) as e:
        yield e


@pytest.mark.parametrize("limit", [-5, 0, 1025, 2**40])
def test_pending_ports_limit_is_bounded(evtchn: EventChannel, limit: int) -> None:
    with pytest.raises(ArgumentError) as raised:
        evtchn.pending_ports(limit)
    assert raised.value.name == "limit"


@pytest.mark.parametrize("limit", [1.0, "8", True])
def test_pending_ports_limit_is_an_int(evtchn: EventChannel, limit: Any) -> None:
    with pytest.raises(TypeError, match="limit must be an int"):
        evtchn.pending_ports(limit)


def test_pending_ports_takes_up_to_a_page_of_ports(evtchn: EventChannel) -> None:
    assert evtchn.pending_ports(1024) == []
    evtchn.close()
    with pytest.raises(ClosedHandleError, match=r"^pending_ports: "):
        evtchn.pending_ports(1)
    for call, op in ((lambda: evtchn.notify(5), "notify"), (lambda: evtchn.unmask(5), "unmask")):
        with pytest.raises(ClosedHandleError, match=rf"^{op}: "):  # the hot path's calls name themselves
            call()


@pytest.mark.parametrize("max_rep", [-1, -(2**70), MAX_REP_LIMIT + 1])
def test_max_rep_is_bounded(host: MockXen, max_rep: int) -> None:
    domid = host.create_domain(vcpus=1, hvm=True, memory_mb=4)
    with DeviceModel.open("mock", xen=host) as dm:
        with pytest.raises(ArgumentError) as raised:
            IoreqServer(dm, domid, opener=host.open_device, max_rep=max_rep)
    assert raised.value.name == "max_rep"
    with pytest.raises(TypeError, match="max_rep must be an int"):
        Dispatcher(max_rep=2.5)  # type: ignore[arg-type]
    assert Dispatcher(max_rep=MAX_REP_LIMIT).max_rep == MAX_REP_LIMIT


def test_guest_ram_accesses_within_one_page_keep_every_check(host: MockXen) -> None:
    """Reads and writes that fit one page take a shorter path; they still refuse what the
    checked path refuses (a bool, a negative address, past ``limit``, a frame that is not RAM)
    and move the same bytes."""
    domid = host.create_domain(vcpus=1, hvm=True, memory_mb=8)
    with ForeignMemory(host.open_device) as fmem:
        ram = GuestRam(fmem, domid, limit=0x2FFE)
        try:
            ram.write(0x1000, bytes(range(256)) * 16)  # one whole page
            ram.write(0x0FFE, b"ab")  # the last two bytes of the page before
            ram.write(0x2FFA, b"wxyz")  # up to the limit exactly
            assert b"".join(bytes(v) for v in ram.iter_views(0x0FFE, 0x102)) == b"ab" + bytes(range(256))
            assert ram.read(0x0FFE, 2) == b"ab" and ram.read(0x1000, 0x1000) == bytes(range(256)) * 16
            assert ram.read(0x10FF, 1) == b"\xff" and ram.read(0x2FFA, 4) == b"wxyz"
            for bad in (lambda: ram.read(0x2FFB, 4), lambda: ram.write(0x2FFB, b"1234")):
                with pytest.raises(GuestMemoryError, match="outside guest RAM"):
                    bad()  # one byte past the limit, within the page
            for bad in (lambda: ram.read(-2, 2), lambda: ram.write(-2, b"12")):
                with pytest.raises(GuestMemoryError):
                    bad()
            with pytest.raises(TypeError, match="gpa must be an int"):
                ram.read(True, 1)
            with pytest.raises(TypeError, match="gpa must be an int"):
                ram.write(True, b"1")
            assert ram.read(0x1000, 0) == b""
        finally:
            ram.close()
        unbacked = GuestRam(fmem, domid)
        try:
            with pytest.raises(GuestMemoryError):
                unbacked.read((64 << 20) + 8, 2)  # no frame there
        finally:
            unbacked.close()
