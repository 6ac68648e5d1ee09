"""The mock host process over many clients' lifetimes: what a client leaves behind when it
closes or is killed (fds, threads), two clients hammering it at once, and its stop with
clients still connected.  The host is a real ``xendmop mock-host`` process, measured with psutil."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from xendmop import DeviceModel
from xendmop.abi.privcmd import IOCTL_PRIVCMD_DM_OP, privcmd_dm_op
from xendmop.backends.device import PRIVCMD_PATH
from xendmop.mock.remote import MAX_MESSAGE, Msg, RemoteGuest, RemoteXen
from xendmop.runtime.evtchn import EventChannel

from .remote_helpers import REPO, child_env, start_mock_host, wait_for

TIMEOUT = 20.0
DOMID = 1
PORT = 0x3F8

# Forks one client per line of stdin ("close DOMID" or "kill DOMID"), each opening privcmd and
# evtchn, creating an ioreq server whose pages it maps and whose ports it binds, and mapping
# guest RAM.  A "close" client tears all that down and exits; a "kill" one says "ready" and
# waits for SIGKILL.  Forked from one process: fifty clients without fifty interpreter starts.
CLIENTS = r"""
import json, os, signal, sys
from xendmop import DeviceModel
from xendmop.mock.remote import RemoteXen
from xendmop.runtime.foreignmemory import ForeignMemory
from xendmop.runtime.server import IoreqServer
from xendmop.types import BufIoreq



class Regs:
    def read(self, off, size):
        return 0

    def write(self, off, size, value):
        pass


def client(domid, clean):
    xen = RemoteXen(sys.argv[1])
    dm = DeviceModel.open("mock", xen=xen)
    server = IoreqServer(dm, domid, opener=xen.open_device, bufioreq=BufIoreq.LEGACY)
    server.add_port_range(0x3F8, 0x3FF, Regs(), "regs")
    server.start()
    fmem = ForeignMemory(xen.open_device)
    mapping = fmem.map(domid, [1, 2, 3])
    assert mapping.ok
    if clean:
        fmem.unmap(mapping)
        fmem.close()
        server.close()
        dm.close()
        xen.close()
        return
    os.write(1, b"ready\n")
    while True:
        signal.pause()


for line in sys.stdin:
    mode, domid = line.split()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.dup2(w, 1)
        code = 0
        try:
            client(int(domid), mode == "close")
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 3
        os._exit(code)
    os.close(w)
    if mode == "kill":
        ready = os.read(r, 64)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(r)
    print(json.dumps({"mode": mode, "status": status}), flush=True)
"""


@dataclass
class Host:
    path: str
    proc: subprocess.Popen[bytes]
    ps: psutil.Process

    def counts(self) -> tuple[int, int]:
        """(open fds, threads) of the host process."""
        return self.ps.num_fds(), self.ps.num_threads()


def _start_host(path: str) -> subprocess.Popen[bytes]:
    proc = start_mock_host(path)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    assert f"listening on {path}" in line, proc.stderr.read().decode() if proc.stderr else line
    return proc


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(TIMEOUT)
    for stream in (proc.stdout, proc.stderr, proc.stdin):
        if stream is not None:
            stream.close()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    path = str(tmp_path / "xen.sock")
    proc = _start_host(path)
    try:
        yield Host(path, proc, psutil.Process(proc.pid))
    finally:
        _reap(proc)


def _settles(host: Host, want: tuple[int, int], timeout: float = TIMEOUT) -> tuple[int, int]:
    """Poll the host's counts until they equal ``want`` or the deadline passes; the last seen."""
    deadline = time.monotonic() + timeout
    got = host.counts()
    while got != want and time.monotonic() < deadline:
        time.sleep(0.05)
        got = host.counts()
    return got


# --- 1. what a client leaves behind ---------------------------------------------------------


