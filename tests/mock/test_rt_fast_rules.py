"""The mock's per-access path (the guest's post and wait, the evtchn device's read, one-port
unmask and NOTIFY with its struct) keeps every rule of the general path it shortcuts: a test
here fails if a shortcut skipped one (Linux ``drivers/xen/evtchn.c``, Xen
``xen/common/ioreq.c``, as cited in the mock)."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import gc
import os
import select
import threading
from collections.abc import Iterator

import pytest

from xendmop import BufIoreq, DeviceModel
from xendmop.abi.evtchn import (
    IOCTL_EVTCHN_BIND_INTERDOMAIN,
    IOCTL_EVTCHN_NOTIFY,
    IOCTL_EVTCHN_UNBIND,
    ioctl_evtchn_bind_interdomain,
    ioctl_evtchn_notify,
    ioctl_evtchn_unbind,
)
from xendmop.abi.ioreq_slot import STATE_BYTE
from xendmop.abi.privcmd import IOCTL_PRIVCMD_HYPERCALL
from xendmop.mock import Event, EventLog, MockXen
from xendmop.mock.evtchn import MockEvtchnDevice
from xendmop.mock.simguest import GuestCrash, SimGuest
from xendmop.mock.state import IoreqServerState, WakeAfterUnlock, defer_wakes, wake, write_deferred_wakes
from xendmop.runtime.server import IoreqServer as RuntimeServer
from xendmop.testing import ServeThread

HVM = 1
PORT = 0x3F8


@pytest.fixture
def host() -> Iterator[MockXen]:
    with MockXen() as h:
        h.create_domain(vcpus=2, hvm=True, memory_mb=4)
        yield h


@pytest.fixture
def dm(host: MockXen) -> Iterator[DeviceModel]:
    with DeviceModel.open("mock", xen=host) as handle:
        yield handle


def _server(host: MockXen, dm: DeviceModel) -> IoreqServerState:
    sid = dm.create_ioreq_server(HVM, BufIoreq.OFF)
    server = host.hypervisor.domains[HVM].servers[sid]
    assert isinstance(server, IoreqServerState)
    return server


def _bind(host: MockXen, dev: MockEvtchnDevice, server: IoreqServerState, vcpu: int) -> int:
    """Bind vCPU ``vcpu``'s ioreq port on ``dev``; the local port."""
    arg = ioctl_evtchn_bind_interdomain(HVM, server.vcpu_ports[vcpu])
    return int(dev.ioctl(IOCTL_EVTCHN_BIND_INTERDOMAIN, arg))


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _errno(fn: object, *args: object) -> int:
    try:
        fn(*args)  # type: ignore[operator]
    except OSError as e:
        return e.errno or 0
    return 0


# --- NOTIFY with its struct: the same rule and the same log entry ------------------------------


def test_notify_logs_the_port_as_an_event_with_the_same_content(host: MockXen, dm: DeviceModel) -> None:
    server = _server(host, dm)
    dev = host.open_device("/dev/xen/evtchn")
    local = _bind(host, dev, server, 0)
    before = len(host.events)
    assert dev.ioctl(IOCTL_EVTCHN_NOTIFY, ioctl_evtchn_notify(local)) == 0
    assert len(host.events) == before + 1
    event = host.events[-1]
    assert event == Event("evtchn", "IOCTL_EVTCHN_NOTIFY", {"arg": {"port": local}}, 0)
    assert list(host.events)[-1] == event and host.events[-1:] == [event]
    # the mock host's EVENTS call ships each entry as dataclasses.asdict
    assert dataclasses.asdict(event) == {
        "device": "evtchn",
        "request": "IOCTL_EVTCHN_NOTIFY",
        "args": {"arg": {"port": local}},
        "result": 0,
    }
    assert server.dm_notify_count[0] == 1  # and it reached Xen's consumer of the port
    dev.close()


