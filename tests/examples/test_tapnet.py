"""examples/tapnet.py: the card's registers against a real packet fd, and the whole path
through a real tap in a network namespace (as root).

Without root the card runs over a ``SOCK_SEQPACKET`` socketpair (a real fd that keeps
frame boundaries, as a tap does); with root a network namespace is created with pyroute2
(removed afterwards, also on failure) and the host side is the kernel's own stack:
an ``AF_PACKET`` socket sees the guest's frames, the kernel answers its ARP request,
and a UDP socket sends to it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest
from example_cli import example_env, read_until, stand_in_tool
from pyroute2 import NetNS, netns  # type: ignore[import-untyped]

from xendmop.backends.device import xen_host_signs
from xendmop.runtime import dm_program

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tapnet.py"
GUEST_MAC = bytes.fromhex("025844000001")
OTHER_MAC = bytes.fromhex("025844000002")
HOST_IP, GUEST_IP = "10.0.9.1", "10.0.9.2"
T = TypeVar("T")


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tapnet_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


tapnet = _load()


def frame_to(dst: bytes, payload: bytes = b"x" * 50, ethertype: int = 0x88B5) -> bytes:
    """An Ethernet frame with the local-experimental ethertype."""
    return dst + OTHER_MAC + struct.pack("!H", ethertype) + payload


# --- over a socketpair (no root needed) ------------------------------------------------------


@pytest.fixture
def wire() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(card side, peer side) of a packet socketpair."""
    card, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    card.setblocking(False)
    peer.settimeout(5)
    yield card, peer
    card.close()
    peer.close()


@pytest.fixture
def net(wire: tuple[socket.socket, socket.socket]) -> Iterator[Any]:
    with tapnet.MockNetwork.create(wire[0].fileno(), irq=5) as network:
        yield network


def driver(net: Any) -> Any:
    drv = net.guest()
    drv.init(GUEST_MAC)
    return drv


def take_frame(net: Any, drv: Any, timeout: float = 5.0) -> bytes:
    """Take one received frame as the guest's interrupt handler does, checking the line:
    raised for the frame, lowered by the acknowledgement, before the buffer goes back."""
    assert drv.wait_interrupt(timeout), "no receive interrupt"
    assert net.xen.domain(net.domid).gsi_level(5)
    isr = drv.inp(tapnet.REG_ISR)
    assert isr & tapnet.ISR_RX, f"ISR {isr:#x} without RX"
    length = drv.inp(tapnet.REG_RX_LEN)
    frame: bytes = drv.guest.read_ram(tapnet.RX_BUFFER, length)
    drv.out(tapnet.REG_ISR, isr)
    assert not net.xen.domain(net.domid).gsi_level(5), "line still up after the acknowledgement"
    drv.out(tapnet.REG_RX_LEN, 0)
    return frame


def test_a_guest_frame_goes_out_and_a_frame_in_raises_the_interrupt(net: Any, wire: Any) -> None:
    _, peer = wire
    drv = driver(net)
    out = frame_to(b"\xff" * 6, bytes(range(200)))
    assert drv.send(out) == tapnet.TX_OK
    assert peer.recv(4096) == out
    assert not net.line()  # TX completion is masked: no interrupt for it
    incoming = frame_to(GUEST_MAC, b"reply" * 20)
    peer.send(incoming)
    assert take_frame(net, drv) == incoming
    assert (net.nic.tx_frames, net.nic.rx_frames) == (1, 1)


def test_frames_wait_in_order_while_the_guest_holds_its_buffer(net: Any, wire: Any) -> None:
    _, peer = wire
    drv = driver(net)
    frames = [frame_to(GUEST_MAC, bytes([i]) * 60) for i in range(5)]
    for f in frames:
        peer.send(f)
    assert [take_frame(net, drv) for _ in frames] == frames


