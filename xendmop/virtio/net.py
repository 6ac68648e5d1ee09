"""virtio-net (spec 5.1): one receive and one transmit queue over a packet fd (a tap).

No offloads are offered, so every frame is whole and checksummed, and each buffer starts
with the 12-byte ``virtio_net_hdr_v1`` (VIRTIO_F_VERSION_1 makes ``num_buffers`` part of
it); without VIRTIO_NET_F_MRG_RXBUF one receive buffer holds one frame.  Offered:
VIRTIO_NET_F_MAC (the guest's address) and VIRTIO_NET_F_STATUS (link up).

The host side is a non-blocking fd with one frame per read and write (a tap opened with
``IFF_TAP | IFF_NO_PI``, or a ``SOCK_SEQPACKET`` socket in tests).  Frames from it wait in a
bounded queue (``max_frames``) while the guest has no receive buffer; past that they are
dropped and counted, and so is a frame too long for the buffer the guest gave.  A frame the
guest sends that is shorter than an Ethernet header or longer than ``MAX_FRAME`` is dropped.
"""

from __future__ import annotations

import collections
import logging
import os
import struct
from functools import partial

from ..runtime import ServeLoop
from ..runtime.dispatch import GuestMemory, RateLimitedLog
from .device import VirtioDevice, check_count
from .spec import VIRTIO_ID_NET
from .virtqueue import Chain, Virtqueue

__all__ = ["VirtioNet"]

log = logging.getLogger("xendmop.virtio.net")

VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1
RECEIVEQ, TRANSMITQ = 0, 1
#: ``struct virtio_net_hdr_v1``: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
NET_HDR = struct.Struct("<BBHHHHH")
ETH_HLEN = 14
MAX_FRAME = 65535 + ETH_HLEN  # what a tap may carry without GSO


