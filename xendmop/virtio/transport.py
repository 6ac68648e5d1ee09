"""``VirtioTransport``: what every virtio transport does, whichever bus the driver finds it on.

Feature negotiation (spec 3.1.1), device status and reset (2.1, 2.4), queue setup checks
(2.7: power-of-two sizes, ring alignment), serving a notified queue (``kick``, or later from
a ``ServeLoop`` once attached), used-buffer and configuration-change interrupts as the
driver asked for them (2.7.7, 2.7.10), and DEVICE_NEEDS_RESET when the driver broke a rule
(2.1.2).  A transport subclass maps its registers onto these (``pci.VirtioPci``: config
space, capabilities and MSI-X; ``mmio.VirtioMmio``: the register block of 4.2.2 and one
interrupt line) and says how an interrupt goes out (``_signal``).
"""

from __future__ import annotations

import abc
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..runtime.dispatch import GuestMemory, RateLimitedLog
from .device import VirtioDevice
from .spec import (
    AVAIL_ALIGN,
    DESC_ALIGN,
    ISR_CONFIG,
    ISR_QUEUE,
    MAX_QUEUE_SIZE,
    USED_ALIGN,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_MSI_NO_VECTOR,
    Status,
    avail_size,
    desc_table_size,
    used_size,
)
from .virtqueue import Virtqueue, VirtqueueError

if TYPE_CHECKING:
    from ..runtime import ServeLoop

__all__ = ["VirtioTransport"]

log = logging.getLogger("xendmop.virtio")

_U32 = 0xFFFFFFFF


