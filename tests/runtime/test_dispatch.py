"""The dispatch core on in-memory pages: every ioreq type, rep forms with df, the buffered ring,
the state machine, and refusals of hostile ioreqs."""

from __future__ import annotations

import logging

import pytest

from xendmop.abi.ioreq import (
    IOREQ_BUFFER_SLOT_NUM,
    IOREQ_READ,
    IOREQ_TYPE_COPY,
    IOREQ_TYPE_INVALIDATE,
    IOREQ_TYPE_PCI_CONFIG,
    IOREQ_TYPE_PIO,
    IOREQ_TYPE_TIMEOFFSET,
    IOREQ_WRITE,
    STATE_IOREQ_INPROCESS,
    STATE_IOREQ_NONE,
    STATE_IOREQ_READY,
    STATE_IORESP_READY,
)
from xendmop.abi.ioreq_slot import IOREQ_SIZE, Ioreq
from xendmop.runtime.dispatch import (
    MAX_REP,
    AtomicAddReadPointer,
    Dispatcher,
    RangeMap,
    RateLimitedLog,
    StoreReadPointer,
)

from .helpers import Exploding, FakeRam, Producer, Recorder, buf_entry, page, pointers, post, set_pointers, slot

UART = 0x3F8
MMIO = 0xFEB00000


@pytest.fixture
def ram() -> FakeRam:
    return FakeRam()


@pytest.fixture
def dev() -> Recorder:
    return Recorder()


@pytest.fixture
def disp(ram: FakeRam, dev: Recorder) -> Dispatcher:
    d = Dispatcher(ram)
    d.ports.add(UART, UART + 7, dev, "uart")
    d.mmio.add(MMIO, MMIO + 0xFFF, dev, "bar0")
    return d


def run(disp: Dispatcher, vcpu: int = 0, **fields: int) -> Ioreq:
    pg = page()
    post(pg, vcpu, **fields)
    assert disp.handle_slot(pg, vcpu) is True
    out = slot(pg, vcpu)
    assert out.state == STATE_IORESP_READY
    return out


# --- port IO --------------------------------------------------------------------------


def test_pio_read_returns_device_value_at_offset(disp: Dispatcher, dev: Recorder) -> None:
    dev.regs[5] = 0x60
    out = run(disp, type=IOREQ_TYPE_PIO, addr=UART + 5, size=1, dir=IOREQ_READ, data=0xDEAD)
    assert out.data == 0x60
    assert dev.calls == [("r", 5, 1, None)]


def test_pio_write_masks_data_to_size(disp: Dispatcher, dev: Recorder) -> None:
    run(disp, type=IOREQ_TYPE_PIO, addr=UART, size=1, dir=IOREQ_WRITE, data=0xFFFF_FF41)
    assert dev.calls == [("w", 0, 1, 0x41)]


def test_pio_eight_bytes_refused_read_all_ones(disp: Dispatcher, dev: Recorder) -> None:
    out = run(disp, type=IOREQ_TYPE_PIO, addr=UART, size=8, dir=IOREQ_READ)
    assert out.data == 2**64 - 1 and dev.calls == []
    assert disp.stats["refused:size"] == 1


def test_pio_unclaimed_port_reads_all_ones(disp: Dispatcher) -> None:
    out = run(disp, type=IOREQ_TYPE_PIO, addr=0x80, size=2, dir=IOREQ_READ)
    assert out.data == 0xFFFF and disp.stats["unclaimed:port"] == 1


def test_pio_straddling_range_end_is_unclaimed(disp: Dispatcher, dev: Recorder) -> None:
    # Xen routes an access to a server only if it lies entirely inside a range.
    out = run(disp, type=IOREQ_TYPE_PIO, addr=UART + 6, size=4, dir=IOREQ_READ)
    assert out.data == 0xFFFFFFFF and dev.calls == []


@pytest.mark.parametrize("df", [0, 1])
def test_rep_outsb_walks_guest_buffer_with_df(disp: Dispatcher, dev: Recorder, ram: FakeRam, df: int) -> None:
    ram.mem[0x100:0x104] = b"ABCD"
    start = 0x103 if df else 0x100
    run(disp, type=IOREQ_TYPE_PIO, addr=UART, size=1, count=4, dir=IOREQ_WRITE, data_is_ptr=1, df=df, data=start)
    expected = b"DCBA" if df else b"ABCD"
    assert [c[3] for c in dev.calls] == list(expected)
    assert {c[1] for c in dev.calls} == {0}  # the port does not move


