"""The libxen backend (Xen's C libraries through ctypes) behaves like the privcmd backend.

- Under the fake /dev/xen devices (``golden/fakexen.c``), both backends send the
  same requests, byte for byte, and read back the same results, for every method,
  with ``IOCTL_PRIVCMD_DM_OP`` and with the ``IOCTL_PRIVCMD_HYPERCALL`` fallback.
- Against a stub ``libxendevicemodel.so.1`` built here: every C failure becomes the
  same ``XenError`` the privcmd backend raises; a function the library lacks is
  reported by name; fields the C API cannot carry are refused, not dropped.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from golden import fake
from golden.calls import CALLS, Call
from golden.compare import first_difference

from xendmop import DeviceModel, NotXenHostError, UnsupportedError, XenError
from xendmop.backends import OsDevice, PrivcmdBackend
from xendmop.backends.device import PRIVCMD_PATH, Device
from xendmop.backends.libxen import (
    LIBDIR_ENV,
    PROTOTYPES,
    SONAMES,
    DomainKind,
    GuestKindError,
    LibxenBackend,
    LibxenCtrl,
    MissingFunctionError,
    refuse_unless_hvm,
)
from xendmop.ops import BY_NAME

NAMES = ("libxen", "privcmd")
RESTRICT = next(i for i, call in enumerate(CALLS) if call.method == "restrict")
CASES = [pytest.param(i, call, id=f"{i:02}-{call.label}") for i, call in enumerate(CALLS)]


# --- under the fake devices --------------------------------------------------------------


@pytest.fixture(scope="module")
def dm_op(fakexen: Path) -> tuple[fake.Run, fake.Run]:
    return fake.pair(fakexen, "libxen", "privcmd")


@pytest.fixture(scope="module")
def hypercall(fakexen: Path) -> tuple[fake.Run, fake.Run]:
    return fake.pair(fakexen, "libxen", "privcmd", dm_op_ioctl=False)


@pytest.mark.parametrize(("index", "call"), CASES)
def test_same_requests_and_results(dm_op: tuple[fake.Run, fake.Run], index: int, call: Call) -> None:
    libxen, privcmd = dm_op
    assert libxen.requests(index)
    assert first_difference(libxen.requests(index), privcmd.requests(index), NAMES) is None
    assert libxen.results[index] == privcmd.results[index]


@pytest.mark.parametrize(("index", "call"), [c for c in CASES if c.values[0] != RESTRICT])
def test_same_requests_through_hypercall_fallback(
    hypercall: tuple[fake.Run, fake.Run], index: int, call: Call
) -> None:
    libxen, privcmd = hypercall
    assert {r["event"] for r in libxen.requests(index)} == {"hypercall"}
    assert first_difference(libxen.requests(index), privcmd.requests(index), NAMES) is None
    assert libxen.results[index] == privcmd.results[index]


def test_restrict_without_dm_op_ioctl(hypercall: tuple[fake.Run, fake.Run]) -> None:
    """libxendevicemodel refuses restrict itself when it fell back to libxencall."""
    libxen, _ = hypercall
    assert libxen.results[RESTRICT] == {"errno": errno.EOPNOTSUPP, "type": "XenError", "op": "restrict"}
    assert libxen.requests(RESTRICT) == []


def test_restrict_all_restricts_the_handle(fakexen: Path, tmp_path: Path) -> None:
    """xentoolcore_restrict_all reaches our xendevicemodel handle: IOCTL_PRIVCMD_RESTRICT."""
    script = (
        "from xendmop.backends.libxen import LibxenBackend\n"
        "b = LibxenBackend()\nb.restrict_all(7)\nprint(b.describe()['restricted_to'])\nb.close()\n"
    )
    log = tmp_path / "restrict_all.log"
    log.write_text("")
    proc = subprocess.run(
        [sys.executable, "-c", script], env=fake.fake_env(fakexen, log), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["7"]
    restricts = [e for e in fake.parse(log).events() if e["event"] == "restrict"]
    assert restricts == [{"event": "restrict", "dev": "privcmd", "dom": 7}]


def test_no_privcmd_is_not_a_xen_host(fakexen: Path, tmp_path: Path) -> None:
    script = (
        "from xendmop import NotXenHostError\n"
        "from xendmop.backends.libxen import LibxenBackend\n"
        "try:\n    LibxenBackend()\n"
        "except NotXenHostError as e:\n    print(e.errno, e.filename)\n"
    )
    env = fake.fake_env(fakexen, tmp_path / "absent.log", FAKEXEN_ABSENT="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(errno.ENOENT), PRIVCMD_PATH]
    assert proc.stderr == "", "libxendevicemodel's logger should stay quiet"


def test_this_host_without_privcmd() -> None:
    fake.need_libxendevicemodel()
    if os.path.exists(PRIVCMD_PATH):
        pytest.skip(f"{PRIVCMD_PATH} exists: this is a Xen dom0")
    with pytest.raises(NotXenHostError) as caught:
        LibxenBackend()
    assert caught.value.errno == errno.ENOENT


# --- against a stub libxendevicemodel -------------------------------------------------------

_STUB_HEAD = """
#include <errno.h>
#include <stdint.h>
int stub_errno = ENOTTY;      /* 0: succeed */
int stub_calls;               /* calls that reached the library */
uint64_t stub_args[2];        /* xendevicemodel_modified_memory's first_pfn, nr */
static int handle;
void *xendevicemodel_open(void *logger, unsigned flags) { (void)logger; (void)flags; return &handle; }
int xendevicemodel_close(void *h) { (void)h; return 0; }
int xendevicemodel_modified_memory(void *h, uint16_t domid, uint64_t first_pfn, uint32_t nr)
{
    (void)h; (void)domid;
    stub_calls++;
    stub_args[0] = first_pfn;
    stub_args[1] = nr;
    if (stub_errno) { errno = stub_errno; return -1; }
    return 0;
}
"""
# Arguments are ignored: on x86_64 the caller owns them, whatever the callee declares.
_STUB_FUNCTION = (
    "int xendevicemodel_{0}(void)\n"
    "{{ stub_calls++; if (stub_errno) {{ errno = stub_errno; return -1; }} return 0; }}\n"
)


def _stub(tmp: Path, without: frozenset[str] = frozenset()) -> Path:
    """A libxendevicemodel.so.1 in its own directory, lacking the functions ``without``."""
    skip = {"open", "close", "modified_memory"} | without
    source = _STUB_HEAD + "".join(_STUB_FUNCTION.format(name) for name in PROTOTYPES if name not in skip)
    libdir = tmp / ("stub-without-" + "-".join(sorted(without)) if without else "stub")
    libdir.mkdir()
    fake.compile_library(libdir, SONAMES["devicemodel"], source)
    return libdir


@pytest.fixture(scope="module")
def stub_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _stub(tmp_path_factory.mktemp("stub"))


@pytest.fixture(scope="module")
def old_stub_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A library as before Xen 4.12: no nr_vcpus, set_irq_level or modified_memory_bulk."""
    return _stub(tmp_path_factory.mktemp("stub"), frozenset({"nr_vcpus", "set_irq_level", "modified_memory_bulk"}))


