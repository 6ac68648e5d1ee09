"""Issue 17 items 1 and 2: one client of the mock host cannot starve or disconnect another,
whether it stalls inside an ioctl's copies or just holds connections open."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xendmop import DeviceModel
from xendmop.abi.privcmd import IOCTL_PRIVCMD_DM_OP
from xendmop.backends.device import PRIVCMD_PATH
from xendmop.mock import default_host
from xendmop.mock.remote import MAX_MESSAGE, MockHostServer, Msg, RemoteXen
from xendmop.mock.remote import server as remote

from .remote_helpers import wait_for

DOMID = 1
TIMEOUT = 20.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MockHostServer]:
    with default_host() as xen, MockHostServer(xen, str(tmp_path / "xen.sock")).start() as s:
        yield s


def _raw(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    sock.settimeout(TIMEOUT)
    return sock


def _stall_in_a_dm_op(path: str) -> socket.socket:
    """A client whose DM_OP (argument by address) waits for a copy it never answers."""
    sock = _raw(path)
    sock.send(struct.pack("<H", Msg.OPEN) + PRIVCMD_PATH.encode())
    handle = struct.unpack_from("<q", sock.recv(MAX_MESSAGE), 2)[0]
    sock.send(struct.pack("<H", Msg.IOCTL) + struct.pack("<IIBQ", handle, IOCTL_PRIVCMD_DM_OP, 1, 0x7000_0000_0000))
    assert struct.unpack_from("<H", sock.recv(MAX_MESSAGE))[0] == Msg.MEM_READ  # never answered
    return sock


def test_stalling_clients_neither_delay_nor_disconnect_a_good_one(
    server: MockHostServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two clients stall inside a DM_OP's copy request, one after the other: a good client's
    calls meanwhile take their own time (they took MEMORY_TIMEOUT each, and then the good
    client's own copy deadline had passed: it was cut off, EPIPE for good)."""
    monkeypatch.setattr(remote, "MEMORY_TIMEOUT", 1.5)
    with RemoteXen(server.path) as good, DeviceModel.open("mock", xen=good) as dm:
        assert dm.nr_vcpus(DOMID) == 2
        stalled = [_stall_in_a_dm_op(server.path)]
        took: list[float] = []

        def calls() -> None:
            for _ in range(5):
                started = time.monotonic()
                assert dm.nr_vcpus(DOMID) == 2
                took.append(time.monotonic() - started)

        worker = threading.Thread(target=calls)
        worker.start()
        time.sleep(0.3)
        stalled.append(_stall_in_a_dm_op(server.path))  # a second one while the first still stalls
        worker.join(TIMEOUT)
        try:
            assert len(took) == 5 and max(took) < 0.5, took
            wait_for(lambda: len(server.clients()) == 1, TIMEOUT)  # both stallers cut off
            assert dm.nr_vcpus(DOMID) == 2  # and the good client still served
        finally:
            for s in stalled:
                s.close()


def test_a_client_waiting_for_the_host_lock_is_not_charged_for_it(
    server: MockHostServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy deadline counts the client's own answering time: a DM_OP that waited behind
    another client's long (but answered) ioctl still gets its copies served."""
    monkeypatch.setattr(remote, "MEMORY_TIMEOUT", 0.5)
    with RemoteXen(server.path) as good, DeviceModel.open("mock", xen=good) as dm:
        with server.xen.lock:  # another request holding the host lock for longer than the deadline
            worker = threading.Thread(target=lambda: took.append(dm.nr_vcpus(DOMID)))
            took: list[int] = []
            worker.start()
            time.sleep(1.0)
        worker.join(TIMEOUT)
        assert took == [2]
        assert dm.nr_vcpus(DOMID) == 2


def _ping(sock: socket.socket) -> bool:
    sock.send(struct.pack("<H", Msg.CALL) + json.dumps({"op": "ping"}).encode())
    data = sock.recv(MAX_MESSAGE)
    return struct.unpack_from("<H", data)[0] == Msg.OK


def test_idle_connections_are_closed_and_new_clients_served(
    server: MockHostServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MAX_CLIENTS connections that send nothing locked every new client out for good."""
    monkeypatch.setattr(remote, "IDLE_TIMEOUT", 0.5)
    monkeypatch.setattr(remote, "MAX_CLIENTS", 4)
    idle = [_raw(server.path) for _ in range(4)]
    try:
        wait_for(lambda: len(server.clients()) == 0, TIMEOUT)
        for s in idle:
            assert s.recv(MAX_MESSAGE) == b""  # closed by the host
        with RemoteXen(server.path) as late, DeviceModel.open("mock", xen=late) as dm:
            assert dm.nr_vcpus(DOMID) == 2
            time.sleep(1.0)  # a client with open devices is not idle: it keeps its handles
            assert dm.nr_vcpus(DOMID) == 2
    finally:
        for s in idle:
            s.close()


def test_one_uid_cannot_take_every_client_place(server: MockHostServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "MAX_CLIENTS", 6)
    monkeypatch.setattr(remote, "MAX_CLIENTS_PER_UID", 3)
    socks = [_raw(server.path) for _ in range(3)]
    try:
        assert all(_ping(s) for s in socks)
        extra = _raw(server.path)  # a fourth from the same uid: closed at once
        try:
            try:
                extra.send(struct.pack("<H", Msg.CALL) + json.dumps({"op": "ping"}).encode())
                assert extra.recv(MAX_MESSAGE) == b""
            except (BrokenPipeError, ConnectionResetError):
                pass
        finally:
            extra.close()
        assert len(server.clients()) == 3
        socks.pop().close()
        wait_for(lambda: len(server.clients()) == 2, TIMEOUT)
        socks.append(_raw(server.path))  # a place of that uid is free again
        assert _ping(socks[-1])
    finally:
        for s in socks:
            s.close()
