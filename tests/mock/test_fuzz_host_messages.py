"""Issue 17's fuzz, mock-host part: hostile clients send random and half-valid messages (ioctls
by address and by value, copies answered wrongly, late or never, idle connections) while a
well-behaved client keeps calling.  The good client is never failed, disconnected or held up
by another's stall; afterwards the host's fds, threads and RSS are back where they were.

Seeded (``XENDMOP_FUZZ_SEED``) and bounded (``XENDMOP_FUZZ_SECONDS``)."""

from __future__ import annotations

import gc
import json
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from xendmop import DeviceModel
from xendmop.abi import evtchn as evtchn_abi
from xendmop.abi import privcmd as privcmd_abi
from xendmop.mock import default_host
from xendmop.mock.remote import MAX_MESSAGE, MockHostServer, Msg, RemoteXen
from xendmop.mock.remote import server as remote

from .remote_helpers import wait_for

SEED = int(os.environ.get("XENDMOP_FUZZ_SEED", "17"))
SECONDS = float(os.environ.get("XENDMOP_FUZZ_SECONDS", "5"))
DOMID = 1
HOSTILE = 4  # clients at once
MAX_CLIENTS = 12  # the host's places: idle connections try to take all but the good client's
#: the good client's slowest call allowed: well below MEMORY_TIMEOUT, which a stall used to cost it
GOOD_LATENCY = 0.5

REQUESTS = [
    privcmd_abi.IOCTL_PRIVCMD_HYPERCALL,
    privcmd_abi.IOCTL_PRIVCMD_DM_OP,
    privcmd_abi.IOCTL_PRIVCMD_RESTRICT,
    privcmd_abi.IOCTL_PRIVCMD_MMAP_RESOURCE,
    privcmd_abi.IOCTL_PRIVCMD_MMAPBATCH_V2,
    evtchn_abi.IOCTL_EVTCHN_BIND_UNBOUND_PORT,
    evtchn_abi.IOCTL_EVTCHN_BIND_INTERDOMAIN,
    evtchn_abi.IOCTL_EVTCHN_NOTIFY,
    evtchn_abi.IOCTL_EVTCHN_UNBIND,
    0x12345678,
]
CALLS = ["ping", "domains", "servers", "snapshot", "gsi_level", "events", "clients", "nope"]
PATHS = [b"/dev/xen/privcmd", b"/dev/xen/evtchn", b"/dev/xen/hypercall", b"/etc/passwd", b"\xff", b""]


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MockHostServer]:
    monkeypatch.setattr(remote, "MEMORY_TIMEOUT", 1.5)
    monkeypatch.setattr(remote, "IDLE_TIMEOUT", 0.5, raising=False)  # raising: absent before the bound
    monkeypatch.setattr(remote, "MAX_CLIENTS", MAX_CLIENTS)
    with default_host() as xen, MockHostServer(xen, str(tmp_path / "xen.sock")).start() as s:
        yield s


def _num(rng: random.Random) -> int:
    return rng.choice([0, 1, 2, 16, 17, 4096, 2**31 + 1, 2**32 - 1, 0x10000 | DOMID, 0x7000_0000_0000, 2**64 - 1])


def _message(rng: random.Random, handles: list[int]) -> bytes:
    kind = rng.choice([*list(Msg)[:12], Msg.OK, 99, 0])
    handle = rng.choice(handles) if handles and rng.random() < 0.9 else rng.randrange(1 << 32)
    if kind == Msg.OPEN:
        body = rng.choice(PATHS)
    elif kind in (Msg.IOCTL, Msg.IOCTL_POSTED):
        by_address = rng.random() < 0.4
        arg = b"" if by_address else b"".join(struct.pack("<Q", _num(rng)) for _ in range(rng.randrange(7)))
        addr = rng.choice([0x7000_0000_0000, 0x10, 2**47 - 8, 0]) if by_address else 0
        body = struct.pack("<IIBQ", handle, rng.choice(REQUESTS), by_address, addr) + arg
    elif kind == Msg.MMAP:
        body = struct.pack("<IQQQ", handle, rng.choice([0x7000_0000_0000, 1, 2**47]), _num(rng) % 2**64, 0)
    elif kind == Msg.CALL:
        body = json.dumps({"op": rng.choice(CALLS), "args": {"domid": rng.choice([0, DOMID, 99]), "gsi": 3}}).encode()
    else:
        body = struct.pack("<I", handle) + rng.randbytes(rng.randrange(12))
    return struct.pack("<H", kind) + (body if rng.random() < 0.9 else body[: rng.randrange(len(body) + 1)])