@pytest.mark.parametrize("df", [0, 1])
def test_rep_insw_fills_guest_buffer_with_df(disp: Dispatcher, dev: Recorder, ram: FakeRam, df: int) -> None:
    values = iter([0x1111, 0x2222, 0x3333])
    dev.read = lambda addr, size: next(values)  # type: ignore[method-assign]
    start = 0x204 if df else 0x200
    out = run(disp, type=IOREQ_TYPE_PIO, addr=UART, size=2, count=3, dir=IOREQ_READ, data_is_ptr=1, df=df, data=start)
    assert out.data == start  # the pointer is left as it was
    words = [int.from_bytes(ram.mem[a : a + 2], "little") for a in (0x200, 0x202, 0x204)]
    assert words == ([0x3333, 0x2222, 0x1111] if df else [0x1111, 0x2222, 0x3333])


# --- MMIO (IOREQ_TYPE_COPY) ---------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_mmio_read_write_each_size(disp: Dispatcher, dev: Recorder, size: int) -> None:
    value = 0x0123456789ABCDEF & ((1 << (8 * size)) - 1)
    run(disp, type=IOREQ_TYPE_COPY, addr=MMIO + 0x10, size=size, dir=IOREQ_WRITE, data=value | (1 << 63))
    assert dev.calls[-1] == ("w", 0x10, size, value if size < 8 else value | (1 << 63))
    out = run(disp, type=IOREQ_TYPE_COPY, addr=MMIO + 0x10, size=size, dir=IOREQ_READ)
    assert out.data == dev.regs[0x10]


@pytest.mark.parametrize("df", [0, 1])
def test_rep_movs_from_mmio_to_ram(disp: Dispatcher, dev: Recorder, ram: FakeRam, df: int) -> None:
    base, buf = MMIO + 0x40, 0x1000
    run(disp, type=IOREQ_TYPE_COPY, addr=base, size=4, count=3, dir=IOREQ_READ, data_is_ptr=1, df=df, data=buf)
    step = -4 if df else 4
    assert [c[1] for c in dev.calls] == [0x40, 0x40 + step, 0x40 + 2 * step]
    for i in range(3):
        gpa = buf + i * step
        assert int.from_bytes(ram.mem[gpa : gpa + 4], "little") == 0x11 * (0x40 + i * step + 1)


def test_rep_movs_from_ram_to_mmio_with_df(disp: Dispatcher, dev: Recorder, ram: FakeRam) -> None:
    ram.mem[0x2000:0x2010] = bytes(range(16))
    run(
        disp,
        type=IOREQ_TYPE_COPY,
        addr=MMIO + 0x108,
        size=8,
        count=2,
        dir=IOREQ_WRITE,
        data_is_ptr=1,
        df=1,
        data=0x2008,
    )
    assert dev.calls == [
        ("w", 0x108, 8, int.from_bytes(bytes(range(8, 16)), "little")),
        ("w", 0x100, 8, int.from_bytes(bytes(range(8)), "little")),
    ]


def test_rep_running_past_range_is_refused_before_any_access(disp: Dispatcher, dev: Recorder) -> None:
    out = run(disp, type=IOREQ_TYPE_COPY, addr=MMIO + 0xFF8, size=4, count=4, dir=IOREQ_READ, data_is_ptr=1, data=0)
    assert dev.calls == [] and disp.stats["refused:range"] == 1 and out.data == 0


def test_rep_below_range_with_df_is_refused(disp: Dispatcher, dev: Recorder) -> None:
    run(disp, type=IOREQ_TYPE_COPY, addr=MMIO + 4, size=4, count=3, dir=IOREQ_WRITE, data_is_ptr=1, df=1, data=0x100)
    assert dev.calls == [] and disp.stats["refused:range"] == 1


def test_huge_count_refused_without_touching_anything(disp: Dispatcher, dev: Recorder, ram: FakeRam) -> None:
    run(disp, type=IOREQ_TYPE_PIO, addr=UART, size=1, count=0xFFFFFFFF, dir=IOREQ_READ, data_is_ptr=1, data=0)
    assert dev.calls == [] and disp.stats["refused:count"] == 1 and not any(ram.mem)


