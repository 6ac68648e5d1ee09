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

Across processes (``measure_across``): the mock host is this process (``MockXen`` served
by ``MockHostServer`` on a unix socket, as ``xendmop mock-host`` does), the device model a
child process serving the same port with ``IoreqServer`` over ``RemoteXen``
(``XENDMOP_MOCK_SOCKET``).  Two guests drive it:

- ``host_guest``: ``SimGuest`` in the host process, where Xen runs a real guest's vCPU: the
  access is posted into the shared page and the DM woken through the evtchn eventfd it
  holds; what the DM's reads, unmasks and notifies cost over the socket is in the number.
- ``remote_guest``: ``RemoteGuest`` in a third process, so each access is also one JSON
  request to the host and its answer: a socket round trip a real guest does not have.

The floor is the same eventfd ping-pong between two processes (``eventfd2p``: the peer a
child that inherited both eventfds).  Child processes run this module with ``--child``.

The one-process candidates run on one CPU (``one_cpu``): between two CPUs a thread hand-off
is a cross-CPU wake-up, which on this shared VM costs 5 to 40 us depending on where the
scheduler put the two threads, and a candidate keeps its placement for the whole run, so
one candidate could be 5x slower than its neighbour for no reason in its code.  On one CPU
every hand-off is a context switch, the same for the floor and the candidates.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import child_env, interleave, median, ratio_samples, write_result

PORT = 0x3F8
ROUNDS = 11
#: seconds a child has to say it is ready (it imports xendmop and sets up a server)
CHILD_START_TIMEOUT = 30.0


@contextmanager
def one_cpu() -> Iterator[int]:
    """Pin this thread, and the threads it starts meanwhile, to one of its CPUs; restore after."""
    allowed = os.sched_getaffinity(0)
    cpu = max(allowed)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, allowed)


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
        from xendmop.abi.evtchn import IOCTL_EVTCHN_BIND_INTERDOMAIN, IOCTL_EVTCHN_NOTIFY

        # looked up once: the wire stands for the kernel, whose NOTIFY costs no Python
        self._bind, self._notify = IOCTL_EVTCHN_BIND_INTERDOMAIN, IOCTL_EVTCHN_NOTIFY
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
        if request == self._notify:
            os.eventfd_write(self.to_guest, 1)
            return 0
        rc = int(self._real.ioctl(request, arg))
        if request == self._bind:
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
        from xendmop.abi.ioreq_slot import IOREQ_SIZE, STATE_BYTE, Ioreq
        from xendmop.backends.device import EVTCHN_PATH
        from xendmop.mock import MockXen
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
        from xendmop.mock.simguest import SimGuest
        from xendmop.runtime.server import IoreqServer, ServeLoop

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


# --- across processes ------------------------------------------------------------------------


def _child(role: str, *args: str, stdin: bool = False, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[str]:
    """This module run as ``--child role args`` (with the repository on its path)."""
    return subprocess.Popen(
        [sys.executable, "-m", "bench.ioreq_roundtrip", "--child", role, *args],
        env=child_env(),
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=pass_fds,
    )


def _ready(proc: subprocess.Popen[str], what: str) -> str:
    """The child's first line, which must start with ``ready``; RuntimeError if it dies or is silent."""
    import select

    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], CHILD_START_TIMEOUT)[0]:
        proc.kill()
        raise RuntimeError(f"{what}: no ready line in {CHILD_START_TIMEOUT}s")
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        proc.kill()
        raise RuntimeError(f"{what}: exited ({proc.wait()}) before it was ready: {line!r}")
    return line


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class EventfdPingPongProcesses:
    """The floor across processes: the peer is a child that inherited both eventfds
    (blocking reads, as ``EventfdPingPong``'s thread)."""

    def __init__(self) -> None:
        self.to_peer, self.to_us = os.eventfd(0), os.eventfd(0)
        self.peer = _child("peer", str(self.to_peer), str(self.to_us), pass_fds=(self.to_peer, self.to_us))
        _ready(self.peer, "eventfd peer")

    def timed(self, n: int) -> float:
        read, write, to_peer, to_us = os.eventfd_read, os.eventfd_write, self.to_peer, self.to_us
        t = time.perf_counter()
        for _ in range(n):
            write(to_peer, 1)
            read(to_us)
        return time.perf_counter() - t

    def close(self) -> None:
        os.eventfd_write(self.to_peer, 2)  # more than one ping at once: the peer's signal to end
        _stop(self.peer)
        os.close(self.to_peer)
        os.close(self.to_us)


