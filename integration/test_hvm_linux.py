"""Every example device model serving a real Linux HVM guest, in one guest boot.

One guest (``hvmguest``: dom0's kernel, a busybox initramfs, QEMU as its default device
model) is created paused; the examples start as processes, each deprivileged
(``--depriv``/``--chroot``) and each its own ioreq server in the guest: ``uart16550`` (COM1,
the guest's console, which the tests type into), ``pci_edu`` (slot 4), ``framebuffer``
(ports 0x1ce/0x1cf) and ``debugcon`` (port 0x510).  Then the guest runs, and its own drivers
use them: Linux's 8250, the PCI core and ``uio_pci_generic``, and ``xendmop_edu`` (a small
driver built for it, ``lab/guest/hvm/edu.c``).  The tests run in file order (pytest keeps
it) and share the boot; the last one powers the guest off under the device models.
A boot is minutes under TCG, so everything that can use this guest does.
"""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hvmguest
import pytest
import xenlab
from hvmguest import Console, Example, HvmGuest

pytestmark = pytest.mark.x86_only("HVM Linux guests with QEMU, SeaBIOS and PCI; Xen/Arm has no HVM guests")

DEPRIV_IDS = "990:990"
EDU_SLOT = 4
EDU_BDF = f"00:{EDU_SLOT:02x}.0"
DEBUGCON_PORT = 0x510
FB_WIDTH, FB_HEIGHT = 64, 48
BOOT_TIMEOUT = 900  # unpause to the shell under TCG: 75-95 s idle, much more on a loaded host


@dataclass
class LinuxGuest:
    guest: HvmGuest
    console: Console
    examples: dict[str, Example]
    fb_png: Path
    boot_seconds: float

    def sh(self, command: str, timeout: float = 120, check: bool = True) -> str:
        return self.console.run(command, timeout, check)


@pytest.fixture(scope="module")
def linux(tmp_path_factory: pytest.TempPathFactory, hvm_initramfs: Path) -> Iterator[LinuxGuest]:
    work = tmp_path_factory.mktemp("hvm")
    guest = hvmguest.create(hvm_initramfs)
    domid = str(guest.domid)
    chroot = hvmguest.empty_chroot()
    depriv = ["--depriv", DEPRIV_IDS, "--chroot", str(chroot)]
    fb_dir = work / "fb"
    fb_dir.mkdir()
    uid, gid = (int(x) for x in DEPRIV_IDS.split(":"))
    os.chown(fb_dir, uid, gid)  # the deprivileged framebuffer writes its PNG here
    fb_png = fb_dir / "fb.png"
    examples: dict[str, Example] = {}
    try:
        examples["uart16550"] = hvmguest.start_example("uart16550.py", ["--domid", domid, *depriv], pipes=True)
        examples["pci_edu"] = hvmguest.start_example("pci_edu.py", ["--domid", domid, "--slot", str(EDU_SLOT), *depriv])
        examples["framebuffer"] = hvmguest.start_example(
            "framebuffer.py", ["--domid", domid, "--output", str(fb_png), "--interval", "0", *depriv]
        )
        examples["debugcon"] = hvmguest.start_example(
            "debugcon.py", ["--domid", domid, "--port", hex(DEBUGCON_PORT), *depriv], pipes=True
        )
        for example in examples.values():
            example.wait_line(r"Ctrl-C to stop", timeout=120)
        console = hvmguest.uart_console(examples["uart16550"])
        t0 = time.monotonic()
        guest.unpause()
        console.wait_for(hvmguest.READY, BOOT_TIMEOUT)
        yield LinuxGuest(guest, console, examples, fb_png, time.monotonic() - t0)
    finally:
        guest.destroy()
        for example in examples.values():
            if example.proc.poll() is None:
                example.stop(signal.SIGKILL, timeout=10)


