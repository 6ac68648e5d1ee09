"""A remote evtchn fd's pending ports come from a ring the mock host shares with the client
(Linux ``drivers/xen/evtchn.c``: ``evtchn_interrupt`` produces, ``evtchn_read`` consumes):
read with no request to the host, the eventfd readable while ports are queued, overflow,
reset, resize and unbind (which leaves queued entries, as Linux), and a client that writes
over its ring hurting only itself."""

from __future__ import annotations

import errno
import os
import select
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xendmop.abi.evtchn import IOCTL_EVTCHN_RESET
from xendmop.errors import XenError
from xendmop.mock import MockXen
from xendmop.mock.evtchn import (
    PORT_FIRED,
    PORT_MASKED,
    RING_CONS,
    RING_ENTRIES,
    RING_MASKS,
    RING_OVERFLOW,
    RING_PROD,
    RING_SIZE,
    MockEvtchnDevice,
    SharedPortRing,
)
from xendmop.mock.remote import MockHostServer, Msg, RemoteEvtchn, RemoteXen
from xendmop.runtime.evtchn import EventChannel

from .remote_helpers import count_posts

WAIT = 2.0


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tuple[MockXen, str]]:
    with MockXen() as xen:
        xen.create_domain(vcpus=1, hvm=True, memory_mb=4)
        server = MockHostServer(xen, str(tmp_path / "xen.sock")).start()
        try:
            yield xen, server.path
        finally:
            server.close()


@pytest.fixture
def remote(host: tuple[MockXen, str]) -> Iterator[RemoteXen]:
    with RemoteXen(host[1]) as xen:
        yield xen


def loopback(ev: EventChannel) -> tuple[int, int]:
    """A dom0 port bound to another dom0 port of the same fd: ``(local, peer)``; notifying
    ``peer`` makes ``local`` pending."""
    local = ev.bind_unbound_port(0)
    return local, ev.bind_interdomain(0, local)


def device(ev: EventChannel) -> RemoteEvtchn:
    dev = ev.device
    assert isinstance(dev, RemoteEvtchn)
    return dev


def readable(ev: EventChannel, timeout: float = 0.0) -> bool:
    return bool(select.select([ev], [], [], timeout)[0])


def sync(xen: RemoteXen) -> None:
    """Posted unmasks and NOTIFYs are handled before the connection's next request."""
    xen.call("ping")


def count_transacts(xen: RemoteXen, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    sent: list[bytes] = []
    real = xen.transact

    def counting(request: bytes) -> Any:
        sent.append(request)
        return real(request)

    monkeypatch.setattr(xen, "transact", counting)
    return sent


def test_read_takes_ports_from_the_shared_ring_without_a_request(
    remote: RemoteXen, monkeypatch: pytest.MonkeyPatch
) -> None:
    with EventChannel(remote.open_device) as ev:
        a_local, a_peer = loopback(ev)
        b_local, b_peer = loopback(ev)
        ev.notify(a_peer)
        ev.notify(b_peer)
        assert readable(ev, WAIT)
        sync(remote)
        sent = count_transacts(remote, monkeypatch)
        assert ev.pending_ports(8) == [a_local, b_local]
        assert not readable(ev)  # drained with the ring: level semantics
        assert ev.pending_ports(8) == []  # EAGAIN, still no request
        assert sent == []


def test_a_partial_read_leaves_the_eventfd_readable_for_the_rest(remote: RemoteXen) -> None:
    with EventChannel(remote.open_device) as ev:
        pairs = [loopback(ev) for _ in range(3)]
        for _, peer in pairs:
            ev.notify(peer)
        sync(remote)
        assert ev.pending() == pairs[0][0]
        assert readable(ev)
        assert ev.pending_ports(1) == [pairs[1][0]]
        assert readable(ev)
        assert ev.pending_ports(5) == [pairs[2][0]]
        assert not readable(ev)


def test_entries_that_wrap_round_the_ring_end_come_out_in_order(remote: RemoteXen) -> None:
    with EventChannel(remote.open_device) as ev:
        (a_local, a_peer), (b_local, b_peer) = loopback(ev), loopback(ev)
        words = device(ev)._words
        size = words[RING_SIZE]
        for _ in range(size - 1):  # one entry at a time: ring_cons ends one short of the ring's end
            ev.notify(a_peer)
            sync(remote)
            assert ev.pending() == a_local
            ev.unmask(a_local)
        ev.notify(a_peer)
        ev.notify(b_peer)
        sync(remote)
        assert words[RING_PROD] == size + 1  # free-running: the second entry is slot 0 again
        assert device(ev).read(4096) == a_local.to_bytes(4, "little") + b_local.to_bytes(4, "little")


def test_a_blocking_read_sleeps_until_a_port_is_queued(remote: RemoteXen) -> None:
    with EventChannel(remote.open_device) as ev:
        local, peer = loopback(ev)
        dev = device(ev)
        dev.nonblocking = False
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(dev.read(4096)))
        reader.start()
        reader.join(0.2)
        assert reader.is_alive() and not got  # nothing queued: it waits on the eventfd
        ev.notify(peer)
        reader.join(WAIT)
        assert not reader.is_alive() and got == [local.to_bytes(4, "little")]


