"""Benchmark 2: one ioreq round trip on the mock, guest access -> device model -> response.

In one process: a ``ServeLoop`` thread serves an ``IoreqServer`` for a port range while the
main thread, as a ``SimGuest`` vCPU, issues ``outb``.  The floor is a bare event-channel-style
notify ping-pong between two threads over two eventfds (write, blocking read), the same
shape of hand-off with nothing else done.  Rounds interleave the candidates.

A third candidate, ``wired``, isolates the device model's side: the same ``ServeLoop``,
``IoreqServer``, ``EventChannel`` and dispatcher, but the guest is a minimal loop that
writes the ioreq into the shared page itself and signals over an eventfd pair (the
event channel device is the mock's for setup, then two eventfds for the ports, so neither
the mock's Xen nor ``SimGuest`` is on the path).  ``wired/eventfd`` is what the runtime
costs; ``mock/wired`` is what the simulated guest and the mock's event channels add.

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
    """Two threads, two eventfds: ``ping`` notifies the peer and blocks for its answer.

    ``selector=True``: the peer waits in a ``selectors`` loop (as ``ServeLoop`` does, to
    watch several fds and a stop flag) and reads the eventfd once it is readable: the
    floor of any device model built on a select loop, with nothing handled."""

    def __init__(self, selector: bool = False) -> None:
        self.to_peer = os.eventfd(0, os.EFD_NONBLOCK) if selector else os.eventfd(0)
        self.to_us = os.eventfd(0)
        self._stop = False
        self.thread = threading.Thread(target=self._select_peer if selector else self._peer, daemon=True)
        self.thread.start()

    def _peer(self) -> None:
        read, write, to_peer, to_us = os.eventfd_read, os.eventfd_write, self.to_peer, self.to_us
        while True:
            read(to_peer)
            if self._stop:
                return
            write(to_us, 1)

    def _select_peer(self) -> None:
        import selectors

        read, write, to_peer, to_us = os.eventfd_read, os.eventfd_write, self.to_peer, self.to_us
        with selectors.DefaultSelector() as sel:
            sel.register(to_peer, selectors.EVENT_READ)
            while not self._stop:
                for _key, _ in sel.select(0.1):
                    read(to_peer)
                    if not self._stop:
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


class EventPingPong:
    """The same ping-pong over two ``threading.Event``s with timed waits: the hand-off the
    mock's guest and event channels use (``SimGuest`` waits for the device model's notify
    on an Event, in short timed waits), measured so its share of ``mock`` is visible."""

    def __init__(self) -> None:
        self.to_peer, self.to_us = threading.Event(), threading.Event()
        self._stop = False
        self.thread = threading.Thread(target=self._peer, daemon=True)
        self.thread.start()

    def _peer(self) -> None:
        to_peer, to_us = self.to_peer, self.to_us
        while True:
            while not to_peer.wait(0.05):
                pass
            to_peer.clear()
            if self._stop:
                return
            to_us.set()

    def timed(self, n: int) -> float:
        to_peer, to_us = self.to_peer, self.to_us
        t = time.perf_counter()
        for _ in range(n):
            to_peer.set()
            while not to_us.wait(0.05):
                pass
            to_us.clear()
        return time.perf_counter() - t

    def close(self) -> None:
        self._stop = True
        self.to_peer.set()
        self.thread.join(5)


class WiredEvtchn:
    """The mock's /dev/xen/evtchn for binding, then an eventfd pair for the vCPU's port:
    readable when the guest signalled (``read`` gives the port once), ``NOTIFY`` signals
    the guest.  Everything else goes to the mock's device."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.path = real.path
        self.to_dm = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.to_guest = os.eventfd(0, os.EFD_CLOEXEC)
        self.port = 0  # the vCPU's local port, once bound
        self.nonblocking = True

    def fileno(self) -> int:
        return self.to_dm

    def read(self, nbytes: int) -> bytes:
        os.eventfd_read(self.to_dm)  # BlockingIOError when the guest did not signal
        return self.port.to_bytes(4, "little")

    def write(self, data: bytes) -> int:
        return len(data)  # unmask: nothing is masked on this wire

    def ioctl(self, request: int, arg: Any = 0) -> int:
        from xendmop.abi.evtchn import IOCTL_EVTCHN_BIND_INTERDOMAIN, IOCTL_EVTCHN_NOTIFY

        if request == IOCTL_EVTCHN_NOTIFY:
            os.eventfd_write(self.to_guest, 1)
            return 0
        rc = int(self._real.ioctl(request, arg))
        if request == IOCTL_EVTCHN_BIND_INTERDOMAIN:
            self.port = rc
        return rc

    def close(self) -> None:
        self._real.close()
        os.close(self.to_dm)
        os.close(self.to_guest)


