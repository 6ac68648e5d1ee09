"""Benchmark 1: DMOP call overhead over the (no-log) fake /dev/xen/privcmd.

Three ways to make the same three calls, in one subprocess under ``LD_PRELOAD``:

- ``xendmop``: ``DeviceModel(PrivcmdBackend())``, with the zero-copy forms of the bulk ops
  (``FORMS``): the bitmap written into a caller's ctypes array (``out=``), the extents a
  prebuilt ctypes array that the DM_OP ioctl is pointed at;
- ``ctypes``: (a) Debian's ``libxendevicemodel.so.1`` through ctypes, argtypes declared,
  arguments prebuilt, return value checked: what a Python user would otherwise write.  It
  too passes the caller's memory (the same kind of bitmap array, the same extents);
- ``ioctl``: (b) the floor, ``fcntl.ioctl(fd, IOCTL_PRIVCMD_DM_OP, req, True)`` on a prebuilt
  request and prebuilt buffers.

Two more, for information (not targets): ``pycall``, a Python function of the op's arguments
whose whole body is that bare ``fcntl.ioctl`` (the floor of any Python-level API: one call
frame on top of the ioctl, no checks, no marshalling); and ``sketch``, a ~50-line prototype of the suggested
fast path (one arena with the request header and bufs[] prebuilt, the op packed by a
precompiled ``struct.Struct``, ``fcntl.ioctl`` on a prebuilt ctypes view of the header), to put
a number on what the suggestions can reach.

The fake answers in user space, so the floor has no kernel entry at all; each benchmark is
therefore run twice: ``userspace`` (as the brief defines it) and ``syscall`` (the fake adds one
real ``ioctl`` syscall per DM_OP, as the real privcmd path costs at least that).
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import build_fake, child_env, interleave, median, ratio_samples, write_result

DOMID = 1
NR_PAGES = 32768  # 4 KiB bitmap: one kernel-sized buffer
NR_EXTENTS = 256  # 4 KiB of extents: one kernel-sized buffer
OPS = ("set_isa_irq_level", "track_dirty_vram", "modified_memory_bulk")
IMPLS = ("xendmop", "ctypes", "ioctl", "pycall", "sketch")
MODES = {"userspace": {}, "syscall": {"FASTFAKE_SYSCALL": "1"}}
ROUNDS = 15
#: how the xendmop candidate makes the bulk calls (printed with the result)
FORMS = {
    "track_dirty_vram": "track_dirty_vram(domid, first_pfn, nr, out=<ctypes c_ulong array>): Xen writes into it",
    "modified_memory_bulk": "modified_memory_bulk(domid, <ctypes array of extents>): the ioctl points at it",
    "ctypes": "libxendevicemodel is passed the caller's memory too (a c_ulong bitmap array, the same extents)",
}


def _timer(call: Any, *args: Any) -> Any:
    perf = time.perf_counter

    def timed(n: int) -> float:
        t = perf()
        for _ in range(n):
            call(*args)
        return perf() - t

    return timed


def _setup() -> tuple[dict[str, dict[str, Any]], Any]:
    import fcntl
    import os

    from xendmop import DeviceModel
    from xendmop.abi.dm_op import xen_dm_op, xen_dm_op_modified_memory_extent
    from xendmop.abi.privcmd import IOCTL_PRIVCMD_DM_OP, privcmd_dm_op, privcmd_dm_op_buf
    from xendmop.backends.privcmd import PrivcmdBackend
    from xendmop.ops import BY_NAME

    extents = (xen_dm_op_modified_memory_extent * NR_EXTENTS)()
    for i in range(NR_EXTENTS):
        extents[i].first_pfn, extents[i].nr = 0x1000 + 16 * i, 4

    dm = DeviceModel(PrivcmdBackend())
    assert dm.backend.uses_hypercall is False
    out = (ctypes.c_ulong * (NR_PAGES // 64))()  # the same kind of bitmap the ctypes baseline passes
    xendmop = {
        "set_isa_irq_level": (dm.set_isa_irq_level, DOMID, 11, 1),
        "track_dirty_vram": (dm.track_dirty_vram, DOMID, 0xF0000, NR_PAGES, out),
        "modified_memory_bulk": (dm.modified_memory_bulk, DOMID, extents),
    }

    c = ctypes.CDLL("libxendevicemodel.so.1", use_errno=True)
    c.xendevicemodel_open.restype = ctypes.c_void_p
    c.xendevicemodel_open.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    handle = ctypes.c_void_p(c.xendevicemodel_open(None, 0))
    if not handle.value:
        raise OSError(ctypes.get_errno(), "xendevicemodel_open")
    isa = c.xendevicemodel_set_isa_irq_level
    isa.argtypes = [ctypes.c_void_p, ctypes.c_uint16, ctypes.c_uint8, ctypes.c_uint]
    vram = c.xendevicemodel_track_dirty_vram
    vram.argtypes = [ctypes.c_void_p, ctypes.c_uint16, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p]
    bulk = c.xendevicemodel_modified_memory_bulk
    bulk.argtypes = [ctypes.c_void_p, ctypes.c_uint16, ctypes.c_void_p, ctypes.c_uint32]
    for fn in (isa, vram, bulk):
        fn.restype = ctypes.c_int
    bitmap = (ctypes.c_ulong * (NR_PAGES // 64))()
    bitmap_addr, extents_addr = ctypes.addressof(bitmap), ctypes.addressof(extents)

    def checked(fn: Any) -> Any:
        def call(*args: Any) -> None:
            if fn(*args):
                raise OSError(ctypes.get_errno(), fn.__name__)

        return call

    creference = {
        "set_isa_irq_level": (checked(isa), handle, DOMID, 11, 1),
        "track_dirty_vram": (checked(vram), handle, DOMID, 0xF0000, NR_PAGES, bitmap_addr),
        "modified_memory_bulk": (checked(bulk), handle, DOMID, extents_addr, NR_EXTENTS),
    }

    fd = os.open("/dev/xen/privcmd", os.O_RDWR | os.O_CLOEXEC)
    keep: list[Any] = []

    def request(name: str, fields: dict[str, int], extra: Any = None) -> privcmd_dm_op:
        op = xen_dm_op(op=BY_NAME[name].number)
        for key, value in fields.items():
            setattr(getattr(op.u, name), key, value)
        parts = [op] + ([extra] if extra is not None else [])
        bufs = (privcmd_dm_op_buf * len(parts))(
            *(privcmd_dm_op_buf(ctypes.addressof(p), ctypes.sizeof(p)) for p in parts)
        )
        keep.extend([*parts, bufs])
        return privcmd_dm_op(dom=DOMID, num=len(parts), ubufs=ctypes.addressof(bufs))

    floor = {
        "set_isa_irq_level": request("set_isa_irq_level", {"isa_irq": 11, "level": 1}),
        "track_dirty_vram": request("track_dirty_vram", {"first_pfn": 0xF0000, "nr": NR_PAGES}, bitmap),
        "modified_memory_bulk": request("modified_memory", {"nr_extents": NR_EXTENTS}, extents),
    }
    ioctl = {name: (fcntl.ioctl, fd, IOCTL_PRIVCMD_DM_OP, req, True) for name, req in floor.items()}

    def pycall(req: privcmd_dm_op) -> Any:
        bare = fcntl.ioctl

        def call(*args: Any) -> None:  # the op's arguments, unused: only the frame is paid for
            bare(fd, IOCTL_PRIVCMD_DM_OP, req, True)

        return call

    pycalls = {
        "set_isa_irq_level": (pycall(floor["set_isa_irq_level"]), DOMID, 11, 1),
        "track_dirty_vram": (pycall(floor["track_dirty_vram"]), DOMID, 0xF0000, NR_PAGES),
        "modified_memory_bulk": (pycall(floor["modified_memory_bulk"]), DOMID, extents),
    }
    sk = Sketch(fd, IOCTL_PRIVCMD_DM_OP)
    sketch = {
        "set_isa_irq_level": (sk.set_isa_irq_level, DOMID, 11, 1),
        "track_dirty_vram": (sk.track_dirty_vram, DOMID, 0xF0000, NR_PAGES),
        "modified_memory_bulk": (sk.modified_memory_bulk, DOMID, extents),
    }
    keep.extend([extents, floor, sk, out, dm])
    return {"xendmop": xendmop, "ctypes": creference, "ioctl": ioctl, "pycall": pycalls, "sketch": sketch}, keep


class Sketch:
    """A prototype of the suggested fast path (for its numbers only; not a proposal of API).

    One arena: the privcmd_dm_op at 0, two privcmd_dm_op_bufs at 16, the 32-byte xen_dm_op at
    64 (bufs[0], fixed), slot data at 4096 (bufs[1]).  A call packs the op's fields (zero-padded
    to 32 bytes) and the header with precompiled ``struct.Struct``s and hands fcntl the arena's
    prebuilt ctypes view of the header.  Range checks are kept (a comparison per field).
    """

    def __init__(self, fd: int, request: int) -> None:
        import fcntl
        import mmap
        import struct

        self._mem = mmap.mmap(-1, 8192)
        self.view = memoryview(self._mem)
        anchor = ctypes.c_char.from_buffer(self._mem)
        self._anchor = anchor
        base = ctypes.addressof(anchor)
        from xendmop.abi.privcmd import privcmd_dm_op

        self.header = privcmd_dm_op.from_address(base)
        self.fd, self.request, self.ioctl = fd, request, fcntl.ioctl
        struct.Struct("<QQQQ").pack_into(self.view, 16, base + 64, 32, base + 4096, 0)
        self.head = struct.Struct("<HH4xQ")  # dom, num, ubufs
        self.slot_size = struct.Struct("<Q")  # bufs[1].size at 40
        self.isa = struct.Struct("<II BB30x")  # op 9: isa_irq, level
        self.vram = struct.Struct("<II IIQ16x")  # op 7: nr, pad, first_pfn
        self.mm = struct.Struct("<II II24x")  # op 11: nr_extents, opaque
        self.bufs = base + 16

    def _check(self, domid: int) -> None:
        if not 0 <= domid <= 0xFFFF:
            raise ValueError("domid")

    def set_isa_irq_level(self, domid: int, irq: int, level: int) -> None:
        if not (0 <= domid <= 0xFFFF and 0 <= irq <= 15 and 0 <= level <= 1):
            raise ValueError("set_isa_irq_level")
        view = self.view
        self.head.pack_into(view, 0, domid, 1, self.bufs)
        self.isa.pack_into(view, 64, 9, 0, irq, level)
        self.ioctl(self.fd, self.request, self.header, True)

    def track_dirty_vram(self, domid: int, first_pfn: int, nr: int) -> bytes:
        if not (0 <= domid <= 0xFFFF and 0 <= first_pfn < 1 << 64 and 0 <= nr <= 32768):
            raise ValueError("track_dirty_vram")
        view = self.view
        nbytes = -(-nr // 64) * 8
        self.head.pack_into(view, 0, domid, 2, self.bufs)
        self.slot_size.pack_into(view, 40, nbytes)
        self.vram.pack_into(view, 64, 7, 0, nr, 0, first_pfn)
        view[4096 : 4096 + nbytes] = bytes(nbytes)
        self.ioctl(self.fd, self.request, self.header, True)
        return view[4096 : 4096 + (nr + 7) // 8].tobytes()

    def modified_memory_bulk(self, domid: int, extents: Any) -> None:
        self._check(domid)
        raw = memoryview(extents).cast("B")
        view, total = self.view, raw.nbytes
        for start in range(0, total, 4096):
            chunk = raw[start : start + 4096]
            n = chunk.nbytes
            self.head.pack_into(view, 0, domid, 2, self.bufs)
            self.slot_size.pack_into(view, 40, n)
            self.mm.pack_into(view, 64, 11, 0, n // 16, 0)  # re-marshalled per call: continuations
            view[4096 : 4096 + n] = chunk
            self.ioctl(self.fd, self.request, self.header, True)


def child(profile: bool) -> dict[str, Any]:
    calls, _keep = _setup()
    out: dict[str, Any] = {}
    for op in OPS:
        candidates = {impl: _timer(*calls[impl][op]) for impl in IMPLS}
        out[op] = interleave(candidates, ROUNDS)
    if profile:
        out["profile"] = {
            op: profile_calls(calls["xendmop"][op], 20000 if op == "set_isa_irq_level" else 4000) for op in OPS
        }
    return out


def profile_calls(call: tuple[Any, ...], n: int) -> str:
    import cProfile
    import io
    import pstats

    fn, *args = call
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn(*args)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(14)
    return text.getvalue()


def _child(fake: Path, mode: str, profile: bool) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.dmop_overhead", "--child"] + (["--profile"] if profile else []),
        env=child_env(LD_PRELOAD=str(fake), **MODES[mode]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode:
        raise RuntimeError(f"dmop_overhead child failed:\n{proc.stdout}\n{proc.stderr}")
    raw: dict[str, Any] = json.loads(proc.stdout)
    return raw


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"ops": {}}
    for op in OPS:
        s = raw[op]
        out["ops"][op] = {
            "us": {impl: round(median(s[impl]) * 1e6, 3) for impl in IMPLS},
            "xendmop/ctypes": round(ratio_samples(s["xendmop"], s["ctypes"]), 3),
            "xendmop/ioctl": round(ratio_samples(s["xendmop"], s["ioctl"]), 3),
            "ctypes/ioctl": round(ratio_samples(s["ctypes"], s["ioctl"]), 3),
            "pycall/ioctl": round(ratio_samples(s["pycall"], s["ioctl"]), 3),
            "xendmop/pycall": round(ratio_samples(s["xendmop"], s["pycall"]), 3),
            "sketch/ctypes": round(ratio_samples(s["sketch"], s["ctypes"]), 3),
            "sketch/ioctl": round(ratio_samples(s["sketch"], s["ioctl"]), 3),
        }
    isa = out["ops"]["set_isa_irq_level"]
    out["targets"] = {
        "xendmop <= 1x ctypes (every op)": all(v["xendmop/ctypes"] <= 1.0 for v in out["ops"].values()),
        "set_isa_irq_level xendmop <= 3x ioctl": isa["xendmop/ioctl"] <= 3.0,
    }
    if "profile" in raw:
        out["profile"] = raw["profile"]
    return out


def run(profile: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {"unit": "us per call", "rounds": ROUNDS, "impls": list(IMPLS), "xendmop_forms": FORMS}
    for line in FORMS.values():  # which forms the ratios are of
        print(f"[dmop_overhead: {line}]", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        fake = build_fake(Path(tmp))
        for mode in MODES:
            result[mode] = summarise(_child(fake, mode, profile and mode == "userspace"))
    result["targets"] = {f"[{mode}] {k}": v for mode in MODES for k, v in result[mode]["targets"].items()}
    write_result("dmop_overhead", result)
    return result


if __name__ == "__main__":
    if "--child" in sys.argv:
        print(json.dumps(child("--profile" in sys.argv)))
    else:
        print(json.dumps(run("--profile" in sys.argv), indent=2))