def test_overflow_gives_efbig_until_reset(remote: RemoteXen) -> None:
    """``evtchn_interrupt`` loses a port arriving at a full ring and sets ``ring_overflow``;
    ``evtchn_read`` then fails with EFBIG, the fd stays readable, until IOCTL_EVTCHN_RESET."""
    with EventChannel(remote.open_device) as ev:
        local, peer = loopback(ev)
        words = device(ev)._words
        size = words[RING_SIZE]
        for _ in range(size):  # unmasked before it was read: the same port queued again
            ev.notify(peer)
            ev.unmask(local)
        sync(remote)
        assert words[RING_OVERFLOW] == 0 and (words[RING_PROD] - words[RING_CONS]) == size
        ev.notify(peer)  # no room: lost
        sync(remote)
        assert words[RING_OVERFLOW] == 1
        for _ in range(2):
            with pytest.raises(XenError) as e:
                ev.pending_ports(8)
            assert e.value.errno == errno.EFBIG
            assert readable(ev)  # still readable, so a select loop comes back to see the error
        assert device(ev).read(3) == b""  # under 4 bytes: returns before the overflow check
        ev.reset()
        assert words[RING_OVERFLOW] == 0 and words[RING_PROD] == words[RING_CONS] == 0
        assert ev.pending_ports(8) == []
        assert not readable(ev)  # the read after the reset drained it
        ev.unmask(local)  # the lost event left it masked: unmask, then a new one is delivered
        ev.notify(peer)
        sync(remote)
        assert ev.pending_ports(8) == [local]


def test_unbind_leaves_the_ports_queued_entries_as_linux_does(remote: RemoteXen) -> None:
    """``evtchn_unbind_from_user`` (drivers/xen/evtchn.c) does not touch the ring: a port
    queued before its unbind is still read after it, and unmasking it is ignored."""
    with EventChannel(remote.open_device) as ev:
        (a_local, a_peer), (b_local, b_peer) = loopback(ev), loopback(ev)
        ev.notify(a_peer)
        ev.notify(b_peer)
        ev.unmask(a_local)
        ev.notify(a_peer)  # a_local queued twice, b_local between
        sync(remote)
        assert device(ev)._words[RING_PROD] - device(ev)._words[RING_CONS] == 3
        ev.unbind(a_local)
        assert ev.pending_ports(8) == [a_local, b_local, a_local]
        ev.device.write(a_local.to_bytes(4, "little"))  # evtchn_write: not this fd's port, ignored
        assert not readable(ev)


def test_a_bind_that_grows_the_ring_keeps_the_queued_ports(remote: RemoteXen) -> None:
    """``evtchn_resize_ring``: 64 entries for up to 64 bound ports, then 128; queued ports
    are carried over to the larger ring."""
    with EventChannel(remote.open_device) as ev:
        local, peer = loopback(ev)
        words = device(ev)._words
        ev.notify(peer)
        sync(remote)
        assert words[RING_SIZE] == 64
        for _ in range(31):
            loopback(ev)
        assert words[RING_SIZE] == 64  # 64 bound
        ev.bind_unbound_port(0)
        assert words[RING_SIZE] == 128
        assert ev.pending_ports(8) == [local]


