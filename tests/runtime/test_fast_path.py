"""The common-ioreq fast path of ``Dispatcher.handle_slot`` against the generic path
(``handle_slot_generic``, every ioreq through ``execute``): for honest and hostile slots alike,
the same answer, the same slot bytes, the same device calls, guest RAM, stats and log lines."""

from __future__ import annotations

import enum
import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xendmop.abi.ioreq import (
    IOREQ_READ,
    IOREQ_TYPE_COPY,
    IOREQ_TYPE_PIO,
    IOREQ_WRITE,
    STATE_IOREQ_NONE,
    STATE_IOREQ_READY,
    STATE_IORESP_READY,
)
from xendmop.abi.ioreq_slot import IOREQ_SIZE, STATE_BYTE, Ioreq
from xendmop.runtime.dispatch import Dispatcher, RateLimitedLog

from .helpers import FakeRam, Producer, Recorder, page, post, slot

PORTS = (0x3F8, 0x3FF)
RAISING_PORTS = (0x70, 0x71)
JUNK_PORTS = (0x60, 0x64)  # the device answers reads with what is not an int
MMIO = (0xFEB0_0000, 0xFEB0_0FFF)
RAISING_MMIO = (0xFEC0_0000, 0xFEC0_00FF)
TOP_MMIO = (2**64 - 0x100, 2**64 - 1)  # an 8-byte access at its end would wrap
VGA = (0xA0000, 0xBFFFF)  # low enough for the buffered ring's 20-bit addresses
MAX_REP = 16


class Exploding:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, int | None]] = []

    def read(self, addr: int, size: int) -> int:
        self.calls.append(("r", addr, size, None))
        raise ZeroDivisionError("device bug")

    def write(self, addr: int, size: int, value: int) -> None:
        self.calls.append(("w", addr, size, value))
        raise ZeroDivisionError("device bug")


class Level(enum.IntEnum):
    HIGH = 0x1FF


class Junk(Recorder):
    """Reads give, by offset: None, a bool, an IntEnum wider than any 1-byte access, a str."""

    def read(self, addr: int, size: int) -> Any:
        super().read(addr, size)
        return (None, True, Level.HIGH, "0x5a", 7)[addr]


class Wide(Recorder):
    """Reads answer more bits than the access has: a device error (the guest reads all-ones),
    never silently truncated, on both paths."""

    def read(self, addr: int, size: int) -> int:
        return super().read(addr, size) | (0xDEAD_BEEF_F00D_CAFE_55 << 8)


class RecordingLog(RateLimitedLog):
    """Every message the dispatcher would log, formatted, with whether it carried a traceback."""

    def __init__(self) -> None:
        super().__init__(burst=0)
        self.lines: list[tuple[int, str, str, bool]] = []

    def __call__(self, level: int, key: str, msg: str, *args: object, exc_info: bool = False) -> None:
        self.lines.append((level, key, msg % args, exc_info))


class Setup:
    """A dispatcher with every kind of device the fast path may meet, and what they saw."""

    def __init__(self, max_rep: int = MAX_REP) -> None:
        self.ram = FakeRam(0x4000)
        self.log = RecordingLog()
        self.d = Dispatcher(self.ram, max_rep=max_rep, ratelog=self.log)
        self.devs = [Wide(), Exploding(), Junk(), Wide(), Exploding(), Recorder(), Recorder(), Recorder()]
        self.d.ports.add(*PORTS, self.devs[0], "uart")
        self.d.ports.add(*RAISING_PORTS, self.devs[1], "rtc")
        self.d.ports.add(*JUNK_PORTS, self.devs[2], "kbd")
        self.d.mmio.add(*MMIO, self.devs[3], "bar")
        self.d.mmio.add(*RAISING_MMIO, self.devs[4], "broken")
        self.d.mmio.add(*TOP_MMIO, self.devs[5], "top")
        self.d.add_pci(0x18, self.devs[6], "pci")
        self.d.mmio.add(*VGA, self.devs[7], "vga")

    def seen(self) -> tuple[Any, ...]:
        return (
            [d.calls for d in self.devs],
            bytes(self.ram.mem),
            self.ram.faults,
            dict(self.d.stats),
            self.log.lines,
        )


