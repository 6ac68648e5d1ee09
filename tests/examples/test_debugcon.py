"""examples/debugcon.py: the debug console (port 0x402 by default, any but Xen's 0xE9) on the
mock, and as a program serving a mock host process's domain until a signal (plain and deprivileged)."""

from __future__ import annotations

import io
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from example_cli import deprivileged, example_env, read_until

from xendmop.mock.simguest import SimGuest
from xendmop.testing import ServeFactory

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "debugcon.py"
debugcon: dict[str, Any] = runpy.run_path(str(SCRIPT))
PORT = 0x402  # the default: Xen keeps 0xE9 for itself
DETECT = 0xE9  # what a read of the console's port answers


def test_the_port_prints_each_byte_written_and_reads_back_0xe9(serve: ServeFactory, guest: SimGuest) -> None:
    out = io.StringIO()
    console = debugcon["DebugConsole"](out)
    serve(ports={(PORT, PORT): console})
    assert guest.inb(PORT) == DETECT  # "is the console there?"
    guest.outb(PORT, ord("o"))
    guest.outb(PORT, ord("k"))
    guest.write_ram(0x2000, b"\xe9 done\n")
    guest.rep_outsb(PORT, 0x2000, 7)
    assert console.received == b"ok\xe9 done\n" and out.getvalue() == "ok\xe9 done\n"  # latin-1, byte for byte


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env=example_env(**(env or {})),
    )


def guest_prints(remote: Any, text: bytes) -> None:
    """dom1's guest detects the console, then writes ``text`` with rep outsb, as a guest's puts does."""
    from xendmop.mock.remote import RemoteGuest

    vcpu = RemoteGuest(remote, 1)
    assert vcpu.inb(PORT) == DETECT
    vcpu.write_ram(0x1000, text)
    vcpu.rep_outsb(PORT, 0x1000, len(text))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serves_a_mock_host_domain_until_a_signal_then_exits_0(mock_host_process: str, signum: int) -> None:
    from xendmop.mock.remote import RemoteXen

    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--domid", "1"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=example_env(XENDMOP_MOCK_SOCKET=mock_host_process),
    )
    try:
        serving = read_until(proc.stderr, "Ctrl-C to stop")
        assert serving.splitlines()[-1] == "debugcon: serving dom1's port 0x402; Ctrl-C to stop"
        with RemoteXen(mock_host_process) as remote:
            assert len(remote.servers(1)) == 1
            guest_prints(remote, b"Hello through port 0x402\n")
            assert read_until(proc.stdout, "Hello") == "Hello through port 0x402\n"
            proc.send_signal(signum)
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            assert remote.servers(1) == {}  # the mock host saw the server destroyed
        assert out == "" and "Traceback" not in err
        assert (
            err.splitlines()[-1] == f"debugcon: stopped ({signal.Signals(signum).name}); the ioreq server was destroyed"
        )
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_deprivileged_it_still_prints_the_guests_bytes(mock_host_process: str) -> None:
    from xendmop.mock.remote import RemoteXen

    with deprivileged(SCRIPT, mock_host_process, ready="deprivileged to uid 65534 gid 65534; Ctrl-C to stop") as proc:
        with RemoteXen(mock_host_process) as remote:
            guest_prints(remote, b"from a guest to nobody\n")
            assert read_until(proc.stdout, "nobody") == "from a guest to nobody\n"
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            assert remote.servers(1) == {}


def test_a_domain_that_cannot_be_served_is_not_announced(mock_host_process: str) -> None:
    """The mock host's dom2 is PV: its first DMOP gets EINVAL; one line, status 1, no serving line."""
    done = run("--domid", "2", env={"XENDMOP_MOCK_SOCKET": mock_host_process})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("debugcon: dom2: ") and "EINVAL" in done.stderr
    assert "serving" not in done.stderr and done.stdout == ""


def test_bad_values_and_an_unreachable_host(tmp_path: Path) -> None:
    bad = run("--domid", "0")
    assert bad.returncode == 2 and "error: argument --domid: '0': expected a guest domid" in bad.stderr
    root = run("--domid", "1", "--depriv", "0:0")
    assert root.returncode == 2 and "error: argument --depriv: '0:0': root (id 0) is no privilege drop" in root.stderr
    gone = run("--domid", "1", env={"XENDMOP_MOCK_SOCKET": str(tmp_path / "no-such.sock")})
    assert gone.returncode == 1 and gone.stderr.startswith("debugcon: dom1: ") and "Traceback" not in gone.stderr


@pytest.mark.parametrize("value", ["0xe9", "233", "0xE9"])
def test_port_0xe9_is_refused_as_xens_own(value: str) -> None:
    done = run("--port", value)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "Xen handles port 0xe9 itself" in done.stderr and "xl dmesg" in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("value", ["0x10000", "-1", "com1", ""])
def test_a_bad_port_is_a_usage_error_naming_the_value(value: str) -> None:
    done = run("--port", value)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"--port: {value!r}" in done.stderr


def test_the_chosen_port_is_served_on_the_mock() -> None:
    done = run("--port", "0x500")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Hello from the guest, through port 0x500!\n"


def test_a_domain_is_served_on_the_chosen_port_and_told_why_not_0xe9(mock_host_process: str) -> None:
    from xendmop.mock.remote import RemoteGuest, RemoteXen

    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--domid", "1", "--port", "0x510"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=example_env(XENDMOP_MOCK_SOCKET=mock_host_process),
    )
    try:
        serving = read_until(proc.stderr, "Ctrl-C to stop")
        assert "Xen handles port 0xe9 itself for every HVM and PVH guest" in serving.splitlines()[0]
        assert serving.splitlines()[-1] == "debugcon: serving dom1's port 0x510; Ctrl-C to stop"
        with RemoteXen(mock_host_process) as remote:
            vcpu = RemoteGuest(remote, 1)
            assert vcpu.inb(0x510) == DETECT
            assert vcpu.inb(PORT) == 0xFF  # the default port is not served: nobody answers it
            vcpu.outb(0x510, ord("!"))
            vcpu.outb(0x510, ord("\n"))
            assert read_until(proc.stdout, "!") == "!\n"
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
            assert proc.returncode == 0
    finally:
        proc.kill()
        proc.wait()
