"""Defects found by reviewing the NOTIFY doorbell and the mock host audit, each held by a test:
a doorbell its client made blocking cannot hang a host vCPU thread; a port's "a vCPU waits"
word does not outlive the port's binding; a client cannot flood the host's log."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from xendmop.abi.evtchn import (
    IOCTL_EVTCHN_BIND_INTERDOMAIN,
    IOCTL_EVTCHN_UNBIND,
    ioctl_evtchn_bind_interdomain,
    ioctl_evtchn_unbind,
)
from xendmop.mock.evtchn import DOORBELL_WANTED
from xendmop.mock.remote import _IOCTL, Msg, _pack
from xendmop.runtime.simguest import GuestTimeout

from .remote_helpers import count_posts, wait_for
from .test_remote_doorbell import PORT, WAIT, Setup


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