def test_notify_of_a_port_this_fd_did_not_bind_is_enotconn_and_logged(host: MockXen, dm: DeviceModel) -> None:
    """``evtchn_ioctl`` IOCTL_EVTCHN_NOTIFY: ``find_evtchn`` finds no port of this fd -> ENOTCONN,
    for a port nobody bound, one another fd bound, one past the ports of the ABI, one unbound since."""
    server = _server(host, dm)
    dev, other = host.open_device("/dev/xen/evtchn"), host.open_device("/dev/xen/evtchn")
    local = _bind(host, dev, server, 0)
    theirs = _bind(host, other, server, 1)
    for port in (local + 100, theirs, 5000):
        before = server.dm_notify_count[:]
        assert _errno(dev.ioctl, IOCTL_EVTCHN_NOTIFY, ioctl_evtchn_notify(port)) == errno.ENOTCONN
        assert server.dm_notify_count == before
        assert host.events[-1] == Event("evtchn", "IOCTL_EVTCHN_NOTIFY", {"arg": {"port": port}}, -errno.ENOTCONN)
    dev.ioctl(IOCTL_EVTCHN_UNBIND, ioctl_evtchn_unbind(local))
    assert _errno(dev.ioctl, IOCTL_EVTCHN_NOTIFY, ioctl_evtchn_notify(local)) == errno.ENOTCONN
    assert not _readable(server.notify_fd(0))  # no vCPU was woken by any of them
    other.close()
    dev.close()
    assert _errno(dev.ioctl, IOCTL_EVTCHN_NOTIFY, ioctl_evtchn_notify(local)) == errno.EBADF


def test_notify_by_address_and_by_struct_have_the_same_effect(host: MockXen, dm: DeviceModel) -> None:
    """The general path (the argument copied from a user address) and the struct's path notify
    the same consumer once each and wake the vCPU once each."""
    server = _server(host, dm)
    dev = host.open_device("/dev/xen/evtchn")
    local = _bind(host, dev, server, 1)
    arg = ioctl_evtchn_notify(local)
    dev.ioctl(IOCTL_EVTCHN_NOTIFY, ctypes.addressof(arg))
    assert server.dm_notify_count[1] == 1 and server.wait_dm_notify(1, 0) is True
    dev.ioctl(IOCTL_EVTCHN_NOTIFY, arg)
    assert server.dm_notify_count[1] == 2 and server.wait_dm_notify(1, 0) is True
    assert server.wait_dm_notify(1, 0) is False
    assert [e.result for e in host.events][-2:] == [0, 0]
    dev.close()


def test_notify_wake_up_follows_the_outermost_deferral(host: MockXen, dm: DeviceModel) -> None:
    """The NOTIFY writes the vCPU's wake-up after it let go of the host lock; inside an outer
    ``WakeAfterUnlock`` it is that one's to write."""
    server = _server(host, dm)
    dev = host.open_device("/dev/xen/evtchn")
    local = _bind(host, dev, server, 0)
    fd = server.notify_fd(0)
    with WakeAfterUnlock(), host.lock:
        dev.ioctl(IOCTL_EVTCHN_NOTIFY, ioctl_evtchn_notify(local))
        assert server.dm_notify_count[0] == 1 and not _readable(fd)
    assert _readable(fd)
    dev.ioctl(IOCTL_EVTCHN_NOTIFY, ioctl_evtchn_notify(local))  # no outer deferral: written on return
    assert os.eventfd_read(fd) == 2
    dev.close()


def test_deferred_wakes_nest() -> None:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        outer = defer_wakes()
        assert outer is not None
        inner = defer_wakes()
        assert inner is None  # the outer one collects
        wake(fd, None)
        write_deferred_wakes(inner)
        assert not _readable(fd)
        write_deferred_wakes(outer)
        assert os.eventfd_read(fd) == 1
        wake(fd, None)  # no deferral: at once
        assert os.eventfd_read(fd) == 1
    finally:
        os.close(fd)


def test_event_log_keeps_the_newest_in_order() -> None:
    log = EventLog(3)
    log.log("privcmd", IOCTL_PRIVCMD_HYPERCALL, {"op": 1}, -errno.EPERM)
    assert log[0] == Event("privcmd", "IOCTL_PRIVCMD_HYPERCALL", {"op": 1}, -errno.EPERM)
    for port in (4, 5, 6):
        log.notified(port, 0)
    assert len(log) == 3 and log.maxlen == 3
    assert [e.args for e in log] == [{"arg": {"port": p}} for p in (4, 5, 6)]
    log.log("evtchn", 0x4599, {"arg": 0}, -errno.ENOSYS)  # a request with no name: its number
    assert log[0].args == {"arg": {"port": 5}} and log[-1] == Event("evtchn", "0x4599", {"arg": 0}, -errno.ENOSYS)
    assert log[1:] == [log[1], log[2]]
    log.clear()
    assert len(log) == 0 and list(log) == []


