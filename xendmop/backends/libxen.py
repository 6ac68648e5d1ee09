"""The libxen backend: DMOPs through Xen's own C libraries, loaded with ctypes.

``libxendevicemodel.so.1`` does the work (every function declared below from the
prototypes of ``tools/include/xendevicemodel.h``, Xen 4.17); ``libxentoollog.so.1``
gives it a logger that keeps quiet (failures come back as exceptions instead), and
``libxentoolcore.so.1`` offers ``xentoolcore_restrict_all``.  Handles of
``libxenforeignmemory`` and ``libxenevtchn`` are in ``libxen_handles`` (the runtime's
``IoreqServer(handles="libxen")``).  ``LibxenCtrl`` (end of this module) is the one
use of ``libxenctrl``: a read-only domain query (HVM, PVH or PV; dying; shut down;
vCPUs) for ``xendmop info DOMID`` and ``refuse_unless_hvm``.

Each DMOP declaration names its C function and the fields it takes in C's order
(``function``, ``params``); most ops are that call (``_simple``), the others have a
handler (``_HANDLERS``) that rebuilds the C arguments: the io-range ``type`` becomes ``is_mmio`` or a
PCI SBDF is split into segment/bus/device/function, the ``extents`` slot becomes a
pointer.  A field the C function cannot carry (a nonzero pad, a PCI range wider
than one function, ``opaque``) is refused with ``UnsupportedError`` rather than
silently dropped.  A failing call (``-1`` and ``errno``) raises the same
``XenError`` the privcmd backend raises for it: same op name, same errno.  A
function missing from the installed library (``nr_vcpus`` before Xen 4.15,
``modified_memory_bulk`` before 4.12, ...) raises ``MissingFunctionError``, an
``UnsupportedError`` naming the function.

Differences from the privcmd backend that the library imposes:
- only the op struct's fields the C function returns are read back (``id``,
  the ioreq server info, ``vcpus``); the others keep the values passed in;
- with a kernel lacking ``IOCTL_PRIVCMD_DM_OP`` the library falls back to
  libxencall by itself, and its ``restrict`` then fails with EOPNOTSUPP.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import errno
import logging
import os
import platform
import re
from collections.abc import Callable, Mapping, Sequence
from ctypes import POINTER, byref, c_char_p, c_int, c_uint, c_uint8, c_uint16, c_uint32, c_uint64, c_ulong, c_void_p
from dataclasses import asdict, dataclass
from typing import Any

from ..abi.dm_op import (
    XEN_DMOP_IO_RANGE_MEMORY,
    XEN_DMOP_IO_RANGE_PCI,
    XEN_DMOP_IO_RANGE_PORT,
    XEN_DMOP_PCI_SBDF,
    XEN_DMOP_no_gfns,
    ioservid_t,
    xen_dm_op_modified_memory_extent,
)
from ..abi.hvm import hvmmem_type_t
from ..abi.xen import DOMID_FIRST_RESERVED, domid_t, evtchn_port_t, xen_pfn_t
from ..errors import ArgumentError, ClosedHandleError, NotXenHostError, UnsupportedError, XenError, xen_error
from ..ops import OpDecl
from .base import Backend, Limits
from .device import NOT_XEN, PAGE_SIZE, PRIVCMD_PATH

__all__ = [
    "SONAMES",
    "DomainInfo",
    "DomainKind",
    "GuestKindError",
    "LibxenBackend",
    "LibxenCtrl",
    "MissingFunctionError",
    "library_report",
    "refuse_unless_hvm",
]

log = logging.getLogger("xendmop.libxen")

#: The libraries, by soname (the ABI major version is part of the name).
SONAMES = {
    "devicemodel": "libxendevicemodel.so.1",
    "toolcore": "libxentoolcore.so.1",
    "toollog": "libxentoollog.so.1",
    "evtchn": "libxenevtchn.so.1",
    "foreignmemory": "libxenforeignmemory.so.1",
}
#: Environment variable naming a directory holding the libraries (read by ``from_env``).
LIBDIR_ENV = "XENDMOP_LIBXEN_DIR"

_h = c_void_p  # xendevicemodel_handle *
_Proto = tuple[Any, list[Any]]

#: ``xendevicemodel_<name>``: (restype, argtypes), from ``xendevicemodel.h``.
PROTOTYPES: dict[str, _Proto] = {
    "open": (c_void_p, [c_void_p, c_uint]),
    "close": (c_int, [_h]),
    "create_ioreq_server": (c_int, [_h, domid_t, c_int, POINTER(ioservid_t)]),
    "get_ioreq_server_info": (
        c_int,
        [_h, domid_t, ioservid_t, POINTER(xen_pfn_t), POINTER(xen_pfn_t), POINTER(evtchn_port_t)],
    ),
    "map_io_range_to_ioreq_server": (c_int, [_h, domid_t, ioservid_t, c_int, c_uint64, c_uint64]),
    "unmap_io_range_from_ioreq_server": (c_int, [_h, domid_t, ioservid_t, c_int, c_uint64, c_uint64]),
    "map_mem_type_to_ioreq_server": (c_int, [_h, domid_t, ioservid_t, c_uint16, c_uint32]),
    "map_pcidev_to_ioreq_server": (c_int, [_h, domid_t, ioservid_t, c_uint16, c_uint8, c_uint8, c_uint8]),
    "unmap_pcidev_from_ioreq_server": (c_int, [_h, domid_t, ioservid_t, c_uint16, c_uint8, c_uint8, c_uint8]),
    "destroy_ioreq_server": (c_int, [_h, domid_t, ioservid_t]),
    "set_ioreq_server_state": (c_int, [_h, domid_t, ioservid_t, c_int]),
    "set_pci_intx_level": (c_int, [_h, domid_t, c_uint16, c_uint8, c_uint8, c_uint8, c_uint]),
    "set_isa_irq_level": (c_int, [_h, domid_t, c_uint8, c_uint]),
    "set_irq_level": (c_int, [_h, domid_t, c_uint, c_uint]),
    "set_pci_link_route": (c_int, [_h, domid_t, c_uint8, c_uint8]),
    "inject_msi": (c_int, [_h, domid_t, c_uint64, c_uint32]),
    "track_dirty_vram": (c_int, [_h, domid_t, c_uint64, c_uint32, POINTER(c_ulong)]),
    "modified_memory": (c_int, [_h, domid_t, c_uint64, c_uint32]),
    "modified_memory_bulk": (c_int, [_h, domid_t, POINTER(xen_dm_op_modified_memory_extent), c_uint32]),
    "set_mem_type": (c_int, [_h, domid_t, hvmmem_type_t, c_uint64, c_uint32]),
    "inject_event": (c_int, [_h, domid_t, c_int, c_uint8, c_uint8, c_uint32, c_uint8, c_uint64]),
    "shutdown": (c_int, [_h, domid_t, c_uint]),
    "relocate_memory": (c_int, [_h, domid_t, c_uint32, c_uint64, c_uint64]),
    "pin_memory_cacheattr": (c_int, [_h, domid_t, c_uint64, c_uint64, c_uint32]),
    "nr_vcpus": (c_int, [_h, domid_t, POINTER(c_uint)]),
    "restrict": (c_int, [_h, domid_t]),
}

#: Functions added after VERS_1.0 (Xen 4.9), with the Xen release that exports them.
SINCE = {
    "shutdown": "4.10",
    "relocate_memory": "4.11",
    "pin_memory_cacheattr": "4.11",
    "modified_memory_bulk": "4.12",
    "set_irq_level": "4.15",
    "nr_vcpus": "4.15",
}

#: Functions of the other libraries added after their first version (symbol version
#: in the library's ``libxen*.map``), with the Xen release that exports them.
SYMBOL_SINCE = {
    "xenevtchn_restrict": "4.8",
    "xenforeignmemory_restrict": "4.8",
    "xenforeignmemory_map_resource": "4.11",
    "xenforeignmemory_unmap_resource": "4.11",
}

_XTL_CRITICAL = 9  # xentoollog_level: only CRITICAL messages reach stderr


class MissingFunctionError(UnsupportedError):
    """The installed C library lacks the function an op needs."""

    def __init__(self, function: str, library: str, op: str, domid: int | None = None) -> None:
        super().__init__(errno.EOPNOTSUPP, op, domid, layer="libxen")
        self.function = function
        self.library = library

    def __str__(self) -> str:
        name = self.function.removeprefix("xendevicemodel_")
        release = SINCE.get(name) if name != self.function else SYMBOL_SINCE.get(self.function)
        since = f" (exported since Xen {release})" if release else ""
        return f"libxen {self.op}: {self.library} has no {self.function}{since} [EOPNOTSUPP]"


def library_path(soname: str, libdir: str | None) -> str:
    """What to hand ``dlopen``: the soname (the loader's search), or a file in ``libdir``."""
    return soname if libdir is None else os.path.join(libdir, soname)


def load_library(soname: str, libdir: str | None) -> ctypes.CDLL:
    """Load a library with ``use_errno``; ``FileNotFoundError`` naming it if it cannot be."""
    path = library_path(soname, libdir)
    try:
        return ctypes.CDLL(path, use_errno=True)
    except OSError as e:
        raise FileNotFoundError(errno.ENOENT, f"cannot load {soname}: {e}", path) from None


def declare(lib: ctypes.CDLL, symbol: str, restype: Any, argtypes: list[Any]) -> Any:
    """The C function ``symbol`` with its prototype applied, or None if the library lacks it."""
    if not hasattr(lib, symbol):
        return None
    function = getattr(lib, symbol)
    function.restype, function.argtypes = restype, argtypes
    return function


class QuietLogger:
    """A xentoollog logger on stderr letting only CRITICAL through, for a library's
    ``*_open(logger, flags)``: failures come back as exceptions, not as stderr noise.
    ``pointer`` is None when libxentoollog is missing (the library then logs itself)."""

    def __init__(self, libdir: str | None) -> None:
        self.pointer: int | None = None
        self._toollog: ctypes.CDLL | None = None
        try:
            self._toollog = ctypes.CDLL(library_path(SONAMES["toollog"], libdir), use_errno=True)
            stderr = c_void_p.in_dll(ctypes.CDLL(None), "stderr").value
        except (OSError, ValueError):
            return
        create = declare(self._toollog, "xtl_createlogger_stdiostream", c_void_p, [c_void_p, c_int, c_uint])
        if create is not None and declare(self._toollog, "xtl_logger_destroy", None, [c_void_p]) is not None:
            self.pointer = create(stderr, _XTL_CRITICAL, 0)

    def destroy(self) -> None:
        pointer, self.pointer = self.pointer, None
        if pointer is not None and self._toollog is not None:
            self._toollog.xtl_logger_destroy(pointer)


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", c_char_p), ("dli_fbase", c_void_p), ("dli_sname", c_char_p), ("dli_saddr", c_void_p)]


def _library_file(lib: ctypes.CDLL, symbol: str) -> str | None:
    """The file a symbol was loaded from, symlinks resolved (``dladdr``)."""
    try:
        dladdr = ctypes.CDLL(None).dladdr
    except AttributeError:
        return None
    dladdr.argtypes, dladdr.restype = [c_void_p, POINTER(_DlInfo)], c_int
    info = _DlInfo()
    if not dladdr(ctypes.cast(getattr(lib, symbol), c_void_p), byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(os.fsdecode(info.dli_fname))


def _describe_library(lib: ctypes.CDLL, soname: str, symbol: str) -> dict[str, Any]:
    path = _library_file(lib, symbol)
    version = None
    if path is not None:
        tail = os.path.basename(path).partition(".so.")[2]
        version = tail or None
    return {"soname": soname, "file": path, "version": version}


class LibxenBackend(Backend):
    """A ``xendevicemodel_handle`` and the C functions to use it.  Each op's call is the
    generic one over ``dm_op`` (``Backend.compile_call``): the C function is the marshaller."""

    name = "libxen"

    def __init__(self, libdir: str | os.PathLike[str] | None = None, limits: Limits = Limits()) -> None:
        """Load the libraries (by soname, or from ``libdir``) and open a handle.

        Raises ``FileNotFoundError`` if libxendevicemodel cannot be loaded and
        ``NotXenHostError`` if ``/dev/xen/privcmd`` is absent."""
        self.limits = limits
        self.libdir = None if libdir is None else os.fspath(libdir)
        self.restricted_to: int | None = None
        self._dm = self._load_required(SONAMES["devicemodel"])
        self._toolcore = self._load(SONAMES["toolcore"])
        self._toollog = self._load(SONAMES["toollog"])
        self._functions: dict[str, Callable[..., int]] = {}
        self.missing: list[str] = []
        for short, (restype, argtypes) in PROTOTYPES.items():
            symbol = f"xendevicemodel_{short}"
            if not hasattr(self._dm, symbol):
                self.missing.append(symbol)
                continue
            function = getattr(self._dm, symbol)
            function.restype, function.argtypes = restype, argtypes
            self._functions[short] = function
        if "open" not in self._functions or "close" not in self._functions:
            library = SONAMES["devicemodel"]
            raise FileNotFoundError(errno.ENOENT, f"{library} lacks xendevicemodel_open/close", self._path(library))
        self._logger = QuietLogger(self.libdir)
        ctypes.set_errno(0)
        handle = self._functions["open"](self._logger.pointer, 0)
        if not handle:
            err = ctypes.get_errno() or errno.EIO
            self._logger.destroy()
            if err in NOT_XEN:
                raise NotXenHostError(err, f"xendevicemodel_open: not a Xen host ({os.strerror(err)})", PRIVCMD_PATH)
            raise OSError(err, f"xendevicemodel_open: {os.strerror(err)}", PRIVCMD_PATH)
        self._handle: int | None = handle

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, limits: Limits = Limits()) -> LibxenBackend:
        """The backend with ``$XENDMOP_LIBXEN_DIR`` as ``libdir`` when set: for the edge
        (auto-selection, CLI); library code passes ``libdir`` instead."""
        return cls(environ.get(LIBDIR_ENV) or None, limits)

    # --- loading -------------------------------------------------------------------

    def _path(self, soname: str) -> str:
        return library_path(soname, self.libdir)

    def _load_required(self, soname: str) -> ctypes.CDLL:
        return load_library(soname, self.libdir)

    def _load(self, soname: str) -> ctypes.CDLL | None:
        """An optional library: None when it cannot be loaded."""
        try:
            return load_library(soname, self.libdir)
        except FileNotFoundError:
            return None

    # --- calling -------------------------------------------------------------------

    @property
    def handle(self) -> int:
        if self._handle is None:
            raise ClosedHandleError("the libxen handle is closed")
        return self._handle

    def supports(self, function: str) -> bool:
        """Does the installed libxendevicemodel export ``xendevicemodel_<function>``?"""
        return function in self._functions

    def c_call(
        self, function: str, op: str, domid: int, fields: Mapping[str, int], *args: Any, layer: str = "dm_op"
    ) -> None:
        """Call ``xendevicemodel_<function>(handle, domid, *args)``; -1 → XenError."""
        handle = self.handle
        c_function = self._functions.get(function)
        if c_function is None:
            raise MissingFunctionError(f"xendevicemodel_{function}", SONAMES["devicemodel"], op, domid)
        ctypes.set_errno(0)
        if c_function(handle, domid, *args) != 0:
            raise xen_error(ctypes.get_errno() or errno.EIO, op, domid, fields, layer)

    def dm_op(
        self, decl: OpDecl, domid: int, fields: Mapping[str, int], slot_data: Sequence[Any] = ()
    ) -> tuple[Any, list[bytes]]:
        if self.restricted_to is not None and domid != self.restricted_to:
            raise xen_error(errno.EPERM, decl.name, domid, fields, layer="privcmd")
        handler = _HANDLERS.get(decl.name)
        if handler is None and decl.function not in PROTOTYPES:
            raise UnsupportedError(errno.EOPNOTSUPP, decl.name, domid, fields, layer="libxen")
        for name, value in fields.items():
            if name not in decl.params and value != 0:
                raise UnsupportedError(errno.EOPNOTSUPP, decl.name, domid, {name: value}, layer="libxen")
        out = decl.struct(**fields)
        if handler is None:
            return out, _simple(self, decl, domid, fields)
        return out, handler(self, decl.name, domid, fields, out, slot_data)

    def restrict(self, domid: int) -> None:
        """``xendevicemodel_restrict``: this handle may only target ``domid`` from now on."""
        if not 0 <= domid < DOMID_FIRST_RESERVED:
            raise ArgumentError("restrict", "domid", domid, "must be a guest domid (0..0x7fef)")
        self.c_call("restrict", "restrict", domid, {}, layer="privcmd")  # IOCTL_PRIVCMD_RESTRICT inside
        self.restricted_to = domid

    def restrict_all(self, domid: int) -> None:
        """``xentoolcore_restrict_all``: restrict every Xen library handle of this
        process (not only this one) to ``domid``, as deprivileged QEMU does."""
        if not 0 <= domid < DOMID_FIRST_RESERVED:
            raise ArgumentError("restrict_all", "domid", domid, "must be a guest domid (0..0x7fef)")
        library = SONAMES["toolcore"]
        if self._toolcore is None or not hasattr(self._toolcore, "xentoolcore_restrict_all"):
            raise MissingFunctionError("xentoolcore_restrict_all", library, "restrict_all", domid)
        restrict_all = self._toolcore.xentoolcore_restrict_all
        restrict_all.restype, restrict_all.argtypes = c_int, [domid_t]
        ctypes.set_errno(0)
        if restrict_all(domid) != 0:
            raise xen_error(ctypes.get_errno() or errno.EIO, "restrict_all", domid, layer="libxentoolcore")
        self.restricted_to = domid

    def describe(self) -> dict[str, Any]:
        libraries = {"libxendevicemodel": _describe_library(self._dm, SONAMES["devicemodel"], "xendevicemodel_open")}
        for key, lib, symbol in (
            ("libxentoolcore", self._toolcore, "xentoolcore_restrict_all"),
            ("libxentoollog", self._toollog, "xtl_logger_destroy"),
        ):
            if lib is not None and hasattr(lib, symbol):
                libraries[key] = _describe_library(lib, SONAMES[key.removeprefix("libxen")], symbol)
        return {
            "backend": self.name,
            "libdir": self.libdir,
            "libraries": libraries,
            "missing": list(self.missing),
            "restricted_to": self.restricted_to,
            "limits": {"max_nr_bufs": self.limits.max_nr_bufs, "max_buf_size": self.limits.max_buf_size},
        }

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            self._functions["close"](handle)
            self._logger.destroy()


# --- one handler per DMOP: rebuild the C arguments from the op struct's fields -----------

_Outs = list[bytes]
_Handler = Callable[[LibxenBackend, str, int, Mapping[str, int], Any, Sequence[Any]], _Outs]


def _create_ioreq_server(b: LibxenBackend, op: str, domid: int, f: Mapping[str, int], out: Any, _: Any) -> _Outs:
    id = ioservid_t()
    b.c_call("create_ioreq_server", op, domid, f, f.get("handle_bufioreq", 0), byref(id))
    out.id = id.value
    return []


def _get_ioreq_server_info(b: LibxenBackend, op: str, domid: int, f: Mapping[str, int], out: Any, _: Any) -> _Outs:
    # libxendevicemodel (4.11+) sets XEN_DMOP_no_gfns itself when both gfn pointers are NULL.
    flags = f.get("flags", 0)
    if flags not in (0, XEN_DMOP_no_gfns):
        raise UnsupportedError(errno.EOPNOTSUPP, op, domid, f, layer="libxen")
    port = evtchn_port_t()
    if flags:
        b.c_call("get_ioreq_server_info", op, domid, f, f.get("id", 0), None, None, byref(port))
    else:
        ioreq_gfn, bufioreq_gfn = xen_pfn_t(), xen_pfn_t()
        gfns = byref(ioreq_gfn), byref(bufioreq_gfn)
        b.c_call("get_ioreq_server_info", op, domid, f, f.get("id", 0), *gfns, byref(port))
        out.ioreq_gfn, out.bufioreq_gfn = ioreq_gfn.value, bufioreq_gfn.value
    out.bufioreq_port = port.value
    return []


def _io_range(function: str) -> _Handler:
    """map/unmap_io_range: ports and MMIO as ``is_mmio``, one PCI function as pcidev."""

    def handler(b: LibxenBackend, op: str, domid: int, f: Mapping[str, int], out: Any, _: Any) -> _Outs:
        id, kind, start, end = f.get("id", 0), f.get("type", 0), f.get("start", 0), f.get("end", 0)
        if kind in (XEN_DMOP_IO_RANGE_PORT, XEN_DMOP_IO_RANGE_MEMORY):
            b.c_call(f"{function}_io_range_{'to' if function == 'map' else 'from'}_ioreq_server", op, domid, f,
                 id, int(kind == XEN_DMOP_IO_RANGE_MEMORY), start, end)
            return []
        sbdf = (start >> 16 & 0xFFFF, start >> 8 & 0xFF, start >> 3 & 0x1F, start & 7)
        if kind != XEN_DMOP_IO_RANGE_PCI or start != end or XEN_DMOP_PCI_SBDF(*sbdf) != start:
            # libxendevicemodel has no call for another type or a range of PCI functions
            raise UnsupportedError(errno.EOPNOTSUPP, op, domid, f, layer="libxen")
        b.c_call(f"{function}_pcidev_{'to' if function == 'map' else 'from'}_ioreq_server", op, domid, f, id, *sbdf)
        return []

    return handler


def _simple(b: LibxenBackend, decl: OpDecl, domid: int, f: Mapping[str, int]) -> _Outs:
    """The op's C function (``decl.function``) with its ``params`` in order, nothing read back.

    ctypes passes the low bits of each value, so ``inject_event``'s ``int vcpu``
    carries the uint32 ``vcpuid`` bit for bit, as C's conversion would."""
    b.c_call(decl.function, decl.name, domid, f, *(f.get(name, 0) for name in decl.params))
    return []


def not_a_page_start(pair: Any) -> Any:
    """A pointer into ``pair`` (two words) that does not start a page."""
    address = ctypes.addressof(pair)
    return ctypes.cast(address if address % PAGE_SIZE else address + ctypes.sizeof(c_ulong), POINTER(c_ulong))


def _track_dirty_vram(b: LibxenBackend, op: str, domid: int, f: Mapping[str, int], out: Any, _: Any) -> _Outs:
    nr = f.get("nr", 0)
    nbytes = (nr + 7) // 8
    if nbytes == 0:
        # "Stop tracking": libxendevicemodel hands our pointer to privcmd as a 0-byte buffer,
        # and a page-aligned one makes lock_pages pin nothing (EFAULT; it corrupted dom0
        # memory on Linux 6.1: HAZARD 2 in integration/scenarios.py).  Of two adjacent words
        # at most one starts a page: point at one that does not.
        pair = (c_ulong * 2)()
        b.c_call("track_dirty_vram", op, domid, f, f.get("first_pfn", 0), 0, not_a_page_start(pair))
        return [b""]
    words = (c_ulong * -(-nbytes // ctypes.sizeof(c_ulong)))()  # C wants unsigned long[]
    b.c_call("track_dirty_vram", op, domid, f, f.get("first_pfn", 0), nr, words)
    return [bytes(words)[:nbytes]]


def _modified_memory(b: LibxenBackend, op: str, domid: int, f: Mapping[str, int], out: Any, slots: Any) -> _Outs:
    extent = xen_dm_op_modified_memory_extent
    count = f.get("nr_extents", 0)
    raw = bytes(memoryview(slots[0]).cast("B"))
    if len(raw) != count * ctypes.sizeof(extent):
        raise ArgumentError(op, "extents", len(raw), f"must be {count * ctypes.sizeof(extent)} bytes")
    array = (extent * count).from_buffer_copy(raw)
    if not b.supports("modified_memory_bulk") and count == 1 and array[0].pad == 0:
        b.c_call("modified_memory", op, domid, f, array[0].first_pfn, array[0].nr)  # before Xen 4.12
        return []
    b.c_call("modified_memory_bulk", op, domid, f, array, count)
    return []


def _nr_vcpus(b: LibxenBackend, op: str, domid: int, f: Mapping[str, int], out: Any, _: Any) -> _Outs:
    vcpus = c_uint()
    b.c_call("nr_vcpus", op, domid, f, byref(vcpus))
    out.vcpus = vcpus.value
    return []


#: DMOP name -> handler, for the ops whose C call is not their ``params`` in order (``_simple``):
#: a pointer to read back, an io-range type that picks the function, a slot
_HANDLERS: dict[str, _Handler] = {
    "create_ioreq_server": _create_ioreq_server,
    "get_ioreq_server_info": _get_ioreq_server_info,
    "map_io_range_to_ioreq_server": _io_range("map"),
    "unmap_io_range_from_ioreq_server": _io_range("unmap"),
    "track_dirty_vram": _track_dirty_vram,
    "modified_memory": _modified_memory,
    "nr_vcpus": _nr_vcpus,
}


# --- libxenctrl: a read-only domain query ------------------------------------------------------

#: ``xen/include/public/domctl.h`` (Xen 4.17, XEN_DOMCTL_INTERFACE_VERSION 0x15): XEN_DOMINF_* bits
XEN_DOMINF_dying = 1 << 0
XEN_DOMINF_hvm_guest = 1 << 1
XEN_DOMINF_shutdown = 1 << 2
XEN_DOMINF_paused = 1 << 3
XEN_DOMINF_shutdownshift = 16
XEN_DOMINF_shutdownmask = 0xFF
XEN_INVALID_MAX_VCPU_ID = 0xFFFFFFFF
#: ``xen/include/public/arch-x86/xen.h``: struct xen_arch_domainconfig's emulation_flags bits
XEN_X86_EMU_LAPIC = 1 << 0
XEN_X86_EMU_IOAPIC = 1 << 4
XEN_X86_EMU_PIC = 1 << 5


class xen_arch_domainconfig(ctypes.Structure):
    _fields_ = [("emulation_flags", c_uint32), ("misc_flags", c_uint32)]


class xen_domctl_getdomaininfo(ctypes.Structure):
    _fields_ = [
        ("domain", domid_t),
        ("pad1", c_uint16),
        ("flags", c_uint32),
        ("tot_pages", c_uint64),
        ("max_pages", c_uint64),
        ("outstanding_pages", c_uint64),
        ("shr_pages", c_uint64),
        ("paged_pages", c_uint64),
        ("shared_info_frame", c_uint64),
        ("cpu_time", c_uint64),
        ("nr_online_vcpus", c_uint32),
        ("max_vcpu_id", c_uint32),
        ("ssidref", c_uint32),
        ("handle", c_uint8 * 16),
        ("cpupool", c_uint32),
        ("gpaddr_bits", c_uint8),
        ("pad2", c_uint8 * 7),
        ("arch_config", xen_arch_domainconfig),
    ]


#: Room for one record whatever the installed libxenctrl's own sizeof is: it copies
#: its sizeof bytes into our buffer, and a later Xen may append fields.
_DOMAININFO_ROOM = 1024


class DomainKind(enum.Enum):
    """What kind of guest a domain is, as far as device models care."""

    HVM = "HVM"  # emulated platform: PIC, IOAPIC, PIT, ... (ISA IRQs, the ioreq devices of a PC)
    PVH = "PVH"  # an HVM container without emulated devices: only the local APIC
    PV = "PV"  # paravirtualised: DMOPs refused (EINVAL since Xen 4.15)


@dataclass(frozen=True)
class DomainInfo:
    """``xc_domain_getinfolist`` for one domain, read-only."""

    domid: int
    kind: DomainKind
    dying: bool
    shutdown: bool
    shutdown_reason: int | None  # SHUTDOWN_* when ``shutdown``
    paused: bool
    vcpus: int  # max_vcpu_id + 1: the number of ioreq slots the domain uses
    online_vcpus: int
    emulation_flags: int  # XEN_X86_EMU_* (0 for PV)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind.value}


def domain_kind(flags: int, emulation_flags: int) -> DomainKind:
    """PV without XEN_DOMINF_hvm_guest; PVH when HVM but without the emulated PIC.

    Xen accepts only two emulation sets for an HVM domU (``emulation_flags_ok`` in
    ``xen/arch/x86/domain.c``): everything (an HVM guest) or the local APIC alone (PVH,
    as libxl's ``libxl__arch_domain_prepare_config`` asks, ``tools/libs/light/libxl_x86.c``).
    A domain without the PIC has no ISA IRQs to drive (``has_vpic``)."""
    if not flags & XEN_DOMINF_hvm_guest:
        return DomainKind.PV
    return DomainKind.HVM if emulation_flags & XEN_X86_EMU_PIC else DomainKind.PVH


def _find_libxenctrl(libdir: str | None) -> str | None:
    """libxenctrl's soname carries the Xen release (``libxenctrl.so.4.17``): find it."""
    if libdir is not None:
        listing = os.listdir(libdir) if os.path.isdir(libdir) else []
        names = [n for n in listing if re.fullmatch(r"libxenctrl\.so(\.\d+)*", n)]
        if not names:
            return None
        newest = max(names, key=lambda n: [int(part) for part in n.split(".so")[1].split(".") if part])
        return os.path.join(libdir, newest)
    return ctypes.util.find_library("xenctrl")


class LibxenCtrl:
    """An ``xc_interface`` used for one thing: ``domain_info`` (``XEN_SYSCTL_getdomaininfolist``).

    Raises ``FileNotFoundError`` when libxenctrl is not installed, ``NotXenHostError``
    off Xen, ``UnsupportedError`` off x86 (the ``arch_config`` mirrored here is x86's),
    ``MissingFunctionError`` if the library lacks ``xc_domain_getinfolist``."""

    def __init__(self, libdir: str | os.PathLike[str] | None = None) -> None:
        if platform.machine().lower() not in ("x86_64", "amd64"):
            raise UnsupportedError(errno.EOPNOTSUPP, "domain_info", layer="libxenctrl")
        self.libdir = None if libdir is None else os.fspath(libdir)
        path = _find_libxenctrl(self.libdir)
        if path is None:
            raise FileNotFoundError(errno.ENOENT, "libxenctrl is not installed (libxenctrl.so.*)", self.libdir)
        self.path = path
        self._lib = load_library(path, None)
        self._open = declare(self._lib, "xc_interface_open", c_void_p, [c_void_p, c_void_p, c_uint])
        self._close = declare(self._lib, "xc_interface_close", c_int, [c_void_p])
        self._getinfolist = declare(
            self._lib, "xc_domain_getinfolist", c_int, [c_void_p, c_uint32, c_uint, c_void_p]
        )
        for name, function in (("xc_interface_open", self._open), ("xc_interface_close", self._close)):
            if function is None:
                raise MissingFunctionError(name, os.path.basename(path), "open")
        self._logger = QuietLogger(self.libdir)
        ctypes.set_errno(0)
        handle = self._open(self._logger.pointer, self._logger.pointer, 0)
        if not handle:
            err = ctypes.get_errno() or errno.EIO
            self._logger.destroy()
            if err in NOT_XEN:
                raise NotXenHostError(err, f"xc_interface_open: not a Xen host ({os.strerror(err)})", PRIVCMD_PATH)
            raise OSError(err, f"xc_interface_open: {os.strerror(err)}", PRIVCMD_PATH)
        self._handle: int | None = handle

    def domain_info(self, domid: int) -> DomainInfo:
        """The domain's kind, state and vCPUs.  ``XenError`` ESRCH (a ``ProcessLookupError``)
        when there is no such domain; the libxenctrl errno when the query fails."""
        if isinstance(domid, bool) or not isinstance(domid, int) or not 0 <= domid < DOMID_FIRST_RESERVED:
            raise ArgumentError("domain_info", "domid", domid, "must be a domid (0..0x7fef)")
        if self._handle is None:
            raise ClosedHandleError("the libxenctrl handle is closed")
        if self._getinfolist is None:
            raise MissingFunctionError("xc_domain_getinfolist", os.path.basename(self.path), "domain_info", domid)
        room = (ctypes.c_uint8 * _DOMAININFO_ROOM)()
        ctypes.set_errno(0)
        count = self._getinfolist(self._handle, domid, 1, room)
        if count < 0:
            raise xen_error(ctypes.get_errno() or errno.EIO, "domain_info", domid, layer="libxenctrl")
        info = xen_domctl_getdomaininfo.from_buffer(room)
        if count == 0 or info.domain != domid:  # the list starts at the next existing domain
            raise xen_error(errno.ESRCH, "domain_info", domid, layer="libxenctrl")
        flags = info.flags
        shutdown = bool(flags & XEN_DOMINF_shutdown)
        hvm = bool(flags & XEN_DOMINF_hvm_guest)
        return DomainInfo(
            domid=domid,
            kind=domain_kind(flags, info.arch_config.emulation_flags),
            dying=bool(flags & XEN_DOMINF_dying),
            shutdown=shutdown,
            shutdown_reason=(flags >> XEN_DOMINF_shutdownshift) & XEN_DOMINF_shutdownmask if shutdown else None,
            paused=bool(flags & XEN_DOMINF_paused),
            vcpus=0 if info.max_vcpu_id == XEN_INVALID_MAX_VCPU_ID else info.max_vcpu_id + 1,
            online_vcpus=info.nr_online_vcpus,
            emulation_flags=info.arch_config.emulation_flags if hvm else 0,
        )

    def describe(self) -> dict[str, Any]:
        return {**_describe_library(self._lib, os.path.basename(self.path), "xc_interface_open")}

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None and self._close is not None:
            self._close(handle)
            self._logger.destroy()

    def __enter__(self) -> LibxenCtrl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GuestKindError(XenError):
    """An op refused before reaching Xen because the domain is not an HVM guest."""

    def __init__(self, op: str, info: DomainInfo) -> None:
        super().__init__(errno.EINVAL, op, info.domid, {"kind": info.kind.value}, layer="libxenctrl")
        self.info = info

    def __str__(self) -> str:
        return (
            f"{self.op}: dom{self.domid} is a {self.info.kind.value} guest, not HVM: refused before reaching Xen "
            "(it has no emulated PIC/IOAPIC; an ISA IRQ op accepted for a PVH guest crashed Xen 4.17.7) [EINVAL]"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (GuestKindError, (self.op, self.info))


def refuse_unless_hvm(
    domid: int, op: str = "refuse_unless_hvm", *, ctrl: LibxenCtrl | None = None
) -> DomainInfo | None:
    """Raise ``GuestKindError`` if ``domid`` is a PVH or PV guest; return its info.

    For device models that drive ISA IRQs or other emulated-platform ops.  When the
    kind cannot be known (no libxenctrl, not a Xen host) it logs a warning and returns
    None: the check is a guard, not a requirement.  ``ctrl``: an open ``LibxenCtrl``
    to use (otherwise one is opened and closed here)."""
    own = ctrl is None
    try:
        if ctrl is None:
            ctrl = LibxenCtrl()
        info = ctrl.domain_info(domid)
    except (FileNotFoundError, NotXenHostError, UnsupportedError) as e:
        log.warning("dom%s: cannot tell whether it is HVM (%s); %s not guarded", domid, e, op)
        return None
    finally:
        if own and ctrl is not None:
            ctrl.close()
    if info.kind is not DomainKind.HVM:
        raise GuestKindError(op, info)
    return info


def library_report(libdir: str | None = None) -> dict[str, Any]:
    """Which Xen libraries this host has, their files and the functions they lack,
    without opening anything (for ``xendmop info``)."""
    from .libxen_handles import EVTCHN_PROTOTYPES, FOREIGNMEMORY_PROTOTYPES

    report: dict[str, Any] = {}
    wanted = {
        "devicemodel": ("xendevicemodel_", list(PROTOTYPES)),
        "evtchn": ("xenevtchn_", list(EVTCHN_PROTOTYPES)),
        "foreignmemory": ("xenforeignmemory_", list(FOREIGNMEMORY_PROTOTYPES)),
        "toolcore": ("xentoolcore_", ["restrict_all"]),
    }
    for key, (prefix, names) in wanted.items():
        try:
            lib = load_library(SONAMES[key], libdir)
        except FileNotFoundError as e:
            report[SONAMES[key]] = {"found": False, "why": e.strerror}
            continue
        missing = [prefix + n for n in names if not hasattr(lib, prefix + n)]
        present = next((prefix + n for n in names if hasattr(lib, prefix + n)), None)
        described = _describe_library(lib, SONAMES[key], present) if present else {}
        report[SONAMES[key]] = {"found": True, "file": described.get("file"), "missing": missing}
    ctrl = _find_libxenctrl(libdir)
    report["libxenctrl"] = {"found": ctrl is not None, "file": ctrl}
    return report
