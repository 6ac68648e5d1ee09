"""A real Linux HVM guest for the live tests: its initramfs, its creation, its console.

The guest runs dom0's own kernel (``/boot/vmlinuz-*``; dom0 and guest share one Debian
kernel, so dom0's modules are the guest's) with a small initramfs built here at test time:
``busybox`` from Debian's ``busybox-static`` as the whole userland, ``guestio`` (port and
physical-memory accesses of exact sizes; ``lab/guest/hvm/guestio.c``, compiled statically
with dom0's gcc), the kernel's own ``uio``/``uio_pci_generic`` modules, and ``xendmop_edu.ko``
(``lab/guest/hvm/edu.c``), built against dom0's kernel headers: the guest's driver for
``examples/pci_edu.py``.  QEMU (``qemu-system-xen``) is the guest's default device model, as
for any xl HVM guest; with no ``serial=`` line it leaves COM1 free for our UART.

The guest's console is ttyS0.  ``Console`` drives the shell that ``/init`` leaves there
through whatever carries ttyS0's bytes (``examples/uart16550.py``'s stdin and stdout, or
QEMU's pty for the peer run): echo is off and there is no prompt, so only commands and
their answers cross the (slow) UART.

Kept free of xendmop imports, as ``xenlab``: the examples under test run as processes.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xenlab

REPO = Path(__file__).resolve().parent.parent
HVM_SRC = REPO / "integration" / "lab" / "guest" / "hvm"
EXAMPLES = REPO / "examples"

#: guest RAM Linux keeps its hands off (``memmap=SIZE$START``, an e820 "reserved" hole it
#: never allocates), so the tests can give it to devices through /dev/mem: the framebuffer's
#: pixels and the edu DMA buffers live here.
HOLE_START, HOLE_SIZE = 0x5000000, 0x400000
FB_PHYS = HOLE_START
DMA_PHYS = HOLE_START + 0x200000

#: the guest's kernel command line (``extra`` is appended).  loglevel=4 keeps the console
#: quiet (each byte costs several ioreqs); nokaslr/edd=off skip work nothing here needs;
#: one 8250 port is ours.
CMDLINE = (
    "console=ttyS0,115200 earlyprintk=serial,ttyS0,115200 loglevel=4 nokaslr edd=off "
    f"8250.nr_uarts=1 rdinit=/init panic=-1 memmap={HOLE_SIZE >> 20}M${HOLE_START:#x}"
)
READY = re.compile(rb"@@READY ([0-9.]+)")


def kernel_release() -> str:
    return os.uname().release


# --- the initramfs ----------------------------------------------------------------------------


def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), ino: int = 0) -> bytes:
    """One "newc" (070701) cpio record: a 110-byte ASCII header, the name and the data, each
    padded to 4 bytes, as the kernel's initramfs unpacker reads them."""
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    header = b"070701" + b"".join(b"%08X" % v for v in fields)
    out = header + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4) + data
    return out + b"\0" * (-len(out) % 4)


def pack_cpio(files: dict[str, tuple[int, bytes]], nodes: dict[str, tuple[int, int]]) -> bytes:
    """A gzip'd newc archive: ``files`` {path: (mode, data)} (a mode of 0o040xxx is a
    directory), ``nodes`` {path: (major, minor)} character devices."""
    buf = io.BytesIO()
    ino = 1
    for path, (mode, data) in files.items():
        buf.write(_cpio_entry(path, mode, data, ino=ino))
        ino += 1
    for path, rdev in nodes.items():
        buf.write(_cpio_entry(path, 0o020600, rdev=rdev, ino=ino))
        ino += 1
    buf.write(_cpio_entry("TRAILER!!!", 0))
    return gzip.compress(buf.getvalue(), compresslevel=6)


def builtin_module(relpath: str) -> bool:
    """Is this module (a path under ``kernel/``, no suffix) built into dom0's kernel?  Then the
    guest has it without insmod (``modules.builtin``: e.g. virtio_ring on 6.12, a module on 6.1)."""
    listing = Path("/lib/modules") / kernel_release() / "modules.builtin"
    return f"kernel/{relpath}.ko" in listing.read_text().split() if listing.is_file() else False


