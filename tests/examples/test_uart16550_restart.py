"""examples/uart16550.py --state-dir: a device model killed with SIGKILL is started again, takes
its ioreq server over with the UART's registers as they were, and the guest goes on — nothing
lost that the guest had been told was sent.  The register model in this process, then the
real thing: device model processes serving a mock host process, one of them killed mid-output."""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from example_cli import NOBODY, example_env, read_until

from xendmop import DeviceModel
from xendmop.runtime.restart import RestartState

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "uart16550.py"
uart_mod: dict[str, Any] = runpy.run_path(str(SCRIPT))
Uart16550 = uart_mod["Uart16550"]
Firmware = uart_mod["Firmware"]
STATE_LAYOUT = uart_mod["STATE_LAYOUT"]
COM1: int = uart_mod["COM1"]

RBR = THR = 0
IER, IIR, FCR, LCR, MCR, LSR, SCR = 1, 2, 2, 3, 4, 5, 7
ETBEI, THRE, TEMT, IIR_THRE = 0x02, 0x20, 0x40, 0x02
TEXT = b"".join(b"line %04d: the quick brown fox jumps over the lazy dog\r\n" % i for i in range(60))


def at_most_one_repeat(got: bytes, text: bytes) -> bool:
    """``got`` is ``text``, or ``text`` with one byte repeated once (the byte in flight at the kill)."""
    if got == text:
        return True
    if len(got) != len(text) + 1:
        return False
    i = next(i for i in range(len(text)) if got[i] != text[i]) if got[: len(text)] != text else len(text)
    return i > 0 and got[i] == got[i - 1] and got[:i] + got[i + 1 :] == text


# --- the register model, its state in a file ---------------------------------------------------


@pytest.fixture
def state(tmp_path: Path) -> Iterator[RestartState]:
    with RestartState(tmp_path, 1, "uart16550", device_size=STATE_LAYOUT.size) as s:
        yield s


def test_every_register_fifo_and_the_irq_level_come_back(state: RestartState) -> None:
    edges: list[bool] = []
    a = Uart16550(lambda data: None, lambda level, source: edges.append(level), state=state.device)
    a.write(LCR, 1, 0x80)
    a.write(0, 1, 0x01)  # DLL
    a.write(1, 1, 0x00)
    a.write(LCR, 1, 0x1B)
    a.write(FCR, 1, 0xC1)
    a.write(MCR, 1, 0x0B)
    a.write(SCR, 1, 0x5A)
    a.write(IER, 1, 0x0F)  # THRE at once: the line goes up
    a.receive(b"abc")
    a.write(THR, 1, ord("x"))  # sent at once: the TX FIFO is empty between accesses
    assert edges == [True]
    b = Uart16550(lambda data: None, state=state.device)
    assert b.restore()
    for reg in ("ier", "lcr", "mcr", "scr", "fcr", "divisor", "overrun", "thr_ipending", "msr_delta", "irq_level"):
        assert getattr(b, reg) == getattr(a, reg), reg
    assert bytes(b.rx) == b"abc" and bytes(b.tx) == b"" and b.irq_level


def test_nothing_to_restore_changes_nothing(state: RestartState) -> None:
    u = Uart16550(lambda data: None, state=state.device)
    assert not u.restore() and u.divisor == 12
    assert not Uart16550(lambda data: None).restore()


class Killed(BaseException):
    """The device model's death, at the point it is raised."""


def test_a_kill_after_a_byte_went_out_repeats_at_most_that_byte(state: RestartState) -> None:
    """A THR write sends its byte during the access and the store that ends the access
    records it gone: a device model killed in between has not recorded it, and its successor
    carries out the same access again (Xen left the slot INPROCESS), so that one byte goes out
    twice; none is lost."""
    for kill_after in (1, 7, 16):
        out = bytearray()

        def output(data: bytes, kill_after: int = kill_after, out: bytearray = out) -> None:
            out.extend(data)
            if len(out) == kill_after:
                raise Killed

        a = Uart16550(output, state=state.device)
        a.write(FCR, 1, 0x01)
        with pytest.raises(Killed):
            for b in TEXT[:16]:
                a.write(THR, 1, b)
        b = Uart16550(out.extend, state=state.device)
        assert b.restore()
        b.transmit()  # nothing was left in the FIFO
        for byte in TEXT[kill_after - 1 : 16]:  # the access that was cut short, carried out again, then the rest
            b.write(THR, 1, byte)
        assert at_most_one_repeat(bytes(out), TEXT[:16]), (kill_after, bytes(out))
        assert bytes(out).count(TEXT[kill_after - 1 : kill_after]) >= 1
        assert b.lsr() & (THRE | TEMT) == THRE | TEMT and b.thr_ipending
        state.device.reset()


