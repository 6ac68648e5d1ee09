"""Helpers for xendmop's live tests in a Xen dom0: raw privcmd DM_OP, libxendevicemodel
through ctypes (the reference the library is compared with), and tiny PVH guests whose IO
the tests script in Python (integration/lab/guest/interp.s runs the script).

Kept free of xendmop imports: these are the independent witnesses.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRIVCMD = "/dev/xen/privcmd"
GUEST_SRC = Path(__file__).resolve().parent / "lab" / "guest"

# From Linux include/uapi/xen/privcmd.h, _IOC(_IOC_NONE, 'P', 5, sizeof(struct privcmd_dm_op)).
IOCTL_PRIVCMD_DM_OP = 0x00105005
DOMID_INVALID = 0x7FF4
XEN_DMOP_NR_VCPUS = 20
XEN_DMOP_OP_COUNT = 21  # ops 0..20 exist in Xen 4.17; 21 is unknown
DM_OP_SIZE = 32  # struct xen_dm_op: op, pad, 24-byte union


def have_xen() -> bool:
    return os.path.exists(PRIVCMD)


#: this dom0's CPU architecture, by the kernel's name (x86_64 or aarch64)
MACHINE = platform.machine()
X86 = MACHINE == "x86_64"


def x86_only_reason(what: str) -> str:
    return f"x86 only ({what}); this dom0 is {MACHINE}"


def skip_reason() -> str:
    return f"no {PRIVCMD}: not a Xen dom0 (run through integration/lab/run.py)"


# --- raw privcmd ---------------------------------------------------------------------------


class _DmOpBuf(ctypes.Structure):  # struct privcmd_dm_op_buf
    _fields_ = [("uptr", ctypes.c_void_p), ("size", ctypes.c_size_t)]


class _DmOp(ctypes.Structure):  # struct privcmd_dm_op
    _fields_ = [("dom", ctypes.c_uint16), ("num", ctypes.c_uint16), ("ubufs", ctypes.POINTER(_DmOpBuf))]


assert ctypes.sizeof(_DmOpBuf) == 16 and ctypes.sizeof(_DmOp) == 16

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def raw_dm_op(fd: int, domid: int, bufs: list[ctypes.Array[ctypes.c_char]]) -> None:
    """IOCTL_PRIVCMD_DM_OP with the given buffers; raises OSError with the errno."""
    arr = (_DmOpBuf * max(1, len(bufs)))(*[_DmOpBuf(ctypes.addressof(b), len(b)) for b in bufs])
    op = _DmOp(domid, len(bufs), arr)
    if _libc.ioctl(fd, IOCTL_PRIVCMD_DM_OP, ctypes.byref(op)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def raw_op_buffer(op: int, pad: int = 0) -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(DM_OP_SIZE)
    ctypes.memmove(buf, (op).to_bytes(4, "little") + pad.to_bytes(4, "little"), 8)
    return buf


def raw_nr_vcpus(fd: int, domid: int) -> int:
    buf = raw_op_buffer(XEN_DMOP_NR_VCPUS)
    raw_dm_op(fd, domid, [buf])
    return int.from_bytes(buf.raw[8:12], "little")


# --- libxendevicemodel through ctypes ---------------------------------------------------------


class LibXDM:
    """libxendevicemodel with the same method names and argument order as xendmop.DeviceModel,
    raising OSError(errno) as the C library reports it."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("xendevicemodel") or "libxendevicemodel.so.1"
        self.lib = ctypes.CDLL(name, use_errno=True)
        self.lib.xendevicemodel_open.restype = ctypes.c_void_p
        self.lib.xendevicemodel_open.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        self.lib.xendevicemodel_close.argtypes = [ctypes.c_void_p]
        self.h = self.lib.xendevicemodel_open(None, 0)
        if not self.h:
            raise OSError(ctypes.get_errno(), "xendevicemodel_open failed")

    def close(self) -> None:
        if self.h:
            self.lib.xendevicemodel_close(self.h)
            self.h = None

    def __enter__(self) -> LibXDM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: str, types: list[type], *args: object) -> None:
        f = getattr(self.lib, "xendevicemodel_" + fn)
        f.argtypes = [ctypes.c_void_p, ctypes.c_uint16, *types]
        f.restype = ctypes.c_int
        if f(self.h, *args) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"xendevicemodel_{fn}: {os.strerror(err)}")

    U8, U16, U32, U64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint, ctypes.c_uint64
    INT, PTR = ctypes.c_int, ctypes.c_void_p

    def nr_vcpus(self, domid: int) -> int:
        n = ctypes.c_uint()
        self._call("nr_vcpus", [self.PTR], domid, ctypes.byref(n))
        return n.value

    def create_ioreq_server(self, domid: int, handle_bufioreq: int = 0) -> int:
        sid = ctypes.c_uint16()
        self._call("create_ioreq_server", [self.INT, self.PTR], domid, int(handle_bufioreq), ctypes.byref(sid))
        return sid.value

    def get_ioreq_server_info(self, domid: int, id: int) -> int:
        """Without gfns (NULL gfn pointers), as on PVH; returns bufioreq_port."""
        port = ctypes.c_uint32()
        self._call("get_ioreq_server_info", [self.U16, self.PTR, self.PTR, self.PTR], domid, id, None, None,
                   ctypes.byref(port))  # fmt: skip
        return port.value

    def map_io_range_to_ioreq_server(self, domid: int, id: int, is_mmio: bool, start: int, end: int) -> None:
        self._call("map_io_range_to_ioreq_server", [self.U16, self.INT, self.U64, self.U64],
                   domid, id, int(is_mmio), start, end)  # fmt: skip

    def unmap_io_range_from_ioreq_server(self, domid: int, id: int, is_mmio: bool, start: int, end: int) -> None:
        self._call("unmap_io_range_from_ioreq_server", [self.U16, self.INT, self.U64, self.U64],
                   domid, id, int(is_mmio), start, end)  # fmt: skip

    def map_pcidev_to_ioreq_server(
        self, domid: int, id: int, segment: int, bus: int, device: int, function: int
    ) -> None:
        self._call("map_pcidev_to_ioreq_server", [self.U16, self.U16, self.U8, self.U8, self.U8],
                   domid, id, segment, bus, device, function)  # fmt: skip

    def unmap_pcidev_from_ioreq_server(
        self, domid: int, id: int, segment: int, bus: int, device: int, function: int
    ) -> None:
        self._call("unmap_pcidev_from_ioreq_server", [self.U16, self.U16, self.U8, self.U8, self.U8],
                   domid, id, segment, bus, device, function)  # fmt: skip

    def set_ioreq_server_state(self, domid: int, id: int, enabled: bool) -> None:
        self._call("set_ioreq_server_state", [self.U16, self.INT], domid, id, int(enabled))

    def destroy_ioreq_server(self, domid: int, id: int) -> None:
        self._call("destroy_ioreq_server", [self.U16], domid, id)

    def set_pci_intx_level(self, domid: int, segment: int, bus: int, device: int, intx: int, level: int) -> None:
        self._call("set_pci_intx_level", [self.U16, self.U8, self.U8, self.U8, self.U32],
                   domid, segment, bus, device, intx, level)  # fmt: skip

    def set_isa_irq_level(self, domid: int, irq: int, level: int) -> None:
        self._call("set_isa_irq_level", [self.U8, self.U32], domid, irq, level)

    def set_irq_level(self, domid: int, irq: int, level: int) -> None:
        self._call("set_irq_level", [self.U32, self.U32], domid, irq, level)

    def set_pci_link_route(self, domid: int, link: int, irq: int) -> None:
        self._call("set_pci_link_route", [self.U8, self.U8], domid, link, irq)

    def inject_msi(self, domid: int, msi_addr: int, msi_data: int) -> None:
        self._call("inject_msi", [self.U64, self.U32], domid, msi_addr, msi_data)

    def shutdown(self, domid: int, reason: int) -> None:
        self._call("shutdown", [self.U32], domid, reason)

    def restrict(self, domid: int) -> None:
        self._call("restrict", [], domid)


