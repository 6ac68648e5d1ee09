"""examples/virtio_*.py: the guest script on the mock, the command line, a signal's teardown, and a
deprivileged device model serving a mock host process's domain."""

from __future__ import annotations

import os
import re
import runpy
import select
import shutil
import signal
import subprocess
import sys
import time
import tty
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from example_cli import deprivileged, example_env, hold_until_signal, read_until

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = {
    name: ROOT / "examples" / f"{name}.py" for name in ("virtio_rng", "virtio_blk", "virtio_console", "virtio_net")
}


def load(name: str) -> dict[str, Any]:
    return runpy.run_path(str(EXAMPLES[name]))


def run(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES[name]), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=example_env(**(env or {})),
    )


def test_rng_guest_script_on_the_mock() -> None:
    example = load("virtio_rng")["EXAMPLE"]
    args = example.parser.parse_args([])
    result = example.run_on_mock(args, out=lambda line: None)
    assert result is not None
    lines, transport = result
    assert lines[0].startswith("virtio-rng: features 0x130000000, queue 0 of 64 entries, MSI-X vector 1")
    assert lines[-1] == "two reads differ"
    assert transport.device.served == 64 and transport.errors == []


def test_blk_guest_script_on_a_file(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\xee" * (1 << 20))
    example = load("virtio_blk")["EXAMPLE"]
    args = example.parser.parse_args(["--file", str(disk), "--serial", "abc"])
    result = example.run_on_mock(args, out=lambda line: None)
    assert result is not None
    lines, _ = result
    assert "GET_ID: status 0, serial 'abc'" in lines
    assert "the file holds the data at that offset" in lines
    assert "discard: status 0, reads zeroes" in lines
    assert lines[-1] == "read past the end: status 1 (1 = I/O error), device still up: True"
    data = disk.read_bytes()
    assert data[: 64 * 512] == b"\xee" * (64 * 512) and data[72 * 512 :] == b"\xee" * ((1 << 20) - 72 * 512)


def test_blk_read_only_file_is_not_written(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    disk.chmod(0o444)
    done = run("virtio_blk", "--file", str(disk), "--read-only")
    assert done.returncode == 0, done.stderr
    assert "write 4 KiB at sector 64: status 1" in done.stdout
    assert disk.read_bytes() == bytes(1 << 20)


def test_console_guest_writes_hvc0_and_reads_the_hosts_line() -> None:
    done = run("virtio_console")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("[guest] hello from hvc0\n")  # the guest's output, on our stdout
    assert "virtio-console: features 0x130000001, 80x25" in done.stdout
    assert "the guest read b'hello hvc0, from the host\\n' from hvc0" in done.stdout


def test_rng_over_virtio_mmio_on_an_arm_mock_interrupts_on_the_slots_spi() -> None:
    from xendmop.virtio.mmio import VirtioMmio

    example = load("virtio_rng")["EXAMPLE"]
    result = example.run_on_mock(example.parser.parse_args(["--mmio", "3"]), out=lambda line: None)
    assert result is not None
    lines, transport = result
    assert lines[0] == "virtio-rng: features 0x130000000, queue 0 of 64 entries, interrupts on its SPI"
    assert lines[-1] == "two reads differ"
    assert isinstance(transport, VirtioMmio)
    assert (transport.base, transport.irq) == (0x02000600, 36)  # libxl's fourth slot
    assert transport.raised >= 2 and transport.errors == []


def test_blk_over_virtio_mmio_writes_the_file(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\xee" * (1 << 20))
    done = run("virtio_blk", "--mmio", "0", "--file", str(disk))
    assert done.returncode == 0, done.stderr
    assert "the file holds the data at that offset" in done.stdout
    assert "read past the end: status 1 (1 = I/O error), device still up: True" in done.stdout
    assert disk.read_bytes()[64 * 512 : 72 * 512] != b"\xee" * (8 * 512)


def test_console_over_virtio_mmio_both_ways() -> None:
    done = run("virtio_console", "--mmio", "1")
    assert done.returncode == 0, done.stderr
    assert "the guest read b'hello hvc0, from the host\\n' from hvc0" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mmio", "11"], "argument --mmio: invalid choice: 11"),
        (["--mmio", "1", "--slot", "3"], "argument --slot: not allowed with argument --mmio"),
    ],
)
def test_mmio_usage_errors_name_the_argument(args: list[str], message: str) -> None:
    done = run("virtio_rng", *args)
    assert done.returncode == 2 and message in done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_console_on_a_pty_both_ways_deprivileged(mock_host_process: str) -> None:
    """hvc0 on a new pty, the device model dropped to nobody: what the guest writes is read from
    the pty, what is typed on the pty reaches the guest."""
    from xendmop.mock.remote import RemoteGuest, RemoteXen
    from xendmop.virtio.driver import VirtioPciDriver, find_virtio

    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES["virtio_console"]), "--domid", "1", "--depriv", "65534:65534", "--pty"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=example_env(XENDMOP_MOCK_SOCKET=mock_host_process),
    )
    try:
        seen = read_until(proc.stderr, "hvc0 is on")
        match = re.search(r"hvc0 is on (/dev/pts/\d+)", seen)
        assert match, seen
        read_until(proc.stderr, "deprivileged to uid 65534")
        pty = os.open(match.group(1), os.O_RDWR | os.O_NOCTTY)
        try:
            tty.setraw(pty)
            with RemoteXen(mock_host_process) as remote:
                guest = RemoteGuest(remote, 1)
                driver = VirtioPciDriver(guest, find_virtio(guest, 3))
                driver.bring_up()
                rx, tx = driver.queues[0], driver.queues[1]
                rx.add([], [64])
                rx.kick()
                tx.request([b"login: "], [])
                got = b""
                deadline = time.monotonic() + 10
                while len(got) < 7 and time.monotonic() < deadline:
                    if select.select([pty], [], [], 0.1)[0]:
                        got += os.read(pty, 64)
                assert got == b"login: "
                os.write(pty, b"root\n")
                received = b""
                while not received.endswith(b"\n") and time.monotonic() < deadline:
                    for _, data in rx.take_data():
                        received += data
                    time.sleep(0.005)
                assert received == b"root\n"
                proc.send_signal(signal.SIGTERM)
                _, err = proc.communicate(timeout=30)
                assert proc.returncode == 0, err
                assert remote.servers(1) == {}
        finally:
            os.close(pty)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("name", ["virtio_rng", "virtio_blk", "virtio_console"])
