"""Hypothesis over split-ring layouts and transport register traffic: whatever the guest
writes, the device answers with a checked chain or ``VirtqueueError`` (never another
exception), reads a bounded number of descriptors, and touches nothing outside guest RAM."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from runtime.helpers import FakeRam, RecordingPciHost

from xendmop.virtio import VirtioPci, Virtqueue, VirtqueueError
from xendmop.virtio.mmio import VirtioMmio
from xendmop.virtio.rng import VirtioRng
from xendmop.virtio.spec import VIRTQ_DESC, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from xendmop.virtio.virtqueue import MAX_INDIRECT

RAM = 0x4000
DESC, AVAIL, USED, TABLES, DATA = 0x0000, 0x1000, 0x1400, 0x2000, 0x3000


class CountingRam(FakeRam):
    def __init__(self) -> None:
        super().__init__(RAM)
        self.reads = 0
        self.writes: list[tuple[int, int]] = []

    def read(self, gpa: int, size: int) -> bytes:
        self.reads += 1
        return super().read(gpa, size)

    def write(self, gpa: int, data: bytes) -> None:
        self.writes.append((gpa, len(data)))
        super().write(gpa, data)


addresses = st.one_of(
    st.integers(DATA, RAM - 1),
    st.integers(DATA, RAM - 1),
    st.integers(DATA, RAM - 1),
    st.integers(TABLES, DATA - 1),
    st.integers(RAM, 1 << 40),
    st.integers((1 << 64) - 4096, (1 << 64) - 1),
)
flags = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]).map(
    lambda f: (f & 1 and VIRTQ_DESC_F_NEXT) | (f & 2 and VIRTQ_DESC_F_WRITE) | (f & 4 and VIRTQ_DESC_F_INDIRECT)
)


def descriptors(n: int) -> st.SearchStrategy[list[tuple[int, int, int, int]]]:
    lengths = st.one_of(st.integers(0, 0x100), st.integers(0, 0x2000))
    desc = st.tuples(addresses, lengths, flags, st.one_of(st.integers(0, n - 1), st.integers(0, 2 * n)))
    return st.lists(desc, min_size=n, max_size=n)


@st.composite
def rings(draw: Any) -> dict[str, Any]:
    size = 1 << draw(st.integers(0, 6))
    return {
        "size": size,
        "table": draw(descriptors(size)),
        "indirect_table": draw(descriptors(draw(st.integers(1, 16)))),
        "avail": draw(st.lists(st.integers(0, size + 2), min_size=size, max_size=size)),
        # mostly a plausible number of new entries, sometimes any index at all
        "avail_step": draw(st.one_of(st.integers(0, size), st.integers(0, size), st.integers(0, 0xFFFF))),
        "last_avail": draw(st.integers(0, 0xFFFF)),
        "indirect": draw(st.booleans()),
        "event_idx": draw(st.booleans()),
    }


def build(r: dict[str, Any]) -> tuple[Virtqueue, CountingRam]:
    ram = CountingRam()
    for i, d in enumerate(r["table"]):
        ram.mem[DESC + 16 * i : DESC + 16 * i + 16] = VIRTQ_DESC.pack(*d)
    for i, d in enumerate(r["indirect_table"]):
        ram.mem[TABLES + 16 * i : TABLES + 16 * i + 16] = VIRTQ_DESC.pack(*d)
    avail_idx = (r["last_avail"] + r["avail_step"]) & 0xFFFF
    ram.mem[AVAIL + 2 : AVAIL + 4] = avail_idx.to_bytes(2, "little")
    for i, head in enumerate(r["avail"]):
        slot = (r["last_avail"] + i) % r["size"]
        ram.mem[AVAIL + 4 + 2 * slot : AVAIL + 6 + 2 * slot] = head.to_bytes(2, "little")
    vq = Virtqueue(0, 64)
    vq.size, vq.desc, vq.avail, vq.used = r["size"], DESC, AVAIL, USED
    vq.indirect, vq.event_idx = r["indirect"], r["event_idx"]
    vq.last_avail = vq._avail_shadow = vq.used_idx = r["last_avail"]
    vq.ram_limit = RAM
    vq.enabled = True
    return vq, ram


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rings())
def test_any_ring_gives_checked_chains_or_a_virtqueue_error(r: dict[str, Any]) -> None:
    vq, ram = build(r)
    size = r["size"]
    chains = 0
    allowed: list[tuple[int, int]] = [(0, 0)]  # then each chain's device-writable segments
    try:
        for _ in range(size + 1):
            before = ram.reads
            chain = vq.pop(ram)
            # avail idx + ring slot + direct descriptors + an indirect table's
            assert ram.reads - before <= 2 + size + MAX_INDIRECT
            if chain is None:
                break
            chains += 1
            segs = chain.readable + chain.writable
            assert 1 <= len(segs) <= max(size, MAX_INDIRECT)
            assert all(0 <= a and a + n <= RAM for a, n in segs)
            data = chain.read(1 << 20)
            assert len(data) == chain.readable_len
            allowed += chain.writable
            room = chain.writable_len
            chain.write(bytes(min(room, 64)))
            vq.push(ram, chain.head, chain.written)
        else:
            raise AssertionError("more chains than the driver could have made available")
        vq.needs_interrupt(ram)
    except VirtqueueError as e:
        assert e.key and str(e).startswith(e.key)
        event(e.key)
    event(f"{min(chains, 2)} chains")
    assert chains <= size
    # The device wrote only the used ring, avail_event and device-writable buffers it was given.
    for a, n in ram.writes:
        assert any(lo <= a and a + n <= lo + length for lo, length in allowed[1:]) or (
            USED <= a and a + n <= USED + 6 + 8 * size
        ), (a, n, allowed)


ops = st.one_of(
    st.tuples(st.just("bar"), st.integers(0, 0x3FFF), st.sampled_from([1, 2, 4, 8]), st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("common"), st.integers(0, 0x3F), st.sampled_from([1, 2, 4, 8]), st.integers(0, 0xFFFF)),
    st.tuples(st.just("msix"), st.integers(0, 0xFFF), st.sampled_from([1, 2, 4, 8]), st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("cfg"), st.integers(0, 0xFF), st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("status"), st.just(0x14), st.just(1), st.sampled_from([0, 1, 3, 11, 15, 0x4F, 0xFF])),
    st.tuples(st.just("ring"), st.integers(0, RAM - 2), st.just(2), st.integers(0, 0xFFFF)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, max_size=60))
def test_any_register_traffic_leaves_the_transport_answering(seq: list[tuple[str, int, int, int]]) -> None:
    ram = CountingRam()
    t = VirtioPci(VirtioRng(queue_size=16), lambda: ram, ram_limit=RAM)
    t.pci.host = RecordingPciHost()  # type: ignore[assignment]
    for kind, off, size, value in seq:
        value &= (1 << (8 * size)) - 1
        if kind in ("bar", "common", "status"):
            t.bar_write(off, size, value)
            t.bar_read(off, size)
        elif kind == "msix":
            t.msix_write(off, size, value)
            t.msix_read(off, size)
        elif kind == "cfg":
            t.pci.write(off, size, value)
            t.pci.read(off, size)
        else:
            ram.write(off, value.to_bytes(2, "little"))
            t.bar_write(0x3000, 2, 0)  # notify queue 0
    assert len(t.errors) <= 16
    assert t.status & 0xFF == t.status
    assert all(vq.size & (vq.size - 1) == 0 and 1 <= vq.size <= 16 for vq in t.queues if vq.enabled)


class RecordingIrqServer:
    """What ``VirtioMmio`` asks of its server: interrupt levels (an Xen refusal now and then)."""

    def __init__(self) -> None:
        self.levels: list[int] = []

    def set_irq_level(self, irq: int, level: int) -> None:
        self.levels.append(level)
        if len(self.levels) % 7 == 0:
            raise OSError(22, "Invalid argument")


mmio_ops = st.one_of(
    st.tuples(st.just("reg"), st.integers(0, 0xFF).map(lambda o: o & ~3), st.just(4), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("reg"), st.integers(0, 0x1FF), st.sampled_from([1, 2, 4, 8]), st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("reg"), st.sampled_from([0x44, 0x50, 0x64, 0x70, 0x38, 0x30]), st.just(4), st.integers(0, 20)),
    st.tuples(st.just("ring"), st.integers(0, RAM - 2), st.just(2), st.integers(0, 0xFFFF)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mmio_ops, max_size=60))
def test_any_mmio_register_traffic_leaves_the_transport_answering(seq: list[tuple[str, int, int, int]]) -> None:
    ram = CountingRam()
    t = VirtioMmio(VirtioRng(queue_size=16), lambda: ram, base=0x02000000, irq=33, ram_limit=RAM)
    server = RecordingIrqServer()
    t.server = server  # type: ignore[assignment]
    for kind, off, size, value in seq:
        value &= (1 << (8 * size)) - 1
        if kind == "reg":
            t.write(off, size, value)
            t.read(off, size)
        else:
            ram.write(off, value.to_bytes(2, "little"))
            t.write(0x50, 4, 0)  # QueueNotify: queue 0
    assert len(t.errors) <= 16
    assert t.status & 0xFF == t.status and t.interrupt_status & ~3 == 0
    assert all(vq.size & (vq.size - 1) == 0 and 1 <= vq.size <= 16 for vq in t.queues if vq.enabled)
    assert set(server.levels) <= {0, 1}
    assert t.line == bool(t.interrupt_status)  # raised while a status bit is set, lowered once none is
