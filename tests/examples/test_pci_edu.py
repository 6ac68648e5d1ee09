"""examples/pci_edu.py: register semantics, DMA bounds, the guest script on the mock, the command line."""

from __future__ import annotations

import math
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from example_cli import deprivileged, example_env, hold_until_signal, stand_in_tool
from runtime.helpers import FakeRam, RecordingPciHost  # tests/runtime: guest RAM that refuses what is not RAM

from xendmop import DeviceModel
from xendmop.backends.device import xen_host_signs
from xendmop.mock import MockXen
from xendmop.mock.simguest import SimGuest
from xendmop.runtime import IoreqServer
from xendmop.runtime.pci import PciFunction
from xendmop.testing import ServeFactory, ServeThread

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "pci_edu.py"
edu_mod: dict[str, Any] = runpy.run_path(str(SCRIPT))
Edu = edu_mod["Edu"]


def edu_with_host(ram: FakeRam | None = None) -> tuple[Any, RecordingPciHost]:
    edu = Edu(lambda: ram)
    edu.pci.host = host = RecordingPciHost()
    return edu, host


def enable_msi(edu: Any, addr: int = 0xFEE00000, data: int = 0x41) -> None:
    edu.pci.write(0x44, 4, addr)
    edu.pci.write(0x4C, 2, data)
    edu.pci.write(0x42, 2, 1)


# --- registers ------------------------------------------------------------------------------


def test_config_space_is_edu() -> None:
    edu = Edu()
    assert edu.pci.read(0x00, 4) == 0x11E81234
    assert edu.pci.read(0x08, 4) >> 8 == 0xFF0000 and edu.pci.read(0x08, 1) == 0x10  # class, revision
    edu.pci.write(0x10, 4, 0xFFFFFFFF)
    assert edu.pci.read(0x10, 4) == 0xFFF00000  # 1 MiB, 32-bit, non-prefetchable memory
    assert edu.pci.read(0x3D, 1) == 1  # INTA#


def test_identification_and_liveness() -> None:
    edu = Edu()
    assert edu.read(0x00, 4) == 0x010000ED
    edu.write(0x04, 4, 0x12345678)
    assert edu.read(0x04, 4) == 0xEDCBA987
    edu.write(0x00, 4, 0)  # read-only
    assert edu.read(0x00, 4) == 0x010000ED


@pytest.mark.parametrize("n", [0, 1, 5, 10, 12, 13, 20, 33, 34, 1000, 0xFFFFFFFF])
def test_factorial_modulo_2_to_the_32(n: int) -> None:
    edu = Edu()
    edu.write(0x08, 4, n)
    assert edu.read(0x20, 4) & 1 == 0  # not computing any more
    expected = 0 if n >= 34 else math.factorial(n) % (1 << 32)  # 34! holds 2**32
    assert edu.read(0x08, 4) == expected


def test_wrong_sized_accesses_read_all_ones_and_write_nothing() -> None:
    edu = Edu()
    edu.write(0x04, 4, 1)
    edu.write(0x04, 2, 0x5555)
    edu.write(0x04, 8, 0x5555)
    assert edu.read(0x04, 4) == 0xFFFFFFFE
    assert edu.read(0x04, 2) == 0xFFFF and edu.read(0x00, 1) == 0xFF and edu.read(0x00, 8) == (1 << 64) - 1
    edu.write(0x80, 8, 0x1234_5678_9ABC)  # the DMA registers take 64-bit accesses
    assert edu.read(0x80, 8) == 0x1234_5678_9ABC and edu.read(0x80, 4) == 0x5678_9ABC
    assert edu.read(0x80, 2) == 0xFFFF


def test_status_computing_bit_is_read_only() -> None:
    edu = Edu()
    edu.write(0x20, 4, 0xFF)
    assert edu.read(0x20, 4) == 0x80


