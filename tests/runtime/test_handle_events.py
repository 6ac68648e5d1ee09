"""IoreqServer.handle_events after the kernel's event ring overflowed: the ports were lost, so
it resets the ring and looks at every vCPU's slot, and answers what it finds READY."""

from __future__ import annotations

import errno

import pytest

from xendmop import DeviceModel
from xendmop.abi.ioreq import IOREQ_WRITE, STATE_IOREQ_NONE, STATE_IORESP_READY
from xendmop.errors import XenError
from xendmop.mock import MockXen
from xendmop.runtime.server import IoreqServer

from .helpers import Recorder, post, slot

UART = 0x3F8


def test_overflowed_ring_is_reset_and_every_ready_slot_answered() -> None:
    host = MockXen()
    domid = host.create_domain(vcpus=3, hvm=True, memory_mb=4)
    uart = Recorder({})
    with DeviceModel.open("mock", xen=host) as dm:
        server = IoreqServer(dm, domid, opener=host.open_device)
        server.add_port_range(UART, UART + 7, uart, "uart")
        server.start()
        try:
            page, evtchn = server.page, server._evtchn
            assert page is not None and evtchn is not None and server.id is not None
            xen_side = host.hypervisor.domains[domid].servers[server.id]
            for vcpu in (0, 2):  # vCPU 1 posts nothing: its slot must stay as it is
                port = xen_side.vcpu_ports[vcpu]
                post(page, vcpu, addr=UART + vcpu, data=0x41 + vcpu, dir=IOREQ_WRITE, vp_eport=port)
                host.evtchn_notify_from_xen(domid, port)
            # Fill the ring past its size with one port raised again after each unmask (as
            # Linux's ring holds a port once per raise), so the vCPUs' ports above are followed
            # by lost ones and read() fails with EFBIG.
            spare = evtchn.bind_unbound_port(0)
            to_spare = evtchn.bind_interdomain(0, spare)
            device = evtchn.device  # the mock's evtchn device, to see when the ring overflowed
            for _ in range(4096):
                evtchn.notify(to_spare)
                evtchn.unmask(spare)
                if getattr(device, "ring_overflow", False):
                    break
            else:
                pytest.fail("the mock's event ring never overflowed")
            with pytest.raises(XenError) as info:
                evtchn.pending_ports(8)
            assert info.value.errno == errno.EFBIG  # what handle_events meets next
            assert server.handle_events() >= 1
            states = [slot(page, v).state for v in (0, 1, 2)]
            assert states == [STATE_IORESP_READY, STATE_IOREQ_NONE, STATE_IORESP_READY]
            assert sorted(uart.calls) == [("w", 0, 1, 0x41), ("w", 2, 1, 0x43)]
            assert not device.ring_overflow  # reset
            post(page, 1, addr=UART + 1, data=0x55, dir=IOREQ_WRITE, vp_eport=xen_side.vcpu_ports[1])
            host.evtchn_notify_from_xen(domid, xen_side.vcpu_ports[1])
            server.handle_events()
            assert slot(page, 1).state == STATE_IORESP_READY and uart.calls[-1] == ("w", 1, 1, 0x55)
        finally:
            server.close()
