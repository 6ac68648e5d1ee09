"""virtio_blk: a virtio-blk disk (virtio 1.x over PCI) backed by a file or a block device.

Reads, writes, flushes (``fsync``), discards and write-zeroes (a hole punched in a file,
``BLKDISCARD`` on a block device) and GET_ID (the serial); ``--read-only`` offers
VIRTIO_BLK_F_RO and answers writes and discards with an I/O error.  A request past the
disk's end, of a length that is not whole sectors or of an unknown type gets an error
status and the disk keeps working; a broken ring sets DEVICE_NEEDS_RESET.

Run it:

    python examples/virtio_blk.py                       # on the mock Xen, on a scratch 1 MiB file:
                                                        # the simulated guest's driver writes, flushes,
                                                        # reads back, discards; the file holds the data
    python examples/virtio_blk.py --file disk.img       # the same on your file (its data is overwritten!)
    python examples/virtio_blk.py --domid 5 --file disk.img           # real dom0: serve HVM domain 5
    python examples/virtio_blk.py --domid 5 --file /dev/vg/guest --read-only
    python examples/virtio_blk.py --domid 5 --file disk.img --depriv 990:990 --chroot /var/empty

The file is opened before the server starts (and before privileges are dropped), and
stays open until the device model exits.  The device sits at 0000:00:<--slot>.0
(default 07); start the device model while the domain is still paused.  A domain that
is not HVM is refused (MSI-X and INTx go out).  Ctrl-C or SIGTERM destroys the ioreq
server and exits 0.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile

from xendmop.virtio import VirtioDevice
from xendmop.virtio.blk import (
    SECTOR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VirtioBlk,
)
from xendmop.virtio.driver import GuestQueue, VirtioDriver
from xendmop.virtio.program import Example

SCRATCH_SIZE = 1 << 20
PATTERN_SECTOR = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--file", help="the disk: a file or a block device (default on the mock: a scratch file)")
    p.add_argument("--read-only", action="store_true", help="offer VIRTIO_BLK_F_RO; refuse writes and discards")
    p.add_argument("--serial", default="xendmop", help="what GET_ID answers (at most 20 bytes)")


def validate(args: argparse.Namespace) -> str | None:
    if args.domid is not None and args.file is None:
        return "--domid needs --file PATH (the disk)"
    if len(args.serial.encode()) > 20:
        return f"--serial {args.serial!r}: at most 20 bytes"
    return None


def make_device(args: argparse.Namespace) -> VirtioBlk:
    """The disk on ``--file`` (opened here, before any privilege drop), or a scratch file."""
    if args.file is None:
        fd, path = tempfile.mkstemp(prefix="virtio_blk-", suffix=".img")
        os.unlink(path)
        os.ftruncate(fd, SCRATCH_SIZE)
    else:
        fd = os.open(args.file, os.O_RDONLY if args.read_only else os.O_RDWR)
    try:
        return VirtioBlk(fd, read_only=args.read_only, serial=args.serial.encode())
    except BaseException:
        os.close(fd)
        raise


def close(device: VirtioDevice) -> None:
    assert isinstance(device, VirtioBlk)
    os.close(device.fd)


def _request(q: GuestQueue, kind: int, sector: int, data: bytes = b"", read: int = 0) -> tuple[int, bytes]:
    header = struct.pack("<IIQ", kind, 0, sector)
    _, out = q.request([header] + ([data] if data else []), ([read] if read else []) + [1])
    return out[-1], out[:-1]


def guest_script(driver: VirtioDriver, device: VirtioDevice, args: argparse.Namespace) -> list[str]:
    """What a guest does with a disk: read the capacity, write a block, flush, read it back, discard."""
    assert isinstance(device, VirtioBlk)
    fd = device.fd
    features = driver.bring_up(0xFFFFFFFF)
    q = driver.queues[0]
    sectors = driver.config_read(0, 8)
    lines = [f"virtio-blk: {sectors} sectors ({sectors * SECTOR >> 10} KiB), features {features:#x}"]
    status, serial = _request(q, VIRTIO_BLK_T_GET_ID, 0, read=20)
    lines.append(f"GET_ID: status {status}, serial {serial.rstrip(bytes(1)).decode(errors='replace')!r}")
    block = bytes(range(256)) * 16
    status, _ = _request(q, VIRTIO_BLK_T_OUT, PATTERN_SECTOR, block)
    lines.append(f"write 4 KiB at sector {PATTERN_SECTOR}: status {status}")
    status, _ = _request(q, VIRTIO_BLK_T_FLUSH, 0)
    lines.append(f"flush: status {status}")
    status, back = _request(q, VIRTIO_BLK_T_IN, PATTERN_SECTOR, read=len(block))
    lines.append(f"read it back: status {status}, {'same data' if back == block else 'DIFFERENT data'}")
    on_disk = os.pread(fd, len(block), PATTERN_SECTOR * SECTOR)
    lines.append(f"the file holds {'the data' if on_disk == block else 'something else'} at that offset")
    status, _ = _request(q, VIRTIO_BLK_T_DISCARD, 0, struct.pack("<QII", PATTERN_SECTOR, 8, 0))
    zero = os.pread(fd, len(block), PATTERN_SECTOR * SECTOR) == bytes(len(block))
    lines.append(f"discard: status {status}{', reads zeroes' if status == VIRTIO_BLK_S_OK and zero else ''}")
    status, _ = _request(q, VIRTIO_BLK_T_IN, sectors, read=SECTOR)
    lines.append(f"read past the end: status {status} (1 = I/O error), device still up: {not driver.needs_reset}")
    return lines


EXAMPLE = Example(
    "virtio_blk",
    __doc__,
    make_device,
    guest_script,
    add_arguments=add_arguments,
    validate=validate,
    close=close,
    default_slot=7,
)

if __name__ == "__main__":
    sys.exit(EXAMPLE.main())
