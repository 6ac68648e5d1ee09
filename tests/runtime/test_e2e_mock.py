"""End to end on the mock Xen, in one process: a device model served by IoreqServer answers a
simulated guest whose vCPUs write ioreqs into the real shared page and wait on event channels."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import threading
import time
from typing import Any

import pytest

from xendmop import DeviceModel
from xendmop.abi.ioreq import IOREQ_TYPE_COPY, IOREQ_TYPE_PIO, STATE_IORESP_READY
from xendmop.abi.ioreq_slot import STATE_BYTE
from xendmop.abi.privcmd import IOCTL_PRIVCMD_MMAP_RESOURCE
from xendmop.mock import MockXen
from xendmop.mock.simguest import GuestTimeout, SimGuest
from xendmop.runtime.pci import Bar, PciFunction
from xendmop.runtime.server import IoreqServer, ServeLoop
from xendmop.testing import ServeThread
from xendmop.types import BufIoreq, IoRangeType

from .helpers import Exploding, Recorder

UART = 0x3F8


# The plugin's fixtures (xendmop.testing): xen_host, hvm_domain, device_model; ServeThread serves.
pytestmark = pytest.mark.xen_domain(vcpus=2, memory_mb=4)


@pytest.fixture
def host(xen_host: MockXen) -> MockXen:
    return xen_host


@pytest.fixture
def domid(hvm_domain: int) -> int:
    return hvm_domain


@pytest.fixture
def dm(device_model: DeviceModel) -> DeviceModel:
    return device_model


def server(dm: DeviceModel, host: MockXen, domid: int, **kw: Any) -> IoreqServer:
    return IoreqServer(dm, domid, opener=host.open_device, **kw)


def test_port_io_round_trip_on_both_vcpus(dm: DeviceModel, host: MockXen, domid: int) -> None:
    uart = Recorder({5: 0x60})
    s = server(dm, host, domid)
    s.add_port_range(UART, UART + 7, uart, "uart")
    guest = SimGuest(host, domid, timeout=5)
    with ServeThread(s):
        guest.outb(UART, 0x41)
        assert guest.inb(UART + 5, vcpu=1) == 0x60
        assert guest.inl(UART + 4) == 0x55  # the Recorder default for offset 4
    assert uart.calls[:2] == [("w", 0, 1, 0x41), ("r", 5, 1, None)]
    assert host.domain(domid).snapshot()["servers"] == (None,) * 8  # torn down when the loop ended


def test_mmio_and_unclaimed(dm: DeviceModel, host: MockXen, domid: int) -> None:
    dev = Recorder()
    s = server(dm, host, domid)
    s.add_mmio_range(0xFEB00000, 0xFEB00FFF, dev)
    guest = SimGuest(host, domid)
    with ServeThread(s):
        guest.mmio_write(0xFEB00010, 8, 0x1122334455667788)
        assert guest.mmio_read(0xFEB00010, 8) == 0x1122334455667788
        assert guest.mmio_read(0xFEB01000, 4) == 0xFFFFFFFF  # no server claims it
        assert guest.mmio_read(0xFEB00FFE, 4) == 0xFFFFFFFF  # straddles the range end: not routed


def test_rep_outsb_with_df_reads_guest_ram(dm: DeviceModel, host: MockXen, domid: int) -> None:
    dev = Recorder()
    s = server(dm, host, domid)
    s.add_port_range(UART, UART, dev)
    guest = SimGuest(host, domid)
    guest.write_ram(0x5000, b"hello")
    with ServeThread(s):
        guest.rep_outsb(UART, 0x5004, 5, df=True)
        guest.rep_outsb(UART, 0x5000, 5)
        guest.rep_insb(UART, 0x6000, 3)
    assert bytes(c[3] for c in dev.calls[:10] if c[3] is not None) == b"ollehhello"
    assert guest.read_ram(0x6000, 3) == bytes([ord("o")] * 3)  # the last value written reads back


def test_pci_config_bars_and_interrupts(dm: DeviceModel, host: MockXen, domid: int) -> None:
    regs = Recorder()
    fn = PciFunction(0x1AF4, 0x1000, 0x020000, bars=[Bar(0x1000, regs)], msi=True)
    s = server(dm, host, domid)
    guest = SimGuest(host, domid)
    sbdf = s.add_pci(fn, slot=3)
    with ServeThread(s):
        assert guest.pci_config_read(sbdf, 0, 4) == 0x10001AF4
        assert guest.pci_config_read(sbdf + 1, 0, 4) == 0xFFFFFFFF  # function 1: nobody
        guest.pci_config_write(sbdf, 0x10, 4, 0xFFFFFFFF)  # size the BAR
        assert guest.pci_config_read(sbdf, 0x10, 4) == 0xFFFFF000
        guest.pci_config_write(sbdf, 0x10, 4, 0xE0000000)
        guest.pci_config_write(sbdf, 0x04, 2, 0x0002)  # memory decode on: the BAR is mapped
        assert s.id is not None
        mem = host.domain(domid).snapshot()["servers"][s.id]["ranges"][IoRangeType.MEMORY]
        assert mem == ((0xE0000000, 0xE0000FFF),)
        guest.mmio_write(0xE0000020, 4, 7)
        assert regs.calls[-1] == ("w", 0x20, 4, 7)
        guest.pci_config_write(sbdf, 0x10, 4, 0xE0010000)  # moved while decoding
        mem = host.domain(domid).snapshot()["servers"][s.id]["ranges"][IoRangeType.MEMORY]
        assert mem == ((0xE0010000, 0xE0010FFF),)
        assert guest.mmio_read(0xE0000020, 4) == 0xFFFFFFFF
        fn.set_irq(True)
        assert host.domain(domid).snapshot()["irq"][1] != 0  # INTx asserted through set_pci_intx_level
        fn.set_irq(False)
        guest.pci_config_write(sbdf, 0x44, 4, 0xFEE00000)
        guest.pci_config_write(sbdf, 0x4C, 2, 0x31)
        guest.pci_config_write(sbdf, 0x42, 2, 1)
        assert fn.notify_msi()
        assert host.domain(domid).msis[-1] == (0xFEE00000, 0x31)


def test_buffered_writes_past_wraparound(dm: DeviceModel, host: MockXen, domid: int) -> None:
    vga = Recorder()
    s = server(dm, host, domid, bufioreq=BufIoreq.LEGACY)
    s.add_mmio_range(0xA0000, 0xBFFFF, vga)
    guest = SimGuest(host, domid)
    sent = 0
    with ServeThread(s):
        while sent < 1200:
            if guest.send_buffered(IOREQ_TYPE_COPY, 0xA0000 + (sent & 0xFF), 8 if sent % 5 == 0 else 2, sent):
                sent += 1
        guest.mmio_read(0xA0000, 1)  # a synchronous access drains the ring first (as QEMU)
    assert [c[3] for c in vga.calls if c[0] == "w"] == list(range(1200))


def test_two_servers_overlapping_ranges_newest_wins(dm: DeviceModel, host: MockXen, domid: int) -> None:
    old, new = Recorder({0: 1}), Recorder({0: 2})
    a, b = server(dm, host, domid), server(dm, host, domid)
    a.add_port_range(0x60, 0x6F, old)
    b.add_port_range(0x60, 0x63, new)
    guest = SimGuest(host, domid)
    with ServeThread(a, b):
        assert guest.inb(0x60) == 2
        assert guest.inb(0x64) == 0x55  # only the older server covers 0x64
    assert host.domain(domid).snapshot()["servers"] == (None,) * 8


def test_device_that_raises(dm: DeviceModel, host: MockXen, domid: int) -> None:
    s = server(dm, host, domid)
    s.add_port_range(0x70, 0x71, Exploding())
    s.add_port_range(UART, UART, Recorder({0: 9}))
    guest = SimGuest(host, domid)
    with ServeThread(s):
        assert guest.inb(0x71) == 0xFF
        guest.outb(0x70, 1)
        assert guest.inb(UART) == 9
    assert s.dispatcher.stats["device-error"] == 2


def test_unanswered_access_times_out_naming_vcpu(dm: DeviceModel, host: MockXen, domid: int) -> None:
    s = server(dm, host, domid)
    s.add_port_range(UART, UART, Recorder())
    with s:  # up, but nobody serves
        with pytest.raises(GuestTimeout, match=r"vCPU1: no answer in 0.2s to \[pio read addr=0x3f8"):
            SimGuest(host, domid, timeout=0.2).inb(UART, vcpu=1)


def test_exception_in_with_block_destroys_server(dm: DeviceModel, host: MockXen, domid: int) -> None:
    with pytest.raises(RuntimeError, match="boom"), server(dm, host, domid) as s:
        assert s.id is not None and host.domain(domid).server(s.id) is not None
        raise RuntimeError("boom")
    assert host.domain(domid).snapshot()["servers"] == (None,) * 8
    assert not any(p for p in host.dom0.ports)  # every local port unbound


def test_restricted_handles(dm: DeviceModel, host: MockXen, domid: int) -> None:
    s = server(dm, host, domid, restrict=True)
    s.add_port_range(UART, UART, Recorder({0: 3}))
    with ServeThread(s):
        assert s._evtchn is not None and s._evtchn.restricted_to == domid
        assert SimGuest(host, domid).inb(UART) == 3


class NoResource:
    """The mock's privcmd as on a kernel without IOCTL_PRIVCMD_MMAP_RESOURCE."""

    def __init__(self, host: MockXen) -> None:
        self.host = host

    def __call__(self, path: str) -> Any:
        dev = self.host.open_device(path)
        real = dev.ioctl

        def ioctl(request: int, arg: Any = 0) -> int:
            if request == IOCTL_PRIVCMD_MMAP_RESOURCE:
                raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
            return int(real(request, arg))

        dev.ioctl = ioctl
        return dev