def test_the_address_filter_and_a_disabled_receiver_drop_frames(net: Any, wire: Any) -> None:
    _, peer = wire
    drv = driver(net)
    peer.send(frame_to(OTHER_MAC))  # not ours: dropped silently
    assert not drv.wait_interrupt(0.3)
    assert drv.inp(tapnet.REG_RX_DROPPED) == 0
    multicast = frame_to(b"\x33\x33\x00\x00\x00\x01")
    peer.send(multicast)
    assert take_frame(net, drv) == multicast
    drv.out(tapnet.REG_CTRL, 0)
    peer.send(frame_to(GUEST_MAC))
    deadline = time.monotonic() + 5
    while drv.inp(tapnet.REG_RX_DROPPED) != 1:
        assert time.monotonic() < deadline, "frame to a disabled receiver not counted as dropped"
        time.sleep(0.01)
    assert not net.line()


def test_a_full_queue_drops_and_counts(net: Any, wire: Any) -> None:
    _, peer = wire
    drv = driver(net)
    total = 1 + tapnet.RX_QUEUE + 3  # one in the held buffer, a full queue, three too many
    for i in range(total):
        peer.send(frame_to(GUEST_MAC, i.to_bytes(2, "big") * 30))
    deadline = time.monotonic() + 5
    while drv.inp(tapnet.REG_RX_DROPPED) < 3:
        assert time.monotonic() < deadline, "overflow not counted"
        time.sleep(0.01)
    got = [take_frame(net, drv) for _ in range(total - 3)]
    assert [int.from_bytes(f[14:16], "big") for f in got] == list(range(total - 3))
    assert drv.inp(tapnet.REG_RX_DROPPED) == 3


@pytest.mark.parametrize(
    ("gpa", "length", "status"),
    [
        (tapnet.TX_BUFFER, 0, tapnet.TX_BAD_LENGTH),
        (tapnet.TX_BUFFER, 13, tapnet.TX_BAD_LENGTH),  # shorter than an Ethernet header
        (tapnet.TX_BUFFER, tapnet.MAX_FRAME + 1, tapnet.TX_BAD_LENGTH),
        (tapnet.TX_BUFFER, 0xFFFFFFFF, tapnet.TX_BAD_LENGTH),
        (4 << 20, 60, tapnet.TX_BAD_ADDRESS),  # just past the 4 MiB of RAM
        ((4 << 20) - 30, 60, tapnet.TX_BAD_ADDRESS),  # straddles the end of RAM
        ((1 << 64) - 30, 60, tapnet.TX_BAD_ADDRESS),  # wraps the address space
        (0xFEE00000, 60, tapnet.TX_BAD_ADDRESS),  # the local APIC, not RAM
    ],
)
def test_a_bad_transmit_descriptor_sets_an_error_and_sends_nothing(
    net: Any, wire: Any, gpa: int, length: int, status: int
) -> None:
    _, peer = wire
    drv = driver(net)
    drv.out(tapnet.REG_IMR, tapnet.ISR_TX_ERROR)
    drv.out(tapnet.REG_TX_ADDR_LO, gpa & 0xFFFFFFFF)
    drv.out(tapnet.REG_TX_ADDR_HI, gpa >> 32)
    drv.out(tapnet.REG_TX_LEN, length)
    drv.out(tapnet.REG_TX_DOORBELL, 1)
    assert drv.inp(tapnet.REG_TX_STATUS) == status
    assert net.line(), "TX error did not raise the (unmasked) interrupt"
    drv.out(tapnet.REG_ISR, tapnet.ISR_TX_ERROR)
    assert not net.line()
    peer.settimeout(0.2)
    with pytest.raises(TimeoutError):
        peer.recv(4096)
    good = frame_to(b"\xff" * 6)
    assert drv.send(good) == tapnet.TX_OK  # the card still works
    peer.settimeout(5)
    assert peer.recv(4096) == good
    assert net.server.dispatcher.stats["device-error"] == 0


