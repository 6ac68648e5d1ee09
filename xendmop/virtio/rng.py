"""virtio-rng (spec 5.4): one queue; the device fills each device-writable buffer with entropy."""

from __future__ import annotations

import os
from collections.abc import Callable

from .device import VirtioDevice, check_count
from .spec import VIRTIO_ID_RNG
from .virtqueue import Chain, Virtqueue

__all__ = ["VirtioRng"]


class VirtioRng(VirtioDevice):
    """Entropy from ``source(n)`` (the host's ``os.urandom``, i.e. getrandom(2), which needs no
    file and so works in a chroot).  At most ``max_request`` bytes per buffer (5.4.6.1: the
    device may write fewer than asked); a chain with no device-writable room gets 0 bytes."""

    device_type = VIRTIO_ID_RNG

    def __init__(
        self, source: Callable[[int], bytes] = os.urandom, *, queue_size: int = 64, max_request: int = 4096
    ) -> None:
        super().__init__()
        self.queue_sizes = (queue_size,)
        self.source = source
        self.max_request = check_count("max_request", max_request, 1, 1 << 20)
        self.served = 0  # bytes handed to the guest

    def handle(self, vq: Virtqueue, chain: Chain) -> int:
        n = min(chain.writable_len, self.max_request)
        written = chain.write(self.source(n)[:n]) if n else 0
        self.served += written
        return written