def interrupts(linux: LinuxGuest, name: str) -> tuple[int, str]:
    """(count summed over CPUs, the whole line) of the /proc/interrupts line naming ``name``."""
    line = linux.sh(f"grep -E '{name}' /proc/interrupts")
    assert len(line.splitlines()) == 1, line
    fields = line.split()[1:]
    return sum(int(f) for f in fields if f.isdigit()), line


# --- uart16550: the guest's console -------------------------------------------------------------


def test_uart_carries_the_kernel_log(linux: LinuxGuest) -> None:
    linux.sh("echo '<2>xendmop: printk through the 8250 console' > /dev/kmsg")
    # The kernel's console driver, not the shell, wrote this: it carries printk's timestamp.
    linux.console.wait_for(re.compile(rb"\[ *\d+\.\d+\] xendmop: printk through the 8250 console"), 60)


def test_uart_is_found_as_a_16550a_at_irq_4(linux: LinuxGuest) -> None:
    assert "ttyS0 at I/O 0x3f8 (irq = 4, base_baud = 115200) is a 16550A" in linux.sh("dmesg | grep ttyS0")
    serial = linux.sh("cat /proc/tty/driver/serial")
    assert re.search(r"^0: uart:16550A port:000003F8 irq:4 ", serial, re.M), serial


def test_uart_transmits_and_receives_on_interrupts(linux: LinuxGuest) -> None:
    before, line = interrupts(linux, "ttyS0")
    out = linux.sh("guestio txbench 1000")
    text, summary = out.rsplit("\n", 1)
    assert summary.split()[0] == "1000"
    expected = "".join(("abcdefghijklmnopqrstuvwxyz" * 3)[:63] + "\n" for _ in range(16))[:1000]
    assert text == expected  # every byte, in order, through the Python UART
    # RX: a line typed in dom0 is read by the guest's shell (the tty's interrupt-driven input).
    linux.console.send(b'read -r typed; echo "typed=[$typed]"\n')
    linux.console.send(b"hello from dom0, 42\n")
    linux.console.wait_for(re.compile(rb"typed=\[hello from dom0, 42\]"), 60)
    after, line = interrupts(linux, "ttyS0")
    assert after > before, line


# --- pci_edu ------------------------------------------------------------------------------------


def edu_bar0(linux: LinuxGuest) -> int:
    first = linux.sh(f"head -n1 /sys/bus/pci/devices/0000:{EDU_BDF}/resource").split()
    return int(first[0], 16)


def devmem(linux: LinuxGuest, addr: int, value: int | None = None) -> int:
    if value is None:
        return int(linux.sh(f"devmem {addr:#x} 32"), 16)
    linux.sh(f"devmem {addr:#x} 32 {value:#x}")
    return value


def test_edu_is_enumerated_at_its_slot_with_its_ids_and_class(linux: LinuxGuest) -> None:
    ids = linux.sh(f"cd /sys/bus/pci/devices/0000:{EDU_BDF} && cat vendor device class revision").split()
    assert ids == ["0x1234", "0x11e8", "0xff0000", "0x10"], ids  # class: PCI_CLASS_OTHERS (0xff), 00, 00
    start, end = (int(x, 16) for x in linux.sh(f"head -n1 /sys/bus/pci/devices/0000:{EDU_BDF}/resource").split()[:2])
    assert end - start + 1 == 1 << 20 and start % (1 << 20) == 0  # BAR0: 1 MiB, placed by hvmloader


def test_edu_registers_answer_from_the_guest(linux: LinuxGuest) -> None:
    bar = edu_bar0(linux)
    assert devmem(linux, bar) == 0x010000ED
    devmem(linux, bar + 0x04, 0x12345678)
    assert devmem(linux, bar + 0x04) == 0xEDCBA987  # liveness: the bitwise NOT
    devmem(linux, bar + 0x08, 10)
    assert devmem(linux, bar + 0x08) == 3628800  # 10!


