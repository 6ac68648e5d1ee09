"""Defects found by reviewing the NOTIFY doorbell and the mock host audit, each held by a test:
a doorbell its client made blocking cannot hang a host vCPU thread; a port's "a vCPU waits"
word does not outlive the port's binding; a client cannot flood the host's log."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import resource
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xendmop import DeviceModel
from xendmop.abi.evtchn import (
    EVTCHN_PATH,
    IOCTL_EVTCHN_BIND_INTERDOMAIN,
    IOCTL_EVTCHN_BIND_UNBOUND_PORT,
    IOCTL_EVTCHN_NOTIFY,
    IOCTL_EVTCHN_UNBIND,
    ioctl_evtchn_bind_interdomain,
    ioctl_evtchn_bind_unbound_port,
    ioctl_evtchn_notify,
    ioctl_evtchn_unbind,
)
from xendmop.abi.ioreq import IOREQ_TYPE_COPY
from xendmop.mock import MockXen
from xendmop.mock.evtchn import DOORBELL_WANTED
from xendmop.mock.remote import MockHostError, MockHostServer, Msg, RemoteXen
from xendmop.mock.remote import server as remote_module
from xendmop.mock.remote.wire import _IOCTL, _pack
from xendmop.mock.simguest import GuestTimeout, SimGuest
from xendmop.runtime.evtchn import EventChannel
from xendmop.runtime.server import IoreqServer
from xendmop.types import BufIoreq

from .remote_helpers import count_posts, wait_for
from .test_remote_doorbell import PORT, WAIT, Regs, Setup


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    try:
        yield s
    finally:
        s.close()


def _make_blocking(fd: int) -> None:
    """Clear O_NONBLOCK on ``fd``'s open file, as a client may on the doorbell it was sent."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)


def test_a_doorbell_its_client_made_blocking_and_drained_does_not_block_the_host(setup: Setup) -> None:
    # Two vCPUs woken by one write of the doorbell both answer it; so does one whose wake-up
    # the client took back by reading its own doorbell.  The second answer finds the counter
    # at 0: with O_NONBLOCK cleared by the client (the open file is shared), a read blocks.
    _make_blocking(setup.dev._bell)
    doorbell = setup.host_device().doorbell
    answering = threading.Thread(target=doorbell.answer, daemon=True)
    answering.start()
    answering.join(1.0)
    stuck = answering.is_alive()
    if stuck:
        os.eventfd_write(setup.dev._bell, 1)  # let the blocked thread go
        answering.join(WAIT)
    assert not stuck, "the host's answer of a doorbell blocked on the client's eventfd"


def test_an_access_completes_through_a_doorbell_its_client_made_blocking(setup: Setup) -> None:
    _make_blocking(setup.dev._bell)
    for value in (0x21, 0x42):
        thread, out = setup.in_thread(lambda: setup.guest.inb(PORT))
        setup.wait_posted()
        setup.answer_in_page(value)
        setup.notify()
        thread.join(WAIT)
        assert out == [value]
    assert setup.notifies() == [(setup.port, 0)] * 2


