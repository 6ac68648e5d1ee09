"""Across processes, a device model's NOTIFY of a vCPU port whose vCPU waits in the mock host
is a doorbell: the port queued in a second ring of the shared memfd, then an eventfd the waiting
vCPU thread watches itself.  The vCPU thread applies the NOTIFY with the device's rules (a port
the fd bound, ``evtchn_send``, the event log entry); only such a NOTIFY completes the access.
Everywhere the doorbell cannot apply, the NOTIFY is a posted message, as before."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xendmop import DeviceModel
from xendmop.abi.evtchn import IOCTL_EVTCHN_NOTIFY, IOCTL_EVTCHN_UNBIND, ioctl_evtchn_notify, ioctl_evtchn_unbind
from xendmop.abi.ioreq import STATE_IOREQ_READY, STATE_IORESP_READY
from xendmop.abi.ioreq_slot import STATE_BYTE
from xendmop.mock import MockXen
from xendmop.mock.evtchn import (
    DOORBELL_BROKEN,
    DOORBELL_CAPACITY,
    DOORBELL_CONS,
    DOORBELL_ENTRIES,
    DOORBELL_POSTED_DONE,
    DOORBELL_PROD,
    DOORBELL_WANTED,
)
from xendmop.mock.remote import MockHostServer, Msg, RemoteEvtchn, RemoteXen
from xendmop.mock.simguest import GuestTimeout, SimGuest
from xendmop.runtime.server import IoreqServer, ServeLoop

from .remote_helpers import count_posts

PORT = 0x3F8
WAIT = 5.0


class Regs:
    """Registers that read back what was written."""

    def __init__(self) -> None:
        self.values: dict[int, int] = {}

    def read(self, off: int, size: int) -> int:
        return self.values.get(off, 0)

    def write(self, off: int, size: int, value: int) -> None:
        self.values[off] = value


class Setup:
    """The mock host here, a device model on a ``RemoteXen`` connection (driven by hand or by a
    ``ServeLoop`` thread), and a ``SimGuest`` of the host."""

    def __init__(self, tmp_path: Path) -> None:
        self.xen = MockXen()
        self.domid = self.xen.create_domain(vcpus=1, hvm=True, memory_mb=4)
        self.host = MockHostServer(self.xen, str(tmp_path / "xen.sock")).start()
        self.remote = RemoteXen(self.host.path)
        self.dm = DeviceModel.open("mock", xen=self.remote)
        self.server = IoreqServer(self.dm, self.domid, opener=self.remote.open_device)
        self.server.add_port_range(PORT, PORT + 7, Regs(), "regs")
        self.server.start()
        self.port = self.server.vcpu_ports[0]  # the dom0 end the DM notifies
        dev = self.server._evtchn.device  # type: ignore[union-attr]
        assert isinstance(dev, RemoteEvtchn)
        self.dev = dev
        self.words = dev._words
        self.guest = SimGuest(self.xen, self.domid, timeout=WAIT)

    def close(self) -> None:
        self.server.close()
        self.dm.close()
        self.remote.close()
        self.host.close()
        self.xen.close()

    def host_device(self) -> Any:
        (conn,) = self.host.clients()
        (dev,) = conn._bells
        return dev

    def in_thread(self, fn: Any) -> tuple[threading.Thread, list[Any]]:
        """Run ``fn`` in a thread (a vCPU); its result or exception lands in the list."""
        out: list[Any] = []

        def run() -> None:
            try:
                out.append(fn())
            except BaseException as e:  # handed to the test
                out.append(e)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread, out

    def slot_state(self) -> int:
        page = self.server.page
        assert page is not None
        return int(page[STATE_BYTE] & 0xF)

    def wait_posted(self) -> None:
        """Until the vCPU's ioreq is READY and the vCPU waits for the doorbell."""
        deadline = time.monotonic() + WAIT
        while self.slot_state() != STATE_IOREQ_READY or not self.words[DOORBELL_WANTED + self.port]:
            assert time.monotonic() < deadline, "the vCPU never posted its ioreq"
            time.sleep(0.001)

    def answer_in_page(self, value: int) -> None:
        """The DM's answer in the slot, with no NOTIFY."""
        page = self.server.page
        assert page is not None
        page[8:16] = value.to_bytes(8, "little")
        page[STATE_BYTE] = (page[STATE_BYTE] & 0xF0) | STATE_IORESP_READY

    def notify(self, port: int | None = None) -> None:
        self.dev.ioctl(IOCTL_EVTCHN_NOTIFY, ioctl_evtchn_notify(port=self.port if port is None else port))

    def forge_entry(self, port: int) -> None:
        """Queue ``port`` in the doorbell as a client may, skipping every check of ``RemoteEvtchn``."""
        prod = self.words[DOORBELL_PROD]
        self.words[DOORBELL_ENTRIES + prod % DOORBELL_CAPACITY] = port
        self.words[DOORBELL_PROD] = prod + 1
        self.dev._db_prod = prod + 1
        os.eventfd_write(self.dev._bell, 1)

    def notifies(self) -> list[tuple[int, int]]:
        return [(e.args["arg"]["port"], e.result) for e in self.xen.events if e.request == "IOCTL_EVTCHN_NOTIFY"]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    try:
        yield s
    finally:
        s.close()