def test_edu_intx_is_counted_by_uio_pci_generic(linux: LinuxGuest) -> None:
    linux.sh("insmod /mods/uio.ko && insmod /mods/uio_pci_generic.ko")
    linux.sh("echo '1234 11e8' > /sys/bus/pci/drivers/uio_pci_generic/new_id")
    try:
        assert linux.sh(f"basename $(readlink /sys/bus/pci/devices/0000:{EDU_BDF}/driver)") == "uio_pci_generic"
        bar = edu_bar0(linux)
        before, _ = interrupts(linux, "uio_pci_generic")
        for _ in range(3):
            devmem(linux, bar + 0x60, 1)  # raise: INTA# asserted (set_pci_intx_level)
            # uio_pci_generic's handler saw the line through the status register's interrupt bit
            # and masked it with COMMAND's INTx-disable bit; acknowledge it in the device, then
            # unmask in COMMAND (uio_pci_generic leaves that to user space).
            command = int(linux.sh(f"guestio cfgr {EDU_BDF} 0x04"), 16) & 0xFFFF
            assert command & 0x400, f"INTx not masked by the handler: COMMAND {command:#x}"
            devmem(linux, bar + 0x64, 1)
            linux.sh(f"guestio cfgw {EDU_BDF} 0x04 {command & ~0x400:#x}")  # status half 0: RW1C, no change
        after, line = interrupts(linux, "uio_pci_generic")
        assert after - before == 3, line
    finally:
        linux.sh(f"echo 0000:{EDU_BDF} > /sys/bus/pci/drivers/uio_pci_generic/unbind", check=False)
        linux.sh("echo '1234 11e8' > /sys/bus/pci/drivers/uio_pci_generic/remove_id", check=False)


def test_edu_msi_enabled_by_the_guests_driver_is_delivered(linux: LinuxGuest) -> None:
    linux.sh("insmod /mods/xendmop_edu.ko")
    assert linux.sh(f"basename $(readlink /sys/bus/pci/devices/0000:{EDU_BDF}/driver)") == "xendmop_edu"
    assert "MSI" in linux.sh("dmesg | grep 'xendmop_edu:'")
    # The PCI core wrote the MSI capability's address, data and enable bit through config space.
    cap = int(linux.sh(f"guestio cfgr {EDU_BDF} 0x34"), 16) & 0xFC
    while cap:
        header = int(linux.sh(f"guestio cfgr {EDU_BDF} {cap:#x}"), 16)
        if header & 0xFF == 0x05:  # PCI_CAP_ID_MSI
            break
        cap = header >> 8 & 0xFC
    assert cap, "no MSI capability"
    assert header >> 16 & 1, f"MSI not enabled: control {header >> 16:#x}"
    bar = edu_bar0(linux)
    before, line = interrupts(linux, "xendmop_edu")
    assert "MSI" in line.upper() or "msi" in line, line
    for _ in range(3):
        devmem(linux, bar + 0x60, 1)  # raise: an MSI (inject_msi); the driver acknowledges it
    after, line = interrupts(linux, "xendmop_edu")
    assert after - before == 3, line
    assert devmem(linux, bar + 0x24) == 0  # every one acknowledged by the guest's handler


def test_edu_dma_round_trip_through_guest_ram(linux: LinuxGuest) -> None:
    bar = edu_bar0(linux)
    src, dst = hvmguest.DMA_PHYS, hvmguest.DMA_PHYS + 0x1000
    linux.sh(f"guestio memfill {src:#x} 4096 0x5eed && guestio memfill {dst:#x} 4096 7")
    for reg, value in ((0x80, src), (0x88, 0x40000), (0x90, 4096), (0x98, 0x1)):  # RAM -> device
        devmem(linux, bar + reg, value)
    for reg, value in ((0x80, 0x40000), (0x88, dst), (0x90, 4096), (0x98, 0x3)):  # device -> RAM
        devmem(linux, bar + reg, value)
    sums = linux.sh(f"guestio memsum {src:#x} 4096; guestio memsum {dst:#x} 4096").split()
    assert sums[0] == sums[1], sums
    assert sums[0] == hex(fnv1a(pattern(0x5EED, 4096)))


