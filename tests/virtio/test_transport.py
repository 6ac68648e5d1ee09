"""The virtio PCI transport on the mock, driven as Linux's virtio_pci_modern drives it."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from xendmop.devicemodel import DeviceModel
from xendmop.mock import MockXen
from xendmop.mock.simguest import SimGuest
from xendmop.runtime import IoreqServer, ServeLoop
from xendmop.testing import ServeThread
from xendmop.virtio import Chain, VirtioPci, Virtqueue
from xendmop.virtio.console import VirtioConsole
from xendmop.virtio.driver import VirtioPciDriver, find_virtio
from xendmop.virtio.net import VirtioNet
from xendmop.virtio.pci import MSIX_BAR, VIRTIO_BAR
from xendmop.virtio.rng import VirtioRng
from xendmop.virtio.spec import (
    COMMON_DFSELECT,
    COMMON_GF,
    COMMON_GFSELECT,
    COMMON_Q_DESCLO,
    COMMON_Q_ENABLE,
    COMMON_Q_MSIX,
    COMMON_Q_SELECT,
    COMMON_Q_SIZE,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_CAP_PCI_CFG,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    Status,
)

from .conftest import VirtioFactory


def test_config_space_is_a_modern_virtio_function(virtio: VirtioFactory) -> None:
    s = virtio(VirtioRng())
    d = s.driver
    assert d.cfg_read(0, 4) == 0x1044 << 16 | 0x1AF4  # 1AF4:1040 + type 4 (rng)
    assert d.cfg_read(0x08, 1) == 1  # revision 1: non-transitional
    assert set(d.caps) == {
        VIRTIO_PCI_CAP_COMMON_CFG,
        VIRTIO_PCI_CAP_NOTIFY_CFG,
        VIRTIO_PCI_CAP_ISR_CFG,
        VIRTIO_PCI_CAP_DEVICE_CFG,
        VIRTIO_PCI_CAP_PCI_CFG,
    }
    assert {c.bar for c in d.caps.values() if c.cfg_type != VIRTIO_PCI_CAP_PCI_CFG} == {VIRTIO_BAR}
    assert d.notify_multiplier == 4
    assert d.msix_cap and (d.cfg_read(d.msix_cap + 2, 2) & 0x7FF) + 1 == 2  # one queue + config
    assert set(d.bars) == {MSIX_BAR, VIRTIO_BAR}
    assert d.bars[VIRTIO_BAR] % 0x4000 == 0 and d.bars[MSIX_BAR] % 0x1000 == 0


def test_pci_cfg_window_reaches_the_bar_through_config_space(virtio: VirtioFactory) -> None:
    s = virtio(VirtioRng())
    d = s.driver
    cap = d.caps[VIRTIO_PCI_CAP_PCI_CFG].at

    def window(bar: int, offset: int, length: int) -> None:
        d.cfg_write(cap + 4, 1, bar)
        d.cfg_write(cap + 8, 4, offset)
        d.cfg_write(cap + 12, 4, length)

    window(VIRTIO_BAR, 0x0004, 4)  # common cfg: device_feature (select 0 after reset)
    d.reset()
    d.common_write(COMMON_DFSELECT, 4, 1)
    assert d.cfg_read(cap + 16, 4) == 1  # VIRTIO_F_VERSION_1 is bit 32
    window(VIRTIO_BAR, 0x0014, 1)  # device_status
    d.cfg_write(cap + 16, 1, Status.ACKNOWLEDGE)
    assert d.status == Status.ACKNOWLEDGE
    window(VIRTIO_BAR, 0x0014, 2)  # a length that does not match the access: config space as it is
    assert d.cfg_read(cap + 16, 1) == 0
    window(7, 0, 4)  # no such BAR
    assert d.cfg_read(cap + 16, 4) == 0


def test_rng_request_delivers_entropy_and_the_queue_vector(virtio: VirtioFactory) -> None:
    s = virtio(VirtioRng(source=lambda n: bytes(range(n))))
    features = s.driver.bring_up()
    assert features >> VIRTIO_F_VERSION_1 & 1
    assert features >> VIRTIO_F_RING_EVENT_IDX & 1 and features >> VIRTIO_F_RING_INDIRECT_DESC & 1
    q = s.driver.queues[0]
    n, data = q.request([], [32])
    assert (n, data) == (32, bytes(range(32)))
    assert s.msis_for(q.vector) == 1 and s.msis_for(0) == 0
    n, data = q.request([], [8, 8], indirect=True)
    assert (n, data) == (16, bytes(range(16)))
    assert s.msis_for(q.vector) == 2
    assert s.transport.errors == []


def test_intx_fallback_sets_the_isr_and_its_read_lowers_the_line(virtio: VirtioFactory) -> None:
    s = virtio(VirtioRng(), msix=False)
    s.driver.bring_up()
    assert not s.intx()
    s.driver.queues[0].request([], [4])
    assert s.intx()
    assert s.driver.read_isr() == 1  # queue interrupt
    assert not s.intx()
    assert s.driver.read_isr() == 0
    assert s.msis() == ()


def test_masked_vector_waits_in_the_pba_until_unmasked(virtio: VirtioFactory) -> None:
    s = virtio(VirtioRng())
    d = s.driver
    d.bring_up()
    q = d.queues[0]
    entry_ctrl = 16 * q.vector + 12
    d.bar_write(MSIX_BAR, entry_ctrl, 4, 1)  # mask the queue's vector
    q.request([], [4])
    assert s.msis_for(q.vector) == 0
    assert d.bar_read(MSIX_BAR, 0x800, 4) == 1 << q.vector  # pending
    d.bar_write(MSIX_BAR, entry_ctrl, 4, 0)
    assert s.msis_for(q.vector) == 1
    assert d.bar_read(MSIX_BAR, 0x800, 4) == 0


def test_a_xen_pirq_message_is_sent_though_its_entry_stays_masked(virtio: VirtioFactory) -> None:
    """Linux as a Xen HVM guest writes a PIRQ message into each entry (vector field 0, the
    pirq in the destination bits, delivery mode ExtINT) and never clears the mask bits
    (pci_msi_ignore_mask): the real guest's virtio_pci got no interrupt at all until this."""
    s = virtio(VirtioRng())
    d = s.driver
    d.bring_up()
    q = d.queues[0]
    pirq = 0x55  # below the domain's nr_pirqs
    addr = 0xFEE00000 | (pirq & 0xFF) << 12 | (pirq >> 8 << 8) << 32
    entry = 16 * q.vector
    d.bar_write(MSIX_BAR, entry + 12, 4, 1)  # masked, as the entry came up
    d.bar_write(MSIX_BAR, entry, 8, addr)
    d.bar_write(MSIX_BAR, entry + 8, 4, 0x700)
    ctrl = d.cfg_read(d.msix_cap + 2, 2)
    d.cfg_write(d.msix_cap + 2, 2, ctrl | 0x4000)  # and the whole function masked too
    q.request([], [4])
    assert (addr, 0x700) in s.msis()
    assert d.bar_read(MSIX_BAR, 0x800, 4) == 0  # nothing left pending
    # An entry never programmed (address 0, data 0) is no PIRQ message: its mask bit holds it.
    d.cfg_write(d.msix_cap + 2, 2, ctrl)
    d.bar_write(MSIX_BAR, entry, 8, 0)
    d.bar_write(MSIX_BAR, entry + 8, 4, 0)
    before = len(s.msis())
    q.request([], [4])
    assert len(s.msis()) == before
    assert d.bar_read(MSIX_BAR, 0x800, 4) == 1 << q.vector
    assert s.transport.errors == []


