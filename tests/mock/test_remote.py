"""The mock Xen as a separate host process: a real ``xendmop mock-host`` child, a device
model in another real process, and the guest driven from this one (``RemoteGuest``)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from xendmop import DeviceModel
from xendmop.abi.ioreq import IOREQ_BUFFER_SLOT_NUM, IOREQ_TYPE_PIO
from xendmop.abi.privcmd import (
    IOCTL_PRIVCMD_DM_OP,
    IOCTL_PRIVCMD_MMAPBATCH_V2,
    privcmd_dm_op,
    privcmd_dm_op_buf,
    privcmd_mmapbatch_v2,
)
from xendmop.backends.device import PAGE_SIZE, PRIVCMD_PATH
from xendmop.mock import default_host
from xendmop.mock.remote import MAX_MESSAGE, MockHostServer, Msg, RemoteGuest, RemoteXen
from xendmop.mock.remote import server as remote
from xendmop.mock.simguest import GuestTimeout
from xendmop.runtime.evtchn import EventChannel
from xendmop.runtime.foreignmemory import ForeignMemory

from .remote_helpers import REPO, child_env, start_mock_host, wait_for

TIMEOUT = 20.0
DOMID = 1
SBDF = 3 << 3  # 0000:00:03.0
UART, FIFO, COUNTER, MMIO = 0x3F8, 0x500, 0x510, 0xFEB00000

# A device model process: its DeviceModel finds the host through XENDMOP_MOCK_SOCKET, its
# ioreq server opens privcmd and evtchn over a second connection; it serves until SIGTERM.
DM_CHILD = r"""
import json, os, sys
from xendmop import DeviceModel
from xendmop.mock.remote import connect_from_env
from xendmop.runtime.server import IoreqServer, ServeLoop
from xendmop.types import BufIoreq



class Regs:  # registers that read back what was written
    def __init__(self):
        self.values = {}

    def read(self, off, size):
        return self.values.get(off, 0) & ((1 << 8 * size) - 1)

    def write(self, off, size, value):
        self.values[off] = value


class Fifo:  # bytes written come back in order; 0xEE when empty
    def __init__(self):
        self.data = bytearray()

    def read(self, off, size):
        return self.data.pop(0) if self.data else 0xEE

    def write(self, off, size, value):
        self.data.append(value & 0xFF)


class Counter:  # offset 0: how many writes; offset 4: their sum
    def __init__(self):
        self.count = self.total = 0

    def read(self, off, size):
        return self.count if off == 0 else self.total & 0xFFFFFFFF

    def write(self, off, size, value):
        self.count += 1
        self.total += value


domid = int(sys.argv[1])
dm = DeviceModel.open("mock")
server = IoreqServer(dm, domid, opener=connect_from_env().open_device, bufioreq=BufIoreq.LEGACY)
server.add_port_range(0x3F8, 0x3FF, Regs(), "regs")
server.add_port_range(0x500, 0x500, Fifo(), "fifo")
server.add_port_range(0x510, 0x517, Counter(), "counter")
server.add_mmio_range(0xFEB00000, 0xFEB00FFF, Regs(), "mmio")
server.add_pci(Regs(), slot=3)
server.start()
print(json.dumps({"server": server.id, "backend": dm.backend.name}), flush=True)
if sys.argv[2:] == ["asyncio"]:  # the same server on an asyncio loop: add_reader on the eventfd
    import asyncio
    from xendmop.runtime.server import serve_forever_async

    sig = asyncio.run(serve_forever_async(server))
else:
    sig = ServeLoop(server).run()
print(json.dumps({"signal": sig}), flush=True)
"""


def _line(proc: subprocess.Popen[bytes], timeout: float = TIMEOUT) -> str:
    """The next stdout line of ``proc``, failing the test if none comes in time."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        pytest.fail(f"child {proc.args!r} said nothing within {timeout}s")
    line = proc.stdout.readline().decode()
    if not line:
        proc.wait(timeout)
        err = proc.stderr.read().decode() if proc.stderr else ""
        pytest.fail(f"child exited with {proc.returncode}: {err}")
    return line