# --- tiny PVH guests ----------------------------------------------------------------------------

OP_END, OP_OUT, OP_IN, OP_MMIO_WRITE, OP_MMIO_READ, OP_OUTS, OP_INS, OP_PRINT, OP_LOOP = range(9)
CHECK = 1


@dataclass
class Script:
    """The IO a guest performs, in order; assembled into the guest by `build_guest`."""

    records: list[tuple[int, int, int, int, str]] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)

    def _blob(self, data: bytes) -> str:
        self.blobs.append(data)
        return f"blob{len(self.blobs) - 1}"

    def _add(self, op: int, width: int, addr: int, value: int, aux: str | int = 0) -> int:
        if width not in (0, 1, 2, 4):
            raise ValueError(f"width {width}: the 32-bit guest does 1, 2 or 4 bytes")
        self.records.append((op, width, addr & 0xFFFFFFFF, value & 0xFFFFFFFF, str(aux)))
        return len(self.records) - 1

    def out(self, port: int, width: int, value: int) -> int:
        return self._add(OP_OUT, width, port, value)

    def inp(self, port: int, width: int, expect: int | None = None) -> int:
        """Read a port; with `expect`, the guest checks the value (a BAD line otherwise)."""
        return self._add(OP_IN, width, port, expect or 0, CHECK if expect is not None else 0)

    def mmio_write(self, addr: int, width: int, value: int) -> int:
        return self._add(OP_MMIO_WRITE, width, addr, value)

    def mmio_read(self, addr: int, width: int, expect: int | None = None) -> int:
        return self._add(OP_MMIO_READ, width, addr, expect or 0, CHECK if expect is not None else 0)

    def outs(self, port: int, width: int, data: bytes) -> int:
        """rep outs{b,w,l} of `data` (a whole number of elements)."""
        return self._add(OP_OUTS, width, port, len(data) // width, self._blob(data))

    def ins(self, port: int, width: int, count: int, expect: bytes | None = None) -> int:
        return self._add(OP_INS, width, port, count, self._blob(expect) if expect is not None else 0)

    def loop(self, first: int, times: int) -> int:
        """Run records ``first`` up to this one ``times`` times in all (loops do not nest)."""
        if not 0 <= first < len(self.records) or times < 1:
            raise ValueError(f"loop back to record {first} {times} times: needs 0 <= first < {len(self.records)}"
                             " and times >= 1")  # fmt: skip
        return self._add(OP_LOOP, 0, first, times)

    def print(self, text: str) -> int:
        return self._add(OP_PRINT, 0, 0, 0, self._blob(text.encode() + b"\0"))

    @staticmethod
    def _cf8(bus: int, device: int, function: int, reg: int) -> int:
        return 0x80000000 | bus << 16 | device << 11 | function << 8 | (reg & 0xFC)

    def pci_read(self, bus: int, device: int, function: int, reg: int, width: int, expect: int | None = None) -> int:
        """Config read through 0xcf8/0xcfc (mechanism #1); returns the read's record index."""
        self.out(0xCF8, 4, self._cf8(bus, device, function, reg))
        return self.inp(0xCFC + (reg & 3), width, expect)

    def pci_write(self, bus: int, device: int, function: int, reg: int, width: int, value: int) -> int:
        self.out(0xCF8, 4, self._cf8(bus, device, function, reg))
        return self.out(0xCFC + (reg & 3), width, value)

    def assembly(self) -> str:
        lines = ["        .data", "        .balign 4", "script:"]
        lines += [f"        .long {op}, {w}, {a:#x}, {v:#x}, {aux}" for op, w, a, v, aux in self.records]
        lines.append(f"        .long {OP_END}, 0, 0, 0, 0")
        for i, data in enumerate(self.blobs):
            lines += ["        .balign 4", f"blob{i}:"]
            lines += [f"        .byte {', '.join(str(b) for b in data[j:j + 16])}" for j in range(0, len(data), 16)]
        return "\n".join(lines) + "\n"


#: the Arm64 guest's results, echoed by it with MMIO writes (integration/lab/guest/arm64/interp.s):
#: REPORT holds the failure count at the end, REPORT + 4 + 4*i the value record i read.  In the
#: guest's virtio-mmio window (GUEST_VIRTIO_MMIO_BASE, Xen's public/arch-arm.h), free in a guest
#: with no virtio devices, beside the device page the tests serve (scenarios.ARM_MMIO).
ARM_REPORT = 0x02010000
ARM_REPORT_SIZE = 0x1000


def build_arm64_guest(script: Script, workdir: Path, report: int = ARM_REPORT) -> Path:
    """Assemble and link the Arm64 interpreter with `script`; returns the flat arm64 Image."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "script.s").write_text(f"        .equ REPORT, {report:#x}\n" + script.assembly())
    src = GUEST_SRC / "arm64"
    obj, elf, image = workdir / "guest.o", workdir / "guest.elf", workdir / "guest.img"
    subprocess.run(["as", "-I", str(workdir), "-o", str(obj), str(src / "interp.s")], check=True)
    subprocess.run(["ld", "-T", str(src / "guest.ld"), "--no-warn-rwx-segments", "--build-id=none",
                    "-o", str(elf), str(obj)], check=True)  # fmt: skip
    subprocess.run(["objcopy", "-O", "binary", str(elf), str(image)], check=True)
    return image


def build_guest(script: Script, workdir: Path) -> Path:
    """Assemble and link the interpreter with `script`; returns the ELF kernel's path."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "script.s").write_text(script.assembly())
    obj, elf = workdir / "guest.o", workdir / "guest.elf"
    subprocess.run(["as", "--32", "-I", str(workdir), "-o", str(obj), str(GUEST_SRC / "interp.s")], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-T", str(GUEST_SRC / "guest.ld"), "-z", "noexecstack",
                    "--no-warn-rwx-segments", "--build-id=none", "-o", str(elf), str(obj)], check=True)  # fmt: skip
    return elf