def test_legacy_gfn_fallback(dm: DeviceModel, host: MockXen, domid: int) -> None:
    s = IoreqServer(dm, domid, opener=NoResource(host), bufioreq=BufIoreq.LEGACY)
    s.add_port_range(UART, UART, Recorder({0: 4}))
    guest = SimGuest(host, domid)
    with ServeThread(s):
        assert s.legacy_gfns
        assert guest.inb(UART) == 4
    assert host.domain(domid).snapshot()["servers"] == (None,) * 8


def test_resource_error_other_than_unsupported_is_not_masked(dm: DeviceModel, host: MockXen, domid: int) -> None:
    class Eperm(NoResource):
        def __call__(self, path: str) -> Any:
            dev = self.host.open_device(path)
            real = dev.ioctl

            def ioctl(request: int, arg: Any = 0) -> int:
                if request == IOCTL_PRIVCMD_MMAP_RESOURCE:
                    raise OSError(errno.EPERM, os.strerror(errno.EPERM))
                return int(real(request, arg))

            dev.ioctl = ioctl
            return dev

    with pytest.raises(PermissionError):
        IoreqServer(dm, domid, opener=Eperm(host)).start()
    assert host.domain(domid).snapshot()["servers"] == (None,) * 8  # no fallback, nothing leaked