# --- read and the one-port unmask --------------------------------------------------------------


def test_a_delivered_port_is_masked_until_written_back(host: MockXen, dm: DeviceModel) -> None:
    """Linux's lateeoi handling: a delivered port is not delivered again until user space writes
    it back (``evtchn_write``); an event meanwhile stays pending and is delivered at that write,
    once.  Writing a port this fd did not bind, or one not masked, delivers nothing."""
    server = _server(host, dm)
    dev = host.open_device("/dev/xen/evtchn")
    dev.nonblocking = True
    local = _bind(host, dev, server, 0)
    xen_port = server.vcpu_ports[0]
    me = local.to_bytes(4, "little")
    host.evtchn_notify_from_xen(HVM, xen_port)
    assert dev.read(64) == me
    assert not dev.readable()  # the ring is empty: the fd is not readable
    host.evtchn_notify_from_xen(HVM, xen_port)  # masked: stays pending in Xen
    host.evtchn_notify_from_xen(HVM, xen_port)
    assert not dev.readable()
    with pytest.raises(BlockingIOError):
        dev.read(4)
    assert dev.write((local + 1).to_bytes(4, "little")) == 4  # not ours: ignored
    assert not dev.readable() and dev.bound_ports == (local,)
    assert _errno(dev.ioctl, IOCTL_EVTCHN_NOTIFY, ioctl_evtchn_notify(local + 1)) == errno.ENOTCONN
    assert dev.write(me + b"\x00") == 4  # count rounded down to whole ports; ours: delivered now
    assert dev.read(64) == me  # once, for both events
    assert dev.write(me) == 4  # nothing pending: unmasked, nothing delivered
    assert not dev.readable()
    host.evtchn_notify_from_xen(HVM, xen_port)
    assert dev.read(4) == me
    dev.close()


def test_a_read_takes_what_fits_and_keeps_the_rest_readable(host: MockXen, dm: DeviceModel) -> None:
    server = _server(host, dm)
    dev = host.open_device("/dev/xen/evtchn")
    dev.nonblocking = True
    first, second = _bind(host, dev, server, 0), _bind(host, dev, server, 1)
    for vcpu in (0, 1):
        host.evtchn_notify_from_xen(HVM, server.vcpu_ports[vcpu])
    assert dev.read(7) == first.to_bytes(4, "little")  # 7 bytes: room for one port
    assert dev.readable()
    assert dev.read(4096) == second.to_bytes(4, "little")
    assert not dev.readable()
    dev.write(first.to_bytes(4, "little") + second.to_bytes(4, "little"))  # both written back at once
    for vcpu in (1, 0):
        host.evtchn_notify_from_xen(HVM, server.vcpu_ports[vcpu])
    assert dev.read(8) == second.to_bytes(4, "little") + first.to_bytes(4, "little")  # in arrival order
    assert not dev.readable()
    dev.close()


def test_an_overflowed_ring_is_efbig_before_it_is_read(host: MockXen, dm: DeviceModel) -> None:
    """``evtchn_read`` checks ``ring_overflow`` before the ring: a queued port is not handed out."""
    server = _server(host, dm)
    dev = host.open_device("/dev/xen/evtchn")
    dev.nonblocking = True
    local = _bind(host, dev, server, 0)
    host.evtchn_notify_from_xen(HVM, server.vcpu_ports[0])
    dev.ring_overflow = True
    assert _errno(dev.read, 4) == errno.EFBIG
    dev.ring_overflow = False
    assert dev.read(4) == local.to_bytes(4, "little")
    dev.close()


# --- the guest's wait --------------------------------------------------------------------------


def test_two_waiters_on_one_port_one_notify_one_wake_up(host: MockXen, dm: DeviceModel) -> None:
    """Two threads may wait for the same port at once (one takes the notify, the other is told
    it was not for it), and neither waits past its timeout."""
    server = _server(host, dm)
    server.wait_dm_notify(0, 0)  # the poller exists before the threads race for it
    got: list[bool] = []
    started = threading.Barrier(3)

    def waiter() -> None:
        started.wait()
        got.append(server.wait_dm_notify(0, 2.0))

    threads = [threading.Thread(target=waiter) for _ in range(2)]
    for t in threads:
        t.start()
    started.wait()
    server.dm_notified(0)
    for t in threads:
        t.join(5)
    assert sorted(got) == [False, True]


