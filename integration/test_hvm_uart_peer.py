"""The UART on two more boots: through the emulated PIC, and QEMU's own 16550 as our peer.

- ``xen_nopv noapic``: the guest uses neither Xen's event-channel interrupts nor the IOAPIC,
  so IRQ 4 reaches Linux's 8250 driver through the emulated 8259 PIC (``XT-PIC`` in
  /proc/interrupts); examples/uart16550.py runs here without deprivileging (the shared boot
  of test_hvm_linux.py runs every example deprivileged), with ``--state-dir``: it is killed
  (SIGKILL) while the guest writes, started again, takes its ioreq server over, and the guest's
  output goes on.
- The peer: the same guest with ``serial="pty"``, so QEMU (its default device model) emulates
  COM1 in C; the same TX and port-read measurements as ours, in the same lab run, and the
  ratio recorded in ``out/timing.json``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hvmguest
import pytest
from hvmguest import Console, Example, HvmGuest

pytestmark = pytest.mark.x86_only("HVM Linux guests with QEMU and the 8259 PIC; Xen/Arm has no HVM guests")

BOOT_TIMEOUT = 1800  # xen_nopv noapic boots far slower than the PV-on-HVM default under TCG
_RESULTS = os.environ.get("XENDMOP_LAB_RESULTS")
PROFILE = Path(_RESULTS) / "uart16550-pic.prof" if _RESULTS else None


@dataclass
class UartGuest:
    guest: HvmGuest
    console: Console
    uart: Example | None
    boot_seconds: float
    uart_args: list[str] | None = None


def _interrupt_line(console: Console, name: str) -> tuple[int, str]:
    line = console.run(f"grep -E '{name}' /proc/interrupts")
    assert len(line.splitlines()) == 1, line
    return sum(int(f) for f in line.split()[1:] if f.isdigit()), line


@pytest.fixture(scope="module")
def pic_guest(hvm_initramfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UartGuest]:
    guest = hvmguest.create(hvm_initramfs, extra_cmdline="xen_nopv noapic")
    args = ["--domid", str(guest.domid), "--state-dir", str(tmp_path_factory.mktemp("uart-state"))]
    uart = hvmguest.start_example("uart16550.py", args, pipes=True)
    run = None
    try:
        uart.wait_line(r"Ctrl-C to stop", timeout=120)
        console = hvmguest.uart_console(uart)
        t0 = time.monotonic()
        guest.unpause()
        console.wait_for(hvmguest.READY, BOOT_TIMEOUT)
        run = UartGuest(guest, console, uart, time.monotonic() - t0, args)
        yield run
    finally:
        guest.destroy()
        for example in {uart, run.uart if run else None} - {None}:
            assert example is not None
            if example.proc.poll() is None:
                example.stop(signal.SIGKILL, timeout=10)


def test_pic_uart_is_a_16550a_whose_irq_4_comes_through_the_8259(pic_guest: UartGuest) -> None:
    console = pic_guest.console
    assert re.search(r"^0: uart:16550A port:000003F8 irq:4 ", console.run("cat /proc/tty/driver/serial"), re.M)
    before, line = _interrupt_line(console, "ttyS0")
    assert "XT-PIC" in line, line
    console.send(b'read -r typed; echo "typed=[$typed]"\n')
    console.send(b"through the PIC\n")
    console.wait_for(re.compile(rb"typed=\[through the PIC\]"), 60)
    out = console.run("guestio txbench 500")
    assert out.rsplit("\n", 1)[1].split()[0] == "500"
    after, line = _interrupt_line(console, "ttyS0")
    assert after > before, line


def expected_txbench(n: int) -> bytes:
    """What ``guestio txbench n`` writes: 63 letters and a newline, again and again."""
    line = bytes(ord("a") + i % 26 for i in range(63)) + b"\n"
    return (line * (n // 64 + 1))[:n]


def test_a_uart_killed_mid_output_is_restarted_and_the_guest_goes_on(pic_guest: UartGuest) -> None:
    """SIGKILL the UART while the guest's 8250 driver is sending, start it again with the same
    --state-dir: it takes over its ioreq server (the vCPU was waiting on an ioreq nobody
    answered) and every byte the guest was told was sent arrives; at most the one byte in
    flight at the kill arrives twice (examples/uart16550.py's docstring says why)."""
    old = pic_guest.uart
    assert old is not None and pic_guest.uart_args is not None
    n = 6000
    with pic_guest.console._cond:
        start = len(pic_guest.console.data)
    pic_guest.console.send(f"guestio txbench {n}; echo @@TXDONE\n".encode())
    pic_guest.console.wait_for(re.compile(rb"(?:[a-z]{63}\n){3}"), 300, start)  # three whole lines out
    old.proc.kill()  # mid-output: the guest's vCPU now waits on an ioreq nobody answers
    old.proc.wait(30)
    deadline = time.monotonic() + 30
    while not pic_guest.console.closed:  # what the killed process wrote is read to its end first
        assert time.monotonic() < deadline, "the killed UART's output never ended"
        time.sleep(0.05)
    before = bytes(pic_guest.console.data[start:])
    time.sleep(2)
    # The restarted device model runs under cProfile: where its time goes, for bench/README.md.
    profile = ["-m", "cProfile", "-o", str(PROFILE)] if PROFILE else []
    new = hvmguest.start_example("uart16550.py", pic_guest.uart_args, pipes=True, python_args=profile)
    pic_guest.uart = new
    new.wait_line(r"taking over ioreq server", timeout=120)
    new.wait_line(r"Ctrl-C to stop", timeout=120)
    console = hvmguest.uart_console(new)
    pic_guest.console = console
    console.wait_for(re.compile(rb"@@TXDONE"), 600)
    got = before + bytes(console.data)
    got = got[: got.index(b"\n" + str(n).encode() + b" ")]
    want = expected_txbench(n)
    assert len(before) < n, "the kill came after the guest had finished: nothing was tested"
    if got != want:  # the one byte in flight at the kill may come twice, nothing may be missing
        assert len(got) == n + 1, (len(got), n)
        i = next(i for i in range(n) if got[i] != want[i])
        assert got[i] == got[i - 1] and got[:i] + got[i + 1 :] == want, got[i - 8 : i + 8]
    # The guest goes on: its shell answers through the new device model.
    assert console.run("echo still here") == "still here"


def test_pic_uart_stops_on_sigterm_with_its_server_destroyed(pic_guest: UartGuest) -> None:
    assert pic_guest.uart is not None
    measured = hvmguest.measure_uart(pic_guest.console, pic_guest.uart.proc.pid)
    hvmguest.record_timing("hvm_uart_xendmop_pic_profiled", measured)
    status = pic_guest.uart.stop(signal.SIGTERM, timeout=60)
    assert status == 0, pic_guest.uart.lines
    assert any("the ioreq server was destroyed" in line for line in pic_guest.uart.lines), pic_guest.uart.lines
    if PROFILE:  # written at the profiled process's clean exit
        summarize_profile(PROFILE, PROFILE.with_suffix(".txt"))


def summarize_profile(path: Path, out: Path) -> None:
    """The 25 functions with the most own time, and the share of the process's time spent
    inside the kernel calls the device model makes (ioctl, eventfd, read/write, epoll)."""
    import io
    import pstats

    text = io.StringIO()
    stats = pstats.Stats(str(path), stream=text)
    stats.sort_stats("tottime").print_stats(25)
    out.write_text(text.getvalue())


# --- QEMU's 16550, the peer ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def qemu_guest(hvm_initramfs: Path) -> Iterator[UartGuest]:
    guest = hvmguest.create(hvm_initramfs, serial_pty=True)
    console, close = hvmguest.pty_console(guest.qemu_pty())
    try:
        t0 = time.monotonic()
        guest.unpause()
        console.wait_for(hvmguest.READY, BOOT_TIMEOUT)
        yield UartGuest(guest, console, None, time.monotonic() - t0)
    finally:
        guest.destroy()
        close()


def test_qemu_16550_peer_is_measured_and_the_ratio_recorded(qemu_guest: UartGuest) -> None:
    console = qemu_guest.console
    assert re.search(r"^0: uart:16550A port:000003F8 irq:4 ", console.run("cat /proc/tty/driver/serial"), re.M)
    peer = hvmguest.measure_uart(console, qemu_guest.guest.qemu_pid())
    peer["boot_to_shell_s"] = round(qemu_guest.boot_seconds, 1)
    hvmguest.record_timing("hvm_uart_qemu", peer)
    assert peer["tx_bytes_per_s"] > 0 and peer["port_reads_per_s"] > 0
    out = os.environ.get("XENDMOP_LAB_RESULTS")
    ours = json.loads((Path(out) / "timing.json").read_text()).get("hvm_uart_xendmop") if out else None
    if ours:
        ratio = {
            "tx_bytes_per_s": round(ours["tx_bytes_per_s"] / peer["tx_bytes_per_s"], 3),
            "port_reads_per_s": round(ours["port_reads_per_s"] / peer["port_reads_per_s"], 3),
            "note": "xendmop's Python 16550 / QEMU's C 16550, same guest, same lab run (TCG)",
        }
        hvmguest.record_timing("hvm_uart_ratio_xendmop_to_qemu", ratio)
        print("xendmop / QEMU:", ratio)