def test_edu_follows_its_bar_when_the_guest_moves_it(linux: LinuxGuest) -> None:
    linux.sh("rmmod xendmop_edu", check=False)  # loaded by the MSI test: it maps the BAR
    old = edu_bar0(linux)
    taken = []
    for line in linux.sh("cat /sys/bus/pci/devices/*/resource").splitlines():
        if not re.fullmatch(r"(0x[0-9a-f]+ ?){3}", line.strip()):
            continue  # a kernel message on the console between the lines (6.12 prints some)
        start, end, flags = (int(x, 16) for x in line.split())
        if flags & 0x200 and end > start:  # IORESOURCE_MEM
            taken.append((start, end))
    new = next(
        base
        for base in range(0xF0000000, 0xFC000000, 1 << 20)
        if all(base + (1 << 20) - 1 < s or base > e for s, e in taken)
    )
    linux.sh(f"guestio cfgw {EDU_BDF} 0x10 {new:#x}")
    try:
        assert int(linux.sh(f"guestio cfgr {EDU_BDF} 0x10"), 16) & ~0xF == new
        assert devmem(linux, new) == 0x010000ED  # the device answers at its new address
        assert devmem(linux, old) == 0xFFFFFFFF  # and no longer at the old one
    finally:
        linux.sh(f"guestio cfgw {EDU_BDF} 0x10 {old:#x}")
    assert devmem(linux, old) == 0x010000ED


# --- framebuffer -----------------------------------------------------------------------------------


def pattern(seed: int, length: int) -> bytes:
    """guestio's memfill pattern: xorshift32 words, little-endian."""
    x = seed or 1
    out = bytearray()
    while len(out) < length:
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        out += x.to_bytes(4, "little")
    return bytes(out[:length])


def fnv1a(data: bytes) -> int:
    h = 2166136261
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def decode_png_rgb(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and RGB bytes of an 8-bit RGB PNG without interlace (what the example writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, interlace) == (8, 2, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = width * 3
    rows, prev = [], bytearray(stride)
    for y in range(height):
        ftype, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - 3] if i >= 3 else 0
            up, ul = prev[i], prev[i - 3] if i >= 3 else 0
            if ftype == 1:
                line[i] = (line[i] + left) & 0xFF
            elif ftype == 2:
                line[i] = (line[i] + up) & 0xFF
            elif ftype == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif ftype == 4:
                p = left + up - ul
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - ul)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else ul)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, b"".join(rows)


def xrgb_to_rgb(xrgb: bytes) -> bytes:
    out = bytearray()
    for i in range(0, len(xrgb), 4):
        out += bytes((xrgb[i + 2], xrgb[i + 1], xrgb[i]))
    return bytes(out)


def fb_reg(linux: LinuxGuest, index: int, value: int | None = None) -> str:
    cmd = f"guestio outw 0x1ce {index:#x}"
    if value is None:
        return linux.sh(f"{cmd} && guestio inw 0x1cf")
    return linux.sh(f"{cmd} && guestio outw 0x1cf {value:#x}")


def wait_png(path: Path, after: float, timeout: float = 60) -> bytes:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.stat().st_mtime > after:
            time.sleep(0.2)  # replaced atomically (rename), but let a second flush land
            return path.read_bytes()
        time.sleep(0.2)
    raise AssertionError(f"{path} was not (re)written in {timeout} s")