def test_the_wait_fds_close_with_the_server(host: MockXen, dm: DeviceModel) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    sid = dm.create_ioreq_server(HVM, BufIoreq.OFF)
    gc.collect()
    before = open_fds()
    server = host.hypervisor.domains[HVM].servers[sid]
    assert server.wait_dm_notify(0, 0) is False and server.wait_dm_notify(1, 0) is False
    assert open_fds() == before + 4  # an eventfd and its epoll per vCPU
    dm.destroy_ioreq_server(HVM, sid)
    del server
    gc.collect()
    assert open_fds() <= before


# --- the guest's post ------------------------------------------------------------------------


class Echo:
    value = 0

    def read(self, addr: int, size: int) -> int:
        return self.value

    def write(self, addr: int, size: int, value: int) -> None:
        self.value = value


def test_each_guest_access_logs_one_notify_of_the_dm_port(host: MockXen, dm: DeviceModel) -> None:
    runtime = RuntimeServer(dm, HVM, opener=host.open_device)
    echo = Echo()
    runtime.add_port_range(PORT, PORT + 3, echo)
    guest = SimGuest(host, HVM, timeout=5)
    with ServeThread(runtime):
        assert runtime.id is not None
        mock_server = host.hypervisor.domains[HVM].servers[runtime.id]
        xen_port = mock_server.vcpu_ports[1]
        dm_port = host.hypervisor.domains[HVM].ports[xen_port].remote_port
        before = len(host.events)
        for value in range(5):
            guest.outb(PORT, value, vcpu=1)
            assert guest.inb(PORT, vcpu=1) == value
        notifies = [e for e in list(host.events)[before:] if e.request == "IOCTL_EVTCHN_NOTIFY"]
        assert notifies == [Event("evtchn", "IOCTL_EVTCHN_NOTIFY", {"arg": {"port": dm_port}}, 0)] * 10
        assert mock_server.dm_notify_count[1] == 10


def test_guest_crashes_on_a_slot_the_dm_left_busy_or_a_wrong_port(host: MockXen, dm: DeviceModel) -> None:
    """``ioreq_send`` finds the slot not STATE_IOREQ_NONE, or a ``vp_eport`` that is not the
    vCPU's port: Xen crashes the domain; the guest raises ``GuestCrash`` and posts nothing."""
    runtime = RuntimeServer(dm, HVM, opener=host.open_device)
    runtime.add_port_range(PORT, PORT, Echo())
    guest = SimGuest(host, HVM, timeout=5)
    with ServeThread(runtime):
        assert runtime.id is not None
        mock_server = host.hypervisor.domains[HVM].servers[runtime.id]
        page = mock_server.page
        assert page is not None
        guest.outb(PORT, 1)
        with host.lock:
            page[STATE_BYTE] = (page[STATE_BYTE] & 0xF0) | 2  # INPROCESS, as if the DM never finished
        with pytest.raises(GuestCrash, match="bad IO state 2"):
            guest.outb(PORT, 2)
        with host.lock:
            page[STATE_BYTE] &= 0xF0
            page[24:28] = (mock_server.vcpu_ports[0] + 1).to_bytes(4, "little")
        with pytest.raises(GuestCrash, match="port"):
            guest.outb(PORT, 3)
        with host.lock:
            page[24:28] = mock_server.vcpu_ports[0].to_bytes(4, "little")
        assert guest.inb(PORT) == 1  # neither crash posted its write


def test_the_page_view_follows_the_ioreq_page(host: MockXen, dm: DeviceModel) -> None:
    """``server.page`` is made when the page is set, not per access: it must still be the
    frame ``ioreq_page`` names (before allocation, after the legacy gfn path, after destroy)."""
    server = _server(host, dm)
    assert server.ioreq_page is None and server.page is None
    dm.get_ioreq_server_info(HVM, server.id, gfns=True)  # the legacy path: the pages at guest gfns
    ref = server.ioreq_page
    assert ref is not None and server.page is not None and len(server.page) == 4096
    ref.view()[100] = 0x5A  # the frame itself, through another view
    assert server.page[100] == 0x5A
    assert host.guest_read(HVM, server.ioreq_gfn * 4096 + 100, 1) == b"\x5a"
    dm.destroy_ioreq_server(HVM, server.id)
    assert server.ioreq_page is None and server.page is None
