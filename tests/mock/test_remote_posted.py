"""The mock-host requests a client posts without waiting (evtchn unmask, NOTIFY) give the
answers Linux gives, and reach the host in order before the next request."""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Iterator
from pathlib import Path

import pytest

from xendmop.abi.evtchn import IOCTL_EVTCHN_NOTIFY, IOCTL_EVTCHN_RESET
from xendmop.mock import MockXen
from xendmop.mock.remote import MockHostServer, Msg, RemoteXen
from xendmop.mock.remote.wire import _IOCTL, _pack
from xendmop.runtime.evtchn import EventChannel

from .remote_helpers import wait_for


@pytest.fixture
def path(tmp_path: Path) -> Iterator[str]:
    with MockXen() as host:
        host.create_domain(vcpus=1, hvm=True, memory_mb=4)
        server = MockHostServer(host, str(tmp_path / "xen.sock")).start()
        try:
            yield server.path
        finally:
            server.close()


def test_posted_notify_and_unmask(path: str) -> None:
    with RemoteXen(path) as xen, EventChannel(xen.open_device) as ev:
        local = ev.bind_unbound_port(0)
        peer = ev.bind_interdomain(0, local)
        with pytest.raises(OSError) as e:
            ev.notify(peer + 100)  # never bound by this fd: the kernel's answer, no host needed
        assert e.value.errno == errno.ENOTCONN
        ev.notify(peer)  # posted
        assert select.select([ev], [], [], 2)[0] == [ev]
        assert ev.pending() == local
        ev.notify(peer)  # pending again while masked: delivered at the (posted) unmask
        ev.unmask(local)
        assert select.select([ev], [], [], 2)[0] == [ev]
        assert ev.pending() == local
        ev.unmask(local)
        ev.unbind(peer)
        with pytest.raises(OSError) as e:
            ev.notify(peer)  # unbound since: ENOTCONN again
        assert e.value.errno == errno.ENOTCONN
        events = [x for x in xen.events(50) if x["request"] == "IOCTL_EVTCHN_NOTIFY"]
        assert len(events) == 2 and all(x["result"] == 0 for x in events)  # the host saw both posted ones


def test_posted_write_on_a_closed_handle_is_ebadf_here(path: str) -> None:
    with RemoteXen(path) as xen:
        dev = xen.open_device("/dev/xen/evtchn")
        dev.close()
        with pytest.raises(OSError) as e:
            dev.write(b"\x01\x00\x00\x00")
        assert e.value.errno == errno.EBADF
        assert xen.call("ping")["pid"] == os.getpid()  # the connection is still in step


def test_a_malformed_posted_notify_is_refused_and_logged(path: str, caplog: pytest.LogCaptureFixture) -> None:
    with RemoteXen(path) as xen, EventChannel(xen.open_device) as ev:
        local = ev.bind_unbound_port(0)
        peer = ev.bind_interdomain(0, local)
        handle = ev.device._handle  # type: ignore[attr-defined]
        head = _IOCTL.pack(handle, IOCTL_EVTCHN_NOTIFY, 0, 0)
        xen.post(_pack(Msg.IOCTL_POSTED, head, peer.to_bytes(2, "little")))  # a 2-byte NOTIFY argument
        xen.post(_pack(Msg.IOCTL_POSTED, _IOCTL.pack(handle, IOCTL_EVTCHN_RESET, 0, 0)))  # not postable
        assert xen.call("ping")["pid"] == os.getpid()  # handled in order, the connection still in step
        refusals = [r.getMessage() for r in caplog.records if "posted request" in r.getMessage()]
        assert len(refusals) == 1  # the first refusal is logged, the next only counted
        assert "NOTIFY argument of 2 bytes" in refusals[0]
        assert not [x for x in xen.events(50) if x["request"] == "IOCTL_EVTCHN_NOTIFY"]  # neither reached the device
        ev.notify(peer)  # a well-formed one still goes through
        assert select.select([ev], [], [], 2)[0] == [ev]
        assert ev.pending() == local
    # the count of the others, at the disconnect
    wait_for(lambda: any("1 more posted requests" in r.getMessage() for r in caplog.records), 5)
