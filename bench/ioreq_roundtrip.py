"""Benchmark 2: one ioreq round trip on the mock, guest access -> device model -> response.

In one process: a ``ServeLoop`` thread serves an ``IoreqServer`` for a port range while the
main thread, as a ``SimGuest`` vCPU, issues ``outb``.  The floor is a bare event-channel-style
notify ping-pong between two threads over two eventfds (write, blocking read), the same
shape of hand-off with nothing else done.  Rounds interleave the two.

Across processes is not measured: the mock host lives in one process (there is no
mock-host process a device model could attach to yet).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from . import interleave, median, ratio_samples, write_result

PORT = 0x3F8
ROUNDS = 11
ACROSS_PROCESSES = "not measured: no mock-host process yet (the mock Xen lives in one process)"


class Sink:
    """The cheapest device: a register file of one value."""

    value = 0

    def read(self, addr: int, size: int) -> int:
        return self.value

    def write(self, addr: int, size: int, value: int) -> None:
        self.value = value


class EventfdPingPong:
    """Two threads, two eventfds: ``ping`` notifies the peer and blocks for its answer."""

    def __init__(self) -> None:
        self.to_peer = os.eventfd(0)
        self.to_us = os.eventfd(0)
        self._stop = False
        self.thread = threading.Thread(target=self._peer, daemon=True)
        self.thread.start()

    def _peer(self) -> None:
        read, write, to_peer, to_us = os.eventfd_read, os.eventfd_write, self.to_peer, self.to_us
        while True:
            read(to_peer)
            if self._stop:
                return
            write(to_us, 1)

    def timed(self, n: int) -> float:
        read, write, to_peer, to_us = os.eventfd_read, os.eventfd_write, self.to_peer, self.to_us
        t = time.perf_counter()
        for _ in range(n):
            write(to_peer, 1)
            read(to_us)
        return time.perf_counter() - t

    def close(self) -> None:
        self._stop = True
        os.eventfd_write(self.to_peer, 1)
        self.thread.join(5)
        os.close(self.to_peer)
        os.close(self.to_us)


class MockRoundTrip:
    """A device model serving a port on the mock, and a guest vCPU to drive it."""

    def __init__(self) -> None:
        from xendmop import DeviceModel
        from xendmop.mock import MockXen
        from xendmop.runtime.server import IoreqServer, ServeLoop
        from xendmop.runtime.simguest import SimGuest

        self.host = MockXen()
        self.domid = self.host.create_domain(vcpus=1, hvm=True, memory_mb=4)
        self.dm = DeviceModel.open("mock", xen=self.host)
        self.server = IoreqServer(self.dm, self.domid, opener=self.host.open_device)
        self.server.add_port_range(PORT, PORT + 7, Sink(), "sink")
        self.server.start()
        self.loop = ServeLoop(self.server)
        self.thread = threading.Thread(target=self.loop.run, kwargs={"handle_signals": False}, daemon=True)
        self.thread.start()
        self.guest = SimGuest(self.host, self.domid, timeout=5)
        self.guest.outb(PORT, 0)  # warm: the server is up and answering

    def timed(self, n: int) -> float:
        outb = self.guest.outb
        t = time.perf_counter()
        for i in range(n):
            outb(PORT, i & 0xFF)
        return time.perf_counter() - t

    def close(self) -> None:
        self.loop.stop()
        self.thread.join(5)
        self.dm.close()


def measure(rounds: int = ROUNDS) -> dict[str, list[float]]:
    mock, floor = MockRoundTrip(), EventfdPingPong()
    try:
        return interleave({"mock": mock.timed, "eventfd": floor.timed}, rounds, target_s=0.1)
    finally:
        floor.close()
        mock.close()


def profile(n: int = 3000) -> str:
    import cProfile
    import io
    import pstats

    mock = MockRoundTrip()
    try:
        prof = cProfile.Profile()
        prof.enable()  # profiles this thread (the guest); the serve thread below
        mock.timed(n)
        prof.disable()
    finally:
        mock.close()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(12)
    serve = _profile_serve_thread(n)
    return "guest thread:\n" + text.getvalue() + "\nserve thread:\n" + serve


def _profile_serve_thread(n: int) -> str:
    """Profile the device model's side by running ServeLoop.run under cProfile in its thread."""
    import cProfile
    import io
    import pstats

    mock = MockRoundTrip()
    mock.loop.stop()
    mock.thread.join(5)
    from xendmop.runtime.server import ServeLoop

    mock.server.start()
    loop = ServeLoop(mock.server)
    prof = cProfile.Profile()
    thread = threading.Thread(target=lambda: prof.runcall(loop.run, handle_signals=False), daemon=True)
    thread.start()
    try:
        mock.loop = loop
        mock.guest.outb(PORT, 0)
        mock.timed(n)
    finally:
        loop.stop()
        thread.join(5)
        mock.dm.close()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(14)
    return text.getvalue()


def run(with_profile: bool = False) -> dict[str, Any]:
    s = measure()
    mock_rt, floor_rt = median(s["mock"]), median(s["eventfd"])
    result: dict[str, Any] = {
        "rounds": ROUNDS,
        "one_process": {
            "us_per_round_trip": {"mock": round(mock_rt * 1e6, 2), "eventfd": round(floor_rt * 1e6, 2)},
            "round_trips_per_s": {"mock": round(1 / mock_rt), "eventfd": round(1 / floor_rt)},
            "mock/eventfd": round(ratio_samples(s["mock"], s["eventfd"]), 3),
        },
        "across_processes": ACROSS_PROCESSES,
    }
    result["targets"] = {"round trip <= 2x eventfd ping-pong": result["one_process"]["mock/eventfd"] <= 2.0}
    if with_profile:
        result["profile"] = profile()
    write_result("ioreq_roundtrip", result)
    return result


if __name__ == "__main__":
    import json
    import sys

    out = run("--profile" in sys.argv)
    prof = out.pop("profile", None)
    print(json.dumps(out, indent=2))
    if prof:
        print(prof)