def test_a_message_xen_refuses_is_a_logged_error_not_an_exception(virtio: VirtioFactory) -> None:
    s = virtio(VirtioRng())
    d = s.driver
    d.bring_up()
    q = d.queues[0]
    d.bar_write(MSIX_BAR, 16 * q.vector, 8, 0xFEE00000 | 0x34 << 12 | 0x1200 << 32)  # pirq 0x1234: past nr_pirqs
    d.bar_write(MSIX_BAR, 16 * q.vector + 8, 4, 0x700)
    assert q.request([], [4])[0] == 4  # the request is served; the interrupt is lost
    assert s.msis() == ()
    assert any("inject-msi" in e and "EINVAL" in e for e in s.transport.errors), s.transport.errors
    assert not d.needs_reset


def test_a_vector_beyond_the_table_reads_back_no_vector(virtio: VirtioFactory) -> None:
    s = virtio(VirtioRng())
    d = s.driver
    d.negotiate(0)
    d.common_write(COMMON_Q_SELECT, 2, 0)
    d.common_write(COMMON_Q_MSIX, 2, 7)
    assert d.common_read(COMMON_Q_MSIX, 2) == VIRTIO_MSI_NO_VECTOR
    d.common_write(COMMON_Q_SELECT, 2, 3)  # no such queue: size reads 0
    assert d.common_read(COMMON_Q_SIZE, 2) == 0


