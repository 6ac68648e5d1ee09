"""virtio-net over a packet socketpair (frames kept whole, as a tap does); the example through a
real tap in a network namespace is in tests/examples/test_virtio_examples.py."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import pytest

from xendmop.devicemodel import DeviceModel
from xendmop.mock import MockXen
from xendmop.mock.simguest import SimGuest
from xendmop.runtime import IoreqServer
from xendmop.testing import ServeThread
from xendmop.virtio import VirtioPci
from xendmop.virtio.driver import GuestQueue, VirtioPciDriver, find_virtio
from xendmop.virtio.net import NET_HDR, RECEIVEQ, TRANSMITQ, VirtioNet
from xendmop.virtio.virtqueue import Chain

MAC = bytes.fromhex("025856000007")
PEER = bytes.fromhex("02585600000f")
HDR = NET_HDR.pack(0, 0, 0, 0, 0, 0, 0)


def frame(payload: bytes = b"p" * 46, dst: bytes = MAC) -> bytes:
    return dst + PEER + b"\x88\xb5" + payload


def receive(q: GuestQueue, n: int, timeout: float = 5.0) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += [data for _, data in q.take_data()]
        time.sleep(0.001)
    return got


Make = Callable[..., tuple[VirtioNet, VirtioPciDriver, socket.socket]]


@pytest.fixture
def nic(xen_host: MockXen, hvm_domain: int, device_model: DeviceModel, guest: SimGuest) -> Iterator[Make]:
    threads: list[ServeThread] = []
    socks: list[socket.socket] = []

    def make(**options: object) -> tuple[VirtioNet, VirtioPciDriver, socket.socket]:
        mine, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        peer.settimeout(5)
        socks.extend((mine, peer))
        device = VirtioNet(mine.fileno(), MAC, **options)  # type: ignore[arg-type]
        server = IoreqServer(device_model, hvm_domain, opener=xen_host.open_device)
        transport = VirtioPci(device, lambda: server.dispatcher.memory)
        server.add_pci(transport.pci, slot=5)
        thread = ServeThread(server)
        device.attach(thread.loop)
        threads.append(thread.start())
        driver = VirtioPciDriver(guest, find_virtio(guest, 1))
        driver.bring_up(0xFFFFFFFF)
        return device, driver, peer

    yield make
    for t in threads:
        t.stop()
    for s in socks:
        s.close()


def test_config_mac_and_link(nic: Make) -> None:
    _, driver, _ = nic()
    assert driver.config_bytes(0, 6) == MAC
    assert driver.config_read(6, 2) == 1  # VIRTIO_NET_S_LINK_UP
    assert driver.features >> 5 & 1 and driver.features >> 16 & 1 and not driver.features >> 15 & 1


def test_guest_frames_reach_the_peer_whole(nic: Make) -> None:
    device, driver, peer = nic()
    tx = driver.queues[TRANSMITQ]
    sent = frame(b"a" * 1500, dst=PEER)
    tx.request([HDR, sent[:20], sent[20:]], [])
    assert peer.recv(65536) == sent
    tx.request([HDR + sent], [], indirect=True)
    assert peer.recv(65536) == sent
    assert device.stats["tx"] == 2


def test_peer_frames_reach_the_guest_with_a_header(nic: Make) -> None:
    _, driver, peer = nic()
    rx = driver.queues[RECEIVEQ]
    for _ in range(4):
        rx.add([], [NET_HDR.size + 1514])
    rx.kick()
    frames = [frame(bytes([i]) * 60) for i in range(3)]
    for f in frames:
        peer.send(f)
    got = receive(rx, 3)
    assert got == [NET_HDR.pack(0, 0, 0, 0, 0, 0, 1) + f for f in frames]


def test_an_answer_made_within_the_write_reaches_the_guest_before_the_transmit_interrupt(
    nic: Make, xen_host: MockXen, hvm_domain: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tap's host stack answers a ping (or an ARP request) inside the write that carried it:
    the device reads the tap right after the batch's last frame, so the answer is in the guest's
    receive queue, with its interrupt, before the transmit queue's completion interrupt."""
    _, driver, peer = nic()
    rx, tx = driver.queues[RECEIVEQ], driver.queues[TRANSMITQ]
    rx.add([], [NET_HDR.size + 1514])
    rx.kick()
    answer = frame(b"pong" * 12)
    send_to = Chain.send_to

    def and_answer(chain: Chain, fd: int, skip: int) -> int:
        n = send_to(chain, fd, skip)
        peer.send(answer)  # before the write returns, as the stack behind a tap answers
        return n

    monkeypatch.setattr(Chain, "send_to", and_answer)
    sent = frame(b"ping" * 12, dst=PEER)
    tx.request([HDR + sent], [])
    assert peer.recv(65536) == sent
    assert receive(rx, 1) == [NET_HDR.pack(0, 0, 0, 0, 0, 0, 1) + answer]
    data = [d for _, d in xen_host.domain(hvm_domain).snapshot()["msis"]]
    rx_msi, tx_msi = driver.msi_vector_data(rx.vector), driver.msi_vector_data(tx.vector)
    assert rx_msi in data and tx_msi in data, data
    assert data.index(rx_msi) < data.index(tx_msi), data