@pytest.mark.parametrize(
    ("rx_addr", "rx_size"),
    [
        (4 << 20, 2048),  # buffer outside RAM
        ((4 << 20) - 10, 2048),  # buffer running off the end of RAM
        (tapnet.RX_BUFFER, 59),  # buffer shorter than the frame
    ],
)
def test_a_bad_receive_buffer_drops_the_frame_with_an_error(net: Any, wire: Any, rx_addr: int, rx_size: int) -> None:
    _, peer = wire
    drv = driver(net)
    drv.out(tapnet.REG_RX_ADDR_LO, rx_addr & 0xFFFFFFFF)
    drv.out(tapnet.REG_RX_SIZE, rx_size)
    peer.send(frame_to(GUEST_MAC, b"y" * 46))  # 60 bytes
    assert drv.wait_interrupt(5), "RX error did not raise the interrupt"
    assert drv.inp(tapnet.REG_ISR) & (tapnet.ISR_RX | tapnet.ISR_RX_ERROR) == tapnet.ISR_RX_ERROR
    assert (drv.inp(tapnet.REG_RX_LEN), drv.inp(tapnet.REG_RX_DROPPED)) == (0, 1)
    drv.out(tapnet.REG_ISR, tapnet.ISR_RX_ERROR)
    assert not net.line()
    drv.out(tapnet.REG_RX_ADDR_LO, tapnet.RX_BUFFER)
    drv.out(tapnet.REG_RX_SIZE, tapnet.RX_BUFFER_SIZE)
    ok = frame_to(GUEST_MAC)
    peer.send(ok)
    assert take_frame(net, drv) == ok


def test_registers_other_widths_read_all_ones_and_write_nothing(net: Any) -> None:
    drv = driver(net)
    guest = drv.guest
    assert drv.inp(tapnet.REG_ID) == tapnet.CARD_ID
    assert guest.inb(tapnet.PORT_BASE + tapnet.REG_ID) == 0xFF
    assert guest.inw(tapnet.PORT_BASE + tapnet.REG_IMR) == 0xFFFF
    assert guest.inl(tapnet.PORT_BASE + 0x3E) == 0xFFFFFFFF  # crosses the end: Xen routes it nowhere
    guest.outw(tapnet.PORT_BASE + tapnet.REG_IMR, 0)
    guest.outl(tapnet.PORT_BASE + tapnet.REG_IMR + 1, 0)  # unaligned
    assert drv.inp(tapnet.REG_IMR) == tapnet.ISR_RX | tapnet.ISR_RX_ERROR
    mac = drv.inp(tapnet.REG_MAC_LO).to_bytes(4, "little") + drv.inp(tapnet.REG_MAC_HI).to_bytes(2, "little")
    assert mac == GUEST_MAC


def test_a_card_without_interrupt_is_polled_and_never_touches_the_line(wire: Any) -> None:
    card, peer = wire
    with tapnet.MockNetwork.create(card.fileno(), irq=None) as network:
        drv = driver(network)
        assert drv.line is None
        incoming = frame_to(GUEST_MAC)
        peer.send(incoming)
        assert drv.receive(5) == incoming
        assert not any(network.xen.domain(network.domid).gsi_level(g) for g in range(16))
        assert not [e for e in network.xen.events if "set_isa_irq_level" in str(e.args)]


def test_interrupts_are_refused_for_a_guest_that_is_not_hvm(wire: Any) -> None:
    with pytest.raises(dm_program.NotHvmError, match=r"dom1 is pv, not HVM.*crash Xen \(4\.17\.7\)"):
        tapnet.MockNetwork.create(wire[0].fileno(), irq=5, hvm=False)