def test_features_without_version_1_are_refused(virtio: VirtioFactory) -> None:
    s = virtio(VirtioRng())
    d = s.driver
    d.reset()
    d.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
    d.write_features(1 << VIRTIO_F_RING_EVENT_IDX)
    d.set_status(Status.FEATURES_OK)
    assert not d.status & Status.FEATURES_OK
    assert s.transport.negotiated == 0


def test_unoffered_features_are_refused(virtio: VirtioFactory) -> None:
    s = virtio(VirtioRng(), event_idx=False)
    d = s.driver
    d.reset()
    d.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
    d.write_features(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_RING_EVENT_IDX)
    d.set_status(Status.FEATURES_OK)
    assert not d.status & Status.FEATURES_OK
    assert any("features-refused" in e for e in s.transport.errors)


def test_features_cannot_change_after_features_ok(virtio: VirtioFactory) -> None:
    s = virtio(VirtioRng())
    d = s.driver
    accepted = d.negotiate(0)
    d.common_write(COMMON_GFSELECT, 4, 0)
    d.common_write(COMMON_GF, 4, 1 << VIRTIO_F_RING_EVENT_IDX)
    assert s.transport.negotiated == accepted == 1 << VIRTIO_F_VERSION_1


def test_driver_ok_without_features_ok_is_not_taken(virtio: VirtioFactory) -> None:
    s = virtio(VirtioRng())
    d = s.driver
    d.reset()
    d.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.DRIVER_OK)
    assert d.status == Status.ACKNOWLEDGE | Status.DRIVER


def test_reset_forgets_queues_and_features_and_the_device_comes_back(virtio: VirtioFactory) -> None:
    s = virtio(VirtioRng())
    d = s.driver
    d.bring_up()
    d.queues[0].request([], [4])
    d.reset()
    assert s.transport.negotiated == 0
    d.common_write(COMMON_Q_SELECT, 2, 0)
    assert d.common_read(COMMON_Q_ENABLE, 2) == 0
    assert d.common_read(COMMON_Q_DESCLO, 4) == 0
    d.bring_up()
    assert d.queues[0].request([], [4])[0] == 4


def test_buffers_made_available_before_driver_ok_are_served_at_driver_ok(virtio: VirtioFactory) -> None:
    s = virtio(VirtioRng())
    d = s.driver
    d.negotiate(0)
    (q,) = d.setup_queues()
    q.add([], [4])
    q.kick(force=True)
    assert q.get_used() == []  # 3.1.1: nothing before DRIVER_OK
    d.driver_ok()
    assert q.get_used() == [(0, 4)]


