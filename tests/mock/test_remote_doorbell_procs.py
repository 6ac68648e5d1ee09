"""The NOTIFY doorbell with the device model in a real child process: served accesses go through
the doorbell; a device model killed while a vCPU waits on its doorbell leaves the vCPU to time
out (nothing completes it); SIGTERM tears the server down with the doorbell in use."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xendmop.mock import MockXen
from xendmop.mock.evtchn import DOORBELL_CONS, DOORBELL_PROD, DOORBELL_WANTED
from xendmop.mock.remote import ENV_SOCKET, MockHostServer
from xendmop.mock.simguest import GuestTimeout, SimGuest

from .remote_helpers import REPO, child_env

TIMEOUT = 10.0
PORT = 0x3F8

DM_CHILD = """
import json, select, sys, time
from xendmop import DeviceModel
from xendmop.mock.remote import connect_from_env
from xendmop.runtime.server import IoreqServer, ServeLoop

class Regs:
    def __init__(self):
        self.values = {}
    def read(self, off, size):
        return self.values.get(off, 0)
    def write(self, off, size, value):
        self.values[off] = value

xen = connect_from_env()
dm = DeviceModel.open("mock", xen=xen)
server = IoreqServer(dm, int(sys.argv[1]), opener=xen.open_device)
server.add_port_range(0x3F8, 0x3FF, Regs(), "regs")
server.start()
print(json.dumps({"server": server.id, "port": server.vcpu_ports[0]}), flush=True)
if sys.argv[2] == "stall":  # take the event, never answer
    select.select([server.fileno()], [], [])
    print(json.dumps({"event": True}), flush=True)
    time.sleep(60)
else:
    print(json.dumps({"signal": ServeLoop(server).run()}), flush=True)
"""


class Host:
    def __init__(self, tmp_path: Path) -> None:
        self.xen = MockXen()
        self.domid = self.xen.create_domain(vcpus=1, hvm=True, memory_mb=4)
        self.server = MockHostServer(self.xen, str(tmp_path / "xen.sock")).start()
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, mode: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
        env = child_env(**{ENV_SOCKET: self.server.path})
        proc = subprocess.Popen(
            [sys.executable, "-c", DM_CHILD, str(self.domid), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=str(REPO),
        )
        self.procs.append(proc)
        return proc, line(proc)

    def bell_words(self) -> Any:
        (conn,) = self.server.clients()
        (dev,) = conn._bells
        return dev._shared._words

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(TIMEOUT)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self.server.close()
        self.xen.close()


def line(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
    if not ready:
        proc.kill()
        pytest.fail("the device model said nothing in time")
    text = proc.stdout.readline().decode()
    if not text:
        proc.wait(TIMEOUT)
        pytest.fail(f"the device model exited with {proc.returncode}: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
    return dict(json.loads(text))


def wait_for(predicate: Any) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path)
    try:
        yield h
    finally:
        h.close()


def test_a_device_model_killed_while_the_vcpu_waits_on_its_doorbell_leaves_a_timeout(host: Host) -> None:
    proc, ready = host.spawn("stall")
    guest = SimGuest(host.xen, host.domid, timeout=1.0)
    out: list[Any] = []

    def access() -> None:
        try:
            out.append(guest.inb(PORT))
        except GuestTimeout as e:
            out.append(e)

    vcpu = threading.Thread(target=access, daemon=True)
    vcpu.start()
    line(proc)  # the device model has the event; the vCPU waits on the doorbell
    assert host.bell_words()[DOORBELL_WANTED + ready["port"]] == 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(TIMEOUT)
    wait_for(lambda: not host.server.clients())  # its devices are closed
    assert host.xen.shared_evtchn_rings == 0  # accesses look for no doorbell any more
    vcpu.join(TIMEOUT)
    assert isinstance(out[0], GuestTimeout) and out[0].vcpu == 0
    with host.xen.lock:
        assert host.xen.domain(host.domid).server(ready["server"]) is not None  # stays registered, as on Xen
    assert not [e for e in host.xen.events if e.request == "IOCTL_EVTCHN_NOTIFY"]  # nothing completed it


def test_sigterm_tears_the_server_down_with_the_doorbell_in_use(host: Host) -> None:
    proc, ready = host.spawn("serve")
    guest = SimGuest(host.xen, host.domid, timeout=TIMEOUT)
    for value in range(10):
        guest.outb(PORT, value)
        assert guest.inb(PORT) == value
    words = host.bell_words()
    assert words[DOORBELL_PROD] == words[DOORBELL_CONS] == 20  # every NOTIFY by the doorbell
    proc.send_signal(signal.SIGTERM)
    assert line(proc) == {"signal": signal.SIGTERM}
    assert proc.wait(TIMEOUT) == 0
    with host.xen.lock:
        assert host.xen.domain(host.domid).server(ready["server"]) is None
    assert guest.inb(PORT) == 0xFF  # no server: Xen's null handler
    wait_for(lambda: not host.server.clients())
