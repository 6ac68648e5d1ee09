"""tapnet: a small network card whose frames go to a real Linux tap interface.

The card is a block of 64 I/O ports at 0xC000 (32-bit registers, little endian; any
other width or an unaligned access reads all-ones and writes nothing):

    0x00 ID          ro  0x50415458 ("XTAP")
    0x04 CTRL        rw  bit 0: receive enabled (frames arriving while it is clear are dropped)
    0x08 ISR         r, write 1 to clear: 1 RX, 2 TX done, 4 TX error, 8 RX error
    0x0C IMR         rw  ISR bits that assert the interrupt line (ISA IRQ, level-triggered)
    0x10 MAC_LO      rw  MAC bytes 0-3; the card accepts frames to this MAC, broadcast, multicast
    0x14 MAC_HI      rw  MAC bytes 4-5 (bits 0-15)
    0x18 TX_ADDR_LO  rw  guest-physical address of the frame to send
    0x1C TX_ADDR_HI  rw
    0x20 TX_LEN      rw  its length in bytes, 14..1514 (MTU 1500 + Ethernet header)
    0x24 TX_DOORBELL wo  any write sends the frame now; reads 0
    0x28 TX_STATUS   ro  0 ok, 1 bad length, 2 bad address, 3 the tap refused it
    0x2C RX_ADDR_LO  rw  guest-physical address of the receive buffer
    0x30 RX_ADDR_HI  rw
    0x34 RX_SIZE     rw  the buffer's size; a longer frame is dropped with RX error
    0x38 RX_LEN      r   length of the frame in the buffer, 0 when it is free;
                     w   any write gives the buffer back (the next queued frame lands in it)
    0x3C RX_DROPPED  ro  frames dropped (receive off, queue full, too long, bad buffer)

The guest is untrusted: a descriptor with a bad length or an address outside guest
RAM sets TX_STATUS/RX error and raises nothing; frames are copied through the
runtime's foreign mapping of guest RAM, bounds-checked first.  Frames from the tap
wait in a bounded queue (64) while the guest holds its one receive buffer.

The tap is created with pyroute2 (or an existing one is used, ``--tap NAME``), opened
through ``/dev/net/tun`` (``TUNSETIFF``, ``IFF_TAP | IFF_NO_PI``) and watched by the
serving loop, so frames are handled between ioreqs in the loop's thread.  A tap this
program created is non-persistent once opened: the kernel removes it when the fd
closes, also after privileges are dropped or if the process is killed.

Interrupts: ISA IRQ ``--irq`` (default 5) through ``set_isa_irq_level``, only for an
HVM guest.  On real Xen the domain type comes from the hypervisor (libxenctrl), else
Xenstore (``/libxl/<domid>/type``, read by ``xenstore-read``); a PVH or PV domain is
refused, and one whose type nothing can tell unless ``--assume-hvm`` is given
(``xendmop.runtime.dm_program.require_hvm``, as the other examples): interrupt DMOPs are never
sent to a PVH guest (an accepted ISA IRQ level change on one crashed Xen 4.17.7); use
``--no-irq`` there (the guest then polls ISR).  A mock host process's PV domain is
refused by the EINVAL its first DMOP gets.

Run it (as root: creating a tap needs CAP_NET_ADMIN):

    python examples/tapnet.py                     # mock Xen: tap xdmtap0 at 10.0.9.1/24;
                                                  # the simulated guest (10.0.9.2) ARPs the host,
                                                  # then answers ARP, ping and UDP echo (port 7)
                                                  # until Ctrl-C:  ping 10.0.9.2
    ip netns add lab; python examples/tapnet.py --netns lab   # the same inside a namespace
    python examples/tapnet.py --domid 5 --tap xdm5            # real dom0: serve HVM domain 5
    python examples/tapnet.py --domid 5 --depriv 990:990 --chroot /var/empty   # ... dropping privileges
    XENDMOP_MOCK_SOCKET=PATH python examples/tapnet.py --domid 1 --depriv 65534:65534
                                  # serve dom1 of a mock host process (xendmop mock-host --socket PATH),
                                  # whose guest is driven from yet another process (RemoteGuest)

``--depriv UID:GID`` restricts every handle to the domain and drops to those ids once
the server is up (the tap is opened before, and goes with its fd); it needs a real
dom0 or a mock host process: the in-process mock shares this process.

Once the server is up ``tapnet: serving domN ... ; Ctrl-C to stop`` goes to stdout.
Ctrl-C or SIGTERM destroys the ioreq server, removes the tap if it was created here and
exits 0 (``--help`` lists the statuses).
"""

