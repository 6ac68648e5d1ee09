"""The runtime's handles over Xen's C libraries behave like the device handles.

- Under the fake /dev/xen devices (``golden/fakexen.c``): ``LibxenEventChannel`` /
  ``LibxenForeignMemory`` (libxenevtchn, libxenforeignmemory) and ``EventChannel`` /
  ``ForeignMemory`` (our own ioctls) send the same ioctls, mmaps and munmaps, return the
  same values and raise the same errors, case by case; ``IoreqServer(handles="libxen")``
  brings a server up, serves a port write and tears it down with the same requests
  as ``handles="device"``.
- A mapping's memory cannot be unmapped under a live view: ``unmap`` refuses with
  ``BufferError`` and the munmap waits; ``close`` of the handle defers it.
- Against stub libraries built here (gcc, real ``.so`` files exporting only some
  symbols): a function the installed library lacks is reported by name, and a
  libxenforeignmemory before Xen 4.11 (no ``map_resource``) makes ``IoreqServer``
  take the legacy gfn path.

This file is also the driver the tests run under the fake, in a subprocess:
``python -m test_libxen_handles {device|libxen} {handles|server}``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from golden import fake

from xendmop.backends.libxen import SONAMES, MissingFunctionError
from xendmop.errors import ArgumentError, ClosedHandleError

DOMID = 7
#: events that are requests reaching a device (the fake's log)
REQUESTS = ("evtchn", "unmask", "mmap", "munmap", "mmap_resource", "mmapbatch_v2", "restrict", "dm_op", "ioctl")
#: libxenforeignmemory probes which errno privcmd uses for "not implemented" when it opens
IOCTL_PRIVCMD_UNIMPLEMENTED = 0x50FF


# --- the driver (runs in a subprocess under LD_PRELOAD=fakexen.so) ------------------------------


def _handles(kind: str) -> tuple[Any, Any]:
    if kind == "libxen":
        from xendmop.backends.libxen_handles import LibxenEventChannel, LibxenForeignMemory

        return LibxenEventChannel(), LibxenForeignMemory()
    from xendmop.runtime import EventChannel, ForeignMemory

    return EventChannel(), ForeignMemory()


def _first_words(mapping: Any) -> list[int]:
    """The first uint32 of every ioreq slot's vp_eport, or the first uint64 of each page."""
    view = mapping.view
    return [int.from_bytes(view[i * 4096 : i * 4096 + 8], "little") for i in range(mapping.nr_frames)]


def _handle_cases(evtchn: Any, fmem: Any) -> list[tuple[str, Callable[[], Any]]]:
    state: dict[str, Any] = {}

    def bind() -> int:
        state["port"] = evtchn.bind_interdomain(DOMID, 0x105)
        return int(state["port"])

    def map_resource() -> list[int]:
        state["res"] = fmem.map_resource(DOMID, 0, 3, 1, 1)
        page = state["res"].view
        return [int.from_bytes(page[24 + 32 * s : 28 + 32 * s], "little") for s in range(3)]

    def map_gfns() -> list[Any]:
        state["ram"] = fmem.map(DOMID, [0x10, 0x11, 1 << 41])
        return [list(state["ram"].errors), _first_words(state["ram"])[:2]]

    def unmap_under_a_view() -> str:
        held = state["ram"].view[4096:4104]  # a slice, as IoreqServer keeps its page
        try:
            fmem.unmap(state["ram"])
        except BufferError:
            outcome = "refused"
        else:
            outcome = "unmapped"
        held.release()
        return outcome

    return [
        ("bind_interdomain", bind),
        ("bind_unbound_port", lambda: evtchn.bind_unbound_port(DOMID)),
        ("notify", lambda: evtchn.notify(state["port"])),
        ("pending", lambda: evtchn.pending()),
        ("unmask", lambda: evtchn.unmask(state["port"])),
        ("pending-none", lambda: evtchn.pending()),
        ("unbind", lambda: evtchn.unbind(state["port"])),
        ("reset", lambda: evtchn.reset()),
        ("restrict-evtchn", lambda: evtchn.restrict(DOMID)),
        ("bad-port", lambda: evtchn.notify(0)),
        ("bad-domid", lambda: evtchn.restrict(0)),
        ("map_resource", map_resource),
        ("unmap-resource", lambda: fmem.unmap(state["res"])),
        ("map", map_gfns),
        ("unmap-under-view", unmap_under_a_view),
        ("unmap", lambda: fmem.unmap(state["ram"])),
        ("unmap-again", lambda: fmem.unmap(state["ram"])),
        ("bad-frames", lambda: fmem.map_resource(DOMID, nr_frames=0)),
        ("bad-gfn", lambda: fmem.map(DOMID, [-1])),
        ("restrict-fmem", lambda: fmem.restrict(DOMID)),
        ("close-with-view", lambda: _close_with_view(fmem, state)),
        ("closed", lambda: evtchn.close() or evtchn.notify(1)),
    ]


