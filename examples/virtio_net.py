"""virtio_net: a virtio network card (virtio 1.x over PCI) whose frames go to a real Linux tap.

The tap is made with pyroute2 and opened as ``examples/tapnet.py`` does (its ``Tap``: created
if missing, non-persistent once opened, so it goes away with this process).  The guest's own
driver (Linux's ``virtio_net``) sees a NIC with the MAC ``--mac``, link up, no offloads.

Run it (as root: creating a tap needs CAP_NET_ADMIN):

    python examples/virtio_net.py                    # mock Xen: tap xdmvnet0 at 10.0.9.1/24; the
                                                     # simulated guest (10.0.9.2) pings the host,
                                                     # then answers ARP and ping for --answer seconds
    ip netns add lab; python examples/virtio_net.py --netns lab --answer 30   # the same in a namespace:
                                                     # ip netns exec lab ping 10.0.9.2
    python examples/virtio_net.py --domid 5 --tap xdm5          # real dom0: serve HVM domain 5
    python examples/virtio_net.py --domid 5 --depriv 990:990 --chroot /var/empty

The tap is opened before the server starts (and before privileges are dropped).  The
device sits at 0000:00:<--slot>.0 (default 09); start the device model while the domain
is still paused.  A domain that is not HVM is refused (MSI-X and INTx go out).  Ctrl-C or
SIGTERM destroys the ioreq server and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import struct
import sys
import time
from pathlib import Path
from types import ModuleType

from xendmop.runtime import ServeLoop
from xendmop.virtio import VirtioDevice
from xendmop.virtio.driver import GuestQueue, VirtioDriver
from xendmop.virtio.net import NET_HDR, RECEIVEQ, TRANSMITQ, VirtioNet
from xendmop.virtio.program import Example

ETH_P_ARP, ETH_P_IP = 0x0806, 0x0800
BROADCAST = b"\xff" * 6
RX_BUFFER = NET_HDR.size + 1514


def _tapnet() -> ModuleType:
    """examples/tapnet.py, for its ``Tap`` (one tap implementation in the examples)."""
    spec = importlib.util.spec_from_file_location("tapnet_for_virtio", Path(__file__).with_name("tapnet.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tap", default="xdmvnet0", help="tap interface (created if missing)")
    p.add_argument("--netns", help="network namespace to run in (must exist)")
    p.add_argument("--host-addr", default="10.0.9.1/24", help="address given to a tap this creates")
    p.add_argument("--guest-addr", default="10.0.9.2", help="the simulated guest's address (mock)")
    p.add_argument("--mac", default="02:58:56:00:00:01", help="the guest's MAC address")
    p.add_argument("--answer", type=float, default=0.0, help="mock: seconds the guest answers ARP/ping after its own")


def validate(args: argparse.Namespace) -> str | None:
    try:
        args.mac_bytes = bytes.fromhex(args.mac.replace(":", ""))
        ipaddress.ip_interface(args.host_addr)
        ipaddress.IPv4Address(args.guest_addr)
    except ValueError as e:
        return f"bad address: {e}"
    try:
        _tapnet().check_ifname(args.tap)
    except ValueError as e:
        return str(e)
    if len(args.mac_bytes) != 6 or args.mac_bytes[0] & 1:
        return f"--mac {args.mac!r}: not a unicast MAC address (six hex bytes)"
    if not 0 <= args.answer <= 3600:
        return f"--answer {args.answer}: seconds in 0..3600"
    return None


_TAPS: dict[int, object] = {}


def make_device(args: argparse.Namespace) -> VirtioNet:
    tapnet = _tapnet()
    if args.netns:
        tapnet.enter_netns(args.netns)  # before any thread: setns applies to this thread only
    try:
        tap = tapnet.Tap.open(args.tap, address=args.host_addr)  # netlink's refusals come as OSError
    except OSError as e:  # without CAP_NET_ADMIN: EPERM from the kernel
        raise OSError(e.errno, f"tap {args.tap!r}: {e.strerror} (creating a tap needs root)") from e
    try:
        device = VirtioNet(tap.fd, args.mac_bytes)
    except BaseException:
        tap.close()
        raise
    _TAPS[id(device)] = tap
    return device


def attach(device: VirtioDevice, loop: ServeLoop) -> None:
    assert isinstance(device, VirtioNet)
    device.attach(loop)


def close(device: VirtioDevice) -> None:
    tap = _TAPS.pop(id(device), None)
    if tap is not None:
        tap.close()  # type: ignore[attr-defined]


# --- the simulated guest's network stack: ARP and ICMP echo, no more ----------------------------------


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def arp(op: int, src_mac: bytes, src_ip: bytes, dst_mac: bytes, dst_ip: bytes) -> bytes:
    eth_dst = BROADCAST if op == 1 else dst_mac
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, op, src_mac, src_ip, dst_mac, dst_ip)
    return eth_dst + src_mac + struct.pack("!H", ETH_P_ARP) + body


def icmp_echo(kind: int, src_mac: bytes, dst_mac: bytes, src_ip: bytes, dst_ip: bytes, rest: bytes) -> bytes:
    icmp = struct.pack("!BBH", kind, 0, 0) + rest
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0x4000, 64, 1, 0, src_ip, dst_ip)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return dst_mac + src_mac + struct.pack("!H", ETH_P_IP) + ip + icmp


class GuestNet:
    """The guest's NIC through its virtio driver: post receive buffers, send, receive, answer."""

    def __init__(self, driver: VirtioDriver, ip: str) -> None:
        self.driver = driver
        self.mac = driver.config_bytes(0, 6)
        self.ip = ipaddress.IPv4Address(ip).packed
        self.rx: GuestQueue = driver.queues[RECEIVEQ]
        self.tx: GuestQueue = driver.queues[TRANSMITQ]
        self.answered = 0
        self.refill()

    def refill(self) -> None:
        while len(self.rx.requests) < min(16, self.rx.size):
            self.rx.add([], [RX_BUFFER])
        self.rx.kick()

    def send(self, frame: bytes) -> None:
        self.tx.request([NET_HDR.pack(0, 0, 0, 0, 0, 0, 0), frame], [])

    def frames(self) -> list[bytes]:
        out = [data[NET_HDR.size :] for _, data in self.rx.take_data() if len(data) > NET_HDR.size]
        if out:
            self.refill()
        return out

    def answer(self, frame: bytes) -> bytes | None:
        """Answer an ARP request for our address or a ping to it; return the frame if it is neither."""
        ethertype = struct.unpack("!H", frame[12:14])[0]
        if ethertype == ETH_P_ARP and len(frame) >= 42:
            op, smac, sip, _, tip = struct.unpack("!6xH6s4s6s4s", frame[14:42])
            if op == 1 and tip == self.ip:
                self.send(arp(2, self.mac, self.ip, smac, sip))
                self.answered += 1
                return None
        if ethertype == ETH_P_IP and len(frame) >= 42 and frame[23] == 1 and frame[30:34] == self.ip:
            ihl = (frame[14] & 0xF) * 4
            icmp = frame[14 + ihl :]
            if icmp[0] == 8:
                self.send(icmp_echo(0, self.mac, frame[6:12], self.ip, frame[26:30], icmp[4:]))
                self.answered += 1
                return None
        return frame

    def wait_for(self, want: object, timeout: float) -> bytes | None:
        """Answer what comes in until ``want(frame)`` holds for one; that frame, or None at the deadline."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for frame in self.frames():
                other = self.answer(frame)
                if other is not None and want(other):  # type: ignore[operator]
                    return other
            time.sleep(0.002)
        return None


def guest_script(driver: VirtioDriver, device: VirtioDevice, args: argparse.Namespace) -> list[str]:
    """The guest pings the host (ARP, then ICMP echo), then answers for ``--answer`` seconds."""
    host_ip, guest_ip, answer = args.host_addr.split("/")[0], args.guest_addr, args.answer
    features = driver.bring_up(0xFFFFFFFF)
    net = GuestNet(driver, guest_ip)
    host = ipaddress.IPv4Address(host_ip).packed
    lines = [f"virtio-net: features {features:#x}, MAC {net.mac.hex(':')}, guest {guest_ip}"]
    net.send(arp(1, net.mac, net.ip, bytes(6), host))
    reply = net.wait_for(lambda f: f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02" and f[28:32] == host, 5)
    if reply is None:
        return [*lines, f"no ARP reply from {host_ip}"]
    host_mac = reply[22:28]
    lines.append(f"{host_ip} is at {host_mac.hex(':')}")
    start = time.monotonic()
    net.send(icmp_echo(8, net.mac, host_mac, net.ip, host, struct.pack("!HH", 0x5856, 1) + b"virtio" * 8))
    echo = net.wait_for(lambda f: f[12:14] == b"\x08\x00" and f[23] == 1 and f[34] == 0, 5)
    rtt = (time.monotonic() - start) * 1000
    lines.append(f"ping {host_ip}: reply in {rtt:.1f} ms" if echo else f"ping {host_ip}: NO reply")
    if answer:  # what it found so far is shown now: a signal may end the answering
        print("\n".join(lines), flush=True)
        print(f"virtio_net: the guest answers ARP and ping at {guest_ip} for {answer:g}s", flush=True)
        net.wait_for(lambda f: False, answer)
        lines.append(f"answered {net.answered} ARP requests and pings")
    return lines


EXAMPLE = Example(
    "virtio_net",
    __doc__,
    make_device,
    guest_script,
    add_arguments=add_arguments,
    validate=validate,
    attach=attach,
    close=close,
    default_slot=9,
)

if __name__ == "__main__":
    sys.exit(EXAMPLE.main())