def test_queue_size_not_a_power_of_two_needs_reset(virtio: VirtioFactory) -> None:
    s = virtio(VirtioRng())
    d = s.driver
    d.negotiate(0)
    d.setup_msix(2)
    d.common_write(0x10, 2, 0)  # config vector 0
    d.setup_queue(0, 48, vector=1)
    assert d.common_read(COMMON_Q_ENABLE, 2) == 0  # not enabled
    assert d.needs_reset
    assert s.msis_for(0) == 1  # the configuration-change interrupt
    assert "size 48 is not a power of two" in s.transport.errors[-1]
    d.bring_up()  # a reset brings it back
    assert not d.needs_reset and d.queues[0].request([], [2])[0] == 2


def test_event_idx_suppresses_interrupts_until_used_event(virtio: VirtioFactory) -> None:
    s = virtio(VirtioRng())
    d = s.driver
    d.bring_up()
    q = d.queues[0]
    # The driver asks to hear only once the used index passes 2.
    q._w16(q.avail + 4 + 2 * q.size, 2)
    q.add([], [1])
    q.kick()
    assert s.msis_for(q.vector) == 0  # used idx 1: not yet
    q.add([], [1])
    q.kick()
    q.add([], [1])
    q.kick()
    assert s.msis_for(q.vector) == 1  # used idx 3 crossed used_event 2
    assert q._u16(q.used + 4 + 8 * q.size) == 3  # avail_event: the device asks for the next kick