def test_a_ports_waiting_word_goes_with_its_binding(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    page = setup.server.page
    assert page is not None
    guest_port = int.from_bytes(page[24:28], "little")  # vCPU 0's vp_eport
    setup.guest.timeout = 0.5
    thread, out = setup.in_thread(lambda: setup.guest.inb(PORT))
    setup.wait_posted()  # the vCPU waits; the port's word asks for the doorbell
    setup.dev.ioctl(IOCTL_EVTCHN_UNBIND, ioctl_evtchn_unbind(port=setup.port))
    thread.join(WAIT)
    assert isinstance(out[0], GuestTimeout)
    assert not setup.words[DOORBELL_WANTED + setup.port]  # nobody waits for this fd's NOTIFY of it
    # Bound again (the lowest free dom0 port: the same number), nothing waits for it: its
    # NOTIFY is posted and applied at once, not left in the doorbell until the next request.
    again = setup.dev.ioctl(
        IOCTL_EVTCHN_BIND_INTERDOMAIN, ioctl_evtchn_bind_interdomain(remote_domain=setup.domid, remote_port=guest_port)
    )
    assert again == setup.port
    posts = count_posts(setup.remote, monkeypatch)
    setup.notify(again)
    assert posts == [Msg.IOCTL_POSTED]
    wait_for(lambda: setup.notifies()[-1:] == [(again, 0)], WAIT)


def _records(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def _disconnect(setup: Setup) -> None:
    """Drop the device model's connection as at its death, and wait until the host let it go."""
    setup.remote._sock.close()  # type: ignore[union-attr]
    wait_for(lambda: not setup.host.clients(), WAIT)
    setup.remote._sock = None


def test_failed_posted_requests_are_logged_once_then_counted_at_the_disconnect(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    bad = _pack(Msg.IOCTL_POSTED, _IOCTL.pack(999, 0, 0, 0), bytes(4))  # no device 999: EBADF
    with caplog.at_level(logging.WARNING, logger="xendmop.mock.remote"):
        for _ in range(50):
            setup.remote.post(bad)
        setup.remote.call("ping")  # every posted request was handled before it
        assert len(_records(caplog, "posted request from pid")) == 1
        _disconnect(setup)
    assert _records(caplog, "49 more posted requests from pid") != []


def test_failed_doorbell_notifies_are_logged_once_then_counted_at_the_close(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    other = setup.port + 1  # not bound by this fd: ENOTCONN each time
    with caplog.at_level(logging.WARNING, logger="xendmop.mock.evtchn"):
        for _ in range(50):
            setup.forge_entry(other)
        setup.remote.call("ping")  # the connection thread applied them before it
        assert setup.notifies() == [(other, -errno.ENOTCONN)] * 50  # each still in the event log
        assert len(_records(caplog, "doorbell NOTIFY of port")) == 1
        _disconnect(setup)
    assert _records(caplog, "49 more evtchn doorbell NOTIFYs failed") != []


@pytest.fixture
def high_fds() -> Iterator[None]:
    """Hold fds 0..1100 or so, so the next ones opened are past select's FD_SETSIZE (1024)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1300:
        pytest.skip(f"RLIMIT_NOFILE {soft}: too low to open fds past 1024")
    fillers = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(1100)]
    try:
        yield
    finally:
        for fd in fillers:
            os.close(fd)


def test_a_client_whose_socket_is_past_fd_1024_gets_its_copies_served(tmp_path: Path, high_fds: None) -> None:
    # A host with many clients and devices has fds past 1024: select.select refuses those
    # (ValueError), and each copy request of such a client's ioctl failed, out of step.
    with MockXen() as xen:
        domid = xen.create_domain(vcpus=3, hvm=True, memory_mb=4)
        with MockHostServer(xen, str(tmp_path / "xen.sock")).start() as host:
            with RemoteXen(host.path) as remote, DeviceModel.open("mock", xen=remote) as dm:
                assert remote.sock.fileno() > 1024
                assert dm.nr_vcpus(domid) == 3  # a DM_OP: its buffers are copied from this process
                assert dm.nr_vcpus(domid) == 3  # and the connection is still in step


def test_a_blocking_read_of_a_remote_evtchn_past_fd_1024_waits_for_its_port(tmp_path: Path, high_fds: None) -> None:
    with MockXen() as xen, MockHostServer(xen, str(tmp_path / "xen.sock")).start() as host:
        with RemoteXen(host.path) as remote, EventChannel(remote.open_device) as ev:
            assert ev.fileno() > 1024
            local = ev.bind_unbound_port(0)
            peer = ev.bind_interdomain(0, local)
            ev.device.nonblocking = False  # type: ignore[attr-defined]
            out: list[Any] = []

            def read() -> None:
                try:
                    out.append(ev.device.read(4))
                except BaseException as e:  # handed to the test
                    out.append(e)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            time.sleep(0.1)  # the reader waits on the empty ring
            ev.notify(peer)
            reader.join(WAIT)
            assert out == [local.to_bytes(4, "little")]


def test_an_evtchn_fd_past_1024_says_whether_it_is_readable(high_fds: None) -> None:
    with MockXen() as xen:
        dev = xen.open_device(EVTCHN_PATH)
        try:
            assert dev.fileno() > 1024
            local = dev.ioctl(IOCTL_EVTCHN_BIND_UNBOUND_PORT, ioctl_evtchn_bind_unbound_port(remote_domain=0))
            peer = dev.ioctl(
                IOCTL_EVTCHN_BIND_INTERDOMAIN, ioctl_evtchn_bind_interdomain(remote_domain=0, remote_port=local)
            )
            assert not dev.readable()
            dev.ioctl(IOCTL_EVTCHN_NOTIFY, ioctl_evtchn_notify(port=peer))
            assert dev.readable()
        finally:
            dev.close()


def test_a_copy_request_that_fails_unexpectedly_cuts_the_client_off_instead_of_going_out_of_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with MockXen() as xen:
        domid = xen.create_domain(vcpus=2, hvm=True, memory_mb=4)
        with MockHostServer(xen, str(tmp_path / "xen.sock")).start() as host:
            with RemoteXen(host.path) as remote, DeviceModel.open("mock", xen=remote) as dm:
                assert dm.nr_vcpus(domid) == 2

                def broken_wait(fd: int, timeout: float | None) -> bool:
                    raise ValueError("a bug between a copy request and its reply")

                monkeypatch.setattr(remote_module, "_readable", broken_wait)
                with pytest.raises((OSError, MockHostError)):
                    dm.nr_vcpus(domid)  # its copy request went out; the reply is never read
                monkeypatch.undo()
                # the client's reply to that request must not be taken as its next request
                wait_for(lambda: not host.clients(), WAIT)
                with pytest.raises((OSError, MockHostError)):  # refused or reset: the host let it go
                    remote.call("ping")


class _DestroyAtEnter:
    """The host lock, with ``destroy`` run just before its ``at``-th acquisition (as a destroy
    in another thread would win the lock there)."""

    def __init__(self, real: Any, at: int, destroy: Any) -> None:
        self.real, self.at, self.destroy, self.enters = real, at, destroy, 0

    def __enter__(self) -> Any:
        self.enters += 1
        if self.enters == self.at and self.destroy is not None:
            destroy, self.destroy = self.destroy, None
            destroy()
        return self.real.__enter__()

    def __exit__(self, *exc: object) -> Any:
        return self.real.__exit__(*exc)


@pytest.mark.parametrize("at", [1, 2])
def test_a_buffered_write_racing_its_servers_destroy_is_refused_or_written_whole(
    at: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    with MockXen() as xen, DeviceModel.open("mock", xen=xen) as dm:
        domid = xen.create_domain(vcpus=1, hvm=True, memory_mb=4)
        server = IoreqServer(dm, domid, opener=xen.open_device, bufioreq=BufIoreq.LEGACY)
        server.add_mmio_range(0xA0000, 0xBFFFF, Regs(), "vga")
        server.start()
        guest = SimGuest(xen, domid)
        lock = _DestroyAtEnter(xen.lock, at, server.close)
        monkeypatch.setattr(xen, "lock", lock)
        sent = guest.send_buffered(IOREQ_TYPE_COPY, 0xA0000, 2, 0x1234)  # no TypeError, no LookupError
        monkeypatch.undo()
        if lock.destroy is not None:  # the write's one lock section came first: it went in whole
            assert sent
            server.close()
        else:
            assert not sent  # the server went first: nobody takes the write
        assert xen.domain(domid).snapshot()["servers"] == (None,) * 8