class WiredRoundTrip:
    """The device model's side alone: a minimal guest writes the slot and the eventfd."""

    def __init__(self, threaded: bool = True) -> None:
        from xendmop import DeviceModel
        from xendmop.backends.device import EVTCHN_PATH
        from xendmop.mock import MockXen
        from xendmop.runtime.dispatch import IOREQ_SIZE, STATE_BYTE, Ioreq
        from xendmop.runtime.server import IoreqServer, ServeLoop

        self.host = MockXen()
        self.domid = self.host.create_domain(vcpus=1, hvm=True, memory_mb=4)
        self.dm = DeviceModel.open("mock", xen=self.host)
        self.wire: WiredEvtchn | None = None

        def opener(path: str) -> Any:
            device = self.host.open_device(path)
            if path == EVTCHN_PATH:
                self.wire = device = WiredEvtchn(device)
            return device

        self.server = IoreqServer(self.dm, self.domid, opener=opener)
        self.server.add_port_range(PORT, PORT + 7, Sink(), "sink")
        self.server.start()
        assert self.wire is not None and self.server.page is not None
        self.loop = ServeLoop(self.server)
        self.thread = threading.Thread(target=self.loop.run, kwargs={"handle_signals": False}, daemon=True)
        if threaded:
            self.thread.start()
        page = self.server.page
        # vCPU 0's slot: an outb of 0x5a, READY; the DM answers IORESP_READY (3)
        self.request = Ioreq(PORT, 0x5A, 1, 1, self.wire.port, 1, False, 0, False, 0).to_bytes()
        self.slot, self.state_at, self.page = slice(0, IOREQ_SIZE), STATE_BYTE, page
        if threaded:
            self.timed(1)

    def inline(self, n: int) -> float:
        """The same round trip with no thread hand-off: the guest's steps, then
        ``handle_events`` called directly, then the guest's read; what the device model's
        side costs in CPU (its Python and its syscalls) per access."""
        page, request, slot, state_at = self.page, self.request, self.slot, self.state_at
        assert self.wire is not None
        write, read, to_dm, to_guest = os.eventfd_write, os.eventfd_read, self.wire.to_dm, self.wire.to_guest
        handle = self.server.handle_events
        t = time.perf_counter()
        for _ in range(n):
            page[slot] = request
            write(to_dm, 1)
            handle()
            read(to_guest)
            if page[state_at] & 0xF != 3:
                raise RuntimeError(f"device model left state {page[state_at] & 0xF}")
        took = time.perf_counter() - t
        page[state_at] &= 0xF0
        return took

    def timed(self, n: int) -> float:
        page, request, slot, state_at = self.page, self.request, self.slot, self.state_at
        assert self.wire is not None
        write, read, to_dm, to_guest = os.eventfd_write, os.eventfd_read, self.wire.to_dm, self.wire.to_guest
        t = time.perf_counter()
        for _ in range(n):
            page[slot] = request
            write(to_dm, 1)
            read(to_guest)
            if page[state_at] & 0xF != 3:  # STATE_IORESP_READY
                raise RuntimeError(f"device model left state {page[state_at] & 0xF}")
        took = time.perf_counter() - t
        page[state_at] &= 0xF0  # back to STATE_IOREQ_NONE
        return took

    def close(self) -> None:
        if self.thread.is_alive():
            self.loop.stop()
            self.thread.join(5)
        else:
            self.server.close()
        self.dm.close()


def inline_floor(n: int) -> float:
    """Both ends' eventfd steps in one thread (write, read, write, read): the syscalls
    of a round trip with no hand-off and nothing else, the floor for ``inline``."""
    a, b = os.eventfd(0), os.eventfd(0)
    write, read = os.eventfd_write, os.eventfd_read
    try:
        t = time.perf_counter()
        for _ in range(n):
            write(a, 1)
            read(a)
            write(b, 1)
            read(b)
        return time.perf_counter() - t
    finally:
        os.close(a)
        os.close(b)


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
    mock, wired, floor, event = MockRoundTrip(), WiredRoundTrip(), EventfdPingPong(), EventPingPong()
    selected = EventfdPingPong(selector=True)
    candidates = {
        "mock": mock.timed,
        "wired": wired.timed,
        "eventfd": floor.timed,
        "select": selected.timed,
        "event": event.timed,
    }
    try:
        return interleave(candidates, rounds, target_s=0.1)
    finally:
        selected.close()
        event.close()
        floor.close()
        wired.close()
        mock.close()


def measure_inline(rounds: int = ROUNDS) -> dict[str, Any]:
    """The device model's CPU per access with no thread hand-off, against the same
    eventfd syscalls done inline (``WiredRoundTrip.inline`` vs ``inline_floor``)."""
    wired = WiredRoundTrip(threaded=False)
    try:
        s = interleave({"dm": wired.inline, "eventfd": inline_floor}, rounds, target_s=0.05)
    finally:
        wired.close()
    return {
        "us_per_access": {name: round(median(v) * 1e6, 2) for name, v in s.items()},
        "dm/eventfd": round(ratio_samples(s["dm"], s["eventfd"]), 3),
    }


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
    inline = measure_inline()
    us = {name: median(v) for name, v in s.items()}
    result: dict[str, Any] = {
        "rounds": ROUNDS,
        "one_process": {
            "us_per_round_trip": {name: round(v * 1e6, 2) for name, v in us.items()},
            "round_trips_per_s": {name: round(1 / v) for name, v in us.items()},
            "mock/eventfd": round(ratio_samples(s["mock"], s["eventfd"]), 3),
            "wired/eventfd": round(ratio_samples(s["wired"], s["eventfd"]), 3),
            "mock/wired": round(ratio_samples(s["mock"], s["wired"]), 3),
            "event/eventfd": round(ratio_samples(s["event"], s["eventfd"]), 3),
            "select/eventfd": round(ratio_samples(s["select"], s["eventfd"]), 3),
            "wired/select": round(ratio_samples(s["wired"], s["select"]), 3),
        },
        "inline": inline,
        "across_processes": ACROSS_PROCESSES,
    }
    one = result["one_process"]
    result["targets"] = {
        "round trip <= 2x eventfd ping-pong": one["mock/eventfd"] <= 2.0,
        "device model side (wired) <= 2x eventfd ping-pong": one["wired/eventfd"] <= 2.0,
    }
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
