"""A device model that dies does not take its guest down: a new one takes its ioreq server
over (``IoreqServer(takeover=)``), answers what the dead one left, and the guest goes on.
In one process on the mock; ``detach()`` stands in for the death (it lets go of the server
as the kernel does when a process dies: ports unbound, pages unmapped, server left)."""

from __future__ import annotations

import errno
import threading
from typing import Any

import pytest

from xendmop import DeviceModel
from xendmop.abi.ioreq import STATE_IOREQ_INPROCESS, STATE_IOREQ_NONE, STATE_IOREQ_READY, STATE_IORESP_READY
from xendmop.abi.ioreq_slot import STATE_BYTE
from xendmop.errors import XenError
from xendmop.mock import MockXen
from xendmop.mock.simguest import SimGuest
from xendmop.runtime.dispatch import Dispatcher
from xendmop.runtime.server import IoreqServer, TakeoverError
from xendmop.testing import ServeThread

from .helpers import Recorder, page, post, slot

pytestmark = pytest.mark.xen_domain(vcpus=2, memory_mb=4)
PORT = 0x3F8


@pytest.fixture
def host(xen_host: MockXen) -> MockXen:
    return xen_host


@pytest.fixture
def domid(hvm_domain: int) -> int:
    return hvm_domain


@pytest.fixture
def dm(device_model: DeviceModel) -> DeviceModel:
    return device_model


def new(dm: DeviceModel, host: MockXen, domid: int, device: Any, **kw: Any) -> IoreqServer:
    s = IoreqServer(dm, domid, opener=host.open_device, **kw)
    s.add_port_range(PORT, PORT + 7, device, "dev")
    return s


class Guest:
    """One access on a vCPU in a thread of its own (a guest vCPU waiting in wait_for_io)."""

    def __init__(self, host: MockXen, domid: int, fn: str, *args: int, vcpu: int = 0) -> None:
        self.result: list[Any] = []
        guest = SimGuest(host, domid, timeout=10)

        def run() -> None:
            try:
                self.result.append(getattr(guest, fn)(*args, vcpu=vcpu))
            except BaseException as e:
                self.result.append(e)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def wait_posted(self, s: Any, vcpu: int = 0, timeout: float = 5.0) -> None:
        """Until the vCPU's slot holds the access (READY): the guest is waiting."""
        import time

        deadline = time.monotonic() + timeout
        while s.page[vcpu * 32 + STATE_BYTE] & 0xF == STATE_IOREQ_NONE:
            assert time.monotonic() < deadline, "the guest did not post its access"
            time.sleep(0.005)

    def join(self) -> Any:
        self.thread.join(10)
        assert not self.thread.is_alive(), "the guest vCPU is still waiting"
        (result,) = self.result
        if isinstance(result, BaseException):
            raise result
        return result


def test_detach_leaves_the_server_enabled_and_its_guest_ports_unbound_towards_dom0(
    dm: DeviceModel, host: MockXen, domid: int
) -> None:
    a = new(dm, host, domid, Recorder({0: 0x11})).start()
    sid, ports = a.id, host.hypervisor.domains[domid].server(a.id).vcpu_ports  # type: ignore[union-attr, arg-type]
    a.detach()
    assert a.id is None and not a.running
    info = host.domain(domid).server(sid)
    assert info is not None and info["enabled"] and info["ranges"][0] == ((PORT, PORT + 7),)
    d = host.hypervisor.domains[domid]
    # evtchn_close: each guest-side port back to ECS_UNBOUND, dom0 as its remote domain
    assert [(d.ports[p].state, d.ports[p].remote_domid) for p in ports] == [("unbound", 0)] * 2
    dm.destroy_ioreq_server(domid, sid)  # type: ignore[arg-type]


def test_takeover_answers_a_vcpu_left_waiting_on_a_read(dm: DeviceModel, host: MockXen, domid: int) -> None:
    a = new(dm, host, domid, Recorder({0: 0x11})).start()
    sid = a.id
    assert sid is not None
    a.detach()  # the device model dies
    shared = host.hypervisor.domains[domid].server(sid)
    guest = Guest(host, domid, "inb", PORT, vcpu=1)
    guest.wait_posted(shared, vcpu=1)
    b = new(dm, host, domid, Recorder({0: 0x22}), takeover=sid)
    b.start()  # no loop runs: the answer comes from the takeover itself
    try:
        assert guest.join() == 0x22
        assert b.resumed == [1] and b.id == sid
        assert host.domain(domid).snapshot()["servers"].count(None) == 7  # no second server
        # and it serves on, on both vCPUs
        with ServeThread(b):
            g = SimGuest(host, domid, timeout=5)
            assert g.inb(PORT, vcpu=0) == 0x22 and g.inb(PORT, vcpu=1) == 0x22
    finally:
        b.close()
    assert host.domain(domid).server(sid) is None  # a clean stop destroys the server taken over