def test_the_guest_stack_answers_arp_ping_and_udp_echo_only_for_itself() -> None:
    own, other = ipaddress.IPv4Address(GUEST_IP).packed, ipaddress.IPv4Address(HOST_IP).packed
    host_mac = bytes.fromhex("0a0000000001")
    request = tapnet.arp_frame(1, host_mac, other, bytes(6), own)
    reply = tapnet.answer(request, GUEST_MAC, own)
    assert reply == tapnet.arp_frame(2, GUEST_MAC, own, host_mac, other)
    assert tapnet.answer(tapnet.arp_frame(1, host_mac, other, bytes(6), other), GUEST_MAC, own) is None
    assert tapnet.answer(b"short", GUEST_MAC, own) is None

    def ipv4(proto: int, payload: bytes, dst: bytes = own) -> bytes:
        header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 7, 0, 64, proto, 0, other, dst))
        header[10:12] = struct.pack("!H", tapnet.ip_checksum(bytes(header)))
        return GUEST_MAC + host_mac + b"\x08\x00" + bytes(header) + payload

    def check_reply(reply: bytes | None, proto: int) -> bytes:
        assert reply is not None
        assert reply[:6] == host_mac and reply[6:12] == GUEST_MAC and reply[23] == proto
        assert reply[26:30] == own and reply[30:34] == other  # addresses swapped
        assert tapnet.ip_checksum(reply[14:34]) == 0, "bad IPv4 header checksum"
        return reply[34:]

    icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x1234, 1) + b"ping data")
    icmp[2:4] = struct.pack("!H", tapnet.ip_checksum(bytes(icmp)))
    echo = check_reply(tapnet.answer(ipv4(1, bytes(icmp)), GUEST_MAC, own), 1)
    assert echo[0] == 0 and echo[4:] == icmp[4:] and tapnet.ip_checksum(echo) == 0  # echo reply, same id/seq/data

    udp = struct.pack("!HHHH", 40000, 7, 8 + 5, 0) + b"hello"
    echo = check_reply(tapnet.answer(ipv4(17, udp), GUEST_MAC, own), 17)
    assert struct.unpack("!HH", echo[:4]) == (7, 40000) and echo[8:] == b"hello"
    assert tapnet.answer(ipv4(17, struct.pack("!HHHH", 40000, 9, 13, 0) + b"hello"), GUEST_MAC, own) is None
    assert tapnet.answer(ipv4(1, bytes(icmp), dst=other), GUEST_MAC, own) is None  # not addressed to the guest


# --- the command line (no root needed for refusals) ------------------------------------------


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_depriv_on_the_in_process_mock_exits_with_a_reason() -> None:
    done = run_cli("--depriv", "990:990")
    assert done.returncode == 2
    assert "real dom0" in done.stderr and "XENDMOP_MOCK_SOCKET" in done.stderr


@pytest.mark.parametrize("kind", ["pvh", "pv"])
def test_interrupts_for_a_domain_that_is_not_hvm_are_refused_before_anything_is_opened(
    tmp_path: Path, kind: str
) -> None:
    """The type as the other examples get it (dm_program.require_hvm): libxenctrl, else Xenstore (a stand-in here).
    --assume-hvm is only for a type nothing can tell: it does not override what Xenstore says."""
    stand_in_tool(tmp_path, "xenstore-read", f"echo {kind}")
    for extra in ([], ["--assume-hvm"]):
        done = subprocess.run(
            [sys.executable, str(EXAMPLE), "--domid", "7", "--tap", "never0", *extra],
            capture_output=True,
            text=True,
            timeout=60,
            env=example_env(PATH=f"{tmp_path}:{os.environ['PATH']}"),
        )
        assert done.returncode == 2, done.stderr
        assert f"dom7 is {kind}, not HVM" in done.stderr and "--no-irq" in done.stderr
        assert "cannot open tap" not in done.stderr


def test_the_guest_type_is_not_an_option() -> None:
    """One way to say what the domain is, as in the other examples: --assume-hvm, for an unknown type only."""
    done = run_cli("--domid", "7", "--guest-type", "hvm", "--tap", "never0")
    assert done.returncode == 2 and "unrecognized arguments: --guest-type hvm" in done.stderr