def test_the_interrupt_goes_out_before_avail_event_asks_for_the_next_notification(
    virtio: VirtioFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MSI for a drained queue is sent while avail_event still holds its old value: the
    driver can keep adding without notifying until the device is done with the hypercall."""
    s = virtio(VirtioRng())
    d = s.driver
    d.bring_up()
    q = d.queues[0]
    host = s.transport.pci.host
    assert host is not None
    seen: list[tuple[int, int]] = []  # (used idx, avail_event) as each MSI is sent
    real = host.inject_msi

    def inject_msi(fn: Any, addr: int, data: int) -> None:
        seen.append((q.used_idx(), q._u16(q.used + 4 + 8 * q.size)))
        real(fn, addr, data)

    monkeypatch.setattr(host, "inject_msi", inject_msi)
    for expect in (1, 2):
        assert q.request([], [1])[0] == 1
        assert seen[-1] == (expect, expect - 1)  # the chain published, avail_event not yet past it
        assert q._u16(q.used + 4 + 8 * q.size) == expect  # then armed for the next
    assert len(seen) == 2


def test_no_interrupt_flag_without_event_idx(virtio: VirtioFactory) -> None:
    s = virtio(VirtioRng(), event_idx=False)
    d = s.driver
    d.bring_up()
    q = d.queues[0]
    q._w16(q.avail, VIRTQ_AVAIL_F_NO_INTERRUPT)
    assert q.request([], [4])[0] == 4
    assert s.msis_for(q.vector) == 0
    q._w16(q.avail, 0)
    q.request([], [4])
    assert s.msis_for(q.vector) == 1


def test_needs_reset_under_intx_sets_the_config_bit_of_the_isr(virtio: VirtioFactory) -> None:
    s = virtio(VirtioRng(), msix=False)
    s.driver.bring_up()
    q = s.driver.queues[0]
    q.add_raw({}, head=q.size)
    q.kick(force=True)
    assert s.driver.needs_reset and s.intx()
    assert s.driver.read_isr() == 2  # configuration change, no used buffer
    assert not s.intx()


@pytest.mark.parametrize(
    ("sizes", "features", "message"),
    [
        ((48,), 0, r"queue_sizes\[0\]=48: must be a power of two"),
        ((64, 0), 0, r"queue_sizes\[1\]=0"),
        ((1 << 16,), 0, r"queue_sizes\[0\]=65536"),
        ((), 0, r"queue_sizes=\(\): a device has 1..1024 queues"),
        ((64,), 1 << 64, r"features=0x10000000000000000: must fit 64 bits"),
    ],
)
def test_a_device_the_transport_cannot_offer_is_refused_naming_the_field(
    sizes: tuple[int, ...], features: int, message: str
) -> None:
    device = VirtioRng()
    device.queue_sizes = sizes
    device.features = features
    with pytest.raises(ValueError, match=message):
        VirtioPci(device, lambda: None)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda fd: VirtioRng(max_request=0), r"max_request=0: must be an integer in 1\.\.1048576"),
        (lambda fd: VirtioConsole(fd, fd, max_pending=-1), r"max_pending=-1"),
        (lambda fd: VirtioNet(fd, bytes(6), max_frames=True), r"max_frames=True"),
    ],
)
def test_device_options_out_of_range_are_refused_naming_them(make: Any, message: str) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError, match=message):
            make(w)
        assert os.get_blocking(w)  # refused before touching the fd
    finally:
        os.close(r)
        os.close(w)


def test_the_drivers_buffers_never_wrap_over_its_rings(virtio: VirtioFactory) -> None:
    s = virtio(VirtioRng())
    s.driver.arena.size = 0x8000  # small: buffers wrap many times
    s.driver.bring_up()
    q = s.driver.queues[0]
    for _ in range(40):  # random bytes written over a ring would break it: errors, NEEDS_RESET
        assert q.request([], [0x1000])[0] == 0x1000
    assert s.driver.arena.floor >= q.used + 6 + 8 * q.size
    assert not s.transport.errors and not s.driver.needs_reset


class GatedRng(VirtioRng):
    """virtio-rng whose requests wait for ``release``: what the guest can do meanwhile shows."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()
        self.release = threading.Event()

    def handle(self, vq: Virtqueue, chain: Chain) -> int:
        self.started.set()
        assert self.release.wait(10), "the test never released the device"
        return super().handle(vq, chain)


def test_an_attached_transport_answers_the_notify_first_and_serves_the_queue_after(
    xen_host: MockXen, hvm_domain: int, device_model: DeviceModel, guest: SimGuest
) -> None:
    """As QEMU's devices (virtio-net's transmit bottom half, virtio-blk's asynchronous I/O): the
    guest's notifying write completes before the device works, and the chains it adds while
    the device works need no notification (avail_event is written once the queue is drained).
    Served during the access, the first kick would not return until the device finished."""
    device = GatedRng()
    server = IoreqServer(device_model, hvm_domain, opener=xen_host.open_device)
    transport = VirtioPci(device, lambda: server.dispatcher.memory)
    server.add_pci(transport.pci, slot=5)
    thread = ServeThread(server)
    transport.attach(thread.loop)
    thread.start()
    try:
        d = VirtioPciDriver(guest, find_virtio(guest, device.device_type))
        d.bring_up()
        q = d.queues[0]
        q.add([], [8])
        assert q.kick()  # returned while the device has yet to serve it
        assert device.started.wait(5)
        q.add([], [8])
        q.add([], [8])
        assert not q.kick()  # the device is at work: avail_event still asks for the first only
        device.release.set()
        used: list[tuple[int, int]] = []
        deadline = time.monotonic() + 5
        while len(used) < 3 and time.monotonic() < deadline:
            used += q.get_used()
            time.sleep(0.005)
        assert [n for _, n in used] == [8, 8, 8] and q.kicks == 1
        assert not d.needs_reset
    finally:
        device.release.set()
        thread.stop()
        transport.close()
    assert transport.close() is None  # idempotent


def test_attach_twice_is_refused(virtio: VirtioFactory) -> None:
    s = virtio(VirtioRng())
    loop = ServeLoop()
    s.transport.attach(loop)
    try:
        with pytest.raises(RuntimeError, match="already attached"):
            s.transport.attach(loop)
    finally:
        s.transport.close()