def test_command_line_on_the_mock(name: str) -> None:
    done = run(name, "--verbose")  # the runtime's INFO lines only with --verbose, as in every example
    assert done.returncode == 0, done.stderr
    assert "ioreq server 0 destroyed" in done.stderr
    helped = run(name, "--help")
    assert helped.returncode == 0 and "--depriv" in helped.stdout and "Exit status" in helped.stdout


@pytest.mark.parametrize("name", ["virtio_rng", "virtio_blk", "virtio_console"])
def test_usage_errors(name: str) -> None:
    done = run(name, "--depriv", "65534:65534")
    assert done.returncode == 2 and "--depriv needs a real dom0" in done.stderr


def test_a_device_that_cannot_be_set_up_is_one_line_and_status_1(tmp_path: Path) -> None:
    done = run("virtio_blk", "--file", str(tmp_path / "missing.img"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().endswith(
        f"virtio_blk: cannot set the device up: [Errno 2] No such file or directory: '{tmp_path / 'missing.img'}'"
    )


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="drops capabilities with setpriv")
def test_net_without_cap_net_admin_says_so() -> None:
    done = subprocess.run(
        [
            "setpriv",
            "--bounding-set",
            "-all",
            "--inh-caps",
            "-all",
            sys.executable,
            str(EXAMPLES["virtio_net"]),
            "--tap",
            "xdmvperm0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=example_env(),
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "virtio_net: cannot set the device up: [Errno 1]" in done.stderr and "needs root" in done.stderr


def test_net_refuses_a_bad_tap_name() -> None:
    done = run("virtio_net", "--tap", "bad name")
    assert done.returncode == 2 and "tap='bad name': not a valid interface name" in done.stderr


def test_blk_on_a_domain_needs_a_file() -> None:
    done = run("virtio_blk", "--domid", "3")
    assert done.returncode == 2 and "--domid needs --file PATH" in done.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_tears_the_server_down(signum: int) -> None:
    status, out, err = hold_until_signal(EXAMPLES["virtio_rng"], signum=signum)
    assert status == 0, err
    assert "two reads differ" in out
    assert f"signal {signum}: ioreq server destroyed, none left in the domain" in out


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
@pytest.mark.parametrize("name", ["virtio_rng", "virtio_blk"])
def test_deprivileged_device_model_serves_a_mock_host_process(
    name: str, mock_host_process: str, tmp_path: Path
) -> None:
    from xendmop.mock.remote import RemoteGuest, RemoteXen
    from xendmop.virtio.driver import VirtioPciDriver, find_virtio

    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    extra = ["--file", str(disk)] if name == "virtio_blk" else []
    with deprivileged(EXAMPLES[name], mock_host_process, *extra, ready="deprivileged to uid 65534") as proc:
        with RemoteXen(mock_host_process) as remote:
            guest = RemoteGuest(remote, 1)
            kind = 4 if name == "virtio_rng" else 2
            driver = VirtioPciDriver(guest, find_virtio(guest, kind))
            driver.bring_up()
            q = driver.queues[0]
            if name == "virtio_rng":
                n, data = q.request([], [64])
                assert n == 64 and data != bytes(64)
            else:
                header = (1).to_bytes(4, "little") + bytes(4) + (2).to_bytes(8, "little")  # OUT, sector 2
                n, status = q.request([header, b"Z" * 512], [1])
                assert (n, status) == (1, b"\0")
            msis = remote.snapshot(1)["msis"]
            assert [tuple(m) for m in msis][-1] == (0xFEE00000, driver.msi_vector_data(q.vector))
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            assert remote.servers(1) == {}
    if name == "virtio_blk":
        assert disk.read_bytes()[1024:1536] == b"Z" * 512


# --- a real tap in a network namespace ------------------------------------------------------------


#: two ICMP echo requests from a raw socket (no ping binary needed), each answered within 3 s
PING = """
import socket, struct, sys, time
def csum(b):
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    t = (t & 0xFFFF) + (t >> 16)
    return ~(t + (t >> 16)) & 0xFFFF
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(3)
for seq in (1, 2):
    body = struct.pack("!BBHHH", 8, 0, 0, 0x7856, seq) + b"xendmop!" * 4
    s.sendto(body[:2] + struct.pack("!H", csum(body)) + body[4:], (sys.argv[1], 0))
    deadline = time.monotonic() + 3
    while True:
        data, (src, _) = s.recvfrom(2048)
        icmp = data[(data[0] & 15) * 4:]
        if icmp[0] == 0 and struct.unpack("!HH", icmp[4:8]) == (0x7856, seq):
            print("echo reply from", src)
            break
        if time.monotonic() > deadline:
            sys.exit("no reply")
"""


@pytest.fixture
def namespace() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("a network namespace and a tap need root")
    from pyroute2 import netns  # type: ignore[import-untyped]

    name = f"xdmv-{uuid.uuid4().hex[:8]}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.remove(name)


def test_guest_and_host_ping_each_other_through_a_real_tap(namespace: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "virtio_net.py"), "--netns", namespace, "--answer", "20", "--verbose"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=example_env(),
    )
    try:
        seen = read_until(proc.stdout, "the guest answers ARP and ping at 10.0.9.2")
        assert "ping 10.0.9.1: reply in" in seen  # the guest pinged the host
        ping = subprocess.run(
            ["ip", "netns", "exec", namespace, sys.executable, "-c", PING, "10.0.9.2"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert ping.stdout.count("echo reply from 10.0.9.2") == 2  # the host pinged the guest
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "ioreq server 0 destroyed" in err  # the runtime's INFO line (--verbose)
    finally:
        proc.kill()
        proc.wait()


def test_mmio_on_a_real_x86_dom0_is_refused_before_anything_opens() -> None:
    """x86 Xen has no set_irq_level: a virtio-mmio device there could never interrupt."""
    from xendmop.runtime.dm_program import Where
    from xendmop.virtio.program import mmio_problem

    example = load("virtio_rng")["EXAMPLE"]
    args = example.parser.parse_args(["--mmio", "2"])
    problem = mmio_problem(args, Where.XEN, "x86_64")
    assert problem == "--mmio 2: virtio-mmio interrupts need Xen/Arm's set_irq_level; this dom0 is x86_64 (use --slot)"
    assert mmio_problem(args, Where.XEN, "aarch64") is None
    assert mmio_problem(args, Where.MOCK, "x86_64") is None  # the mock's Arm guest takes it
    assert mmio_problem(example.parser.parse_args([]), Where.XEN, "x86_64") is None