from __future__ import annotations

import argparse
import collections
import errno
import fcntl
import ipaddress
import os
import re
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TextIO

from pyroute2 import IPRoute, NetlinkError, netns  # type: ignore[import-untyped]

from xendmop import DeviceModel
from xendmop.runtime import GuestMemory, GuestMemoryError, IoreqServer, ServeLoop, dm_program

# --- the card -------------------------------------------------------------------------------

PORT_BASE = 0xC000
PORT_COUNT = 0x40
CARD_ID = int.from_bytes(b"XTAP", "little")
REG_ID, REG_CTRL, REG_ISR, REG_IMR = 0x00, 0x04, 0x08, 0x0C
REG_MAC_LO, REG_MAC_HI = 0x10, 0x14
REG_TX_ADDR_LO, REG_TX_ADDR_HI, REG_TX_LEN, REG_TX_DOORBELL, REG_TX_STATUS = 0x18, 0x1C, 0x20, 0x24, 0x28
REG_RX_ADDR_LO, REG_RX_ADDR_HI, REG_RX_SIZE, REG_RX_LEN, REG_RX_DROPPED = 0x2C, 0x30, 0x34, 0x38, 0x3C
CTRL_RX_ENABLE = 1
ISR_RX, ISR_TX_DONE, ISR_TX_ERROR, ISR_RX_ERROR = 1, 2, 4, 8
ISR_ALL = ISR_RX | ISR_TX_DONE | ISR_TX_ERROR | ISR_RX_ERROR
TX_OK, TX_BAD_LENGTH, TX_BAD_ADDRESS, TX_TAP_ERROR = 0, 1, 2, 3
ETH_HEADER = 14
MTU = 1500
MAX_FRAME = MTU + ETH_HEADER
RX_QUEUE = 64
#: frames taken from the tap per wake-up, so that ioreqs are not starved by a flood
RX_BATCH = 32
#: names a mock host process (``xendmop mock-host --socket PATH``) that ``--domid`` then serves
ENV_SOCKET = dm_program.ENV_SOCKET
_U32 = 0xFFFFFFFF