def test_fifty_clients_closed_or_killed_leave_no_fd_and_no_thread(host: Host) -> None:
    with RemoteXen(host.path) as admin:
        admin.call("ping")  # our own connection is part of the baseline
        baseline = host.counts()
        worker = subprocess.Popen(
            [sys.executable, "-c", CLIENTS, host.path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
            cwd=str(REPO),
        )
        try:
            assert worker.stdin is not None and worker.stdout is not None
            grew = 0
            for i in range(50):
                domid = admin.create_domain(vcpus=2, memory_mb=4)
                mode = "kill" if i % 2 else "close"
                worker.stdin.write(f"{mode} {domid}\n".encode())
                worker.stdin.flush()
                done = json.loads(worker.stdout.readline() or b"null")
                assert done == {"mode": mode, "status": 9 if mode == "kill" else 0}, (
                    worker.stderr.read().decode() if done is None and worker.stderr else done
                )
                if mode == "kill":  # its server outlives it, as on Xen: the measure sees its pages
                    grew = max(grew, host.counts()[0] - baseline[0])
                wait_for(lambda: len(admin.call("clients")) == 1, TIMEOUT)
                admin.destroy_domain(domid)  # its ioreq servers and RAM go with it
        finally:
            if worker.stdin is not None:
                worker.stdin.close()
            _reap(worker)
        assert grew > 0, "a killed client's server left nothing the fd count could see"
        assert _settles(host, baseline) == baseline


def test_clients_dropping_mid_request_or_spamming_fds_leave_nothing(host: Host) -> None:
    """Raw clients that hang up while the host waits for their memory, that open evtchn and
    vanish, or that attach 253 fds (SCM_MAX_FD) to every message, including a memory reply."""
    with RemoteXen(host.path) as admin:
        admin.call("ping")
        baseline = host.counts()
        spam = [os.open(os.devnull, os.O_RDONLY) for _ in range(253)]
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(spam)}i", *spam))]
        try:
            for _ in range(10):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                sock.connect(host.path)
                sock.settimeout(TIMEOUT)
                sock.sendmsg([struct.pack("<H", Msg.OPEN) + PRIVCMD_PATH.encode()], rights)
                data = sock.recv(MAX_MESSAGE)
                handle = struct.unpack_from("<q", data, 2)[0]
                sock.sendmsg([struct.pack("<H", Msg.OPEN) + b"/dev/xen/evtchn"], rights)
                assert struct.unpack_from("<H", sock.recv(MAX_MESSAGE))[0] == Msg.OK
                arg = bytes(privcmd_dm_op(dom=DOMID, num=1, ubufs=0x1000))
                head = struct.pack("<IIBQ", handle, IOCTL_PRIVCMD_DM_OP, 0, 0)
                sock.sendmsg([struct.pack("<H", Msg.IOCTL) + head + arg], rights)
                assert struct.unpack_from("<H", sock.recv(MAX_MESSAGE))[0] == Msg.MEM_READ
                bufs = struct.pack("<QQ", 0x2000, 32)  # bufs[0]: 32 bytes at 0x2000
                sock.sendmsg([struct.pack("<Hi", Msg.MEM_REPLY, 0) + bufs], rights)  # a memory reply with fds
                assert struct.unpack_from("<H", sock.recv(MAX_MESSAGE))[0] == Msg.MEM_CHECK  # pinning it next
                sock.close()  # gone while the host waits for that answer
        finally:
            for fd in spam:
                os.close(fd)
        wait_for(lambda: len(admin.call("clients")) == 1, TIMEOUT)
        assert _settles(host, baseline) == baseline


# --- 3. two clients at once -----------------------------------------------------------------


def test_two_clients_hammering_notify_and_dm_op_finish_without_deadlock(host: Host) -> None:
    errors: list[BaseException] = []
    done = [0, 0]

    def hammer(index: int) -> None:
        try:
            with RemoteXen(host.path) as xen, DeviceModel.open("mock", xen=xen) as dm:
                with EventChannel(xen.open_device) as ev:
                    local = ev.bind_unbound_port(0)
                    peer = ev.bind_interdomain(0, local)
                    for i in range(500):
                        ev.notify(peer)  # posted
                        assert dm.nr_vcpus(DOMID) == 2  # a DM_OP with its copy requests
                        dm.set_isa_irq_level(DOMID, 3 + index, i & 1)
                        port = ev.pending()
                        if port is not None:
                            assert port == local
                            ev.unmask(local)
                        done[index] += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"deadlock: {done} of 500 done"
    assert not errors, errors
    assert done == [500, 500]
    with RemoteXen(host.path) as xen:
        assert xen.call("ping")["pid"] == host.proc.pid


# --- 4. stop with clients connected ---------------------------------------------------------


