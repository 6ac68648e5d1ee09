"""Benchmark 5: virtio requests per second on the mock as the queue size grows (flat per request).

For virtio-rng (one 64-byte device-writable buffer per request), virtio-blk (a 512-byte
read through a 3-entry indirect table: header, data, status; the disk a real file) and
virtio-net's transmit queue (a 1514-byte frame behind its 12-byte header in one descriptor,
as Linux's virtio_net lays it out with VIRTIO_F_VERSION_1, to a SOCK_SEQPACKET peer), the
simulated guest's vCPU makes ``BATCH`` requests available, notifies once (an MMIO write the
device model serves through the mock's ioreq page and event channel), and takes them back
from the used ring.  Every queue size carries the same batches, so what changes is only
the ring's size (its indices wrap over it): the time per request at each size is given as
a ratio to the smallest size, measured interleaved in the same run (median of per-round
ratios).  Target: within 15 % at every size.

The guest's side is kept lean (descriptors written once, then only the available ring's
entries and index per batch) so that the device's work per request is most of what is timed.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

from . import interleave, median, ratio_samples, write_result

SIZES = (16, 64, 256, 1024, 4096)
BATCH = 8
ROUNDS = 15
TOLERANCE = 0.15
VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_RING_EVENT_IDX = 28, 29


def _bench_one(kind: str, size: int, xen: Any, dm: Any, disk_fd: int) -> tuple[Callable[[int], float], Any]:
    import socket

    from xendmop.mock.simguest import SimGuest
    from xendmop.runtime import IoreqServer
    from xendmop.testing import ServeThread
    from xendmop.virtio import VirtioPci
    from xendmop.virtio.blk import VirtioBlk
    from xendmop.virtio.driver import VirtioPciDriver, find_virtio
    from xendmop.virtio.net import NET_HDR, TRANSMITQ, VirtioNet
    from xendmop.virtio.rng import VirtioRng
    from xendmop.virtio.spec import VIRTQ_DESC, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

    domid = xen.create_domain(vcpus=1, memory_mb=8)
    peer = None
    if kind == "net":
        mine, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        device: Any = VirtioNet(mine.fileno(), b"\x02XV\x00\x00\x07", queue_size=size)
        device.sockets = (mine, peer)  # kept open as long as the device
    elif kind == "rng":
        device = VirtioRng(queue_size=size)
    else:
        device = VirtioBlk(disk_fd, queue_size=size)
    server = IoreqServer(dm, domid, opener=xen.open_device)
    transport = VirtioPci(device, lambda: server.dispatcher.memory)
    server.add_pci(transport.pci, slot=5)
    thread = ServeThread(server).start()
    guest = SimGuest(xen, domid, timeout=10)
    driver = VirtioPciDriver(guest, find_virtio(guest, device.device_type), ram=(0x100000, 0x600000))
    driver.bring_up(1 << VIRTIO_F_RING_INDIRECT_DESC | 1 << VIRTIO_F_RING_EVENT_IDX)
    q = driver.queues[TRANSMITQ if kind == "net" else 0]
    buffers = 0x500000
    frame = NET_HDR.pack(0, 0, 0, 0, 0, 0, 0) + b"\x02XV\x00\x00\x0f" * 2 + b"\x08\x00" + bytes(1500)
    for i in range(BATCH):  # descriptor i is request i, written once
        buf = buffers + i * 0x1000
        if kind == "net":
            guest.write_ram(buf, frame)
            guest.write_ram(q.desc + 16 * i, VIRTQ_DESC.pack(buf, len(frame), 0, 0))
        elif kind == "rng":
            guest.write_ram(q.desc + 16 * i, VIRTQ_DESC.pack(buf, 64, VIRTQ_DESC_F_WRITE, 0))
        else:
            table = buf + 0x800
            header = (0).to_bytes(4, "little") + bytes(4) + (i * 8).to_bytes(8, "little")  # IN, sector 8i
            guest.write_ram(buf, header)
            entries = (
                VIRTQ_DESC.pack(buf, 16, VIRTQ_DESC_F_NEXT, 1)
                + VIRTQ_DESC.pack(buf + 0x100, 512, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2)
                + VIRTQ_DESC.pack(buf + 0x7F0, 1, VIRTQ_DESC_F_WRITE, 0)
            )
            guest.write_ram(table, entries)
            guest.write_ram(q.desc + 16 * i, VIRTQ_DESC.pack(table, len(entries), VIRTQ_DESC_F_INDIRECT, 0))

    def batches(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            for i in range(BATCH):
                q.publish(i)
            q.notify()
            done = q.get_used()
            if len(done) != BATCH:
                raise RuntimeError(f"{kind} queue {size}: {len(done)} of {BATCH} requests used")
            if peer is not None:
                for _ in range(BATCH):
                    peer.recv(2048)
        return time.perf_counter() - start

    return batches, (thread, transport)


def run() -> dict[str, Any]:
    from xendmop import DeviceModel
    from xendmop.mock import MockXen

    result: dict[str, Any] = {"sizes": list(SIZES), "batch": BATCH, "devices": {}, "targets": {}}
    with MockXen() as xen, DeviceModel.open("mock", xen=xen) as dm, tempfile.TemporaryFile() as disk:
        os.ftruncate(disk.fileno(), 1 << 20)
        for kind in ("rng", "blk", "net"):
            candidates: dict[str, Callable[[int], float]] = {}
            keep = []
            for size in SIZES:
                fn, state = _bench_one(kind, size, xen, dm, disk.fileno())
                candidates[str(size)] = fn
                keep.append(state)
            try:
                samples = interleave(candidates, ROUNDS, target_s=0.05)
            finally:
                for thread, _ in keep:
                    thread.stop()
            errors = [e for _, t in keep for e in t.errors]
            if errors:
                raise RuntimeError(f"{kind}: the device saw driver errors: {errors[:3]}")
            base = samples[str(SIZES[0])]
            per_request_us = {s: median(samples[str(s)]) / BATCH * 1e6 for s in SIZES}
            ratios = {s: ratio_samples(samples[str(s)], base) for s in SIZES}
            result["devices"][kind] = {
                "us_per_request": {str(s): round(v, 2) for s, v in per_request_us.items()},
                "requests_per_s": {str(s): round(1e6 / v) for s, v in per_request_us.items()},
                "per_request_vs_smallest": {str(s): round(v, 3) for s, v in ratios.items()},
            }
            result["targets"][f"{kind}: time per request within {TOLERANCE:.0%} of queue {SIZES[0]} at every size"] = (
                all(v <= 1 + TOLERANCE for v in ratios.values())
            )
    write_result("virtio_queue", result)
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
