"""IoreqServer's ``deprivilege=`` option and ServeLoop's ``add_reader`` and ``call_soon``.

The deprivileging test runs in a real child process (it drops that process's root for
good); the mock host lives in the child too, and since ``no_new_privs`` refuses a
process with several threads, the guest's access is made in line: the ioreq is written
into the shared page, the port raised, and the server handles it in the same thread.
"""

from __future__ import annotations

import errno
import os
import select
import threading
from pathlib import Path

import pytest
from depriv.helpers import Child, needs_root

from xendmop import DeviceModel
from xendmop.depriv import DeprivConfigError, DropConfig
from xendmop.mock import MockXen
from xendmop.mock.simguest import SimGuest
from xendmop.runtime.server import IoreqServer, ServeLoop

from .helpers import Recorder

CHILD = r"""
import json, os, sys
from xendmop import DeviceModel
from xendmop.abi.ioreq import IOREQ_READ, IOREQ_TYPE_PIO, STATE_IOREQ_READY, STATE_IORESP_READY
from xendmop.depriv import DropConfig
from xendmop.errors import XenError
from xendmop.mock import MockXen
from xendmop.abi.ioreq_slot import IOREQ_SIZE, STATE_BYTE, Ioreq
from xendmop.runtime.server import IoreqServer

class Answer:
    def read(self, addr, size): return 0x5A
    def write(self, addr, size, value): pass

uid, gid, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
xen = MockXen()
target = xen.create_domain(vcpus=1, hvm=True, memory_mb=4)
other = xen.create_domain(vcpus=1, hvm=True, memory_mb=4)
dm = DeviceModel.open("mock", xen=xen)
server = IoreqServer(dm, target, opener=xen.open_device, deprivilege=DropConfig(uid=uid, gid=gid, chroot=root))
server.add_port_range(0x3F8, 0x3FF, Answer())
server.start()  # sets up, then restricts and drops privileges

# The guest's access, in line: ioreq into vCPU 0's slot, READY, Xen raises the port.
mock = xen.hypervisor.domains[target].servers[server.id]
req = Ioreq(addr=0x3F8, data=0, count=1, size=1, vp_eport=0, state=STATE_IOREQ_READY, data_is_ptr=False,
            dir=IOREQ_READ, df=False, type=IOREQ_TYPE_PIO)
raw = bytearray(req.to_bytes())
raw[24:28] = mock.page[24:28]  # keep Xen's vp_eport
with xen.lock:
    mock.page[:IOREQ_SIZE] = raw
xen.evtchn_notify_from_xen(target, mock.vcpu_ports[0])
server.handle_events()
answered = Ioreq.from_bytes(bytes(mock.page[:IOREQ_SIZE]))

def errno_of(fn):
    try:
        fn()
    except OSError as e:
        return e.errno
    return 0

evtchn = server._evtchn
print(json.dumps({
    "resuid": list(os.getresuid()), "resgid": list(os.getresgid()), "cwd_root": os.listdir("/"),
    "state": answered.state, "data": answered.data, "expected_state": STATE_IORESP_READY,
    "own_domain": dm.nr_vcpus(target),
    "dmop_other": errno_of(lambda: dm.nr_vcpus(other)),
    "evtchn_other": errno_of(lambda: evtchn.bind_unbound_port(other)),
    "restricted": server.depriv_report.restrict.restricted,
}), flush=True)
sys.stdin.read()
server.close()
"""


@needs_root
def test_deprivileged_server_still_serves_and_is_confined(empty_root: Path) -> None:
    uid, gid = 64123, 64123
    child = Child(CHILD, str(uid), str(gid), str(empty_root))
    try:
        got = child.ready()
        assert got["resuid"] == [uid] * 3 and got["resgid"] == [gid] * 3
        assert got["cwd_root"] == []  # chrooted into the empty directory
        assert got["state"] == got["expected_state"] and got["data"] == 0x5A
        assert got["own_domain"] == 1
        assert got["dmop_other"] == errno.EPERM
        # drivers/xen/evtchn.c evtchn_ioctl: a restricted handle binds nothing but its domain (EACCES)
        assert got["evtchn_other"] == errno.EACCES
        assert len(got["restricted"]) == 3
        rc, err = child.finish()
        assert rc == 0, err
    finally:
        child.kill()


