"""examples/uart16550.py: the 16550A register model, the guest firmware on the mock through
the plugin's fixtures, the real-dom0 serving path on the mock with a pty, the command line."""

from __future__ import annotations

import io
import os
import runpy
import signal
import subprocess
import sys
import termios
import threading
import time
import tty
from pathlib import Path
from typing import Any

import pytest
from example_cli import deprivileged, example_env, read_bytes, read_until

from xendmop import DeviceModel
from xendmop.backends.device import xen_host_signs
from xendmop.mock import MockXen
from xendmop.mock.simguest import SimGuest
from xendmop.runtime import ServeLoop, dm_program
from xendmop.testing import DomainFactory, ServeFactory

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "uart16550.py"
uart_mod: dict[str, Any] = runpy.run_path(str(SCRIPT))
Uart16550 = uart_mod["Uart16550"]
Firmware = uart_mod["Firmware"]
COM1: int = uart_mod["COM1"]
BANNER: bytes = uart_mod["BANNER"]

RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, MCR, LSR, MSR, SCR = 3, 4, 5, 6, 7
OUT2, LOOP = 0x08, 0x10


class Wire:
    """A UART with its line output and IRQ edges recorded."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.edges: list[tuple[bool, str]] = []
        self.uart = Uart16550(self.out.extend, lambda level, source: self.edges.append((level, source)))

    def r(self, reg: int) -> int:
        return int(self.uart.read(reg, 1))

    def w(self, reg: int, value: int) -> None:
        self.uart.write(reg, 1, value)


@pytest.fixture
def wire() -> Wire:
    return Wire()


# --- registers ------------------------------------------------------------------------------------


def test_scratch_register_holds_every_byte(wire: Wire) -> None:
    for value in (0x00, 0x5A, 0xA5, 0xFF):
        wire.w(SCR, value)
        assert wire.r(SCR) == value


def test_dlab_selects_the_divisor_latch(wire: Wire) -> None:
    wire.w(IER, 0x05)
    wire.w(LCR, 0x83)
    wire.w(DLL, 0x01)
    wire.w(DLM, 0x00)
    assert (wire.r(DLL), wire.r(DLM)) == (0x01, 0x00)
    assert wire.uart.baud == 115200
    wire.w(DLL, 0x0C)  # 9600: a THR write would have gone to the line instead
    assert wire.out == b"" and wire.uart.baud == 9600
    wire.w(LCR, 0x03)
    assert wire.r(IER) == 0x05  # offset 1 is IER again, the latch kept
    assert wire.r(LCR) == 0x03 and wire.uart.divisor == 0x0C


def test_ier_keeps_four_bits_and_mcr_five(wire: Wire) -> None:
    wire.w(IER, 0xFF)
    wire.w(MCR, 0xFF)
    assert (wire.r(IER), wire.r(MCR)) == (0x0F, 0x1F)


def test_thr_write_then_lsr_thre_and_temt(wire: Wire) -> None:
    assert wire.r(LSR) == 0x60  # THRE | TEMT, no data
    wire.w(THR, ord("A"))
    assert wire.out == b"A"  # the line is infinitely fast, as QEMU's: sent during the write
    assert wire.uart.lsr() & 0x60 == 0x60 and wire.r(LSR) == 0x60  # and THR and the shifter are empty again


def test_thre_interrupt_raised_by_enabling_cleared_by_iir_read_and_by_thr_write(wire: Wire) -> None:
    wire.w(MCR, OUT2)
    wire.w(IER, 0x02)
    assert wire.edges == [(True, "THRE")]
    assert wire.r(IIR) == 0x02  # THRE, no FIFOs
    assert wire.edges[-1] == (False, "") and wire.r(IIR) == 0x01  # the read cleared it
    wire.w(IER, 0x00)
    wire.w(IER, 0x02)  # re-enabling with THR empty interrupts again
    assert wire.edges[-1] == (True, "THRE")
    edges = len(wire.edges)
    wire.w(THR, ord("x"))  # a THR write clears it, and the byte leaving at once sets it again
    assert wire.out == b"x" and wire.uart.pending_source() == 0x02
    assert len(wire.edges) == edges  # within one access: the line does not pulse
    assert wire.r(IIR) == 0x02 and wire.edges[-1] == (False, "")  # the handler's IIR read lowers it
    wire.w(THR, ord("y"))  # the next byte: sent, THR empty, the line up again
    assert wire.out == b"xy" and wire.edges[-1] == (True, "THRE")


def test_out2_gates_the_irq_line(wire: Wire) -> None:
    wire.w(IER, 0x02)
    assert wire.uart.pending_source() == 0x02 and wire.edges == []  # pending in the chip, but no OUT2: no line
    wire.w(MCR, OUT2)
    assert wire.edges == [(True, "THRE")]
    wire.w(MCR, 0)
    assert wire.edges == [(True, "THRE"), (False, "")]


@pytest.mark.parametrize(("bits", "level"), [(0x00, 1), (0x40, 4), (0x80, 8), (0xC0, 14)])
def test_rx_fifo_trigger_levels_and_timeout(wire: Wire, bits: int, level: int) -> None:
    wire.w(FCR, bits | 0x01)
    wire.w(IER, 0x01)
    wire.w(MCR, OUT2)
    wire.uart.receive(b"x" * (level - 1))
    assert wire.r(IIR) == (0xCC if level > 1 else 0xC1)  # below the trigger: character timeout
    wire.uart.receive(b"y")
    assert wire.r(IIR) == 0xC4  # at the trigger: received data available
    assert wire.edges == [(True, "RX timeout" if level > 1 else "RX data")]
    got = bytes(wire.r(RBR) for _ in range(level))
    assert got == b"x" * (level - 1) + b"y" and wire.edges[-1] == (False, "") and not wire.r(LSR) & 0x01


def test_fifo_overflow_sets_oe_and_loses_the_new_character(wire: Wire) -> None:
    wire.w(FCR, 0x07)
    wire.uart.receive(bytes(range(17)))
    assert wire.r(LSR) & 0x03 == 0x03  # DR | OE
    assert wire.r(LSR) & 0x02 == 0  # OE cleared by the read
    assert bytes(wire.r(RBR) for _ in range(16)) == bytes(range(16))
    assert wire.r(LSR) & 0x01 == 0


def test_without_fifos_an_overrun_replaces_the_unread_character(wire: Wire) -> None:
    wire.uart.receive(b"ab")
    assert wire.r(LSR) & 0x03 == 0x03
    assert wire.r(RBR) == ord("b") and wire.r(LSR) & 0x01 == 0


def test_queued_input_arrives_as_fast_as_it_is_read(wire: Wire) -> None:
    wire.w(FCR, 0x01)
    wire.uart.queue_input(b"0123456789abcdefXYZ")
    assert len(wire.uart.rx) == 16 and not wire.r(LSR) & 0x02
    got = bytearray()
    while wire.r(LSR) & 0x01:
        got.append(wire.r(RBR))
    assert got == b"0123456789abcdefXYZ"


def test_fcr_clears_fifos_and_its_bits_need_fcr0(wire: Wire) -> None:
    wire.w(FCR, 0xC0)  # trigger bits without FCR0: not programmed
    assert wire.r(IIR) & 0xC0 == 0 and wire.uart.trigger == 1
    wire.w(FCR, 0xC1)
    assert wire.r(IIR) & 0xC0 == 0xC0 and wire.uart.trigger == 14
    wire.uart.receive(b"abc")
    wire.w(FCR, 0xC3)  # clear RX
    assert wire.r(LSR) & 0x01 == 0
    wire.uart.receive(b"abc")
    wire.w(FCR, 0x00)  # FIFOs off: both cleared
    assert wire.r(LSR) & 0x01 == 0 and wire.r(IIR) == 0x01
    wire.w(THR, 1)
    wire.w(FCR, 0x05)  # time passed since the THR write: the byte had left before TX was cleared
    assert wire.r(LSR) & 0x60 == 0x60 and wire.out == b"\x01"


def test_iir_reports_the_highest_priority_first(wire: Wire) -> None:
    wire.w(FCR, 0x01)  # trigger 1
    wire.w(MCR, OUT2)
    wire.uart.set_modem_inputs(cts=False, dsr=True, ri=False, dcd=True)  # DCTS: modem status
    wire.uart.receive(b"z" * 17)  # data and an overrun
    wire.w(IER, 0x0F)
    assert wire.r(IIR) == 0xC6  # line status
    wire.r(LSR)
    assert wire.r(IIR) == 0xC4  # received data
    while wire.r(LSR) & 0x01:
        wire.r(RBR)
    assert wire.r(IIR) == 0xC2  # THR empty (ETBEI was just enabled)
    assert wire.r(IIR) == 0xC0  # modem status: the IIR read took THRE
    assert wire.r(MSR) & 0x0F == 0x01
    assert wire.r(IIR) == 0xC1
    assert wire.edges == [(True, "line status"), (False, "")]  # one edge up, one down


def test_loopback_echoes_and_wires_the_modem_lines(wire: Wire) -> None:
    wire.w(FCR, 0x01)
    wire.w(IER, 0x01)
    wire.w(MCR, LOOP | OUT2 | 0x02)  # loop, OUT2, RTS
    assert wire.r(MSR) & 0xF0 == 0x90  # DCD (OUT2) | CTS (RTS): Linux's autoconfig check
    wire.w(THR, 0x42)
    assert wire.r(LSR) & 0x01 and wire.r(RBR) == 0x42
    assert wire.out == b""  # nothing on the line
    wire.w(THR, 0x43)
    wire.r(LSR)
    assert wire.uart.pending_source() == 0x04 and wire.edges == []  # OUT2's pin is forced off in loopback
    wire.w(MCR, OUT2)
    assert wire.edges == [(True, "RX data")]


def test_msr_delta_bits_and_trailing_edge_of_ri(wire: Wire) -> None:
    wire.w(MCR, OUT2)
    wire.w(IER, 0x08)
    wire.uart.set_modem_inputs(cts=True, dsr=True, ri=True, dcd=True)
    assert wire.edges == []  # RI rising: no TERI
    assert wire.r(MSR) == 0xF0
    wire.uart.set_modem_inputs(cts=False, dsr=True, ri=False, dcd=False)
    assert wire.edges == [(True, "modem status")]
    assert wire.r(MSR) == 0x20 | 0x01 | 0x04 | 0x08
    assert wire.r(MSR) == 0x20 and wire.edges[-1] == (False, "")


def test_a_wide_access_reads_consecutive_registers(wire: Wire) -> None:
    wire.w(SCR, 0x77)
    assert wire.uart.read(LSR, 2) == 0x60 | (0xB0 << 8)
    assert wire.uart.read(MSR, 2) == 0xB0 | (0x77 << 8)


# --- on the mock, with the plugin's fixtures ---------------------------------------------------------


def test_firmware_talks_to_the_uart_through_the_mock(
    serve: ServeFactory, guest: SimGuest, xen_host: MockXen, hvm_domain: int, device_model: DeviceModel
) -> None:
    line_out = bytearray()
    edges: list[tuple[bool, str]] = []
    uart = Uart16550(line_out.extend, uart_mod["isa_irq_setter"](device_model, hvm_domain, lambda *e: edges.append(e)))
    serve(ports={(COM1, COM1 + 7): uart})

    def irq4() -> bool:
        return xen_host.domain(hvm_domain).gsi_level(4)

    fw = Firmware(guest, irq4)
    fw.probe()
    fw.init()
    assert uart.baud == 115200 and uart.trigger == 8 and not irq4()
    fw.puts(BANNER)
    assert line_out == BANNER
    fw.outb(IER, 0x01)
    uart.queue_input(b"typed\r")  # the host's keyboard
    assert irq4()  # the ISA line in the mock's vIOAPIC
    fw.outb(IER, 0x00)
    assert not irq4()
    assert fw.readline() == b"typed"
    assert edges == [(True, "THRE"), (False, ""), (True, "RX timeout"), (False, ""), (True, "RX timeout"), (False, "")]
    # Dozens of accesses, but the DMOP only on the six edges:
    assert sum(e.args.get("dm_op") == "set_isa_irq_level" for e in xen_host.events) == len(edges)


def test_run_on_mock_end_to_end(xen_host: MockXen, hvm_domain: int) -> None:
    out = io.StringIO()
    run = uart_mod["run_on_mock"](b"ping\n", out, xen=xen_host, domid=hvm_domain)
    assert run.line == b"ping" and run.servers_left == 0
    assert run.console == BANNER + uart_mod["PROMPT"] + b"The guest read: ping\r\n"
    assert run.irq == [(True, "THRE"), (False, ""), (True, "RX timeout"), (False, "")]
    assert not xen_host.domain(hvm_domain).gsi_level(4)
    assert out.getvalue().splitlines()[-4:] == [
        "[host types 'ping\\r']",
        "[irq4 ↑ RX timeout]",
        "[irq4 ↓]",
        "The guest read: ping",
    ]


def test_run_on_mock_refuses_a_pv_domain(xen_host: MockXen, make_domain: DomainFactory) -> None:
    pv = make_domain(hvm=False)
    with pytest.raises(dm_program.NotHvmError, match=f"dom{pv} is pv, not HVM"):
        uart_mod["run_on_mock"](b"x", io.StringIO(), xen=xen_host, domid=pv)
    assert xen_host.domain(pv).snapshot()["irq"][0] == 0  # no ISA IRQ touched


@pytest.mark.xen_guest(timeout=5)
def test_serve_domain_on_a_pty_until_sigterm(
    xen_host: MockXen, hvm_domain: int, device_model: DeviceModel, guest: SimGuest
) -> None:
    """The real-dom0 path (serve_domain in the main thread, a pty as the terminal) on the
    mock: output and input through the pty, then SIGTERM while IRQ 4 is up."""
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    fw = Firmware(guest, lambda: xen_host.domain(hvm_domain).gsi_level(4))
    results: list[object] = []

    def firmware() -> None:
        try:
            fw.probe()
            fw.init()
            fw.puts(b"login: ")
            os.write(slave, b"root\r")
            results.append(fw.readline())
            fw.outb(IER, 0x02)  # THRE interrupt up, and left up
            fw.wait_irq("THRE")
        except BaseException as e:
            results.append(e)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=firmware)
    try:
        where = dm_program.Where.MOCK
        connection = dm_program.Connection(where, device_model, hvm_domain, xen_host.open_device, xen_host)
        signum = uart_mod["serve_domain"](connection, input_fd=master, output_fd=master, on_ready=thread.start)
        thread.join(5)
        assert signum == signal.SIGTERM
        assert results == [b"root"]
        assert os.read(slave, 100) == b"login: "
        assert not xen_host.domain(hvm_domain).gsi_level(4)  # lowered on the way out
        assert all(s is None for s in xen_host.domain(hvm_domain).snapshot()["servers"])
    finally:
        os.close(master)
        os.close(slave)


# --- the command line ------------------------------------------------------------------------------


def run_script(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env=example_env(PYTHONIOENCODING="utf-8"),
        **kw,
    )


def test_command_line_on_the_mock() -> None:
    done = run_script("--line", "hello uart")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "[irq4 ↑ THRE]\n[irq4 ↓]\n"
        "Hello from the guest's 16550A at 0x3f8 (115200 8N1, FIFOs on)!\n"
        "Type a line for the guest to read:\n"
        "[host types 'hello uart\\r']\n[irq4 ↑ RX data]\n[irq4 ↓]\n"
        "The guest read: hello uart\n"
    )


def test_depriv_on_the_in_process_mock_is_refused() -> None:
    done = run_script("--depriv", "1000:1000")
    assert done.returncode == 2
    assert "--depriv needs a real dom0" in done.stderr and "XENDMOP_MOCK_SOCKET" in done.stderr


def test_a_domain_of_unknown_type_is_refused_before_anything_is_opened(tmp_path: Path) -> None:
    # No xenstore-read on PATH: the type cannot be read, so the domain is refused.
    env = example_env(PATH=str(tmp_path))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--domid", "5"], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 2
    if not xen_host_signs():  # off Xen, no domain has a type: the reason is that there is no Xen here
        last = done.stderr.splitlines()[-1]
        assert "not a Xen host" in last and "--assume-hvm" not in last
        return
    assert "dom5 is of unknown type, not HVM" in done.stderr and "--assume-hvm" in done.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_serving_tears_the_server_down(signum: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--line", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=example_env(PYTHONIOENCODING="utf-8"),
    )
    try:
        read_until(proc.stdout, "Type a line")  # the guest asks; the host waits on stdin
        proc.send_signal(signum)
        status = proc.wait(30)  # stdin stays open: an end of input must not answer the guest first
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert status == 0, err  # a signal is how it is asked to stop, as for every example
        assert "stopped; the ioreq server was destroyed, none is left in dom1" in err and "Traceback" not in err
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdin is not None
        proc.stdin.close()


def test_the_line_can_come_from_stdin() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--line", "-"],
        input="from stdin\n",
        capture_output=True,
        text=True,
        timeout=60,
        env=example_env(PYTHONIOENCODING="utf-8"),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("The guest read: from stdin\n")


def test_raw_terminal_keeps_signals_and_restores_the_mode() -> None:
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        assert before[3] & termios.ICANON
        with uart_mod["raw_terminal"](slave):
            lflag = termios.tcgetattr(slave)[3]
            assert not lflag & (termios.ICANON | termios.ECHO) and lflag & termios.ISIG  # Ctrl-C still stops us
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_end_of_input_stops_watching_the_input_fd() -> None:
    """stdin at EOF must not keep the loop spinning: the fd is pointed at a quiet pipe."""
    loop = ServeLoop()
    uart = Uart16550(lambda data: None)
    fd, writer = os.pipe()
    os.write(writer, b"last words")
    os.close(writer)
    original = os.fstat(fd).st_ino
    close_wake = uart_mod["attach"](loop, uart, fd)
    thread = threading.Thread(target=loop.run, kwargs={"handle_signals": False})
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while os.fstat(fd).st_ino == original:
            assert time.monotonic() < deadline, "EOF on the input fd was not handled"
            time.sleep(0.01)
    finally:
        loop.stop()
        thread.join(5)
        close_wake()
        os.close(fd)
    assert not thread.is_alive() and bytes(uart.rx) + bytes(uart.pending_input) == b"last words"  # paced: one in RBR


@pytest.mark.parametrize("content", [b"", b"from a file\r"])
def test_input_that_epoll_refuses_is_typed_at_once(tmp_path: Path, content: bytes) -> None:
    """/dev/null or a regular file as stdin: epoll says EPERM, so it is read whole, not watched."""
    path = tmp_path / "input"
    path.write_bytes(content)
    loop = ServeLoop()
    uart = Uart16550(lambda data: None)
    fd = os.open(os.devnull if not content else path, os.O_RDONLY)
    try:
        close_wake = uart_mod["attach"](loop, uart, fd)
        thread = threading.Thread(target=loop.run, kwargs={"handle_signals": False})
        thread.start()
        time.sleep(0.05)
        loop.stop()
        thread.join(5)
        close_wake()
    finally:
        os.close(fd)
    assert not thread.is_alive() and bytes(uart.rx) + bytes(uart.pending_input) == content


# --- deprivileged, in its own process, serving a mock host process ---------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_deprivileged_device_model_serves_a_mock_host_process(mock_host_process: str) -> None:
    from xendmop.mock.remote import RemoteGuest, RemoteXen

    with deprivileged(
        SCRIPT,
        mock_host_process,
        ready="serving dom1's COM1; deprivileged to uid 65534 gid 65534",
        stdin=True,
        text=False,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        with RemoteXen(mock_host_process) as remote:
            fw = Firmware(RemoteGuest(remote, 1), lambda: remote.gsi_level(1, 4))
            fw.probe()
            fw.init()
            fw.puts(b"login: ")
            assert read_bytes(proc.stdout, 7) == b"login: "  # the guest's console on the device model's stdout
            proc.stdin.write(b"root\r")  # and its keyboard on stdin
            proc.stdin.flush()
            assert fw.readline() == b"root"
            fw.outb(IER, 0x02)
            fw.wait_irq("THRE")  # IRQ 4 left up ...
            assert len(remote.servers(1)) == 1
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            assert "stopped (SIGTERM); the ioreq server was destroyed" in read_until(proc.stderr, "stopped")
            assert remote.servers(1) == {}
            assert not remote.gsi_level(1, 4)  # ... and lowered by the device model on its way out


def test_a_pv_domain_of_a_mock_host_process_is_refused(mock_host_process: str) -> None:
    from xendmop.mock.remote import RemoteXen

    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--domid", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env=example_env(XENDMOP_MOCK_SOCKET=mock_host_process),
    )
    assert done.returncode == 2 and "dom2 is not HVM" in done.stderr and "EINVAL" in done.stderr
    with RemoteXen(mock_host_process) as remote:
        assert remote.servers(2) == {}


def test_the_terminal_is_the_guests_console_and_is_restored(mock_host_process: str) -> None:
    """``--domid`` with a terminal as stdin (a pty here): raw mode while serving, keys to the
    guest, its output to the terminal; Ctrl-C (SIGINT) stops it and the mode is restored."""
    from xendmop.mock.remote import RemoteGuest, RemoteXen

    master, slave = os.openpty()
    cooked = termios.tcgetattr(slave)
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--domid", "1"],
        stdin=slave,
        stdout=slave,
        stderr=subprocess.PIPE,
        env=example_env(XENDMOP_MOCK_SOCKET=mock_host_process),
    )
    try:
        read_until(proc.stderr, "serving dom1's COM1; Ctrl-C to stop")
        assert not termios.tcgetattr(slave)[3] & termios.ICANON  # raw while serving
        with RemoteXen(mock_host_process) as remote:
            fw = Firmware(RemoteGuest(remote, 1), lambda: remote.gsi_level(1, 4))
            fw.init()
            fw.puts(b"Password: ")
            assert read_bytes(master, 10) == b"Password: "
            os.write(master, b"s3cret\r")  # not echoed by the terminal, read by the guest
            assert fw.readline() == b"s3cret"
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0
            assert remote.servers(1) == {}
        assert termios.tcgetattr(slave) == cooked
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
        os.close(slave)
