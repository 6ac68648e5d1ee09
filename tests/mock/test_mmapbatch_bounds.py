"""Issue 17 item 6: the in-process privcmd's MMAPBATCH_V2 gathers its array as Linux's
gather_array does, a page at a time, so a huge ``num`` costs what the array really holds:
EFAULT where its memory ends, ENOMEM past what the mock gathers (``GATHER_MAX``), never
an allocation of ``8 * num`` bytes."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import time
import tracemalloc
from collections.abc import Iterator

import pytest

from xendmop.abi.privcmd import IOCTL_PRIVCMD_MMAPBATCH_V2, privcmd_mmapbatch_v2
from xendmop.mock import MockXen
from xendmop.mock.privcmd import GATHER_MAX

from .raw import errno_of

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


@pytest.fixture
def host() -> Iterator[MockXen]:
    with MockXen() as xen:
        yield xen


def _batch(host: MockXen, domid: int, num: int, arr: int) -> int:
    dev = host.open_device("/dev/xen/privcmd")
    vma = dev.mmap(mmap.PAGESIZE)
    err = (ctypes.c_int * 4)()
    anchor = ctypes.c_char.from_buffer(vma)
    try:
        m = privcmd_mmapbatch_v2(num, domid, ctypes.addressof(anchor), arr, ctypes.addressof(err))
        return errno_of(dev.ioctl, IOCTL_PRIVCMD_MMAPBATCH_V2, m)
    finally:
        del anchor
        vma.close()
        dev.close()


@pytest.mark.parametrize("num", [0x17727A23, 2**31 + 1, 2**32 - 1, 2])
def test_a_huge_num_over_a_short_array_is_efault_without_allocating(host: MockXen, num: int) -> None:
    domid = host.create_domain(vcpus=1, hvm=True, memory_mb=4)
    # one frame number at the end of a page that a PROT_NONE page follows
    area = mmap.mmap(-1, 2 * mmap.PAGESIZE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(area))
    assert _libc.mprotect(ctypes.c_void_p(base + mmap.PAGESIZE), mmap.PAGESIZE, 0) == 0
    arr = base + mmap.PAGESIZE - 8
    tracemalloc.start()
    started = time.monotonic()
    try:
        got = _batch(host, domid, num, arr)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == errno.EFAULT  # as Linux 6.1 answered in the lab ("raw mmapbatch array bounds")
    assert peak < 3 * GATHER_MAX  # was 3 GiB and a MemoryError for num=0x17727a23
    assert time.monotonic() - started < 5


def test_an_array_readable_past_gather_max_is_enomem(host: MockXen) -> None:
    domid = host.create_domain(vcpus=1, hvm=True, memory_mb=4)
    area = mmap.mmap(-1, 2 * GATHER_MAX)  # readable zeros: gfn 0 over and over
    arr = ctypes.addressof(ctypes.c_char.from_buffer(area))
    assert _batch(host, domid, GATHER_MAX // 8 + 1, arr) == errno.ENOMEM


def test_num_zero_is_einval_and_one_valid_frame_maps(host: MockXen) -> None:
    domid = host.create_domain(vcpus=1, hvm=True, memory_mb=4)
    gfn = (ctypes.c_uint64 * 1)(0x100)
    assert _batch(host, domid, 0, ctypes.addressof(gfn)) == errno.EINVAL
    assert _batch(host, domid, 1, ctypes.addressof(gfn)) == 0