def test_a_served_access_rings_the_doorbell_and_sends_no_notify_message(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    posts = count_posts(setup.remote, monkeypatch)
    loop = ServeLoop(setup.server)
    serving = threading.Thread(target=lambda: loop.run(handle_signals=False), daemon=True)
    serving.start()
    try:
        for value in (0x11, 0x22, 0x33):
            setup.guest.outb(PORT, value)
            assert setup.guest.inb(PORT) == value
        # read before the loop's stop tears the server (and the mapping) down
        indexes = setup.words[DOORBELL_PROD], setup.words[DOORBELL_CONS]
        wanted = setup.words[DOORBELL_WANTED + setup.port]
    finally:
        loop.stop()
        serving.join(WAIT)
    assert Msg.IOCTL_POSTED not in posts
    assert indexes == (6, 6)  # one entry per access, every one taken by the host
    assert setup.notifies()[-6:] == [(setup.port, 0)] * 6  # the same log entry as a NOTIFY
    assert not wanted  # nobody waits any more


def test_a_doorbell_rung_with_no_entry_does_not_complete_the_access(setup: Setup) -> None:
    setup.guest.timeout = 0.4
    thread, out = setup.in_thread(lambda: setup.guest.inb(PORT))
    setup.wait_posted()
    setup.answer_in_page(0x5A)  # an answer in the slot, but no NOTIFY
    for _ in range(3):
        os.eventfd_write(setup.dev._bell, 1)
        time.sleep(0.05)
    thread.join(WAIT)
    assert isinstance(out[0], GuestTimeout)
    assert setup.notifies() == []


def test_the_doorbell_completes_the_access_once_the_notify_is_queued(setup: Setup) -> None:
    thread, out = setup.in_thread(lambda: setup.guest.inb(PORT))
    setup.wait_posted()
    setup.answer_in_page(0x5A)
    setup.notify()
    thread.join(WAIT)
    assert out == [0x5A]
    assert setup.notifies() == [(setup.port, 0)]


def test_a_port_the_fd_did_not_bind_is_enotconn_logged_at_the_host_and_releases_nobody(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    other = setup.port + 1  # not bound by this fd
    with pytest.raises(OSError) as e:
        setup.notify(other)  # refused by the client itself, as evtchn_ioctl
    assert e.value.errno == errno.ENOTCONN
    setup.guest.timeout = 0.4
    thread, out = setup.in_thread(lambda: setup.guest.inb(PORT))
    setup.wait_posted()
    setup.answer_in_page(0x5A)
    with caplog.at_level(logging.WARNING, logger="xendmop.mock.evtchn"):
        setup.forge_entry(other)  # the client skips its own check
        thread.join(WAIT)
    assert isinstance(out[0], GuestTimeout)
    assert setup.notifies() == [(other, -errno.ENOTCONN)]
    assert f"NOTIFY of port {other} failed" in caplog.text


def test_a_corrupt_doorbell_is_dropped_and_notifies_go_by_message(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    setup.guest.timeout = 0.4
    thread, out = setup.in_thread(lambda: setup.guest.inb(PORT))
    setup.wait_posted()
    setup.answer_in_page(0x5A)
    with caplog.at_level(logging.WARNING, logger="xendmop.mock.evtchn"):
        setup.words[DOORBELL_ENTRIES] = setup.port
        setup.words[DOORBELL_PROD] = DOORBELL_CAPACITY + 1  # more than the ring holds
        os.eventfd_write(setup.dev._bell, 1)
        thread.join(WAIT)
    assert isinstance(out[0], GuestTimeout)  # nothing of it applied
    assert setup.notifies() == []
    page = setup.server.page
    assert page is not None
    page[STATE_BYTE] &= 0xF0  # the late answer taken: the slot is free again (STATE_IOREQ_NONE)
    assert "doorbell corrupt" in caplog.text
    assert setup.words[DOORBELL_BROKEN] == 1
    assert setup.host_device()._shared.doorbell_broken
    setup.words[DOORBELL_BROKEN] = 0  # the client cannot mend it: the host keeps its own verdict
    posts = count_posts(setup.remote, monkeypatch)
    setup.guest.timeout = WAIT
    thread, out = setup.in_thread(lambda: setup.guest.inb(PORT))
    deadline = time.monotonic() + WAIT
    while setup.slot_state() != STATE_IOREQ_READY:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert not setup.words[DOORBELL_WANTED + setup.port]  # the host no longer asks for the doorbell
    setup.answer_in_page(0x77)
    setup.notify()
    thread.join(WAIT)
    assert out == [0x77]
    assert posts == [Msg.IOCTL_POSTED]


def test_a_full_doorbell_falls_back_to_a_message_behind_the_queued_entries(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    with setup.xen.lock:  # as a waiting vCPU would ask, with nobody to drain the doorbell
        setup.host_device().want_doorbell(setup.port, True)
    posts = count_posts(setup.remote, monkeypatch)
    for _ in range(DOORBELL_CAPACITY):
        setup.notify()
    assert posts == []
    setup.notify()  # full: posted
    assert posts == [Msg.IOCTL_POSTED]
    setup.remote.call("ping")
    # the connection thread took the doorbell's entries before the message: all in order
    assert setup.notifies() == [(setup.port, 0)] * (DOORBELL_CAPACITY + 1)


def test_a_queued_notify_is_applied_before_the_clients_next_request(setup: Setup) -> None:
    with setup.xen.lock:
        setup.host_device().want_doorbell(setup.port, True)
    setup.notify()  # queued; no vCPU waits to take it
    setup.dev.ioctl(IOCTL_EVTCHN_UNBIND, ioctl_evtchn_unbind(port=setup.port))
    # the NOTIFY returned before the UNBIND was made: it found the port bound
    assert setup.notifies() == [(setup.port, 0)]


def test_a_notify_does_not_ring_the_doorbell_ahead_of_an_unhandled_posted_message(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    with setup.xen.lock:
        setup.host_device().want_doorbell(setup.port, True)
    setup.remote.call("ping")
    assert setup.words[DOORBELL_POSTED_DONE] == setup.remote.posted
    posts = count_posts(setup.remote, monkeypatch)
    setup.words[DOORBELL_POSTED_DONE] = (setup.remote.posted - 1) & 0xFFFFFFFF  # as while a posted message is in flight
    setup.notify()
    assert posts == [Msg.IOCTL_POSTED]
    setup.remote.call("ping")
    assert setup.words[DOORBELL_POSTED_DONE] == setup.remote.posted  # published again by the host
    setup.notify()
    assert posts == [Msg.IOCTL_POSTED]  # the doorbell again


def test_notifies_queued_by_a_client_that_goes_away_are_applied_before_its_ports_are_unbound(
    setup: Setup,
) -> None:
    with setup.xen.lock:
        setup.host_device().want_doorbell(setup.port, True)
    setup.notify()
    setup.remote._sock.close()  # type: ignore[union-attr]  # as at the client's death: no close request
    deadline = time.monotonic() + WAIT
    while setup.host.clients():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert setup.notifies() == [(setup.port, 0)]
    setup.remote._sock = None