def test_a_domain_of_unknown_type_needs_assume_hvm_or_no_irq(tmp_path: Path) -> None:
    """No xenstore-read on PATH and no Xen for libxenctrl: the kind is unknown, so refused."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--domid", "7", "--tap", "never0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PATH": str(tmp_path)},
    )
    assert done.returncode == 2
    if not xen_host_signs():  # off Xen, no domain has a type: the reason is that there is no Xen here
        last = done.stderr.splitlines()[-1]
        assert "not a Xen host" in last and "--assume-hvm" not in last
        return
    assert "dom7 is of unknown type, not HVM" in done.stderr and "--assume-hvm" in done.stderr
    assert "--no-irq" in done.stderr


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--tap", "a/b"], "'a/b'"),
        (["--tap", "x" * 16], "x" * 16),
        (["--irq", "16"], "'16'"),
        (["--mac", "02:00"], "'02:00'"),
        (["--host-addr", "10.0.9.300/24"], "10.0.9.300/24"),
        (["--netns", "tapnet-no-such-ns"], "tapnet-no-such-ns"),
        (["--domid", "7", "--no-irq", "--guest-ram-mb", "0"], "'0'"),
        (["--domid", "7", "--no-irq", "--depriv", "0:0"], "'0:0'"),
        (["--domid", "7", "--no-irq", "--depriv", "990"], "'990'"),
        (["--domid", "7", "--no-irq", "--chroot", "/var/empty"], "--chroot needs --depriv"),
    ],
)
def test_bad_options_are_refused_naming_the_value(args: list[str], named: str) -> None:
    done = run_cli(*args)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr


# --- through a real tap in a network namespace (root) -----------------------------------------


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: creating a network namespace and a tap needs CAP_SYS_ADMIN and CAP_NET_ADMIN")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun (the tun module is not loaded)")


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread that has entered network namespace ``name`` (setns is
    per thread, so the test's own thread stays where it is); return or raise its result."""
    box: queue.Queue[tuple[bool, Any]] = queue.Queue()

    def body() -> None:
        try:
            netns.setns(name, flags=0)
            box.put((True, fn()))
        except BaseException as e:
            box.put((False, e))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(30)
    ok, value = box.get(timeout=1)
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


@pytest.fixture
def netns_name() -> Iterator[str]:
    _need_root()
    name = f"xdm-tapnet-{uuid.uuid4().hex[:8]}"
    try:
        netns.create(name)
    except OSError as e:
        pytest.skip(f"cannot create a network namespace here: {e}")
    try:
        yield name
    finally:
        netns.remove(name)
        assert name not in netns.listnetns()


def link_exists(ns: str, ifname: str) -> bool:
    with NetNS(ns) as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def recv_matching(sock: socket.socket, want: Callable[[bytes, Any], bool], timeout: float = 5) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data, addr = sock.recvfrom(65536)
        except TimeoutError:
            raise AssertionError("frame not seen on the host side") from None
        if want(data, addr):
            return data


