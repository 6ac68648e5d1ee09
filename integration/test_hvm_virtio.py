"""The four virtio examples serving a real Linux HVM guest's own virtio drivers, and QEMU's
virtio devices of the same kinds as the measured peer, in one lab run.

The guest (``hvmguest``: dom0's kernel, a busybox initramfs with the kernel's virtio, ext4
and failover modules, QEMU as its default device model) boots once with every example
started before it runs, each a deprivileged process (``--depriv``/``--chroot``) and its own
ioreq server: ``uart16550`` (COM1: the shell the tests type into), ``virtio_rng`` (slot 6),
``virtio_blk`` on a sparse file (slot 7), ``virtio_console`` on a pty (slot 8), ``virtio_net``
on a tap in a dom0 network namespace (slot 9), and a second ``virtio_blk --read-only``
(slot 10).  The guest loads ``virtio_pci`` and the four drivers with ``insmod``, and the
tests use them as a user would: ``/dev/hwrng``, ``hvcN``, ``mke2fs`` and ``mount`` on
``/dev/vda``, ``ping`` and ``nc`` over ``eth0``.

A second boot of the same guest gets QEMU's ``virtio-blk-pci`` and ``virtio-net-pci``
(``device_model_args_hvm``; its console is QEMU's COM1 on a pty), booted while ours is still
up.  With both up, the two guests take turns at each measurement (ours, QEMU's, QEMU's,
ours; ``measure_side_by_side``): sequential ``dd`` with O_DIRECT on the disk, a TCP stream
and a UDP stream (``guestio udpsend``) to dom0, with the device model process's CPU time
beside the wall time; then they ping dom0 at the same time (``ping_side_by_side``).  The
ratios go to ``out/timing.json``.
Both boots have ``xen_emul_unplug=never``: otherwise Linux asks QEMU to unplug its
emulated NICs, and QEMU takes virtio-net-pci for one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvmguest
import pytest
from hvmguest import Console, Example, HvmGuest

pytestmark = pytest.mark.x86_only("HVM Linux guests with virtio on PCI; Xen/Arm has no HVM guests")

DEPRIV_IDS = "990:990"
BOOT_TIMEOUT = 900
CMDLINE = "xen_emul_unplug=never"
#: the guest's modules, in insmod order (each after what it depends on)
MODULES = (
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci",
    "drivers/char/hw_random/virtio-rng",
    "drivers/char/virtio_console",
    "drivers/block/virtio_blk",
    "net/core/failover",
    "drivers/net/net_failover",
    "drivers/net/virtio_net",
    "lib/crc16",
    "crypto/crc32c_generic",  # ext4 loads "crc32c" at every mount, ext2 too
    "fs/mbcache",
    "fs/jbd2/jbd2",
    "fs/ext4/ext4",
)
RNG_SLOT, BLK_SLOT, CONSOLE_SLOT, NET_SLOT, RO_SLOT = 6, 7, 8, 9, 10
DISK_SIZE, RO_SIZE = 64 << 20, 4 << 20
RW_SERIAL, RO_SERIAL = "xdm-rw", "xdm-ro"
HOST_IP, GUEST_IP, PREFIX = "10.0.9.1", "10.0.9.2", 24
GUEST_MAC, QEMU_MAC = "02:58:56:00:00:01", "02:58:56:00:00:02"
TCP_PORT = 5001
BENCH_MB = 16  # sequential dd, each direction
TCP_BYTES = 4 << 20
UDP_PORT = 5002
UDP_BYTES = 4 << 20
UDP_SIZE = 1472  # a datagram's payload that fills a 1500-byte MTU: no IP fragments
UDP_IDLE = 3.0  # the listener's window ends this long after the last datagram
# Thirty, not ten: single replies scatter by 13-16 ms under TCG on both sides, so a median of
# ten moved by one slow reply missed the 0.5 target in one run of seven although the runs'
# pooled replies stood at 0.9 (bench/README.md section 6).
PINGS = 30


def _modprobe_tun() -> None:
    subprocess.run(["modprobe", "tun"], check=False, capture_output=True)


@dataclass
class VirtioGuest:
    guest: HvmGuest
    console: Console
    examples: dict[str, Example]
    netns: str
    disk: Path
    ro_disk: Path
    dm_pids: dict[str, int]  # what serves blk and net: for the CPU-time measurements
    boot_seconds: float
    loaded: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    def sh(self, command: str, timeout: float = 120) -> str:
        return self.console.run(command, timeout)


def _load_modules(console: Console) -> str:
    """insmod every module; a driver whose device never interrupts hangs its probe (the
    partition scan, the rng's first read), so the timeout then fails the whole fixture
    at once rather than every test after a stuck shell."""
    names = " ".join(Path(m).name for m in MODULES if not hvmguest.builtin_module(m))
    return console.run(f'for m in {names}; do insmod /mods/$m.ko || echo "insmod $m failed"; done', timeout=400)


@pytest.fixture(scope="module")
def virtio_initramfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hvmguest.build_initramfs(tmp_path_factory.mktemp("virtio-initramfs"), modules=MODULES)


@pytest.fixture(scope="module")
def vguest(tmp_path_factory: pytest.TempPathFactory, virtio_initramfs: Path) -> Iterator[VirtioGuest]:
    work = tmp_path_factory.mktemp("virtio")
    disk, ro_disk = work / "disk.img", work / "ro.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    ro_disk.write_bytes(os.urandom(RO_SIZE))
    _modprobe_tun()
    ns = hvmguest.netns_create(f"xdmv{os.getpid()}")
    guest = hvmguest.create(virtio_initramfs, extra_cmdline=CMDLINE)
    domid = str(guest.domid)
    depriv = ["--depriv", DEPRIV_IDS, "--chroot", str(hvmguest.empty_chroot())]
    examples: dict[str, Example] = {}
    try:
        start = hvmguest.start_example
        examples["uart16550"] = start("uart16550.py", ["--domid", domid, *depriv], pipes=True)
        examples["virtio_rng"] = start("virtio_rng.py", ["--domid", domid, "--slot", str(RNG_SLOT), *depriv])
        examples["virtio_blk"] = start(
            "virtio_blk.py",
            ["--domid", domid, "--slot", str(BLK_SLOT), "--file", str(disk), "--serial", RW_SERIAL, *depriv],
        )
        examples["virtio_console"] = start(
            "virtio_console.py", ["--domid", domid, "--slot", str(CONSOLE_SLOT), "--pty", *depriv]
        )
        examples["virtio_net"] = start(
            "virtio_net.py",
            ["--domid", domid, "--slot", str(NET_SLOT), "--netns", ns, "--tap", "xdmvnet0",
             "--host-addr", f"{HOST_IP}/{PREFIX}", "--mac", GUEST_MAC, *depriv],
        )  # fmt: skip
        examples["virtio_blk_ro"] = start(
            "virtio_blk.py",
            ["--domid", domid, "--slot", str(RO_SLOT), "--file", str(ro_disk), "--read-only",
             "--serial", RO_SERIAL, *depriv],
        )  # fmt: skip
        for example in examples.values():
            example.wait_line(r"Ctrl-C to stop", timeout=180)
        console = hvmguest.uart_console(examples["uart16550"])
        t0 = time.monotonic()
        guest.unpause()
        console.wait_for(hvmguest.READY, BOOT_TIMEOUT)
        vg = VirtioGuest(
            guest,
            console,
            examples,
            ns,
            disk,
            ro_disk,
            {"blk": examples["virtio_blk"].proc.pid, "net": examples["virtio_net"].proc.pid},
            time.monotonic() - t0,
        )
        vg.loaded = _load_modules(console)
        yield vg
    finally:
        guest.destroy()
        for example in examples.values():
            if example.proc.poll() is None:
                example.stop(signal.SIGKILL, timeout=10)
        hvmguest.netns_remove(ns)


def _virtio_functions(sh: Callable[[str], str]) -> dict[str, tuple[str, str]]:
    """{slot: (device id, driver)} of the guest's 1AF4 functions."""
    out = sh(
        "for d in /sys/bus/pci/devices/*; do [ $(cat $d/vendor) = 0x1af4 ] && "
        'echo "${d##*:} $(cat $d/device) $(basename $(readlink $d/driver) 2>/dev/null)"; done; true'
    )
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            found[parts[0]] = (parts[1], parts[2])
    return found


def _disk_named(sh: Callable[[str], str], serial: str) -> str:
    """The guest's vdX whose virtio-blk serial (GET_ID) is ``serial``."""
    out = sh(f"grep -l '^{serial}$' /sys/block/vd*/serial")
    assert len(out.splitlines()) == 1, out
    return out.split("/")[3]


# --- every device is found and bound -------------------------------------------------------------------


def test_the_guests_virtio_pci_binds_every_device(vguest: VirtioGuest) -> None:
    assert "failed" not in vguest.loaded, vguest.loaded
    found = _virtio_functions(vguest.sh)
    assert found == {
        f"{RNG_SLOT:02x}.0": ("0x1044", "virtio-pci"),
        f"{BLK_SLOT:02x}.0": ("0x1042", "virtio-pci"),
        f"{CONSOLE_SLOT:02x}.0": ("0x1043", "virtio-pci"),
        f"{NET_SLOT:02x}.0": ("0x1041", "virtio-pci"),
        f"{RO_SLOT:02x}.0": ("0x1042", "virtio-pci"),
    }, found
    # Each virtio function got its driver: the virtio bus's devices name theirs.
    drivers = vguest.sh("for d in /sys/bus/virtio/devices/*; do basename $(readlink $d/driver); done").split()
    assert sorted(drivers) == sorted(["virtio_rng", "virtio_blk", "virtio_console", "virtio_net", "virtio_blk"])


# --- rng ----------------------------------------------------------------------------------------------------


def test_rng_feeds_dev_hwrng_and_is_the_current_rng(vguest: VirtioGuest) -> None:
    current = vguest.sh("cat /sys/class/misc/hw_random/rng_current")
    assert current.startswith("virtio_rng"), current
    out = vguest.sh("dd if=/dev/hwrng bs=256 count=8 iflag=fullblock 2>/dev/null | wc -c")
    assert out.split()[-1] == "2048"
    a, b = (vguest.sh("dd if=/dev/hwrng bs=32 count=1 2>/dev/null | md5sum").split()[0] for _ in range(2))
    assert a != b  # entropy, not a constant


# --- console ------------------------------------------------------------------------------------------------


def test_console_carries_a_line_each_way_on_its_hvc(vguest: VirtioGuest) -> None:
    example = vguest.examples["virtio_console"]
    pty = example.wait_line(r"hvc0 is on /dev/pts/\d+").rsplit(" ", 1)[1]
    host, close = hvmguest.pty_console(pty)
    try:
        # hvc's tty driver has nodes for every index; the ones that open have a backend: Xen's PV
        # console (hvc_xen) may hold hvc0, and virtio_console's is then the next.  Ours is the
        # one whose line reaches our pty.
        hvcs = vguest.sh("for t in /dev/hvc*; do (: < $t) 2>/dev/null && echo ${t#/dev/}; done; true").split()
        assert hvcs, "no hvc tty opens in the guest"
        hvc = None
        for name in reversed(hvcs):
            vguest.sh(f"echo 'guest to host on {name}' > /dev/{name}")
            try:
                host.wait_for(re.compile(rf"guest to host on {name}\r?\n".encode()), 30)
            except TimeoutError:
                continue
            hvc = name
            break
        assert hvc is not None, f"no line from any of {hvcs} reached the pty: {host.text!r}"
        vguest.console.send(f'read -r line < /dev/{hvc}; echo "hvc=[$line]"\n'.encode())
        time.sleep(5)  # the shell opens the tty; a line sent before that waits in the port anyway
        host.send(b"host to guest on hvc\n")
        vguest.console.wait_for(re.compile(rb"hvc=\[host to guest on hvc\]"), 120)
    finally:
        close()


# --- blk ------------------------------------------------------------------------------------------------------


def test_blk_sizes_serials_and_read_only_flag(vguest: VirtioGuest) -> None:
    rw, ro = _disk_named(vguest.sh, RW_SERIAL), _disk_named(vguest.sh, RO_SERIAL)
    vguest.extra.update(rw=rw, ro=ro)
    assert vguest.sh(f"cat /sys/block/{rw}/size /sys/block/{rw}/ro").split() == [str(DISK_SIZE // 512), "0"]
    assert vguest.sh(f"cat /sys/block/{ro}/size /sys/block/{ro}/ro").split() == [str(RO_SIZE // 512), "1"]


def test_blk_raw_blocks_written_with_o_direct_are_in_the_file(vguest: VirtioGuest) -> None:
    rw = vguest.extra.get("rw") or _disk_named(vguest.sh, RW_SERIAL)
    offset = 40 << 20
    out = vguest.sh(
        "dd if=/dev/urandom of=/tmp/pat bs=64k count=16 2>/dev/null && "
        f"dd if=/tmp/pat of=/dev/{rw} bs=64k seek={offset >> 16} oflag=direct conv=fsync 2>/dev/null && "
        "sha256sum /tmp/pat"
    )
    digest = out.split()[0]
    with open(vguest.disk, "rb") as f:
        f.seek(offset)
        assert hashlib.sha256(f.read(1 << 20)).hexdigest() == digest
    # And back: the guest reads what dom0 put in the file, past its page cache.
    data = os.urandom(1 << 16)
    with open(vguest.disk, "r+b") as f:
        f.seek(offset)
        f.write(data)
    out = vguest.sh(f"dd if=/dev/{rw} bs=64k skip={offset >> 16} count=1 iflag=direct 2>/dev/null | sha256sum")
    assert out.split()[0] == hashlib.sha256(data).hexdigest()


def test_blk_ext2_made_written_and_synced_in_the_guest_is_intact_in_dom0(vguest: VirtioGuest) -> None:
    rw = vguest.extra.get("rw") or _disk_named(vguest.sh, RW_SERIAL)
    vguest.sh(f"mke2fs -F -L xendmop /dev/{rw} >/dev/null", timeout=600)
    vguest.sh(f"mkdir -p /mnt && mount -t ext2 /dev/{rw} /mnt")
    out = vguest.sh(
        "seq 1 40000 > /mnt/seq.txt && mkdir /mnt/dir && echo 'hello from the guest' > /mnt/dir/hello.txt && "
        "dd if=/dev/urandom of=/mnt/random.bin bs=64k count=32 2>/dev/null && sha256sum /mnt/random.bin && "
        "sync && umount /mnt",
        timeout=600,
    )
    digest = out.split()[0]
    fsck = subprocess.run(["e2fsck", "-fn", str(vguest.disk)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    def debugfs(request: str) -> bytes:
        done = subprocess.run(["debugfs", "-R", request, str(vguest.disk)], capture_output=True, check=True)
        return done.stdout

    assert debugfs("cat /seq.txt") == "".join(f"{i}\n" for i in range(1, 40001)).encode()
    assert debugfs("cat /dir/hello.txt") == b"hello from the guest\n"
    assert hashlib.sha256(debugfs("cat /random.bin")).hexdigest() == digest
    with open(vguest.disk, "rb") as f:
        f.seek(1024 + 120)  # the superblock's s_volume_name
        assert f.read(16).rstrip(b"\0") == b"xendmop"


def test_blk_discard_from_the_guest_punches_a_hole_in_the_file(vguest: VirtioGuest) -> None:
    rw = vguest.extra.get("rw") or _disk_named(vguest.sh, RW_SERIAL)
    offset, length = 60 << 20, 1 << 20
    vguest.sh(f"dd if=/dev/urandom of=/dev/{rw} bs=64k seek={offset >> 16} count=16 oflag=direct 2>/dev/null")
    with open(vguest.disk, "rb") as f:
        f.seek(offset)
        assert f.read(length) != bytes(length)
    before = os.stat(vguest.disk).st_blocks
    vguest.sh(f"blkdiscard -o {offset} -l {length} /dev/{rw}")
    with open(vguest.disk, "rb") as f:
        f.seek(offset)
        assert f.read(length) == bytes(length)
    assert os.stat(vguest.disk).st_blocks <= before - length // 512


def test_blk_read_only_disk_reads_its_file_and_refuses_writes(vguest: VirtioGuest) -> None:
    ro = vguest.extra.get("ro") or _disk_named(vguest.sh, RO_SERIAL)
    original = vguest.ro_disk.read_bytes()
    out = vguest.sh(f"dd if=/dev/{ro} bs=64k iflag=direct 2>/dev/null | sha256sum")
    assert out.split()[0] == hashlib.sha256(original).hexdigest()
    out = vguest.sh(f"dd if=/dev/zero of=/dev/{ro} bs=4096 count=1 oflag=direct; echo status=$?")
    # Linux refuses the write (the disk is read-only: VIRTIO_BLK_F_RO); nothing reaches the file.
    assert "status=0" not in out, out
    assert re.search(r"Read-only|Permission denied|Operation not permitted|I/O error", out), out
    assert vguest.ro_disk.read_bytes() == original


# --- net ---------------------------------------------------------------------------------------------------------


def _guest_ifup(sh: Callable[[str], str], mac: str) -> str:
    name = sh(f"grep -l {mac} /sys/class/net/*/address").split("/")[4]
    sh(f"ip addr add {GUEST_IP}/{PREFIX} dev {name} && ip link set {name} up")
    return name


def _ping_avg_ms(out: str) -> float:
    m = re.search(r"round-trip min/avg/max = [0-9.]+/([0-9.]+)/[0-9.]+ ms", out)
    assert m, out
    return float(m.group(1))


def _ping_times_ms(out: str) -> list[float]:
    """Each reply's round trip from busybox ping's "seq=N ttl=T time=1.234 ms" lines, once per
    sequence number (the console may show a line twice)."""
    return list({int(seq): float(t) for seq, t in re.findall(r"seq=(\d+) ttl=\d+ time=([0-9.]+) ms", out)}.values())


def _nic_interrupts(sh: Callable[..., str], mac: str) -> dict[str, int]:
    """The guest's interrupt count per vector of the virtio NIC with address ``mac`` (its
    ``virtioN-input.0``, ``-output.0``, ``-config`` lines in /proc/interrupts; one vCPU)."""
    dev = sh(f"basename $(readlink $(dirname $(grep -l {mac} /sys/class/net/*/address))/device)").strip()
    out = sh(f"awk '/ {dev}-/ {{print $2, $NF}}' /proc/interrupts")
    return {name.split("-", 1)[1]: int(count) for count, name in (line.split() for line in out.splitlines())}


def test_net_guest_pings_dom0_and_dom0_pings_back(vguest: VirtioGuest) -> None:
    vguest.extra["ifname"] = _guest_ifup(vguest.sh, GUEST_MAC)
    out = vguest.sh(f"ping -c 3 -W 10 {HOST_IP}", timeout=180)
    assert "3 packets received" in out, out
    back = subprocess.run(
        ["ip", "netns", "exec", vguest.netns, "busybox", "ping", "-c", "3", "-W", "10", GUEST_IP],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert "3 packets received" in back.stdout, back.stdout + back.stderr


# --- measured: ours and QEMU's, same guest, both up -----------------------------------------------------------------

LISTENER = r"""
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(float(sys.argv[3]))
print("listening", flush=True)
c, _ = s.accept()
c.settimeout(float(sys.argv[3]))
n, t0 = 0, None
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    if t0 is None:
        t0 = time.monotonic()
    n += len(b)
print(n, time.monotonic() - (t0 or time.monotonic()), flush=True)
"""


UDP_LISTENER = r"""
import socket, sys, time

s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 8 << 20)  # root: past rmem_max
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(float(sys.argv[3]))
print("listening", flush=True)
buf = bytearray(1 << 16)
n, datagrams, t0, t1 = 0, 0, None, None
try:
    while True:
        k = s.recv_into(buf)
        t1 = time.monotonic()
        if t0 is None:
            t0 = t1
            s.settimeout(float(sys.argv[4]))  # from now on the window ends when the datagrams stop
        n += k
        datagrams += 1
except socket.timeout:
    pass
print(datagrams, n, (t1 or 0.0) - (t0 or 0.0), flush=True)
"""


class CpuClock:
    """Wall time and a process's CPU time (user + system) over a block."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.proc = psutil.Process(pid)

    def cpu(self) -> float:
        t = self.proc.cpu_times()
        return float(t.user + t.system)

    def __enter__(self) -> CpuClock:
        self.c0, self.t0 = self.cpu(), time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu_s = time.monotonic() - self.t0, self.cpu() - self.c0

    @property
    def share(self) -> float:
        return round(self.cpu_s / self.wall, 3) if self.wall > 0 else 0.0


def _settle() -> None:
    """Write dom0's dirty pages back now (the disk images both boots wrote, the files of the
    tests before), so that no writeback runs in dom0 during the step that follows: one boot
    has run more disk tests than the other before its measurements, and under TCG a flush of
    megabytes takes dom0's vCPUs for seconds."""
    os.sync()
    time.sleep(1)


def _time_real(out: str) -> float:
    """busybox time's "real 0m 1.23s"."""
    m = re.search(r"real\s+(\d+)m ([0-9.]+)s", out)
    assert m, out
    return int(m.group(1)) * 60 + float(m.group(2))


def measure_udp(s: Subject) -> dict[str, Any]:
    """``UDP_BYTES`` as ``UDP_SIZE``-byte datagrams from the guest (``guestio udpsend``, as fast
    as its socket takes them) to a listener in dom0's namespace.  Measured: the payload bytes
    the listener received over its window (first datagram to last) per second, and the loss
    (1 - received / what the guest's send() accepted: dropped by the guest's stack, either
    device model or dom0's stack; none is retransmitted)."""
    listener = subprocess.Popen(
        ["ip", "netns", "exec", s.netns, sys.executable, "-c", UDP_LISTENER, HOST_IP, str(UDP_PORT), "300",
         str(UDP_IDLE)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "listening"
        irqs = _nic_interrupts(s.sh, s.mac)
        with CpuClock(s.net_pid) as clock:
            out = s.sh(f"guestio udpsend {HOST_IP} {UDP_PORT} {UDP_BYTES} {UDP_SIZE}", timeout=900)
            sent_datagrams, sent, _ns = (int(x) for x in out.split())
            datagrams, got, secs = listener.stdout.readline().split()
        irqs = {name: n - irqs.get(name, 0) for name, n in _nic_interrupts(s.sh, s.mac).items()}
    finally:
        if listener.poll() is None:
            listener.kill()
        listener.wait()
    assert sent == UDP_BYTES, sent
    received = int(got)
    return {
        "udp_bytes_sent": sent,
        "udp_datagrams_sent": sent_datagrams,
        "udp_bytes_received": received,
        "udp_datagrams_received": int(datagrams),
        "udp_MBps": round(received / float(secs) / 1e6, 3) if float(secs) > 0 else 0.0,
        "udp_loss": round(1 - received / sent, 4),
        "udp_dm_cpu_share": clock.share,
        # the NIC's interrupts in the guest over the same step (and the shell's commands around it)
        "udp_tx_interrupts": irqs.get("output.0", 0),
        "udp_rx_interrupts": irqs.get("input.0", 0),
    }


def _ping_figures(out: str) -> dict[str, Any]:
    times = _ping_times_ms(out)
    assert times, out
    ordered = sorted(times)
    return {
        "avg_ms": _ping_avg_ms(out),
        "median_ms": round((ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2, 3),
        "min_ms": ordered[0],
        "replies": len(ordered),
        "times_ms": times,  # in sequence order
    }


def ping_side_by_side(
    guests: dict[str, Console], netns: dict[str, str], dm_pids: dict[str, int]
) -> dict[str, dict[str, Any]]:
    """Both guests and dom0 ping each other, ``PINGS`` each, the two guests at the same time
    with one's sends half a second after the other's: first each guest pings dom0 with its
    output to a file (shown after: ``ping_*``), then dom0 pings each guest from the guest's
    namespace (``ping_dom0_*``); each reply's time, the median and the average per guest and
    direction, with each device model's CPU share over the step.

    At the same time, not one boot after the other: a reply's time under TCG swings with
    what the host and dom0 are doing, over minutes (in one run our guest's median was 16.6 ms
    and 9.8 ms a minute later, QEMU's 7.6 and 15.0 in its boot after), so two boots minutes
    apart compared the host's moments more than the devices.  Half a second apart, the pings
    never overlap (a reply takes milliseconds).  Both directions, because the guest's clock
    under TCG is no better than dom0's (QEMU's guest once timed a reply at 0.04 ms)."""
    result: dict[str, dict[str, Any]] = {name: {} for name in guests}

    def record(name: str, key: str, out: str) -> None:
        result[name].update({f"{key}_{k}": v for k, v in _ping_figures(out).items()})

    _settle()
    with contextlib.ExitStack() as stack:
        clocks = {name: stack.enter_context(CpuClock(pid)) for name, pid in dm_pids.items()}
        for i, console in enumerate(guests.values()):
            if i:
                time.sleep(0.5)
            console.run(f"rm -f /ping.out; (ping -c {PINGS} {HOST_IP} > /ping.out 2>&1 &)")
        time.sleep(PINGS + 1)  # no guest polls while the pings run
        for name, console in guests.items():
            out = console.run(
                "i=0; while ! grep -q round-trip /ping.out && [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done; "
                "cat /ping.out",
                timeout=PINGS + 180,
            )
            record(name, "ping", out)
    for name, clock in clocks.items():
        result[name]["ping_dm_cpu_share"] = clock.share
    _settle()
    with contextlib.ExitStack() as stack:
        clocks = {name: stack.enter_context(CpuClock(pid)) for name, pid in dm_pids.items()}
        pings: dict[str, subprocess.Popen[str]] = {}
        for i, name in enumerate(guests):
            if i:
                time.sleep(0.5)
            pings[name] = subprocess.Popen(
                ["ip", "netns", "exec", netns[name], "busybox", "ping", "-c", str(PINGS), GUEST_IP],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        outs = {name: p.communicate(timeout=PINGS + 180)[0] for name, p in pings.items()}
    for name, clock in clocks.items():
        result[name]["ping_dom0_dm_cpu_share"] = clock.share
    for name, out in outs.items():
        record(name, "ping_dom0", out)
    return result


@dataclass
class Subject:
    """One guest and what serves it, as the measurements need them."""

    name: str  # "xendmop" or "qemu"
    sh: Callable[..., str]
    disk: str  # the measured disk's name in the guest (vda, ...)
    netns: str
    blk_pid: int
    net_pid: int
    mac: str


def _blk_step(kind: str) -> Callable[[Subject], dict[str, Any]]:
    def step(s: Subject) -> dict[str, Any]:
        if kind == "write":
            cmd = f"dd if=/dev/zero of=/dev/{s.disk} bs=1M count={BENCH_MB} oflag=direct"
        else:
            cmd = f"dd if=/dev/{s.disk} of=/dev/null bs=1M count={BENCH_MB} iflag=direct"
        with CpuClock(s.blk_pid) as clock:
            secs = _time_real(s.sh(f"time {cmd}", timeout=900))
        rate = BENCH_MB * (1 << 20) / secs / 1e6 if secs > 0 else 0.0
        return {f"blk_{kind}_MBps": round(rate, 2), f"blk_{kind}_dm_cpu_share": clock.share}

    return step


def _tcp_step(s: Subject) -> dict[str, Any]:
    listener = subprocess.Popen(
        ["ip", "netns", "exec", s.netns, sys.executable, "-c", LISTENER, HOST_IP, str(TCP_PORT), "600"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "listening"
        with CpuClock(s.net_pid) as clock:
            s.sh(f"dd if=/dev/zero bs=64k count={TCP_BYTES >> 16} 2>/dev/null | nc {HOST_IP} {TCP_PORT}", timeout=900)
        got, secs = listener.stdout.readline().split()
        assert int(got) == TCP_BYTES, got
        return {"tcp_MBps": round(TCP_BYTES / float(secs) / 1e6, 2), "tcp_dm_cpu_share": clock.share}
    finally:
        if listener.poll() is None:
            listener.kill()
        listener.wait()


#: each step, and the figure that ranks its repetitions
STEPS: tuple[tuple[str, Callable[[Subject], dict[str, Any]]], ...] = (
    ("blk_write_MBps", _blk_step("write")),
    ("blk_read_MBps", _blk_step("read")),
    ("tcp_MBps", _tcp_step),
    ("udp_MBps", measure_udp),
)


def measure_side_by_side(a: Subject, b: Subject) -> dict[str, dict[str, Any]]:
    """Sequential O_DIRECT dd on each guest's disk (write, then read, ``BENCH_MB`` MiB in 1 MiB
    blocks), a TCP stream and a UDP stream guest -> dom0, with the device model's CPU share:
    each step twice per guest, in the order a, b, b, a, the best of each guest's two kept (its
    figures, and every repetition's in ``<figure>_runs``); dom0's dirty pages written back
    before each (``_settle``).

    Both guests are up and take turns, step by step: a host whose speed drifts over minutes
    (under TCG it does: our blk write at 54 MB/s in one run where it is 84-105 in others)
    drifts for both, and the order a, b, b, a cancels a steady drift within a step."""
    result: dict[str, dict[str, Any]] = {s.name: {"bench_mib": BENCH_MB, "tcp_bytes": TCP_BYTES} for s in (a, b)}
    for figure, step in STEPS:
        best: dict[str, dict[str, Any]] = {}
        runs: dict[str, list[float]] = {a.name: [], b.name: []}
        errors: dict[str, str] = {}
        for s in (a, b, b, a):
            _settle()
            try:
                got = step(s)
            except (AssertionError, OSError, ValueError, subprocess.SubprocessError) as e:  # recorded, not fatal
                errors[s.name] = f"{figure}: {type(e).__name__}: {e}"
                continue
            runs[s.name].append(got[figure])
            if s.name not in best or got[figure] > best[s.name][figure]:
                best[s.name] = got
        for s in (a, b):
            result[s.name].update(best.get(s.name, {}))
            result[s.name][f"{figure}_runs"] = runs[s.name]
            if s.name in errors:
                result[s.name].setdefault("errors", []).append(errors[s.name])
    return result


def test_every_device_interrupted_through_msix(vguest: VirtioGuest) -> None:
    # Traffic on every device first, so this test stands alone (run again on a new boot): a read
    # from the rng and each disk, a ping, and a line each way on the console. The line in matters:
    # the guest's hvc output alone may raise no interrupt, since virtio_console's __send_to_port
    # waits for the used buffer by polling, with interrupts off (seen: the console's count 0 on a
    # new boot whose earlier console test had passed).
    if "ifname" not in vguest.extra:
        vguest.extra["ifname"] = _guest_ifup(vguest.sh, GUEST_MAC)
    pty = vguest.examples["virtio_console"].wait_line(r"hvc0 is on /dev/pts/\d+").rsplit(" ", 1)[1]
    host, close = hvmguest.pty_console(pty)  # open until the counts are read: the example reads it
    try:
        host.send(b"msix\n")  # into the guest's receive buffers, whether or not a reader has the hvc open
        vguest.sh(
            "dd if=/dev/hwrng bs=16 count=1 2>/dev/null | wc -c; "
            "for d in /dev/vd?; do dd if=$d of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null; done; "
            "for t in /dev/hvc*; do (echo msix > $t) 2>/dev/null; done; "
            f"ping -c 1 -W 5 {HOST_IP} >/dev/null; true",
            timeout=120,
        )
        out = vguest.sh("awk '/virtio/ {print $2, $NF}' /proc/interrupts")
    finally:
        close()
    counts: dict[str, int] = {}
    for line in out.splitlines():
        count, name = line.split()
        if not name.endswith("-config"):
            dev = name.split("-")[0]
            counts[dev] = counts.get(dev, 0) + int(count)
    assert len(counts) == 5 and all(counts.values()), out
    assert out.count("-config") == 5, out  # a configuration vector each: MSI-X, not INTx


@pytest.mark.parametrize("name", ["virtio_rng", "virtio_blk", "virtio_console", "virtio_net", "virtio_blk_ro"])
def test_each_virtio_example_passes_depriv_check_while_serving(vguest: VirtioGuest, name: str) -> None:
    example = vguest.examples[name]
    assert any("deprivileged to uid 990 gid 990" in line for line in example.lines), example.lines
    # A writable disk's RLIMIT_FSIZE is its size (program.drop_for); everything else is the default's.
    fsize = ["--rlimit", f"FSIZE={DISK_SIZE}"] if name == "virtio_blk" else []
    done = subprocess.run(
        [sys.executable, "-m", "xendmop", "depriv-check", str(example.proc.pid), *fsize],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_blk_and_net_are_measured_side_by_side_with_qemus_virtio(vguest: VirtioGuest, qemu_guest: QemuGuest) -> None:
    """Our guest and QEMU's, both up: the throughput steps taken in turns
    (``measure_side_by_side``), then the pings at the same time (``ping_side_by_side``);
    the ratios (ours over QEMU's; for ping, QEMU's round trip over ours) to ``out/timing.json``."""
    if "ifname" not in vguest.extra:
        vguest.extra["ifname"] = _guest_ifup(vguest.sh, GUEST_MAC)
    _qemu_ifup(qemu_guest)
    ours = Subject(
        "xendmop",
        vguest.sh,
        str(vguest.extra.get("rw") or _disk_named(vguest.sh, RW_SERIAL)),
        vguest.netns,
        vguest.dm_pids["blk"],
        vguest.dm_pids["net"],
        GUEST_MAC,
    )
    qsh = qemu_guest.console.run
    peer = Subject("qemu", qsh, _disk_named(qsh, RW_SERIAL), qemu_guest.netns, qemu_guest.pid, qemu_guest.pid, QEMU_MAC)
    measured = measure_side_by_side(ours, peer)
    pings = ping_side_by_side(
        {"xendmop": vguest.console, "qemu": qemu_guest.console},
        {"xendmop": vguest.netns, "qemu": qemu_guest.netns},
        {"xendmop": vguest.dm_pids["net"], "qemu": qemu_guest.pid},
    )
    for name, boot in (("xendmop", vguest.boot_seconds), ("qemu", qemu_guest.boot_seconds)):
        measured[name].update(pings[name])
        measured[name]["boot_to_shell_s"] = round(boot, 1)
    x, q = measured["xendmop"], measured["qemu"]
    ratio: dict[str, Any] = {
        key: round(x[key] / q[key], 3) if x.get(key) and q.get(key) else 0.0
        for key in ("blk_write_MBps", "blk_read_MBps", "tcp_MBps", "udp_MBps")
    }
    for form in ("ping", "ping_dom0"):
        ratio[f"{form}_rtt"] = round(q[f"{form}_avg_ms"] / x[f"{form}_avg_ms"], 3)
        ratio[f"{form}_rtt_median"] = round(q[f"{form}_median_ms"] / x[f"{form}_median_ms"], 3)
    ratio["note"] = (
        "xendmop's Python virtio / QEMU's C virtio, same guest, both up in the same lab run (TCG): "
        "throughput steps in turns (ours, QEMU's, QEMU's, ours; best of two each), pings at the same time; "
        ">1 is faster"
    )
    hvmguest.record_timing("hvm_virtio_xendmop", x)
    hvmguest.record_timing("hvm_virtio_qemu", q)
    hvmguest.record_timing("hvm_virtio_ratio_xendmop_to_qemu", ratio)
    print("xendmop:", x, "\nQEMU:", q, "\nxendmop / QEMU:", ratio)
    for name, figures in measured.items():
        assert "errors" not in figures, (name, figures["errors"])
        assert all(figures[key] > 0 for key in ("blk_write_MBps", "blk_read_MBps", "tcp_MBps", "udp_MBps")), figures
        assert figures["udp_bytes_received"] > 0, figures
        assert figures["ping_replies"] == PINGS and figures["ping_dom0_replies"] == PINGS, (name, figures)


def test_guest_powering_off_ends_every_virtio_example_cleanly(vguest: VirtioGuest) -> None:
    vguest.console.send(b"poweroff -f\n")
    assert vguest.guest.wait_gone(120), "the guest did not power off"
    # (uart16550's own exit when the guest goes is test_hvm_linux.py's to check.)
    for name, example in vguest.examples.items():
        if not name.startswith("virtio_"):
            continue
        status = example.proc.wait(60)
        text = "\n".join(example.lines)
        assert status == 0, f"{name} exited {status}:\n{text}"
        assert re.search(rf"dom{vguest.guest.domid} is gone", text), f"{name}:\n{text}"
        assert not re.search(r"Traceback|needs reset", text), f"{name}:\n{text}"


# --- QEMU's own virtio-blk and virtio-net, the peer -------------------------------------------------------------


@dataclass
class QemuGuest:
    guest: HvmGuest
    console: Console
    netns: str
    pid: int
    boot_seconds: float
    ifname: str = ""


def _qemu_ifup(qg: QemuGuest) -> None:
    """Address QEMU's guest NIC and check it answers, once per boot."""
    if not qg.ifname:
        qg.ifname = _guest_ifup(qg.console.run, QEMU_MAC)
        assert "3 packets received" in qg.console.run(f"ping -c 3 -W 10 {HOST_IP}", timeout=180)


@pytest.fixture(scope="module")
def qemu_guest(tmp_path_factory: pytest.TempPathFactory, virtio_initramfs: Path) -> Iterator[QemuGuest]:
    from pyroute2 import IPRoute, NetNS

    work = tmp_path_factory.mktemp("qemu-virtio")
    disk = work / "qemu-disk.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    _modprobe_tun()
    ns = hvmguest.netns_create(f"xdmq{os.getpid()}")
    tap = "xdmvq0"
    args = [
        "-drive", f"file={disk},if=none,id=xdmblk,format=raw",
        "-device", f"virtio-blk-pci,drive=xdmblk,serial={RW_SERIAL}",
        "-netdev", f"tap,id=xdmnet,ifname={tap},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=xdmnet,mac={QEMU_MAC},romfile=",
    ]  # fmt: skip
    extra = ["device_model_args_hvm = [ " + ", ".join(f'"{a}"' for a in args) + " ]"]
    guest = hvmguest.create(virtio_initramfs, extra_cmdline=CMDLINE, serial_pty=True, extra_config=extra)
    close: Callable[[], None] = lambda: None  # noqa: E731
    try:
        with IPRoute() as ipr:  # QEMU made the tap in dom0's namespace: move it beside ours
            index = ipr.link_lookup(ifname=tap)
            assert index, f"QEMU made no tap {tap}"
            ipr.link("set", index=index[0], net_ns_fd=ns)
        with NetNS(ns) as nsr:
            index = nsr.link_lookup(ifname=tap)[0]
            nsr.addr("add", index=index, address=HOST_IP, prefixlen=PREFIX)
            nsr.link("set", index=index, state="up")
        console, close = hvmguest.pty_console(guest.qemu_pty())
        t0 = time.monotonic()
        guest.unpause()
        console.wait_for(hvmguest.READY, BOOT_TIMEOUT)
        loaded = _load_modules(console)
        assert "failed" not in loaded, loaded
        yield QemuGuest(guest, console, ns, guest.qemu_pid(), time.monotonic() - t0)
    finally:
        guest.destroy()
        close()
        hvmguest.netns_remove(ns)