def test_factorial_interrupt_is_intx_until_acknowledged() -> None:
    edu, host = edu_with_host()
    edu.write(0x08, 4, 3)
    assert host.log == []  # no interrupt asked for
    edu.write(0x20, 4, 0x80)
    edu.write(0x08, 4, 4)
    assert edu.read(0x08, 4) == 24 and edu.read(0x24, 4) == 1 and host.log == [("intx", True)]
    edu.write(0x60, 4, 0x10)
    edu.write(0x64, 4, 0x01)  # one bit left: the line stays up
    assert edu.read(0x24, 4) == 0x10 and host.log == [("intx", True)]
    edu.write(0x64, 4, 0x10)
    assert edu.read(0x24, 4) == 0 and host.log == [("intx", True), ("intx", False)]


def test_raise_zero_sends_nothing() -> None:
    edu, host = edu_with_host()
    edu.write(0x60, 4, 0)
    assert host.log == []


def test_msi_replaces_intx_once_enabled() -> None:
    edu, host = edu_with_host()
    enable_msi(edu, 0xFEE01000, 0x4031)
    edu.write(0x60, 4, 0x42)
    assert host.log == [("msi", 0xFEE01000, 0x4031)]
    edu.write(0x64, 4, 0x42)  # an edge: nothing to lower
    edu.write(0x60, 4, 0x1)
    assert host.log == [("msi", 0xFEE01000, 0x4031)] * 2


def test_intx_raised_before_msi_was_enabled_still_drops_on_acknowledge() -> None:
    edu, host = edu_with_host()
    edu.write(0x60, 4, 0x1)
    enable_msi(edu)
    edu.write(0x60, 4, 0x2)  # now an MSI
    edu.write(0x64, 4, 0x3)
    assert host.log == [("intx", True), ("msi", 0xFEE00000, 0x41), ("intx", False)]


# --- DMA -----------------------------------------------------------------------------------------


def dma(edu: Any, src: int, dst: int, count: int, cmd: int) -> None:
    edu.write(0x80, 8, src)
    edu.write(0x88, 8, dst)
    edu.write(0x90, 8, count)
    edu.write(0x98, 8, cmd)


def test_dma_round_trip_with_interrupt() -> None:
    ram = FakeRam()
    ram.mem[0x100:0x180] = bytes(range(0x80))
    edu, host = edu_with_host(ram)
    dma(edu, 0x100, 0x40010, 0x80, 0x1)  # RAM -> device buffer + 0x10
    dma(edu, 0x40010, 0x2000, 0x80, 0x1 | 0x2 | 0x4)  # device -> RAM, interrupt when done
    assert ram.mem[0x2000:0x2080] == bytes(range(0x80))
    assert edu.read(0x98, 8) & 1 == 0 and edu.read(0x24, 4) == 0x100 and host.log == [("intx", True)]
    assert edu.refused == []


@pytest.mark.parametrize(
    ("src", "dst", "count", "cmd", "why"),
    [
        (0x100, 0x3FFFF, 4, 0x1, "outside the buffer"),  # below the buffer
        (0x100, 0x40FFD, 4, 0x1, "outside the buffer"),  # runs past its end
        (0x100, 0x40000, 4097, 0x1, "outside the buffer"),  # longer than the buffer
        (0x100, 0x40000, (1 << 64) - 1, 0x1, "outside the buffer"),
        (0x1000_0000, 0x40000, 16, 0x1, "28-bit DMA window"),
        (0, 0x40000, 0, 0x1 | 0x4, "count 0"),
        (0x40000, 0x0FFF_FFF8, 16, 0x3, "28-bit DMA window"),  # ends past the window
        (0xFFF8, 0x40000, 16, 0x1 | 0x4, "not RAM"),  # guest RAM ends at 0x10000
        (0x40000, 0xFFF8, 16, 0x3 | 0x4, "not RAM"),
    ],
)
def test_dma_outside_bounds_is_refused(src: int, dst: int, count: int, cmd: int, why: str) -> None:
    ram = FakeRam()
    ram.mem[:] = b"\x5a" * len(ram.mem)
    edu, host = edu_with_host(ram)
    edu.dma_buffer[:] = b"\xa5" * len(edu.dma_buffer)
    dma(edu, src, dst, count, cmd)
    assert why in edu.refused[-1]
    assert ram.mem == b"\x5a" * len(ram.mem) and edu.dma_buffer == b"\xa5" * len(edu.dma_buffer)
    assert host.log == [] and edu.read(0x98, 8) & 1 == 0  # no interrupt; the engine is idle again


