"""virtio_console: a virtio console (virtio 1.x over PCI), one port: the guest's ``hvc0``.

What the guest writes to ``hvc0`` comes out on this terminal (or a pty), and what is typed
here goes to the guest.  One port, no multiport (VIRTIO_CONSOLE_F_SIZE gives 80x25).

Run it:

    python examples/virtio_console.py              # on the mock Xen: a simulated guest's driver
                                                   # writes to hvc0 (shown here) and reads a line
                                                   # the host sends it
    python examples/virtio_console.py --domid 5    # real dom0: domain 5's hvc0 on this terminal
    python examples/virtio_console.py --domid 5 --pty        # ... on a new pty (its path is printed):
                                                             # screen /dev/pts/N
    python examples/virtio_console.py --domid 5 --pty --depriv 990:990 --chroot /var/empty

The terminal or pty is opened before the server starts (and before privileges are dropped).
The device sits at 0000:00:<--slot>.0 (default 08); start the device model while the
domain is still paused, and give the guest ``console=hvc0``.  A domain that is not HVM is
refused (MSI-X and INTx go out).  Ctrl-C or SIGTERM destroys the ioreq server and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tty

from xendmop.runtime import ServeLoop
from xendmop.virtio import VirtioDevice
from xendmop.virtio.console import RECEIVEQ, TRANSMITQ, VirtioConsole
from xendmop.virtio.driver import VirtioDriver
from xendmop.virtio.program import Example

HOST_LINE = b"hello hvc0, from the host\n"
GUEST_LINE = b"[guest] hello from hvc0\n"
_PTY_SLAVES: dict[int, int] = {}  # a --pty console's slave side, by id(device)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pty", action="store_true", help="serve the console on a new pty instead of this terminal")


def make_device(args: argparse.Namespace) -> VirtioConsole:
    if args.pty:
        master, slave = os.openpty()
        tty.setraw(slave)  # the guest's line discipline does the echoing and editing
        print(f"virtio_console: the guest's hvc0 is on {os.ttyname(slave)}", file=sys.stderr, flush=True)
        device = VirtioConsole(master, master)
        # Held open while serving: with no slave open the master reads EIO, and would look like
        # the end of input before anyone attached.
        _PTY_SLAVES[id(device)] = slave
        return device
    if args.domid is None:
        # On the mock the host "types" a fixed line through a pipe; output goes to stdout.
        r, w = os.pipe()
        os.write(w, HOST_LINE)
        os.close(w)
        return VirtioConsole(r, os.dup(sys.stdout.fileno()))
    return VirtioConsole(os.dup(sys.stdin.fileno()), os.dup(sys.stdout.fileno()))


def attach(device: VirtioDevice, loop: ServeLoop) -> None:
    assert isinstance(device, VirtioConsole)
    device.attach(loop)


def close(device: VirtioDevice) -> None:
    assert isinstance(device, VirtioConsole)
    slave = _PTY_SLAVES.pop(id(device), None)
    for fd in {device.in_fd, device.out_fd, slave}:
        if fd is not None:
            os.close(fd)


def guest_script(driver: VirtioDriver, device: VirtioDevice, args: argparse.Namespace) -> list[str]:
    """What Linux's virtio_console does for hvc0: receive buffers posted, then write and read."""
    features = driver.bring_up(0xFFFFFFFF)
    rx, tx = driver.queues[RECEIVEQ], driver.queues[TRANSMITQ]
    for _ in range(4):
        rx.add([], [64])
    rx.kick()
    cols, rows = driver.config_read(0, 2), driver.config_read(2, 2)
    tx.request([GUEST_LINE], [])
    received = b""
    deadline = time.monotonic() + 5
    while not received.endswith(b"\n") and time.monotonic() < deadline:
        for _, data in rx.take_data():
            received += data
        time.sleep(0.001)
    return [
        f"virtio-console: features {features:#x}, {cols}x{rows}",
        f"the guest wrote {GUEST_LINE!r} to hvc0",
        f"the guest read {received!r} from hvc0",
    ]


EXAMPLE = Example(
    "virtio_console",
    __doc__,
    make_device,
    guest_script,
    add_arguments=add_arguments,
    attach=attach,
    close=close,
    default_slot=8,
)

if __name__ == "__main__":
    sys.exit(EXAMPLE.main())