def _close_with_view(fmem: Any, state: dict[str, Any]) -> list[str]:
    """Closing the handle while a view is held: nothing unmapped until the view goes."""
    mapping = fmem.map(DOMID, [0x20])
    held = mapping.view[:8]
    fmem.close()
    marks = [f"closed={mapping.closed}", f"word={int.from_bytes(held, 'little'):#x}"]
    _mark("after-close")
    held.release()
    return marks


def _server_cases(kind: str) -> list[tuple[str, Callable[[], Any]]]:
    from xendmop import DeviceModel
    from xendmop.runtime import EventChannel, IoreqServer

    dm = DeviceModel.open("libxen" if kind == "libxen" else "privcmd")
    writes: list[tuple[int, int, int]] = []

    class Uart:
        def read(self, addr: int, size: int) -> int:
            return 0

        def write(self, addr: int, size: int, value: int) -> None:
            writes.append((addr, size, value))

    server = IoreqServer(dm, DOMID, nr_vcpus=2, restrict=True, handles="libxen" if kind == "libxen" else "device")
    server.add_port_range(0x3F8, 0x3FF, Uart(), "uart")
    guest_side = EventChannel()  # the fake's ports are process-wide: a notify here is Xen's notify

    def serve_one_write() -> list[Any]:
        assert server.page is not None
        slot = server.page[32:64]  # vCPU 1: addr 0x3F9, data 0x41, size 1, count 1, READY, PIO write
        slot[0:8] = (0x3F9).to_bytes(8, "little")
        slot[8:16] = (0x41).to_bytes(8, "little")
        slot[16:24] = (1).to_bytes(4, "little") + (1).to_bytes(4, "little")
        slot[30], slot[31] = 1, 0
        guest_side.notify(server.vcpu_ports[1])
        handled = server.handle_events()
        state = slot[30] & 0xF
        slot.release()
        return [handled, state, writes]

    cases = [
        ("start", lambda: [server.start().vcpu_ports, server.legacy_gfns]),
        ("serve", serve_one_write),
        ("close", server.close),
    ]
    return [*cases, ("close-dm", dm.close), ("close-guest-side", guest_side.close)]


_LOG = -1


def _mark(name: str) -> None:
    os.write(_LOG, (json.dumps({"event": "mark", "case": name}) + "\n").encode())


def driver(kind: str, what: str) -> None:
    global _LOG
    _LOG = os.open(os.environ["FAKEXEN_LOG"], os.O_WRONLY | os.O_APPEND)
    if what == "handles":
        evtchn, fmem = _handles(kind)
        cases = _handle_cases(evtchn, fmem)
    else:
        cases = _server_cases(kind)
    for name, call in cases:
        _mark(name)
        try:
            result: dict[str, Any] = {"value": call()}
        except OSError as e:
            result = {
                "errno": e.errno,
                "type": type(e).__name__,
                "op": getattr(e, "op", None),
                "domid": getattr(e, "domid", None),
                "str": str(e),
            }
        except Exception as e:  # ArgumentError, ClosedHandleError, BufferError, a case after a failed one
            result = {"raised": type(e).__name__, "str": str(e).replace("Libxen", "")}
        os.write(_LOG, (json.dumps({"event": "result", "case": name, **result}, default=str) + "\n").encode())
    _mark("end")


# --- running it ------------------------------------------------------------------------------------