def test_thre_is_reported_once_the_byte_is_out(state: RestartState) -> None:
    out = bytearray()
    u = Uart16550(out.extend, state=state.device)
    u.write(FCR, 1, 0x01)
    u.write(THR, 1, ord("a"))
    assert out == b"a"  # sent during the write, before the access (and its store) ended
    assert u.read(LSR, 1) & THRE and out == b"a"


# --- device model processes on a mock host process ---------------------------------------------


class DeviceModelProcess:
    """``uart16550.py --domid 1 --state-dir DIR`` serving the mock host, its COM1 output
    appended to ``output`` (a file both a killed one and its successor write)."""

    def __init__(self, sock: str, state_dir: Path, output: Path, *extra: str) -> None:
        with open(output, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), "--domid", "1", "--state-dir", str(state_dir), *extra],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.PIPE,
                text=True,
                env=example_env(XENDMOP_MOCK_SOCKET=sock),
            )
        self.said = read_until(self.proc.stderr, "Ctrl-C to stop")
        # The line comes just before the serve loop installs its SIGTERM handler
        # (app.serve_until_signal): a stop sent in between would find the default action.
        deadline = time.monotonic() + 30
        while not self._catches(signal.SIGTERM):
            assert time.monotonic() < deadline, "the device model never handled SIGTERM"
            time.sleep(0.01)

    def _catches(self, signum: int) -> bool:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
        return False

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


def write_text_by_interrupt(fw: Any, text: bytes) -> None:
    """Linux's 8250 driver's transmit: IER.ETBEI on; on each interrupt read IIR, and for THRE
    fill the FIFO with up to 16 bytes (serial8250_tx_chars); at the end wait for TEMT."""
    fw.outb(IER, ETBEI)
    i = 0
    while i < len(text):
        fw.wait_irq("THRE")
        if fw.inb(IIR) & 0x0F == IIR_THRE:
            for b in text[i : i + 16]:
                fw.outb(THR, b)
            i += 16
    while not fw.inb(LSR) & TEMT:
        time.sleep(0.001)
    fw.outb(IER, 0)


@pytest.fixture
def remote(mock_host_process: str) -> Iterator[Any]:
    from xendmop.mock.remote import RemoteXen

    with RemoteXen(mock_host_process) as r:
        yield r


@pytest.fixture
def firmware(mock_host_process: str) -> Iterator[Any]:
    """The guest's driver, on a connection of its own: an access it makes blocks that
    connection until answered, and the test must still ask the host things meanwhile."""
    from xendmop.mock.remote import RemoteGuest, RemoteXen

    with RemoteXen(mock_host_process) as own:
        yield Firmware(RemoteGuest(own, 1, timeout=40), lambda: own.gsi_level(1, 4), timeout=40)


