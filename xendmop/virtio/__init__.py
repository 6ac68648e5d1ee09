"""virtio 1.x devices for Xen guests: the PCI transport, split virtqueues over guest RAM, and
device types (rng, blk, console, net).

A device is a ``VirtioDevice`` subclass; ``VirtioPci(device, memory)`` makes it a PCI
function to add to an ``IoreqServer``::

    transport = VirtioPci(VirtioRng(), lambda: server.dispatcher.memory)
    server.add_pci(transport.pci, slot=5)

``xendmop.virtio.driver`` is a guest's driver for the simulated guest on the mock.
"""

from __future__ import annotations

from .device import VirtioDevice
from .pci import VirtioPci
from .spec import Status
from .virtqueue import Chain, Virtqueue, VirtqueueError

__all__ = ["Chain", "Status", "VirtioDevice", "VirtioPci", "Virtqueue", "VirtqueueError"]
