"""The four virtio examples over virtio-mmio, serving a real arm64 Linux guest on Xen/Arm.

The guest is dom0's own arm64 kernel (``/boot/vmlinuz-*``, an uncompressed Image) with a
busybox initramfs holding the kernel's ``virtio_mmio`` and device modules; its console is
Xen's PV console (``hvc0``, through xenconsoled's pty).  Xen 4.17's xl makes virtio-mmio
nodes in the guest's device tree from disks with ``specification=virtio`` (xl's generic
``virtio = [...]`` came in 4.18): slot ``i`` is at 0x0200_0000 + i * 0x200 with SPI 33 + i,
no ``iommus`` (the backend is dom0, so no grants), and the device type is whatever our
register block says.  For such a disk libxl waits up to 10 s in ``xl create`` for the
backend's Xenstore ``state`` to reach InitWait (``libxl__wait_device_connection``: a
standalone disk is no QEMU backend); ``xendmop virtio-disk-backends`` answers it, and Closed
at teardown, as a real standalone backend does.

The examples start while the guest is paused, each deprivileged (``--depriv``/``--chroot``)
with its own ioreq server and ``--mmio i``; the guest then loads ``virtio_mmio`` and the
four drivers with ``insmod`` and uses them: ``/dev/hwrng``, ``hvc1``, raw blocks on
``/dev/vda`` (and the file holds them), ``ping`` through a tap in a dom0 network
namespace, and each device's SPI counted in ``/proc/interrupts``.

Skipped on x86, saying so.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hvmguest
import pytest
import xenlab
from hvmguest import Console, Example

pytestmark = pytest.mark.skipif(xenlab.X86, reason="Arm only: virtio-mmio slots in an Arm guest's device tree")

DEPRIV_IDS = "990:990"
BOOT_TIMEOUT = 600
#: the guest's modules, in insmod order; those built into dom0's kernel are skipped
MODULES = (
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio_mmio",
    "drivers/char/hw_random/virtio-rng",
    "drivers/char/virtio_console",
    "drivers/block/virtio_blk",
    "net/core/failover",
    "drivers/net/net_failover",
    "drivers/net/virtio_net",
    "lib/crc16",
    "crypto/crc32c_generic",  # ext4 (which serves ext2) loads "crc32c" at every mount
    "fs/mbcache",
    "fs/jbd2/jbd2",
    "fs/ext4/ext4",
)
#: libxl's slot (= its disk's place in the list) for each example
RNG, BLK, CONSOLE, NET = 0, 1, 2, 3
DISK_SIZE = 16 << 20
HOST_IP, GUEST_IP, PREFIX = "10.0.19.1", "10.0.19.2", 24
GUEST_MAC = "02:58:56:00:01:01"
CMDLINE = "console=hvc0 loglevel=4 rdinit=/init panic=-1"


@contextlib.contextmanager
def _virtio_disk_backends() -> Iterator[list[str]]:
    """``xendmop virtio-disk-backends`` as a process for the block: the lines it printed, one per
    state it answered."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "xendmop", "virtio-disk-backends"], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    lines: list[str] = []
    assert proc.stdout is not None
    assert "answering libxl under" in proc.stdout.readline()
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        yield lines
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def _config(name: str, ramdisk: Path, targets: list[Path]) -> str:
    kernel = Path("/boot") / f"vmlinuz-{hvmguest.kernel_release()}"
    disks = ", ".join(
        f'"vdev=xvd{chr(ord("a") + i)}, format=raw, backendtype=standalone, specification=virtio, target={t}"'
        for i, t in enumerate(targets)
    )
    return (
        "\n".join(
            [
                f'name = "{name}"',
                "memory = 128",
                "vcpus = 1",
                f'kernel = "{kernel}"',
                f'ramdisk = "{ramdisk}"',
                f'extra = "{CMDLINE}"',
                f"disk = [ {disks} ]",
                'on_poweroff = "destroy"',
                'on_reboot = "destroy"',
                'on_crash = "preserve"',
            ]
        )
        + "\n"
    )


@dataclass
class ArmGuest:
    name: str
    domid: int
    console: Console
    examples: dict[str, Example]
    disk: Path
    netns: str
    boot_seconds: float
    loaded: str
    handshakes: list[str]

    def sh(self, command: str, timeout: float = 120) -> str:
        return self.console.run(command, timeout)