def take_matching(net: Any, drv: Any, want: Callable[[bytes], bool], timeout: float = 5) -> bytes:
    """The next frame the guest receives for which ``want`` holds (IPv6 chatter is skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        frame = take_frame(net, drv, max(0.01, deadline - time.monotonic()))
        if want(frame):
            return frame


def test_guest_and_host_exchange_frames_through_a_real_tap(netns_name: str) -> None:
    ns, ifname = netns_name, "xdmt0"

    def host_side() -> tuple[Any, socket.socket, socket.socket]:
        sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
        tap = tapnet.Tap.open(ifname, address=f"{HOST_IP}/24")
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        return tap, sniffer, udp

    tap, sniffer, udp = in_netns(ns, host_side)
    with contextlib.ExitStack() as stack:
        stack.callback(udp.close)
        stack.callback(sniffer.close)
        stack.callback(tap.close)
        assert tap.created and link_exists(ns, ifname)
        net = stack.enter_context(tapnet.MockNetwork.create(tap.fd, irq=5))
        drv = driver(net)
        own, host = ipaddress.IPv4Address(GUEST_IP).packed, ipaddress.IPv4Address(HOST_IP).packed

        # guest → host: the ARP request appears on the host side of the tap, unchanged
        request = tapnet.arp_frame(1, GUEST_MAC, own, bytes(6), host)
        assert drv.send(request) == tapnet.TX_OK
        seen = recv_matching(sniffer, lambda data, addr: addr[0] == ifname and data[6:12] == GUEST_MAC)
        assert seen == request

        # host → guest: the kernel's ARP reply lands in the guest's buffer, with the interrupt
        reply = take_matching(net, drv, lambda f: f[12:14] == b"\x08\x06")
        assert reply[:6] == GUEST_MAC
        op, sender_ip, target_mac, target_ip = struct.unpack("!6xH6x4s6s4s", reply[14:42])
        assert (op, sender_ip, target_mac, target_ip) == (2, host, GUEST_MAC, own)

        # host → guest: a UDP datagram from a socket (the kernel learned the guest's MAC from its request)
        udp.sendto(b"to the guest", (GUEST_IP, 9))
        datagram = take_matching(net, drv, lambda f: f[12:14] == b"\x08\x00" and f[23] == 17)
        assert datagram[:6] == GUEST_MAC and datagram[26:30] == host and datagram[30:34] == own
        assert datagram[42:] == b"to the guest"
    assert not link_exists(ns, ifname), "the tap outlived its fd"


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def read_line(proc: subprocess.Popen[str], text: str) -> str:
    """The first line of ``proc``'s stdout holding ``text`` (``example_cli.read_until``: failing at its deadline)."""
    return read_until(proc.stdout, text).splitlines()[-1]


def stop(proc: subprocess.Popen[str], signum: int = signal.SIGTERM) -> tuple[str, str]:
    """Signal ``proc``, wait for it, return the rest of its output (killed if it hangs)."""
    proc.send_signal(signum)
    try:
        return proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_command_line_serves_in_a_netns_until_signalled(netns_name: str, signum: int) -> None:
    ns, ifname = netns_name, "xdmt1"
    proc = start(str(EXAMPLE), "--netns", ns, "--tap", ifname)
    try:
        assert read_line(proc, "Ctrl-C to stop").startswith("tapnet: serving dom1 (mock) on tap xdmt1; guest ")
        assert f"host {HOST_IP} is at" in read_line(proc, "is at")

        def udp_echo() -> bytes:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(5)
                s.sendto(b"echo me", (GUEST_IP, 7))
                data, peer = s.recvfrom(100)
                assert peer == (GUEST_IP, 7)
                return data

        assert in_netns(ns, udp_echo) == b"echo me"
    finally:
        out, err = stop(proc, signum)
    assert proc.returncode == 0, err
    assert f"tapnet: stopped ({signal.Signals(signum).name}); the ioreq server was destroyed; " in out
    assert f"tap {ifname} removed" in out
    assert not link_exists(ns, ifname)


def test_without_xen_the_real_mode_fails_cleanly_and_removes_its_tap(netns_name: str) -> None:
    if os.path.exists("/dev/xen/privcmd"):
        pytest.skip("this is a Xen dom0: the real mode would serve dom7")
    done = run_cli("--netns", netns_name, "--tap", "xdmt2", "--domid", "7", "--no-irq")
    assert done.returncode == 1
    assert "dom7" in done.stderr and "/dev/xen/privcmd" in done.stderr
    assert "tap xdmt2 removed" in done.stdout
    assert not link_exists(netns_name, "xdmt2")