def test_takeover_answers_a_slot_the_dead_model_had_taken_inprocess(dm: DeviceModel, host: MockXen, domid: int) -> None:
    a = new(dm, host, domid, Recorder({})).start()
    sid = a.id
    assert sid is not None
    a.detach()
    shared = host.hypervisor.domains[domid].server(sid)
    dev = Recorder({})
    guest = Guest(host, domid, "outb", PORT + 3, 0x83)
    guest.wait_posted(shared)
    off = STATE_BYTE
    shared.page[off] = (shared.page[off] & 0xF0) | STATE_IOREQ_INPROCESS  # as the dead one left it
    with new(dm, host, domid, dev, takeover=sid) as b:
        guest.join()
        assert b.resumed == [0] and dev.calls == [("w", 3, 1, 0x83)]
        assert b.dispatcher.stats["resumed-inprocess"] == 1


def test_takeover_notifies_an_answer_the_dead_model_never_notified(dm: DeviceModel, host: MockXen, domid: int) -> None:
    a = new(dm, host, domid, Recorder({0: 0x5A})).start()
    sid = a.id
    assert sid is not None
    a.detach()
    shared = host.hypervisor.domains[domid].server(sid)
    guest = Guest(host, domid, "inb", PORT)
    guest.wait_posted(shared)
    shared.page[8] = 0x5A  # answered, IORESP_READY, then killed before IOCTL_EVTCHN_NOTIFY
    shared.page[STATE_BYTE] = (shared.page[STATE_BYTE] & 0xF0) | STATE_IORESP_READY
    dev = Recorder({0: 0x99})
    with new(dm, host, domid, dev, takeover=sid) as b:
        assert guest.join() == 0x5A and dev.calls == []  # not carried out again
        assert b.resumed == [0]


def test_takeover_of_a_server_still_served_is_refused(dm: DeviceModel, host: MockXen, domid: int) -> None:
    with new(dm, host, domid, Recorder({})) as a:
        b = new(dm, host, domid, Recorder({}), takeover=a.id)
        with pytest.raises(TakeoverError) as e:
            b.start()
        assert e.value.server_id == a.id and "vCPU 0's port" in str(e.value) and "still running" in str(e.value)
        assert isinstance(e.value.__cause__, XenError) and e.value.__cause__.errno == errno.EINVAL
        # the refused takeover let go of what it opened, and left the server to the one serving it
        assert host.domain(domid).server(a.id) is not None and not b.running  # type: ignore[arg-type]
        with ServeThread(a):
            assert SimGuest(host, domid, timeout=5).inb(PORT + 1) == 0x22


def test_takeover_of_a_server_that_is_gone_raises_enoent(dm: DeviceModel, host: MockXen, domid: int) -> None:
    b = new(dm, host, domid, Recorder({}), takeover=5)
    with pytest.raises(XenError) as e:
        b.start()
    assert e.value.errno == errno.ENOENT


@pytest.mark.parametrize("bad", [True, "1", 1.0, -1, 0x10000])
def test_takeover_id_is_checked(dm: DeviceModel, domid: int, bad: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="takeover="):
        IoreqServer(dm, domid, takeover=bad)


def test_ranges_are_not_registered_again_and_a_new_range_is(dm: DeviceModel, host: MockXen, domid: int) -> None:
    a = new(dm, host, domid, Recorder({})).start()
    sid = a.id
    a.detach()
    with new(dm, host, domid, Recorder({}), takeover=sid) as b:  # EEXIST if it registered PORT again
        b.add_port_range(0x2F8, 0x2FF, Recorder({}), "com2")
        ranges = host.domain(domid).server(sid)["ranges"][0]  # type: ignore[index]
        assert ranges == ((0x2F8, 0x2FF), (PORT, PORT + 7)) or ranges == ((PORT, PORT + 7), (0x2F8, 0x2FF))


# --- the dispatcher's part ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "notify", "calls"),
    [
        (STATE_IOREQ_NONE, False, 0),
        (STATE_IOREQ_READY, True, 1),
        (STATE_IOREQ_INPROCESS, True, 1),
        (STATE_IORESP_READY, True, 0),
    ],
)
def test_resume_slot_by_state(state: int, notify: bool, calls: int) -> None:
    d = Dispatcher()
    dev = Recorder({1: 0x44})
    d.ports.add(0x10, 0x17, dev)
    pg = page()
    post(pg, 0, addr=0x11, state=state)
    assert d.resume_slot(pg, 0) is notify
    assert len(dev.calls) == calls
    after = slot(pg, 0)
    assert after.state == (STATE_IORESP_READY if state != STATE_IOREQ_NONE else STATE_IOREQ_NONE)
    if calls:
        assert after.data == 0x44


def test_a_predecessor_killed_before_registering_its_ranges_leaves_nothing_missing(
    dm: DeviceModel, host: MockXen, domid: int
) -> None:
    a = IoreqServer(dm, domid, opener=host.open_device).start()  # killed before any add_port_range
    sid = a.id
    a.detach()
    assert host.domain(domid).server(sid)["ranges"][0] == ()  # type: ignore[index]
    with new(dm, host, domid, Recorder({0: 0x77}), takeover=sid) as b, ServeThread(b):
        assert SimGuest(host, domid, timeout=5).inb(PORT) == 0x77
        assert host.domain(domid).server(sid)["ranges"][0] == ((PORT, PORT + 7),)  # type: ignore[index]
