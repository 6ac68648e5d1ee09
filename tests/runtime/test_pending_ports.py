"""The ioreq hot path: every pending port in one read, per-port arguments made once without
losing the port checks, and one handle_events answering every vCPU whose event is pending."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from xendmop import DeviceModel
from xendmop.abi.ioreq import IOREQ_WRITE, STATE_IORESP_READY
from xendmop.errors import ArgumentError, ClosedHandleError
from xendmop.mock import MockXen
from xendmop.runtime.evtchn import EventChannel
from xendmop.runtime.server import IoreqServer

from .helpers import Recorder, post, slot

UART = 0x3F8


@pytest.fixture
def host() -> MockXen:
    return MockXen()


@pytest.fixture
def evtchn(host: MockXen) -> Iterator[EventChannel]:
    with EventChannel(host.open_device) as e:
        yield e


def _loop(evtchn: EventChannel) -> tuple[int, int]:
    """A dom0-to-itself channel: (the port that fires, the port that notifies it)."""
    a = evtchn.bind_unbound_port(0)
    return a, evtchn.bind_interdomain(0, a)


def test_pending_ports_takes_every_pending_port_in_one_read(evtchn: EventChannel) -> None:
    (a, to_a), (c, to_c) = _loop(evtchn), _loop(evtchn)
    assert evtchn.pending_ports(8) == []
    evtchn.notify(to_a)
    evtchn.notify(to_c)
    assert sorted(evtchn.pending_ports(8)) == sorted([a, c])
    evtchn.notify(to_a)
    assert evtchn.pending_ports(8) == []  # both masked until written back
    evtchn.unmask(a)
    evtchn.unmask(c)
    assert evtchn.pending_ports(8) == [a]  # raised while masked, delivered on unmask


def test_pending_ports_respects_its_limit(evtchn: EventChannel) -> None:
    (a, to_a), (c, to_c) = _loop(evtchn), _loop(evtchn)
    evtchn.notify(to_a)
    evtchn.notify(to_c)
    first = evtchn.pending_ports(1)
    second = evtchn.pending_ports(1)
    assert len(first) == len(second) == 1 and sorted(first + second) == sorted([a, c])


@pytest.mark.parametrize(
    "call, exc",
    [
        (lambda e, p: e.notify(0), ArgumentError),
        (lambda e, p: e.unmask(0), ArgumentError),
        (lambda e, p: e.unmask(2**32), ArgumentError),
        (lambda e, p: e.notify(True), TypeError),
        (lambda e, p: e.unmask(float(p)), TypeError),
    ],
)
def test_port_checks_survive_the_per_port_caches(
    evtchn: EventChannel, call: Callable[[EventChannel, int], Any], exc: type[Exception]
) -> None:
    a, to_a = _loop(evtchn)
    evtchn.notify(to_a)  # caches a's and to_a's arguments
    evtchn.unmask(a)
    with pytest.raises(exc):
        call(evtchn, a)


def test_cached_port_on_a_closed_handle(evtchn: EventChannel) -> None:
    a, to_a = _loop(evtchn)
    evtchn.notify(to_a)
    evtchn.unmask(a)
    evtchn.close()
    with pytest.raises(ClosedHandleError):
        evtchn.notify(to_a)
    with pytest.raises(ClosedHandleError):
        evtchn.unmask(a)


def test_one_handle_events_answers_every_pending_vcpu(host: MockXen) -> None:
    domid = host.create_domain(vcpus=2, hvm=True, memory_mb=4)
    uart = Recorder({})
    with DeviceModel.open("mock", xen=host) as dm:
        server = IoreqServer(dm, domid, opener=host.open_device)
        server.add_port_range(UART, UART + 7, uart, "uart")
        server.start()
        try:
            page = server.page
            assert page is not None and server.id is not None
            xen_side = host.hypervisor.domains[domid].servers[server.id]
            for vcpu in (0, 1):  # both vCPUs post before the device model looks
                port = xen_side.vcpu_ports[vcpu]
                post(page, vcpu, addr=UART, data=0x41 + vcpu, dir=IOREQ_WRITE, vp_eport=port)
                host.evtchn_notify_from_xen(domid, port)
            assert server.handle_events() == 2
            assert [slot(page, v).state for v in (0, 1)] == [STATE_IORESP_READY] * 2
            assert sorted(uart.calls) == [("w", 0, 1, 0x41), ("w", 0, 1, 0x42)]
            assert server.handle_events() == 0  # nothing pending: nothing handled
        finally:
            server.close()