def test_asyncio_serving(dm: DeviceModel, host: MockXen, domid: int) -> None:
    s = server(dm, host, domid)
    s.add_port_range(UART, UART, Recorder({0: 0x77}))
    guest = SimGuest(host, domid)

    async def main() -> int:
        async with s:
            return await asyncio.get_running_loop().run_in_executor(None, guest.inb, UART)

    assert asyncio.run(main()) == 0x77
    assert host.domain(domid).snapshot()["servers"] == (None,) * 8


def test_sigterm_during_an_access(dm: DeviceModel, host: MockXen, domid: int) -> None:
    """SIGTERM arrives while the device is handling an access: the handler only flags the
    loop, so the access completes (IORESP_READY, the vCPU gets its value), then the server
    is torn down.  A vCPU that posts after that finds no server and reads all-ones, as in
    Xen where ioreq_server_select no longer finds it.  (A vCPU still waiting when the
    server goes: see the next test.)"""

    class KillsUs:
        def read(self, addr: int, size: int) -> int:
            os.kill(os.getpid(), signal.SIGTERM)
            return 0x5A

        def write(self, addr: int, size: int, value: int) -> None:
            pass

    s = server(dm, host, domid)
    s.add_port_range(UART, UART, KillsUs())
    guest = SimGuest(host, domid)
    got: list[int] = []
    loop = ServeLoop(s.start())
    t = threading.Thread(target=lambda: got.append(guest.inb(UART)))
    t.start()
    assert loop.run(handle_signals=True) == signal.SIGTERM  # the main thread serves
    t.join(5)
    assert got == [0x5A]
    assert host.domain(domid).snapshot()["servers"] == (None,) * 8
    assert guest.inb(UART) == 0xFF