def kernel_module(relpath: str) -> bytes:
    """A module of dom0's (= the guest's) kernel, uncompressed for busybox's insmod."""
    base = Path("/lib/modules") / kernel_release() / "kernel" / relpath
    for suffix, opener in ((".ko", None), (".ko.xz", lzma.decompress)):
        path = base.with_name(base.name + suffix)
        if path.is_file():
            data = path.read_bytes()
            return opener(data) if opener else data
    raise FileNotFoundError(f"no module {base}.ko[.xz] for kernel {kernel_release()}")


def build_guestio(workdir: Path) -> bytes:
    out = workdir / "guestio"
    subprocess.run(["gcc", "-static", "-Os", "-s", "-Wall", "-o", str(out), str(HVM_SRC / "guestio.c")], check=True)
    return out.read_bytes()


def build_edu_module(workdir: Path) -> bytes:
    """xendmop_edu.ko against dom0's kernel headers (kbuild, out of tree)."""
    src = workdir / "edu"
    src.mkdir()
    shutil.copy(HVM_SRC / "edu.c", src / "edu.c")
    shutil.copy(HVM_SRC / "Kbuild", src / "Kbuild")
    build = Path("/lib/modules") / kernel_release() / "build"
    done = subprocess.run(
        ["make", "-s", "-C", str(build), f"M={src}", "modules"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"building edu.ko failed:\n{done.stdout}\n{done.stderr}")
    return (src / "edu.ko").read_bytes()


def build_initramfs(workdir: Path, modules: Sequence[str] = (), *, x86_tools: bool = True) -> Path:
    """The guest's initramfs (about 1.5 MB gzip'd); built once per test session.  ``modules``:
    more of the kernel's modules, as paths under ``kernel/`` without the suffix (e.g.
    ``drivers/virtio/virtio``), each put in ``/mods/`` under its own name for ``insmod``
    unless the kernel has it built in (``builtin_module``).  ``x86_tools=False`` (an Arm
    guest): busybox, ``/init`` and ``modules`` only, without ``guestio`` (port IO), ``uio``
    and the edu driver."""
    d, x = 0o040755, 0o100755
    files: dict[str, tuple[int, bytes]] = {p: (d, b"") for p in ("bin", "dev", "proc", "sys", "tmp", "lib", "mods")}
    files["init"] = (x, (HVM_SRC / "init").read_bytes())
    files["bin/busybox"] = (x, Path("/bin/busybox").read_bytes())
    if x86_tools:
        files["bin/guestio"] = (x, build_guestio(workdir))
        files["mods/uio.ko"] = (0o100644, kernel_module("drivers/uio/uio"))
        files["mods/uio_pci_generic.ko"] = (0o100644, kernel_module("drivers/uio/uio_pci_generic"))
        files["mods/xendmop_edu.ko"] = (0o100644, build_edu_module(workdir))
    for relpath in modules:
        if not builtin_module(relpath):
            files[f"mods/{Path(relpath).name}.ko"] = (0o100644, kernel_module(relpath))
    image = workdir / "initramfs.gz"
    image.write_bytes(pack_cpio(files, {"dev/console": (5, 1)}))
    return image


# --- the guest ----------------------------------------------------------------------------------


def hvm_config(
    name: str, ramdisk: Path, extra_cmdline: str = "", serial_pty: bool = False, extra_config: Sequence[str] = ()
) -> str:
    """The xl configuration; ``extra_config``: more lines, as written (e.g. ``device_model_args_hvm``)."""
    kernel = Path("/boot") / f"vmlinuz-{kernel_release()}"
    cmdline = f"{CMDLINE} {extra_cmdline}".strip()
    lines = [
        f'name = "{name}"',
        'type = "hvm"',
        "memory = 128",
        "vcpus = 1",
        f'kernel = "{kernel}"',
        f'ramdisk = "{ramdisk}"',
        f'cmdline = "{cmdline}"',
        'vga = "none"',
        "nographic = 1",
        "vnc = 0",
        "sdl = 0",
        "xen_platform_pci = 1",
        'on_poweroff = "destroy"',
        # A guest that reboots (panic=-1) is gone, not restarted by xl under a new domid that
        # no fixture knows: a restarted guest outlived its test and loaded the next ones.
        'on_reboot = "destroy"',
        'on_crash = "preserve"',
    ]
    # No serial= line: QEMU gets no -serial and COM1 is ours.  The peer run asks QEMU for its own.
    if serial_pty:
        lines.append('serial = "pty"')
    lines.extend(extra_config)
    return "\n".join(lines) + "\n"


@dataclass
class HvmGuest:
    """A Linux HVM guest created paused: start the device models, then ``unpause``."""

    name: str
    domid: int
    workdir: Path

    def unpause(self) -> None:
        xenlab.xl("unpause", self.name)

    def exists(self) -> bool:
        return subprocess.run(["xl", "domid", self.name], capture_output=True, check=False).returncode == 0

    def wait_gone(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while self.exists():
            if time.monotonic() > end:
                return False
            time.sleep(0.2)
        return True

    def destroy(self) -> None:
        if self.exists():
            xenlab.xl("destroy", self.name, check=False)

    def qemu_pid(self) -> int:
        """The device-model QEMU libxl started for this guest (``-xen-domid N`` on its command line)."""
        import psutil

        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            if "-xen-domid" in cmd and cmd[cmd.index("-xen-domid") + 1 : cmd.index("-xen-domid") + 2] == [
                str(self.domid)
            ]:
                return int(proc.pid)
        raise AssertionError(f"no QEMU for dom{self.domid}")

    def qemu_pty(self) -> str:
        """The pty QEMU gave the guest's COM1 (``serial="pty"``), from Xenstore."""
        return xenstore_wait(f"/local/domain/{self.domid}/serial/0/tty", "QEMU")


def xenstore_wait(path: str, who: str, tries: int = 100) -> str:
    """The value at Xenstore ``path`` once ``who`` (QEMU, xenconsoled) has written it."""
    for _ in range(tries):
        done = subprocess.run(["xenstore-read", path], capture_output=True, text=True, check=False)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
        time.sleep(0.1)
    raise RuntimeError(f"{who} published nothing at {path}")


# --- a dom0 network namespace for a guest's NIC -----------------------------------------------------


def netns_create(name: str) -> str:
    """A fresh network namespace ``name`` (an old one of that name is removed first)."""
    from pyroute2 import netns  # type: ignore[import-untyped]

    if name in netns.listnetns():
        netns.remove(name)
    netns.create(name)
    return name


def netns_remove(name: str) -> None:
    from pyroute2 import netns

    if name in netns.listnetns():
        netns.remove(name)


_serial = 0

#: (test module, domid) of every guest ``create`` made in this process: which module's guest a
#: triple fault in Xen's log belongs to (``crashed_guests``).
created: list[tuple[str, int]] = []


def _current_module() -> str:
    # pytest sets PYTEST_CURRENT_TEST ("path::test (phase)") while a test or fixture runs.
    return os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[0]


def triple_faults(domids: Sequence[int]) -> list[str]:
    """Xen's own lines saying one of ``domids`` triple-faulted (hvm_triple_fault in
    xen/arch/x86/hvm/hvm.c logs "dNvM Triple fault"), from ``xl dmesg``."""
    if not domids:
        return []
    log = subprocess.run(["xl", "dmesg"], capture_output=True, text=True, check=False).stdout
    wanted = re.compile(r"\bd(" + "|".join(str(d) for d in domids) + r")v\d+ Triple fault")
    return [line.strip() for line in log.splitlines() if wanted.search(line)]


def crashed_guests(module: str) -> list[str]:
    """Xen's triple-fault lines for the guests that ``module`` (a test file) created."""
    return triple_faults([domid for mod, domid in created if mod == module])


def create(
    initramfs: Path, extra_cmdline: str = "", serial_pty: bool = False, extra_config: Sequence[str] = ()
) -> HvmGuest:
    global _serial
    _serial += 1
    name = f"xendmop-hvm{os.getpid()}-{_serial}"
    workdir = Path(tempfile.mkdtemp(prefix=name + "-"))
    cfg = workdir / "guest.cfg"
    cfg.write_text(hvm_config(name, initramfs, extra_cmdline, serial_pty, extra_config))
    xenlab.xl("create", "-p", str(cfg))
    guest = HvmGuest(name, int(xenlab.xl("domid", name).strip()), workdir)
    created.append((_current_module(), guest.domid))
    return guest


# --- the console ----------------------------------------------------------------------------------


class GuestCommandError(AssertionError):
    pass


class Console:
    """The guest's ttyS0, seen from dom0: ``write`` sends bytes to the guest, a thread
    collects everything it sends back (``text``), ``wait_for`` and ``run`` look in it."""

    def __init__(self, write: Callable[[bytes], None], read: Callable[[], bytes], name: str = "console") -> None:
        self._write = write
        self._read = read
        self.data = bytearray()
        self.arrivals: list[tuple[float, int]] = []  # (time, len(data) after it): for throughput
        self.closed = False
        self.error: OSError | None = None
        self._cond = threading.Condition()
        self._seq = 0
        self._thread = threading.Thread(target=self._pump, name=name, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while True:
            try:
                chunk = self._read()
            except OSError as e:  # kept: a closed console says why
                self.error = e
                chunk = b""
            with self._cond:
                if not chunk:
                    self.closed = True
                    self._cond.notify_all()
                    return
                self.data += chunk
                self.arrivals.append((time.monotonic(), len(self.data)))
                self._cond.notify_all()

    @property
    def text(self) -> str:
        with self._cond:
            return self.data.decode(errors="replace")

    def wait_for(self, pattern: re.Pattern[bytes], timeout: float, start: int = 0) -> re.Match[bytes]:
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                m = pattern.search(self.data, start)
                if m:
                    return m
                left = end - time.monotonic()
                if left <= 0 or self.closed:
                    tail = self.data[-2000:].decode(errors="replace")
                    why = f"closed ({self.error or 'end of file'})" if self.closed else f"not seen in {timeout:.0f} s"
                    raise TimeoutError(f"{pattern.pattern!r} {why}; the console's last bytes:\n{tail}")
                self._cond.wait(left)

    def send(self, data: bytes) -> None:
        self._write(data)

    def run(self, command: str, timeout: float = 120, check: bool = True) -> str:
        """Run ``command`` in the guest's shell; its output (stdout and stderr), once it ended.
        With ``check``, a nonzero status fails naming the command and its output."""
        if self._seq == 0:
            # The first command first waits for a marker of its own, so that what the shell
            # printed on starting (busybox's banner) is not taken for any command's output,
            # whichever test comes first (a test run again alone on a new boot, too).
            self._seq += 1
            with self._cond:
                start = len(self.data)
            self.send(b"printf '\\n@@%s@@\\n' settled\n")
            self.wait_for(re.compile(rb"\n@@settled@@"), timeout, start)
        self._seq += 1
        tag = f"@@{self._seq}:"
        with self._cond:
            start = len(self.data)
        # The status marker is built by the shell (`printf` of two halves), so the command
        # line's own bytes (were they echoed) could never match it.
        self.send(f"{command}; printf '\\n@@%s:%d@@\\n' {self._seq} $?\n".encode())
        m = self.wait_for(re.compile(rb"\n" + re.escape(tag.encode()) + rb"(\d+)@@"), timeout, start)
        # The tty adds no \r (init's stty -onlcr), but printk's console lines carry their own.
        out = self.data[start : m.start()].decode(errors="replace").replace("\r", "").strip("\n")
        status = int(m.group(1))
        if check and status != 0:
            raise GuestCommandError(f"guest: `{command}` exited {status}:\n{out}")
        return out


class Example:
    """An example device model running as a process; a thread collects its stderr lines."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        self.name = name
        self.proc = proc
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._pump = threading.Thread(target=self._pump_stderr, name=f"{name}-stderr", daemon=True)
        self._pump.start()

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\r\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, pattern: str, timeout: float = 60) -> str:
        """The first stderr line matching ``pattern``; fails if the process ends without one."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                hit = next((ln for ln in self.lines if rx.search(ln)), None)
                if hit is not None:
                    return hit
                if not self._pump.is_alive():  # stderr closed: the process is gone
                    raise AssertionError(f"{self.name} ended ({self.proc.poll()}) without {pattern!r}: {self.lines}")
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name}: no line like {pattern!r} in {timeout} s: {self.lines}")
                self._cond.wait(min(left, 0.5))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send ``sig`` (if it still runs) and return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} did not stop in {timeout} s after signal {sig}: {self.lines}") from None


def start_example(
    script: str,
    args: Sequence[str],
    *,
    pipes: bool = False,
    env: dict[str, str] | None = None,
    python_args: Sequence[str] = (),
) -> Example:
    """``examples/<script>`` as a process (stdin/stdout pipes with ``pipes``, else /dev/null);
    ``python_args`` go to the interpreter first (e.g. ``-m cProfile -o FILE``)."""
    cmd = [sys.executable, *python_args, str(EXAMPLES / script), *args]
    stdio = subprocess.PIPE if pipes else subprocess.DEVNULL
    proc = subprocess.Popen(
        cmd, stdin=stdio, stdout=stdio, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}, bufsize=0
    )
    return Example(script.removesuffix(".py"), proc)