def test_framebuffer_png_shows_exactly_the_guests_pixels(linux: LinuxGuest) -> None:
    assert int(fb_reg(linux, 0x0), 16) == 0xB0C5
    size = FB_WIDTH * FB_HEIGHT * 4
    gfn = hvmguest.FB_PHYS >> 12
    for index, value in ((0x1, FB_WIDTH), (0x2, FB_HEIGHT), (0x3, 32), (0x10, gfn & 0xFFFF), (0x11, gfn >> 16)):
        fb_reg(linux, index, value)
    fb_reg(linux, 0x4, 1)  # enable: the device model maps the frames and starts track_dirty_vram
    assert int(fb_reg(linux, 0x4), 16) == 1
    t = time.time()
    linux.sh(f"guestio memfill {hvmguest.FB_PHYS:#x} {size} 0xfb1")
    fb_reg(linux, 0x12, 1)  # FLUSH
    width, height, rgb = decode_png_rgb(wait_png(linux.fb_png, t))
    assert (width, height) == (FB_WIDTH, FB_HEIGHT)
    assert rgb == xrgb_to_rgb(pattern(0xFB1, size))
    # A second picture in the middle page only: the PNG follows, and only that page was re-read.
    t = time.time()
    linux.sh(f"guestio memfill {hvmguest.FB_PHYS + 4096:#x} 4096 0xfb2")
    fb_reg(linux, 0x12, 1)
    _, _, rgb = decode_png_rgb(wait_png(linux.fb_png, t))
    expected = bytearray(pattern(0xFB1, size))
    expected[4096:8192] = pattern(0xFB2, 4096)
    assert rgb == xrgb_to_rgb(bytes(expected))
    assert int(fb_reg(linux, 0x13), 16) == 1  # LAST_READ: one dirty page re-read
    fb_reg(linux, 0x4, 0)


# --- debugcon ----------------------------------------------------------------------------------------


def test_debugcon_serves_its_port_and_xen_keeps_0xe9(linux: LinuxGuest) -> None:
    example = linux.examples["debugcon"]
    assert any("Xen handles port 0xe9 itself" in line for line in example.lines)
    linux.sh(f"for b in 104 105 33 10; do guestio outb {DEBUGCON_PORT:#x} $b; done")  # "hi!\n"
    assert example.proc.stdout is not None
    assert example.proc.stdout.readline() == b"hi!\n"
    assert int(linux.sh(f"guestio inb {DEBUGCON_PORT:#x}"), 16) == 0xE9  # "the console is here"
    # The same bytes to 0xE9 reach Xen's console, not us.
    linux.sh("for b in 120 101 110 10; do guestio outb 0xe9 $b; done")  # "xen\n"
    assert f"(d{linux.guest.domid}) xen" in xenlab.xl("dmesg")


# --- deprivileged, proven on the live processes ----------------------------------------------------


@pytest.mark.parametrize("name", ["uart16550", "pci_edu", "framebuffer", "debugcon"])
def test_each_example_passes_depriv_check_while_serving(linux: LinuxGuest, name: str) -> None:
    example = linux.examples[name]
    assert any("deprivileged to uid 990 gid 990" in line for line in example.lines), example.lines
    done = subprocess.run(
        [sys.executable, "-m", "xendmop", "depriv-check", str(example.proc.pid)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "privcmd" in done.stdout and "evtchn" in done.stdout  # the real fds were probed


# --- timing, then the guest powers off under the device models ------------------------------------


def test_uart_throughput_and_port_round_trips_are_recorded(linux: LinuxGuest) -> None:
    measured = hvmguest.measure_uart(linux.console, linux.examples["uart16550"].proc.pid)
    measured["boot_to_shell_s"] = round(linux.boot_seconds, 1)
    hvmguest.record_timing("hvm_uart_xendmop", measured)
    assert measured["tx_bytes_per_s"] > 0 and measured["port_reads_per_s"] > 0


def test_guest_powering_off_first_ends_every_example_cleanly(linux: LinuxGuest) -> None:
    linux.console.send(b"poweroff -f\n")
    assert linux.guest.wait_gone(120), "the guest did not power off"
    for name, example in linux.examples.items():
        status = example.proc.wait(60)
        text = "\n".join(example.lines)
        assert status == 0, f"{name} exited {status}:\n{text}"
        assert re.search(rf"dom{linux.guest.domid} is gone", text), f"{name}:\n{text}"
        assert not re.search(r"failed|Traceback|ENOENT|ESRCH|No such", text), f"{name}:\n{text}"