@dataclass
class Host:
    path: str
    proc: subprocess.Popen[bytes]


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    """``python -m xendmop mock-host`` in a child process; stopped with SIGTERM afterwards."""
    path = str(tmp_path / "xen.sock")
    proc = start_mock_host(path)
    try:
        assert f"listening on {path}" in _line(proc)
        yield Host(path, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        assert not os.path.exists(path), "the socket outlived the host"
    finally:
        _reap(proc)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc`` if it still runs, wait for it, close its pipes."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(TIMEOUT)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@pytest.fixture
def spawn_dm(host: Host) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(domid: int = DOMID, *mode: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
        proc = subprocess.Popen(
            [sys.executable, "-c", DM_CHILD, str(domid), *mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(XENDMOP_MOCK_SOCKET=host.path),
            cwd=str(REPO),
        )
        procs.append(proc)
        return proc, json.loads(_line(proc))

    yield start
    for proc in procs:
        _reap(proc)


@pytest.fixture
def guest(host: Host) -> Iterator[RemoteGuest]:
    with RemoteGuest(host.path, DOMID, timeout=5.0) as g:
        yield g


# --- across processes ----------------------------------------------------------------------


def test_socket_is_private_and_listed_clients_are_real_processes(host: Host) -> None:
    assert stat.S_IMODE(os.stat(host.path).st_mode) == 0o600
    with RemoteXen(host.path) as xen:
        assert xen.call("ping")["pid"] == host.proc.pid
        assert xen.call("domains") == [0, 1, 2]
        assert [c["pid"] for c in xen.call("clients")] == [os.getpid()]


def test_port_mmio_and_pci_config_served_by_another_process(spawn_dm: Any, guest: RemoteGuest, host: Host) -> None:
    _, ready = spawn_dm()
    assert ready["backend"] == "mock"
    with RemoteXen(host.path) as admin:
        servers = admin.servers(DOMID)
    assert list(servers) == [ready["server"]] and servers[ready["server"]]["enabled"]
    guest.outb(UART + 1, 0x5A)
    assert guest.inb(UART + 1, vcpu=1) == 0x5A  # the second vCPU sees the first one's write
    assert guest.inb(UART + 2) == 0
    guest.mmio_write(MMIO + 0x10, 8, 0x1122334455667788)
    assert guest.mmio_read(MMIO + 0x10, 8) == 0x1122334455667788
    assert guest.mmio_read(MMIO + 0x1000, 4) == 0xFFFFFFFF  # outside every range: nobody claims it
    guest.pci_config_write(SBDF, 0x10, 4, 0xFEBF0000)
    assert guest.pci_config_read(SBDF, 0x10, 4) == 0xFEBF0000
    assert guest.pci_config_read(SBDF + 1, 0x10, 4) == 0xFFFFFFFF  # function 1 is not registered


def test_an_asyncio_device_model_serves_through_the_passed_eventfd(spawn_dm: Any, guest: RemoteGuest) -> None:
    proc, _ = spawn_dm(DOMID, "asyncio")
    guest.outw(UART + 2, 0xBEEF)
    assert guest.inw(UART + 2, vcpu=1) == 0xBEEF
    guest.mmio_write(MMIO, 4, 0x12345678)
    assert guest.mmio_read(MMIO, 4) == 0x12345678
    proc.send_signal(signal.SIGTERM)
    assert json.loads(_line(proc)) == {"signal": signal.SIGTERM}


def test_rep_string_io_in_both_directions(spawn_dm: Any, guest: RemoteGuest) -> None:
    spawn_dm()
    guest.write_ram(0x1000, b"hello")
    guest.rep_outsb(FIFO, 0x1000, 5)
    assert bytes(guest.inb(FIFO) for _ in range(5)) == b"hello"
    guest.rep_outsb(FIFO, 0x1004, 5, df=True)  # from the last byte down
    assert bytes(guest.inb(FIFO) for _ in range(5)) == b"olleh"
    for b in b"xyz":
        guest.outb(FIFO, b)
    guest.rep_insb(FIFO, 0x2002, 3, df=True)  # stored downwards from 0x2002
    assert guest.read_ram(0x2000, 3) == b"zyx"
    for b in b"abc":
        guest.outb(FIFO, b)
    guest.rep_insb(FIFO, 0x2000, 3)
    assert guest.read_ram(0x2000, 4) == b"abc\x00"


def test_buffered_writes_past_the_ring_wrap(spawn_dm: Any, guest: RemoteGuest) -> None:
    spawn_dm()
    total = IOREQ_BUFFER_SLOT_NUM + 150  # the write pointer wraps round the 511-slot ring
    full = 0
    for value in range(1, total + 1):
        while not guest.send_buffered(IOREQ_TYPE_PIO, COUNTER, 4, value):
            full += 1  # ring full: the device model drains it on the event or its 100 ms tick
            time.sleep(0.005)
    # a synchronous access is handled after the ring is drained (handle_events drains first)
    assert guest.inl(COUNTER) == total
    assert guest.inl(COUNTER + 4) == total * (total + 1) // 2


def test_sigkill_leaves_the_server_registered_and_the_vcpu_times_out(spawn_dm: Any, host: Host) -> None:
    proc, ready = spawn_dm()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(TIMEOUT)
    with RemoteXen(host.path) as admin:
        # the host saw the connection close: the DM's evtchn ports are unbound, its server stays (as on Xen)
        wait_for(lambda: len(admin.call("clients")) == 1, TIMEOUT)
        servers = admin.servers(DOMID)
        assert list(servers) == [ready["server"]] and servers[ready["server"]]["enabled"]
        ports = {p[0] for p in admin.snapshot(0)["ports"]}
        assert not ports & set(servers[ready["server"]]["vcpu_ports"])
    with RemoteGuest(host.path, DOMID, timeout=0.5) as guest, pytest.raises(GuestTimeout) as caught:
        guest.inb(UART, vcpu=1)
    assert caught.value.vcpu == 1
    assert caught.value.req.addr == UART and caught.value.req.size == 1
    assert "dom1 vCPU1" in str(caught.value)


def test_sigterm_tears_the_server_down(spawn_dm: Any, host: Host) -> None:
    proc, ready = spawn_dm()
    with RemoteXen(host.path) as admin:
        assert ready["server"] in admin.servers(DOMID)
        proc.send_signal(signal.SIGTERM)
        assert json.loads(_line(proc)) == {"signal": signal.SIGTERM}
        assert proc.wait(TIMEOUT) == 0
        assert admin.servers(DOMID) == {}


# --- shared memory and event channels are real fds --------------------------------------------


def test_mapped_guest_ram_is_the_same_memory_in_both_processes(host: Host, guest: RemoteGuest) -> None:
    with RemoteXen(host.path) as xen, ForeignMemory(xen.open_device) as fmem:
        m = fmem.map(DOMID, [3])
        assert m.ok
        guest.write_ram(3 * PAGE_SIZE + 8, b"from the guest")
        assert bytes(m.view[8:22]) == b"from the guest"  # no ioctl in between: shared pages
        m.view[100:104] = b"dm!!"
        assert guest.read_ram(3 * PAGE_SIZE + 100, 4) == b"dm!!"
        fmem.unmap(m)


def test_evtchn_fd_is_a_real_eventfd_that_select_sees(host: Host) -> None:
    with RemoteXen(host.path) as xen, EventChannel(xen.open_device) as ev:
        assert stat.S_ISREG(os.fstat(ev.fileno()).st_mode) is False
        assert os.readlink(f"/proc/self/fd/{ev.fileno()}") == "anon_inode:[eventfd]"
        local = ev.bind_unbound_port(0)  # dom0 may bind its own unbound port to itself
        peer = ev.bind_interdomain(0, local)
        assert select.select([ev], [], [], 0)[0] == []
        assert ev.pending() is None
        ev.notify(peer)
        assert select.select([ev], [], [], 2)[0] == [ev]
        assert ev.pending() == local
        ev.unmask(local)
        assert ev.pending() is None


# --- a hostile or broken client ----------------------------------------------------------------


def test_bad_pointers_give_efault_and_the_host_survives(host: Host) -> None:
    unmapped = 0x10  # page 0 is never mapped
    with RemoteXen(host.path) as xen:
        dev = xen.open_device(PRIVCMD_PATH)
        with pytest.raises(OSError) as e:
            dev.ioctl(IOCTL_PRIVCMD_DM_OP, privcmd_dm_op(dom=DOMID, num=1, ubufs=unmapped))
        assert e.value.errno == errno.EFAULT
        bufs = (privcmd_dm_op_buf * 1)()
        bufs[0].uptr, bufs[0].size = unmapped, 16
        with pytest.raises(OSError) as e:
            dev.ioctl(IOCTL_PRIVCMD_DM_OP, privcmd_dm_op(dom=DOMID, num=1, ubufs=ctypes.addressof(bufs)))
        assert e.value.errno == errno.EFAULT
        with pytest.raises(OSError) as e:  # the argument itself given as a bad user address
            dev.ioctl(IOCTL_PRIVCMD_DM_OP, unmapped)
        assert e.value.errno == errno.EFAULT
        with pytest.raises(OSError) as e:  # a kernel-half address: refused by access_ok
            dev.ioctl(IOCTL_PRIVCMD_DM_OP, privcmd_dm_op(dom=DOMID, num=1, ubufs=1 << 63))
        assert e.value.errno == errno.EFAULT
        vma = dev.mmap(PAGE_SIZE)
        errs = (ctypes.c_int * 1)()
        anchor = ctypes.c_char.from_buffer(vma)
        batch = privcmd_mmapbatch_v2(
            num=1, dom=DOMID, addr=ctypes.addressof(anchor), arr=unmapped, err=ctypes.addressof(errs)
        )
        del anchor
        with pytest.raises(OSError) as e:
            dev.ioctl(IOCTL_PRIVCMD_MMAPBATCH_V2, batch)
        assert e.value.errno == errno.EFAULT
        vma.close()
        dev.close()
        assert xen.call("ping")["pid"] == host.proc.pid
    with DeviceModel.open("mock", xen=RemoteXen(host.path)) as dm:  # a new client is served
        assert dm.nr_vcpus(DOMID) == 2


def _raw(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    sock.settimeout(TIMEOUT)
    return sock


def _reply(sock: socket.socket) -> tuple[int, int, str]:
    """``(kind, errno or value, message)`` of the host's next reply."""
    data = sock.recv(MAX_MESSAGE + 1)
    kind = struct.unpack_from("<H", data)[0]
    if kind == Msg.ERROR:
        return kind, struct.unpack_from("<i", data, 2)[0], data[6:].decode()
    return kind, struct.unpack_from("<q", data, 2)[0], data[10:].decode(errors="replace")


def test_garbage_oversized_and_unknown_messages_are_refused(host: Host) -> None:
    sock = _raw(host.path)
    try:
        sock.send(b"\x01")
        assert _reply(sock)[:2] == (Msg.ERROR, errno.EPROTO)
        sock.send(struct.pack("<H", 999) + b"junk")
        kind, err, message = _reply(sock)
        assert (kind, err) == (Msg.ERROR, errno.EPROTO) and "unknown request kind 999" in message
        sock.send(struct.pack("<H", Msg.IOCTL) + b"\x01\x02")  # too short for its header
        kind, err, message = _reply(sock)
        assert (kind, err) == (Msg.ERROR, errno.EPROTO) and "IOCTL" in message
        sock.send(struct.pack("<H", Msg.CALL) + b"x" * (MAX_MESSAGE + 10))
        assert _reply(sock)[:2] == (Msg.ERROR, errno.EMSGSIZE)
        sock.send(struct.pack("<H", Msg.CALL) + b"{not json")
        assert _reply(sock)[:2] == (Msg.ERROR, errno.EINVAL)
        sock.send(struct.pack("<H", Msg.CALL) + json.dumps({"op": "format_disk"}).encode())
        kind, err, message = _reply(sock)
        assert err == errno.EINVAL and "'format_disk'" in message
        sock.send(
            struct.pack("<H", Msg.CALL) + json.dumps({"op": "create_domain", "args": {"memory_mb": 1 << 40}}).encode()
        )
        kind, err, message = _reply(sock)
        assert err == errno.EINVAL and "memory_mb" in message
        sock.send(struct.pack("<H", Msg.READ) + struct.pack("<II", 77, 4))
        assert _reply(sock)[:2] == (Msg.ERROR, errno.EBADF)
        sock.send(struct.pack("<H", Msg.OPEN) + b"/dev/xen/gntdev")
        assert _reply(sock)[:2] == (Msg.ERROR, errno.ENOENT)
        sock.send(struct.pack("<H", Msg.OPEN) + b"\xff\xfe")
        assert _reply(sock)[:2] == (Msg.ERROR, errno.EINVAL)
        sock.send(struct.pack("<H", Msg.CALL) + json.dumps({"op": "ping"}).encode())
        kind, _, body = _reply(sock)
        assert kind == Msg.OK and json.loads(body)["ok"]["pid"] == host.proc.pid  # same connection still served
    finally:
        sock.close()
    with RemoteXen(host.path) as xen:
        assert xen.call("domains") == [0, 1, 2]


def test_fds_a_client_sends_are_dropped(host: Host) -> None:
    def host_fds() -> int:
        return len(os.listdir(f"/proc/{host.proc.pid}/fd"))

    sock = _raw(host.path)
    try:
        ping = struct.pack("<H", Msg.CALL) + json.dumps({"op": "ping"}).encode()
        sock.sendmsg([ping])
        assert _reply(sock)[0] == Msg.OK
        before = host_fds()
        mine = [os.open(os.devnull, os.O_RDONLY) for _ in range(8)]
        try:
            for _ in range(20):
                sock.sendmsg([ping], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(mine)}i", *mine))])
                assert _reply(sock)[0] == Msg.OK  # the request is served, its fds are not kept
        finally:
            for fd in mine:
                os.close(fd)
        assert host_fds() == before
    finally:
        sock.close()


def test_a_client_that_stops_answering_is_cut_off_without_holding_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(remote, "MEMORY_TIMEOUT", 0.3)
    with default_host() as xen, MockHostServer(xen, str(tmp_path / "s")).start() as server:
        sock = _raw(server.path)
        sock.send(struct.pack("<H", Msg.OPEN) + PRIVCMD_PATH.encode())
        kind, handle, _ = _reply(sock)
        assert kind == Msg.OK
        arg = bytes(privcmd_dm_op(dom=DOMID, num=1, ubufs=0x1000))
        sock.send(struct.pack("<H", Msg.IOCTL) + struct.pack("<IIBQ", handle, IOCTL_PRIVCMD_DM_OP, 0, 0) + arg)
        data = sock.recv(MAX_MESSAGE)
        assert struct.unpack_from("<H", data)[0] == Msg.MEM_READ  # copy_from_user of the buffer array
        started = time.monotonic()
        done = threading.Event()

        def other_client() -> None:
            with DeviceModel.open("mock", xen=RemoteXen(server.path)) as dm:
                assert dm.nr_vcpus(DOMID) == 2
            done.set()

        t = threading.Thread(target=other_client)
        t.start()
        # we said nothing: our ioctl fails with EFAULT and the host hangs up on us
        assert _reply(sock)[:2] == (Msg.ERROR, errno.EFAULT)
        assert sock.recv(MAX_MESSAGE) == b""
        assert time.monotonic() - started < 5
        t.join(TIMEOUT)
        assert done.is_set()
        sock.close()
        wait_for(lambda: not server.clients(), TIMEOUT)
        assert xen._devices == set()  # its privcmd was released with the connection


def test_evtchn_ports_of_a_dead_client_are_unbound(tmp_path: Path) -> None:
    with default_host() as xen, MockHostServer(xen, str(tmp_path / "s")).start() as server:
        client = RemoteXen(server.path)
        ev = EventChannel(client.open_device)
        port = ev.bind_unbound_port(DOMID)
        assert port in xen.hypervisor.domains[0].ports
        client.close()  # as a crash would: no unbind, no close of the device
        wait_for(lambda: port not in xen.hypervisor.domains[0].ports, TIMEOUT)
        ev.close()  # only our copy of the eventfd is left to close: no error for a vanished host


UNPRIVILEGED_CLIENT = r"""
import errno, json, os, sys
from xendmop.mock.remote import RemoteXen

os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
xen = RemoteXen(sys.argv[1])
got = []
attempts = [lambda: xen.open_device("/dev/xen/privcmd"), lambda: xen.open_device("/dev/xen/evtchn"), xen.create_domain]
for attempt in attempts:
    try:
        attempt()
        got.append(0)
    except OSError as e:
        got.append(e.errno)
got.append(len(xen.call("domains")))
print(json.dumps(got))
"""


def test_open_and_admin_refused_for_an_unprivileged_sender() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")
    with tempfile.TemporaryDirectory() as where:  # pytest's tmp_path is private to root
        os.chmod(where, 0o711)
        _unprivileged_client(os.path.join(where, "s"))


def _unprivileged_client(path: str) -> None:
    with default_host() as xen, MockHostServer(xen, path, mode=0o666).start() as server:
        done = subprocess.run(
            [sys.executable, "-c", UNPRIVILEGED_CLIENT, server.path],
            capture_output=True,
            env=child_env(),
            cwd=str(REPO),
            timeout=TIMEOUT,
        )
        assert done.returncode == 0, done.stderr.decode()
        # device nodes are root's: no new handle; no domain made; reading is allowed
        assert json.loads(done.stdout) == [errno.EACCES, errno.EACCES, errno.EPERM, 3]


# --- the same Xen in or out of process ------------------------------------------------------


def _dmop_script(dm: DeviceModel) -> list[Any]:
    """DMOPs with IN, OUT and MANY buffers, copy-back, and refusals: what each returned or its errno."""
    calls: list[Any] = [
        lambda: dm.create_ioreq_server(DOMID, 2),
        lambda: dm.get_ioreq_server_info(DOMID, 0, gfns=True),
        lambda: dm.map_io_range_to_ioreq_server(DOMID, 0, True, 0xFEB00000, 0xFEB00FFF),
        lambda: dm.map_pcidev_to_ioreq_server(DOMID, 0, 0, 0, 3, 0),
        lambda: dm.set_ioreq_server_state(DOMID, 0, True),
        lambda: dm.set_isa_irq_level(DOMID, 3, 1),
        lambda: dm.set_pci_link_route(DOMID, 1, 10),
        lambda: dm.track_dirty_vram(DOMID, 0x100, 64),
        lambda: dm.modified_memory_bulk(DOMID, [(0x10, 4), (0x40, 1)]),
        lambda: dm.set_mem_type(DOMID, 1, 0x200, 2),
        lambda: dm.create_ioreq_server(2, 0),  # a PV guest: refused
        lambda: dm.nr_vcpus(99),  # no such domain
        lambda: dm.destroy_ioreq_server(DOMID, 5),  # no such server
        lambda: dm.nr_vcpus(DOMID),
    ]
    out: list[Any] = []
    for call in calls:
        try:
            out.append(call())
        except OSError as e:
            out.append(("errno", e.errno, type(e).__name__))
    return out


def test_dmops_over_the_socket_match_the_in_process_mock(host: Host) -> None:
    with default_host() as local, DeviceModel.open("mock", xen=local) as dm:
        expected = _dmop_script(dm)
        expected_state = remote._jsonable(local.domain(DOMID).snapshot())
    with RemoteXen(host.path) as xen, DeviceModel.open("mock", xen=xen) as dm:
        assert _dmop_script(dm) == expected
        state = xen.snapshot(DOMID)
    expected_state.pop("p2m")
    assert state == expected_state
    assert ("errno", errno.ESRCH, "XenProcessLookupError") in expected  # the script does reach refusals