def _stub_int(libdir: Path, name: str) -> ctypes.c_int:
    return ctypes.c_int.in_dll(ctypes.CDLL(str(libdir / SONAMES["devicemodel"])), name)


@pytest.fixture
def stub(stub_dir: Path) -> Iterator[DeviceModel]:
    _stub_int(stub_dir, "stub_errno").value = errno.ENOTTY
    dm = DeviceModel(LibxenBackend(stub_dir))
    yield dm
    dm.close()


def _no_hypercall_device(path: str) -> Device:
    raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)


@pytest.fixture
def devnull() -> Iterator[DeviceModel]:
    """The privcmd backend on /dev/null: every request fails with ENOTTY."""
    device = OsDevice(PRIVCMD_PATH, os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
    dm = DeviceModel(PrivcmdBackend.from_device(device, opener=_no_hypercall_device))
    yield dm
    dm.close()


@pytest.mark.parametrize("call", [pytest.param(c, id=f"{i:02}-{c.label}") for i, c in enumerate(CALLS)])
def test_errors_match_privcmd(stub: DeviceModel, devnull: DeviceModel, call: Call) -> None:
    """The stub fails every call with ENOTTY, as /dev/null does for privcmd: same exceptions."""
    errors = []
    for dm in (stub, devnull):
        with pytest.raises(XenError) as caught:
            getattr(dm, call.method)(*call.args, **call.kwargs)
        errors.append(caught.value)
    ours, theirs = errors
    assert (type(ours), ours.errno, ours.op, ours.domid, ours.args_shown, str(ours)) == (
        type(theirs), theirs.errno, theirs.op, theirs.domid, theirs.args_shown, str(theirs)
    )


def test_errno_picks_the_subclass(stub: DeviceModel, stub_dir: Path) -> None:
    _stub_int(stub_dir, "stub_errno").value = errno.ESRCH
    with pytest.raises(ProcessLookupError) as caught:
        stub.set_isa_irq_level(5, 1, 1)
    e = caught.value
    assert isinstance(e, XenError)
    assert (e.errno, e.op, e.domid) == (errno.ESRCH, "set_isa_irq_level", 5)


def test_missing_function_is_reported_by_name(old_stub_dir: Path) -> None:
    with DeviceModel(LibxenBackend(old_stub_dir)) as dm:
        assert set(dm.describe()["missing"]) == {
            "xendevicemodel_nr_vcpus",
            "xendevicemodel_set_irq_level",
            "xendevicemodel_modified_memory_bulk",
        }
        _stub_int(old_stub_dir, "stub_errno").value = 0
        calls = _stub_int(old_stub_dir, "stub_calls")
        before = calls.value
        for method, args, function in (
            ("nr_vcpus", (1,), "xendevicemodel_nr_vcpus"),
            ("set_irq_level", (1, 40, 1), "xendevicemodel_set_irq_level"),
            ("modified_memory_bulk", (1, [(0x10, 1), (0x20, 2)]), "xendevicemodel_modified_memory_bulk"),
        ):
            with pytest.raises(UnsupportedError) as caught:
                getattr(dm, method)(*args)
            e = caught.value
            assert isinstance(e, MissingFunctionError)
            assert (e.function, e.errno, e.domid) == (function, errno.EOPNOTSUPP, 1)
            assert function in str(e)
        assert calls.value == before, "nothing reached the library"


def test_single_extent_without_bulk_uses_modified_memory(old_stub_dir: Path) -> None:
    """Before Xen 4.12 the library exports only the one-extent call; it carries the same request."""
    _stub_int(old_stub_dir, "stub_errno").value = 0
    with DeviceModel(LibxenBackend(old_stub_dir)) as dm:
        dm.modified_memory(1, 0x1234, 9)
    args = (ctypes.c_uint64 * 2).in_dll(ctypes.CDLL(str(old_stub_dir / SONAMES["devicemodel"])), "stub_args")
    assert list(args) == [0x1234, 9]


@pytest.mark.parametrize(
    ("op", "fields"),
    [
        ("set_ioreq_server_state", {"id": 1, "enabled": 1, "pad": 1}),
        ("modified_memory", {"nr_extents": 0, "opaque": 5}),
        ("map_io_range_to_ioreq_server", {"id": 1, "type": 2, "start": 0x100, "end": 0x1FF}),
        ("map_io_range_to_ioreq_server", {"id": 1, "type": 3, "start": 1, "end": 1}),
        ("get_ioreq_server_info", {"id": 1, "flags": 2}),
    ],
)
def test_fields_c_cannot_carry_are_refused(stub: DeviceModel, op: str, fields: dict[str, int]) -> None:
    decl = BY_NAME[op]
    slots = [b""] * len(decl.slots)
    with pytest.raises(UnsupportedError) as caught:
        stub.backend.dm_op(decl, 1, fields, slots)
    assert (caught.value.errno, caught.value.op) == (errno.EOPNOTSUPP, op)


def test_restrict_refuses_other_domains_before_the_library(stub: DeviceModel, stub_dir: Path) -> None:
    _stub_int(stub_dir, "stub_errno").value = 0
    stub.restrict(7)
    calls = _stub_int(stub_dir, "stub_calls")
    before = calls.value
    with pytest.raises(PermissionError) as caught:
        stub.set_isa_irq_level(8, 1, 1)
    e = caught.value
    assert isinstance(e, XenError)
    assert (e.op, e.domid) == ("set_isa_irq_level", 8)
    assert calls.value == before
    stub.set_isa_irq_level(7, 1, 1)
    assert calls.value == before + 1
    assert stub.describe()["restricted_to"] == 7


def test_describe_and_libdir_from_env(stub_dir: Path) -> None:
    backend = LibxenBackend.from_env({LIBDIR_ENV: str(stub_dir)})
    try:
        info = backend.describe()
        assert info["backend"] == "libxen"
        assert info["libdir"] == str(stub_dir)
        assert info["missing"] == []
        assert info["libraries"]["libxendevicemodel"]["soname"] == SONAMES["devicemodel"]
    finally:
        backend.close()


def test_missing_library(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        LibxenBackend(tmp_path)
    assert SONAMES["devicemodel"] in str(caught.value)


def test_closed_handle(stub_dir: Path) -> None:
    from xendmop import ClosedHandleError

    backend = LibxenBackend(stub_dir)
    backend.close()
    backend.close()  # idempotent
    with pytest.raises(ClosedHandleError):
        backend.dm_op(BY_NAME["nr_vcpus"], 1, {})


# --- libxenctrl: the read-only domain query, against a stub built on the real header ---------------

_CTRL_STUB = """
#define __XEN_TOOLS__ 1
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <xen/xen.h>
#include <xen/domctl.h>
/* the layout the header gives, for the mirror's check */
const size_t stub_layout[] = {
    sizeof(xen_domctl_getdomaininfo_t), offsetof(xen_domctl_getdomaininfo_t, flags),
    offsetof(xen_domctl_getdomaininfo_t, nr_online_vcpus), offsetof(xen_domctl_getdomaininfo_t, max_vcpu_id),
    offsetof(xen_domctl_getdomaininfo_t, arch_config),
};
static const struct { uint16_t domid; uint32_t flags, emu, max_vcpu_id, online; } domains[] = {
    { 1, XEN_DOMINF_hvm_guest, XEN_X86_EMU_ALL & ~(XEN_X86_EMU_VPCI | XEN_X86_EMU_USE_PIRQ), 3, 4 },
    { 2, XEN_DOMINF_hvm_guest, XEN_X86_EMU_LAPIC, 1, 2 },
    { 3, 0, 0, 0, 1 },
    { 4, XEN_DOMINF_hvm_guest | XEN_DOMINF_dying | XEN_DOMINF_paused, XEN_X86_EMU_ALL, 0, 0 },
    { 5, XEN_DOMINF_hvm_guest | XEN_DOMINF_shutdown | (1u << XEN_DOMINF_shutdownshift), XEN_X86_EMU_ALL, 7, 0 },
    { 20, XEN_DOMINF_hvm_guest, XEN_X86_EMU_ALL, 0, 1 },
};
static int handle;
void *xc_interface_open(void *logger, void *dombuild_logger, unsigned flags)
{ (void)logger; (void)dombuild_logger; (void)flags; return &handle; }
int xc_interface_close(void *xch) { (void)xch; return 0; }
int xc_domain_getinfolist(void *xch, uint32_t first, unsigned max, xen_domctl_getdomaininfo_t *info)
{
    (void)xch;
    if (first == 30) { errno = EPERM; return -1; }
    for (size_t i = 0; max && i < sizeof(domains) / sizeof(domains[0]); i++) {
        if (domains[i].domid < first) continue;
        memset(info, 0xa5, sizeof(*info));  /* whatever the mirror does not read */
        info->domain = domains[i].domid;
        info->flags = domains[i].flags;
        info->max_vcpu_id = domains[i].max_vcpu_id;
        info->nr_online_vcpus = domains[i].online;
        info->arch_config.emulation_flags = domains[i].emu;
        return 1;
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def ctrl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the libxenctrl mirror is x86 (emulation_flags)")
    if not Path("/usr/include/xen/domctl.h").exists():
        pytest.skip("no <xen/domctl.h> to build the libxenctrl stub: install Debian's libxen-dev")
    libdir = tmp_path_factory.mktemp("ctrl")
    fake.compile_library(libdir, "libxenctrl.so.4.17", _CTRL_STUB)
    return libdir


@pytest.fixture
def ctrl(ctrl_dir: Path) -> Iterator[LibxenCtrl]:
    with LibxenCtrl(ctrl_dir) as handle:
        yield handle


def test_domaininfo_mirror_matches_the_header(ctrl_dir: Path) -> None:
    from xendmop.backends.libxen import xen_domctl_getdomaininfo as info

    layout = (ctypes.c_size_t * 5).in_dll(ctypes.CDLL(str(ctrl_dir / "libxenctrl.so.4.17")), "stub_layout")
    fields = ("flags", "nr_online_vcpus", "max_vcpu_id", "arch_config")
    assert list(layout) == [ctypes.sizeof(info), *(getattr(info, f).offset for f in fields)]


@pytest.mark.parametrize(
    ("domid", "kind", "dying", "shutdown", "reason", "vcpus", "online"),
    [
        (1, DomainKind.HVM, False, False, None, 4, 4),
        (2, DomainKind.PVH, False, False, None, 2, 2),
        (3, DomainKind.PV, False, False, None, 1, 1),
        (4, DomainKind.HVM, True, False, None, 1, 0),
        (5, DomainKind.HVM, False, True, 1, 8, 0),
    ],
)
def test_domain_info(
    ctrl: LibxenCtrl, domid: int, kind: DomainKind, dying: bool, shutdown: bool, reason: int | None, vcpus: int,
    online: int,
) -> None:
    info = ctrl.domain_info(domid)
    assert (info.domid, info.kind, info.dying, info.shutdown, info.shutdown_reason, info.vcpus, info.online_vcpus) == (
        domid, kind, dying, shutdown, reason, vcpus, online
    )
    assert info.paused == (domid == 4)
    assert (info.emulation_flags == 0) == (kind is DomainKind.PV)


def test_domain_info_errors(ctrl: LibxenCtrl) -> None:
    with pytest.raises(ProcessLookupError) as caught:
        ctrl.domain_info(9)  # the list's next domain is 20: not ours
    assert (caught.value.errno, caught.value.op, caught.value.domid) == (errno.ESRCH, "domain_info", 9)
    with pytest.raises(PermissionError) as refused:
        ctrl.domain_info(30)
    assert isinstance(refused.value, XenError) and refused.value.layer == "libxenctrl"
    from xendmop import ArgumentError

    with pytest.raises(ArgumentError):
        ctrl.domain_info(0x7FF0)
    ctrl.close()
    from xendmop import ClosedHandleError

    with pytest.raises(ClosedHandleError):
        ctrl.domain_info(1)


def test_domain_info_missing_function(tmp_path: Path) -> None:
    source = _CTRL_STUB.replace("int xc_domain_getinfolist(", "int not_xc_domain_getinfolist(")
    fake.compile_library(tmp_path, "libxenctrl.so.4.9", source)
    with LibxenCtrl(tmp_path) as old, pytest.raises(MissingFunctionError) as caught:
        old.domain_info(1)
    assert caught.value.function == "xc_domain_getinfolist"


def test_refuse_unless_hvm(ctrl: LibxenCtrl) -> None:
    info = refuse_unless_hvm(1, "set_isa_irq_level", ctrl=ctrl)
    assert info is not None and info.kind is DomainKind.HVM
    for domid, kind in ((2, "PVH"), (3, "PV")):
        with pytest.raises(GuestKindError) as caught:
            refuse_unless_hvm(domid, "set_isa_irq_level", ctrl=ctrl)
        e = caught.value
        assert (e.errno, e.op, e.domid, e.info.kind.value) == (errno.EINVAL, "set_isa_irq_level", domid, kind)
        assert f"dom{domid} is a {kind} guest, not HVM" in str(e)


def test_refuse_unless_hvm_without_libxenctrl_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from xendmop.backends import libxen

    monkeypatch.setattr(libxen, "_find_libxenctrl", lambda libdir: None)
    with caplog.at_level("WARNING", logger="xendmop.libxen"):
        assert refuse_unless_hvm(2, "set_isa_irq_level") is None
    assert "libxenctrl is not installed" in caplog.text and "set_isa_irq_level not guarded" in caplog.text


def _cli(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env}
    full.pop("XENDMOP_BACKEND", None)
    return subprocess.run(
        [sys.executable, "-m", "xendmop", *argv], env=full, capture_output=True, text=True, timeout=60
    )


def test_cli_info_domid(ctrl_dir: Path) -> None:
    proc = _cli(["--backend", "mock", "info", "2"], {LIBDIR_ENV: str(ctrl_dir)})
    assert proc.returncode == 0, proc.stderr
    assert "dom2: PVH, 2 vCPUs (2 online), emulation_flags=0x1" in proc.stdout
    proc = _cli(["--backend", "mock", "--json", "info", "5"], {LIBDIR_ENV: str(ctrl_dir)})
    domain = json.loads(proc.stdout)["domain"]
    assert domain == {
        "available": True, "domid": 5, "kind": "HVM", "dying": False, "shutdown": True, "shutdown_reason": 1,
        "paused": False, "vcpus": 8, "online_vcpus": 0, "emulation_flags": 0x7FF,
    }
    libraries = json.loads(proc.stdout)["libraries"]
    assert libraries["libxenctrl"] == {"found": True, "file": str(ctrl_dir / "libxenctrl.so.4.17")}
    assert libraries[SONAMES["devicemodel"]]["found"] is False  # not in that directory


def test_cli_info_without_libxenctrl(tmp_path: Path) -> None:
    proc = _cli(["--backend", "mock", "info", "2"], {LIBDIR_ENV: str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "dom2: unknown (libxenctrl: " in proc.stdout and "libxenctrl is not installed" in proc.stdout
    assert "libxenctrl                not found" in proc.stdout


@pytest.mark.parametrize(
    ("method", "args", "name"),
    [
        ("set_isa_irq_level", (1, 3, 257), "level"),  # the C prototype's uint8 would carry 257 as 1
        ("map_io_range_to_ioreq_server", (1, 1, 2, 0x10, 0x1F), "is_mmio"),  # C takes any nonzero as MMIO
    ],
)
def test_values_c_would_normalise_are_refused_first(
    stub: DeviceModel, stub_dir: Path, method: str, args: tuple[int, ...], name: str
) -> None:
    from xendmop import ArgumentError

    calls = _stub_int(stub_dir, "stub_calls")
    before = calls.value
    with pytest.raises(ArgumentError) as caught:
        getattr(stub, method)(*args)
    assert caught.value.name == name
    assert calls.value == before, "refused before the library"


def test_stop_tracking_never_hands_libxendevicemodel_a_page_aligned_empty_bitmap() -> None:
    """HAZARD 2: a page-aligned 0-byte DM_OP buffer is EFAULT (and corrupted a 6.1 dom0)."""
    import ctypes
    import mmap

    from xendmop.backends import libxen

    page = mmap.mmap(-1, 2 * mmap.PAGESIZE)
    try:
        words = ctypes.c_ulong * 2
        at_start = words.from_buffer(page, mmap.PAGESIZE)  # begins a page
        before = words.from_buffer(page, mmap.PAGESIZE - ctypes.sizeof(ctypes.c_ulong))  # second word does
        inside = words.from_buffer(page, 64)
        for pair in (at_start, before, inside):
            pointer = ctypes.cast(libxen.not_a_page_start(pair), ctypes.c_void_p).value or 0
            assert pointer % mmap.PAGESIZE and ctypes.addressof(pair) <= pointer < ctypes.addressof(pair) + 16
        del at_start, before, inside, pair
    finally:
        page.close()

    seen: list[int] = []

    class Recorder:
        def c_call(self, name: str, op: str, domid: int, f: object, first_pfn: int, nr: int, bitmap: object) -> None:
            assert (name, nr) == ("track_dirty_vram", 0)
            seen.append(ctypes.cast(bitmap, ctypes.c_void_p).value or 0)

    assert libxen._track_dirty_vram(Recorder(), "track_dirty_vram", 1, {"nr": 0}, None, None) == [b""]  # type: ignore[arg-type]
    assert len(seen) == 1 and seen[0] % mmap.PAGESIZE