def _hostile(path: str, rng: random.Random, stop: threading.Event, errors: list[str]) -> None:
    """One hostile client after another: requests, and copies answered at random or never."""
    while not stop.is_set():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(path)
            sock.settimeout(3)
            handles: list[int] = []
            while not stop.is_set():
                message = _message(rng, handles)
                sock.send(message)
                if message[:2] in (struct.pack("<H", k) for k in (Msg.WRITE_POSTED, Msg.IOCTL_POSTED, Msg.KICK_POSTED)):
                    continue  # answered with nothing
                while True:  # its copies, then its reply
                    data = sock.recv(MAX_MESSAGE + 1)
                    if not data:
                        raise ConnectionResetError("cut off")
                    kind = struct.unpack_from("<H", data)[0]
                    if kind == Msg.OK and message[:2] == struct.pack("<H", Msg.OPEN):
                        handles.append(struct.unpack_from("<q", data, 2)[0])
                    if kind in (Msg.OK, Msg.ERROR):
                        break
                    choice = rng.random()
                    if choice < 0.05:
                        stop.wait(rng.choice([0.2, 2.0]))  # late, or a stall past MEMORY_TIMEOUT
                    if choice < 0.1:
                        sock.send(rng.randbytes(rng.randrange(8)))  # out of step
                        continue
                    n = struct.unpack_from("<QQ", data, 2)[1] if kind in (Msg.MEM_READ, Msg.MEM_CHECK) else 0
                    err = rng.choice([0, 0, 0, 14, 12])
                    data = bytes(n) if not err and kind == Msg.MEM_READ else b""
                    sock.send(struct.pack("<Hi", Msg.MEM_REPLY, err) + data)
        except (OSError, struct.error):
            pass  # cut off by the host (or refused at connect): the next one
        except Exception as e:  # the test's own bug
            errors.append(repr(e))
            return
        finally:
            sock.close()


def test_fuzz_mock_host_messages(server: MockHostServer) -> None:
    rng = random.Random(SEED)
    proc = psutil.Process()
    good_latency: list[float] = []
    good_errors: list[str] = []
    stop = threading.Event()
    errors: list[str] = []
    with RemoteXen(server.path) as good, DeviceModel.open("mock", xen=good) as dm:
        assert dm.nr_vcpus(DOMID) == 2
        gc.collect()
        fds, threads, rss = proc.num_fds(), threading.active_count(), proc.memory_info().rss
        hostile = [
            threading.Thread(target=_hostile, args=(server.path, random.Random(rng.random()), stop, errors))
            for _ in range(HOSTILE)
        ]
        idle = []
        for t in hostile:
            t.start()
        started = time.monotonic()
        while time.monotonic() - started < SECONDS:
            if len(idle) < MAX_CLIENTS - 1 and rng.random() < 0.1:  # connections that never say anything
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.connect(server.path)
                idle.append(s)
            t0 = time.monotonic()
            try:
                assert dm.nr_vcpus(DOMID) == 2
            except Exception as e:
                good_errors.append(repr(e))
            good_latency.append(time.monotonic() - t0)
            time.sleep(0.01)
        stop.set()
        for t in hostile:
            t.join(10)
        for _ in range(MAX_CLIENTS):  # every place left taken by a silent connection
            if len(server.clients()) >= MAX_CLIENTS:
                break
            before = len(server.clients())
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(server.path)
            idle.append(s)
            until = time.monotonic() + 1
            while len(server.clients()) == before and time.monotonic() < until:
                time.sleep(0.01)  # accepted (or closed at once: then the loop ends full)
        late: list[int] = []

        def newcomer() -> bool:  # a new client is served once the idle ones are closed
            try:
                with RemoteXen(server.path) as x, DeviceModel.open("mock", xen=x) as other:
                    late.append(other.nr_vcpus(DOMID))
            except OSError:
                return False
            return True

        wait_for(newcomer, 10)
        for s in idle:
            s.close()
        assert not errors, errors
        assert good_errors == [], good_errors[:3]
        assert max(good_latency) < GOOD_LATENCY, f"the good client waited {max(good_latency):.2f} s"
        wait_for(lambda: len(server.clients()) == 1, 15)  # only the good client is left
        assert dm.nr_vcpus(DOMID) == 2
        wait_for(lambda: threading.active_count() <= threads, 10)
        assert proc.num_fds() <= fds, "the host kept fds of its gone clients"
        gc.collect()
        assert proc.memory_info().rss - rss < 48 << 20, "RSS grew"
    assert len(good_latency) > 50
