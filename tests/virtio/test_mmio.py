"""The virtio-mmio transport (``xendmop.virtio.mmio``) on the mock's Arm guest: the register
block Linux's ``virtio_mmio`` probes, the queues it programs, the SPI it is interrupted by
(``XEN_DMOP_set_irq_level``), and a driver that breaks the rules."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from xendmop import DeviceModel
from xendmop.mock import MockXen
from xendmop.mock.simguest import SimGuest
from xendmop.runtime import IoreqServer
from xendmop.testing import ServeThread
from xendmop.virtio import Status, VirtioDevice
from xendmop.virtio import mmio as m
from xendmop.virtio.blk import VirtioBlk
from xendmop.virtio.driver import DriverError, VirtioMmioDriver
from xendmop.virtio.mmio import VirtioMmio, slot_address
from xendmop.virtio.pci import VirtioPci
from xendmop.virtio.rng import VirtioRng
from xendmop.virtio.spec import ISR_CONFIG, ISR_QUEUE, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1

BASE, SPI = slot_address(0)


@dataclass
class Arm:
    transport: VirtioMmio
    driver: VirtioMmioDriver
    guest: SimGuest
    xen: MockXen
    domid: int

    def injections(self) -> int:
        """Level-1 calls Xen took for the device's SPI (each an edge to its vGIC)."""
        return self.xen.hypervisor.domains[self.domid].spi_injections.get(self.transport.irq, 0)

    def level(self) -> int | None:
        return self.xen.hypervisor.domains[self.domid].irq_levels.get(self.transport.irq)


MmioFactory = Callable[..., Arm]


@pytest.fixture
def arm() -> Iterator[MmioFactory]:
    """``arm(device, vuart=False, **transport_options)``: ``device`` behind ``VirtioMmio`` at
    libxl's first slot of a mock Arm guest, served in a thread; the guest's driver has probed it."""
    threads: list[ServeThread] = []
    with MockXen(arch="arm") as xen, DeviceModel.open("mock", xen=xen) as dm:

        def make(device: VirtioDevice, *, vuart: bool = False, irq: int = SPI, **options: Any) -> Arm:
            domid = xen.create_domain(memory_mb=8, vuart=vuart)
            server = IoreqServer(dm, domid, opener=xen.open_device)
            transport = VirtioMmio(device, lambda: server.dispatcher.memory, base=BASE, irq=irq, **options)
            transport.add_to(server)
            threads.append(ServeThread(server).start())
            guest = SimGuest(xen, domid, timeout=5)
            return Arm(transport, VirtioMmioDriver(guest, BASE), guest, xen, domid)

        yield make
        for t in threads:
            t.stop()


def test_the_register_block_is_a_version_2_device_of_its_type(arm: MmioFactory) -> None:
    a = arm(VirtioRng())
    d = a.driver
    assert (d.reg(m.MAGIC_VALUE), d.reg(m.VERSION), d.device_id) == (0x74726976, 2, 4)
    d.set_reg(m.QUEUE_SEL, 0)
    assert (d.reg(m.QUEUE_NUM_MAX), d.reg(m.QUEUE_READY)) == (64, 0)
    d.set_reg(m.QUEUE_SEL, 1)
    assert d.reg(m.QUEUE_NUM_MAX) == 0  # one queue: the second reads "not available"
    d.set_reg(m.SHM_SEL, 0)
    assert (d.reg(m.SHM_LEN_LOW), d.reg(m.SHM_LEN_HIGH)) == (0xFFFFFFFF, 0xFFFFFFFF)  # no shared memory
    offered = d.device_features()
    assert offered >> VIRTIO_F_VERSION_1 & 1 and offered >> VIRTIO_F_RING_EVENT_IDX & 1
    assert a.transport.errors == []


def test_a_request_is_served_and_the_spi_raised_then_lowered_by_the_ack(arm: MmioFactory) -> None:
    a = arm(VirtioRng(source=lambda n: bytes(range(n))))
    a.driver.bring_up()
    assert (a.injections(), a.level()) == (0, None)
    q = a.driver.queues[0]
    assert q.request([], [32]) == (32, bytes(range(32)))
    assert (a.injections(), a.level()) == (1, 1)
    assert a.driver.reg(m.INTERRUPT_STATUS) == ISR_QUEUE
    assert a.driver.interrupt() == ISR_QUEUE  # what vm_interrupt reads and acknowledges
    assert (a.driver.reg(m.INTERRUPT_STATUS), a.level()) == (0, 0)
    assert a.transport.errors == []


def test_every_event_is_an_edge_even_before_the_ack(arm: MmioFactory) -> None:
    """Xen's vGIC injects on each level-1 call; a used buffer while the status is still set
    must still reach the guest, whose handler may have read the status already."""
    a = arm(VirtioRng())
    a.driver.bring_up(wanted=0)  # no EVENT_IDX: an interrupt for each used buffer
    q = a.driver.queues[0]
    q.request([], [4])
    q.request([], [4])
    assert a.injections() == 2
    assert a.driver.interrupt() == ISR_QUEUE
    assert a.level() == 0


def test_reset_forgets_the_queues_and_lowers_the_line(arm: MmioFactory) -> None:
    a = arm(VirtioRng())
    a.driver.bring_up(wanted=0)
    a.driver.queues[0].request([], [4])
    assert a.level() == 1
    a.driver.reset()
    assert a.level() == 0 and a.driver.reg(m.INTERRUPT_STATUS) == 0
    a.driver.set_reg(m.QUEUE_SEL, 0)
    assert a.driver.reg(m.QUEUE_READY) == 0  # Linux's vm_setup_vq refuses a queue still ready
    a.driver.bring_up()
    assert a.driver.queues[0].request([], [8])[0] == 8