def xl_config(
    name: str, kernel: Path, memory_mb: int = 16, vcpus: int = 1, on_poweroff: str = "destroy", type: str | None = "pvh"
) -> str:
    # on_crash=preserve: a guest that faults stays listed (state 'c') for the test to see.
    # on_poweroff=preserve keeps a finished guest's domain (shut down, not dying) for DMOPs after it.
    # type=None: an Arm guest, which has one kind only (no type line).
    kind = f'type = "{type}"\n' if type else ""
    return (
        f'name = "{name}"\n{kind}kernel = "{kernel}"\nmemory = {memory_mb}\n'
        f'vcpus = {vcpus}\non_poweroff = "{on_poweroff}"\non_crash = "preserve"\n'
    )


#: the Arm guest's emulated SBSA UART (Xen's vpl011) takes SPI 32 (GUEST_VPL011_SPI), so libxl
#: gives the guest SPIs (tools/libs/light/libxl_arm.c, libxl__arch_domain_prepare_config), which
#: Xen rounds up to a rank of 32 (xen/arch/arm/vgic.c, domain_vgic_init): SPIs 32..63, 32 taken
#: (scenarios.ARM_NR_IRQS and the ARM scenario's steps).
ARM_VUART = 'vuart = "sbsa_uart"\n'