@pytest.fixture(scope="module")
def aguest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ArmGuest]:
    work = tmp_path_factory.mktemp("arm-virtio")
    disk = work / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    targets = [disk if i == BLK else work / f"slot{i}.img" for i in range(4)]
    for t in targets:
        if not t.exists():
            t.write_bytes(bytes(4096))  # libxl stats a standalone disk's target: a file must be there
    name = f"xendmop-armv{os.getpid()}"
    cfg = work / "guest.cfg"
    cfg.write_text(_config(name, hvmguest.build_initramfs(work, MODULES, x86_tools=False), targets))
    subprocess.run(["modprobe", "tun"], check=False, capture_output=True)
    ns = hvmguest.netns_create(f"xdma{os.getpid()}")
    examples: dict[str, Example] = {}
    closer = None
    with _virtio_disk_backends() as answered:
        try:
            xenlab.xl("create", "-p", str(cfg))
            domid = int(xenlab.xl("domid", name).strip())
            dom = str(domid)
            depriv = ["--depriv", DEPRIV_IDS, "--chroot", str(hvmguest.empty_chroot())]
            start = hvmguest.start_example
            examples["virtio_rng"] = start("virtio_rng.py", ["--domid", dom, "--mmio", str(RNG), *depriv])
            examples["virtio_blk"] = start(
                "virtio_blk.py", ["--domid", dom, "--mmio", str(BLK), "--file", str(disk), *depriv]
            )
            examples["virtio_console"] = start(
                "virtio_console.py", ["--domid", dom, "--mmio", str(CONSOLE), "--pty", *depriv]
            )
            examples["virtio_net"] = start(
                "virtio_net.py",
                ["--domid", dom, "--mmio", str(NET), "--netns", ns, "--tap", "xdmanet0",
                 "--host-addr", f"{HOST_IP}/{PREFIX}", "--mac", GUEST_MAC, *depriv],
            )  # fmt: skip
            for example in examples.values():
                example.wait_line(r"Ctrl-C to stop", timeout=180)
            tty = hvmguest.xenstore_wait(f"/local/domain/{domid}/console/tty", "xenconsoled")
            console, closer = hvmguest.pty_console(tty)
            t0 = time.monotonic()
            xenlab.xl("unpause", name)
            console.wait_for(hvmguest.READY, BOOT_TIMEOUT)
            boot = time.monotonic() - t0
            names = " ".join(Path(m).name for m in MODULES if not hvmguest.builtin_module(m))
            loaded = console.run(f'for m in {names}; do insmod /mods/$m.ko || echo "insmod $m failed"; done', 400)
            yield ArmGuest(name, domid, console, examples, disk, ns, boot, loaded, answered)
        finally:
            xenlab.xl("destroy", name, check=False)
            for example in examples.values():
                if example.proc.poll() is None:
                    example.stop(signal.SIGKILL, timeout=10)
            if closer is not None:
                closer()
            hvmguest.netns_remove(ns)


def test_libxl_waited_for_each_standalone_backend_and_got_it(aguest: ArmGuest) -> None:
    """``xendmop virtio-disk-backends`` answered libxl's wait for each of the four slots' disks."""
    assert len([h for h in aguest.handshakes if h.strip().endswith(": 1 -> 2")]) == 4, aguest.handshakes


def test_the_guests_virtio_mmio_binds_every_device(aguest: ArmGuest) -> None:
    assert "failed" not in aguest.loaded, aguest.loaded
    out = aguest.sh(
        "for d in /sys/bus/virtio/devices/*; do "
        'echo "$(basename $(readlink -f $d/..)) $(cat $d/device) $(basename $(readlink $d/driver))"; done'
    )
    found = sorted(tuple(line.split()) for line in out.splitlines() if line.strip())
    assert found == [
        ("2000000.virtio", "0x0004", "virtio_rng"),
        ("2000200.virtio", "0x0002", "virtio_blk"),
        ("2000400.virtio", "0x0003", "virtio_console"),
        ("2000600.virtio", "0x0001", "virtio_net"),
    ], out
    for example in aguest.examples.values():
        assert example.proc.poll() is None, f"{example.name} ended: {example.lines}"


def test_rng_feeds_dev_hwrng(aguest: ArmGuest) -> None:
    assert aguest.sh("cat /sys/class/misc/hw_random/rng_current").startswith("virtio_rng")
    assert aguest.sh("dd if=/dev/hwrng bs=256 count=8 iflag=fullblock 2>/dev/null | wc -c").split()[-1] == "2048"
    a, b = (aguest.sh("dd if=/dev/hwrng bs=32 count=1 2>/dev/null | md5sum").split()[0] for _ in range(2))
    assert a != b