def _run(fakexen: Path, tmp: Path, kind: str, what: str, **extra: str) -> dict[str, dict[str, Any]]:
    """Run the driver; the log split per case: {"requests": [...], "result": {...}}."""
    log = tmp / f"{kind}-{what}-{'-'.join(sorted(extra))}.log"
    log.write_text("")
    env = fake.fake_env(fakexen, log, **extra)
    proc = subprocess.run(
        [sys.executable, "-m", "test_libxen_handles", kind, what],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{kind} {what} driver failed:\n{proc.stdout}\n{proc.stderr}"
    cases: dict[str, dict[str, Any]] = {"opening": {"requests": [], "result": None}}
    current = cases["opening"]
    for line in log.read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "mark":
            current = cases.setdefault(event["case"], {"requests": [], "result": None})
        elif event["event"] == "result":
            current["result"] = {k: v for k, v in event.items() if k not in ("event", "case")}
        elif event["event"] in REQUESTS:
            current["requests"].append(event)
    return cases


def _comparable(kind: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Requests without what only one side does besides the requests themselves:
    libxenforeignmemory's errno probe at open, the privcmd backend's hypercall-buffer
    pool (mmaps of /dev/xen/hypercall, an allocator)."""
    kept = [r for r in requests if "hypercall" not in (r.get("dev"), r.get("mapped_from"))]
    if kind != "libxen":
        return kept
    return [r for r in kept if not (r["event"] == "ioctl" and r.get("request") == IOCTL_PRIVCMD_UNIMPLEMENTED)]


@pytest.fixture(scope="module")
def handles_runs(fakexen: Path) -> dict[str, dict[str, dict[str, Any]]]:
    return {kind: _run(fakexen, fakexen.parent, kind, "handles") for kind in ("device", "libxen")}


HANDLE_CASES = [name for name, _ in _handle_cases(None, None)]


@pytest.mark.parametrize("case", HANDLE_CASES)
def test_handles_same_requests_and_results(handles_runs: dict[str, Any], case: str) -> None:
    device, libxen = handles_runs["device"][case], handles_runs["libxen"][case]
    assert _comparable("libxen", libxen["requests"]) == device["requests"]
    assert libxen["result"] == device["result"]


def test_handles_results_are_the_fakes_answers(handles_runs: dict[str, Any]) -> None:
    """The values compared above are real answers, not two equal failures."""
    run = handles_runs["libxen"]
    assert run["bind_interdomain"]["result"] == {"value": 0x1105}
    assert run["pending"]["result"] == {"value": 0x1105}
    assert run["pending-none"]["result"] == {"value": None}
    assert run["unmask"]["requests"] == [{"event": "unmask", "dev": "evtchn", "ports": [0x1105]}]
    assert run["map_resource"]["result"] == {"value": [0x200, 0x201, 0x202]}  # frame 1's vp_eports
    assert run["map"]["result"] == {"value": [[0, 0, -errno.EINVAL], [0x10, 0x11]]}
    assert run["unmap-under-view"]["result"] == {"value": "refused"}
    assert run["unmap-under-view"]["requests"] == [], "nothing unmapped while a slice was alive"
    assert [r["event"] for r in run["unmap"]["requests"]] == ["munmap"]
    assert run["unmap-again"]["requests"] == []
    assert run["bad-port"]["result"]["raised"] == "ArgumentError" and run["bad-port"]["requests"] == []
    assert run["closed"]["result"]["raised"] == "ClosedHandleError"


def test_close_defers_the_munmap_to_the_last_view(handles_runs: dict[str, Any]) -> None:
    for kind in ("libxen", "device"):
        run = handles_runs[kind]
        # the case's result lands after its inner mark: the view still read the page after close
        assert run["after-close"]["result"] == {"value": ["closed=False", "word=0x20"]}
        events = [r["event"] for r in run["close-with-view"]["requests"]]
        assert "munmap" not in events, f"{kind}: unmapped under a live view"
        assert [r["event"] for r in run["after-close"]["requests"]] == ["munmap"]


def test_libxen_opening_probes_the_unimplemented_errno(handles_runs: dict[str, Any]) -> None:
    opening = handles_runs["libxen"]["opening"]["requests"]
    assert {"event": "ioctl", "dev": "privcmd", "request": IOCTL_PRIVCMD_UNIMPLEMENTED} in opening


@pytest.fixture(scope="module")
def evtchn_error_runs(fakexen: Path) -> dict[str, dict[str, dict[str, Any]]]:
    extra = {"FAKEXEN_EVTCHN_ERRNO": str(errno.ENOTCONN)}
    return {kind: _run(fakexen, fakexen.parent, kind, "handles", **extra) for kind in ("device", "libxen")}


@pytest.mark.parametrize("case", ["bind_interdomain", "bind_unbound_port", "reset", "restrict-evtchn"])
def test_evtchn_errors_are_the_same_xenerror(evtchn_error_runs: dict[str, Any], case: str) -> None:
    device, libxen = evtchn_error_runs["device"][case], evtchn_error_runs["libxen"][case]
    assert device["result"]["errno"] == errno.ENOTCONN
    assert libxen["result"] == device["result"]
    assert libxen["requests"] == device["requests"]


@pytest.fixture(scope="module")
def server_runs(fakexen: Path) -> dict[str, dict[str, dict[str, Any]]]:
    return {kind: _run(fakexen, fakexen.parent, kind, "server") for kind in ("device", "libxen")}


@pytest.mark.parametrize("case", ["start", "serve", "close"])
def test_ioreq_server_over_libxen_handles(server_runs: dict[str, Any], case: str) -> None:
    """The whole runtime over the C libraries (DeviceModel on libxendevicemodel, handles on
    libxenforeignmemory/libxenevtchn): same requests, same results as over our own ioctls."""
    device, libxen = server_runs["device"][case], server_runs["libxen"][case]
    assert _comparable("libxen", libxen["requests"]) == _comparable("device", device["requests"])
    assert libxen["result"] == device["result"]


def test_ioreq_server_over_libxen_really_served(server_runs: dict[str, Any]) -> None:
    run = server_runs["libxen"]
    assert run["start"]["result"] == {"value": [[0x1200, 0x1201], False]}  # bound to frame 1's vp_eports
    restricts = [r for r in run["start"]["requests"] if r["event"] == "restrict" or r.get("op") == "restrict_domid"]
    assert restricts == [
        {"event": "restrict", "dev": "privcmd", "dom": DOMID},
        {"event": "evtchn", "dev": "evtchn", "op": "restrict_domid", "arg": [DOMID, 0]},
    ]
    handled, state, writes = run["serve"]["result"]["value"]
    # (handled may count the fake's loop-back of our answer's notify as one more event)
    assert handled >= 1 and (state, writes) == (3, [[1, 1, 0x41]])  # STATE_IORESP_READY, UART offset 1
    events = [r["event"] for r in run["close"]["requests"]]
    assert events.count("munmap") == 1 and events.index("munmap") < len(events) - 1


# --- stub libraries: symbols the installed library lacks ---------------------------------------------

_STUB_FMEM = """
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
static int handle;
void *xenforeignmemory_open(void *logger, unsigned flags) { (void)logger; (void)flags; return &handle; }
int xenforeignmemory_close(void *h) { (void)h; return 0; }
int xenforeignmemory_restrict(void *h, uint16_t domid) { (void)h; (void)domid; return 0; }
/* A guest frame is an anonymous page holding its gfn, so a legacy mapping can be checked. */
void *xenforeignmemory_map(void *h, uint32_t dom, int prot, size_t n, const unsigned long *arr, int *err)
{
    (void)h; (void)dom;
    uint64_t *p = mmap(NULL, n * 4096, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    for (size_t i = 0; i < n; i++) { err[i] = 0; p[i * 512 + 3] = 0x100 + i; }
    return p;
}
int xenforeignmemory_unmap(void *h, void *addr, size_t n) { (void)h; return munmap(addr, n * 4096); }
"""

_STUB_EVTCHN_WITHOUT_RESTRICT = """
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <unistd.h>
static int fd = -1;
void *xenevtchn_open(void *logger, unsigned flags)
{ (void)logger; (void)flags; fd = open("/dev/null", O_RDWR); return &fd; }
int xenevtchn_close(void *h) { (void)h; return close(fd); }
int xenevtchn_fd(void *h) { (void)h; return fd; }
int xenevtchn_notify(void *h, uint32_t port) { (void)h; (void)port; errno = ENOTCONN; return -1; }
"""


def _stub_library(tmp: Path, key: str, source: str) -> Path:
    libdir = tmp / key
    libdir.mkdir()
    fake.compile_library(libdir, SONAMES[key], source)
    return libdir


def test_foreignmemory_before_4_11_reports_map_resource_by_name(tmp_path: Path) -> None:
    from xendmop.backends.libxen_handles import LibxenForeignMemory

    libdir = _stub_library(tmp_path, "foreignmemory", _STUB_FMEM)
    with LibxenForeignMemory(libdir) as fmem:
        assert set(fmem.describe()["missing"]) == {"xenforeignmemory_map_resource", "xenforeignmemory_unmap_resource"}
        with pytest.raises(MissingFunctionError) as caught:
            fmem.map_resource(DOMID, 0, 1, 1, 1)
        e = caught.value
        assert (e.function, e.errno, e.op, e.domid) == (
            "xenforeignmemory_map_resource", errno.EOPNOTSUPP, "map_resource", DOMID
        )
        assert "xenforeignmemory_map_resource (exported since Xen 4.11)" in str(e)
        mapping = fmem.map(DOMID, [0x30, 0x31])  # what the library has still works
        assert mapping.ok and mapping.view[24] == 0x00 and mapping.view[4096 + 24] == 0x01
        fmem.unmap(mapping)


def test_evtchn_without_restrict_reports_it_by_name(tmp_path: Path) -> None:
    from xendmop.backends.libxen_handles import LibxenEventChannel

    libdir = _stub_library(tmp_path, "evtchn", _STUB_EVTCHN_WITHOUT_RESTRICT)
    with LibxenEventChannel(libdir) as evtchn:
        with pytest.raises(MissingFunctionError) as caught:
            evtchn.restrict(DOMID)
        assert caught.value.function == "xenevtchn_restrict"
        assert "exported since Xen 4.8" in str(caught.value)
        with pytest.raises(MissingFunctionError) as missing_bind:
            evtchn.bind_interdomain(DOMID, 5)
        assert missing_bind.value.function == "xenevtchn_bind_interdomain"
        with pytest.raises(OSError) as caught_notify:
            evtchn.notify(9)
        assert (caught_notify.value.errno, str(caught_notify.value)) == (
            errno.ENOTCONN,
            "evtchn notify(port=9): Transport endpoint is not connected [ENOTCONN]",
        )
        with pytest.raises(ArgumentError):
            evtchn.unmask(0)
    with pytest.raises(ClosedHandleError):
        evtchn.fileno()


def test_ioreq_server_falls_back_to_legacy_gfns_without_map_resource(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """IoreqServer(handles="libxen") with a pre-4.11 libxenforeignmemory: the server's pages
    come from get_ioreq_server_info's gfns, mapped with xenforeignmemory_map."""
    from xendmop import DeviceModel
    from xendmop.backends.libxen import LibxenBackend
    from xendmop.runtime import IoreqServer

    libdir = _stub_library(tmp_path, "foreignmemory", _STUB_FMEM)
    fake.compile_library(libdir, SONAMES["evtchn"], _STUB_EVTCHN_WITHOUT_RESTRICT)
    from test_libxen_backend import _stub  # the libxendevicemodel stub of the backend tests

    dm_dir = _stub(tmp_path)
    for name in os.listdir(libdir):
        if name.endswith(".so.1"):
            os.symlink(libdir / name, dm_dir / name)
    ctypes.c_int.in_dll(ctypes.CDLL(str(dm_dir / SONAMES["devicemodel"])), "stub_errno").value = 0
    dm = DeviceModel(LibxenBackend(dm_dir))
    server = IoreqServer(dm, DOMID, nr_vcpus=1, handles="libxen")
    with caplog.at_level(logging.INFO, logger="xendmop.runtime"):
        with pytest.raises(MissingFunctionError) as caught:  # the stub evtchn cannot bind: we got that far
            server.start()
    assert caught.value.function == "xenevtchn_bind_interdomain"
    assert server.legacy_gfns, "the pages came from the legacy gfns"
    assert any("xenforeignmemory_map_resource" in r.getMessage() for r in caplog.records)
    assert server.id is None and server.page is None, "torn down after the failure"
    dm.close()


if __name__ == "__main__":
    driver(sys.argv[1], sys.argv[2])


@pytest.fixture(scope="module")
def no_resource_runs(fakexen: Path) -> dict[str, dict[str, dict[str, Any]]]:
    extra = {"FAKEXEN_NO_RESOURCE": "1"}
    return {
        (kind, what): _run(fakexen, fakexen.parent, kind, what, **extra)
        for kind in ("device", "libxen")
        for what in ("handles", "server")
    }


def test_no_resource_mapping_both_fall_back_to_legacy_gfns(no_resource_runs: dict[Any, Any]) -> None:
    """A kernel without MMAP_RESOURCE: the device handle reports its ENOTTY, libxenforeignmemory
    turns it into EOPNOTSUPP; IoreqServer takes both as "no resource mapping" and goes on
    with get_ioreq_server_info's gfns and MMAPBATCH_V2, identically.  (The fake's gfns are its
    fill pattern, beyond 2^40, so that mapping fails per frame with EINVAL and both servers
    tear down the same way: the requests, not a served guest, are what is compared here.)"""
    device, libxen = no_resource_runs["device", "handles"], no_resource_runs["libxen", "handles"]
    assert device["map_resource"]["result"]["errno"] == errno.ENOTTY
    assert libxen["map_resource"]["result"]["errno"] == errno.EOPNOTSUPP
    assert _comparable("libxen", libxen["map_resource"]["requests"]) == device["map_resource"]["requests"]
    device, libxen = no_resource_runs["device", "server"], no_resource_runs["libxen", "server"]
    assert _comparable("libxen", libxen["start"]["requests"]) == _comparable("device", device["start"]["requests"])
    assert libxen["start"]["result"] == device["start"]["result"]
    assert "mmapbatch_v2" in [r["event"] for r in libxen["start"]["requests"]], "the legacy gfn path was taken"
    assert (libxen["start"]["result"]["errno"], libxen["start"]["result"]["op"]) == (errno.EINVAL, "map")


def test_ioreq_server_handles_argument_checked() -> None:
    from xendmop import DeviceModel
    from xendmop.runtime import IoreqServer

    with DeviceModel.open("mock") as dm:
        with pytest.raises(ValueError, match="handles='qemu'"):
            IoreqServer(dm, DOMID, handles="qemu")
        with pytest.raises(ValueError, match="cannot take an opener"):
            IoreqServer(dm, DOMID, handles="libxen", opener=lambda path: None)


def test_restrict_all_reaches_the_libxen_handles(fakexen: Path, tmp_path: Path) -> None:
    """Both handles register with libxentoolcore: xentoolcore_restrict_all restricts them
    (IOCTL_PRIVCMD_RESTRICT on the foreign-memory fd, IOCTL_EVTCHN_RESTRICT_DOMID on evtchn)."""
    script = (
        "from xendmop.backends.libxen import LibxenBackend\n"
        "from xendmop.backends.libxen_handles import LibxenEventChannel, LibxenForeignMemory\n"
        "evtchn, fmem, dm = LibxenEventChannel(), LibxenForeignMemory(), LibxenBackend()\n"
        "dm.restrict_all(7)\n"
        "for h in (dm, evtchn, fmem): h.close()\n"
    )
    log = tmp_path / "restrict_all.log"
    log.write_text("")
    proc = subprocess.run(
        [sys.executable, "-c", script], env=fake.fake_env(fakexen, log), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in log.read_text().splitlines()]
    restricts = [e for e in events if e["event"] == "restrict" or e.get("op") == "restrict_domid"]
    assert {"event": "evtchn", "dev": "evtchn", "op": "restrict_domid", "arg": [7, 0]} in restricts
    privcmd = [e for e in restricts if e["event"] == "restrict"]
    assert len(privcmd) == 2 and {e["dom"] for e in privcmd} == {7}  # libxendevicemodel's fd and ours