def test_dma_without_guest_memory_is_refused() -> None:
    edu, _ = edu_with_host(None)
    dma(edu, 0x100, 0x40000, 4, 0x1)
    assert "no guest memory" in edu.refused[-1]


def test_dma_through_the_servers_guest_mapping(serve: ServeFactory, guest: SimGuest) -> None:
    edu = Edu()
    server = serve(pci={3: edu.pci})
    edu.memory = lambda: server.dispatcher.memory
    sbdf = 3 << 3
    guest.pci_config_write(sbdf, 0x10, 4, 0xE0000000)
    guest.pci_config_write(sbdf, 0x04, 2, 0x6)
    guest.write_ram(0x3000, b"guest data")
    for reg, value in ((0x80, 0x3000), (0x88, 0x40000), (0x90, 10), (0x98, 1)):
        guest.mmio_write(0xE0000000 + reg, 8, value)
    assert bytes(edu.dma_buffer[:10]) == b"guest data"
    hole = 0x0F000000  # inside the DMA window, far above the domain's 4 MiB: not in its p2m
    for reg, value in ((0x80, 0x40000), (0x88, hole), (0x90, 10), (0x98, 3)):
        guest.mmio_write(0xE0000000 + reg, 8, value)
    assert "guest address 0xf000000+0xa" in edu.refused[-1]
    assert guest.mmio_read(0xE0000000, 4) == 0x010000ED


# --- PciFunction input checks (pci.py, extended for this example) ----------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vendor_id": 0x10000}, "vendor_id=65536"),
        ({"device_id": -1}, "device_id=-1"),
        ({"class_code": 1 << 24}, "class_code=16777216"),
        ({"revision": 256}, "revision=256"),
        ({"interrupt_pin": 5}, "interrupt_pin=5"),
        ({"subsystem_id": True}, "subsystem_id=True"),
    ],
)
def test_pci_function_rejects_fields_that_do_not_fit(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"vendor_id": 1, "device_id": 2, "class_code": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        PciFunction(**args)


# --- the guest script on the mock ------------------------------------------------------------


@pytest.mark.parametrize("slot", [4, 17])
def test_guest_script_end_to_end(slot: int) -> None:
    lines: list[str] = []
    report = edu_mod["run_on_mock"](slot=slot, out=lines.append)
    assert report.found_slots == [slot] and report.edu_slot == slot
    assert report.bar0_size == 1 << 20
    assert report.identification == 0x010000ED and report.liveness == 0xEDCBA987
    assert report.factorial_10 == 3628800
    assert report.intx_asserted and report.irq_status == 1 and not report.intx_after_ack
    assert report.msi == (0xFEE00000, 0x41)
    assert report.dma_roundtrip
    assert report.old_bar_after_move == 0xFFFFFFFF and report.new_bar_after_move == 0x010000ED
    assert lines == report.lines and lines[0] == f"found 1234:11e8 at 00:{slot:02x}.0"


def test_intx_reaches_the_slots_gsi_on_the_mock(xen_host: MockXen) -> None:
    """Beyond the script's bitmap check: the slot's vIOAPIC line rises and falls with the register."""
    domid = xen_host.create_domain(vcpus=1, hvm=True, memory_mb=4)
    with DeviceModel.open("mock", xen=xen_host) as dm:
        server = IoreqServer(dm, domid, opener=xen_host.open_device)
        edu = Edu(lambda: server.dispatcher.memory)
        server.add_pci(edu.pci, slot=6)
        with ServeThread(server):
            guest = SimGuest(xen_host, domid)
            guest.pci_config_write(6 << 3, 0x10, 4, 0xE0000000)
            guest.pci_config_write(6 << 3, 0x04, 2, 0x2)
            guest.mmio_write(0xE0000060, 4, 0x8)
            gsi = (((6 << 2) + (6 >> 3)) & 31) + 16  # hvm_pci_intx_gsi(device 6, INTA#)
            assert xen_host.domain(domid).gsi_level(gsi)
            guest.mmio_write(0xE0000064, 4, 0x8)
            assert not xen_host.domain(domid).gsi_level(gsi)
    assert xen_host.domain(domid).snapshot()["servers"] == (None,) * 8


# --- the command line ------------------------------------------------------------------------------


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=example_env(**(env or {})),
    )