def _peer_child(to_peer: int, to_us: int) -> None:
    read, write = os.eventfd_read, os.eventfd_write
    print("ready", flush=True)
    while read(to_peer) == 1:
        write(to_us, 1)


class AcrossProcesses:
    """The mock host here, the device model in a child, and two guests to drive it."""

    def __init__(self) -> None:
        from xendmop.mock import MockXen
        from xendmop.mock.remote import MockHostServer
        from xendmop.mock.simguest import SimGuest

        self.tmp = tempfile.mkdtemp(prefix="xendmop-bench-")
        self.path = os.path.join(self.tmp, "xen.sock")
        self.host = MockXen()
        self.domid = self.host.create_domain(vcpus=1, hvm=True, memory_mb=4)
        self.server = MockHostServer(self.host, self.path).start()
        self.children: list[subprocess.Popen[str]] = []
        try:
            self.dm = _child("dm", self.path, str(self.domid))
            self.children.append(self.dm)
            _ready(self.dm, "device model")
            self.guest = SimGuest(self.host, self.domid, timeout=5)
            self.guest.outb(PORT, 0)  # warm: the server is up and answering
            self.driver = _child("guest", self.path, str(self.domid), stdin=True)
            self.children.append(self.driver)
            _ready(self.driver, "remote guest")
            self.remote_guest(1)
        except BaseException:
            self.close()
            raise

    def host_guest(self, n: int) -> float:
        outb = self.guest.outb
        t = time.perf_counter()
        for i in range(n):
            outb(PORT, i & 0xFF)
        return time.perf_counter() - t

    def remote_guest(self, n: int) -> float:
        """``n`` accesses timed by the driver process itself (its loop of ``RemoteGuest.outb``)."""
        assert self.driver.stdin is not None and self.driver.stdout is not None
        self.driver.stdin.write(f"{n}\n")
        self.driver.stdin.flush()
        line = self.driver.stdout.readline()
        if not line:
            raise RuntimeError(f"remote guest exited ({self.driver.wait()})")
        return float(line)

    def close(self) -> None:
        for proc in reversed(self.children):
            if proc.stdin is not None:
                proc.stdin.close()  # the driver's end of input
            _stop(proc)  # the device model tears its server down on SIGTERM
        self.server.close()
        self.host.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _dm_child(path: str, domid: int) -> None:
    from xendmop import DeviceModel
    from xendmop.mock.remote import RemoteXen
    from xendmop.runtime.server import IoreqServer, ServeLoop

    xen = RemoteXen(path)
    dm = DeviceModel.open("mock", xen=xen)
    server = IoreqServer(dm, domid, opener=xen.open_device)
    server.add_port_range(PORT, PORT + 7, Sink(), "sink")
    server.start()
    print("ready", server.id, flush=True)
    ServeLoop(server).run()  # until SIGTERM, then torn down
    dm.close()
    xen.close()


def _guest_child(path: str, domid: int) -> None:
    from xendmop.mock.remote import RemoteGuest

    with RemoteGuest(path, domid, timeout=5) as guest:
        outb = guest.outb
        print("ready", flush=True)
        for line in sys.stdin:
            n = int(line)
            t = time.perf_counter()
            for i in range(n):
                outb(PORT, i & 0xFF)
            print(time.perf_counter() - t, flush=True)


def measure_across(rounds: int = ROUNDS) -> dict[str, list[float]]:
    across, floor = AcrossProcesses(), None
    try:
        floor = EventfdPingPongProcesses()
        candidates = {"host_guest": across.host_guest, "remote_guest": across.remote_guest, "eventfd2p": floor.timed}
        return interleave(candidates, rounds, target_s=0.1)
    finally:
        if floor is not None:
            floor.close()
        across.close()


