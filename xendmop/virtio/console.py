"""virtio-console (spec 5.3) with one port and no multiport: the guest's ``hvc0``.

Queue 0 (receiveq) carries host input to the guest in buffers the guest made device-
writable; queue 1 (transmitq) carries the guest's output.  The host side is two file
descriptors: ``in_fd`` (read when the serving loop says it is readable; a terminal, a pty's
master, a pipe) and ``out_fd`` (written; made non-blocking, so a reader that stops reading
loses output, counted in ``dropped``, instead of stopping the device model).  Input waits
in a buffer of at most ``max_pending`` bytes while the guest has no receive buffer; once it
is full the loop stops reading ``in_fd`` until the guest takes some.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import Iterator

from ..runtime import ServeLoop
from ..runtime.dispatch import RateLimitedLog
from .device import VirtioDevice, check_count
from .spec import VIRTIO_ID_CONSOLE
from .virtqueue import Virtqueue

__all__ = ["VirtioConsole"]

log = logging.getLogger("xendmop.virtio.console")

VIRTIO_CONSOLE_F_SIZE = 0
RECEIVEQ, TRANSMITQ = 0, 1
CHUNK = 4096


class VirtioConsole(VirtioDevice):
    """One console port on ``in_fd``/``out_fd`` (None: no input).  ``size``: (cols, rows)
    offered with VIRTIO_CONSOLE_F_SIZE, or None."""

    device_type = VIRTIO_ID_CONSOLE

    def __init__(
        self,
        in_fd: int | None,
        out_fd: int,
        *,
        size: tuple[int, int] | None = (80, 25),
        queue_size: int = 64,
        max_pending: int = 1 << 16,
    ) -> None:
        super().__init__()
        self.max_pending = check_count("max_pending", max_pending, 1, 1 << 24)
        self.in_fd, self.out_fd = in_fd, out_fd
        os.set_blocking(out_fd, False)
        self.size = size
        self.features = 1 << VIRTIO_CONSOLE_F_SIZE if size is not None else 0
        self.queue_sizes = (queue_size, queue_size)
        self.pending = bytearray()
        self.eof = False
        self.dropped = 0  # output bytes out_fd would not take
        self.written = 0  # output bytes written to out_fd
        self.loop: ServeLoop | None = None
        self._reading = False
        self._warn = RateLimitedLog(log)

    def config(self) -> bytes:
        cols, rows = self.size or (0, 0)
        return struct.pack("<HHII", cols, rows, 1, 0)  # cols, rows, max_nr_ports, emerg_write

    def write_config(self, offset: int, size: int, value: int) -> None:
        if offset == 8 and size == 4:  # emerg_write: one character, even before DRIVER_OK (5.3.4)
            self._output(bytes([value & 0xFF]))

    # --- the host side ----------------------------------------------------------------------------

    def attach(self, loop: ServeLoop) -> None:
        """Read ``in_fd`` from ``loop`` (call before it runs)."""
        self.loop = loop
        self._watch(True)

    def _watch(self, on: bool) -> None:
        if self.loop is None or self.in_fd is None or self.eof or on == self._reading:
            return
        if on:
            self.loop.add_reader(self.in_fd, self.on_input)
        else:
            self.loop.remove_reader(self.in_fd)
        self._reading = on

    def on_input(self) -> None:
        """``in_fd`` is readable: take what fits the pending buffer and give the guest what it can take."""
        if self.in_fd is None:
            return
        room = self.max_pending - len(self.pending)
        try:
            data = os.read(self.in_fd, min(CHUNK, room)) if room > 0 else b""
        except BlockingIOError:
            return
        except OSError as e:  # EIO: a pty whose other side closed; anything else: the fd is broken
            if e.errno != errno.EIO:
                self._warn(logging.WARNING, "console input", "virtio-console: input: %s; no more input", e)
            data = b""
        if not data and room > 0:
            self._watch(False)
            self.eof = True
            return
        self.pending += data
        if len(self.pending) >= self.max_pending:
            self._watch(False)
        if self.transport is not None:
            self.transport.kick(RECEIVEQ)

    def _output(self, data: bytes) -> None:
        try:
            n = os.write(self.out_fd, data)
        except BlockingIOError:
            n = 0
        except OSError as e:
            self._warn(logging.WARNING, "console output", "virtio-console: output: %s", e)
            n = 0
        self.written += n
        if n < len(data):
            self.dropped += len(data) - n

    # --- queues ---------------------------------------------------------------------------------------

    def queue_notify(self, vq: Virtqueue) -> None:
        memory = self.transport.memory() if self.transport is not None else None
        if memory is None:
            return
        if vq.index == TRANSMITQ:
            vq.process(memory, lambda chain: self._transmit(chain.iter_read(CHUNK)))
            return
        while True:
            while self.pending:  # receiveq: fill the guest's buffers while there is input
                chain = vq.pop(memory)
                if chain is None:
                    break
                n = min(len(self.pending), chain.writable_len)
                chain.write(bytes(self.pending[:n]))
                del self.pending[:n]
                vq.push(memory, chain.head, n)
            if not vq.arm(memory) or not self.pending:
                break
        if len(self.pending) < self.max_pending:
            self._watch(True)

    def _transmit(self, pieces: Iterator[bytes]) -> int:
        for data in pieces:
            self._output(data)
        return 0  # nothing written into the guest's buffers

    def reset(self) -> None:
        """Input not yet delivered is kept for the driver that comes next (a reset is what a
        driver's probe starts with: what was typed before it loaded is not lost)."""