def test_a_client_that_corrupts_its_ring_only_hurts_itself(host: tuple[MockXen, str], remote: RemoteXen) -> None:
    xen, path = host
    with EventChannel(remote.open_device) as ev, RemoteXen(path) as other, EventChannel(other.open_device) as good:
        local, peer = loopback(ev)
        good_local, good_peer = loopback(good)
        words = device(ev)._words
        words[RING_CONS] = 0xDEAD0000  # ring_cons far outside prod - size .. prod
        words[RING_ENTRIES] = 0xFFFFFFFF
        ev.notify(peer)  # the host reads ring_cons back, bounds it, and loses the port
        sync(remote)
        evdev = next(d for d in xen._devices if isinstance(d, MockEvtchnDevice) and local in d.bound_ports)
        assert evdev.ring_overflow
        with pytest.raises(XenError) as e:
            ev.pending_ports(8)
        assert e.value.errno == errno.EFBIG
        # the host and another client go on
        good.notify(good_peer)
        assert readable(good, WAIT)
        assert good.pending_ports(8) == [good_local]
        # RESET rewrites every index from the host's own state: the ring works again
        ev.reset()
        ev.unmask(local)
        ev.notify(peer)
        sync(remote)
        assert ev.pending_ports(8) == [local]
        # a garbage ring_size is caught by the reader, named, and left for RESET
        words[RING_SIZE] = 3
        ev.notify(peer)
        ev.unmask(local)
        sync(remote)
        with pytest.raises(OSError) as raw:
            device(ev).read(4)
        assert raw.value.errno == errno.EFBIG and "size=3" in str(raw.value)
        ev.reset()
        assert words[RING_SIZE] == 64


def test_the_ring_memfd_is_sealed_and_the_host_does_not_read_it(tmp_path: Path) -> None:
    with MockXen() as xen:
        dev = xen.open_device("/dev/xen/evtchn")
        assert isinstance(dev, MockEvtchnDevice)
        fd = dev.share_ring()
        with pytest.raises(OSError) as e:
            os.ftruncate(fd, 0)  # would make the host's own mapping fault (SIGBUS)
        assert e.value.errno == errno.EPERM
        with pytest.raises(OSError) as e:
            dev.share_ring()
        assert e.value.errno == errno.EBUSY
        dev.nonblocking = True
        with pytest.raises(OSError) as e:
            dev.read(4)  # its client reads the ring; the host never consumes from it
        assert e.value.errno == errno.EINVAL
        assert dev.ioctl(IOCTL_EVTCHN_RESET, 0) == 0
        dev.close()
        with pytest.raises(OSError):
            os.fstat(fd)  # the memfd went with the device


# --- unmasks through the shared mask words -----------------------------------------------------


def from_domain(xen: MockXen, ev: EventChannel, domid: int = 1) -> tuple[int, Any]:
    """A dom0 port of ``ev`` bound to a port of ``domid``: ``(local, raise_it)``, where
    ``raise_it()`` sends on the domain's side, as a guest's vCPU would."""
    local = ev.bind_unbound_port(domid)
    hv = xen.hypervisor
    with xen.lock:
        theirs = hv.bind_interdomain(hv.domains[domid], 0, local)
    assert theirs > 0

    def raise_it() -> None:
        with xen.lock:
            assert hv.evtchn_send(hv.domains[domid], theirs) == 0

    return local, raise_it


def test_an_unmask_is_an_exchange_in_the_shared_page_with_no_message(
    host: tuple[MockXen, str], remote: RemoteXen, monkeypatch: pytest.MonkeyPatch
) -> None:
    with EventChannel(remote.open_device) as ev:
        local, raise_it = from_domain(host[0], ev)
        words = device(ev)._words
        if device(ev)._masks is None:
            pytest.skip("no libatomic: unmasks go through the host")
        posts = count_posts(remote, monkeypatch)
        for _ in range(3):
            raise_it()
            assert words[RING_MASKS + local] == PORT_MASKED  # masked by the host at delivery
            assert ev.pending_ports(8) == [local]
            ev.unmask(local)
            assert words[RING_MASKS + local] == 0
        assert posts == []


def test_a_port_that_fired_while_masked_is_asked_for_at_the_unmask(
    host: tuple[MockXen, str], remote: RemoteXen, monkeypatch: pytest.MonkeyPatch
) -> None:
    with EventChannel(remote.open_device) as ev:
        local, raise_it = from_domain(host[0], ev)
        if device(ev)._masks is None:
            pytest.skip("no libatomic: unmasks go through the host")
        words = device(ev)._words
        raise_it()
        raise_it()  # masked: held in Xen, marked fired in the word
        assert words[RING_MASKS + local] == PORT_MASKED | PORT_FIRED
        assert ev.pending_ports(8) == [local]  # one entry, not two
        posts = count_posts(remote, monkeypatch)
        ev.unmask(local)
        assert posts == [Msg.KICK_POSTED]
        assert readable(ev, WAIT)
        assert ev.pending_ports(8) == [local]  # the held event, delivered at the unmask