def test_count_at_limit_is_served(disp: Dispatcher, dev: Recorder) -> None:
    run(disp, type=IOREQ_TYPE_PIO, addr=UART, size=1, count=MAX_REP, dir=IOREQ_WRITE, data_is_ptr=1, data=0)
    assert len(dev.calls) == MAX_REP


def test_pointer_outside_ram_refused_and_nothing_written_outside(disp: Dispatcher, ram: FakeRam) -> None:
    far = len(ram.mem) + 0x1000
    run(disp, type=IOREQ_TYPE_COPY, addr=MMIO, size=4, count=2, dir=IOREQ_READ, data_is_ptr=1, data=far)
    assert disp.stats["refused:guest-memory"] == 1 and ram.faults == [(far, 4)]


def test_pointer_wrapping_address_space_refused(disp: Dispatcher, dev: Recorder) -> None:
    run(disp, type=IOREQ_TYPE_PIO, addr=UART, size=2, count=3, dir=IOREQ_WRITE, data_is_ptr=1, df=1, data=2)
    assert disp.stats["refused:wrap"] == 1 and dev.calls == []


def test_data_is_ptr_without_guest_memory_refused(dev: Recorder) -> None:
    d = Dispatcher()
    d.ports.add(UART, UART, dev)
    run(d, type=IOREQ_TYPE_PIO, addr=UART, size=1, count=1, dir=IOREQ_WRITE, data_is_ptr=1, data=0)
    assert d.stats["refused:no-memory"] == 1 and dev.calls == []


# --- PCI config --------------------------------------------------------------------------


def sbdf(seg: int, bus: int, dev: int, fn: int) -> int:
    return (seg << 16) | (bus << 8) | (dev << 3) | fn


def test_pci_config_read_write(disp: Dispatcher) -> None:
    cfg = Recorder({0: 0x12345678})
    disp.add_pci(sbdf(0, 0, 3, 0), cfg)
    out = run(disp, type=IOREQ_TYPE_PCI_CONFIG, addr=(sbdf(0, 0, 3, 0) << 32) | 0, size=4, dir=IOREQ_READ)
    assert out.data == 0x12345678
    run(disp, type=IOREQ_TYPE_PCI_CONFIG, addr=(sbdf(0, 0, 3, 0) << 32) | 0x3C, size=1, dir=IOREQ_WRITE, data=0x10B)
    assert cfg.calls[-1] == ("w", 0x3C, 1, 0x0B)


def test_pci_config_other_function_reads_all_ones(disp: Dispatcher) -> None:
    disp.add_pci(sbdf(0, 0, 3, 0), Recorder())
    out = run(disp, type=IOREQ_TYPE_PCI_CONFIG, addr=sbdf(0, 0, 3, 1) << 32, size=2, dir=IOREQ_READ)
    assert out.data == 0xFFFF


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"size": 8}, "size"),
        ({"size": 3}, "size"),
        ({"count": 2}, "count"),
        ({"addr": 0xFFE, "size": 4}, "range"),
    ],
)
def test_pci_config_bad_access_refused(disp: Dispatcher, fields: dict[str, int], reason: str) -> None:
    cfg = Recorder()
    disp.add_pci(0, cfg)
    run(disp, type=IOREQ_TYPE_PCI_CONFIG, dir=IOREQ_READ, **{"size": 4, **fields})
    assert disp.stats[f"refused:{reason}"] == 1 and cfg.calls == []


# --- TIMEOFFSET, INVALIDATE, unknown ----------------------------------------------------------


def test_timeoffset_delivers_signed_delta(ram: FakeRam) -> None:
    seen: list[int] = []
    d = Dispatcher(ram, on_timeoffset=seen.append)
    run(d, type=IOREQ_TYPE_TIMEOFFSET, dir=IOREQ_WRITE, size=8, data=(-3600) & (2**64 - 1))
    assert seen == [-3600]


def test_invalidate_flushes_guest_mappings(disp: Dispatcher, ram: FakeRam) -> None:
    run(disp, type=IOREQ_TYPE_INVALIDATE, dir=IOREQ_WRITE, size=8)
    assert ram.invalidations == 1


