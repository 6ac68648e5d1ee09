"""pytest fixtures for testing a device model on the mock Xen (registered as a ``pytest11`` plugin).

Installing xendmop makes these fixtures available to every test, no ``conftest.py`` needed::

    def test_my_uart_scratch_register(serve, guest):
        serve(ports={(0x3F8, 0x3FF): MyUart()})      # an ioreq server, served in a thread
        guest.outb(0x3FF, 0x5A)                        # the guest's vCPU 0 writes the port
        assert guest.inb(0x3FF) == 0x5A

Fixtures (each test gets fresh ones):

- ``xen_host``: a new ``xendmop.mock.MockXen``, closed after the test.
- ``make_domain(vcpus=1, memory_mb=4, hvm=True, **options)``: create a domain on
  ``xen_host`` (options as ``MockXen.create_domain``), return its domid.
- ``hvm_domain``: the domid of one HVM domain made by ``make_domain``; set its
  shape with ``@pytest.mark.xen_domain(vcpus=2, memory_mb=8)``.
- ``guest``: a ``SimGuest`` on ``hvm_domain``: its vCPUs issue port IO, MMIO and
  PCI config accesses through the real shared ioreq page and event channels.  An
  access nobody answers raises ``GuestTimeout`` naming the vCPU after 5 s, or
  after ``@pytest.mark.xen_guest(timeout=0.5)`` seconds; it never hangs.
- ``device_model``: a ``DeviceModel`` on ``xen_host`` (the ``mock`` backend).
- ``serve(ports=..., mmio=..., pci=..., domid=None, **server_options)``: bring up an
  ``IoreqServer`` (options as its constructor) on ``hvm_domain`` (or ``domid``) with
  the devices registered — ``ports``/``mmio`` map ``(first, last)`` to a device,
  ``pci`` maps a slot on bus 0 to one — and serve it in a thread; return the server.
  After the test every server is torn down, and the test fails if an ioreq server
  was left in a domain, if a device raised (the log has the traceback; pass
  ``allow_device_errors=True`` to expect it) or if the loop died.
- ``mock_host_process``: ``xendmop mock-host`` in a child process (dom1 HVM, dom2 PV);
  its socket path, what ``XENDMOP_MOCK_SOCKET`` names for a device model in yet another
  process (``xendmop.mock.remote``).  Terminated after the test.

``ServeThread(*servers)`` is the same serving as a context manager, for a test that
looks at the domain after the loop ended.

The plugin imports nothing of xendmop's runtime or mock until a fixture is used: it
is loaded by every pytest run of anyone who installed xendmop.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import pytest

if TYPE_CHECKING:
    from .devicemodel import DeviceModel
    from .mock import MockXen
    from .mock.simguest import SimGuest
    from .runtime.dispatch import IoDevice
    from .runtime.server import IoreqServer, ServeLoop

__all__ = ["DomainFactory", "ServeFactory", "ServeThread", "assert_no_ioreq_server"]

#: how long a guest access waits for the device model unless ``xen_guest(timeout=)`` says otherwise
GUEST_TIMEOUT = 5.0
#: how long stopping a serving thread may take before the test fails instead of hanging
JOIN_TIMEOUT = 5.0


class DomainFactory(Protocol):
    def __call__(self, *, vcpus: int = 1, memory_mb: int = 4, hvm: bool = True, **options: Any) -> int: ...


class ServeFactory(Protocol):
    def __call__(
        self,
        *,
        ports: Mapping[tuple[int, int], IoDevice] | None = None,
        mmio: Mapping[tuple[int, int], IoDevice] | None = None,
        pci: Mapping[int, IoDevice] | None = None,
        domid: int | None = None,
        allow_device_errors: bool = False,
        **server_options: Any,
    ) -> IoreqServer: ...


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "xen_domain(vcpus=1, memory_mb=4, **options): the shape of the hvm_domain fixture's domain"
    )
    config.addinivalue_line("markers", "xen_guest(timeout=5.0): seconds a guest access waits for an answer")


def assert_no_ioreq_server(xen: MockXen, domid: int) -> None:
    """Fail naming the servers if ``domid`` still has an ioreq server (each holds one of Xen's 8 slots)."""
    left = [i for i, s in enumerate(xen.domain(domid).snapshot()["servers"]) if s is not None]
    assert not left, f"dom{domid}: ioreq server(s) {left} left behind after the test"


class ServeThread:
    """Serve ``servers`` with a ``ServeLoop`` in a daemon thread.

    The servers are started here, in the caller's thread, so a guest access right
    after construction is already routed.  ``stop()`` (or leaving ``with``) ends the
    loop, which tears every server down, and raises ``AssertionError`` if the thread
    does not end in ``join_timeout`` seconds, or the loop's own exception if it died.
    """

    def __init__(self, *servers: IoreqServer, join_timeout: float = JOIN_TIMEOUT) -> None:
        from .runtime.server import ServeLoop

        self.servers = servers
        self.join_timeout = join_timeout
        self.error: BaseException | None = None
        try:
            for s in servers:
                s.start()
        except BaseException:
            for s in servers:
                s.close()
            raise
        self.loop: ServeLoop = ServeLoop(*servers)
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        try:
            self.loop.run(handle_signals=False)
        except BaseException as e:  # reported by stop(), in the test's thread
            self.error = e

    def start(self) -> ServeThread:
        if self._thread is None:
            from .runtime.dm_program import start_daemon_thread

            # Signals (a Ctrl-C of pytest) stay with the test's thread.
            self._thread = start_daemon_thread(self._run, "xendmop-serve")
        return self

    def stop(self) -> None:
        """End the loop (servers torn down); re-raise what the loop died of."""
        if self._thread is not None:
            self.loop.stop()
            self._thread.join(self.join_timeout)
            assert not self._thread.is_alive(), f"serving loop did not stop in {self.join_timeout}s"
        else:
            for s in self.servers:
                s.close()
        if self.error is not None:
            raise self.error

    def __enter__(self) -> ServeLoop:
        self.start()
        return self.loop

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def xen_host() -> Iterator[MockXen]:
    """A fresh simulated Xen host; every fd and mapping it owns is released after the test."""
    from .mock import MockXen

    with MockXen() as host:
        yield host


@pytest.fixture
def make_domain(xen_host: MockXen) -> DomainFactory:
    """``make_domain(vcpus=1, memory_mb=4, hvm=True, **options)`` → domid of a new domain on ``xen_host``."""

    def make(*, vcpus: int = 1, memory_mb: int = 4, hvm: bool = True, **options: Any) -> int:
        return xen_host.create_domain(vcpus=vcpus, hvm=hvm, memory_mb=memory_mb, **options)

    return make


@pytest.fixture
def hvm_domain(request: pytest.FixtureRequest, make_domain: DomainFactory) -> int:
    """The domid of an HVM domain (``@pytest.mark.xen_domain(vcpus=, memory_mb=, ...)`` shapes it)."""
    marker = request.node.get_closest_marker("xen_domain")
    options: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    if options.get("hvm", True) is not True:
        raise pytest.UsageError("xen_domain marker: hvm_domain is always HVM; use make_domain(hvm=False)")
    options.pop("hvm", None)
    return make_domain(**options)


@pytest.fixture
def guest(request: pytest.FixtureRequest, xen_host: MockXen, hvm_domain: int) -> SimGuest:
    """The simulated guest of ``hvm_domain`` (``@pytest.mark.xen_guest(timeout=)`` sets its patience)."""
    from .mock.simguest import SimGuest

    return SimGuest(xen_host, hvm_domain, timeout=_guest_timeout(request.node.get_closest_marker("xen_guest")))


def _guest_timeout(marker: pytest.Mark | None) -> float:
    """The ``xen_guest(timeout=)`` marker's seconds (``GUEST_TIMEOUT`` without one);
    ``pytest.UsageError`` naming the marker and the value for anything but a number > 0."""
    if marker is None:
        return GUEST_TIMEOUT
    unknown = [repr(a) for a in marker.args] + [f"{k}=" for k in marker.kwargs if k != "timeout"]
    if unknown:
        raise pytest.UsageError(f"xen_guest marker: takes timeout=SECONDS only, not {', '.join(unknown)}")
    timeout = marker.kwargs.get("timeout", GUEST_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise pytest.UsageError(f"xen_guest(timeout=...): {timeout!r} is not a number of seconds above 0")
    return float(timeout)


@pytest.fixture
def device_model(xen_host: MockXen) -> Iterator[DeviceModel]:
    """A ``DeviceModel`` handle on ``xen_host``, closed after the test, which fails if any
    ioreq server is left in any domain of the host then."""
    from .devicemodel import DeviceModel

    with DeviceModel.open("mock", xen=xen_host) as dm:
        yield dm
        # Every server of every domain, also those made with this handle directly (not through
        # serve): each holds one of Xen's 8 slots per domain, and Xen frees none by itself.
        left = _all_servers_left(xen_host)
        if left:
            pytest.fail(f"{'; '.join(left)} left behind after the test (destroy_ioreq_server them)", pytrace=False)


@pytest.fixture
def serve(xen_host: MockXen, hvm_domain: int, device_model: DeviceModel) -> Iterator[ServeFactory]:
    """Factory: an ioreq server with devices registered, served in a thread until the test ends."""
    from .runtime.server import IoreqServer

    running: list[tuple[ServeThread, bool]] = []

    def start(
        *,
        ports: Mapping[tuple[int, int], IoDevice] | None = None,
        mmio: Mapping[tuple[int, int], IoDevice] | None = None,
        pci: Mapping[int, IoDevice] | None = None,
        domid: int | None = None,
        allow_device_errors: bool = False,
        **server_options: Any,
    ) -> IoreqServer:
        server_options.setdefault("opener", xen_host.open_device)
        server = IoreqServer(device_model, hvm_domain if domid is None else domid, **server_options)
        try:
            for (first, last), device in (ports or {}).items():
                server.add_port_range(first, last, device, _name(device))
            for (first, last), device in (mmio or {}).items():
                server.add_mmio_range(first, last, device, _name(device))
            for slot, device in (pci or {}).items():
                server.add_pci(device, slot=slot, name=_name(device))
        except BaseException:
            server.close()
            raise
        running.append((ServeThread(server).start(), allow_device_errors))
        return server

    yield start

    problems: list[str] = []
    for thread, allow_device_errors in reversed(running):
        try:
            thread.stop()
        except BaseException as e:
            problems.append(f"serving loop failed: {type(e).__name__}: {e}")
        for s in thread.servers:
            stats = s.dispatcher.stats
            if stats["device-error"] and not allow_device_errors:
                problems.append(f"dom{s.domid}: {_device_errors(stats)} (see the captured log for the traceback)")
    for domid in sorted({s.domid for thread, _ in running for s in thread.servers} | {hvm_domain}):
        if domid not in xen_host.hypervisor.domains:
            continue  # the test destroyed the domain, and its servers with it
        try:
            assert_no_ioreq_server(xen_host, domid)
        except AssertionError as e:
            problems.append(str(e))
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


def _device_errors(stats: Mapping[str, int]) -> str:
    """What a device's failures did to the guest, told apart: a failed read floats the bus
    (all-ones), a failed write is dropped, a failed timeoffset callback is ignored."""
    reads, writes = stats["device-error-read"], stats["device-error-write"]
    other = stats["device-error"] - reads - writes
    said = []
    if reads:
        said.append(f"{reads} read(s) raised or returned a value wider than the access (the guest read all-ones)")
    if writes:
        said.append(f"{writes} write(s) raised (the write was dropped)")
    if other:
        said.append(f"{other} other callback(s) raised")
    return "a device failed while serving the guest: " + "; ".join(said)


def _all_servers_left(xen: MockXen) -> list[str]:
    """Every ioreq server still registered in any domain of ``xen``, as ``domN: [ids]``."""
    left = []
    for domid in sorted(xen.hypervisor.domains):
        servers = [i for i, s in enumerate(xen.domain(domid).snapshot()["servers"]) if s is not None]
        if servers:
            left.append(f"dom{domid}: ioreq server(s) {servers}")
    return left


def _name(device: object) -> str:
    return type(device).__name__


@pytest.fixture
def mock_host_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A mock Xen host in its own process; yields the path of its socket."""
    import subprocess
    import sys

    where = tmp_path_factory.mktemp("mock-host")
    sock, log_path = str(where / "xen.sock"), where / "stderr.log"
    with open(log_path, "wb") as log_file:  # a file, not a pipe: a chatty host never blocks on it
        host = subprocess.Popen(
            [sys.executable, "-m", "xendmop", "mock-host", "--socket", sock],
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
    try:
        assert host.stdout is not None
        first = host.stdout.readline()  # its "listening" line, or nothing if it died
        if "listening" not in first:
            host.kill()
            pytest.fail(f"xendmop mock-host did not start: {first}{log_path.read_text()}", pytrace=False)
        yield sock
        host.terminate()  # a clean stop: exit status 0 and the socket removed
        try:
            status = host.wait(JOIN_TIMEOUT)
        except subprocess.TimeoutExpired:
            status = None
        if status != 0 or os.path.exists(sock):
            pytest.fail(
                f"xendmop mock-host did not stop cleanly on SIGTERM (status {status}, socket "
                f"{'left behind' if os.path.exists(sock) else 'removed'}): {log_path.read_text()}",
                pytrace=False,
            )
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        if host.stdout is not None:
            host.stdout.close()
