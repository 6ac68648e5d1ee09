"""virtio-blk over a real file, through the simulated guest's driver."""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from xendmop.depriv import DropConfig
from xendmop.virtio.blk import (
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VirtioBlk,
)
from xendmop.virtio.driver import GuestQueue
from xendmop.virtio.program import drop_for

from .conftest import Setup, VirtioFactory

DISK = 1 << 20
ALL = 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_DISCARD | 1 << 14 | 1 << 28 | 1 << 29 | 1 << VIRTIO_BLK_F_RO


def hdr(kind: int, sector: int) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


def blk_request(q: GuestQueue, kind: int, sector: int, data: bytes = b"", read: int = 0) -> tuple[int, bytes]:
    """(status, data read)."""
    readable = [hdr(kind, sector)] + ([data] if data else [])
    n, out = q.request(readable, ([read] if read else []) + [1], indirect=kind == VIRTIO_BLK_T_IN)
    assert n == read + 1
    return out[-1], out[:-1]


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(DISK))
    fd = os.open(path, os.O_RDWR)
    yield path, fd
    os.close(fd)


@pytest.fixture
def blk(virtio: VirtioFactory, disk: tuple[Path, int]) -> Setup:
    s = virtio(VirtioBlk(disk[1], serial=b"disk-7"))
    s.driver.bring_up(ALL)
    return s


def test_config_and_features(blk: Setup) -> None:
    d = blk.driver
    assert d.config_read(0, 8) == DISK // 512  # capacity in sectors
    assert d.config_read(20, 4) == 512  # blk_size
    assert d.features >> VIRTIO_BLK_F_FLUSH & 1 and d.features >> VIRTIO_BLK_F_DISCARD & 1
    assert not d.features >> VIRTIO_BLK_F_RO & 1


def test_write_then_read_back_lands_in_the_file(blk: Setup, disk: tuple[Path, int]) -> None:
    q = blk.driver.queues[0]
    data = os.urandom(4096)
    assert blk_request(q, VIRTIO_BLK_T_OUT, 8, data) == (VIRTIO_BLK_S_OK, b"")
    assert blk_request(q, VIRTIO_BLK_T_FLUSH, 0) == (VIRTIO_BLK_S_OK, b"")
    assert disk[0].read_bytes()[8 * 512 : 8 * 512 + 4096] == data
    assert blk_request(q, VIRTIO_BLK_T_IN, 8, read=4096) == (VIRTIO_BLK_S_OK, data)


def test_read_is_split_over_several_writable_buffers(blk: Setup, disk: tuple[Path, int]) -> None:
    os.pwrite(disk[1], b"A" * 512 + b"B" * 512, 0)
    n, out = blk.driver.queues[0].request([hdr(VIRTIO_BLK_T_IN, 0)], [512, 512, 1])
    assert n == 1025 and out == b"A" * 512 + b"B" * 512 + b"\0"


def test_get_id(blk: Setup) -> None:
    status, data = blk_request(blk.driver.queues[0], VIRTIO_BLK_T_GET_ID, 0, read=20)
    assert status == VIRTIO_BLK_S_OK and data == b"disk-7".ljust(20, b"\0")


def test_discard_and_write_zeroes_read_back_zeroes(blk: Setup, disk: tuple[Path, int]) -> None:
    q = blk.driver.queues[0]
    os.pwrite(disk[1], b"\xff" * 8192, 0)
    seg = struct.pack("<QII", 0, 8, 0)
    assert blk_request(q, VIRTIO_BLK_T_DISCARD, 0, seg)[0] == VIRTIO_BLK_S_OK
    assert blk_request(q, VIRTIO_BLK_T_WRITE_ZEROES, 0, struct.pack("<QII", 8, 8, 0))[0] == VIRTIO_BLK_S_OK
    assert disk[0].read_bytes()[:8192] == bytes(8192)
    assert disk[0].stat().st_size == DISK


