"""The split virtqueue alone, over a bytearray of guest RAM: orderings a concurrent driver can produce."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from runtime.helpers import FakeRam

from xendmop.virtio import Chain, Virtqueue
from xendmop.virtio.spec import VIRTQ_DESC, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from xendmop.virtio.virtqueue import USED_BATCH

DESC, AVAIL, USED, BUF = 0x0000, 0x1000, 0x2000, 0x3000
SIZE = 8


class RacingRam(FakeRam):
    """Guest RAM whose driver makes one more chain available just as the device writes avail_event."""

    def __init__(self) -> None:
        super().__init__(0x4000)
        self.raced = False

    def write(self, gpa: int, data: bytes) -> None:
        super().write(gpa, data)
        if gpa == USED + 4 + 8 * SIZE and not self.raced:  # avail_event
            self.raced = True
            publish(self, 1)


def publish(ram: FakeRam, head: int) -> None:
    idx = int.from_bytes(ram.mem[AVAIL + 2 : AVAIL + 4], "little")
    ram.mem[AVAIL + 4 + 2 * (idx % SIZE) : AVAIL + 6 + 2 * (idx % SIZE)] = head.to_bytes(2, "little")
    ram.mem[AVAIL + 2 : AVAIL + 4] = ((idx + 1) & 0xFFFF).to_bytes(2, "little")


def queue(event_idx: bool) -> Virtqueue:
    vq = Virtqueue(0, SIZE)
    vq.desc, vq.avail, vq.used, vq.enabled, vq.event_idx = DESC, AVAIL, USED, True, event_idx
    return vq


def test_a_chain_made_available_while_avail_event_is_written_is_not_left_behind() -> None:
    ram = RacingRam()
    for i in range(2):
        ram.mem[DESC + 16 * i : DESC + 16 * i + 16] = VIRTQ_DESC.pack(BUF + 64 * i, 64, VIRTQ_DESC_F_WRITE, 0)
    publish(ram, 0)
    vq = queue(event_idx=True)
    heads = [chain.head for chain in vq.chains(ram)]
    assert ram.raced and heads == [0, 1]
    assert int.from_bytes(ram.mem[USED + 4 + 8 * SIZE : USED + 6 + 8 * SIZE], "little") == 2


def test_a_drained_queue_publishes_and_interrupts_before_avail_event_asks_for_a_notification() -> None:
    """``on_used`` (the transport's used index and interrupt) runs when the queue is found
    empty and before avail_event is written, so a notification the driver sends meanwhile does
    not find the device still busy with the interrupt; a chain found after arming is served and
    the hook runs again for it."""
    ram = RacingRam()  # one more chain appears as avail_event is written
    for i in range(3):
        ram.mem[DESC + 16 * i : DESC + 16 * i + 16] = VIRTQ_DESC.pack(BUF + 64 * i, 64, VIRTQ_DESC_F_WRITE, 0)
    publish(ram, 0)
    publish(ram, 2)
    vq = queue(event_idx=True)
    seen: list[tuple[int, int]] = []

    def on_used(memory: object) -> None:
        assert memory is ram
        vq.publish_used(ram)
        seen.append((u16(ram, USED + 2), u16(ram, USED + 4 + 8 * SIZE)))  # used idx, avail_event

    vq.on_used = on_used
    assert vq.process(ram, lambda chain: 0) == 3
    assert seen == [(2, 0), (3, 2)]  # published before each arming; avail_event still the old one
    assert u16(ram, USED + 4 + 8 * SIZE) == 3


def test_a_long_batch_hands_back_what_it_used_every_used_batch_chains() -> None:
    """40 chains in one batch: the used index is published after chains 16 and 32, while the
    rest are still being served, and once more when drained; a driver whose used_event asks
    at 20 (as Linux's TX does at 3/4 of what it queued) is interrupted after chain 32, not 40."""
    size, n = 64, 40
    ram = FakeRam(0x4000)
    for i in range(n):
        ram.mem[DESC + 16 * i : DESC + 16 * i + 16] = VIRTQ_DESC.pack(BUF + 64 * i, 64, VIRTQ_DESC_F_WRITE, 0)
        ram.mem[AVAIL + 4 + 2 * i : AVAIL + 6 + 2 * i] = i.to_bytes(2, "little")
    ram.mem[AVAIL + 2 : AVAIL + 4] = n.to_bytes(2, "little")
    ram.mem[AVAIL + 4 + 2 * size : AVAIL + 6 + 2 * size] = (20).to_bytes(2, "little")  # used_event
    vq = Virtqueue(0, size)
    vq.desc, vq.avail, vq.used, vq.enabled, vq.event_idx = DESC, AVAIL, USED, True, True
    handled: list[int] = []
    published: list[tuple[int, int]] = []  # (chains handled so far, used idx the driver sees)
    interrupted_after: list[int] = []

    def on_used(memory: object) -> None:
        vq.publish_used(ram)
        published.append((len(handled), u16(ram, USED + 2)))
        if vq.needs_interrupt(ram):
            interrupted_after.append(len(handled))

    vq.on_used = on_used
    assert vq.process(ram, lambda chain: handled.append(chain.head) or 0) == n
    assert USED_BATCH == 16
    assert published == [(16, 16), (32, 32), (40, 40)]
    assert interrupted_after == [32]


def u16(ram: FakeRam, gpa: int) -> int:
    return int.from_bytes(ram.mem[gpa : gpa + 2], "little")


def test_used_ring_wraps_and_the_index_runs_modulo_2_16() -> None:
    ram = FakeRam(0x4000)
    ram.mem[DESC : DESC + 16] = VIRTQ_DESC.pack(BUF, 4, VIRTQ_DESC_F_WRITE, 0)
    vq = queue(event_idx=False)
    start = 0xFFFC
    vq.last_avail = vq._avail_shadow = vq.used_idx = vq.signalled = start
    ram.mem[AVAIL + 2 : AVAIL + 4] = start.to_bytes(2, "little")
    for _ in range(10):
        publish(ram, 0)
        assert vq.process(ram, lambda chain: chain.write(b"abcd")) == 1
    assert vq.used_idx == (start + 10) & 0xFFFF == int.from_bytes(ram.mem[USED + 2 : USED + 4], "little")
    slot = (start + 9) % SIZE
    assert ram.mem[USED + 4 + 8 * slot : USED + 12 + 8 * slot] == (0).to_bytes(4, "little") + (4).to_bytes(4, "little")
    assert vq.needs_interrupt(ram) and not vq.needs_interrupt(ram)  # once per batch of used chains


class CountingRam(FakeRam):
    """Guest RAM that counts the device's writes of the used index and its reads per address."""

    def __init__(self) -> None:
        super().__init__(0x8000)
        self.used_idx_writes = 0
        self.reads: list[tuple[int, int]] = []

    def read(self, gpa: int, size: int) -> bytes:
        self.reads.append((gpa, size))
        return super().read(gpa, size)

    def write(self, gpa: int, data: bytes) -> None:
        if gpa == USED + 2:
            self.used_idx_writes += 1
        super().write(gpa, data)


def test_a_batch_of_chains_moves_the_used_index_once() -> None:
    ram = CountingRam()
    for i in range(SIZE):
        ram.mem[DESC + 16 * i : DESC + 16 * i + 16] = VIRTQ_DESC.pack(BUF + 64 * i, 64, VIRTQ_DESC_F_WRITE, 0)
    for i in range(5):
        publish(ram, i)
    vq = queue(event_idx=False)
    assert vq.process(ram, lambda chain: chain.write(b"x")) == 5
    # Linux reads the used index, then the elements below it: all five are there when it moves.
    assert ram.used_idx_writes == 1
    assert int.from_bytes(ram.mem[USED + 2 : USED + 4], "little") == 5
    assert vq.needs_interrupt(ram)  # one interrupt for the batch


def test_an_indirect_table_is_read_in_one_access() -> None:
    ram = CountingRam()
    table = 0x6000
    entries = 64
    for i in range(entries):
        flags = VIRTQ_DESC_F_WRITE | (VIRTQ_DESC_F_NEXT if i + 1 < entries else 0)
        ram.mem[table + 16 * i : table + 16 * i + 16] = VIRTQ_DESC.pack(BUF + 64 * i, 64, flags, i + 1)
    ram.mem[DESC : DESC + 16] = VIRTQ_DESC.pack(table, 16 * entries, VIRTQ_DESC_F_INDIRECT, 0)
    publish(ram, 0)
    vq = queue(event_idx=False)
    vq.indirect = True
    (chain,) = list(vq.chains(ram))
    assert chain.writable == [(BUF + 64 * i, 64) for i in range(entries)]
    assert [r for r in ram.reads if table <= r[0] < table + 16 * entries] == [(table, 16 * entries)]


def test_a_limit_leaves_chains_for_later_and_asks_for_no_notification() -> None:
    ram = FakeRam(0x4000)
    for i in range(4):
        ram.mem[DESC + 16 * i : DESC + 16 * i + 16] = VIRTQ_DESC.pack(BUF + 64 * i, 64, VIRTQ_DESC_F_WRITE, 0)
        publish(ram, i)
    vq = queue(event_idx=True)
    ram.mem[USED + 4 + 8 * SIZE : USED + 6 + 8 * SIZE] = (0xBEEF).to_bytes(2, "little")
    assert [c.head for c in vq.chains(ram, limit=3)] == [0, 1, 2] and vq.more
    # avail_event untouched: the device comes back by itself, the driver need not notify.
    assert int.from_bytes(ram.mem[USED + 4 + 8 * SIZE : USED + 6 + 8 * SIZE], "little") == 0xBEEF
    vq.more = False
    assert [c.head for c in vq.chains(ram, limit=3)] == [3] and not vq.more
    assert int.from_bytes(ram.mem[USED + 4 + 8 * SIZE : USED + 6 + 8 * SIZE], "little") == 4


class ViewRam(FakeRam):
    """FakeRam that also offers page-sized views, as ``GuestRam.iter_views`` does."""

    def __init__(self) -> None:
        super().__init__(0x8000)
        self.views_taken = 0

    def iter_views(self, gpa: int, size: int) -> Iterator[memoryview]:
        self._check(gpa, size)
        while size:
            n = min(size, 0x1000 - gpa % 0x1000)
            self.views_taken += 1
            yield memoryview(self.mem)[gpa : gpa + n]
            gpa, size = gpa + n, size - n


def test_send_to_writes_the_bytes_past_the_header_as_one_packet_from_guest_ram_or_a_copy() -> None:
    """A frame after its 12-byte header, over two descriptors and a page boundary: one packet
    on a SOCK_SEQPACKET peer, taken through views of guest RAM when the memory offers them
    (no copy), else through a copy; the same bytes either way."""
    header, frame = b"H" * 12, bytes(range(256)) * 8  # 2048 bytes
    for ram in (ViewRam(), FakeRam(0x8000)):
        first, second = 0x1F00, 0x3000  # the first segment crosses the page at 0x2000
        ram.mem[first : first + 12 + 600] = header + frame[:600]
        ram.mem[second : second + len(frame) - 600] = frame[600:]
        chain = Chain(0, [(first, 612), (second, len(frame) - 600)], [], ram)
        mine, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with mine, peer:
            assert chain.send_to(mine.fileno(), 12) == len(frame)
            peer.setblocking(False)
            assert peer.recv(1 << 16) == frame
            with pytest.raises(BlockingIOError):
                peer.recv(1 << 16)  # one packet, not one per segment
        if isinstance(ram, ViewRam):
            assert ram.views_taken == 3  # 0x1F0C-0x2000, 0x2000-0x2164, the second segment