class TapNic:
    """The card's registers (``read``/``write`` at offsets from ``PORT_BASE``) and its tap side.

    ``fd``: a non-blocking packet fd (the tap; each read/write is one frame).
    ``set_irq(level)``: drives the interrupt line, or None for a card without one.
    ``memory``: guest RAM (the server's ``dispatcher.memory``, set once it is started).
    ``ram_limit``: bytes of guest RAM from address 0, when known; descriptors beyond it
    are refused before any mapping is tried.
    """

    def __init__(
        self,
        fd: int,
        *,
        mac: bytes = b"\x02\x58\x44\x00\x00\x01",
        set_irq: Callable[[bool], None] | None = None,
        memory: GuestMemory | None = None,
        ram_limit: int | None = None,
    ) -> None:
        if len(mac) != 6:
            raise ValueError(f"mac={mac.hex(':')}: must be 6 bytes")
        self.fd = fd
        self.mac = bytearray(mac)
        self.set_irq = set_irq
        self.memory = memory
        self.ram_limit = ram_limit
        self.ctrl = self.isr = self.imr = 0
        self.tx_addr = self.tx_len = self.tx_status = 0
        self.rx_addr = self.rx_size = self.rx_len = 0
        self.rx_dropped = 0
        self.tx_frames = self.rx_frames = 0
        self.queue: collections.deque[bytes] = collections.deque()
        self._line = False

    # --- registers (the dispatch core calls these, in the serving loop's thread) -------------

    def read(self, addr: int, size: int) -> int:
        if size != 4 or addr % 4:
            return (1 << (8 * size)) - 1
        regs = {
            REG_ID: CARD_ID,
            REG_CTRL: self.ctrl,
            REG_ISR: self.isr,
            REG_IMR: self.imr,
            REG_MAC_LO: int.from_bytes(self.mac[:4], "little"),
            REG_MAC_HI: int.from_bytes(self.mac[4:], "little"),
            REG_TX_ADDR_LO: self.tx_addr & _U32,
            REG_TX_ADDR_HI: self.tx_addr >> 32,
            REG_TX_LEN: self.tx_len,
            REG_TX_DOORBELL: 0,
            REG_TX_STATUS: self.tx_status,
            REG_RX_ADDR_LO: self.rx_addr & _U32,
            REG_RX_ADDR_HI: self.rx_addr >> 32,
            REG_RX_SIZE: self.rx_size,
            REG_RX_LEN: self.rx_len,
            REG_RX_DROPPED: self.rx_dropped & _U32,
        }
        return regs.get(addr, _U32)

    def write(self, addr: int, size: int, value: int) -> None:
        if size != 4 or addr % 4:
            return
        if addr == REG_CTRL:
            self.ctrl = value & CTRL_RX_ENABLE
            if not self.ctrl & CTRL_RX_ENABLE:
                self.rx_dropped += len(self.queue)
                self.queue.clear()
        elif addr == REG_ISR:
            self.isr &= ~value
        elif addr == REG_IMR:
            self.imr = value & ISR_ALL
        elif addr == REG_MAC_LO:
            self.mac[:4] = value.to_bytes(4, "little")
        elif addr == REG_MAC_HI:
            self.mac[4:] = (value & 0xFFFF).to_bytes(2, "little")
        elif addr == REG_TX_ADDR_LO:
            self.tx_addr = (self.tx_addr & ~_U32) | value
        elif addr == REG_TX_ADDR_HI:
            self.tx_addr = (self.tx_addr & _U32) | (value << 32)
        elif addr == REG_TX_LEN:
            self.tx_len = value
        elif addr == REG_TX_DOORBELL:
            self._transmit()
        elif addr == REG_RX_ADDR_LO:
            self.rx_addr = (self.rx_addr & ~_U32) | value
        elif addr == REG_RX_ADDR_HI:
            self.rx_addr = (self.rx_addr & _U32) | (value << 32)
        elif addr == REG_RX_SIZE:
            self.rx_size = value
        elif addr == REG_RX_LEN:
            self.rx_len = 0  # the guest gives the buffer back
            self._deliver()
        self._update_line()

    # --- transmit --------------------------------------------------------------------------

    def _in_ram(self, gpa: int, length: int) -> bool:
        return self.ram_limit is None or gpa + length <= self.ram_limit

    def _transmit(self) -> None:
        gpa, length = self.tx_addr, self.tx_len
        if not ETH_HEADER <= length <= MAX_FRAME:
            self._tx_done(TX_BAD_LENGTH)
            return
        if self.memory is None or not self._in_ram(gpa, length):
            self._tx_done(TX_BAD_ADDRESS)
            return
        try:
            frame = self.memory.read(gpa, length)
        except GuestMemoryError:
            self._tx_done(TX_BAD_ADDRESS)
            return
        try:
            os.write(self.fd, frame)
        except OSError:  # link down, queue full: the frame is lost, as on a wire
            self._tx_done(TX_TAP_ERROR)
            return
        self.tx_frames += 1
        self._tx_done(TX_OK)

    def _tx_done(self, status: int) -> None:
        self.tx_status = status
        self.isr |= ISR_TX_DONE if status == TX_OK else ISR_TX_ERROR

    # --- receive ---------------------------------------------------------------------------

    def _accepts(self, frame: bytes) -> bool:
        dst = frame[:6]
        return dst == self.mac or bool(dst[0] & 1)  # ours, broadcast or multicast

    def on_tap_readable(self) -> None:
        """The serving loop saw the tap readable: queue what arrived, fill the free buffer."""
        for _ in range(RX_BATCH):
            try:
                frame = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EIO:  # tap not up yet / going away
                    break
                raise
            if not frame:
                break
            if len(frame) < ETH_HEADER or not self._accepts(frame):
                continue  # not for this card: a NIC's address filter drops it silently
            if not self.ctrl & CTRL_RX_ENABLE or len(self.queue) >= RX_QUEUE:
                self.rx_dropped += 1
                continue
            self.queue.append(frame)
        self._deliver()
        self._update_line()

    def _deliver(self) -> None:
        """Copy queued frames into the guest's buffer while it is free."""
        while self.rx_len == 0 and self.queue:
            frame = self.queue.popleft()
            gpa, length = self.rx_addr, len(frame)
            if length > self.rx_size or length > MAX_FRAME or self.memory is None or not self._in_ram(gpa, length):
                self._rx_error()
                continue
            try:
                self.memory.write(gpa, frame)
            except GuestMemoryError:
                self._rx_error()
                continue
            self.rx_len = length
            self.rx_frames += 1
            self.isr |= ISR_RX

    def _rx_error(self) -> None:
        self.rx_dropped += 1
        self.isr |= ISR_RX_ERROR

    def _update_line(self) -> None:
        level = bool(self.isr & self.imr)
        if level != self._line and self.set_irq is not None:
            self.set_irq(level)
        self._line = level


