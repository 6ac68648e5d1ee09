"""The domain going first: while an example serves, its domain is destroyed (the guest powered
off) — every example says so in one line, tears down without failure lines and exits 0, as its
``--help`` states; and when the mock host process itself dies, it says the host is gone and exits 1.

Xen sends no event for either: ``ServeLoop`` asks about its server every ``WATCH_INTERVAL``.
Each example is driven in-process (its serving function over ``dm_program.run_connection`` on the
in-process mock) and as a program serving a mock host process's domain."""

from __future__ import annotations

import os
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from example_cli import example_env, read_until

from xendmop.runtime import dm_program

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ["debugcon", "uart16550", "pci_edu", "framebuffer", "tapnet"]
#: how long after the domain's end an example may take to notice it (one WATCH_INTERVAL, and slack)
NOTICE = 10.0
#: what a teardown that failed would have printed
FAILURE_WORDS = ("failed", "Traceback", "Error", "[ESRCH]", "[ENOENT]", "[EPIPE]", "was destroyed")


def gone_line(name: str, domid: int) -> str:
    return f"{name}: dom{domid} is gone (destroyed or powered off); stopped serving"


def test_help_states_the_status_of_a_domain_gone_and_of_a_host_gone() -> None:
    assert "0 when done" in dm_program.EXIT_STATUS_HELP and "when the domain is gone" in dm_program.EXIT_STATUS_HELP
    assert "or the mock host process is gone" in dm_program.EXIT_STATUS_HELP.split("1 when")[1]


# --- in-process: the example's serving function on the in-process mock ------------------------------


class StandInTap:
    """What tapnet's ``serve_domain`` uses of its ``Tap``: a frame fd (one end of a datagram socketpair) and a name."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.fd = self.ours.fileno()
        self.name = "standin0"

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


def serving_function(name: str, tmp_path: Path) -> tuple[Callable[[dm_program.Connection], int], Callable[[], None]]:
    """The example's function that serves a connection's domain until a signal, and what to close after."""
    module: dict[str, Any] = runpy.run_path(str(ROOT / "examples" / f"{name}.py"))
    if name == "debugcon":
        return module["serve"], lambda: None
    if name == "uart16550":
        sink = os.open(os.devnull, os.O_WRONLY)
        return (lambda c: module["serve_domain"](c, input_fd=None, output_fd=sink) or 0), lambda: os.close(sink)
    if name == "pci_edu":
        return (lambda c: module["serve_domain"](c, 4)), lambda: None
    if name == "framebuffer":
        png = module["PngFile"](str(tmp_path / "fb.png"))
        return (lambda c: module["serve_domain"](c, png, 0.05)), png.close
    tap = StandInTap()
    target = dm_program.Target(dm_program.Where.MOCK)
    return (lambda c: module["serve_domain"](c, tap, irq=5, ram_mb=None, where=target)), tap.close


def destroy_once_served(connection: dm_program.Connection, done: threading.Event) -> threading.Thread:
    """A thread that destroys the connection's domain once an ioreq server is up in it."""
    xen = connection.mock_xen

    def run() -> None:
        deadline = time.monotonic() + NOTICE
        while time.monotonic() < deadline and not done.is_set():
            if any(s is not None for s in xen.domain(connection.domid).snapshot()["servers"]):
                time.sleep(0.2)  # serving for a while
                xen.destroy_domain(connection.domid)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("name", EXAMPLES)