def test_queue_ready_0_disables_the_queue(arm: MmioFactory) -> None:
    a = arm(VirtioRng())
    a.driver.bring_up()
    a.driver.set_reg(m.QUEUE_SEL, 0)
    a.driver.set_reg(m.QUEUE_READY, 0)  # vm_del_vq, then WARN_ON(readl(QUEUE_READY))
    assert a.driver.reg(m.QUEUE_READY) == 0
    with pytest.raises(TimeoutError):
        a.driver.queues[0].request([], [4], timeout=0.3)


def test_a_queue_size_not_a_power_of_two_needs_reset_and_says_so(arm: MmioFactory) -> None:
    a = arm(VirtioRng())
    d = a.driver
    d.negotiate(0)
    d.set_reg(m.QUEUE_SEL, 0)
    d.set_reg(m.QUEUE_NUM, 48)
    d.set_reg(m.QUEUE_READY, 1)
    assert d.reg(m.QUEUE_READY) == 0
    assert d.status & Status.NEEDS_RESET
    assert d.reg(m.INTERRUPT_STATUS) == ISR_CONFIG and a.injections() == 1
    assert "size 48 is not a power of two" in (a.transport.needs_reset_reason or "")


def test_wrong_width_and_read_only_accesses_are_logged_and_ignored(arm: MmioFactory) -> None:
    a = arm(VirtioRng())
    g = a.guest
    assert g.mmio_read(BASE + m.MAGIC_VALUE, 2) == 0  # control registers are 32-bit only (4.2.2.2)
    g.mmio_write(BASE + m.STATUS, 1, Status.ACKNOWLEDGE)
    assert a.driver.status == 0
    g.mmio_write(BASE + m.DEVICE_ID, 4, 7)  # read-only
    assert a.driver.device_id == a.driver.reg(m.DEVICE_ID) == 4
    assert g.mmio_read(BASE + m.QUEUE_NOTIFY, 4) == 0  # write-only
    assert [e.split(":")[0] for e in a.transport.errors] == ["bad-mmio-access"] * 4
    assert not a.driver.status & Status.NEEDS_RESET  # the spec leaves these to the device: ignored


def test_the_device_configuration_is_at_0x100_in_any_width(arm: MmioFactory, tmp_path: Any) -> None:
    path = tmp_path / "disk"
    path.write_bytes(bytes(1 << 20))
    fd = os.open(path, os.O_RDWR)
    try:
        a = arm(VirtioBlk(fd))
        a.driver.bring_up()
        assert a.driver.device_id == 2
        assert a.driver.config_read(0, 4) | a.driver.config_read(4, 4) << 32 == (1 << 20) // 512  # capacity
        assert a.driver.config_read(0, 2) == (1 << 20) // 512 & 0xFFFF
        q = a.driver.queues[0]
        header = (0).to_bytes(4, "little") + bytes(4) + (0).to_bytes(8, "little")  # VIRTIO_BLK_T_IN, sector 0
        n, data = q.request([header], [512, 1])
        assert (n, data[-1]) == (513, 0)  # 512 bytes and status OK
    finally:
        os.close(fd)


def test_an_spi_xen_refuses_is_a_logged_error_not_an_exception(arm: MmioFactory) -> None:
    a = arm(VirtioRng(), vuart=True, irq=32)  # SPI 32 is the SBSA UART's: Xen says EINVAL
    a.driver.bring_up()
    assert a.driver.queues[0].request([], [4])[0] == 4
    assert any(e.startswith("set-irq-level: SPI 32 level 1") for e in a.transport.errors)
    assert a.injections() == 0


def test_the_same_device_type_serves_over_either_transport(arm: MmioFactory, virtio: Any) -> None:
    """Negotiation, queues and the device are shared: the same request, the same answer."""
    answers = []
    a = arm(VirtioRng(source=lambda n: b"\x5a" * n))
    a.driver.bring_up()
    answers.append(a.driver.queues[0].request([], [16, 16], indirect=True))
    p = virtio(VirtioRng(source=lambda n: b"\x5a" * n))
    p.driver.bring_up()
    answers.append(p.driver.queues[0].request([], [16, 16], indirect=True))
    assert answers[0] == answers[1] == (32, b"\x5a" * 32)
    assert isinstance(p.transport, VirtioPci)


def test_an_unclaimed_slot_reads_no_magic() -> None:
    """Nothing serves the block: the mock guest's reads float (all ones), and the driver stops at the magic."""
    with MockXen(arch="arm") as xen:
        domid = xen.create_domain(memory_mb=8)
        with pytest.raises(DriverError, match=r"magic 0xffffffff at 0x2000000: no virtio-mmio device"):
            VirtioMmioDriver(SimGuest(xen, domid, timeout=0.5), BASE)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"base": 0x02000100, "irq": 33}, r"base=0x2000100: must be 0x200-aligned"),
        ({"base": -0x200, "irq": 33}, r"base=-512: must be an integer"),
        ({"base": BASE, "irq": 31}, r"irq=31: must be an integer in 32\.\.1019"),
        ({"base": BASE, "irq": 1020}, r"irq=1020"),
    ],
)
def test_bad_placement_is_refused_naming_the_field(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VirtioMmio(VirtioRng(), lambda: None, **options)


def test_libxl_slots() -> None:
    assert slot_address(0) == (0x02000000, 33)
    assert slot_address(3) == (0x02000600, 36)
    assert slot_address(10) == (0x02001400, 43)  # GUEST_VIRTIO_MMIO_SPI_LAST
    with pytest.raises(ValueError, match=r"index=11: must be an integer in 0\.\.10"):
        slot_address(11)
