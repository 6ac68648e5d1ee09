"""What a hostile client of the mock host can make it allocate or wait for: every length it
sends is bounded before the host acts on it, and a refusal is one error on that connection
(the host and its other clients go on)."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xendmop import DeviceModel
from xendmop.abi.privcmd import IOCTL_PRIVCMD_DM_OP, IOCTL_PRIVCMD_MMAPBATCH_V2, privcmd_dm_op, privcmd_mmapbatch_v2
from xendmop.backends.device import HYPERCALL_PATH, PAGE_SIZE, PRIVCMD_PATH
from xendmop.mock import default_host
from xendmop.mock.remote import MAX_MESSAGE, MockHostServer, Msg, RemoteGuest, RemoteXen
from xendmop.mock.remote import server as remote

from .remote_helpers import wait_for

DOMID = 1
TIMEOUT = 20.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MockHostServer]:
    """A mock host served from this process (its connections can be looked at)."""
    with default_host() as xen, MockHostServer(xen, str(tmp_path / "xen.sock")).start() as s:
        yield s


def _raw(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    sock.settimeout(TIMEOUT)
    return sock


def _reply(sock: socket.socket) -> tuple[int, int, bytes]:
    """``(kind, errno or value, rest)`` of the host's next message."""
    data = sock.recv(MAX_MESSAGE + 1)
    assert data, "the host hung up"
    kind = struct.unpack_from("<H", data)[0]
    if kind == Msg.ERROR:
        return kind, struct.unpack_from("<i", data, 2)[0], data[6:]
    if kind == Msg.OK:
        return kind, struct.unpack_from("<q", data, 2)[0], data[10:]
    return kind, 0, data[2:]


def _request(sock: socket.socket, kind: Msg, body: bytes) -> tuple[int, int, bytes]:
    sock.send(struct.pack("<H", kind) + body)
    return _reply(sock)


def _ping(sock: socket.socket) -> bool:
    kind, _, body = _request(sock, Msg.CALL, json.dumps({"op": "ping"}).encode())
    return kind == Msg.OK and json.loads(body)["ok"]["pid"] == os.getpid()


def _others_are_served(path: str) -> None:
    with DeviceModel.open("mock", xen=RemoteXen(path)) as dm:
        assert dm.nr_vcpus(DOMID) == 2


def test_an_mmapbatch_count_past_the_copy_bound_gathers_no_more_than_gather_max(server: MockHostServer) -> None:
    """MMAPBATCH_V2 with num = 2**31 (privcmd accepts it) would have the host gather 16 GiB of
    frame numbers from the client.  As Linux's gather_array, the host copies the array in order
    (over a short array Linux answers EFAULT where it ends: the lab's "raw mmapbatch array
    bounds"), but never more than GATHER_MAX bytes (then ENOMEM); the connection is kept."""
    from xendmop.mock.privcmd import GATHER_MAX

    sock = _raw(server.path)
    try:
        kind, handle, _ = _request(sock, Msg.OPEN, PRIVCMD_PATH.encode())
        assert kind == Msg.OK
        vma = 0x7000_0000_0000
        assert _request(sock, Msg.MMAP, struct.pack("<IQQQ", handle, vma, PAGE_SIZE, 0))[0] == Msg.OK
        batch = privcmd_mmapbatch_v2(num=1 << 31, dom=DOMID, addr=vma, arr=0x7100_0000_0000, err=0x7200_0000_0000)
        head = struct.pack("<IIBQ", handle, IOCTL_PRIVCMD_MMAPBATCH_V2, 0, 0)
        for answer in ("fault", "zeros"):
            sock.send(struct.pack("<H", Msg.IOCTL) + head + bytes(batch))
            asked = 0
            while True:
                kind, err, rest = _reply(sock)
                if kind != Msg.MEM_READ:
                    break
                n = struct.unpack_from("<QQ", rest)[1]
                asked += n
                if answer == "fault":  # the array ends here
                    sock.send(struct.pack("<Hi", Msg.MEM_REPLY, errno.EFAULT))
                else:
                    sock.send(struct.pack("<Hi", Msg.MEM_REPLY, 0) + bytes(n))
            assert kind == Msg.ERROR
            if answer == "fault":
                assert err == errno.EFAULT and asked <= remote._CHUNK
            else:  # gather_array's answer when it cannot have the pages for the array
                assert err == errno.ENOMEM and asked <= GATHER_MAX
            assert _ping(sock)
    finally:
        sock.close()
    _others_are_served(server.path)


