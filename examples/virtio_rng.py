"""virtio_rng: a virtio-rng device (virtio 1.x over PCI) that gives the guest the host's entropy.

The guest's own driver (Linux's ``virtio_rng``, ``/dev/hwrng``) finds a 1AF4:1044 function
and hands the device buffers to fill; each is filled from the host's ``getrandom(2)``
(``os.urandom``: no file to open, so it works after ``--chroot``), at most 4 KiB a request.

Run it:

    python examples/virtio_rng.py                # on the mock Xen: a simulated guest's virtio
                                                 # driver probes the device and reads entropy
    python examples/virtio_rng.py --hold         # the same, then serve until Ctrl-C
    python examples/virtio_rng.py --domid 5      # on a real dom0: serve HVM domain 5 until Ctrl-C
    python examples/virtio_rng.py --domid 5 --depriv 990:990 --chroot /var/empty

The device sits at 0000:00:<--slot>.0 (default 06), or with ``--mmio N`` in an Arm guest's
N-th virtio-mmio slot; start the device model while the domain is still paused so the
guest's firmware (or kernel) finds it.  On PCI interrupts are MSI-X (``inject_msi``) or
INTx, so a domain that is not HVM is refused (``--assume-hvm`` when nothing can tell); on
virtio-mmio they are the slot's SPI (``set_irq_level``).  Ctrl-C or SIGTERM destroys the ioreq server and exits 0.
"""

from __future__ import annotations

import argparse
import sys

from xendmop.virtio import VirtioDevice
from xendmop.virtio.driver import VirtioDriver, VirtioPciDriver
from xendmop.virtio.program import Example
from xendmop.virtio.rng import VirtioRng


def make_device(args: argparse.Namespace) -> VirtioRng:
    return VirtioRng()


def guest_script(driver: VirtioDriver, device: VirtioDevice, args: argparse.Namespace) -> list[str]:
    """What the guest's virtio_rng does: bring the device up, ask for entropy twice."""
    features = driver.bring_up()
    q = driver.queues[0]
    n1, first = q.request([], [32])
    n2, second = q.request([], [16, 16], indirect=True)
    return [
        f"virtio-rng: features {features:#x}, queue 0 of {q.size} entries, "
        + (f"MSI-X vector {q.vector}" if isinstance(driver, VirtioPciDriver) else "interrupts on its SPI"),
        f"read {n1} bytes: {first.hex()}",
        f"read {n2} bytes through an indirect table: {second.hex()}",
        "two reads differ" if first != second[:n1] else "two reads are THE SAME",
    ]


EXAMPLE = Example("virtio_rng", __doc__, make_device, guest_script, default_slot=6)

if __name__ == "__main__":
    sys.exit(EXAMPLE.main())
