"""Golden bytes for the zero-copy forms of the bulk calls: ``track_dirty_vram(..., out=buffer)``
and ``modified_memory_bulk`` with extents already packed send what libxendevicemodel sends when
given the same memory, and leave the same answer in it.

Both run in subprocesses under ``golden/fakexen.c`` (see ``test_golden_bytes.py``): this module
is also the driver (``python -m test_zero_copy_golden xendmop|libxendevicemodel``), one case per
form.  The out buffers start filled with a pattern, not zeros: libxendevicemodel hands the
caller's bitmap to the kernel as it is, so the bytes the fake logs for it show whether xendmop
does too (and, on the HYPERCALL path, whether its bounce copy starts from the caller's bytes).
"""

from __future__ import annotations

import array
import ctypes
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from golden import fake
from golden.compare import first_difference

DOMID = 7
PFN = 0xF_0000
PAGES_PER_CALL = 8 * 4096  # privcmd's default dm_op_buf_max_size, in bitmap bits
EXTENTS_PER_CALL = 4096 // 16
PATTERN = 0x5A


class Extent(ctypes.Structure):
    """struct xen_dm_op_modified_memory_extent, written here independently of xendmop"""

    _fields_ = [("nr", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("first_pfn", ctypes.c_uint64)]


def _extents(n: int) -> ctypes.Array[Extent]:
    return (Extent * n)(*(Extent(nr=1 + i % 7, first_pfn=0x10_0000 + 0x40 * i) for i in range(n)))


def _address(buffer: Any) -> int:
    """Where a buffer's bytes are (a ctypes object or a writable buffer)."""
    if isinstance(buffer, (ctypes.Array, ctypes.Structure)):
        return ctypes.addressof(buffer)
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


# --- the cases: (label, make the out buffer or the extents, nr pages for track_dirty_vram) ---------


def _bitmap_bytearray(nr: int) -> Any:
    return bytearray([PATTERN]) * ((nr + 7) // 8)


def _bitmap_ulongs(nr: int) -> Any:
    words = (ctypes.c_ulong * -(-nr // 64))()
    ctypes.memset(words, PATTERN, ctypes.sizeof(words))
    return words


def _bitmap_view(nr: int) -> Any:  # a writable slice of a larger buffer
    return memoryview(bytearray([PATTERN]) * ((nr + 7) // 8 + 5))[5:]


TRACK = [
    ("out=bytearray", _bitmap_bytearray, 100),
    ("out=ctypes c_ulong array", _bitmap_ulongs, 100),
    ("out=memoryview slice", _bitmap_view, 100),
    ("out=bytearray, one full call", _bitmap_bytearray, PAGES_PER_CALL),
    ("out=bytearray, split in two", _bitmap_bytearray, PAGES_PER_CALL + 7232),
    ("out=empty bytearray, nr 0 (stop tracking)", _bitmap_bytearray, 0),
]

BULK: list[tuple[str, Callable[[], Any]]] = [
    ("ctypes array of 3", lambda: _extents(3)),
    ("bytearray of 3", lambda: bytearray(_extents(3))),
    ("bytes of 3 (read-only: copied)", lambda: bytes(_extents(3))),
    ("array('Q') of 3", lambda: array.array("Q", bytes(_extents(3)))),
    ("ctypes array of 256 (one full call)", lambda: _extents(EXTENTS_PER_CALL)),
    ("ctypes array of 300 (split)", lambda: _extents(300)),
]

LABELS = [f"track_dirty_vram {label}" for label, _, _ in TRACK] + [f"modified_memory_bulk {label}" for label, _ in BULK]
SPLIT = {
    LABELS.index("track_dirty_vram out=bytearray, split in two"),
    LABELS.index("modified_memory_bulk ctypes array of 300 (split)"),
}


# --- the driver -------------------------------------------------------------------------------


def _xendmop() -> tuple[Callable[..., Any], Callable[..., Any], Callable[[], None]]:
    from xendmop import DeviceModel
    from xendmop.backends.privcmd import PrivcmdBackend

    dm = DeviceModel(PrivcmdBackend())
    return dm.track_dirty_vram, dm.modified_memory_bulk, dm.close


def _libxendevicemodel() -> tuple[Callable[..., Any], Callable[..., Any], Callable[[], None]]:
    """libxendevicemodel given the caller's memory, chunked to privcmd's limits as xendmop splits."""
    c = ctypes.CDLL("libxendevicemodel.so.1", use_errno=True)
    c.xendevicemodel_open.restype = ctypes.c_void_p
    c.xendevicemodel_open.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    handle = ctypes.c_void_p(c.xendevicemodel_open(None, 0))
    track = c.xendevicemodel_track_dirty_vram
    track.argtypes = [ctypes.c_void_p, ctypes.c_uint16, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p]
    bulk = c.xendevicemodel_modified_memory_bulk
    bulk.argtypes = [ctypes.c_void_p, ctypes.c_uint16, ctypes.c_void_p, ctypes.c_uint32]

    def checked(rc: int) -> None:
        if rc:
            raise OSError(ctypes.get_errno(), "libxendevicemodel")

    def track_dirty_vram(domid: int, first_pfn: int, nr: int, out: Any) -> Any:
        base = _address(out) if (nr + 7) // 8 else None
        for done in range(0, nr, PAGES_PER_CALL) if nr else [0]:
            n = min(PAGES_PER_CALL, nr - done)
            checked(track(handle, domid, first_pfn + done, n, base + done // 8 if base else None))
        return out

    def modified_memory_bulk(domid: int, extents: Any) -> None:
        packed = (Extent * (memoryview(extents).nbytes // 16)).from_buffer_copy(extents)
        for start in range(0, len(packed), EXTENTS_PER_CALL):
            count = min(EXTENTS_PER_CALL, len(packed) - start)
            checked(bulk(handle, domid, ctypes.addressof(packed) + 16 * start, count))

    def close() -> None:
        c.xendevicemodel_close.argtypes = [ctypes.c_void_p]
        c.xendevicemodel_close(handle)

    return track_dirty_vram, modified_memory_bulk, close


def main(which: str) -> None:
    log = os.open(os.environ["FAKEXEN_LOG"], os.O_WRONLY | os.O_APPEND)

    def emit(event: dict[str, Any]) -> None:
        os.write(log, (json.dumps(event) + "\n").encode())

    track_dirty_vram, modified_memory_bulk, close = _xendmop() if which == "xendmop" else _libxendevicemodel()
    case = 0
    for _, make, nr in TRACK:
        emit({"event": "mark", "case": case, "method": "track_dirty_vram"})
        out = make(nr)
        returned = track_dirty_vram(DOMID, PFN, nr, out)
        emit({"event": "result", "case": case, "same": returned is out, "hex": bytes(out).hex()})
        case += 1
    for _, make_extents in BULK:
        emit({"event": "mark", "case": case, "method": "modified_memory_bulk"})
        extents = make_extents()
        emit({"event": "result", "case": case, "value": modified_memory_bulk(DOMID, extents)})
        case += 1
    close()
    emit({"event": "mark", "case": case, "method": "close"})


# --- the tests --------------------------------------------------------------------------------


def _run(fakexen: Path, which: str, **extra: str) -> fake.Run:
    log = fakexen.parent / f"zero-copy-{which}-{'-'.join(sorted(extra)) or 'dm_op'}.log"
    log.write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "test_zero_copy_golden", which],
        env=fake.fake_env(fakexen, log, **extra),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{which} driver failed:\n{proc.stdout}\n{proc.stderr}"
    return fake.parse(log)


@pytest.fixture(scope="module")
def dm_op(fakexen: Path) -> tuple[fake.Run, fake.Run]:
    return _run(fakexen, "xendmop"), _run(fakexen, "libxendevicemodel")


@pytest.fixture(scope="module")
def hypercall(fakexen: Path) -> tuple[fake.Run, fake.Run]:
    return _run(fakexen, "xendmop", FAKEXEN_NO_DM_OP="1"), _run(fakexen, "libxendevicemodel", FAKEXEN_NO_DM_OP="1")


CASES = [pytest.param(i, id=label) for i, label in enumerate(LABELS)]


@pytest.mark.parametrize("index", CASES)
def test_zero_copy_forms_send_libxendevicemodels_bytes(dm_op: tuple[fake.Run, fake.Run], index: int) -> None:
    ours, theirs = dm_op
    assert ours.requests(index), f"{LABELS[index]} sent nothing"
    assert {r["event"] for r in ours.requests(index)} == {"dm_op"}
    assert first_difference(ours.requests(index), theirs.requests(index), ("xendmop", "libxendevicemodel")) is None
    assert ours.results[index] == theirs.results[index]
    assert len(ours.requests(index)) == (2 if index in SPLIT else 1)


@pytest.mark.parametrize("index", CASES)
def test_hypercall_fallback_sends_libxendevicemodels_bytes(hypercall: tuple[fake.Run, fake.Run], index: int) -> None:
    ours, theirs = hypercall
    assert {r["event"] for r in ours.requests(index)} == {"hypercall"}
    assert first_difference(ours.requests(index), theirs.requests(index), ("xendmop", "libxendevicemodel")) is None
    assert ours.results[index] == theirs.results[index]


def test_the_bitmap_lands_in_out_and_out_is_returned(dm_op: tuple[fake.Run, fake.Run]) -> None:
    """The answers compared above are the fake's pattern, not the buffers' own bytes left as they were."""
    ours, _ = dm_op
    for index, (_, _, nr) in enumerate(TRACK):
        result = ours.results[index]
        assert result["same"] is True
        if nr:
            assert bytes.fromhex(result["hex"]) != bytes([PATTERN]) * ((nr + 7) // 8)
    sent = ours.requests(0)[0]["bufs"][1]  # the caller's bytes reached the kernel as they were
    assert bytes.fromhex(sent["bytes"]) == bytes([PATTERN]) * 13


if __name__ == "__main__":
    main(sys.argv[1])
