"""The mock's fast ioreq path keeps Xen's rules: routes follow every range, server and
enable change (the cache is invalidated), the guest waits on a real eventfd for the DM's
notify (a bounded wait, several notifies one wake-up), and a wake-up asked for under the
host lock is written only after it."""

from __future__ import annotations

import os
import select
import time

import pytest

from xendmop import BufIoreq, DeviceModel
from xendmop.abi.ioreq import IOREQ_READ, IOREQ_TYPE_PIO
from xendmop.abi.ioreq_slot import Ioreq
from xendmop.mock import MockXen
from xendmop.mock.simguest import GuestTimeout, SimGuest
from xendmop.mock.state import WakeAfterUnlock
from xendmop.types import IoRangeType

PORT = 0x3F8


def pio(port: int, size: int = 1) -> Ioreq:
    return Ioreq(port, 0, 1, size, 0, 0, False, IOREQ_READ, False, IOREQ_TYPE_PIO)


@pytest.fixture
def host() -> MockXen:
    with MockXen() as h:
        h.create_domain(vcpus=2, hvm=True, memory_mb=4)
        yield h


def test_routes_follow_every_change(host: MockXen) -> None:
    """Asked before and after each change, so a stale cached route fails the test."""
    guest = SimGuest(host, 1, timeout=0.2)
    with DeviceModel.open("mock", xen=host) as dm:
        older = dm.create_ioreq_server(1, BufIoreq.OFF)
        dm.map_io_range_to_ioreq_server(1, older, False, PORT, PORT + 7)
        assert guest.select(pio(PORT)) is None  # not enabled yet
        dm.set_ioreq_server_state(1, older, True)
        assert guest.select(pio(PORT)).id == older
        assert guest.select(pio(PORT + 7, 2)) is None  # straddles the range's end
        newer = dm.create_ioreq_server(1, BufIoreq.OFF)
        dm.map_io_range_to_ioreq_server(1, newer, False, PORT, PORT)
        assert guest.select(pio(PORT)).id == older  # newer is not enabled
        dm.set_ioreq_server_state(1, newer, True)
        assert guest.select(pio(PORT)).id == newer  # highest id first
        assert guest.select(pio(PORT + 1)).id == older
        dm.unmap_io_range_from_ioreq_server(1, newer, False, PORT, PORT)
        assert guest.select(pio(PORT)).id == older
        dm.map_io_range_to_ioreq_server(1, newer, False, PORT, PORT)
        assert guest.select(pio(PORT)).id == newer
        dm.set_ioreq_server_state(1, newer, False)
        assert guest.select(pio(PORT)).id == older
        dm.destroy_ioreq_server(1, older)
        assert guest.select(pio(PORT)) is None
        assert guest.inb(PORT) == 0xFF  # Xen's null handler
        dm.destroy_ioreq_server(1, newer)


def test_route_cache_is_bounded(host: MockXen) -> None:
    from xendmop.mock.state import ROUTE_CACHE_SIZE

    d = host.hypervisor.domains[1]
    with host.lock:
        for port in range(3 * ROUTE_CACHE_SIZE):
            assert d.select_ioreq_server(IoRangeType.PORT, port, port) is None
        assert len(d._routes) <= ROUTE_CACHE_SIZE


def test_dm_notify_wait_is_an_eventfd_wait(host: MockXen) -> None:
    with DeviceModel.open("mock", xen=host) as dm:
        sid = dm.create_ioreq_server(1, BufIoreq.OFF)
        server = host.hypervisor.domains[1].servers[sid]
        t = time.monotonic()
        assert server.wait_dm_notify(1, 0.05) is False  # nothing notified: a bounded wait
        assert 0.04 <= time.monotonic() - t < 2
        fd = server.notify_fd(1)
        assert not select.select([fd], [], [], 0)[0]
        server.dm_notified(1)
        server.dm_notified(1)
        assert select.select([fd], [], [], 0)[0]  # a real fd, readable after the notify
        assert server.wait_dm_notify(1, 0) is True  # both notifies, one wake-up
        assert server.wait_dm_notify(1, 0) is False
        assert server.dm_notify_count[1] == 2
        assert server.wait_dm_notify(0, -1) is False  # a negative timeout is no wait


def test_wake_is_written_after_the_host_lock(host: MockXen) -> None:
    with DeviceModel.open("mock", xen=host) as dm:
        sid = dm.create_ioreq_server(1, BufIoreq.OFF)
        server = host.hypervisor.domains[1].servers[sid]
        fd = server.notify_fd(0)
        with WakeAfterUnlock(), host.lock:
            with WakeAfterUnlock():  # nested: the outermost one writes
                server.dm_notified(0)
            assert not select.select([fd], [], [], 0)[0]
        assert select.select([fd], [], [], 0)[0]
        assert os.eventfd_read(fd) == 1


def test_unanswered_access_times_out_naming_vcpu_and_ioreq(host: MockXen) -> None:
    guest = SimGuest(host, 1, timeout=0.1)
    with DeviceModel.open("mock", xen=host) as dm:
        sid = dm.create_ioreq_server(1, BufIoreq.OFF)
        dm.map_io_range_to_ioreq_server(1, sid, False, PORT, PORT)
        # pages mapped by nobody: the slot is in the server's own frames, ports filled in at enable
        assert host.hypervisor.alloc_ioreq_pages(host.hypervisor.domains[1].servers[sid]) == 0
        dm.set_ioreq_server_state(1, sid, True)
        t = time.monotonic()
        with pytest.raises(GuestTimeout) as e:
            guest.inb(PORT, vcpu=1)
        assert time.monotonic() - t < 2
        assert e.value.vcpu == 1 and e.value.req.addr == PORT and e.value.req.size == 1
        assert "vCPU1" in str(e.value) and "0x3f8" in str(e.value).lower()
        dm.destroy_ioreq_server(1, sid)


def test_server_fds_close_with_the_server(host: MockXen) -> None:
    import gc

    with DeviceModel.open("mock", xen=host) as dm:
        sid = dm.create_ioreq_server(1, BufIoreq.OFF)
        server = host.hypervisor.domains[1].servers[sid]
        fd = server.notify_fd(0)
        dm.destroy_ioreq_server(1, sid)
        os.fstat(fd)  # still held: a vCPU may still be polling it
        del server
        gc.collect()
        with pytest.raises(OSError):
            os.fstat(fd)