# --- the tap --------------------------------------------------------------------------------

TUN_PATH = "/dev/net/tun"
# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16


class TapError(ValueError):
    """A bad tap name or address (names the option and the value)."""


def check_ifname(name: str) -> str:
    """Linux's ``dev_valid_name`` (net/core/dev.c): 1..15 bytes, not "." or "..", no '/', ':' or space."""
    raw = name.encode()
    if not 0 < len(raw) < IFNAMSIZ or name in (".", "..") or re.search(r"[/:\s]", name):
        raise TapError(f"tap={name!r}: not a valid interface name (1..{IFNAMSIZ - 1} bytes, no '/', ':' or space)")
    return name


class Tap:
    """A tap interface opened for frames; ``Tap.open(name, address=...)`` creates it if missing.

    ``fd`` is non-blocking, one frame per read/write (``IFF_NO_PI``).  ``created``: this
    process made the interface; it was then made non-persistent, so closing ``fd``
    removes it.
    """

    def __init__(self, name: str, fd: int, index: int, created: bool) -> None:
        self.name, self.fd, self.index, self.created = name, fd, index, created

    @classmethod
    def open(cls, name: str, *, address: str | None = None) -> Tap:
        """Open (creating if missing) the tap ``name``.  Raises ``OSError``, also for what netlink
        refuses (pyroute2's ``NetlinkError``, e.g. EPERM without CAP_NET_ADMIN)."""
        try:
            return cls._open(name, address)
        except NetlinkError as e:
            code = e.code if isinstance(e.code, int) and e.code > 0 else errno.EIO
            raise OSError(code, f"netlink: {os.strerror(code)}") from None

    @classmethod
    def _open(cls, name: str, address: str | None) -> Tap:
        check_ifname(name)
        iface = ipaddress.ip_interface(address) if address else None
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            created = not found
            if created:
                ipr.link("add", ifname=name, kind="tuntap", mode="tap")
            index = ipr.link_lookup(ifname=name)[0]
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            if created:
                _delete_link(index)
            raise
        tap = cls(name, fd, index, created)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
            if created:
                fcntl.ioctl(fd, TUNSETPERSIST, 0)  # from now on the interface lives as long as the fd
            with IPRoute() as ipr:
                if created and iface is not None:
                    ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
                ipr.link("set", index=index, state="up")
        except BaseException:
            tap.close()
            if created:
                try:
                    _delete_link(index)  # still persistent if TUNSETPERSIST was not reached
                except Exception:
                    pass  # already gone with the fd
            raise
        return tap

    @property
    def exists(self) -> bool:
        with IPRoute() as ipr:
            return bool(ipr.link_lookup(ifname=self.name))

    def close(self) -> None:
        """Close the fd (idempotent); a tap created here disappears with it."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _delete_link(index: int) -> None:
    with IPRoute() as ipr:
        ipr.link("del", index=index)


def enter_netns(name: str) -> None:
    """Move this process (it must have no other threads yet) into network namespace ``name``."""
    if name not in netns.listnetns():
        raise TapError(f"netns={name!r}: no such network namespace")
    netns.setns(name, flags=0)


# --- the simulated guest's driver (mock only) ----------------------------------------------------

TX_BUFFER = 0x10000
RX_BUFFER = 0x20000
RX_BUFFER_SIZE = 2048
ETH_P_ARP, ETH_P_IP = 0x0806, 0x0800


class GuestDriver:
    """What a guest kernel's driver for the card does, issued by a ``SimGuest``'s vCPU.

    ``line()`` reports the interrupt line (the mock's vIOAPIC input); the driver waits
    for it as a guest waits for its interrupt handler to run.  Without a line
    (``None``: a card without interrupt) it polls ISR.
    """

    def __init__(self, guest: Any, line: Callable[[], bool] | None, base: int = PORT_BASE) -> None:
        self.guest, self.line, self.base = guest, line, base
        self.imr = ISR_RX | ISR_RX_ERROR
        self.interrupts = 0  # receive interrupts seen

    def out(self, reg: int, value: int) -> None:
        self.guest.outl(self.base + reg, value)

    def inp(self, reg: int) -> int:
        return int(self.guest.inl(self.base + reg))

    def init(self, mac: bytes) -> None:
        if self.inp(REG_ID) != CARD_ID:
            raise RuntimeError(f"no tapnet card at port {self.base:#x}")
        self.out(REG_MAC_LO, int.from_bytes(mac[:4], "little"))
        self.out(REG_MAC_HI, int.from_bytes(mac[4:], "little"))
        self.out(REG_RX_ADDR_LO, RX_BUFFER)
        self.out(REG_RX_ADDR_HI, 0)
        self.out(REG_RX_SIZE, RX_BUFFER_SIZE)
        self.out(REG_IMR, self.imr)
        self.out(REG_CTRL, CTRL_RX_ENABLE)

    def send(self, frame: bytes, gpa: int = TX_BUFFER) -> int:
        """Send one frame from guest RAM at ``gpa``; return TX_STATUS."""
        self.guest.write_ram(gpa, frame)
        return self.send_descriptor(gpa, len(frame))

    def send_descriptor(self, gpa: int, length: int) -> int:
        self.out(REG_TX_ADDR_LO, gpa & _U32)
        self.out(REG_TX_ADDR_HI, gpa >> 32)
        self.out(REG_TX_LEN, length)
        self.out(REG_TX_DOORBELL, 1)
        status = self.inp(REG_TX_STATUS)
        self.out(REG_ISR, ISR_TX_DONE | ISR_TX_ERROR)
        return status

    def wait_interrupt(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not (self.line() if self.line is not None else self.inp(REG_ISR) & self.imr):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        return True

    def receive(self, timeout: float) -> bytes | None:
        """Wait for the receive interrupt; take the frame, acknowledge, free the buffer."""
        if not self.wait_interrupt(timeout):
            return None
        self.interrupts += 1
        isr = self.inp(REG_ISR)
        frame = None
        if isr & ISR_RX:
            length = self.inp(REG_RX_LEN)
            if 0 < length <= RX_BUFFER_SIZE:
                frame = self.guest.read_ram(RX_BUFFER, length)
        self.out(REG_ISR, isr & (ISR_RX | ISR_RX_ERROR))  # acknowledge: the line drops
        if isr & ISR_RX:
            self.out(REG_RX_LEN, 0)  # buffer back to the card
        return frame


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def ip_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``; 0 over data that carries a correct one."""
    if len(data) % 2:
        data += b"\0"
    total = sum(int(word) for word in struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def arp_frame(op: int, src_mac: bytes, src_ip: bytes, dst_mac: bytes, dst_ip: bytes) -> bytes:
    """An Ethernet ARP request (op 1, broadcast) or reply (op 2) for IPv4."""
    eth_dst = b"\xff" * 6 if op == 1 else dst_mac
    arp = struct.pack(
        "!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, op, src_mac, src_ip, dst_mac if op == 2 else bytes(6), dst_ip
    )
    return eth_dst + src_mac + struct.pack("!H", ETH_P_ARP) + arp


def answer(frame: bytes, mac: bytes, ip: bytes) -> bytes | None:
    """The guest's tiny network stack: answer ARP for ``ip``, ICMP echo, UDP echo (port 7)."""
    if len(frame) < ETH_HEADER:
        return None
    ethertype = struct.unpack("!H", frame[12:14])[0]
    src_mac = frame[6:12]
    if ethertype == ETH_P_ARP and len(frame) >= 42:
        op, sha, spa, tpa = struct.unpack("!6xH6s4s6x4s", frame[14:42])
        return arp_frame(2, mac, ip, sha, spa) if op == 1 and tpa == ip else None
    if ethertype != ETH_P_IP or len(frame) < 34 or frame[14] >> 4 != 4:
        return None
    ihl = (frame[14] & 0xF) * 4
    total = struct.unpack("!H", frame[16:18])[0]
    if ihl < 20 or total < ihl or ETH_HEADER + total > len(frame) or frame[30:34] != ip:
        return None
    header, payload = bytearray(frame[14 : 14 + ihl]), bytearray(frame[14 + ihl : 14 + total])
    proto = header[9]
    if proto == 1 and len(payload) >= 8 and payload[0] == 8:  # ICMP echo request
        payload[0] = 0
        payload[2:4] = b"\0\0"
        payload[2:4] = struct.pack("!H", ip_checksum(bytes(payload)))
    elif proto == 17 and len(payload) >= 8 and payload[2:4] == b"\x00\x07":  # UDP echo
        payload[0:2], payload[2:4] = payload[2:4], payload[0:2]
        payload[6:8] = b"\0\0"  # no UDP checksum: allowed for IPv4
    else:
        return None
    header[12:16], header[16:20] = header[16:20], header[12:16]
    header[8] = 64
    header[10:12] = b"\0\0"
    header[10:12] = struct.pack("!H", ip_checksum(bytes(header)))
    return src_mac + mac + frame[12:14] + bytes(header) + bytes(payload)


# --- serving on the mock -----------------------------------------------------------------------


@dataclass
class MockNetwork:
    """An HVM domain on a mock Xen with the card at ``PORT_BASE`` served by ``loop``.

    ``create(fd, irq=5)``: a new mock host with a 4 MiB domain (``hvm=False`` makes it
    PV, for which interrupts are refused: ``dm_program.NotHvmError``), the card on ``fd``,
    raising ``irq`` (None: no interrupt, the guest polls).  Used as a context manager:
    the loop runs in a thread (or call ``loop.run()`` yourself and leave ``threaded``
    False); leaving tears everything down and checks that no ioreq server was left in Xen.
    """

    xen: Any
    domid: int
    dm: DeviceModel
    server: IoreqServer
    nic: TapNic
    loop: ServeLoop
    irq: int | None
    threaded: bool = True
    _thread: threading.Thread | None = None

    @classmethod
    def create(cls, fd: int, *, irq: int | None = 5, threaded: bool = True, hvm: bool = True) -> MockNetwork:
        from xendmop.mock import MockXen

        xen = MockXen()
        try:
            domid = xen.create_domain(vcpus=1, hvm=hvm, memory_mb=4)
            if irq is not None:  # ISA IRQ level changes for an HVM guest only
                dm_program.check_hvm(domid, "hvm" if xen.domain(domid).hvm else "pv")
            dm = DeviceModel.open("mock", xen=xen)
        except BaseException:
            xen.close()
            raise
        nic = TapNic(fd, ram_limit=xen.domain(domid).nr_pages * 4096)
        if irq is not None:
            nic.set_irq = lambda level: dm.set_isa_irq_level(domid, irq, int(level))
        server = IoreqServer(dm, domid, opener=xen.open_device)
        try:
            server.add_port_range(PORT_BASE, PORT_BASE + PORT_COUNT - 1, nic, "tapnet")
            server.start()
        except BaseException:
            server.close()
            dm.close()
            xen.close()
            raise
        nic.memory = server.dispatcher.memory
        loop = ServeLoop(server)
        loop.add_reader(fd, nic.on_tap_readable)
        return cls(xen, domid, dm, server, nic, loop, irq, threaded)

    def line(self) -> bool:
        """The card's interrupt line as the guest's vIOAPIC sees it (False without an IRQ)."""
        return self.irq is not None and bool(self.xen.domain(self.domid).gsi_level(self.irq))

    def guest(self, timeout: float = 5.0) -> GuestDriver:
        from xendmop.mock.simguest import SimGuest

        return GuestDriver(SimGuest(self.xen, self.domid, timeout=timeout), self.line if self.irq is not None else None)

    def __enter__(self) -> MockNetwork:
        if self.threaded:
            self._thread = dm_program.start_daemon_thread(lambda: self.loop.run(handle_signals=False), "tapnet-serve")
        return self

    def close(self) -> None:
        """Stop the loop (which destroys the server), then close the handle and the host."""
        if self._thread is not None:  # a loop run by the caller has returned already
            self.loop.stop()
            self._thread.join(10)
        self.server.close()  # idempotent; covers a loop that never ran
        left = self.xen.domain(self.domid).snapshot()["servers"]
        self.dm.close()
        self.xen.close()
        if any(s is not None for s in left):
            raise RuntimeError(f"ioreq server left behind in dom{self.domid}: {left}")

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def run_guest(
    net: MockNetwork,
    stop: threading.Event,
    out: TextIO,
    *,
    mac: bytes,
    ip: str,
    host_ip: str,
) -> int:
    """The simulated guest: ARP the host, then answer ARP/ping/UDP echo until ``stop``.
    Returns how many frames it answered."""
    drv = net.guest()
    own, host = ipaddress.IPv4Address(ip).packed, ipaddress.IPv4Address(host_ip).packed
    drv.init(mac)
    drv.send(arp_frame(1, mac, own, bytes(6), host))
    answered = 0
    while not stop.is_set():
        frame = drv.receive(0.2)
        if frame is None:
            continue
        if frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02" and frame[28:32] == host:
            out.write(f"guest {ip}: host {host_ip} is at {frame[22:28].hex(':')}\n")
            out.flush()
        reply = answer(frame, mac, own)
        if reply is not None and not stop.is_set():
            drv.send(reply)
            answered += 1
    return answered


def serve_mock(tap: Tap, out: TextIO, *, irq: int | None, ip: str, host_ip: str, mac: bytes) -> int:
    """Serve a simulated guest on the tap until SIGINT/SIGTERM; the loop runs in this thread."""
    stop = threading.Event()
    with MockNetwork.create(tap.fd, irq=irq, threaded=False) as net:
        out.write(f"tapnet: serving dom{net.domid} (mock) on tap {tap.name}; guest {ip}; Ctrl-C to stop\n")
        out.flush()
        run = dm_program.run_guest_while_serving(
            net.loop,
            lambda: run_guest(net, stop, out, mac=mac, ip=ip, host_ip=host_ip),
            hold=True,  # the guest answers until the loop has ended (``stop``)
            stopping=stop,
        )
    out.write(
        f"{dm_program.stopped_line('tapnet', run.signal)}; "
        f"{net.nic.tx_frames} frames sent, {net.nic.rx_frames} received, "
        f"{run.result or 0} answered\n"
    )
    return 0


# --- the command line ----------------------------------------------------------------------------


def _ip_interface(text: str) -> str:
    try:
        return str(ipaddress.IPv4Interface(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address/prefix") from None


def _ipv4(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address") from None


def _ifname(text: str) -> str:
    try:
        return check_ifname(text)
    except TapError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _isa_irq(text: str) -> int:
    try:
        irq = int(text, 0)
    except ValueError:
        irq = -1
    if not 1 <= irq <= 15:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an ISA IRQ 1..15")
    return irq


def _megabytes(text: str) -> int:
    try:
        mb = int(text, 0)
    except ValueError:
        mb = 0
    if not 0 < mb < 1 << 32:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a size in MiB, 1..{(1 << 32) - 1}")
    return mb


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0], epilog=dm_program.EXIT_STATUS_HELP)
    dm_program.add_arguments(p, assume_hvm=True)
    p.add_argument("--tap", type=_ifname, default="xdmtap0", help="tap interface (created if missing)")
    p.add_argument("--netns", help="network namespace to run in (must exist)")
    p.add_argument("--host-addr", type=_ip_interface, default="10.0.9.1/24", help="address of a created tap")
    p.add_argument("--guest-addr", type=_ipv4, default="10.0.9.2", help="the simulated guest's address (mock)")
    p.add_argument("--mac", default="02:58:44:00:00:01", help="the simulated guest's MAC (mock)")
    p.add_argument("--irq", type=_isa_irq, default=5, help="ISA IRQ of the card (HVM guests only)")
    p.add_argument("--no-irq", action="store_true", help="no interrupt: the guest polls ISR")
    p.add_argument("--guest-ram-mb", type=_megabytes, help="real Xen: guest RAM size; descriptors above it are refused")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args, target = dm_program.parse(p, argv)
    try:
        mac = _mac(args.mac)
        if len(mac) != 6:
            raise ValueError
    except ValueError:
        p.error(f"--mac {args.mac!r}: not a MAC address (six hex bytes)")
    irq = None if args.no_irq else args.irq
    if target.where is dm_program.Where.XEN and irq is not None:  # refused before anything is opened, the tap too
        try:
            dm_program.require_hvm(args.domid, assume_hvm=args.assume_hvm)
        except dm_program.NotHvmError as e:
            said = dm_program.not_xen_host(e) if e.kind is None else e
            p.error(str(said) if said is not e else f"{e}; or use --no-irq")
    if args.netns:
        try:
            enter_netns(args.netns)
        except TapError as e:
            p.error(str(e))
    try:
        tap = Tap.open(args.tap, address=args.host_addr)
    except OSError as e:
        p.exit(1, f"tapnet: cannot open tap {args.tap!r}: {e} (needs root and {TUN_PATH})\n")
    with tap:
        if target.where is dm_program.Where.MOCK:
            host_ip = args.host_addr.split("/")[0]
            code = serve_mock(tap, sys.stdout, irq=irq, ip=args.guest_addr, host_ip=host_ip, mac=mac)
        else:
            code = dm_program.run_target(
                target,
                lambda connection: serve_domain(connection, tap, irq=irq, ram_mb=args.guest_ram_mb, where=target),
                name="tapnet",
                parser=p,
            )
    if tap.created:
        print(f"tapnet: tap {tap.name} {'still exists' if tap.exists else 'removed'}")
    return code


def serve_domain(
    connection: dm_program.Connection, tap: Tap, *, irq: int | None, ram_mb: int | None, where: dm_program.Target
) -> int:
    """Serve the connection's domain until SIGINT/SIGTERM; the server is destroyed on the way out.

    With ``irq`` the domain must be HVM: a mock host's PV domain is refused here (its DMOPs
    get EINVAL), a real one was checked before the tap was opened."""
    if irq is not None:
        connection.require_hvm()
    nic = TapNic(tap.fd, ram_limit=ram_mb * (1 << 20) if ram_mb else None)
    if irq is not None:
        nic.set_irq = lambda level: connection.dm.set_isa_irq_level(connection.domid, irq, int(level))
    server = connection.ioreq_server()
    server.add_port_range(PORT_BASE, PORT_BASE + PORT_COUNT - 1, nic, "tapnet")
    loop = ServeLoop(server)
    loop.add_reader(tap.fd, nic.on_tap_readable)

    def ready() -> None:
        nic.memory = server.dispatcher.memory
        print(
            f"tapnet: serving dom{connection.domid} of {where.describe()} on tap {tap.name}, "
            f"ports {PORT_BASE:#x}+{PORT_COUNT:#x}; Ctrl-C to stop",
            flush=True,
        )

    signum = dm_program.serve_until_signal(loop, on_ready=ready)  # until SIGINT/SIGTERM; closes the server
    print(f"{dm_program.stopped_line('tapnet', signum)}; {nic.tx_frames} frames sent, {nic.rx_frames} received")
    return 0


if __name__ == "__main__":
    sys.exit(main())