def test_bad_drop_config_refused_before_anything_exists_in_xen() -> None:
    with MockXen() as xen:
        domid = xen.create_domain(vcpus=1, hvm=True, memory_mb=4)
        with DeviceModel.open("mock", xen=xen) as dm:
            with pytest.raises(DeprivConfigError, match="uid=0"):
                IoreqServer(dm, domid, opener=xen.open_device, deprivilege=DropConfig(uid=0, gid=0))
            assert xen.domain(domid).snapshot()["servers"] == (None,) * 8


def test_add_reader_runs_callbacks_in_the_loop_between_ioreqs() -> None:
    with MockXen() as xen:
        domid = xen.create_domain(vcpus=1, hvm=True, memory_mb=4)
        with DeviceModel.open("mock", xen=xen) as dm:
            server = IoreqServer(dm, domid, opener=xen.open_device)
            server.add_port_range(0x3F8, 0x3F8, Recorder({0: 0x11}))
            server.start()
            loop = ServeLoop(server)
            rfd, wfd = os.pipe()
            seen: list[tuple[bytes, str]] = []

            def on_readable() -> None:
                seen.append((os.read(rfd, 16), threading.current_thread().name))

            loop.add_reader(rfd, on_readable)
            with pytest.raises(ValueError, match=f"fd {rfd} is already watched"):
                loop.add_reader(rfd, on_readable)
            thread = threading.Thread(target=loop.run, kwargs={"handle_signals": False}, name="serve")
            thread.start()
            try:
                guest = SimGuest(xen, domid)
                assert guest.inb(0x3F8) == 0x11  # the loop is up and serving
                os.write(wfd, b"frame")
                for _ in range(100):
                    if seen:
                        break
                    threading.Event().wait(0.01)
                assert seen == [(b"frame", "serve")]
                assert guest.inb(0x3F8) == 0x11  # and still serving after the callback
            finally:
                loop.stop()
                thread.join(5)
                os.close(rfd)
                os.close(wfd)
            assert xen.domain(domid).snapshot()["servers"] == (None,) * 8


def test_stop_after_run_touches_no_reused_fd_and_an_unrun_loop_holds_none() -> None:
    before = set(os.listdir("/proc/self/fd"))
    unrun = ServeLoop()
    assert set(os.listdir("/proc/self/fd")) == before  # nothing to leak if never run
    unrun.stop()
    loop = ServeLoop(tick=0.01)
    thread = threading.Thread(target=loop.run, kwargs={"handle_signals": False})
    thread.start()
    loop.stop()
    thread.join(5)
    assert not thread.is_alive()
    rfd, wfd = os.pipe()  # likely gets the number the loop's eventfd had
    try:
        loop.stop()  # must not write into the pipe (or anything else now at that number)
        os.set_blocking(rfd, False)
        with pytest.raises(BlockingIOError):
            os.read(rfd, 8)
    finally:
        os.close(rfd)
        os.close(wfd)


def test_add_reader_refuses_what_epoll_cannot_watch_and_remove_reader_undoes(tmp_path: Path) -> None:
    loop = ServeLoop()
    with open(tmp_path / "regular", "wb") as f, pytest.raises(ValueError, match=f"fd {f.fileno()} cannot be watched"):
        loop.add_reader(f.fileno(), lambda: None)
    rfd, wfd = os.pipe()
    try:
        with pytest.raises(ValueError, match=f"fd {rfd} is not watched"):
            loop.remove_reader(rfd)
        loop.add_reader(rfd, lambda: None)
        loop.remove_reader(rfd)
        loop.add_reader(rfd, lambda: None)  # free again
    finally:
        os.close(rfd)
        os.close(wfd)