def run_both(raw: bytes, vcpu: int = 1, max_rep: int = MAX_REP) -> tuple[Setup, Setup, bytes]:
    """``raw`` in ``vcpu``'s slot, answered by the fast path and by the generic one."""
    fast, generic = Setup(max_rep), Setup(max_rep)
    pages = page(), page()
    for pg in pages:
        pg[0:IOREQ_SIZE] = b"\xaa" * IOREQ_SIZE  # a neighbour's slot
        pg[vcpu * IOREQ_SIZE : (vcpu + 1) * IOREQ_SIZE] = raw
    answered = fast.d.handle_slot(pages[0], vcpu), generic.d.handle_slot_generic(pages[1], vcpu)
    assert answered[0] == answered[1]
    assert bytes(pages[0]) == bytes(pages[1])
    assert fast.seen() == generic.seen()
    return fast, generic, bytes(pages[0])


def region_addr(lo_hi: tuple[int, int]) -> st.SearchStrategy[int]:
    lo, hi = lo_hi
    return st.one_of(st.integers(lo, hi), st.sampled_from([lo - 1, lo, hi - 7, hi - 3, hi - 1, hi, hi + 1]))


u64 = st.integers(0, 2**64 - 1)
honest_addr = st.one_of(*(region_addr(r) for r in (PORTS, RAISING_PORTS, JUNK_PORTS, MMIO, RAISING_MMIO, TOP_MMIO)))
honest_ioreq = st.builds(
    Ioreq,
    addr=honest_addr.filter(lambda a: 0 <= a < 2**64),
    data=st.one_of(u64, st.integers(0, 0x1FF)),
    count=st.just(1),
    size=st.sampled_from([1, 2, 4, 8]),
    vp_eport=st.integers(0, 2**32 - 1),
    state=st.just(STATE_IOREQ_READY),
    data_is_ptr=st.just(False),
    dir=st.integers(0, 1),
    df=st.booleans(),
    type=st.sampled_from([IOREQ_TYPE_PIO, IOREQ_TYPE_COPY]),
)
#: one field away from honest, or several
common_ioreq = st.builds(
    Ioreq,
    addr=honest_addr.filter(lambda a: 0 <= a < 2**64),
    data=st.one_of(u64, st.integers(0, 0x1FF)),
    count=st.one_of(st.just(1), st.sampled_from([0, 2, MAX_REP, MAX_REP + 1, 2**32 - 1])),
    size=st.one_of(st.sampled_from([1, 2, 4, 8]), st.sampled_from([0, 3, 16, 2**32 - 1])),
    vp_eport=st.integers(0, 2**32 - 1),
    state=st.one_of(st.just(STATE_IOREQ_READY), st.integers(0, 15)),
    data_is_ptr=st.one_of(st.just(False), st.booleans()),
    dir=st.integers(0, 1),
    df=st.booleans(),
    type=st.one_of(st.sampled_from([IOREQ_TYPE_PIO, IOREQ_TYPE_COPY]), st.sampled_from([2, 7, 8, 99])),
)
hostile_ioreq = st.builds(
    Ioreq,
    addr=st.one_of(u64, honest_addr.filter(lambda a: 0 <= a < 2**64)),
    data=u64,
    count=st.integers(0, 2**32 - 1),
    size=st.integers(0, 2**32 - 1),
    vp_eport=st.integers(0, 2**32 - 1),
    state=st.integers(0, 15),
    data_is_ptr=st.booleans(),
    dir=st.integers(0, 1),
    df=st.booleans(),
    type=st.integers(0, 255),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(req=st.one_of(honest_ioreq, common_ioreq, hostile_ioreq), vcpu=st.integers(1, 3))
def test_fast_path_matches_generic(req: Ioreq, vcpu: int) -> None:
    run_both(req.to_bytes(), vcpu)


@settings(max_examples=300, deadline=None)
@given(req=honest_ioreq)
def test_honest_accesses_are_answered_alike(req: Ioreq) -> None:
    _, _, raw = run_both(req.to_bytes())
    assert Ioreq.from_bytes(raw, IOREQ_SIZE).state == STATE_IORESP_READY


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(min_size=IOREQ_SIZE, max_size=IOREQ_SIZE), ready=st.booleans())
def test_fast_path_matches_generic_on_any_bytes(raw: bytes, ready: bool) -> None:
    if ready:
        raw = raw[:STATE_BYTE] + bytes([(raw[STATE_BYTE] & 0xF0) | STATE_IOREQ_READY]) + raw[STATE_BYTE + 1 :]
    run_both(raw)


@pytest.mark.parametrize("max_rep", [0, 1])
def test_fast_path_keeps_max_rep_for_mmio(max_rep: int) -> None:
    req = Ioreq(MMIO[0] + 4, 0x12345678, 1, 4, 0, STATE_IOREQ_READY, False, IOREQ_WRITE, False, IOREQ_TYPE_COPY)
    fast, _, _ = run_both(req.to_bytes(), max_rep=max_rep)
    assert fast.d.stats["refused:count" if max_rep == 0 else "handled"] == 1