def test_blk_raw_blocks_reach_the_file_and_come_back(aguest: ArmGuest) -> None:
    assert aguest.sh("cat /sys/block/vda/size").strip() == str(DISK_SIZE // 512)
    offset = 8 << 20
    out = aguest.sh(
        "dd if=/dev/urandom of=/tmp/pat bs=64k count=8 2>/dev/null && "
        f"dd if=/tmp/pat of=/dev/vda bs=64k seek={offset >> 16} oflag=direct conv=fsync 2>/dev/null && "
        "sha256sum /tmp/pat"
    )
    with open(aguest.disk, "rb") as f:
        f.seek(offset)
        assert hashlib.sha256(f.read(8 << 16)).hexdigest() == out.split()[0]
    data = os.urandom(1 << 16)
    with open(aguest.disk, "r+b") as f:
        f.seek(offset)
        f.write(data)
    out = aguest.sh(f"dd if=/dev/vda bs=64k skip={offset >> 16} count=1 iflag=direct 2>/dev/null | sha256sum")
    assert out.split()[0] == hashlib.sha256(data).hexdigest()


def test_blk_ext2_made_written_and_synced_in_the_guest_is_intact_in_dom0(aguest: ArmGuest) -> None:
    aguest.sh("mke2fs -F -L xendmop-arm /dev/vda >/dev/null", timeout=600)
    out = aguest.sh(
        "mkdir -p /mnt && mount -t ext2 /dev/vda /mnt && seq 1 20000 > /mnt/seq.txt && "
        "dd if=/dev/urandom of=/mnt/random.bin bs=64k count=16 2>/dev/null && sha256sum /mnt/random.bin && "
        "sync && umount /mnt",
        timeout=600,
    )
    fsck = subprocess.run(["e2fsck", "-fn", str(aguest.disk)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    def debugfs(request: str) -> bytes:
        return subprocess.run(["debugfs", "-R", request, str(aguest.disk)], capture_output=True, check=True).stdout

    assert debugfs("cat /seq.txt") == "".join(f"{i}\n" for i in range(1, 20001)).encode()
    assert hashlib.sha256(debugfs("cat /random.bin")).hexdigest() == out.split()[0]


def test_console_carries_a_line_each_way_on_hvc1(aguest: ArmGuest) -> None:
    """hvc0 is Xen's PV console (the shell's); virtio_console's port is the next hvc."""
    pty = aguest.examples["virtio_console"].wait_line(r"hvc0 is on /dev/pts/\d+").rsplit(" ", 1)[1]
    host, close = hvmguest.pty_console(pty)
    try:
        aguest.sh("echo 'guest to host on hvc1' > /dev/hvc1")
        host.wait_for(re.compile(rb"guest to host on hvc1\r?\n"), 60)
        aguest.console.send(b'read -r line < /dev/hvc1; echo "hvc=[$line]"\n')
        time.sleep(5)  # the shell opens the tty first; a line sent before that waits in the port anyway
        host.send(b"host to guest on hvc1\n")
        aguest.console.wait_for(re.compile(rb"hvc=\[host to guest on hvc1\]"), 120)
    finally:
        close()


def test_net_guest_pings_dom0_and_dom0_pings_back(aguest: ArmGuest) -> None:
    aguest.sh(f"ip link set eth0 up && ip addr add {GUEST_IP}/{PREFIX} dev eth0")
    assert aguest.sh("cat /sys/class/net/eth0/address").strip() == GUEST_MAC
    assert "3 packets received" in aguest.sh(f"ping -c 3 -W 10 {HOST_IP}", timeout=180)
    back = subprocess.run(
        ["ip", "netns", "exec", aguest.netns, "busybox", "ping", "-c", "3", "-W", "10", GUEST_IP],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert "3 packets received" in back.stdout, back.stdout + back.stderr


def test_each_device_interrupted_on_its_own_spi(aguest: ArmGuest) -> None:
    """/proc/interrupts: one line per device, at libxl's SPI for its slot (the GIC's hwirq 33 + slot), counted."""
    out = aguest.sh("grep virtio /proc/interrupts")
    print(out)
    seen: dict[str, tuple[int, int]] = {}
    for line in out.splitlines():
        fields = line.split()  # "IRQ:  count  GICv3  hwirq  Edge  virtioN" (one vCPU)
        seen[fields[-1]] = (int(fields[3]), int(fields[1]))
    assert sorted(hw for hw, _ in seen.values()) == [33 + i for i in range(4)], out
    assert all(count > 0 for _, count in seen.values()), out


def test_measure_blk_and_ping_from_the_arm_guest(aguest: ArmGuest) -> None:
    """Figures for bench/README (no peer: the Arm lab has no QEMU device model to measure against)."""
    measured: dict[str, float | str] = {"boot_to_shell_s": round(aguest.boot_seconds, 1)}
    for key, command in (
        ("blk_write_MBps", "dd if=/dev/zero of=/dev/vda bs=1M count=8 oflag=direct 2>&1"),
        ("blk_read_MBps", "dd if=/dev/vda of=/dev/null bs=1M count=8 iflag=direct 2>&1"),
    ):
        t0 = time.monotonic()
        aguest.sh(command, timeout=600)
        measured[key] = round(8 * 1.048576 / (time.monotonic() - t0), 2)
    out = aguest.sh(f"ping -c 10 {HOST_IP}", timeout=180)
    times = [float(t) for t in re.findall(r"time=([0-9.]+) ms", out)]
    assert len(times) == 10, out
    measured["ping_median_ms"] = sorted(times)[5]
    measured["ping_avg_ms"] = round(sum(times) / len(times), 3)
    print(f"Arm guest over virtio-mmio: {measured}")
    hvmguest.record_timing("arm_virtio_xendmop", measured)