def test_command_line_on_the_mock() -> None:
    done = run("--verbose")
    assert done.returncode == 0, done.stderr
    assert "found 1234:11e8 at 00:04.0" in done.stdout
    assert "10! = 3628800; INTx asserted" in done.stdout
    assert "old address reads 0xffffffff, new reads 0x010000ed" in done.stdout
    assert "ioreq server 0 destroyed" in done.stderr


def test_depriv_on_the_in_process_mock_says_what_it_needs() -> None:
    done = run("--depriv", "990:990")
    assert done.returncode == 2
    assert "real dom0" in done.stderr and "XENDMOP_MOCK_SOCKET" in done.stderr
    bad = run("--depriv", "0:0")
    error = bad.stderr.splitlines()[-1]
    assert bad.returncode == 2 and error.endswith(
        "error: argument --depriv: '0:0': root (id 0) is no privilege drop; expected UID:GID, two non-root ids"
    ), error


@pytest.mark.parametrize("kind", ["pvh", "pv", None])
def test_real_domain_that_is_not_hvm_is_refused(tmp_path: Path, kind: str | None) -> None:
    """The PVH hazard guard: the domain type comes from Xenstore (a stand-in xenstore-read here)."""
    stand_in_tool(tmp_path, "xenstore-read", f"echo {kind}" if kind else "exit 1")
    done = run("--domid", "5", env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert done.returncode == 2
    if kind is None and not xen_host_signs():  # off Xen, an unknown type means no Xen here: said so
        last = done.stderr.splitlines()[-1]
        assert "not a Xen host" in last and "--assume-hvm" not in last
        return
    assert f"dom5 is {kind or 'of unknown type'}, not HVM" in done.stderr
    assert ("--assume-hvm" in done.stderr.splitlines()[-1]) == (kind is None)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_tears_the_server_down(signum: int) -> None:
    status, out, err = hold_until_signal(SCRIPT, "--verbose", signum=signum)
    assert status == 0, err
    assert f"signal {signum}: ioreq server destroyed, none left in the domain" in out
    assert "ioreq server 0 destroyed" in err


# --- a deprivileged device model in its own process, on a mock host process -------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_deprivileged_device_model_serves_a_mock_host_process(mock_host_process: str) -> None:
    from xendmop.mock.remote import RemoteGuest, RemoteXen

    with deprivileged(SCRIPT, mock_host_process, ready="deprivileged to uid 65534") as proc:
        with RemoteXen(mock_host_process) as remote:
            report = edu_mod["guest_script"](RemoteGuest(remote, 1), lambda: remote.snapshot(1))
            assert report.found_slots == [4] and report.factorial_10 == 3628800
            assert report.intx_asserted and not report.intx_after_ack and report.msi == (0xFEE00000, 0x41)
            assert report.dma_roundtrip and report.new_bar_after_move == 0x010000ED
            assert len(remote.servers(1)) == 1
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            assert remote.servers(1) == {}  # the host process saw the server destroyed


def test_bad_domid_and_unreachable_host_are_reported_not_raised(tmp_path: Path) -> None:
    bad = run("--domid", "32752")
    assert bad.returncode == 2 and "error: argument --domid: '32752': expected a guest domid, 1..32751" in bad.stderr
    gone = run("--domid", "1", env={"XENDMOP_MOCK_SOCKET": str(tmp_path / "no-such.sock")})
    assert gone.returncode == 1 and "Traceback" not in gone.stderr
    assert gone.stderr.startswith("pci_edu: dom1: ") and "No such file or directory" in gone.stderr


def test_a_pv_domain_of_a_mock_host_process_is_refused(mock_host_process: str) -> None:
    """Interrupts would go out: the mock host's PV domain is refused (its DMOPs get EINVAL) before serving."""
    from xendmop.mock.remote import RemoteXen

    done = run("--domid", "2", env={"XENDMOP_MOCK_SOCKET": mock_host_process})
    assert done.returncode == 2 and "dom2 is not HVM" in done.stderr and "EINVAL" in done.stderr
    with RemoteXen(mock_host_process) as remote:
        assert remote.servers(2) == {}