def test_hostile_lengths_in_each_header_get_an_error_and_the_connection_goes_on(server: MockHostServer) -> None:
    sock = _raw(server.path)
    try:
        opened = [_request(sock, Msg.OPEN, path) for path in (PRIVCMD_PATH.encode(), b"/dev/xen/evtchn")]
        assert [kind for kind, _, _ in opened] == [Msg.OK, Msg.OK]  # evtchn's fds: dropped, no cmsg buffer here
        (_, privcmd, _), (_, evtchn, _) = opened
        dm_op = struct.pack("<IIBQ", privcmd, IOCTL_PRIVCMD_DM_OP, 0, 0)
        deep = b"[" * 100_000
        cases = [
            (Msg.IOCTL, struct.pack("<IIBQ", 0xFFFFFFFF, 0, 0, 0), errno.EBADF),  # no such handle
            (Msg.IOCTL, dm_op + bytes(privcmd_dm_op(dom=DOMID, num=0xFFFF, ubufs=0x1000)), errno.E2BIG),
            (Msg.IOCTL, dm_op + b"\0" * (remote.MAX_ARG + 1), errno.EINVAL),  # argument longer than any struct
            (Msg.MMAP, struct.pack("<IQQQ", privcmd, 0x1000, (1 << 64) - PAGE_SIZE, 0), errno.EINVAL),
            (Msg.READ, struct.pack("<II", evtchn, 0xFFFFFFFF), errno.EINVAL),  # its client reads the shared ring
            (Msg.OPEN, b"/" * 4096, errno.ENAMETOOLONG),  # PATH_MAX counts the NUL
            (Msg.CALL, deep[: MAX_MESSAGE - 2], errno.EINVAL),  # nested past the parser's recursion
            (Msg.CALL, b'{"op": "events", "args": {"last": ' + b"9" * 5000 + b"}}", errno.EINVAL),
            (Msg.CALL, json.dumps({"op": "events", "args": {"last": -1}}).encode(), errno.EINVAL),
            (
                Msg.CALL,
                json.dumps(
                    {"op": "guest", "args": {"domid": DOMID, "method": "read_ram", "args": [0, 1 << 40]}}
                ).encode(),
                errno.EINVAL,
            ),
        ]
        for kind, body, want in cases:
            got_kind, err, message = _request(sock, kind, body)
            assert (got_kind, err) == (Msg.ERROR, want), (kind.name, body[:40], message[:200])
        sock.send(struct.pack("<H", Msg.CALL) + deep)  # longer than a message: refused whole
        assert _reply(sock)[:2] == (Msg.ERROR, errno.EMSGSIZE)
        assert _ping(sock)
    finally:
        sock.close()
    _others_are_served(server.path)


def test_one_simulated_guest_per_domain_whatever_the_timeouts(server: MockHostServer) -> None:
    """The host kept a SimGuest per (domid, timeout): a client could grow that table with
    every distinct float it sends."""
    with RemoteXen(server.path) as xen:
        for i in range(40):
            guest = RemoteGuest(xen, DOMID, timeout=0.5 + i / 1000)
            assert guest.inb(0x3FF) == 0xFF  # nobody claims the port: all ones, at once
        [conn] = server.clients()
        assert len(conn._guests) == 1


