#!/usr/bin/env python3
"""Boot real Xen + a Debian dom0 under QEMU (TCG) and run ONE command in dom0.

    python3 integration/lab/run.py [--arch amd64|arm64] [--timeout S] [--results DIR] -- COMMAND...

The repository checkout is shared read-only (cwd and PYTHONPATH of the command), a results
folder writable.  The command's stdout/stderr are streamed while it runs.  Exit status:

    N    the command's own exit status (0 = success)
    77   lab unavailable here (no QEMU/mmdebstrap and cannot install, no Debian mirror)
    123  Xen panicked or the dom0 kernel oopsed (even if the command finished)
    124  timed out (QEMU killed)
    125  boot failed: the machine stopped before the command's exit status was recorded,
         dom0's init did not start within --boot-timeout, or the dom0 image did not
         build although the mirror answered

The results folder keeps console.log (Xen + dom0 serial console), stdout, stderr, status,
timings, xl-dmesg.txt, dom0-dmesg.txt and out/ (files the command wrote to
$XENDMOP_LAB_RESULTS); each JSON report there is named, with its summary, at the end.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accel
import image
import xen_source

LAB = Path(__file__).resolve().parent
REPO = LAB.parent.parent

EXIT_UNAVAILABLE = image.EXIT_UNAVAILABLE
EXIT_CRASH = 123
EXIT_TIMEOUT = 124
EXIT_BOOT_FAILED = 125

# Xen's and dom0's command lines after their console arguments, the same on every architecture.
XEN_COMMON_ARGS = (
    "dom0_mem=1024M,max:1024M dom0_max_vcpus=2 "
    # a big console ring so `xl dmesg` still holds every guest line a test looks for
    "loglvl=all guest_loglvl=all conring_size=4M"
)
DOM0_COMMON_ARGS = "init=/sbin/xendmop-lab-init quiet"
XEN_ARGS = f"console=com1 com1=115200,8n1 {XEN_COMMON_ARGS}"
DOM0_ARGS = f"root=/dev/vda rw console=hvc0 earlyprintk=xen {DOM0_COMMON_ARGS}"
# Arm64: Xen's console is the UART the device tree's stdout-path names (QEMU virt's PL011);
# earlyprintk=xen is x86's (Linux arch/x86/kernel/early_printk.c).
XEN_ARGS_ARM64 = f"console=dtuart {XEN_COMMON_ARGS}"
DOM0_ARGS_ARM64 = f"root=/dev/vda rw console=hvc0 {DOM0_COMMON_ARGS}"
# QEMU virt's RAM starts at 1 GiB (hw/arm/virt.c, VIRT_MEM).  Xen is loaded near its start; dom0's
# kernel and initrd are put above it by guest-loader devices (QEMU docs/system/guest-loader.rst),
# which tell Xen where they are in the device tree's /chosen (multiboot,module nodes).  Not below
# RAM + 256 MiB: with no -initrd QEMU puts the device tree at RAM + 128 MiB (hw/arm/boot.c), and a
# 32 MiB dom0 kernel at 0x47000000 reached over it (Xen then hit "Xen BUG at
# common/page_alloc.c:1423" freeing the module's pages).
ARM64_DOM0_KERNEL_ADDR = 0x50000000
ARM64_MODULE_ALIGN = 2 << 20
# Under TCG: QEMU's model of a core with EL2 that Xen/Arm supports (Xen's own test scripts use it).
ARM64_TCG_ARGS = ("-accel", "tcg,thread=multi", "-cpu", "cortex-a57")

# What a crash looks like on the serial console or in dom0's kernel log.
CRASH = re.compile(
    r"Panic on CPU|Hardware Dom0 crashed|Kernel panic|\bOops\b|\bBUG: |general protection fault"
    r"|Unable to handle kernel|FATAL TRAP|Xen BUG at"
)


@dataclass
class Outcome:
    code: int
    message: str
    crash_lines: list[str] = field(default_factory=list)


def _virtfs_path(path: Path) -> str:
    return str(path).replace(",", ",,")  # a literal comma in a QEMU option value


def _shared_devices(art: image.Artifacts, results: Path) -> list[str]:
    """The dom0 disk, the two 9p shares and an entropy source: the same on every architecture."""
    return [
        "-drive", f"file={_virtfs_path(art.image)},format=raw,if=virtio,snapshot=on",
        "-virtfs", f"local,path={_virtfs_path(REPO)},mount_tag=repo,security_model=none,readonly=on",
        "-virtfs", f"local,path={_virtfs_path(results)},mount_tag=results,security_model=none",
        "-device", "virtio-rng-pci",
    ]  # fmt: skip


def _machine_common(results: Path) -> list[str]:
    return [
        "-m", "2048", "-smp", "2",
        "-no-reboot",  # a Xen panic or dom0 crash reboots: end the run instead
        "-nodefaults", "-display", "none", "-monitor", "none",
        "-serial", f"file:{results / 'console.log'}",
    ]  # fmt: skip


def arm64_module_addrs(kernel_size: int) -> tuple[int, int]:
    """Where guest-loader puts dom0's kernel and, after it on the next 2 MiB boundary, its initrd."""
    if kernel_size <= 0:
        raise ValueError(f"kernel_size: {kernel_size} is not a positive size")
    end = ARM64_DOM0_KERNEL_ADDR + kernel_size
    return ARM64_DOM0_KERNEL_ADDR, -(-end // ARM64_MODULE_ALIGN) * ARM64_MODULE_ALIGN


def qemu_command(art: image.Artifacts, results: Path, how: accel.Accel, arch: str = image.DEFAULT_ARCH) -> list[str]:
    if arch == "arm64":
        return qemu_command_arm64(art, results, how)
    dom0 = f"{_virtfs_path(art.vmlinuz)} {DOM0_ARGS},{_virtfs_path(art.initrd)}"
    return [
        "qemu-system-x86_64",
        *how.qemu_args,
        *_machine_common(results),
        "-kernel", str(art.xen), "-append", XEN_ARGS, "-initrd", dom0,
        *_shared_devices(art, results),
    ]  # fmt: skip


def qemu_command_arm64(art: image.Artifacts, results: Path, how: accel.Accel) -> list[str]:
    """QEMU's virt board with EL2 (``virtualization=on``) and a GICv3, Xen as its kernel, dom0's
    kernel and initrd as two guest-loader modules; always TCG (an x86-64 host's KVM cannot run Arm)."""
    if how.name != "tcg":
        raise accel.AccelError(f"an arm64 lab runs under TCG only, not {how}")
    kernel_addr, initrd_addr = arm64_module_addrs(art.vmlinuz.stat().st_size)
    return [
        "qemu-system-aarch64",
        "-M", "virt,virtualization=on,gic-version=3",
        *ARM64_TCG_ARGS,
        *_machine_common(results),
        "-kernel", str(art.xen), "-append", XEN_ARGS_ARM64,
        "-device", f"guest-loader,addr={kernel_addr:#x},kernel={_virtfs_path(art.vmlinuz)},"
                   f"bootargs={DOM0_ARGS_ARM64}",
        "-device", f"guest-loader,addr={initrd_addr:#x},initrd={_virtfs_path(art.initrd)}",
        *_shared_devices(art, results),
    ]  # fmt: skip


#: QEMU's accelerator probe takes the uname name; the lab names architectures as Debian does.
UNAME_MACHINE = {"amd64": "x86_64", "arm64": "aarch64"}
#: the host package with each architecture's QEMU
QEMU_PACKAGE = {"amd64": ("qemu-system-x86_64", "qemu-system-x86"), "arm64": ("qemu-system-aarch64", "qemu-system-arm")}


class Tail:
    """Copies what appears in a growing file to a stream (the command's live output)."""

    def __init__(self, path: Path, out: IO[str]) -> None:
        self.path, self.out, self.pos = path, out, 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # chunks may split a character

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return
        if data:
            self.pos += len(data)
            self.out.write(self.decoder.decode(data))
            self.out.flush()


def crash_lines(results: Path) -> list[str]:
    lines = []
    for name in ("console.log", "dom0-dmesg.txt"):
        path = results / name
        if path.is_file():
            text = path.read_text(errors="replace")
            lines += [f"{name}: {ln.strip()}" for ln in text.splitlines() if CRASH.search(ln)]
    return lines


def timings(results: Path) -> dict[str, float]:
    path = results / "timings"
    marks: dict[str, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            try:
                marks[name] = float(value)
            except ValueError:
                pass
    return marks


def boot(
    command: list[str],
    results: Path,
    timeout: float,
    show_console: bool,
    boot_timeout: float = 240,
    release: str | None = None,
    arch: str | None = None,
) -> Outcome:
    release, arch = image.lab_release(release), image.lab_arch(arch)
    how = accel.choose(UNAME_MACHINE[arch])
    art = image.ensure_image(release=release, arch=arch)
    results.mkdir(parents=True, exist_ok=True)
    (results / "release").write_text(f"{release}\n")
    (results / "arch").write_text(f"{arch}\n")
    (results / "accel").write_text(f"{how}\n")
    lab = release if arch == image.DEFAULT_ARCH else f"{release} {arch}"
    image.log(f"booting the {lab} lab ({image.RELEASES[release]}) under {how}")
    for stale in ("status", "stdout", "stderr", "timings", "console.log"):
        (results / stale).unlink(missing_ok=True)
    shutil.copy(LAB / "dom0-init.sh", results / "init.sh")
    (results / "command").write_text("exec " + shlex.join(command) + "\n")
    tails = [Tail(results / "stdout", sys.stdout), Tail(results / "stderr", sys.stderr)]
    if show_console:
        tails.append(Tail(results / "console.log", sys.stderr))
    t0 = time.monotonic()
    with open(results / "qemu.log", "w") as qlog:
        cmd = qemu_command(art, results, how, arch)
        qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog)
        timed_out = hung = False
        try:
            while qemu.poll() is None:
                waited = time.monotonic() - t0
                # dom0's init writes timings first thing: none by now means the boot hung (seen
                # once under TCG: the dom0 kernel stopped after Xen's PCI scan, for 18 minutes).
                hung = waited > boot_timeout and not (results / "timings").is_file()
                if waited > timeout or hung:
                    timed_out = True
                    qemu.kill()
                    qemu.wait()
                    break
                for t in tails:
                    t.pump()
                time.sleep(0.5)
        finally:
            if qemu.poll() is None:
                qemu.kill()
                qemu.wait()
    for t in tails:
        t.pump()
    wall = time.monotonic() - t0
    marks = timings(results)
    status = results / "status"
    crashes = crash_lines(results)
    times = f"{wall:.0f} s wall"
    if "boot_done" in marks:
        times += f"; dom0 init at {marks['boot_done']:.0f} s, toolstack at {marks.get('toolstack_done', 0):.0f} s"
    if "command_done" in marks and "toolstack_done" in marks:
        times += f", command took {marks['command_done'] - marks['toolstack_done']:.0f} s"
    (results / "wall").write_text(f"{wall:.1f}\n")
    if crashes:
        return Outcome(EXIT_CRASH, f"Xen panicked or dom0 crashed ({times})", crashes)
    if hung:
        return Outcome(EXIT_BOOT_FAILED, f"boot hung: dom0 init not started after {boot_timeout:.0f} s ({times})")
    if timed_out:
        return Outcome(EXIT_TIMEOUT, f"timed out after {timeout:.0f} s ({times})")
    if not status.is_file():
        # TCG warns about CPU flags it only pretends to have; anything else QEMU said matters.
        qlog_lines = (results / "qemu.log").read_text(errors="replace").splitlines()
        said = [ln for ln in qlog_lines if "TCG doesn't support" not in ln]
        why = f"; QEMU said: {' / '.join(said)}" if said else ""
        return Outcome(EXIT_BOOT_FAILED, f"boot failed: no exit status recorded ({times}){why}")
    code = int(status.read_text().strip() or 255)
    what = "command succeeded" if code == 0 else f"command failed with exit status {code}"
    return Outcome(code, f"{what} ({times})")


def report_lines(results: Path) -> list[str]:
    """One line per report the command left in out/: its path and its summary (a "summary"
    field, at the top or one level down), or its numbers (timing figures)."""
    lines = []
    for path in sorted((results / "out").glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            lines.append(f"report {path}: unreadable ({e})")
            continue
        if not isinstance(data, dict):
            continue
        parts = [f"{data['summary']}"] if "summary" in data else []
        parts += [f"{k}: {v['summary']}" for k, v in data.items() if isinstance(v, dict) and "summary" in v]
        if not parts:
            parts = [", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in data.items())]
        lines.append(f"report {path}: {'; '.join(parts)}")
    return lines


def default_results() -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    return image.cache_root() / "runs" / f"{stamp}-{os.getpid()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before QEMU is killed (default 1800)")
    ap.add_argument("--boot-timeout", type=float, default=240,
                    help="seconds for dom0's init to start before the boot counts as hung (default 240)")
    ap.add_argument("--results", type=Path, help="results folder (default: a new one under the lab cache)")
    ap.add_argument("--console", action="store_true", help="also stream the serial console to stderr")
    ap.add_argument("--release", choices=sorted(image.RELEASES),
                    help="the dom0's Debian release (default $XENDMOP_LAB_RELEASE or bookworm)")  # fmt: skip
    ap.add_argument("--arch", choices=sorted([*image.ARCHES, *image.ARCH_ALIASES]),
                    help="the lab's architecture (default $XENDMOP_LAB_ARCH or amd64)")  # fmt: skip
    ap.add_argument("command", nargs="+", help="the command to run in dom0 (after --)")
    args = ap.parse_args(argv)
    try:
        image.lab_release(args.release)
        arch = image.lab_arch(args.arch)
        accel.choose(UNAME_MACHINE[arch])
    except ValueError as e:  # a bad --release/--arch, $XENDMOP_LAB_RELEASE/_ARCH or $XENDMOP_LAB_ACCEL
        ap.error(str(e))
    results = (args.results or default_results()).resolve()
    try:
        image.ensure_tools(dict([QEMU_PACKAGE[arch]]))
        outcome = boot(args.command, results, args.timeout, args.console, args.boot_timeout, args.release, arch)
    except image.Unavailable as e:
        image.log(f"lab unavailable: {e}")
        return EXIT_UNAVAILABLE
    except (image.BuildError, xen_source.SourceError, subprocess.CalledProcessError) as e:
        image.log(f"dom0 image build failed: {e} [exit {EXIT_BOOT_FAILED}]")
        return EXIT_BOOT_FAILED
    for line in outcome.crash_lines[:20]:
        image.log(f"crash: {line}")
    if outcome.code in (EXIT_BOOT_FAILED, EXIT_TIMEOUT):
        tail = (results / "console.log").read_text(errors="replace").splitlines()[-25:] if (
            results / "console.log"
        ).is_file() else []
        for line in tail:
            image.log(f"console: {line}")
    for line in report_lines(results):
        image.log(line)
    image.log(f"{outcome.message} [exit {outcome.code}]")
    image.log(f"results: {results}")
    return outcome.code


if __name__ == "__main__":
    sys.exit(main())