def test_sigterm_with_busy_clients_exits_zero_and_removes_the_socket(host: Host) -> None:
    """Clients left connected at SIGTERM: idle ones, one whose ioctl waits for its memory, and
    one guest access per vCPU waiting for a device model that never answers (60 s timeouts)."""
    idle = [RemoteXen(host.path) for _ in range(3)]
    with RemoteXen(host.path) as dmx, DeviceModel.open("mock", xen=dmx) as dm:
        server = dm.create_ioreq_server(DOMID, 0)
        dm.map_io_range_to_ioreq_server(DOMID, server, False, PORT, PORT)
        dm.get_ioreq_server_info(DOMID, server, gfns=True)  # its ioreq pages are made
        dm.set_ioreq_server_state(DOMID, server, True)  # nobody serves it: accesses wait
    for x in idle:
        x.call("ping")
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stuck.connect(host.path)
    stuck.settimeout(TIMEOUT)
    stuck.send(struct.pack("<H", Msg.OPEN) + PRIVCMD_PATH.encode())
    handle = struct.unpack_from("<q", stuck.recv(MAX_MESSAGE), 2)[0]
    head = struct.pack("<IIBQ", handle, IOCTL_PRIVCMD_DM_OP, 0, 0)
    stuck.send(struct.pack("<H", Msg.IOCTL) + head + bytes(privcmd_dm_op(dom=DOMID, num=1, ubufs=0x1000)))
    assert struct.unpack_from("<H", stuck.recv(MAX_MESSAGE))[0] == Msg.MEM_READ  # never answered
    guests = [RemoteGuest(host.path, DOMID, timeout=60) for _ in range(2)]  # dom1 has 2 vCPUs
    outcomes: list[object] = []

    def access(guest: RemoteGuest, vcpu: int) -> None:
        try:
            outcomes.append(guest.inb(PORT, vcpu=vcpu))
        except BaseException as e:
            outcomes.append(e)

    waiting = [threading.Thread(target=access, args=(g, i), daemon=True) for i, g in enumerate(guests)]
    for t in waiting:
        t.start()
    try:
        wait_for(lambda: len(idle[0].call("clients")) == 3 + 1 + 2, TIMEOUT)
        time.sleep(0.2)  # the accesses are in their wait
        assert outcomes == [], outcomes
        started = time.monotonic()
        host.proc.send_signal(signal.SIGTERM)
        assert host.proc.wait(15) == 0
        took = time.monotonic() - started
        assert not os.path.exists(host.path), "the socket outlived the host"
        assert took < 10, f"stopping took {took:.1f}s"
        for t in waiting:
            t.join(TIMEOUT)
        assert len(outcomes) == 2  # each access ended (with an error: the host went away)
    finally:
        stuck.close()
        for g in guests:
            g.close()
        for x in idle:
            x.close()


# --- the host out of fds ----------------------------------------------------------------------


def _low_fd_limit() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


def test_out_of_fds_the_host_waits_for_one_instead_of_spinning(tmp_path: Path) -> None:
    """A client that opens devices until the host has no fd left: a new connection cannot be
    accepted (EMFILE) and stays queued.  The host refused the opens cleanly, does not spin on
    its readable listener meanwhile, and serves the queued client once an fd is free."""
    path = str(tmp_path / "xen.sock")
    proc = start_mock_host(path, preexec_fn=_low_fd_limit)
    try:
        assert proc.stdout is not None
        assert f"listening on {path}" in proc.stdout.readline().decode()
        with RemoteXen(path) as hog:
            devices = []
            with pytest.raises(OSError) as e:
                for _ in range(64):
                    devices.append(hog.open_device(PRIVCMD_PATH))
            assert e.value.errno == errno.EMFILE
            queued = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                queued.connect(path)  # in the listener's backlog: the host cannot accept it
                queued.settimeout(TIMEOUT)
                queued.send(struct.pack("<H", Msg.CALL) + json.dumps({"op": "ping"}).encode())
                ps = psutil.Process(proc.pid)
                time.sleep(0.3)
                before = sum(ps.cpu_times()[:2])
                time.sleep(1.0)
                spent = sum(ps.cpu_times()[:2]) - before
                assert spent < 0.3, f"the host spent {spent:.2f}s of CPU in 1s waiting for an fd"
                devices.pop().close()  # one fd free: the queued client is accepted and served
                reply = queued.recv(MAX_MESSAGE)
                assert struct.unpack_from("<H", reply)[0] == Msg.OK
                assert json.loads(reply[10:])["ok"]["pid"] == proc.pid
            finally:
                queued.close()
            for dev in devices:
                dev.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    finally:
        _reap(proc)