def test_in_process_a_domain_destroyed_while_served_ends_in_one_line_and_0(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    serve, close = serving_function(name, tmp_path)
    lines: list[str] = []
    done = threading.Event()
    try:
        with dm_program.open_mock() as connection:
            destroyer = destroy_once_served(connection, done)
            started = time.monotonic()
            status = dm_program.run_connection(connection, serve, name=name, report=lines.append)
            took = time.monotonic() - started
            done.set()
            destroyer.join()
            domid = connection.domid
    finally:
        close()
    assert status == 0
    assert lines == [gone_line(name, domid)]
    assert took < NOTICE
    out = capsys.readouterr()
    logged = [r.getMessage() for r in caplog.records if r.levelname in ("WARNING", "ERROR", "CRITICAL")]
    assert logged == []
    for word in FAILURE_WORDS:
        assert word not in out.out + out.err, out


# --- as a program, serving a domain of a mock host process ----------------------------------------------


def start_example(name: str, domid: int, socket_path: str, tmp_path: Path) -> subprocess.Popen[str]:
    args = ["--domid", str(domid)]
    if name == "framebuffer":
        args += ["--output", str(tmp_path / "fb.png"), "--interval", "0.05"]
    if name == "tapnet":
        if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
            pytest.skip("tapnet needs root and /dev/net/tun for its tap")
        args = ["--netns", tapnet_netns(tmp_path), "--tap", "xdmgone0", *args]
    return subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / f"{name}.py"), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=example_env(XENDMOP_MOCK_SOCKET=socket_path),
    )


_NETNS: list[str] = []


def tapnet_netns(tmp_path: Path) -> str:
    from pyroute2 import netns  # type: ignore[import-untyped]

    name = f"xdmgone{os.getpid()}"
    try:
        netns.create(name)
    except Exception as e:
        pytest.skip(f"cannot create a network namespace here: {e}")
    _NETNS.append(name)
    return name


@pytest.fixture(autouse=True)
def _remove_netns() -> Any:
    yield
    if _NETNS:
        from pyroute2 import netns

        for name in _NETNS:
            netns.remove(name)
        _NETNS.clear()


@pytest.mark.parametrize("name", EXAMPLES)
def test_a_mock_host_domain_destroyed_while_served_ends_in_one_line_and_0(
    mock_host_process: str, tmp_path: Path, name: str
) -> None:
    from xendmop.mock.remote import RemoteXen

    with RemoteXen(mock_host_process) as remote:
        domid = remote.create_domain(vcpus=1, memory_mb=16)
        proc = start_example(name, domid, mock_host_process, tmp_path)
        try:
            seen = read_until(proc.stdout, "Ctrl-C to stop")
            assert len(remote.servers(domid)) == 1
            remote.destroy_domain(domid)
            out, _ = proc.communicate(timeout=30)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, seen + out
    after = [line for line in out.splitlines() if line.strip()]
    if name == "tapnet":  # its last word is about its tap
        assert after[-1] == "tapnet: tap xdmgone0 removed"
        after = after[:-1]
    assert after == [gone_line(name, domid)], seen + out
    for word in FAILURE_WORDS:
        assert word not in out, seen + out


@pytest.mark.parametrize("name", EXAMPLES)
def test_a_mock_host_killed_while_serving_is_said_and_exits_1(tmp_path: Path, name: str) -> None:
    sock = str(tmp_path / "xen.sock")
    host = subprocess.Popen(
        [sys.executable, "-m", "xendmop", "mock-host", "--socket", sock],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=example_env(),
    )
    try:
        assert host.stdout is not None and "listening" in host.stdout.readline()
        proc = start_example(name, 1, sock, tmp_path)
        try:
            seen = read_until(proc.stdout, "Ctrl-C to stop")
            host.send_signal(signal.SIGKILL)
            host.wait()
            out, _ = proc.communicate(timeout=30)
        finally:
            proc.kill()
            proc.wait()
    finally:
        host.kill()
        host.wait()
    assert proc.returncode == 1, seen + out
    after = [line for line in out.splitlines() if line.strip()]
    if name == "tapnet":
        assert after[-1] == "tapnet: tap xdmgone0 removed"
        after = after[:-1]
    assert after == [f"{name}: the mock host is gone; stopped serving"], seen + out
    assert "Traceback" not in out and "failed" not in out, seen + out