def test_a_look_after_a_transmit_that_finds_nothing_stops_the_looking_until_the_host_sends(
    nic: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-way stream (UDP to a listener) would pay a read that says EAGAIN per batch."""
    device, driver, peer = nic()
    rx, tx = driver.queues[RECEIVEQ], driver.queues[TRANSMITQ]
    rx.add([], [NET_HDR.size + 1514])
    rx.kick()
    reads: list[int] = []
    read_tap = device._read_tap

    def counting() -> int:
        reads.append(read_tap())
        return reads[-1]

    monkeypatch.setattr(device, "_read_tap", counting)
    sent = frame(b"ping" * 12, dst=PEER)
    tx.request([HDR + sent], [])  # looked: nothing there
    assert reads == [0]
    tx.request([HDR + sent], [])  # not looked
    assert reads == [0]
    peer.send(frame(b"host" * 12))  # the host sends: read by the loop, and the looking is back
    assert len(receive(rx, 1)) == 1
    assert reads == [0, 1]
    tx.request([HDR + sent], [])
    assert reads == [0, 1, 0]
    assert [peer.recv(65536) for _ in range(3)] == [sent] * 3


def test_frames_wait_for_buffers_in_a_bounded_queue(nic: Make) -> None:
    device, driver, peer = nic(max_frames=8)
    for i in range(20):
        peer.send(frame(bytes([i]) * 50))
    deadline = time.monotonic() + 5
    while device.stats["rx dropped: queue full"] < 12 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(device.rx_frames) == 8 and device.stats["rx dropped: queue full"] == 12
    rx = driver.queues[RECEIVEQ]
    for _ in range(8):
        rx.add([], [NET_HDR.size + 1514])
    rx.kick()
    got = receive(rx, 8)
    assert [g[NET_HDR.size + 14] for g in got] == list(range(8))  # the first eight, in order


def test_frame_too_long_for_the_buffer_is_dropped_and_the_buffer_takes_the_next(nic: Make) -> None:
    device, driver, peer = nic()
    rx = driver.queues[RECEIVEQ]
    rx.add([], [NET_HDR.size + 100])
    peer.send(frame(b"L" * 500))
    peer.send(frame(b"s" * 46))
    time.sleep(0.05)
    rx.kick()
    (got,) = receive(rx, 1)
    assert got[NET_HDR.size :] == frame(b"s" * 46)
    assert device.stats["rx dropped: buffer too small"] == 1


@pytest.mark.parametrize("length", [0, 5, NET_HDR.size + 13, NET_HDR.size + 65550])
def test_transmit_buffers_of_a_bad_length_are_dropped(nic: Make, length: int) -> None:
    device, driver, peer = nic()
    driver.queues[TRANSMITQ].request([bytes(length)], [])
    assert device.stats["tx dropped: bad length"] == 1 and not driver.needs_reset
    peer.settimeout(0.05)
    with pytest.raises(TimeoutError):
        peer.recv(65536)


def test_bad_mac_is_refused() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        with pytest.raises(ValueError, match="mac=01:00"):
            VirtioNet(a.fileno(), bytes.fromhex("010000000001"))


def test_a_tap_that_fails_stops_being_read_instead_of_ending_the_device_model() -> None:
    """A tun fd never attached to an interface reads EBADFD, as a tap whose interface went away."""
    import os

    from xendmop.runtime import ServeLoop

    try:
        broken = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as e:
        pytest.skip(f"/dev/net/tun: {e.strerror}")
    try:
        device = VirtioNet(broken, MAC)
        device.attach(ServeLoop())  # watched (add_reader before the loop runs)
        assert device._reading
        device.on_readable()
        assert not device._reading and not device.rx_frames  # remove_reader: the fd is let go
    finally:
        os.close(broken)


def test_a_closed_peer_stops_being_read_instead_of_spinning_the_loop() -> None:
    from xendmop.runtime import ServeLoop

    mine, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with mine:
        device = VirtioNet(mine.fileno(), MAC)
        device.attach(ServeLoop())
        peer.close()  # from now on mine reads 0 bytes, and epoll keeps saying it is readable
        device.on_readable()
        assert not device._reading