def test_a_callback_can_remove_its_own_reader_while_running() -> None:
    loop = ServeLoop(tick=0.01)
    rfd, wfd = os.pipe()
    calls: list[bytes] = []

    def once() -> None:
        calls.append(os.read(rfd, 16))
        loop.remove_reader(rfd)
        loop.stop()

    loop.add_reader(rfd, once)
    os.write(wfd, b"x")
    thread = threading.Thread(target=loop.run, kwargs={"handle_signals": False})
    thread.start()
    thread.join(5)
    try:
        assert not thread.is_alive() and calls == [b"x"]
    finally:
        os.close(rfd)
        os.close(wfd)


def test_call_soon_runs_after_the_rounds_events_and_again_without_waiting_a_tick() -> None:
    """What a reader schedules runs once the round's events are handled, in the loop's thread;
    what that callback schedules in turn runs in the next round, which polls without waiting:
    with a 30-second tick, a loop that waited would not finish in time."""
    loop = ServeLoop(tick=30)
    rfd, wfd = os.pipe()
    order: list[str] = []

    def on_readable() -> None:
        os.read(rfd, 16)
        order.append("reader")
        loop.call_soon(first)
        order.append("reader done")

    def first() -> None:
        order.append(f"first in {threading.current_thread().name}")
        loop.call_soon(second)

    def second() -> None:
        order.append("second")
        loop.stop()

    loop.add_reader(rfd, on_readable)
    os.write(wfd, b"x")
    thread = threading.Thread(target=loop.run, kwargs={"handle_signals": False}, name="serve")
    thread.start()
    thread.join(5)
    try:
        assert not thread.is_alive(), "the callback scheduled by a callback waited for the tick"
        assert order == ["reader", "reader done", "first in serve", "second"]
    finally:
        if thread.is_alive():
            loop.stop()
            thread.join(5)
        os.close(rfd)
        os.close(wfd)



_REAL_EPOLL = select.epoll
_TIMEOUTS: list[float | None] = []


class _RecordingEpoll:
    """``select.epoll`` that records the timeout of every ``poll`` in ``_TIMEOUTS``."""

    def __init__(self, *args: object) -> None:
        self._epoll = _REAL_EPOLL(*args)

    def poll(self, timeout: float | None = None, maxevents: int = -1) -> list[tuple[int, int]]:
        _TIMEOUTS.append(timeout)
        return self._epoll.poll(timeout, maxevents)

    def __getattr__(self, name: str) -> object:
        return getattr(self._epoll, name)


@pytest.mark.parametrize("watch", [None, 0.2])
def test_a_loop_without_a_buffered_ring_sleeps_until_an_event_or_the_watch(
    monkeypatch: pytest.MonkeyPatch, watch: float | None
) -> None:
    """The tick is for draining buffered rings only: with none, the loop wakes for an event, a
    reader, the wake-up or the next ``watch``, never ten times a second (in a PV dom0 each
    wake-up is a scheduling trip through Xen, taken from the other device models and the guest)."""
    from xendmop.runtime import server as server_module

    _TIMEOUTS.clear()
    monkeypatch.setattr(server_module.select, "epoll", _RecordingEpoll)
    loop = ServeLoop(tick=0.01, watch=watch)
    rfd, wfd = os.pipe()
    seen: list[bytes] = []
    loop.add_reader(rfd, lambda: seen.append(os.read(rfd, 16)))
    thread = threading.Thread(target=loop.run, kwargs={"handle_signals": False})
    thread.start()
    try:
        threading.Event().wait(0.3)
        os.write(wfd, b"x")  # a reader still wakes it at once
        for _ in range(500):
            if seen:
                break
            threading.Event().wait(0.01)
        assert seen == [b"x"]
    finally:
        loop.stop()
        thread.join(5)
        os.close(rfd)
        os.close(wfd)
    assert not thread.is_alive()
    timeouts = list(_TIMEOUTS)
    if watch is None:
        assert timeouts and all(t is None for t in timeouts), timeouts
        assert len(timeouts) <= 4, timeouts  # the first wait, the reader's, the stop's
    else:
        assert all(t is not None and 0 <= t <= watch for t in timeouts), timeouts
        assert len(timeouts) <= 8, timeouts  # a wait per watch (about two in 0.3 s), not per tick
