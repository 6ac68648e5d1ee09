"""Hostile ioreqs: whatever a slot or the ring holds, the core stays up, stays bounded, touches
nothing outside the guest's RAM and its own slot, and answers the next honest access correctly."""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xendmop.abi.ioreq import (
    IOREQ_READ,
    IOREQ_TYPE_PIO,
    STATE_IOREQ_READY,
    STATE_IORESP_READY,
)
from xendmop.abi.ioreq_slot import IOREQ_SIZE, STATE_BYTE, Ioreq
from xendmop.runtime.dispatch import Dispatcher, RateLimitedLog

from .helpers import FakeRam, Recorder, page, post, slot

UART, MMIO = 0x3F8, 0xFEB00000
MAX_REP = 64  # small, so a fuzzed count that is served stays quick

interesting_u64 = st.one_of(
    st.integers(0, 2**64 - 1),
    st.sampled_from([0, UART, UART + 7, MMIO, MMIO + 0xFFC, 2**64 - 1, 2**63, 0xFFFF_FFFF, 0x1_0000_0000]),
    st.integers(0, 0x10000),
)
hostile_ioreq = st.builds(
    Ioreq,
    addr=interesting_u64,
    data=interesting_u64,
    count=st.one_of(st.integers(0, 2**32 - 1), st.integers(0, MAX_REP + 2)),
    size=st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 8, 16, 2**32 - 1]), st.integers(0, 2**32 - 1)),
    vp_eport=st.integers(0, 2**32 - 1),
    state=st.one_of(st.just(STATE_IOREQ_READY), st.integers(0, 15)),
    data_is_ptr=st.booleans(),
    dir=st.integers(0, 1),
    df=st.booleans(),
    type=st.one_of(st.sampled_from([0, 1, 2, 7, 8]), st.integers(0, 255)),
)


def make() -> tuple[Dispatcher, FakeRam, Recorder]:
    ram = FakeRam(0x4000)
    dev = Recorder()
    d = Dispatcher(ram, max_rep=MAX_REP, ratelog=RateLimitedLog(burst=0))
    d.ports.add(UART, UART + 7, dev)
    d.mmio.add(MMIO, MMIO + 0xFFF, dev)
    d.add_pci(0x18, dev)
    return d, ram, dev


def honest_read_works(d: Dispatcher, dev: Recorder) -> None:
    dev.regs[2] = 0x5A
    pg = page()
    post(pg, 0, type=IOREQ_TYPE_PIO, addr=UART + 2, size=1, dir=IOREQ_READ)
    assert d.handle_slot(pg, 0)
    assert slot(pg, 0).state == STATE_IORESP_READY and slot(pg, 0).data == 0x5A


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(req=hostile_ioreq, raw=st.binary(min_size=32, max_size=32), use_raw=st.booleans())
def test_hostile_slot(req: Ioreq, raw: bytes, use_raw: bool) -> None:
    d, ram, dev = make()
    pg = page()
    pg[IOREQ_SIZE : 2 * IOREQ_SIZE] = raw if use_raw else req.to_bytes()
    pg[0:IOREQ_SIZE] = b"\xaa" * IOREQ_SIZE  # a neighbour's slot must not change
    before = bytes(pg)
    was_ready = pg[IOREQ_SIZE + STATE_BYTE] & 0xF == STATE_IOREQ_READY
    t0 = time.monotonic()
    answered = d.handle_slot(pg, 1)
    assert time.monotonic() - t0 < 2.0
    assert answered == was_ready
    after = bytes(pg)
    if not was_ready:
        assert after == before
    else:
        changed = {i for i in range(len(after)) if after[i] != before[i]}
        allowed = set(range(IOREQ_SIZE + 8, IOREQ_SIZE + 16)) | {IOREQ_SIZE + STATE_BYTE}
        assert changed <= allowed  # only data and the state nibble
        assert after[IOREQ_SIZE + STATE_BYTE] & 0xF == STATE_IORESP_READY
        assert after[IOREQ_SIZE + STATE_BYTE] & 0xF0 == before[IOREQ_SIZE + STATE_BYTE] & 0xF0
    assert len(dev.calls) <= MAX_REP
    assert sum(n for _, n in ram.faults) <= 8 * 2  # refused at the first fault, never scanned
    honest_read_works(d, dev)


pointer = st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 1100), st.integers(2**32 - 600, 2**32 - 1))


@settings(max_examples=200, deadline=None)
@given(slots=st.binary(min_size=8, max_size=256), rd=pointer, wr=pointer, rounds=st.integers(1, 3))
def test_hostile_buffered_page(slots: bytes, rd: int, wr: int, rounds: int) -> None:
    d, _, dev = make()
    body = (slots * (4096 // len(slots) + 1))[: 4096 - 8]  # Xen owns this page, but trust nothing
    pg = memoryview(bytearray(rd.to_bytes(4, "little") + wr.to_bytes(4, "little") + body))
    for _ in range(rounds):
        handled = d.drain_buffered(pg)
        assert 0 <= handled <= 511
    assert len(dev.calls) <= 511 * rounds
    honest_read_works(d, dev)
