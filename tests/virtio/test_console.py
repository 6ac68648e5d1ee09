"""virtio-console over pipes: guest output out, host input in, bounded buffering both ways."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator

import pytest

from xendmop.devicemodel import DeviceModel
from xendmop.mock import MockXen
from xendmop.mock.simguest import SimGuest
from xendmop.runtime import IoreqServer
from xendmop.testing import ServeThread, assert_no_ioreq_server
from xendmop.virtio import VirtioPci
from xendmop.virtio.console import RECEIVEQ, TRANSMITQ, VirtioConsole
from xendmop.virtio.driver import GuestQueue, VirtioPciDriver, find_virtio

F_SIZE = 0  # VIRTIO_CONSOLE_F_SIZE, a bit number


def read_all(fd: int, want: int, timeout: float = 5.0) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    os.set_blocking(fd, False)
    while len(out) < want and time.monotonic() < deadline:
        try:
            out += os.read(fd, want - len(out))
        except BlockingIOError:
            time.sleep(0.001)
    return out


def receive(q: GuestQueue, want: int, timeout: float = 5.0) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        for _, data in q.take_data():
            got += data
        time.sleep(0.001)
    return got


Make = Callable[..., tuple[VirtioConsole, VirtioPciDriver, int, int]]


@pytest.fixture
def console(xen_host: MockXen, hvm_domain: int, device_model: DeviceModel, guest: SimGuest) -> Iterator[Make]:
    """``console(**device_options)``: (device, the guest's driver brought up, host input fd to
    write, host output fd to read)."""
    threads: list[ServeThread] = []
    fds: list[int] = []

    def make(**options: object) -> tuple[VirtioConsole, VirtioPciDriver, int, int]:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        fds.extend((in_r, in_w, out_r, out_w))
        device = VirtioConsole(in_r, out_w, **options)  # type: ignore[arg-type]
        server = IoreqServer(device_model, hvm_domain, opener=xen_host.open_device)
        transport = VirtioPci(device, lambda: server.dispatcher.memory)
        server.add_pci(transport.pci, slot=5)
        thread = ServeThread(server)
        device.attach(thread.loop)
        threads.append(thread.start())
        driver = VirtioPciDriver(guest, find_virtio(guest, 3))
        driver.bring_up(1 << F_SIZE | 1 << 28 | 1 << 29)
        return device, driver, in_w, out_r

    yield make
    for t in threads:
        t.stop()
    for fd in fds:
        os.close(fd)
    assert_no_ioreq_server(xen_host, hvm_domain)


def test_size_in_config(console: Make) -> None:
    _, driver, _, _ = console()
    assert driver.features & 1 << F_SIZE
    assert (driver.config_read(0, 2), driver.config_read(2, 2), driver.config_read(4, 4)) == (80, 25, 1)


def test_guest_output_reaches_the_host(console: Make) -> None:
    device, driver, _, out_r = console()
    tx = driver.queues[TRANSMITQ]
    assert tx.request([b"hello ", b"world\n"], []) == (0, b"")
    tx.request([b"x" * 5000], [], indirect=True)
    assert read_all(out_r, 5012) == b"hello world\n" + b"x" * 5000
    assert device.written == 5012


def test_host_input_reaches_the_guest_across_small_buffers(console: Make) -> None:
    _, driver, in_w, _ = console()
    rx = driver.queues[RECEIVEQ]
    for _ in range(8):
        rx.add([], [16])
    rx.kick()
    line = bytes(range(65, 65 + 50)) + b"\n"
    os.write(in_w, line)
    assert receive(rx, len(line)) == line


def test_input_waits_for_buffers_and_is_bounded(console: Make) -> None:
    device, driver, in_w, _ = console(max_pending=1024)
    os.set_blocking(in_w, False)
    sent = bytearray()
    block = bytes(range(256)) * 64
    try:
        while len(sent) < 1 << 20:
            sent += block[: os.write(in_w, block)]
    except BlockingIOError:
        pass
    deadline = time.monotonic() + 5
    while len(device.pending) < 1024 and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.05)
    assert len(device.pending) == 1024  # no more read while the guest has no buffer
    rx = driver.queues[RECEIVEQ]
    got = b""
    for _ in range(40):
        while len(rx.free) and len(rx.requests) < 16:
            rx.add([], [512])
        rx.kick()
        got += receive(rx, 1, timeout=1)
        if len(got) >= 8192:
            break
    assert len(got) >= 8192 and got == bytes(sent[: len(got)])


def test_output_nobody_reads_is_dropped_not_blocking(console: Make) -> None:
    device, driver, _, out_r = console()
    fcntl.fcntl(out_r, 1031, 4096)  # F_SETPIPE_SZ: a small pipe fills quickly
    tx = driver.queues[TRANSMITQ]
    start = time.monotonic()
    for _ in range(8):
        tx.request([b"y" * 4096], [])
    assert time.monotonic() - start < 5
    assert device.dropped > 0 and device.written + device.dropped == 8 * 4096


def test_emergency_write(console: Make) -> None:
    _, driver, _, out_r = console()
    driver.bar_write(driver.device_cap.bar, driver.device_cap.offset + 8, 4, ord("!"))  # type: ignore[union-attr]
    assert read_all(out_r, 1) == b"!"


def test_an_input_fd_that_fails_ends_input_instead_of_the_device_model(tmp_path: object) -> None:
    broken = os.open(os.fspath(tmp_path), os.O_RDONLY | os.O_DIRECTORY)  # read(2) gives EISDIR
    r, w = os.pipe()
    try:
        device = VirtioConsole(broken, w)
        device.on_input()
        assert device.eof and device.pending == bytearray()
    finally:
        for fd in (broken, r, w):
            os.close(fd)