def test_common_accesses_build_no_ioreq(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path answers a port or MMIO access from locals: without ``Ioreq`` at all."""
    s = Setup()

    def no_copy(*args: object) -> Ioreq:
        raise AssertionError("the common access built an Ioreq")

    monkeypatch.setattr(Ioreq, "from_fields", no_copy)
    monkeypatch.setattr(Ioreq, "from_bytes", no_copy)
    pg = page()
    post(pg, 0, type=IOREQ_TYPE_PIO, addr=PORTS[0] + 1, size=1, dir=IOREQ_WRITE, data=0x1A5)
    assert s.d.handle_slot(pg, 0)
    post(pg, 0, type=IOREQ_TYPE_COPY, addr=MMIO[0] + 8, size=8, dir=IOREQ_READ)
    assert s.d.handle_slot(pg, 0)
    assert s.devs[0].calls == [("w", 1, 1, 0xA5)]  # write data masked to the access size
    assert s.devs[3].calls == [("r", 8, 8, None)]
    assert int.from_bytes(pg[8:16], "little") == 2**64 - 1  # Wide's too-wide answer floats the bus
    assert s.d.stats == {"handled": 2, "device-error": 1, "device-error-read": 1}


def test_fast_path_completes_a_raising_device_as_refused(caplog: pytest.LogCaptureFixture) -> None:
    d = Dispatcher(None, ratelog=RateLimitedLog())
    d.ports.add(*RAISING_PORTS, Exploding(), "rtc")
    pg = page()
    post(pg, 0, type=IOREQ_TYPE_PIO, addr=RAISING_PORTS[0], size=2, dir=IOREQ_READ, data=0x1234)
    with caplog.at_level(logging.ERROR, "xendmop.runtime"):
        assert d.handle_slot(pg, 0)
    assert slot(pg, 0).data == 0xFFFF and slot(pg, 0).state == STATE_IORESP_READY
    assert d.stats == {"device-error": 1, "device-error-read": 1, "handled": 1}
    assert "rtc raised on read(0x0, 2)" in caplog.text and "ZeroDivisionError" in caplog.text


def test_fast_path_does_not_answer_a_slot_taken_back() -> None:
    """A device that rewrites the state mid-access (only Xen could): no IORESP_READY, as generic."""
    pg = page()

    class Meddler(Recorder):
        def write(self, addr: int, size: int, value: int) -> None:
            pg[STATE_BYTE] = (pg[STATE_BYTE] & 0xF0) | STATE_IOREQ_NONE

    d = Dispatcher(None, ratelog=RateLimitedLog(burst=0))
    d.mmio.add(*MMIO, Meddler())
    post(pg, 0, type=IOREQ_TYPE_COPY, addr=MMIO[0], size=4, dir=IOREQ_WRITE, data=9)
    assert d.handle_slot(pg, 0) is False
    assert slot(pg, 0).state == STATE_IOREQ_NONE and d.stats["badness"] == 1


@settings(max_examples=200, deadline=None)
@given(
    type_=st.sampled_from([IOREQ_TYPE_PIO, IOREQ_TYPE_COPY, 2, 7, 8, 99]),
    addr=st.one_of(region_addr(PORTS), region_addr(RAISING_PORTS), region_addr(VGA), st.integers(0, 0xFFFFF)),
    size=st.sampled_from([1, 2, 4, 8]),
    data=u64,
)
def test_buffered_entry_is_handled_as_the_synchronous_write(type_: int, addr: int, size: int, data: int) -> None:
    """Xen buffers single writes only: an entry drained from the ring must do what the same
    write of one element does in a synchronous slot (QEMU's handle_buffered_iopage)."""
    buffered, synchronous = Setup(), Setup()
    ring = page()
    assert Producer(ring).send(type_, addr, size, data)
    assert buffered.d.drain_buffered(ring) == 1
    sent = data if size == 8 else data & 0xFFFF_FFFF  # a one-slot entry carries 32 bits
    pg = page()
    post(pg, 0, type=type_, addr=addr, size=size, count=1, dir=IOREQ_WRITE, data=sent)
    synchronous.d.handle_slot(pg, 0)
    # the log lines name the ioreq with its state, READY in the ring's copy, INPROCESS in the slot's
    assert buffered.seen()[:4] == synchronous.seen()[:4]