def test_an_unmask_after_a_posted_notify_to_dom0_is_queued_behind_it(
    remote: RemoteXen, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linux's NOTIFY has raised the peer when it returns; a posted one has not, so an unmask
    that follows it goes through the host, in order, until the host has answered anything."""
    with EventChannel(remote.open_device) as ev:
        local, peer = loopback(ev)
        if device(ev)._masks is None:
            pytest.skip("no libatomic: unmasks go through the host")
        posts = count_posts(remote, monkeypatch)
        ev.notify(peer)
        ev.unmask(local)
        assert posts == [Msg.IOCTL_POSTED, Msg.WRITE_POSTED]
        sync(remote)
        assert ev.pending_ports(8) == [local]
        ev.unmask(local)  # the host answered since: nothing posted is outstanding
        assert posts == [Msg.IOCTL_POSTED, Msg.WRITE_POSTED]


def test_without_mask_words_the_client_posts_its_unmasks(
    host: tuple[MockXen, str], remote: RemoteXen, monkeypatch: pytest.MonkeyPatch
) -> None:
    with EventChannel(remote.open_device) as ev:
        local, raise_it = from_domain(host[0], ev)
        device(ev)._masks = None  # as a client without libatomic
        posts = count_posts(remote, monkeypatch)
        raise_it()
        raise_it()
        assert ev.pending_ports(8) == [local]
        ev.unmask(local)  # the host clears the word and delivers the held event
        assert posts == [Msg.WRITE_POSTED]
        assert readable(ev, WAIT)
        assert ev.pending_ports(8) == [local]


def test_a_client_that_sets_its_own_mask_words_holds_only_its_own_events(
    host: tuple[MockXen, str], remote: RemoteXen
) -> None:
    xen, path = host
    with (
        EventChannel(remote.open_device) as ev,
        RemoteXen(path) as other,
        EventChannel(other.open_device) as good,
    ):
        local, raise_it = from_domain(xen, ev)
        good_local, raise_good = from_domain(xen, good)
        words = device(ev)._words
        for port in range(4096):
            words[RING_MASKS + port] = 0xFFFFFFFF  # every word, masked and fired
        raise_it()  # held, not lost: chn.pending stays set in Xen
        assert ev.pending_ports(8) == []
        raise_good()
        assert good.pending_ports(8) == [good_local]  # another client's fd is not touched
        ev.unmask(local)
        assert readable(ev, WAIT)
        assert ev.pending_ports(8) == [local]


def test_mask_words_refuse_use_after_release() -> None:
    ring = SharedPortRing()
    try:
        if ring.masks is None:
            pytest.skip("no libatomic")
        assert ring.masks.exchange(5, PORT_MASKED) == 0
        assert ring.masks.compare_exchange(5, PORT_MASKED, PORT_MASKED | PORT_FIRED)
        assert not ring.masks.compare_exchange(5, PORT_MASKED, 0)  # the word moved on: no swap
        assert ring.masks.exchange(5, 0) == PORT_MASKED | PORT_FIRED
    finally:
        ring.close()
    masks = ring.masks
    assert masks is not None
    with pytest.raises(OSError) as e:
        masks.exchange(5, 0)
    assert e.value.errno == errno.EBADF
    with pytest.raises(OSError) as e:
        masks.compare_exchange(5, 0, 1)
    assert e.value.errno == errno.EBADF


def test_a_client_that_blocks_and_fills_its_eventfd_cannot_hang_the_host(remote: RemoteXen) -> None:
    """The eventfd's open file is shared: a client may clear O_NONBLOCK and push the counter
    to its limit.  The host must then skip the wake-up (the fd is readable anyway), not block."""
    import fcntl
    import threading

    with EventChannel(remote.open_device) as ev:
        local, peer = loopback(ev)
        fd = ev.fileno()
        assert not readable(ev)  # counter 0
        os.eventfd_write(fd, 0xFFFFFFFFFFFFFFFE)  # the counter's limit: another write of 1 would block
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        done = threading.Event()

        def poke() -> None:
            ev.notify(peer)  # the host's connection thread makes ``local`` pending: a wake-up
            sync(remote)
            done.set()

        threading.Thread(target=poke, daemon=True).start()
        assert done.wait(10), "the host blocked writing the client's full eventfd"
        assert ev.pending_ports(8) == [local]