def measure(rounds: int = ROUNDS) -> dict[str, list[float]]:
    with one_cpu():  # every thread below is started on that CPU
        return _measure(rounds)


def _measure(rounds: int) -> dict[str, list[float]]:
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
    with one_cpu():
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
    across = _profile_across(n)
    return "guest thread:\n" + text.getvalue() + "\nserve thread:\n" + serve + "\n" + across


def _profile_across(n: int) -> str:
    """Across processes: the host's guest thread, and the host thread serving the device
    model's connection (its ``_Connection.run`` under a profiler for this measurement)."""
    import cProfile
    import io
    import pstats

    from xendmop.mock.remote import server as remote

    conn_profiles: list[cProfile.Profile] = []
    plain_run = remote._Connection.run

    def profiled_run(conn: Any) -> None:
        prof = cProfile.Profile()
        conn_profiles.append(prof)
        prof.runcall(plain_run, conn)

    remote._Connection.run = profiled_run  # type: ignore[method-assign]
    try:
        across = AcrossProcesses()
    finally:
        remote._Connection.run = plain_run  # type: ignore[method-assign]
    guest = cProfile.Profile()
    try:
        guest.enable()
        across.host_guest(n)
        guest.disable()
    finally:
        across.close()
    text = io.StringIO()
    text.write("across processes, host's guest thread:\n")
    pstats.Stats(guest, stream=text).sort_stats("tottime").print_stats(10)
    busiest = max(conn_profiles, key=lambda p: pstats.Stats(p).total_calls)  # type: ignore[attr-defined]
    text.write("across processes, host thread serving the device model:\n")
    pstats.Stats(busiest, stream=text).sort_stats("tottime").print_stats(14)
    return text.getvalue()


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


def across_result(s: dict[str, list[float]]) -> dict[str, Any]:
    us = {name: median(v) for name, v in s.items()}
    return {
        "us_per_round_trip": {name: round(v * 1e6, 2) for name, v in us.items()},
        "round_trips_per_s": {name: round(1 / v) for name, v in us.items()},
        "host_guest/eventfd2p": round(ratio_samples(s["host_guest"], s["eventfd2p"]), 3),
        "remote_guest/eventfd2p": round(ratio_samples(s["remote_guest"], s["eventfd2p"]), 3),
        "remote_guest/host_guest": round(ratio_samples(s["remote_guest"], s["host_guest"]), 3),
    }


def run(with_profile: bool = False) -> dict[str, Any]:
    s = measure()
    inline = measure_inline()
    across = across_result(measure_across())
    us = {name: median(v) for name, v in s.items()}
    result: dict[str, Any] = {
        "rounds": ROUNDS,
        "one_process_on_one_cpu": True,
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
        "across_processes": across,
    }
    one = result["one_process"]
    result["targets"] = {
        "round trip <= 2x eventfd ping-pong": one["mock/eventfd"] <= 2.0,
        "device model side (wired) <= 2x eventfd ping-pong": one["wired/eventfd"] <= 2.0,
        "across processes, guest in the host <= 2x eventfd ping-pong": across["host_guest/eventfd2p"] <= 2.0,
    }
    if with_profile:
        result["profile"] = profile()
    write_result("ioreq_roundtrip", result)
    return result


def _main_child(role: str, args: list[str]) -> None:
    if role == "peer":
        _peer_child(int(args[0]), int(args[1]))
    elif role == "dm":
        _dm_child(args[0], int(args[1]))
    elif role == "guest":
        _guest_child(args[0], int(args[1]))
    else:
        raise SystemExit(f"--child {role!r}: want peer, dm or guest")


if __name__ == "__main__":
    import json

    if sys.argv[1:2] == ["--child"]:
        _main_child(sys.argv[2], sys.argv[3:])
        raise SystemExit(0)
    out = run("--profile" in sys.argv)
    prof = out.pop("profile", None)
    print(json.dumps(out, indent=2))
    if prof:
        print(prof)