class VirtioNet(VirtioDevice):
    """A NIC with MAC ``mac`` on ``fd`` (not closed here)."""

    device_type = VIRTIO_ID_NET

    def __init__(self, fd: int, mac: bytes, *, queue_size: int = 256, max_frames: int = 256) -> None:
        super().__init__()
        if len(mac) != 6 or mac[0] & 1:
            raise ValueError(f"mac={mac.hex(':')}: must be 6 bytes, a unicast address")
        self.max_frames = check_count("max_frames", max_frames, 1, 1 << 16)
        self.fd = fd
        os.set_blocking(fd, False)
        self.mac = mac
        self.queue_sizes = (queue_size, queue_size)
        self.features = 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS
        self.rx_frames: collections.deque[bytes] = collections.deque()
        self.stats = collections.Counter[str]()
        self.loop: ServeLoop | None = None
        self._reading = False
        self._held: Chain | None = None  # a receive buffer taken from the ring, waiting for a frame that fits
        self._looked = 0  # stats["tx"] when the tap was last read after a transmit
        self._answering = True  # whether to read the tap after a transmit (see _transmit_and_look)
        self._warn = RateLimitedLog(log)

    def config(self) -> bytes:
        return self.mac + struct.pack("<HHH", VIRTIO_NET_S_LINK_UP, 1, 1500)  # status, max pairs, mtu

    # --- the host side ------------------------------------------------------------------------------

    def attach(self, loop: ServeLoop) -> None:
        self.loop = loop
        self._watch(True)

    def _watch(self, on: bool) -> None:
        if self.loop is None or on == self._reading:
            return
        if on:
            self.loop.add_reader(self.fd, self.on_readable)
        else:
            self.loop.remove_reader(self.fd)
        self._reading = on

    def on_readable(self) -> None:
        """Frames from the tap: queue what fits (at most 64 per call), then fill the guest's buffers."""
        if self._read_tap():
            self._answering = True  # the host talks: worth a look after the next transmit too
        if self.transport is not None and self.rx_frames:
            self.transport.kick(RECEIVEQ)

    def _read_tap(self) -> int:
        """Read up to 64 frames into ``rx_frames``; how many were read (dropped ones included)."""
        for n in range(64):  # n: how many were read before this try
            try:
                frame = os.read(self.fd, MAX_FRAME)
            except BlockingIOError:
                return n
            except OSError as e:  # the tap went away (EBADFD) or broke: stop reading it, keep serving
                self._warn(logging.WARNING, "rx error", "virtio-net: reading the tap: %s; no more input", e)
                self._watch(False)
                return n
            if not frame:  # the other end closed (a packet socket's peer; a tap never reads 0)
                self._warn(logging.WARNING, "rx end", "virtio-net: the host side closed; no more input")
                self._watch(False)
                return n
            if len(self.rx_frames) >= self.max_frames:
                self.stats["rx dropped: queue full"] += 1
                continue
            self.rx_frames.append(frame)
        return 64

    # --- queues -----------------------------------------------------------------------------------------

    def queue_notify(self, vq: Virtqueue) -> None:
        memory = self.transport.memory() if self.transport is not None else None
        if memory is None:
            return
        if vq.index == TRANSMITQ:
            vq.process(memory, self._transmit if not self._reading else partial(self._transmit_and_look, vq, memory))
            return
        try:
            self._receive(vq, memory)
        finally:
            vq.publish_used(memory)  # the frames delivered move the used index once

    def _receive(self, vq: Virtqueue, memory: GuestMemory) -> None:
        while True:
            while self.rx_frames:
                chain, self._held = self._held or vq.pop(memory), None
                if chain is None:
                    break
                while self.rx_frames:  # a frame too long for this buffer is dropped; the buffer takes the next
                    frame = self.rx_frames.popleft()
                    if NET_HDR.size + len(frame) <= chain.writable_len:
                        chain.write(NET_HDR.pack(0, 0, 0, 0, 0, 0, 1) + frame)
                        self.stats["rx"] += 1
                        break
                    self.stats["rx dropped: buffer too small"] += 1
                if not chain.written:
                    self._held = chain  # kept for the next frame, not given back empty
                    break
                vq.push(memory, chain.head, chain.written, publish=False)
            if not vq.arm(memory) or not self.rx_frames:
                return

    def _transmit_and_look(self, vq: Virtqueue, memory: GuestMemory, chain: Chain) -> int:
        """``_transmit``, and after the batch's last frame, the tap read at once: a host that
        answers within the write (the stack answers a ping or an ARP request inside it) has
        its answer in the receive queue, and its interrupt sent, before the transmit queue's
        completion interrupt, and without a round of the loop.  A look that finds nothing
        stops the looking (a one-way stream would pay a read per batch) until the host sends
        a frame again."""
        written = self._transmit(chain)
        if self._answering and self.stats["tx"] != self._looked and not vq.pending(memory):
            self._looked = self.stats["tx"]
            self._answering = self._read_tap() > 0
            if self.rx_frames and self.transport is not None:
                self.transport.kick(RECEIVEQ)
        return written

    def _transmit(self, chain: Chain) -> int:
        size = chain.readable_len
        if not NET_HDR.size + ETH_HLEN <= size <= NET_HDR.size + MAX_FRAME:
            self.stats["tx dropped: bad length"] += 1
            self._warn(logging.WARNING, "tx length", "virtio-net: dropped a %d-byte transmit buffer", size)
            return 0
        # No offload was offered, so the header asks for nothing (5.1.6.2): the frame after it
        # goes to the tap as it lies in guest RAM, one writev.
        try:
            chain.send_to(self.fd, NET_HDR.size)
            self.stats["tx"] += 1
        except BlockingIOError:
            self.stats["tx dropped: host busy"] += 1
        except OSError as e:
            self.stats["tx dropped: host error"] += 1
            self._warn(logging.WARNING, "tx error", "virtio-net: the tap refused a frame: %s", e)
        return 0

    def reset(self) -> None:
        self.rx_frames.clear()
        self._held = None