class VirtioTransport(abc.ABC):
    """The transport-independent half of a virtio device (see the module docstring).

    ``memory()``: the guest RAM the rings live in (``server.dispatcher.memory``), None
    before the server is up.  ``ram_limit``: when given, buffers must end below it.
    ``indirect``/``event_idx``: offer VIRTIO_F_RING_INDIRECT_DESC / VIRTIO_F_RING_EVENT_IDX.
    """

    def __init__(
        self,
        device: VirtioDevice,
        memory: Callable[[], GuestMemory | None],
        *,
        indirect: bool = True,
        event_idx: bool = True,
        ram_limit: int | None = None,
        logger: logging.Logger = log,
    ) -> None:
        sizes = device.queue_sizes
        if not 1 <= len(sizes) <= 0x400:
            raise ValueError(f"queue_sizes={sizes!r}: a device has 1..1024 queues")
        for i, n in enumerate(sizes):
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_QUEUE_SIZE or n & (n - 1):
                raise ValueError(f"queue_sizes[{i}]={n!r}: must be a power of two in 1..{MAX_QUEUE_SIZE}")
        if device.features >> 64 or device.features < 0:
            raise ValueError(f"features={device.features:#x}: must fit 64 bits")
        self.device = device
        self.memory = memory
        self.offered = (
            device.features
            | 1 << VIRTIO_F_VERSION_1
            | (1 << VIRTIO_F_RING_INDIRECT_DESC if indirect else 0)
            | (1 << VIRTIO_F_RING_EVENT_IDX if event_idx else 0)
        )
        self.queues = [Virtqueue(i, n) for i, n in enumerate(sizes)]
        for vq in self.queues:
            vq.ram_limit = ram_limit
            vq.on_used = functools.partial(self._used, vq)
        self.warn = RateLimitedLog(logger)
        self.needs_reset_reason: str | None = None  # why the device last went NEEDS_RESET
        self.errors: list[str] = []  # the driver's errors (newest last, at most 16)
        self.config_generation = 0
        self._loop: ServeLoop | None = None  # while attached: queues are served after the access
        self._deferred: list[int] = []  # those queues, each once, in the order notified

    def _bind(self) -> None:
        """The subclass's state exists: reset everything and give the device its transport."""
        self._reset_state()
        self.device.transport = self

    # --- serving notifications after the access --------------------------------------------------

    def attach(self, loop: ServeLoop) -> None:
        """Serve queue notifications from ``loop`` after the notifying access is answered (as
        QEMU's devices work after the access); call before ``loop.run``.  ``close`` undoes it."""
        if self._loop is not None:
            raise RuntimeError("this transport is already attached to a loop")
        self._loop = loop

    def close(self) -> None:
        """Leave the loop ``attach`` joined; notifications are served during their access
        again.  Idempotent."""
        self._loop, self._deferred = None, []

    def _defer(self, loop: ServeLoop, index: int) -> None:
        if index in self._deferred:
            return
        if not self._deferred:
            loop.call_soon(self.run_deferred)  # once per batch, after this round's ioreqs are answered
        self._deferred.append(index)

    def run_deferred(self) -> None:
        """Serve the queues notified since the last call (``call_soon``'d on the loop)."""
        pending, self._deferred = self._deferred, []
        for index in pending:
            self.kick(index)

    def notified(self, index: int) -> None:
        """The driver notified queue ``index``: served now, or from the loop right after when attached."""
        if self._loop is not None and 0 <= index < len(self.queues):
            self._defer(self._loop, index)  # answered now, served from the loop next
        else:
            self.kick(index)

    # --- state ---------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self.status = 0
        self.negotiated = 0
        self.driver_features = 0
        self.device_feature_select = self.driver_feature_select = 0
        self.queue_select = 0
        self.needs_reset_reason = None
        for vq in self.queues:
            vq.reset()

    @abc.abstractmethod
    def _lower(self) -> None:
        """Reset: take back any interrupt the transport still asserts."""

    def reset(self) -> None:
        """The driver wrote 0 to the device status (2.4): back to the initial state, interrupt low."""
        self._reset_state()
        self._lower()
        self.device.reset()

    @property
    def live(self) -> bool:
        """DRIVER_OK set and no NEEDS_RESET: the device may use its queues."""
        return self.status & (Status.DRIVER_OK | Status.NEEDS_RESET) == Status.DRIVER_OK

    def driver_error(self, e: VirtqueueError | str, key: str = "") -> None:
        """The driver broke a rule: log it (rate-limited by its key), remember it, set
        DEVICE_NEEDS_RESET and tell the driver with a configuration-change interrupt."""
        key = e.key if isinstance(e, VirtqueueError) else key
        self.errors = [*self.errors[-15:], str(e)]
        self.warn(logging.WARNING, key, "virtio %s: %s; device needs reset", type(self.device).__name__, e)
        if self.status & Status.NEEDS_RESET:
            return
        self.status |= Status.NEEDS_RESET
        self.needs_reset_reason = str(e)
        self.config_changed(bump=False)

    def _ignored(self, key: str, detail: str) -> None:
        """An access the transport ignores (log only: the spec leaves the device's answer open)."""
        self.errors = [*self.errors[-15:], f"{key}: {detail}"]
        self.warn(logging.WARNING, key, "virtio %s: %s: %s", type(self.device).__name__, key, detail)

    # --- features (3.1.1): 32-bit windows chosen by a select register ----------------------------

    def device_features_word(self) -> int:
        sel = self.device_feature_select
        return self.offered >> (32 * sel) & _U32 if sel < 2 else 0

    def driver_features_word(self) -> int:
        sel = self.driver_feature_select
        return self.driver_features >> (32 * sel) & _U32 if sel < 2 else 0

    def write_driver_features_word(self, value: int) -> None:
        sel = self.driver_feature_select
        if self.status & Status.FEATURES_OK:
            self._ignored("features-after-ok", f"driver_feature[{sel}]={value:#x} after FEATURES_OK")
        elif sel < 2:
            mask = _U32 << (32 * sel)
            self.driver_features = self.driver_features & ~mask | (value & _U32) << (32 * sel)

    # --- interrupts ------------------------------------------------------------------------------

    @abc.abstractmethod
    def _signal(self, vector: int, isr_bit: int) -> None:
        """Interrupt the driver: ``vector`` (MSI-X transports) or ``isr_bit`` (ISR_QUEUE/ISR_CONFIG)."""

    def interrupt(self, vq: Virtqueue) -> None:
        """Tell the driver about ``vq``'s used buffers, if it wants to hear (its flags or used_event)."""
        memory = self.memory()
        if memory is not None:
            self._interrupt(vq, memory)

    def _used(self, vq: Virtqueue, memory: GuestMemory) -> None:
        """``vq``'s chains were used (``Virtqueue.on_used``): publish its used index, interrupt if the driver asked."""
        try:
            vq.publish_used(memory)
        except VirtqueueError as e:
            self.driver_error(e)
            return
        self._interrupt(vq, memory)

    def _interrupt(self, vq: Virtqueue, memory: GuestMemory) -> None:
        try:
            if vq.needs_interrupt(memory):
                self._signal(vq.msix_vector, ISR_QUEUE)
        except VirtqueueError as e:
            self.driver_error(e)

    @property
    def config_vector(self) -> int:
        return VIRTIO_MSI_NO_VECTOR

    def config_changed(self, *, bump: bool = True) -> None:
        """The device configuration changed (or NEEDS_RESET was set): new generation, config interrupt."""
        if bump:
            self.config_generation = (self.config_generation + 1) & 0xFF
        if self.status & Status.DRIVER_OK or self.status & Status.NEEDS_RESET:
            self._signal(self.config_vector, ISR_CONFIG)

    # --- running queues ------------------------------------------------------------------------------

    def kick(self, index: int) -> None:
        """Serve queue ``index`` now (its notification, or host-side data for it), then interrupt
        as the driver asked.  Nothing happens before DRIVER_OK, after NEEDS_RESET or on a disabled queue."""
        if not 0 <= index < len(self.queues):
            self._ignored("notify-bad-queue", f"queue {index} of {len(self.queues)}")
            return
        vq = self.queues[index]
        if not self.live or not vq.enabled:
            return
        if self.memory() is None:
            self._ignored("no-memory", "no guest memory mapping yet")
            return
        while True:
            try:
                self.device.queue_notify(vq)
            except VirtqueueError as e:
                self.driver_error(e)
                return
            self.interrupt(vq)
            if not vq.more:
                return
            # Stopped at its limit with chains left: again, after what else waits when attached.
            vq.more = False
            if self._loop is not None:
                self._defer(self._loop, index)
                return

    # --- queue setup --------------------------------------------------------------------------------

    @property
    def selected_queue(self) -> Virtqueue | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    def set_queue_address(self, vq: Virtqueue, name: str, off: int, size: int, value: int) -> None:
        """Write ``size`` bytes at byte ``off`` (0 or 4) of queue ``vq``'s ``name`` area address
        ("desc", "avail", "used"); ignored while the queue is enabled (2.7: fixed while in use)."""
        if vq.enabled:
            self._ignored("queue-enabled", f"queue {vq.index} {name} written while enabled")
            return
        old: int = getattr(vq, name)
        if size == 8:
            new = value
        else:
            shift = 8 * off
            new = old & ~(_U32 << shift) | (value & _U32) << shift
        setattr(vq, name, new)

    def enable_queue(self, vq: Virtqueue) -> None:
        """The driver enabled ``vq``: its size and ring addresses are checked now, and a bad
        one is the driver's error (DEVICE_NEEDS_RESET, 4.1.4.3.1 and 4.2.2.1)."""
        n = vq.size
        if not 1 <= n <= vq.max_size or n & (n - 1):
            self.driver_error(f"queue {vq.index}: size {n} is not a power of two in 1..{vq.max_size}", "bad-queue-size")
            return
        for name, align, length in (
            ("desc", DESC_ALIGN, desc_table_size(n)),
            ("avail", AVAIL_ALIGN, avail_size(n)),
            ("used", USED_ALIGN, used_size(n)),
        ):
            addr: int = getattr(vq, name)
            if addr % align or addr + length > 1 << 64 or (vq.ram_limit is not None and addr + length > vq.ram_limit):
                self.driver_error(
                    f"queue {vq.index}: {name} area at {addr:#x} (+{length:#x}, align {align})", "bad-ring"
                )
                return
        vq.indirect = bool(self.negotiated >> VIRTIO_F_RING_INDIRECT_DESC & 1)
        vq.event_idx = bool(self.negotiated >> VIRTIO_F_RING_EVENT_IDX & 1)
        vq.enabled = True

    # --- device status (2.1) -----------------------------------------------------------------------

    def write_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self.reset()
            return
        old = self.status
        new = value & ~Status.NEEDS_RESET | old & Status.NEEDS_RESET  # NEEDS_RESET is the device's bit
        if new & Status.FEATURES_OK and not old & Status.FEATURES_OK:
            unknown = self.driver_features & ~self.offered
            if unknown or not self.driver_features >> VIRTIO_F_VERSION_1 & 1:
                why = f"unoffered {unknown:#x}" if unknown else "no VIRTIO_F_VERSION_1"
                self._ignored("features-refused", f"driver features {self.driver_features:#x}: {why}")
                new &= ~Status.FEATURES_OK  # 3.1.1: the driver reads FEATURES_OK back and fails
            else:
                self.negotiated = self.driver_features
        if new & Status.DRIVER_OK and not new & Status.FEATURES_OK:
            self._ignored("driver-ok-early", f"status {value:#x}: DRIVER_OK without FEATURES_OK")
            new &= ~Status.DRIVER_OK
        self.status = new
        if new & Status.DRIVER_OK and not old & Status.DRIVER_OK:
            self.device.activate()
            for vq in self.queues:  # buffers made available before DRIVER_OK are served now
                self.kick(vq.index)
