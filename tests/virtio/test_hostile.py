"""A hostile guest on the mock: each broken ring is bounded work, a rate-limited log line,
NEEDS_RESET and a configuration interrupt; a reset brings the device back."""

from __future__ import annotations

import logging
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xendmop.virtio.blk import VirtioBlk
from xendmop.virtio.rng import VirtioRng
from xendmop.virtio.spec import (
    COMMON_MSIX,
    COMMON_Q_AVAILLO,
    COMMON_Q_DESCLO,
    COMMON_Q_ENABLE,
    COMMON_Q_MSIX,
    COMMON_Q_SELECT,
    COMMON_Q_SIZE,
    COMMON_Q_USEDLO,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTQ_DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)

from .conftest import Setup, VirtioFactory

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
BUF = 0x300000  # guest RAM the tests point buffers at (the domain has 4 MiB)
OUTSIDE = 0x7FFF0000  # not the guest's RAM


def broken(s: Setup, key: str) -> None:
    """The device went NEEDS_RESET for ``key``, told the driver, and used nothing."""
    q = s.driver.queues[0]
    assert s.driver.needs_reset
    assert s.transport.errors[-1].startswith(key), s.transport.errors
    assert s.msis_for(0) == 1  # configuration change
    assert q.get_used() == []
    # It stays quiet until reset...
    q.kick(force=True)
    assert q.get_used() == []
    # ... and works again after one.
    s.driver.bring_up()
    assert not s.driver.needs_reset
    assert s.driver.queues[0].request([], [4])[0] == 4


@pytest.fixture
def rng(virtio: VirtioFactory) -> Setup:
    s = virtio(VirtioRng(), logger=logging.getLogger("test.virtio"))
    s.driver.bring_up()
    return s


def test_descriptor_loop(rng: Setup) -> None:
    q = rng.driver.queues[0]
    q.add_raw({0: (BUF, 8, WRITE | NEXT, 1), 1: (BUF, 8, WRITE | NEXT, 0)}, head=0)
    q.kick(force=True)
    broken(rng, "chain-too-long")


def test_loop_in_the_largest_queue_is_bounded_work(virtio: VirtioFactory) -> None:
    s = virtio(VirtioRng(queue_size=4096))
    s.driver.bring_up()
    q = s.driver.queues[0]
    q.add_raw({i: (BUF, 1, WRITE | NEXT, (i + 1) % 4096) for i in range(4096)}, head=0)
    start = time.monotonic()
    q.kick(force=True)
    assert time.monotonic() - start < 5
    assert s.transport.errors[-1].startswith("chain-too-long")
    assert "exceeds 4096 descriptors" in s.transport.errors[-1]


def test_head_and_next_outside_the_table(rng: Setup) -> None:
    q = rng.driver.queues[0]
    q.add_raw({}, head=q.size)
    q.kick(force=True)
    broken(rng, "bad-head")


def test_next_outside_the_table(rng: Setup) -> None:
    q = rng.driver.queues[0]
    q.add_raw({0: (BUF, 8, WRITE | NEXT, 0xFFFF)}, head=0)
    q.kick(force=True)
    broken(rng, "bad-next")


def test_buffer_outside_guest_ram(rng: Setup) -> None:
    q = rng.driver.queues[0]
    q.add_raw({0: (OUTSIDE, 64, WRITE, 0)}, head=0)
    q.kick(force=True)
    broken(rng, "guest-memory")


def test_buffer_wrapping_past_2_64(rng: Setup) -> None:
    q = rng.driver.queues[0]
    q.add_raw({0: ((1 << 64) - 8, 64, WRITE, 0)}, head=0)
    q.kick(force=True)
    broken(rng, "bad-address")


def test_buffer_above_a_known_ram_limit_is_refused_before_any_access(virtio: VirtioFactory) -> None:
    s = virtio(VirtioRng(), ram_limit=4 << 20)
    s.driver.bring_up()
    q = s.driver.queues[0]
    q.add_raw({0: ((4 << 20) - 8, 64, WRITE, 0)}, head=0)
    q.kick(force=True)
    broken(s, "bad-address")


def test_ring_outside_guest_ram(virtio: VirtioFactory) -> None:
    s = virtio(VirtioRng())
    d = s.driver
    d.negotiate(0)
    d.setup_msix(2)
    d.common_write(COMMON_MSIX, 2, 0)
    q = d.setup_queue(0, 8, vector=1)  # rings in RAM; then the descriptor table is moved out of it:
    d.reset()
    d.negotiate(0)
    d.setup_msix(2)
    d.common_write(COMMON_MSIX, 2, 0)
    d.common_write(COMMON_Q_SELECT, 2, 0)
    d.common_write(COMMON_Q_SIZE, 2, 8)
    for reg, gpa in ((COMMON_Q_DESCLO, OUTSIDE), (COMMON_Q_AVAILLO, q.avail), (COMMON_Q_USEDLO, q.used)):
        d.common_write(reg, 4, gpa)
        d.common_write(reg + 4, 4, 0)
    d.common_write(COMMON_Q_MSIX, 2, 1)
    d.common_write(COMMON_Q_ENABLE, 2, 1)
    d.driver_ok()
    q.publish(0)
    q.notify()
    assert d.needs_reset
    assert s.transport.errors[-1].startswith("guest-memory")
    assert "descriptor at 0x7fff0000" in s.transport.errors[-1]
    assert s.msis_for(0) == 1


def test_avail_index_jump(rng: Setup) -> None:
    q = rng.driver.queues[0]
    q.set_avail_idx(q.size + 1)
    q.kick(force=True)
    broken(rng, "avail-index-jump")