@pytest.mark.parametrize("type_", [3, 4, 9, 0xFF])
def test_unknown_type_refused_read_all_ones(disp: Dispatcher, type_: int) -> None:
    out = run(disp, type=type_, dir=IOREQ_READ, size=4, addr=UART)
    assert out.data == 0xFFFFFFFF and disp.stats["refused:type"] == 1


# --- the state machine ------------------------------------------------------------------------


@pytest.mark.parametrize("state", [s for s in range(16) if s != STATE_IOREQ_READY])
def test_slot_not_ready_is_left_untouched(disp: Dispatcher, dev: Recorder, state: int) -> None:
    pg = page()
    post(pg, 1, type=IOREQ_TYPE_PIO, addr=UART, state=state, data=0xAB)
    before = bytes(pg)
    assert disp.handle_slot(pg, 1) is False
    assert bytes(pg) == before and dev.calls == []


def test_only_the_vcpus_own_slot_changes(disp: Dispatcher) -> None:
    pg = page()
    post(pg, 0, type=IOREQ_TYPE_PIO, addr=UART, dir=IOREQ_READ)
    post(pg, 2, type=IOREQ_TYPE_PIO, addr=UART, dir=IOREQ_READ)
    other = bytes(pg[2 * IOREQ_SIZE : 3 * IOREQ_SIZE])
    assert disp.handle_slot(pg, 0)
    assert bytes(pg[2 * IOREQ_SIZE : 3 * IOREQ_SIZE]) == other
    assert slot(pg, 0).vp_eport == 7  # Xen's port is never changed (ioreq_send checks it)


def test_state_goes_through_inprocess_while_device_runs(disp: Dispatcher) -> None:
    pg = page()
    seen: list[int] = []

    class Peek:
        def read(self, addr: int, size: int) -> int:
            seen.append(slot(pg, 0).state)
            return 0

        def write(self, addr: int, size: int, value: int) -> None:
            pass

    disp.ports.add(0x60, 0x60, Peek())
    post(pg, 0, type=IOREQ_TYPE_PIO, addr=0x60, dir=IOREQ_READ)
    disp.handle_slot(pg, 0)
    assert seen == [STATE_IOREQ_INPROCESS] and slot(pg, 0).state == STATE_IORESP_READY


def test_state_changed_under_us_is_not_answered(disp: Dispatcher) -> None:
    pg = page()

    class Meddler:  # stands in for anything that rewrites the slot while we work
        def read(self, addr: int, size: int) -> int:
            pg[30] = (pg[30] & 0xF0) | STATE_IOREQ_NONE
            return 0

        def write(self, addr: int, size: int, value: int) -> None:
            pass

    disp.ports.add(0x61, 0x61, Meddler())
    post(pg, 0, type=IOREQ_TYPE_PIO, addr=0x61, dir=IOREQ_READ)
    assert disp.handle_slot(pg, 0) is False
    assert slot(pg, 0).state == STATE_IOREQ_NONE and disp.stats["badness"] == 1


def test_flag_bits_beside_state_preserved(disp: Dispatcher) -> None:
    out = run(disp, type=IOREQ_TYPE_PIO, addr=UART, size=1, count=1, dir=IOREQ_WRITE, data_is_ptr=1, df=1, data=5)
    assert out.data_is_ptr and out.df and out.dir == IOREQ_WRITE


def test_slot_out_of_page_is_a_programming_error(disp: Dispatcher) -> None:
    with pytest.raises(IndexError):
        disp.handle_slot(page(), 128)


# --- devices that raise ---------------------------------------------------------------------------