def xl(*args: str, check: bool = True) -> str:
    done = subprocess.run(["xl", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"xl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@dataclass
class Guest:
    """A tiny PVH guest created paused (`xl create -p`): set up the device model, then unpause."""

    name: str
    domid: int
    vcpus: int
    workdir: Path

    def unpause(self) -> None:
        xl("unpause", self.name)

    def exists(self) -> bool:
        return subprocess.run(["xl", "domid", self.name], capture_output=True, check=False).returncode == 0

    def output(self) -> list[str]:
        """This guest's lines on port 0xe9, from the hypervisor's console ring."""
        pat = re.compile(rf"\(d{self.domid}\) ?(.*)$")
        return [m.group(1).rstrip() for ln in xl("dmesg").splitlines() if (m := pat.search(ln))]

    def wait_done(self, timeout: float = 60, poll: float = 0.1) -> list[str]:
        """Wait for the guest's final line (reading `xl dmesg` every ``poll`` s); returns all its lines."""
        end = time.monotonic() + timeout
        while True:
            lines = self.output()
            if any(ln.startswith("xendmop-guest done") for ln in lines):
                return lines
            if time.monotonic() > end:
                raise TimeoutError(f"guest {self.name} did not finish in {timeout} s; output so far: {lines}")
            time.sleep(poll)

    def destroy(self) -> None:
        if self.exists():
            xl("destroy", self.name, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


_serial = 0


def _new_name() -> tuple[str, Path]:
    global _serial
    _serial += 1
    name = f"xendmop-t{os.getpid()}-{_serial}"
    return name, Path(tempfile.mkdtemp(prefix=name + "-"))


def create_guest(
    script: Script | None = None, vcpus: int = 1, memory_mb: int = 16, on_poweroff: str = "destroy"
) -> Guest:
    """A paused tiny guest of this dom0's architecture running `script`: x86 PVH (interp.s), or
    on Arm the Arm64 guest (arm64/interp.s: MMIO records only) with an SBSA UART for its SPIs."""
    name, workdir = _new_name()
    cfg = workdir / "guest.cfg"
    if X86:
        kernel = build_guest(script or Script(), workdir)
        cfg.write_text(xl_config(name, kernel, memory_mb, vcpus, on_poweroff))
    else:
        kernel = build_arm64_guest(script or Script(), workdir)
        cfg.write_text(xl_config(name, kernel, memory_mb, vcpus, on_poweroff, type=None) + ARM_VUART)
    try:
        xl("create", "-p", str(cfg))
    except RuntimeError:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    domid = int(xl("domid", name).strip())
    return Guest(name, domid, vcpus, workdir)


def create_pv_guest(memory_mb: int = 16) -> Guest:
    """A paused 64-bit PV domain (guest/pv.s, never unpaused): a target DMOPs must refuse."""
    name, workdir = _new_name()
    obj, elf = workdir / "pv.o", workdir / "pv.elf"
    subprocess.run(["as", "--64", "-o", str(obj), str(GUEST_SRC / "pv.s")], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-T", str(GUEST_SRC / "pv.ld"), "-z", "noexecstack",
                    "--build-id=none", "-o", str(elf), str(obj)], check=True)  # fmt: skip
    cfg = workdir / "guest.cfg"
    cfg.write_text(xl_config(name, elf, memory_mb, 1, type="pv"))
    try:
        xl("create", "-p", str(cfg))
    except RuntimeError:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return Guest(name, int(xl("domid", name).strip()), 1, workdir)


class RegisterFile:
    """A device for the tests' ioreq servers: bytes that read back what was written; records every
    access (("r" or "w", offset, size))."""

    def __init__(self, size: int) -> None:
        self.mem = bytearray(size)
        self.seen: list[tuple[str, int, int]] = []

    def read(self, addr: int, size: int) -> int:
        self.seen.append(("r", addr, size))
        return int.from_bytes(self.mem[addr : addr + size], "little")

    def write(self, addr: int, size: int, value: int) -> None:
        self.seen.append(("w", addr, size))
        self.mem[addr : addr + size] = value.to_bytes(8, "little")[:size]


@dataclass(frozen=True)
class Read:
    """One parsed 'r'/'s' line: record index, value, and the guest's own check (None = unchecked)."""

    index: int
    value: int
    ok: bool | None


def parse_reads(lines: list[str]) -> dict[int, Read]:
    reads = {}
    for ln in lines:
        words = ln.split()
        if len(words) >= 3 and words[0] in ("r", "s"):
            ok = None if len(words) == 3 else words[3] == "ok"
            reads[int(words[1], 16)] = Read(int(words[1], 16), int(words[2], 16), ok)
    return reads


def guest_failures(lines: list[str]) -> int:
    for ln in lines:
        if ln.startswith("xendmop-guest done"):
            return int(ln.split()[-1], 16)
    raise ValueError("guest did not finish")


@contextlib.contextmanager
def running_in_thread(loop: Any) -> Iterator[None]:
    """Run ``loop.run(handle_signals=False)`` (xendmop's ServeLoop, say) in a thread for
    the block; then ``loop.stop()`` and re-raise whatever the loop raised.  A loop that ends
    because its guest finished and was destroyed (xendmop's ``DomainGone``: the tiny guests
    power off at the end of their script) ended normally."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            loop.run(handle_signals=False)
        except BaseException as e:
            if type(e).__name__ == "DomainGone":  # by name: this module imports nothing of xendmop
                return
            traceback.print_exc()  # seen at once, even if the test then fails on something else
            failure.append(e)

    thread = threading.Thread(target=run, name="serve-loop", daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.stop()
        thread.join(30)
    if thread.is_alive():
        raise TimeoutError("the serve loop did not stop within 30 s")
    if failure:
        raise failure[0]


def all_guests() -> Iterator[str]:
    for ln in xl("list").splitlines()[1:]:
        yield ln.split()[0]


# --- a minimal synchronous ioreq server (libxenforeignmemory + libxenevtchn via ctypes) -----------

XENMEM_resource_ioreq_server = 0
IOREQ_FRAME = 1  # XENMEM_resource_ioreq_server_frame_ioreq(0): the synchronous ioreq page
STATE_IOREQ_READY, STATE_IOREQ_INPROCESS, STATE_IORESP_READY = 1, 2, 3
IOREQ_TYPE_PIO, IOREQ_TYPE_COPY, IOREQ_TYPE_PCI_CONFIG = 0, 1, 2
IOREQ_SIZE = 32  # struct ioreq; vCPU n's slot is at n * 32 in the page


def _lib(name: str) -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library(name) or f"lib{name}.so.1", use_errno=True)


class IoreqServer:
    """Serves one guest's IO requests with Python handlers: enough to prove the lab and the
    guest end to end.  `dm` is anything with DeviceModel's method names (xendmop or LibXDM).
    Requests with data_is_ptr (string IO to the device) are not handled here."""

    def __init__(self, dm: Any, domid: int, handler: Callable[[int, int, int, int, int | None], int]) -> None:
        self.dm, self.domid, self.handler, self.served = dm, domid, handler, 0
        self.fmem_lib, self.evt_lib = _lib("xenforeignmemory"), _lib("xenevtchn")
        for f in ("xenforeignmemory_open", "xenevtchn_open"):
            getattr(self.fmem_lib if "foreign" in f else self.evt_lib, f).restype = ctypes.c_void_p
        self.fmem_lib.xenforeignmemory_map_resource.restype = ctypes.c_void_p
        self.fmem_lib.xenforeignmemory_map_resource.argtypes = [
            ctypes.c_void_p, ctypes.c_uint16, ctypes.c_uint, ctypes.c_uint, ctypes.c_ulong, ctypes.c_ulong,
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]  # fmt: skip
        self.fmem_lib.xenforeignmemory_unmap_resource.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.fmem_lib.xenforeignmemory_close.argtypes = [ctypes.c_void_p]
        for f in ("xenevtchn_fd", "xenevtchn_pending", "xenevtchn_close"):
            getattr(self.evt_lib, f).argtypes = [ctypes.c_void_p]
        self.evt_lib.xenevtchn_bind_interdomain.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32]
        for f in ("xenevtchn_unmask", "xenevtchn_notify", "xenevtchn_unbind"):
            getattr(self.evt_lib, f).argtypes = [ctypes.c_void_p, ctypes.c_uint32]

        self.id = dm.create_ioreq_server(domid, 0)
        self.fmem = self.fmem_lib.xenforeignmemory_open(None, 0)
        self.page = ctypes.c_void_p(None)
        # Map the ioreq page BEFORE enabling: Xen writes each vCPU's vp_eport into it at enable
        # time, and only into pages that exist then.
        self.fres = self.fmem_lib.xenforeignmemory_map_resource(
            self.fmem, domid, XENMEM_resource_ioreq_server, self.id, IOREQ_FRAME, 1, ctypes.byref(self.page),
            3, 0)  # fmt: skip  (PROT_READ | PROT_WRITE, no flags)
        if not self.fres:
            raise OSError(ctypes.get_errno(), "xenforeignmemory_map_resource failed")
        self.xce = self.evt_lib.xenevtchn_open(None, 0)
        self.ports: dict[int, int] = {}  # local port -> vCPU

    def enable(self, vcpus: int) -> None:
        self.dm.set_ioreq_server_state(self.domid, self.id, True)
        for v in range(vcpus):
            remote = self._u32(v * IOREQ_SIZE + 24)
            local = self.evt_lib.xenevtchn_bind_interdomain(self.xce, self.domid, remote)
            if local < 0:
                raise OSError(ctypes.get_errno(), f"bind_interdomain to vp_eport {remote}")
            self.ports[local] = v

    def _addr(self, off: int) -> int:
        return int(self.page.value or 0) + off

    def _u32(self, off: int) -> int:
        return ctypes.c_uint32.from_address(self._addr(off)).value

    def serve(self, until: Callable[[], bool], timeout: float) -> None:
        """Handle requests until `until()` holds; the guest blocks on each one meanwhile."""
        import select

        fd = self.evt_lib.xenevtchn_fd(self.xce)
        end = time.monotonic() + timeout
        while not until():
            if time.monotonic() > end:
                raise TimeoutError(f"ioreq server: guest not done after {timeout} s ({self.served} requests)")
            if not select.select([fd], [], [], 0.1)[0]:
                continue
            port = self.evt_lib.xenevtchn_pending(self.xce)
            if port < 0:
                continue
            self.evt_lib.xenevtchn_unmask(self.xce, port)
            if port in self.ports and self._handle(self.ports[port] * IOREQ_SIZE):
                self.evt_lib.xenevtchn_notify(self.xce, port)

    def _handle(self, slot: int) -> bool:
        flags = ctypes.c_uint8.from_address(self._addr(slot + 30))
        if flags.value & 0xF != STATE_IOREQ_READY:
            return False
        flags.value = (flags.value & 0xF0) | STATE_IOREQ_INPROCESS  # READY -> INPROCESS -> RESP_READY only
        addr = ctypes.c_uint64.from_address(self._addr(slot))
        data = ctypes.c_uint64.from_address(self._addr(slot + 8))
        size = self._u32(slot + 20)
        kind = ctypes.c_uint8.from_address(self._addr(slot + 31)).value
        is_read = bool(flags.value & 0x20)
        if flags.value & 0x10:  # data_is_ptr: would need guest memory mapped; answer all ones
            result = ~0
        else:
            result = self.handler(kind, addr.value, size, int(is_read), None if is_read else data.value)
        if is_read:
            data.value = result & ((1 << (8 * size)) - 1) if size < 8 else result & (2**64 - 1)
        self.served += 1
        flags.value = (flags.value & 0xF0) | STATE_IORESP_READY  # x86 keeps stores in order
        return True

    def close(self) -> None:
        for port in self.ports:
            self.evt_lib.xenevtchn_unbind(self.xce, port)
        self.ports.clear()
        if self.xce:
            self.evt_lib.xenevtchn_close(self.xce)
            self.xce = None
        if self.fres:
            self.fmem_lib.xenforeignmemory_unmap_resource(self.fmem, self.fres)
            self.fres = None
        if self.fmem:
            self.fmem_lib.xenforeignmemory_close(self.fmem)
            self.fmem = None
        try:
            self.dm.destroy_ioreq_server(self.domid, self.id)
        except OSError:
            pass  # the guest may be gone already, taking its servers with it