def test_indirect_table_looping(rng: Setup) -> None:
    q = rng.driver.queues[0]
    table = BUF + 0x1000
    rng.guest.write_ram(table, VIRTQ_DESC.pack(BUF, 4, WRITE | NEXT, 1) + VIRTQ_DESC.pack(BUF, 4, WRITE | NEXT, 0))
    q.add_raw({0: (table, 32, INDIRECT, 0)}, head=0)
    q.kick(force=True)
    broken(rng, "chain-too-long")


@pytest.mark.parametrize(
    ("length", "key"), [(0, "bad-indirect-len"), (24, "bad-indirect-len"), (16 * 1025, "bad-indirect-len")]
)
def test_indirect_table_lengths(rng: Setup, length: int, key: str) -> None:
    q = rng.driver.queues[0]
    q.add_raw({0: (BUF, length, INDIRECT, 0)}, head=0)
    q.kick(force=True)
    broken(rng, key)


def test_nested_indirect(rng: Setup) -> None:
    q = rng.driver.queues[0]
    table = BUF + 0x1000
    rng.guest.write_ram(table, VIRTQ_DESC.pack(BUF, 16, INDIRECT, 0))
    q.add_raw({0: (table, 16, INDIRECT, 0)}, head=0)
    q.kick(force=True)
    broken(rng, "nested-indirect")


def test_indirect_with_next(rng: Setup) -> None:
    q = rng.driver.queues[0]
    q.add_raw({0: (BUF, 16, INDIRECT | NEXT, 1), 1: (BUF, 4, WRITE, 0)}, head=0)
    q.kick(force=True)
    broken(rng, "indirect-with-next")


def test_indirect_without_negotiating_it(virtio: VirtioFactory) -> None:
    s = virtio(VirtioRng())
    s.driver.bring_up(wanted=1 << VIRTIO_F_RING_EVENT_IDX)
    q = s.driver.queues[0]
    q.add_raw({0: (BUF, 16, INDIRECT, 0)}, head=0)
    q.kick(force=True)
    assert s.driver.needs_reset and s.transport.errors[-1].startswith("indirect-off")


def test_readable_after_writable(rng: Setup) -> None:
    q = rng.driver.queues[0]
    q.add_raw({0: (BUF, 4, WRITE | NEXT, 1), 1: (BUF, 4, 0, 0)}, head=0)
    q.kick(force=True)
    broken(rng, "readable-after-write")


def test_device_never_writes_a_device_readable_buffer(rng: Setup) -> None:
    """rng given only a device-readable buffer writes nothing into it and stays up."""
    q = rng.driver.queues[0]
    rng.guest.write_ram(BUF, b"\xaa" * 16)
    q.add_raw({0: (BUF, 16, 0, 0)}, head=0)
    q.kick(force=True)
    assert q.get_used() == [(0, 0)]
    assert rng.guest.read_ram(BUF, 16) == b"\xaa" * 16
    assert not rng.driver.needs_reset


def test_blk_request_without_room_for_its_status(virtio: VirtioFactory, tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "disk")
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    fd = os.open(path, os.O_RDWR)
    try:
        s = virtio(VirtioBlk(fd))
        s.driver.bring_up()
        q = s.driver.queues[0]
        before = open(path, "rb").read()
        s.guest.write_ram(BUF, bytes(16) + b"\x55" * 512)  # IN header, then a "data" buffer device-readable
        q.add_raw({0: (BUF, 16, NEXT, 1), 1: (BUF + 16, 512, 0, 0)}, head=0)
        q.kick(force=True)
        assert s.driver.needs_reset and s.transport.errors[-1].startswith("no-writable-room")
        assert s.guest.read_ram(BUF + 16, 512) == b"\x55" * 512
        assert open(path, "rb").read() == before
    finally:
        os.close(fd)


def test_broken_rings_are_logged_at_a_bounded_rate(virtio: VirtioFactory, caplog: pytest.LogCaptureFixture) -> None:
    s = virtio(VirtioRng(), logger=logging.getLogger("test.virtio.rate"))
    caplog.set_level(logging.WARNING, "test.virtio.rate")
    for _ in range(40):
        s.driver.bring_up()
        q = s.driver.queues[0]
        q.add_raw({}, head=q.size)
        q.kick(force=True)
        assert s.driver.needs_reset
    lines = [r for r in caplog.records if r.name == "test.virtio.rate"]
    assert 1 <= len(lines) <= 6
    assert len(s.transport.errors) == 16  # bounded memory too


# --- hypothesis through the simulated guest -----------------------------------------------------------

hostile_desc = st.tuples(
    st.one_of(st.integers(BUF, BUF + 0x8000), st.integers(0, 1 << 40), st.integers((1 << 64) - 64, (1 << 64) - 1)),
    st.one_of(st.integers(0, 256), st.integers(0, 1 << 20)),
    st.integers(0, 7),
    st.integers(0, 20),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    descs=st.dictionaries(st.integers(0, 15), hostile_desc, max_size=16),
    head=st.integers(0, 20),
    jump=st.one_of(st.just(0), st.integers(0, 0xFFFF)),
)
def test_any_hostile_ring_through_the_mock_guest(
    rng: Setup, descs: dict[int, tuple[int, int, int, int]], head: int, jump: int
) -> None:
    """The device answers every notification (no GuestTimeout, no device error at teardown):
    the chain is used or the device needs reset, and a reset always brings it back."""
    d = rng.driver
    if d.needs_reset or not d.queues:
        d.bring_up()
    q = d.queues[0]
    q.add_raw(descs, head)
    if jump:
        q.set_avail_idx(q.avail_idx + jump)
    q.kick(force=True)
    assert d.needs_reset or q.used_idx() == q.avail_idx
    d.bring_up()
    assert d.queues[0].request([], [8])[0] == 8