def test_assume_hvm_lets_a_domain_of_unknown_type_past_the_guard(netns_name: str, tmp_path: Path) -> None:
    """No xenstore-read and no Xen: the type is unknown, --assume-hvm vouches for it, and the
    run gets as far as opening privcmd (after the tap), which fails here in one line."""
    if os.path.exists("/dev/xen/privcmd"):
        pytest.skip("this is a Xen dom0: the real mode would serve dom7")
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--netns", netns_name, "--tap", "xdmt4", "--domid", "7", "--assume-hvm"],
        capture_output=True,
        text=True,
        timeout=60,
        env=example_env(PATH=str(tmp_path)),
    )
    assert done.returncode == 1, done.stderr
    assert "not HVM" not in done.stderr and "dom7" in done.stderr and "/dev/xen/privcmd" in done.stderr
    assert "tap xdmt4 removed" in done.stdout
    assert not link_exists(netns_name, "xdmt4")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_deprivileged_device_model_serves_a_mock_host_process(netns_name: str, tmp_path: Path, signum: int) -> None:
    """Three processes, as on a dom0: the mock Xen (``xendmop mock-host``), the device model
    (deprivileged to 65534:65534 once its server is up) and the guest, driven from here;
    SIGTERM or SIGINT ends it with status 0, as every example."""
    from xendmop.mock.remote import RemoteGuest, RemoteXen

    ns, ifname, sock = netns_name, "xdmt3", str(tmp_path / "xen.sock")
    host = start("-m", "xendmop", "mock-host", "--socket", sock)
    try:
        read_line(host, "listening")
        dm = start(
            str(EXAMPLE), "--domid", "1", "--netns", ns, "--tap", ifname, "--depriv", "65534:65534",
            env={tapnet.ENV_SOCKET: sock},
        )  # fmt: skip
        try:
            serving = read_line(dm, "serving")
            assert "serving dom1 of the mock host" in serving and serving.endswith("; Ctrl-C to stop")
            status = Path(f"/proc/{dm.pid}/status").read_text()
            assert "Uid:\t65534\t65534\t65534\t65534" in status and "NoNewPrivs:\t1" in status, status

            sniffer = in_netns(ns, lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)))
            with sniffer, RemoteXen(sock) as xen:
                drv = tapnet.GuestDriver(RemoteGuest(xen, 1), lambda: xen.gsi_level(1, 5))
                drv.init(GUEST_MAC)
                own, host_ip = ipaddress.IPv4Address(GUEST_IP).packed, ipaddress.IPv4Address(HOST_IP).packed
                request = tapnet.arp_frame(1, GUEST_MAC, own, bytes(6), host_ip)
                assert drv.send(request) == tapnet.TX_OK
                assert (
                    recv_matching(sniffer, lambda data, addr: addr[0] == ifname and data[6:12] == GUEST_MAC) == request
                )
                deadline = time.monotonic() + 10
                while True:
                    frame = drv.receive(max(0.01, deadline - time.monotonic()))
                    assert frame is not None, "the kernel's ARP reply never reached the guest"
                    if frame[12:14] == b"\x08\x06":
                        break
                assert frame[:6] == GUEST_MAC and frame[28:32] == host_ip and drv.interrupts >= 1
                # Acknowledged: the line is down, unless the next queued frame (the kernel's IPv6
                # chatter on a new link) already landed in the buffer given back, and raised it anew.
                assert not xen.gsi_level(1, 5) or drv.inp(tapnet.REG_ISR) & tapnet.ISR_RX
                assert len(xen.servers(1)) == 1
                out, err = stop(dm, signum)
                assert dm.returncode == 0, err
                assert f"tapnet: stopped ({signal.Signals(signum).name}); the ioreq server was destroyed; " in out
                assert f"tap {ifname} removed" in out
                assert xen.servers(1) == {}, "the deprivileged device model left its ioreq server in Xen"
        finally:
            if dm.poll() is None:
                stop(dm, signal.SIGKILL)
    finally:
        stop(host)
    assert not link_exists(ns, ifname)
