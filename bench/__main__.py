"""``python -m bench [--profile] [NAME ...]``: run the benchmarks, print a table of ratios.

NAME is one of dmop_overhead, ioreq_roundtrip, bulk_scaling, import_open, virtio_queue (default: all).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from . import RESULTS, bulk_scaling, dmop_overhead, import_open, ioreq_roundtrip, virtio_queue

BENCHMARKS = ("dmop_overhead", "ioreq_roundtrip", "bulk_scaling", "import_open", "virtio_queue")


def rows_dmop(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for fake, label in (("userspace", "fake"), ("syscall", "fake+syscall")):
        for op, v in r[fake]["ops"].items():
            us = v["us"]
            rows.append((
                f"1 {op} [{label}]",
                f"{us['xendmop']:.2f} us | ctypes {us['ctypes']:.2f} | ioctl {us['ioctl']:.2f}"
                f" | pycall {us['pycall']:.2f} | sketch {us['sketch']:.2f}",
                f"x/ctypes {v['xendmop/ctypes']:.2f}  x/ioctl {v['xendmop/ioctl']:.2f}"
                f"  (pycall/ioctl {v['pycall/ioctl']:.2f}  sketch/ctypes {v['sketch/ctypes']:.2f})",
            ))
    return rows


def rows_ioreq(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    one = r["one_process"]
    per_s, us = one["round_trips_per_s"], one["us_per_round_trip"]
    inline = r["inline"]
    x = r["across_processes"]
    xper_s, xus = x["round_trips_per_s"], x["us_per_round_trip"]
    return [
        (
            "2 ioreq round trip, 1 process",
            f"{per_s['mock']}/s | wired {per_s['wired']}/s | eventfd {per_s['eventfd']}/s"
            f" | select {per_s['select']}/s | Event {per_s['event']}/s",
            f"mock/eventfd {one['mock/eventfd']:.2f}  wired/eventfd {one['wired/eventfd']:.2f}"
            f"  mock/wired {one['mock/wired']:.2f}  select/eventfd {one['select/eventfd']:.2f}"
            f"  Event/eventfd {one['event/eventfd']:.2f}",
        ),
        (
            "2 device model CPU per access",
            f"{inline['us_per_access']['dm']:.2f} us | eventfd syscalls {inline['us_per_access']['eventfd']:.2f} us",
            f"dm/eventfd {inline['dm/eventfd']:.2f}  (round trip: mock {us['mock']:.1f} us,"
            f" wired {us['wired']:.1f} us)",
        ),
        (
            "2 ioreq round trip, 2-3 processes",
            f"host guest {xper_s['host_guest']}/s | RemoteGuest {xper_s['remote_guest']}/s"
            f" | eventfd 2 processes {xper_s['eventfd2p']}/s",
            f"host_guest/eventfd2p {x['host_guest/eventfd2p']:.2f}  remote_guest/eventfd2p"
            f" {x['remote_guest/eventfd2p']:.2f}  (host guest {xus['host_guest']:.1f} us,"
            f" RemoteGuest {xus['remote_guest']:.1f} us)",
        ),
    ]


def rows_bulk(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for op, v in r["ops"].items():
        t, m = v["time_per_unit_vs_n"], v["peak_per_unit_vs_n"]
        rows.append((
            f"3 {op} n/10n/100n",
            " / ".join(f"{x:.2f}" for x in v["ns_per_unit"].values()) + f" ns/{v['unit']}",
            f"time/unit {t['10n']:.2f} {t['100n']:.2f}  peak/unit {m['10n']:.2f} {m['100n']:.2f}",
        ))
    return rows


def rows_import(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for key in ("bytecode_cached", "no_bytecode_cache"):
        if key in r:
            v = r[key]
            rows.append((
                f"4 import / open [{key}]",
                f"pass {v['ms']['pass']:.0f} | import {v['ms']['import']:.0f} | +open {v['ms']['import+open']:.0f} ms",
                f"import/pass {v['import/pass']:.2f}  open/pass {v['import+open/pass']:.2f}",
            ))
    return rows


def rows_virtio(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for kind, v in r["devices"].items():
        sizes = list(v["requests_per_s"])
        rows.append((
            f"5 virtio-{kind} queue {'/'.join(sizes)}",
            " / ".join(f"{v['requests_per_s'][s]}" for s in sizes) + " requests/s",
            f"per request vs queue {sizes[0]}: "
            + " ".join(f"{v['per_request_vs_smallest'][s]:.2f}" for s in sizes),
        ))
    return rows


NOTES = (
    "2: mock = SimGuest on the mock Xen; wired = the same device model, the guest a minimal loop on an eventfd",
    "pair; select = the eventfd ping-pong with the peer in a selectors loop (a select-based DM's floor);",
    "Event = a two-thread threading.Event ping-pong (the hand-off the mock's guest used to wait on).",
    "2 processes: the mock host here, the DM a child serving over XENDMOP_MOCK_SOCKET; host guest = SimGuest",
    "in the host process (where Xen runs a vCPU), RemoteGuest = a third process, one JSON request per access.",
    "x = xendmop; ctypes = libxendevicemodel.so.1 via ctypes (a); ioctl = bare fcntl.ioctl (b);",
    "pycall = a Python function whose body is the bare ioctl (the floor of any Python API);",
    "sketch = a prototype fast path in bench/dmop_overhead.py (what the suggested changes can reach).",
    "[fake]: the no-log fake answers in user space (no kernel entry); [fake+syscall]: plus one real",
    "ioctl syscall per DM_OP.  Ratios are medians of per-round ratios, measured interleaved.",
    "5: the simulated guest makes 8 requests available per notify (one MMIO write); rng 64 bytes each,",
    "blk a 512-byte read through an indirect table, net a 1514-byte frame sent (one descriptor);",
    "the same batches at every queue size.",
)


def main(argv: list[str]) -> int:
    profile = "--profile" in argv
    names = [a for a in argv if not a.startswith("-")] or list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        print(f"unknown benchmark(s): {', '.join(sorted(unknown))}; choose from {', '.join(BENCHMARKS)}")
        return 2
    rows: list[tuple[str, str, str]] = []
    targets: dict[str, bool] = {}
    profiles: dict[str, Any] = {}
    for name in names:
        t = time.monotonic()
        if name == "dmop_overhead":
            r = dmop_overhead.run(profile)
            rows += rows_dmop(r)
            if profile:
                profiles[name] = r["userspace"]["profile"]
        elif name == "ioreq_roundtrip":
            r = ioreq_roundtrip.run(profile)
            rows += rows_ioreq(r)
            if profile:
                profiles[name] = r["profile"]
        elif name == "virtio_queue":
            r = virtio_queue.run()
            rows += rows_virtio(r)
        elif name == "bulk_scaling":
            r = bulk_scaling.run()
            rows += rows_bulk(r)
        else:
            r = import_open.run()
            rows += rows_import(r)
        targets.update({f"{name}: {k}": v for k, v in r.get("targets", {}).items()})
        print(f"[{name}: {time.monotonic() - t:.1f} s]", file=sys.stderr)
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, width)).rstrip())
    print()
    for line in NOTES:
        print(line)
    print()
    for target, met in targets.items():
        print(f"{'met   ' if met else 'MISSED'}  {target}")
    print(f"\nresults: {RESULTS}/*.json")
    for name, prof in profiles.items():
        print(f"\n=== cProfile: {name} ===")
        if isinstance(prof, dict):
            for op, text in prof.items():
                print(f"--- {op} ---\n{text}")
        else:
            print(prof)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