@pytest.mark.parametrize(
    ("kind", "sector", "data", "read", "status"),
    [
        (VIRTIO_BLK_T_IN, DISK // 512, b"", 512, VIRTIO_BLK_S_IOERR),  # past the end
        (VIRTIO_BLK_T_IN, (1 << 64) - 1, b"", 512, VIRTIO_BLK_S_IOERR),  # the sector wraps
        (VIRTIO_BLK_T_OUT, DISK // 512 - 1, b"x" * 1024, 0, VIRTIO_BLK_S_IOERR),
        (VIRTIO_BLK_T_OUT, 0, b"x" * 100, 0, VIRTIO_BLK_S_IOERR),  # not whole sectors
        (VIRTIO_BLK_T_DISCARD, 0, struct.pack("<QII", 0, 8, 2), 0, VIRTIO_BLK_S_UNSUPP),  # unknown flag
        (VIRTIO_BLK_T_DISCARD, 0, struct.pack("<QII", DISK // 512, 8, 0), 0, VIRTIO_BLK_S_IOERR),
        (VIRTIO_BLK_T_GET_ID, 0, b"", 4, VIRTIO_BLK_S_IOERR),  # no room for the id
        (99, 0, b"", 0, VIRTIO_BLK_S_UNSUPP),
    ],
)
def test_bad_requests_get_an_error_status_and_the_device_stays_up(
    blk: Setup, disk: tuple[Path, int], kind: int, sector: int, data: bytes, read: int, status: int
) -> None:
    before = disk[0].read_bytes()
    assert blk_request(blk.driver.queues[0], kind, sector, data, read)[0] == status
    assert disk[0].read_bytes() == before
    assert not blk.driver.needs_reset
    assert blk_request(blk.driver.queues[0], VIRTIO_BLK_T_IN, 0, read=512)[0] == VIRTIO_BLK_S_OK


def test_read_only_offers_ro_and_refuses_writes(virtio: VirtioFactory, disk: tuple[Path, int]) -> None:
    s = virtio(VirtioBlk(disk[1], read_only=True))
    features = s.driver.bring_up(ALL)
    assert features >> VIRTIO_BLK_F_RO & 1 and not features >> VIRTIO_BLK_F_DISCARD & 1
    q = s.driver.queues[0]
    assert blk_request(q, VIRTIO_BLK_T_OUT, 0, b"y" * 512)[0] == VIRTIO_BLK_S_IOERR
    assert blk_request(q, VIRTIO_BLK_T_DISCARD, 0, struct.pack("<QII", 0, 1, 0))[0] == VIRTIO_BLK_S_IOERR
    assert blk_request(q, VIRTIO_BLK_T_IN, 0, read=512) == (VIRTIO_BLK_S_OK, bytes(512))
    assert disk[0].read_bytes() == bytes(DISK)


def test_a_short_header_is_a_broken_ring(blk: Setup) -> None:
    q = blk.driver.queues[0]
    q.add([b"\0" * 8], [1])
    q.kick()
    assert blk.driver.needs_reset and blk.transport.errors[-1].startswith("short-request")


def test_size_must_be_whole_sectors(disk: tuple[Path, int]) -> None:
    with pytest.raises(ValueError, match="size=1000"):
        VirtioBlk(disk[1], size=1000)
    with pytest.raises(ValueError, match="serial="):
        VirtioBlk(disk[1], serial=b"x" * 21)


@pytest.mark.skipif(not shutil.which("mke2fs") or not shutil.which("e2fsck"), reason="needs e2fsprogs")
def test_a_filesystem_written_through_the_guest_is_whole_in_the_file(
    blk: Setup, disk: tuple[Path, int], tmp_path: Path
) -> None:
    """The guest writes an ext2 filesystem onto the disk block by block (only the blocks in
    use, as mkfs would), flushes, reads it back; then the host's e2fsck and debugfs find it
    intact in the backing file."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello.txt").write_text("written by the guest through virtio-blk\n")
    (src / "big.bin").write_bytes(bytes(range(256)) * 64)
    image = tmp_path / "fs.img"
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext2", "-b", "1024", "-d", str(src), str(image), str(DISK // 1024)],
        check=True,
        capture_output=True,
    )
    fs = image.read_bytes()
    q = blk.driver.queues[0]
    written = 0
    for off in range(0, len(fs), 4096):
        block = fs[off : off + 4096]
        if any(block):
            assert blk_request(q, VIRTIO_BLK_T_OUT, off // 512, block)[0] == VIRTIO_BLK_S_OK
            written += 1
    assert blk_request(q, VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_OK
    assert blk_request(q, VIRTIO_BLK_T_IN, 0, read=4096) == (VIRTIO_BLK_S_OK, fs[:4096])
    assert 4 < written < DISK // 4096
    check = subprocess.run(["e2fsck", "-f", "-n", str(disk[0])], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    cat = subprocess.run(["debugfs", "-R", "cat /hello.txt", str(disk[0])], capture_output=True, text=True)
    assert cat.stdout == "written by the guest through virtio-blk\n"


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loop block device over a 1 MiB file (root and losetup), detached afterwards."""
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("a loop device needs root and losetup")
    backing = tmp_path / "backing.img"
    backing.write_bytes(b"\x11" * DISK)
    made = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"losetup: {made.stderr.strip()}")
    dev = made.stdout.strip()
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_a_block_device(virtio: VirtioFactory, loop_device: tuple[str, Path]) -> None:
    dev, backing = loop_device
    fd = os.open(dev, os.O_RDWR)
    try:
        device = VirtioBlk(fd)
        assert device.block_device and device.size == DISK  # BLKGETSIZE64
        s = virtio(device)
        s.driver.bring_up(ALL)
        q = s.driver.queues[0]
        assert s.driver.config_read(0, 8) == DISK // 512
        assert blk_request(q, VIRTIO_BLK_T_IN, 0, read=512) == (VIRTIO_BLK_S_OK, b"\x11" * 512)
        assert blk_request(q, VIRTIO_BLK_T_OUT, 16, b"\x22" * 4096)[0] == VIRTIO_BLK_S_OK
        assert blk_request(q, VIRTIO_BLK_T_DISCARD, 0, struct.pack("<QII", 0, 8, 0))[0] == VIRTIO_BLK_S_OK
        assert blk_request(q, VIRTIO_BLK_T_WRITE_ZEROES, 0, struct.pack("<QII", 8, 8, 0))[0] == VIRTIO_BLK_S_OK
        assert blk_request(q, VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_OK
        assert blk_request(q, VIRTIO_BLK_T_IN, 16, read=4096) == (VIRTIO_BLK_S_OK, b"\x22" * 4096)
    finally:
        os.close(fd)
    data = backing.read_bytes()
    assert data[:8192] == bytes(8192)  # a loop device's discard punches the file: zeroes
    assert data[8192 : 8192 + 4096] == b"\x22" * 4096 and data[12288:] == b"\x11" * (DISK - 12288)


_WRITE_LAST_SECTOR = """
import errno, os, resource, sys
path, size, fsize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDWR)
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
try:
    os.pwrite(fd, b"x" * 512, size - 512)
except OSError as e:
    sys.exit(1 if e.errno == errno.EFBIG else 2)
"""


def test_a_deprivileged_writable_disk_gets_an_fsize_limit_reaching_its_end(tmp_path: Path) -> None:
    """A privilege drop's default RLIMIT_FSIZE (256 KiB) made every write past it fail with
    EFBIG: a real guest's virtio_blk, deprivileged, got an I/O error for each write.
    ``drop_for`` raises the limit to a writable disk's size, and leaves everything else."""
    size = 1 << 20
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(size))
    fd = os.open(path, os.O_RDWR)
    try:
        base = DropConfig(uid=990, gid=990, chroot="/var/empty")
        assert base.rlimits is not None and base.rlimits.fsize is not None and base.rlimits.fsize < size
        drop = drop_for(VirtioBlk(fd), base)
        assert drop is not None and drop.rlimits is not None
        assert drop.rlimits.fsize == size
        assert drop == dataclasses.replace(base, rlimits=dataclasses.replace(base.rlimits, fsize=size))
        assert drop_for(VirtioBlk(fd, read_only=True), base) is base  # writes nothing: nothing raised
        assert drop_for(VirtioBlk(fd), None) is None  # not deprivileged
        assert drop_for(VirtioBlk(fd), DropConfig(uid=990, gid=990, rlimits=None)).rlimits is None  # type: ignore[union-attr]
        # What the two limits mean for the disk's last sector, in a process of their own.
        for fsize, status in ((base.rlimits.fsize, 1), (drop.rlimits.fsize, 0)):
            done = subprocess.run(
                [sys.executable, "-c", _WRITE_LAST_SECTOR, str(path), str(size), str(fsize)], check=False
            )
            assert done.returncode == status, fsize
    finally:
        os.close(fd)


def test_queue_and_segments_as_qemu_offers_them(blk: Setup) -> None:
    """A 256-entry queue and seg_max = 254 (QEMU's virtio-blk): Linux splits a 1 MiB transfer of
    scattered pages into two requests, not three as with 126 segments."""
    assert blk.transport.queues[0].max_size == 256
    assert blk.driver.config_read(12, 4) == 254  # seg_max
    assert blk.driver.config_read(8, 4) == 1 << 20  # size_max: one segment's bytes


def test_a_request_of_many_segments_straddling_pages_moves_whole(blk: Setup, disk: tuple[Path, int]) -> None:
    q = blk.driver.queues[0]
    pieces = [os.urandom(1000 + 8 * i) for i in range(64)]  # 16-byte aligned, so most cross a page
    data = b"".join(pieces)
    data += bytes(-len(data) % 512)
    pieces[-1] += bytes(len(data) - sum(map(len, pieces)))
    n, out = q.request([hdr(VIRTIO_BLK_T_OUT, 16), *pieces], [1], indirect=True)
    assert (n, out) == (1, bytes([VIRTIO_BLK_S_OK]))
    assert disk[0].read_bytes()[16 * 512 : 16 * 512 + len(data)] == data
    lengths = [len(p) for p in pieces]
    n, out = q.request([hdr(VIRTIO_BLK_T_IN, 16)], [*lengths, 1], indirect=True)
    assert n == len(data) + 1 and out == data + bytes([VIRTIO_BLK_S_OK])


def test_a_read_past_the_files_end_gives_zeroes_over_what_the_guest_had(
    virtio: VirtioFactory, disk: tuple[Path, int]
) -> None:
    os.pwrite(disk[1], b"\xaa" * 2048, DISK - 2048)
    s = virtio(VirtioBlk(disk[1], size=2 * DISK))  # a sparse disk bigger than its file so far
    s.driver.bring_up(ALL)
    s.guest.write_ram(s.driver.arena.next, b"\xff" * 16384)  # where the request's buffers will go
    status, data = blk_request(s.driver.queues[0], VIRTIO_BLK_T_IN, DISK // 512 - 4, read=8192)
    assert status == VIRTIO_BLK_S_OK and data == b"\xaa" * 2048 + bytes(6144)