def test_server_destroyed_while_a_vcpu_waits_completes_its_read_with_all_ones(
    dm: DeviceModel, host: MockXen, domid: int
) -> None:
    """The DM is stopped (SIGTERM before it handled a posted access): teardown destroys the
    server.  In xen/common/ioreq.c the destroy removes the server's ioreq_vcpus, so
    vcpu_ioreq_handle_completion's get_pending_vcpu no longer finds the vCPU pending and
    wait_for_io's "emulator is dying" path completes the read with ~0: the vCPU resumes
    with all-ones, never stuck on a server that no longer exists."""
    s = server(dm, host, domid)
    s.add_port_range(UART, UART, Recorder({0: 0x33}))
    s.start()  # serving nothing: the access stays posted and unanswered
    guest = SimGuest(host, domid, timeout=10)
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(guest.inb(UART, vcpu=1)))
    t.start()
    assert s.id is not None
    mock_server = host.hypervisor.domains[domid].servers[s.id]
    deadline = time.monotonic() + 5
    while mock_server.page[32 + STATE_BYTE] & 0xF != 1:  # vCPU 1's slot READY: the access is posted
        assert time.monotonic() < deadline, "the guest never posted"
        time.sleep(0.01)
    s.close()  # what ServeLoop does on SIGTERM
    t.join(5)
    assert not t.is_alive() and got == [0xFF]
    assert host.domain(domid).snapshot()["servers"] == (None,) * 8


def test_hostile_slot_through_shared_page_then_honest_access(dm: DeviceModel, host: MockXen, domid: int) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    s = server(dm, host, domid)
    s.add_port_range(UART, UART, Recorder({0: 0x33}))
    s.add_mmio_range(0xFEB00000, 0xFEB00FFF, Recorder())
    guest = SimGuest(host, domid)

    with ServeThread(s):
        assert s.id is not None
        mock_server = host.hypervisor.domains[domid].servers[s.id]
        page = mock_server.page
        assert page is not None
        port = mock_server.vcpu_ports[1]

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        @given(raw=st.binary(min_size=32, max_size=32), type_=st.sampled_from([IOREQ_TYPE_PIO, IOREQ_TYPE_COPY, 2, 9]))
        def hostile(raw: bytes, type_: int) -> None:
            body = bytearray(raw)
            body[24:28] = port.to_bytes(4, "little")
            body[STATE_BYTE] = (body[STATE_BYTE] & 0xF0) | 1  # READY
            body[31] = type_
            with host.lock:
                page[32:64] = body
            host.evtchn_notify_from_xen(domid, port)
            # A notify left over from the previous honest access may wake us early:
            # wait for the answer itself, as Xen's wait_for_io re-checks the state.
            deadline = time.monotonic() + 5
            while True:
                mock_server.wait_dm_notify(1, 0.05)
                with host.lock:
                    if page[32 + STATE_BYTE] & 0xF == STATE_IORESP_READY:
                        page[32 + STATE_BYTE] &= 0xF0  # Xen takes the answer: back to NONE
                        break
                assert time.monotonic() < deadline, "the device model never answered"
            assert guest.inb(UART, vcpu=1) == 0x33

        hostile()


def test_buffered_atomic_mode_with_xens_pointer_canonicalisation(dm: DeviceModel, host: MockXen, domid: int) -> None:
    try:
        s = server(dm, host, domid, bufioreq=BufIoreq.ATOMIC)
    except OSError as e:
        pytest.skip(f"no atomic add here: {e}")
    vga = Recorder()
    s.add_mmio_range(0xA0000, 0xBFFFF, vga)
    guest = SimGuest(host, domid)
    sent = 0
    with ServeThread(s):
        while sent < 1500:
            if guest.send_buffered(IOREQ_TYPE_COPY, 0xA0000, 4 if sent % 7 else 8, sent):
                sent += 1
        guest.mmio_read(0xA0000, 1)
        rd, wr = s.bufpage[:8].cast("I") if s.bufpage is not None else (0, 0)
        assert rd == wr < 2 * 511  # Xen kept the pointers small and no update was lost
    assert [c[3] for c in vga.calls if c[0] == "w"] == list(range(1500))
