"""Benchmark 3: bulk calls at n, 10n and 100n units, split into kernel-sized calls.

``modified_memory_bulk`` (n = 7680 extents, passed as a prebuilt ctypes array) and
``track_dirty_vram`` (n = 983040 pages, the bitmap returned as new ``bytes``) through
``DeviceModel`` over a cheap in-process privcmd device that answers every DM_OP with 0
and only counts.  Time per unit must stay within 15 % across sizes (linear), and
tracemalloc's peak per unit must not grow by more than 15 % (no Python object per page
or extent on the hot path).

n is 30 kernel-sized calls, so that every scale takes the same split path and a public
call's fixed cost (2-5 us: argument checks, the caller's buffer or the result's taken
once) is a few percent of it.  At n = 1 call, the one-call form was being compared with
the split one; at n = 10 calls the fixed cost still made the time per unit fall with
size (0.80-0.92 at 10n and 100n).  Neither is growth.  At 100n the bitmap is 12 MiB:
past 32 MiB, glibc gives every allocation fresh pages from the kernel (mmap), and the
page faults, not the library, would be measured.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import tracemalloc
from typing import Any

from . import interleave, median, ratio_samples, write_result

DOMID = 1
SCALES = (1, 10, 100)
N_EXTENTS = 30 * 256  # 30 kernel-sized calls: every scale is split alike (see the docstring)
N_PAGES = 30 * 32768  # 30 kernel-sized calls
ROUNDS = 15
TOLERANCE = 0.15


class CountingPrivcmd:
    """A privcmd device that answers every ioctl with 0 and counts them (no per-call record)."""

    path = "/dev/xen/privcmd"

    def __init__(self) -> None:
        self.calls = 0

    def fileno(self) -> int:
        return -1

    def ioctl(self, request: int, arg: Any) -> int:
        self.calls += 1
        return 0

    def mmap(self, length: int, offset: int = 0) -> Any:
        raise OSError(errno.ENODEV, "no mmap")

    def close(self) -> None:
        pass


def open_dm(device: CountingPrivcmd) -> Any:
    from xendmop import DeviceModel
    from xendmop.backends.privcmd import PrivcmdBackend

    def opener(path: str) -> Any:
        if path == device.path:
            return device
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)

    logging.getLogger("xendmop").setLevel(logging.ERROR)  # "cannot lock hypercall buffers"
    return DeviceModel(PrivcmdBackend(opener))


def workloads(dm: Any) -> dict[str, dict[int, tuple[Any, int]]]:
    """name -> scale -> (zero-argument call, units)."""
    from xendmop.abi.dm_op import xen_dm_op_modified_memory_extent as Extent

    out: dict[str, dict[int, tuple[Any, int]]] = {"modified_memory_bulk": {}, "track_dirty_vram": {}}
    for k in SCALES:
        n = N_EXTENTS * k
        extents = (Extent * n)()
        words = memoryview(extents).cast("B").cast("Q")  # each extent: nr and pad in one word, then first_pfn
        words[0::2] = array.array("Q", [4]) * n
        words[1::2] = array.array("Q", range(0x1000, 0x1000 + 16 * n, 16))
        assert (extents[n - 1].nr, extents[n - 1].first_pfn) == (4, 0x1000 + 16 * (n - 1))
        words.release()
        out["modified_memory_bulk"][k] = ((lambda e=extents: dm.modified_memory_bulk(DOMID, e)), n)
        pages = N_PAGES * k
        out["track_dirty_vram"][k] = ((lambda p=pages: dm.track_dirty_vram(DOMID, 0xF0000, p)), pages)
    return out


def _timer(call: Any) -> Any:
    import time

    def timed(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            call()
        return time.perf_counter() - t

    return timed


def peak_bytes(call: Any) -> int:
    call()  # warm: arenas, caches
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        call()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def run() -> dict[str, Any]:
    device = CountingPrivcmd()
    dm = open_dm(device)
    result: dict[str, Any] = {"scales": list(SCALES), "rounds": ROUNDS, "tolerance": TOLERANCE, "ops": {}}
    targets: dict[str, bool] = {}
    try:
        for name, sizes in workloads(dm).items():
            samples = interleave({str(k): _timer(call) for k, (call, _) in sizes.items()}, ROUNDS, target_s=0.03)
            before = device.calls
            sizes[1][0]()
            calls_at_n = device.calls - before
            per_unit_ns = {k: median(samples[str(k)]) / units * 1e9 for k, (_, units) in sizes.items()}
            peaks = {k: peak_bytes(call) for k, (call, _) in sizes.items()}
            per_unit_b = {k: peaks[k] / units for k, (_, units) in sizes.items()}
            # per unit at kn against per unit at n, the median of the per-round ratios (both
            # measured in the same round), as every other ratio in bench/
            time_growth = {
                f"{k}n": round(ratio_samples(samples[str(k)], samples["1"]) / k, 3) for k in SCALES[1:]
            }
            mem_growth = {f"{k}n": round(per_unit_b[k] / per_unit_b[1], 3) for k in SCALES[1:]}
            result["ops"][name] = {
                "unit": "extent" if name == "modified_memory_bulk" else "page",
                "units_at_n": sizes[1][1],
                "kernel_calls_at_n": calls_at_n,
                "ns_per_unit": {f"{k}n": round(v, 2) for k, v in per_unit_ns.items()},
                "peak_bytes": {f"{k}n": peaks[k] for k in SCALES},
                "peak_bytes_per_unit": {f"{k}n": round(v, 4) for k, v in per_unit_b.items()},
                "time_per_unit_vs_n": time_growth,
                "peak_per_unit_vs_n": mem_growth,
            }
            targets[f"{name} time linear (+-15%)"] = all(abs(g - 1) <= TOLERANCE for g in time_growth.values())
            # Informational: below 1 is a fixed per-call cost spread over more units, not growth.
            targets[f"{name} time per unit does not grow (<= +15%)"] = all(
                g <= 1 + TOLERANCE for g in time_growth.values()
            )
            targets[f"{name} peak memory <= linear (+15%)"] = all(g <= 1 + TOLERANCE for g in mem_growth.values())
    finally:
        dm.close()
    result["targets"] = targets
    write_result("bulk_scaling", result)
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
