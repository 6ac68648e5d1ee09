"""``VirtioDevice``: what a virtio device type implements, whatever its transport."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from .virtqueue import Chain, Virtqueue

if TYPE_CHECKING:
    from .transport import VirtioTransport

__all__ = ["VirtioDevice", "check_count"]


def check_count(name: str, value: object, low: int, high: int) -> int:
    """``value`` if it is an int in ``low..high``, else ``ValueError`` naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}={value!r}: must be an integer in {low}..{high}")
    return value


class VirtioDevice:
    """A virtio device type: subclass it, set ``device_type``, ``queue_sizes`` and
    ``features`` (the device-specific bits offered), and either implement ``handle`` (one
    request in, its answer written: what most devices do) or override ``queue_notify``.

    The transport calls everything here in the serving loop's thread; ``transport`` is
    the ``VirtioTransport`` (PCI or MMIO) it was given to (None before).
    """

    device_type: ClassVar[int] = 0
    queue_sizes: tuple[int, ...] = ()
    features: int = 0
    #: how far into a host file the device writes (a disk's size): a deprivileged device
    #: model's RLIMIT_FSIZE must reach it, or every write past the limit fails with EFBIG
    host_write_extent: int = 0

    def __init__(self) -> None:
        self.transport: VirtioTransport | None = None

    @property
    def negotiated(self) -> int:
        """The features the driver accepted (0 before FEATURES_OK)."""
        return 0 if self.transport is None else self.transport.negotiated

    def has(self, bit: int) -> bool:
        return bool(self.negotiated >> bit & 1)

    # --- device configuration space ------------------------------------------------------------

    def config(self) -> bytes:
        """The device-specific configuration structure as it is now (little endian)."""
        return b""

    def write_config(self, offset: int, size: int, value: int) -> None:
        """The driver wrote the device configuration (read-only by default: ignored)."""

    # --- queues ------------------------------------------------------------------------------------

    def queue_notify(self, vq: Virtqueue) -> None:
        """The driver notified ``vq`` (or DRIVER_OK was set): by default ``handle`` each chain."""
        memory = self.transport.memory() if self.transport is not None else None
        if memory is not None:
            vq.process(memory, lambda chain: self.handle(vq, chain))

    def handle(self, vq: Virtqueue, chain: Chain) -> int:
        """Serve one request: read from ``chain``, write the answer; return the bytes written."""
        raise NotImplementedError(f"{type(self).__name__} handles no requests on queue {vq.index}")

    # --- lifecycle -----------------------------------------------------------------------------------

    def activate(self) -> None:
        """The driver set DRIVER_OK: the device may use its queues from now on."""

    def reset(self) -> None:
        """The driver reset the device (status 0): forget every request in flight."""