def test_raising_device_logged_and_loop_continues(
    disp: Dispatcher, dev: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    disp.ports.add(0x70, 0x71, Exploding(), "rtc")
    with caplog.at_level(logging.ERROR, "xendmop.runtime"):
        out = run(disp, type=IOREQ_TYPE_PIO, addr=0x71, size=1, dir=IOREQ_READ)
        run(disp, type=IOREQ_TYPE_PIO, addr=0x70, size=1, dir=IOREQ_WRITE, data=1)
    assert out.data == 0xFF and disp.stats["device-error"] == 2
    assert "rtc raised on read" in caplog.text and "ZeroDivisionError" in caplog.text
    dev.regs[0] = 0x42
    assert run(disp, type=IOREQ_TYPE_PIO, addr=UART, size=1, dir=IOREQ_READ).data == 0x42


def test_device_returning_non_int_is_all_ones(disp: Dispatcher) -> None:
    class Bad:
        def read(self, addr: int, size: int) -> int:
            return "nope"  # type: ignore[return-value]

        def write(self, addr: int, size: int, value: int) -> None:
            pass

    disp.ports.add(0x80, 0x80, Bad())
    assert run(disp, type=IOREQ_TYPE_PIO, addr=0x80, size=1, dir=IOREQ_READ).data == 0xFF


# --- the buffered ring ----------------------------------------------------------------------------


def test_buffered_writes_drained_in_order(disp: Dispatcher, dev: Recorder) -> None:
    pg = page()
    xen = Producer(pg)
    for i in range(3):
        assert xen.send(IOREQ_TYPE_COPY, 0xA0000 + i, 1, 0x10 + i)
    disp.mmio.add(0xA0000, 0xBFFFF, (vga := Recorder()), "vga")
    assert disp.drain_buffered(pg) == 3
    assert vga.calls == [("w", i, 1, 0x10 + i) for i in range(3)]
    assert pointers(pg) == (3, 3)


def test_buffered_quad_word_uses_two_slots_across_wrap(disp: Dispatcher) -> None:
    pg = page()
    vga = Recorder()
    disp.mmio.add(0xA0000, 0xBFFFF, vga)
    set_pointers(pg, IOREQ_BUFFER_SLOT_NUM - 1, IOREQ_BUFFER_SLOT_NUM - 1)  # next write lands in slot 510
    assert Producer(pg).send(IOREQ_TYPE_COPY, 0xA0008, 8, 0x1122334455667788)
    assert disp.drain_buffered(pg) == 1
    assert vga.calls == [("w", 8, 8, 0x1122334455667788)]
    assert pointers(pg) == (IOREQ_BUFFER_SLOT_NUM + 1, IOREQ_BUFFER_SLOT_NUM + 1)


def test_buffered_pointers_wrap_at_2_32(disp: Dispatcher) -> None:
    # LEGACY pointers run free: both sides index with the same uint32 value modulo 511.
    pg = page()
    vga = Recorder()
    disp.mmio.add(0xA0000, 0xBFFFF, vga)
    start = 2**32 - 2
    set_pointers(pg, start, start)
    xen = Producer(pg)
    for i in range(4):
        xen.send(IOREQ_TYPE_COPY, 0xA0000, 2, i)
    assert disp.drain_buffered(pg) == 4
    assert [c[3] for c in vga.calls] == [0, 1, 2, 3]
    assert pointers(pg) == (2, 2)


def test_buffered_many_rounds_past_ring_size(disp: Dispatcher) -> None:
    pg = page()
    vga = Recorder()
    disp.mmio.add(0xA0000, 0xBFFFF, vga)
    xen = Producer(pg)
    sent = 0
    for _ in range(5):
        while xen.send(IOREQ_TYPE_COPY, 0xA0000, 4 if sent % 3 else 8, sent):
            sent += 1
        disp.drain_buffered(pg)
    assert [c[3] for c in vga.calls] == list(range(sent))
    assert sent > 3 * IOREQ_BUFFER_SLOT_NUM // 2


def test_buffered_drain_consumes_at_most_one_ring(disp: Dispatcher) -> None:
    pg = page()
    disp.mmio.add(0xA0000, 0xBFFFF, Recorder())
    for i in range(IOREQ_BUFFER_SLOT_NUM):
        buf_entry(pg, i, type=IOREQ_TYPE_COPY, addr=0xA0000, size_log2=0, data=i)
    set_pointers(pg, 0, IOREQ_BUFFER_SLOT_NUM)
    assert disp.drain_buffered(pg) == IOREQ_BUFFER_SLOT_NUM
    assert pointers(pg) == (IOREQ_BUFFER_SLOT_NUM,) * 2


def test_buffered_inconsistent_pointers_refused(disp: Dispatcher) -> None:
    pg = page()
    set_pointers(pg, 10, 10 + IOREQ_BUFFER_SLOT_NUM + 1)
    assert disp.drain_buffered(pg) == 0 and pointers(pg)[0] == 10
    assert disp.stats["refused:ring"] == 1


def test_buffered_half_quad_word_waits(disp: Dispatcher) -> None:
    pg = page()
    buf_entry(pg, 0, type=IOREQ_TYPE_COPY, addr=0xA0000, size_log2=3, data=1)
    set_pointers(pg, 0, 1)
    assert disp.drain_buffered(pg) == 0 and pointers(pg) == (0, 1)


def test_buffered_timeoffset_and_pio(ram: FakeRam) -> None:
    seen: list[int] = []
    d = Dispatcher(ram, on_timeoffset=seen.append)
    port = Recorder()
    d.ports.add(0x3C4, 0x3C5, port)
    pg = page()
    xen = Producer(pg)
    xen.send(IOREQ_TYPE_TIMEOFFSET, 0, 8, 120)
    xen.send(IOREQ_TYPE_PIO, 0x3C5, 1, 0x0F)
    assert d.drain_buffered(pg) == 2
    assert seen == [120] and port.calls == [("w", 1, 1, 0x0F)]


def test_store_read_pointer_is_one_plain_store() -> None:
    pg = page()
    set_pointers(pg, 7, 9)
    StoreReadPointer().advance(pg[:8].cast("I"), 7, 2)
    assert pointers(pg) == (9, 9)


def test_atomic_add_composes_with_xens_canonicalisation() -> None:
    try:
        atomic = AtomicAddReadPointer()
    except OSError as e:  # ATOMIC mode needs libatomic's __atomic_fetch_add_4
        pytest.skip(f"libatomic unavailable, ATOMIC bufioreq cannot be tested: {e}")
    pg = page()
    set_pointers(pg, 3 * IOREQ_BUFFER_SLOT_NUM + 5, 3 * IOREQ_BUFFER_SLOT_NUM + 9)
    rd = pointers(pg)[0]
    set_pointers(pg, 5, 9)  # Xen's cmpxchg of the pair between our load and our update
    atomic.advance(pg[:8].cast("I"), rd, 2)
    assert pointers(pg) == (7, 9)  # a plain store of rd + 2 would have given read > write
    plain = page()
    set_pointers(plain, 5, 9)
    StoreReadPointer().advance(plain[:8].cast("I"), rd, 2)
    assert pointers(plain)[0] > pointers(plain)[1]  # why ATOMIC mode must not use the store


# --- small parts ------------------------------------------------------------------------------------


def test_rangemap_rejects_overlap_and_needs_containment(dev: Recorder) -> None:
    m = RangeMap("mmio")
    m.add(0x1000, 0x1FFF, dev)
    with pytest.raises(ValueError, match="overlaps"):
        m.add(0x1800, 0x2800, dev)
    with pytest.raises(ValueError):
        m.add(0x10, 0x0F, dev)
    m.add(0x2000, 0x2FFF, dev)
    assert m.find(0x1FFC, 0x1FFF) is not None
    assert m.find(0x1FFE, 0x2001) is None
    assert m.find(0x0, 0x3) is None
    m.remove(0x1000, 0x1FFF)
    assert m.find(0x1000, 0x1000) is None and len(m) == 1


def test_ratelimited_log_bounds_output(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    rl = RateLimitedLog(logging.getLogger("t.rl"), burst=3, interval=1.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "t.rl"):
        for _ in range(1000):
            rl(logging.WARNING, "k", "hostile")
        now[0] = 1.5
        rl(logging.WARNING, "k", "hostile")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs.count("hostile") == 4 and "k: 997 similar messages suppressed" in msgs


def test_ioreq_round_trip_matches_ctypes_mirror() -> None:
    import ctypes

    from xendmop.abi.ioreq import ioreq

    req = Ioreq(0x1234, 0x5678, 3, 4, 99, STATE_IOREQ_READY, True, IOREQ_READ, True, IOREQ_TYPE_COPY)
    c = ioreq.from_buffer_copy(req.to_bytes())
    assert (c.addr, c.data, c.count, c.size, c.vp_eport) == (0x1234, 0x5678, 3, 4, 99)
    assert (c.state, c.data_is_ptr, c.dir, c.df, c.type) == (STATE_IOREQ_READY, 1, IOREQ_READ, 1, IOREQ_TYPE_COPY)
    assert Ioreq.from_bytes(bytes(c)) == req and ctypes.sizeof(c) == IOREQ_SIZE
