"""The libxen backend: DMOPs through Xen's own C libraries, loaded with ctypes.

``libxendevicemodel.so.1`` does the work (every function declared below from the
prototypes of ``tools/include/xendevicemodel.h``, Xen 4.17); ``libxentoollog.so.1``
gives it a logger that keeps quiet (failures come back as exceptions instead), and
``libxentoolcore.so.1`` offers ``xentoolcore_restrict_all``.  Handles of
``libxenforeignmemory`` and ``libxenevtchn`` are in ``libxen_handles`` (the runtime's
``IoreqServer(handles="libxen")``); ``libxenctrl``'s read-only domain query is in
``libxenctrl``.

Each DMOP declaration is mapped to its C function (``_DISPATCH``), the C arguments
rebuilt from the op struct's fields: the io-range ``type`` becomes ``is_mmio`` or a
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
import errno
import os
from collections.abc import Callable, Mapping, Sequence
from ctypes import POINTER, byref, c_char_p, c_int, c_uint, c_uint8, c_uint16, c_uint32, c_uint64, c_ulong, c_void_p
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
from ..errors import ArgumentError, ClosedHandleError, NotXenHostError, UnsupportedError, xen_error
from ..ops import OpDecl
from .base import Limits
from .device import NOT_XEN, PRIVCMD_PATH

__all__ = ["SONAMES", "LibxenBackend", "MissingFunctionError"]

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


class LibxenBackend:
    """A ``xendevicemodel_handle`` and the C functions to use it."""

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
        self._logger = self._quiet_logger()
        ctypes.set_errno(0)
        handle = self._functions["open"](self._logger, 0)
        if not handle:
            err = ctypes.get_errno() or errno.EIO
            self._destroy_logger()
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
        return soname if self.libdir is None else os.path.join(self.libdir, soname)

    def _load_required(self, soname: str) -> ctypes.CDLL:
        try:
            return ctypes.CDLL(self._path(soname), use_errno=True)
        except OSError as e:
            raise FileNotFoundError(errno.ENOENT, f"cannot load {soname}: {e}", self._path(soname)) from None

    def _load(self, soname: str) -> ctypes.CDLL | None:
        """An optional library: None when it cannot be loaded."""
        try:
            return ctypes.CDLL(self._path(soname), use_errno=True)
        except OSError:
            return None

    def _quiet_logger(self) -> int | None:
        """A xentoollog logger on stderr that lets only CRITICAL through, or None
        (the library's default, which prints its errors to stderr)."""
        if self._toollog is None or not hasattr(self._toollog, "xtl_createlogger_stdiostream"):
            return None
        try:
            stderr = c_void_p.in_dll(ctypes.CDLL(None), "stderr").value
        except ValueError:
            return None
        create = self._toollog.xtl_createlogger_stdiostream
        create.restype, create.argtypes = c_void_p, [c_void_p, c_int, c_uint]
        logger: int | None = create(stderr, _XTL_CRITICAL, 0)
        return logger

    def _destroy_logger(self) -> None:
        logger, self._logger = self._logger, None
        if logger is not None and self._toollog is not None:
            destroy = self._toollog.xtl_logger_destroy
            destroy.restype, destroy.argtypes = None, [c_void_p]
            destroy(logger)

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
        entry = _DISPATCH.get(decl.name)
        if entry is None:
            raise UnsupportedError(errno.EOPNOTSUPP, decl.name, domid, fields, layer="libxen")
        handler, carried = entry
        for name, value in fields.items():
            if name not in carried and value != 0:
                raise UnsupportedError(errno.EOPNOTSUPP, decl.name, domid, {name: value}, layer="libxen")
        out = decl.struct(**fields)
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
            "not_yet_used": ["libxenforeignmemory", "libxenevtchn"],
        }

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            self._functions["close"](handle)
            self._destroy_logger()


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


def _simple(function: str, *names: str) -> _Handler:
    """A call whose C arguments are op fields in order, nothing read back.

    ctypes passes the low bits of each value, so ``inject_event``'s ``int vcpu``
    carries the uint32 ``vcpuid`` bit for bit, as C's conversion would."""

    def handler(b: LibxenBackend, op: str, domid: int, f: Mapping[str, int], out: Any, _: Any) -> _Outs:
        b.c_call(function, op, domid, f, *(f.get(name, 0) for name in names))
        return []

    return handler


def _track_dirty_vram(b: LibxenBackend, op: str, domid: int, f: Mapping[str, int], out: Any, _: Any) -> _Outs:
    nr = f.get("nr", 0)
    nbytes = (nr + 7) // 8
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


#: DMOP name -> (handler, the op fields its C function carries)
_DISPATCH: dict[str, tuple[_Handler, frozenset[str]]] = {
    name: (handler, frozenset(carried))
    for name, handler, carried in (
        ("create_ioreq_server", _create_ioreq_server, ("handle_bufioreq",)),
        ("get_ioreq_server_info", _get_ioreq_server_info, ("id", "flags")),
        ("map_io_range_to_ioreq_server", _io_range("map"), ("id", "type", "start", "end")),
        ("unmap_io_range_from_ioreq_server", _io_range("unmap"), ("id", "type", "start", "end")),
        ("set_ioreq_server_state", _simple("set_ioreq_server_state", "id", "enabled"), ("id", "enabled")),
        ("destroy_ioreq_server", _simple("destroy_ioreq_server", "id"), ("id",)),
        ("track_dirty_vram", _track_dirty_vram, ("first_pfn", "nr")),
        (
            "set_pci_intx_level",
            _simple("set_pci_intx_level", "domain", "bus", "device", "intx", "level"),
            ("domain", "bus", "device", "intx", "level"),
        ),
        ("set_isa_irq_level", _simple("set_isa_irq_level", "isa_irq", "level"), ("isa_irq", "level")),
        ("set_pci_link_route", _simple("set_pci_link_route", "link", "isa_irq"), ("link", "isa_irq")),
        ("modified_memory", _modified_memory, ("nr_extents",)),
        (
            "set_mem_type",
            _simple("set_mem_type", "mem_type", "first_pfn", "nr"),
            ("mem_type", "first_pfn", "nr"),
        ),
        (
            "inject_event",
            _simple("inject_event", "vcpuid", "vector", "type", "error_code", "insn_len", "cr2"),
            ("vcpuid", "vector", "type", "error_code", "insn_len", "cr2"),
        ),
        ("inject_msi", _simple("inject_msi", "addr", "data"), ("addr", "data")),
        (
            "map_mem_type_to_ioreq_server",
            _simple("map_mem_type_to_ioreq_server", "id", "type", "flags"),
            ("id", "type", "flags"),
        ),
        ("remote_shutdown", _simple("shutdown", "reason"), ("reason",)),
        (
            "relocate_memory",
            _simple("relocate_memory", "size", "src_gfn", "dst_gfn"),
            ("size", "src_gfn", "dst_gfn"),
        ),
        (
            "pin_memory_cacheattr",
            _simple("pin_memory_cacheattr", "start", "end", "type"),
            ("start", "end", "type"),
        ),
        ("set_irq_level", _simple("set_irq_level", "irq", "level"), ("irq", "level")),
        ("nr_vcpus", _nr_vcpus, ()),
    )
}
