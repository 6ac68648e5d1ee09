"""virtio-blk (spec 5.2) over a file or a block device: read, write, flush, discard, write
zeroes, get id; a read-only mode.

A request is a readable header (type, reserved, sector), data (readable for writes,
writable for reads), and a writable status byte at the very end.  Sectors are 512 bytes
whatever ``blk_size`` says.  The guest is untrusted: a request past the disk's end, a data
length that is not a multiple of 512 or over ``size_max * seg_max``, an unknown type
all answer an error status (IOERR / UNSUPP) and leave the device working; a chain without
room for the status byte or shorter than its header is a broken ring (NEEDS_RESET).
Data moves between the file and guest RAM with ``preadv``/``pwritev`` on views of the
guest's pages, at most ``IOV_BATCH`` pages a call, so memory stays bounded whatever the
lengths say and nothing is copied through Python.

What is offered follows QEMU's virtio-blk (``hw/block/virtio-blk.c``): a 256-entry queue and
``seg_max`` = queue size - 2, so Linux's ``virtio_blk`` (``blk_queue_max_segments``) puts a
1 MiB O_DIRECT transfer of scattered 4 KiB pages in two requests, not three as with 126
segments; ``size_max`` (1 MiB) only bounds what one segment may carry.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import stat
import struct

from .device import VirtioDevice
from .spec import VIRTIO_ID_BLOCK
from .virtqueue import Chain, Virtqueue, VirtqueueError

__all__ = ["VirtioBlk"]

log = logging.getLogger("xendmop.virtio.blk")

SECTOR = 512
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14
VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID = 0, 1, 4, 8
VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES = 11, 13
VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP = 0, 1, 2
VIRTIO_BLK_ID_BYTES = 20
#: ``struct virtio_blk_outhdr``: type, ioprio, sector
OUTHDR = struct.Struct("<IIQ")
#: ``struct virtio_blk_discard_write_zeroes``: sector, num_sectors, flags
DISCARD_SEG = struct.Struct("<QII")
CHUNK = 65536  # bytes per piece of zeroes written for WRITE_ZEROES where no hole can be punched
SIZE_MAX = 1 << 20  # bytes per segment offered
MAX_DISCARD_SEG = 16
MAX_DISCARD_SECTORS = 0xFFFFFFFF // SECTOR  # one segment's bytes fit 32 bits
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
BLKDISCARD = 0x1277  # _IO(0x12, 119)
BLKGETSIZE64 = 0x80081272


def _fallocate() -> object | None:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name, use_errno=True) if name else None
    fn = getattr(libc, "fallocate", None)
    if fn is not None:
        fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
        fn.restype = ctypes.c_int
    return fn


class VirtioBlk(VirtioDevice):
    """A disk on ``fd`` (an open file or block device; not closed here) of ``size`` bytes
    (default: the file's size, or the block device's).  ``read_only`` offers VIRTIO_BLK_F_RO
    and refuses writes and discards with IOERR.  ``serial``: what GET_ID answers (<= 20 bytes)."""

    device_type = VIRTIO_ID_BLOCK

    def __init__(
        self,
        fd: int,
        *,
        size: int | None = None,
        read_only: bool = False,
        serial: bytes = b"xendmop",
        queue_size: int = 256,
    ) -> None:
        super().__init__()
        st = os.fstat(fd)
        self.block_device = stat.S_ISBLK(st.st_mode)
        if size is None:
            if self.block_device:
                size = struct.unpack("<Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
            else:
                size = st.st_size
        if size < 0 or size % SECTOR:
            raise ValueError(f"size={size}: must be a multiple of {SECTOR} bytes")
        if len(serial) > VIRTIO_BLK_ID_BYTES:
            raise ValueError(f"serial={serial!r}: at most {VIRTIO_BLK_ID_BYTES} bytes")
        self.fd = fd
        self.size = size
        self.read_only = read_only
        self.serial = serial
        self.queue_sizes = (queue_size,)
        self.seg_max = max(1, queue_size - 2)  # 5.2.4: seg_max leaves room for header and status
        self.features = (
            1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | (1 << VIRTIO_BLK_F_RO if read_only else 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES)
        )
        self._fallocate = None if self.block_device else _fallocate()
        self.host_write_extent = 0 if read_only else size
        self.counts: dict[str, int] = {}

    def config(self) -> bytes:
        """``struct virtio_blk_config`` up to write_zeroes_may_unmap (60 bytes)."""
        return struct.pack(
            "<QII HBB I BBHI BBH III II B3x",
            self.size // SECTOR,  # capacity
            SIZE_MAX,
            self.seg_max,
            0, 0, 0,  # geometry
            SECTOR,  # blk_size
            0, 0, 0, 0,  # topology
            0, 0, 0,  # writeback, unused0, num_queues
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEG,
            1,  # discard_sector_alignment
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEG,
            1,  # write_zeroes_may_unmap
        )  # fmt: skip

    # --- requests -----------------------------------------------------------------------------------

    def handle(self, vq: Virtqueue, chain: Chain) -> int:
        if chain.writable_len < 1:
            raise VirtqueueError("no-writable-room", f"blk request at head {chain.head}: no status byte")
        kind, _, sector = OUTHDR.unpack(chain.read_exact(OUTHDR.size, "virtio_blk_outhdr"))
        data_in = chain.writable_len - 1  # what IN may fill: everything before the status byte
        status = self._serve(chain, kind, sector, data_in)
        self.counts[str(kind)] = self.counts.get(str(kind), 0) + 1
        self._status(chain, data_in, status)
        return chain.written

    @staticmethod
    def _status(chain: Chain, data_in: int, status: int) -> None:
        chain.skip_writable(data_in - chain.written)  # the status is the last writable byte
        chain.write(bytes([status]))

    def _range_ok(self, sector: int, nbytes: int) -> bool:
        return nbytes % SECTOR == 0 and sector * SECTOR + nbytes <= self.size

    def _serve(self, chain: Chain, kind: int, sector: int, data_in: int) -> int:
        try:
            if kind == VIRTIO_BLK_T_IN:
                if not self._range_ok(sector, data_in) or data_in > SIZE_MAX * self.seg_max:
                    return VIRTIO_BLK_S_IOERR
                chain.read_from_fd(self.fd, sector * SECTOR, data_in)  # a file shorter than its size reads zeroes
                return VIRTIO_BLK_S_OK
            if kind == VIRTIO_BLK_T_OUT:
                nbytes = chain.readable_len - OUTHDR.size
                if self.read_only or not self._range_ok(sector, nbytes) or nbytes > SIZE_MAX * self.seg_max:
                    return VIRTIO_BLK_S_IOERR
                chain.write_to_fd(self.fd, sector * SECTOR)
                return VIRTIO_BLK_S_OK
            if kind == VIRTIO_BLK_T_FLUSH:
                os.fsync(self.fd)
                return VIRTIO_BLK_S_OK
            if kind == VIRTIO_BLK_T_GET_ID:
                if data_in < VIRTIO_BLK_ID_BYTES:
                    return VIRTIO_BLK_S_IOERR
                chain.write(self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0"))
                return VIRTIO_BLK_S_OK
            if kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
                if self.read_only:
                    return VIRTIO_BLK_S_IOERR
                return self._discard(chain, zero=kind == VIRTIO_BLK_T_WRITE_ZEROES)
        except OSError as e:
            log.warning("virtio-blk: request type %d sector %d: %s", kind, sector, e)
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_UNSUPP

    def _discard(self, chain: Chain, *, zero: bool) -> int:
        nbytes = chain.readable_len - OUTHDR.size
        if nbytes <= 0 or nbytes % DISCARD_SEG.size or nbytes // DISCARD_SEG.size > MAX_DISCARD_SEG:
            return VIRTIO_BLK_S_UNSUPP if nbytes % DISCARD_SEG.size else VIRTIO_BLK_S_IOERR
        raw = chain.read_exact(nbytes, "discard segments")
        segments = [DISCARD_SEG.unpack_from(raw, i) for i in range(0, nbytes, DISCARD_SEG.size)]
        for sector, num, flags in segments:
            if flags & ~1 or num > MAX_DISCARD_SECTORS or not self._range_ok(sector, num * SECTOR):
                return VIRTIO_BLK_S_UNSUPP if flags & ~1 else VIRTIO_BLK_S_IOERR
        for sector, num, _ in segments:
            self._punch(sector * SECTOR, num * SECTOR, zero=zero)
        return VIRTIO_BLK_S_OK

    def _punch(self, pos: int, n: int, *, zero: bool) -> None:
        """Deallocate (discard) or zero ``n`` bytes at ``pos``: a punched hole reads zeroes, so
        both are one hole in a file; a block device gets BLKDISCARD, then zeroes for WRITE_ZEROES."""
        if n == 0:
            return
        if self.block_device:
            if not zero:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("<QQ", pos, n))
                return
        elif self._fallocate is not None:
            fn = self._fallocate
            if fn(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, pos, n) == 0:  # type: ignore[operator]
                return
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise OSError(err, os.strerror(err))
        if zero:
            zeroes = bytes(min(n, CHUNK))
            end = pos + n
            while pos < end:
                pos += os.pwrite(self.fd, zeroes[: min(CHUNK, end - pos)], pos)