def uart_console(example: Example) -> Console:
    """The console carried by examples/uart16550.py's stdin/stdout (it runs without a tty)."""
    assert example.proc.stdin is not None and example.proc.stdout is not None
    stdin, stdout = example.proc.stdin, example.proc.stdout

    def write(data: bytes) -> None:
        stdin.write(data)
        stdin.flush()

    return Console(write, lambda: os.read(stdout.fileno(), 65536), name="uart-console")


def pty_console(path: str) -> tuple[Console, Callable[[], None]]:
    """A console on QEMU's pty for the guest's COM1 (raw, so bytes pass unchanged)."""
    import termios
    import tty

    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, attrs)

    def write(data: bytes) -> None:
        while data:
            data = data[os.write(fd, data) :]

    return Console(write, lambda: os.read(fd, 65536), name="pty-console"), lambda: os.close(fd)


def empty_chroot() -> Path:
    """An empty root-owned directory for ``--chroot`` (what depriv requires)."""
    path = Path(tempfile.mkdtemp(prefix="xendmop-chroot-"))
    path.chmod(0o755)
    return path


# --- measuring the UART against its peer ------------------------------------------------------------

TX_BYTES, PORT_READS = 4000, 2000


def measure_uart(console: Console, dm_pid: int) -> dict[str, float]:
    """The guest's interrupt-driven TX through ttyS0, in bytes/s as they arrive in dom0 (first
    to last byte), and its port reads of LSR (0x3fd) per second; with the CPU time the device
    model process ``dm_pid`` (ours, or QEMU) spent meanwhile, to tell its share of the time
    from Xen's, TCG's and the guest's."""
    import psutil

    dm = psutil.Process(dm_pid)

    def cpu() -> float:
        times = dm.cpu_times()
        return float(times.user + times.system)

    with console._cond:
        start = len(console.data)
    c0, t0 = cpu(), time.monotonic()
    console.run(f"guestio txbench {TX_BYTES}", timeout=900)
    tx_wall, tx_cpu = time.monotonic() - t0, cpu() - c0
    arrivals = [t for t, size in console.arrivals if size > start]
    tx = TX_BYTES / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0
    c0, t0 = cpu(), time.monotonic()
    reads, ns = (int(x) for x in console.run(f"guestio inbench 0x3fd {PORT_READS}", timeout=900).split())
    rd_wall, rd_cpu = time.monotonic() - t0, cpu() - c0
    return {
        "tx_bytes": TX_BYTES,
        "tx_bytes_per_s": round(tx, 1),
        "tx_dm_cpu_share": round(tx_cpu / tx_wall, 3),
        "port_reads": PORT_READS,
        "port_reads_per_s": round(reads / (ns / 1e9), 1),
        "port_read_us": round(ns / reads / 1000, 1),
        "port_read_dm_cpu_us": round(rd_cpu / reads * 1e6, 1),
        "port_dm_cpu_share": round(rd_cpu / rd_wall, 3),
    }


def record_timing(key: str, values: Mapping[str, Any]) -> None:
    """Add ``key`` to the lab's ``out/timing.json`` (or print it outside the lab)."""
    import json

    out = os.environ.get("XENDMOP_LAB_RESULTS")
    if not out:
        print(key, values)
        return
    path = Path(out) / "timing.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = values
    path.write_text(json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def stopped_on_exit(*examples: Example) -> Iterator[None]:
    try:
        yield
    finally:
        for ex in examples:
            if ex.proc.poll() is None:
                ex.stop(signal.SIGKILL, timeout=10)
