"""The zero-copy forms of the bulk calls against the mock Xen, in this process and across
processes: the simulated kernel reads and writes the caller's own buffers (a mock host in
another process reaches them through the client, as copy_{from,to}_user would), and the
answers are the ones the bytes forms get."""

from __future__ import annotations

import ctypes

import pytest

from xendmop import DeviceModel
from xendmop.abi.dm_op import xen_dm_op_modified_memory_extent
from xendmop.mock import MockXen
from xendmop.mock.remote import RemoteXen

PAGE = 4096


def _extents(*pairs: tuple[int, int]) -> ctypes.Array[xen_dm_op_modified_memory_extent]:
    array = (xen_dm_op_modified_memory_extent * len(pairs))()
    for i, (first_pfn, nr) in enumerate(pairs):
        array[i].first_pfn, array[i].nr = first_pfn, nr
    return array


def test_dirty_bitmap_lands_in_out_as_in_bytes(xen_host: MockXen, hvm_domain: int) -> None:
    with DeviceModel.open("mock", xen=xen_host) as dm:
        out = (ctypes.c_ulong * 1)()  # 8 bytes for 20 pages: more room than needed is fine
        assert dm.track_dirty_vram(hvm_domain, 100, 20, out=out) is out
        assert bytes(out)[:3] == b"\xff" * 3  # a new range: every page dirty
        xen_host.guest_write(hvm_domain, 105 * PAGE + 7, b"x")
        xen_host.guest_write(hvm_domain, 119 * PAGE, b"y")
        view = bytearray(3)
        assert dm.track_dirty_vram(hvm_domain, 100, 20, out=view) is view
        assert view == bytes([1 << 5, 0, 1 << 3])
        assert dm.track_dirty_vram(hvm_domain, 100, 20) == bytes(3)  # the bytes form agrees: all read


def test_packed_extents_mark_pages_dirty(xen_host: MockXen, hvm_domain: int) -> None:
    with DeviceModel.open("mock", xen=xen_host) as dm:
        xen_host.set_log_dirty(hvm_domain)
        dm.modified_memory_bulk(hvm_domain, _extents((10, 2), (40, 1)))
        dm.modified_memory_bulk(hvm_domain, bytearray(_extents((50, 1))))
        dm.modified_memory_bulk(hvm_domain, bytes(_extents((60, 1))))  # read-only: through the arena
        assert xen_host.domain(hvm_domain).dirty == frozenset({10, 11, 40, 50, 60})


def test_zero_copy_forms_across_processes(mock_host_process: str) -> None:
    with RemoteXen(mock_host_process) as xen, DeviceModel.open("mock", xen=xen) as dm:
        domid = xen.create_domain(vcpus=1, hvm=True, memory_mb=4)
        out = bytearray(b"\x5a" * 4)
        assert dm.track_dirty_vram(domid, 100, 20, out=out) is out
        assert out == b"\xff" * 3 + b"\x5a"  # three bytes written in this process's memory, no more
        array = (ctypes.c_uint8 * 3)()
        dm.track_dirty_vram(domid, 100, 20, out=array)
        assert bytes(array) == bytes(3)
        dm.modified_memory_bulk(domid, _extents((10, 2), (40, 1)))  # accepted (not in log-dirty mode)
        with pytest.raises(TypeError, match="EFAULT"):
            dm.track_dirty_vram(domid, 100, 20, out=bytes(3))