def test_sigkill_mid_output_and_a_restart_lose_nothing(
    mock_host_process: str, remote: Any, tmp_path: Path, firmware: Any
) -> None:
    state_dir, output = tmp_path / "state", tmp_path / "com1.out"
    first = DeviceModelProcess(mock_host_process, state_dir, output)
    assert "taking over" not in first.said
    firmware.init()
    done: list[BaseException | None] = []

    def guest() -> None:
        try:
            write_text_by_interrupt(firmware, TEXT)
            done.append(None)
        except BaseException as e:
            done.append(e)

    thread = threading.Thread(target=guest, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while output.stat().st_size < len(TEXT) // 3:  # well into the text
        assert time.monotonic() < deadline and thread.is_alive(), "the guest's output did not start"
        time.sleep(0.005)
    first.kill()
    (sid,) = remote.servers(1)  # the server outlives its device model
    cut = output.stat().st_size
    assert cut < len(TEXT)
    second = DeviceModelProcess(mock_host_process, state_dir, output)
    assert f"taking over ioreq server {sid} (registers restored)" in second.said
    thread.join(60)
    assert done == [None]
    got = output.read_bytes()
    assert at_most_one_repeat(got, TEXT), (cut, got[cut - 40 : cut + 40])
    assert "the ioreq server was destroyed" in second.stop()
    assert remote.servers(1) == {} and not list(state_dir.iterdir())  # a clean stop leaves nothing


def test_sigkill_while_a_vcpu_waits_on_a_read(
    mock_host_process: str, remote: Any, tmp_path: Path, firmware: Any
) -> None:
    state_dir, output = tmp_path / "state", tmp_path / "com1.out"
    first = DeviceModelProcess(mock_host_process, state_dir, output)
    firmware.outb(SCR, 0xA7)
    first.kill()
    got: list[int] = []
    reader = threading.Thread(target=lambda: got.append(firmware.inb(SCR)), daemon=True)
    reader.start()  # the vCPU posts its read and waits: nobody answers
    time.sleep(0.3)
    assert reader.is_alive() and not got
    second = DeviceModelProcess(mock_host_process, state_dir, output)
    reader.join(30)
    assert got == [0xA7]  # answered by the successor, from the register the first one kept
    assert "taking over" in second.said
    second.stop()


def test_a_state_whose_server_is_gone_is_replaced_saying_so(
    mock_host_process: str, remote: Any, tmp_path: Path, firmware: Any
) -> None:
    state_dir, output = tmp_path / "state", tmp_path / "com1.out"
    first = DeviceModelProcess(mock_host_process, state_dir, output)
    first.kill()
    (sid,) = remote.servers(1)
    with DeviceModel.open("mock", xen=remote) as dm:
        dm.destroy_ioreq_server(1, int(sid))  # someone else cleaned up
    second = DeviceModelProcess(mock_host_process, state_dir, output)
    stale = [line for line in second.said.splitlines() if "starting afresh" in line]
    assert len(stale) == 1 and f"names ioreq server {sid} of dom1, but the server is gone" in stale[0]
    assert "taking over" not in second.said
    firmware.outb(SCR, 0x3C)
    assert firmware.inb(SCR) == 0x3C  # a fresh server serves
    second.stop()


def test_a_second_device_model_for_the_same_domain_is_refused(
    mock_host_process: str, remote: Any, tmp_path: Path, firmware: Any
) -> None:
    state_dir, output = tmp_path / "state", tmp_path / "com1.out"
    first = DeviceModelProcess(mock_host_process, state_dir, output)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--domid", "1", "--state-dir", str(state_dir)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        env=example_env(XENDMOP_MOCK_SOCKET=mock_host_process),
    )
    assert done.returncode == 1 and "held by another running device model" in done.stderr
    assert len(remote.servers(1)) == 1
    first.stop()


def test_state_dir_is_refused_on_the_in_process_mock() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--state-dir", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=60,
        env=example_env(),
    )
    assert done.returncode == 2 and "--state-dir is for --domid N" in done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_a_deprivileged_device_model_restarts_deprivileged_and_chrooted(
    mock_host_process: str, remote: Any, tmp_path: Path, firmware: Any
) -> None:
    state_dir, output = tmp_path / "state", tmp_path / "com1.out"
    depriv = ("--depriv", NOBODY)
    first = DeviceModelProcess(mock_host_process, state_dir, output, *depriv)
    assert "deprivileged to uid 65534" in first.said
    firmware.init()
    firmware.outb(SCR, 0x99)
    firmware.puts(b"before ")
    first.kill()
    jail = tmp_path / "jail"
    jail.mkdir(mode=0o755)
    second = DeviceModelProcess(mock_host_process, state_dir, output, *depriv, "--chroot", str(jail))
    assert "taking over" in second.said and "deprivileged to uid 65534" in second.said
    assert os.readlink(f"/proc/{second.proc.pid}/root") == str(jail)
    assert firmware.inb(SCR) == 0x99
    firmware.puts(b"after")
    assert output.read_bytes() == b"before after"
    second.stop()  # chrooted: the file cannot be unlinked, its record is emptied instead
    assert remote.servers(1) == {}
    third = DeviceModelProcess(mock_host_process, state_dir, output)
    assert "taking over" not in third.said and "starting afresh" not in third.said
    third.stop()