def test_privcmd_mappings_past_max_map_count_are_enomem(
    server: MockHostServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(remote, "MAX_MAP_COUNT", 4, raising=False)  # raising: absent before the bound
    with RemoteXen(server.path) as xen:
        dev = xen.open_device(PRIVCMD_PATH)
        maps = [dev.mmap(PAGE_SIZE) for _ in range(4)]
        with pytest.raises(OSError) as e:
            dev.mmap(PAGE_SIZE)
        assert e.value.errno == errno.ENOMEM and "limit 4" in str(e.value)
        maps.pop().close()
        with pytest.raises(OSError):
            dev.ioctl(IOCTL_PRIVCMD_DM_OP, privcmd_dm_op(dom=DOMID, num=1, ubufs=0x10))  # reports the munmap
        maps.append(dev.mmap(PAGE_SIZE))  # room again
        for m in maps:
            m.close()
        dev.close()


@pytest.mark.parametrize("path", [PRIVCMD_PATH, HYPERCALL_PATH])
def test_a_privcmd_mapping_at_an_offset_is_accepted_as_linux_does(server: MockHostServer, path: str) -> None:
    """privcmd_mmap and privcmd_buf_mmap (vm_map_pages_zero) ignore the offset, in-process and
    across; the host refused both with EINVAL.  A mapping with no length is still EINVAL."""
    with RemoteXen(server.path) as xen:
        dev = xen.open_device(path)
        mapping = dev.mmap(PAGE_SIZE, PAGE_SIZE)
        mapping[:4] = b"xen!"  # the client's own writable shared pages
        mapping.close()
        with pytest.raises(OSError) as e:
            dev.mmap(0, 0)
        assert e.value.errno == errno.EINVAL
        dev.close()


def test_a_reply_longer_than_a_message_is_an_error_naming_the_request(server: MockHostServer) -> None:
    with RemoteXen(server.path) as xen, DeviceModel.open("mock", xen=xen) as dm:
        for _ in range(1000):
            dm.nr_vcpus(DOMID)  # 1000 events in the host's log
        with pytest.raises(OSError) as e:
            xen.events(1000)
        assert e.value.errno == errno.EMSGSIZE and "CALL" in str(e.value)
        assert len(xen.events(10)) == 10  # the connection is still in step


def test_a_client_that_does_not_read_its_replies_is_cut_off(
    server: MockHostServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests sent without reading a reply fill the client's socket; the host's send then
    fails after MEMORY_TIMEOUT instead of blocking its thread for ever."""
    monkeypatch.setattr(remote, "MEMORY_TIMEOUT", 0.3)
    sock = _raw(server.path)
    try:
        ping = struct.pack("<H", Msg.CALL) + json.dumps({"op": "ping"}).encode()
        sock.setblocking(False)
        try:
            for _ in range(100_000):
                sock.send(ping)
        except BlockingIOError:
            pass  # the host stopped reading: its replies have filled our socket
        else:
            pytest.fail("100000 requests and the host still reads them")
        wait_for(lambda: not server.clients(), timeout=10)
        _others_are_served(server.path)
    finally:
        sock.close()


def test_clients_beyond_max_clients_are_closed_and_the_rest_served(
    server: MockHostServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(remote, "MAX_CLIENTS", 2, raising=False)  # raising: absent before the bound
    first, second = _raw(server.path), _raw(server.path)
    try:
        assert _ping(first) and _ping(second)
        third = _raw(server.path)
        try:
            try:  # closed without being served: our request is refused, or reset, or read as EOF
                third.send(struct.pack("<H", Msg.CALL) + json.dumps({"op": "ping"}).encode())
                assert third.recv(MAX_MESSAGE) == b""
            except (BrokenPipeError, ConnectionResetError):
                pass
        finally:
            third.close()
        assert _ping(first) and _ping(second)
    finally:
        first.close()
    wait_for(lambda: len(server.clients()) == 1, TIMEOUT)
    try:
        _others_are_served(server.path)  # a place is free again
    finally:
        second.close()


def test_a_client_answering_each_copy_slowly_holds_the_host_lock_no_longer_than_memory_timeout(
    server: MockHostServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An MMAPBATCH whose frame array takes 20 copy requests, each answered 0.2 s late (under
    a 0.5 s MEMORY_TIMEOUT): the ioctl holds the host lock meanwhile, so the bound is on all
    of one request's copies, not on each; another client's DM_OP waits that long at most."""
    monkeypatch.setattr(remote, "MEMORY_TIMEOUT", 0.5)
    chunks = 20
    sock = _raw(server.path)
    try:
        kind, handle, _ = _request(sock, Msg.OPEN, PRIVCMD_PATH.encode())
        vma = 0x7000_0000_0000
        num = chunks * remote._CHUNK // 8
        assert _request(sock, Msg.MMAP, struct.pack("<IQQQ", handle, vma, num * PAGE_SIZE, 0))[0] == Msg.OK
        batch = privcmd_mmapbatch_v2(num=num, dom=DOMID, addr=vma, arr=0x7100_0000_0000, err=0x7200_0000_0000)
        sock.send(
            struct.pack("<H", Msg.IOCTL) + struct.pack("<IIBQ", handle, IOCTL_PRIVCMD_MMAPBATCH_V2, 0, 0) + bytes(batch)
        )
        started = time.monotonic()
        other: list[float] = []

        def other_client() -> None:
            t0 = time.monotonic()
            _others_are_served(server.path)
            other.append(time.monotonic() - t0)

        answered, helper, outcome = 0, None, "asked for everything"
        while answered <= chunks:
            data = sock.recv(MAX_MESSAGE + 1)
            if not data:
                outcome = "hung up"
                break
            kind = struct.unpack_from("<H", data)[0]
            if kind != Msg.MEM_READ:
                outcome = (
                    "refused" if kind == Msg.ERROR and struct.unpack_from("<i", data, 2)[0] == errno.EFAULT else ""
                )
                break
            if helper is None:
                helper = threading.Thread(target=other_client)
                helper.start()  # while the host holds its lock inside our ioctl
            time.sleep(0.2)
            _, n = struct.unpack_from("<QQ", data, 2)
            try:
                sock.send(struct.pack("<Hi", Msg.MEM_REPLY, 0) + bytes(n))
            except OSError:
                outcome = "hung up"
                break
            answered += 1
        assert outcome in ("refused", "hung up") and answered < chunks, (outcome, answered)
        assert time.monotonic() - started < 2.0
        assert helper is not None
        helper.join(TIMEOUT)
        assert other and other[0] < 2.0, other
    finally:
        sock.close()


def test_a_guest_access_on_a_vcpu_the_domain_lacks_is_refused_naming_it(server: MockHostServer) -> None:
    """dom1 has 2 vCPUs: vCPU 5 is EINVAL naming it, whether or not a server claims the port
    (unclaimed, the host answered all-ones as from a vCPU that existed; claimed, an IndexError
    surfaced as EIO with a traceback in the host's log)."""
    with RemoteXen(server.path) as xen, DeviceModel.open("mock", xen=xen) as dm:
        guest = RemoteGuest(xen, DOMID, timeout=0.5)
        for claimed in (False, True):
            if claimed:
                sid = dm.create_ioreq_server(DOMID, 0)
                dm.get_ioreq_server_info(DOMID, sid, gfns=True)
                dm.map_io_range_to_ioreq_server(DOMID, sid, False, 0x3FF, 0x3FF)
                dm.set_ioreq_server_state(DOMID, sid, True)
            with pytest.raises(OSError) as e:
                guest.inb(0x3FF, vcpu=5)
            assert e.value.errno == errno.EINVAL and "vcpu=5" in str(e.value) and "2 vCPUs" in str(e.value)
        assert guest.inb(0x3FE, vcpu=1) == 0xFF  # an existing vCPU, an unclaimed port
