"""``DeviceModel``: libxendevicemodel's surface in Python, one method per function.

Each method is named as in C without the ``xendevicemodel_`` prefix, takes the
domid first and the other arguments in C order with C's names, validates them
against the ABI before any syscall (``ArgumentError``), and funnels into one
call per op (``_Calls``), made from the op's declaration by the backend
(``Backend.compile_call``) when the handle opens; ``_call`` hands any declaration
to ``Backend.dm_op``.  Xen's and the kernel's refusals come back as ``XenError``
subclasses carrying the op and the domid.
"""

from __future__ import annotations

import ctypes
import io
import logging
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

from .abi.dm_op import (
    XEN_DMOP_IO_RANGE_MEMORY,
    XEN_DMOP_IO_RANGE_PCI,
    XEN_DMOP_IO_RANGE_PORT,
    XEN_DMOP_no_gfns,
    xen_dm_op_modified_memory_extent,
)
from .abi.xen import DOMID_FIRST_RESERVED
from .backends.base import Backend, Limits
from .backends.selection import BACKENDS, auto_backend, make_backend
from .checks import check_domid, check_int_or_enum, check_sbdf
from .errors import ArgumentError, ClosedHandleError
from .handle import OwnedHandle
from .ops import BY_NAME, CTYPES_MEMORY, OpDecl, caller_memory
from .types import BufIoreq, CacheAttr, EventType, HvmMemType, IoreqServerInfo, MemAccess, ShutdownReason

if TYPE_CHECKING:
    from .types import Buffer
else:  # what get_type_hints (the CLI builds its arguments from the hints) finds at run time
    Buffer = Any

log = logging.getLogger("xendmop")

_EXTENT = xen_dm_op_modified_memory_extent
_EXTENT_SIZE = ctypes.sizeof(_EXTENT)
_Buffer = TypeVar("_Buffer", bound="Buffer")
_Method = TypeVar("_Method", bound=Callable[..., Any])


#: ``GB(1) >> PAGE_SHIFT``: the most pages Xen's ``track_dirty_vram`` (xen/arch/x86/hvm/dm.c)
#: takes in one call; more is EINVAL.  A larger ``nr`` is refused before any DMOP (split into
#: kernel-sized calls, 2**32-1 pages was 131072 DMOPs and a 512 MiB bitmap of nothing usable).
VRAM_MAX_PAGES = (1 << 30) >> 12


class _Calls:
    """One handle's call per op, ``calls.<op>(domid, *params, *slot_data)``: the op's ``params``
    from its declaration (libxendevicemodel's argument order), then its slots' data.

    Each is made by the backend when the handle opens (``Backend.compile_call``: privcmd's are
    the functions of ``backends/privcmd_calls.py``, libxen's the generic call over ``dm_op``).
    A closed handle's ``_Calls`` has none: asking it for one is a ``ClosedHandleError``."""

    def __init__(self, backend: Backend | None) -> None:
        if backend is not None:
            for decl in BY_NAME.values():
                self.__dict__[decl.name] = backend.compile_call(decl, decl.params, decl.slot_args)

    def __getattr__(self, op: str) -> Callable[..., Any]:  # only for an op not made: closed, or none such
        decl = BY_NAME.get(op)
        if decl is None:
            raise AttributeError(op)
        raise ClosedHandleError("the DeviceModel is closed", decl.function)


#: public method -> its op, for the methods whose common form is the op's call itself (``@_entry``)
_ENTRIES: dict[str, str] = {}


def _entry(op: str) -> Callable[[_Method], _Method]:
    """Mark a method whose common form can be its op's call itself.

    Where the backend's ``compile_entry`` has one (privcmd's DM_OP path), a handle's attribute
    is then one function with the method's signature, taking the form that needs nothing but
    the op and calling the method, as written, for every other form: a call costs one Python
    frame, as a ctypes call does, and the method's body stays the reference.  The method takes
    the op's ``params`` in order under their C names (``arg_names``), then its slot's data."""

    def mark(general: _Method) -> _Method:
        _ENTRIES[general.__name__] = op
        return general

    return mark


def entry_shape(op: str) -> tuple[OpDecl, tuple[tuple[str, str], ...], str | None]:
    """An entry's ``(declaration, (argument, field) pairs, slot argument)``: the op's params under
    their C names, without a field an IN slot's size gives (``modified_memory``'s ``nr_extents``)."""
    decl = BY_NAME[op]
    sized = {decl.slots[0].count_expr} if decl.slots and decl.slots[0].is_in else set()
    pairs = tuple((decl.arg_names.get(field, field), field) for field in decl.params if field not in sized)
    return decl, pairs, (decl.slot_args[0] if decl.slots else None)


def _bool(op: str, name: str, value: object) -> int:
    if not isinstance(value, (bool, int)) or value not in (0, 1):
        raise ArgumentError(op, name, value, "must be a bool (0 or 1)")
    return int(value)


class DeviceModel(OwnedHandle[Backend]):
    """A handle for issuing DMOPs; owns its backend; context-managed, closes it on exit."""

    what = "the DeviceModel"

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        self._max_buf_size = backend.limits.max_buf_size  # what one kernel-sized call carries
        self._pages_per_call = 8 * self._max_buf_size  # track_dirty_vram: one bit per page
        self._extent_bytes_per_call = self._max_buf_size // _EXTENT_SIZE * _EXTENT_SIZE
        self._calls = _Calls(backend)
        for method, op in _ENTRIES.items():
            self._bind_entry(backend, method, op)

    def _bind_entry(self, backend: Backend, method: str, op: str) -> None:
        """The handle's ``method`` as its op's call itself, where the backend has one (``@_entry``)."""
        general = DeviceModel.__dict__[method]
        if getattr(type(self), method) is not general:  # a subclass's own method stays as it is
            return
        handle = weakref.ref(self)  # the entry lives in the handle's dict: no cycle through it

        def fallback(*args: Any) -> Any:
            alive = handle()
            if alive is None:
                raise ClosedHandleError("the DeviceModel is gone", method)
            return general(alive, *args)

        decl, pairs, slot = entry_shape(op)
        entry = backend.compile_entry(decl, pairs, slot, method, fallback)
        if entry is not None:
            entry.__doc__, entry.__qualname__ = general.__doc__, general.__qualname__
            self.__dict__[method] = entry

    # --- opening ---------------------------------------------------------------

    @classmethod
    def open(cls, backend: str = "auto", *, xen: Any = None, limits: Limits = Limits()) -> DeviceModel:
        """Open a handle.

        ``backend``: ``"privcmd"`` (``/dev/xen/privcmd`` ioctls), ``"libxen"`` (Xen's C
        libraries through ctypes), ``"mock"`` (the simulated host ``xen``, by default
        ``xendmop.mock.default_host()``), or ``"auto"``: ``$XENDMOP_BACKEND`` if set,
        else privcmd, then libxen, then — only on a machine that is not a Xen host — the
        mock, saying so once with a ``MockFallbackWarning``.  On a Xen host whose privcmd
        cannot be opened (a user without access) ``"auto"`` raises that ``OSError``
        (``PermissionError``, …) naming the device and what to do, never the mock.  A
        ``$XENDMOP_BACKEND`` that names no backend is an ``ArgumentError``.
        """
        if backend not in BACKENDS:
            raise ArgumentError("open", "backend", backend, f"must be one of {', '.join(BACKENDS)}")
        if backend == "auto":
            return cls(auto_backend(xen, limits))
        return cls(make_backend(backend, xen=xen, limits=limits))

    @property
    def backend(self) -> Backend:
        return self._open_backend("backend")

    def _open_backend(self, op: str) -> Backend:
        return self._use(op)

    def _release(self, backend: Backend) -> None:
        """Drop the calls and entries (they hold the backend), then close the backend (``close``)."""
        self._calls = _Calls(None)
        for method in _ENTRIES:
            self.__dict__.pop(method, None)
        backend.close()

    def __repr__(self) -> str:
        return f"<DeviceModel backend={self._resource.name if self._resource else 'closed'}>"

    # --- the funnel --------------------------------------------------------------

    def _call(self, decl: OpDecl, domid: int, fields: Mapping[str, int], slots: Sequence[Any] = ()) -> Any:
        """Any op with any fields, through ``Backend.dm_op`` (the methods use ``self._calls``)."""
        check_domid(decl.name, domid)
        decl.check(fields)
        return self._open_backend(decl.name).dm_op(decl, domid, fields, slots)

    # --- ioreq servers -----------------------------------------------------------

    def create_ioreq_server(self, domid: int, handle_bufioreq: BufIoreq | int = BufIoreq.OFF) -> int:
        """XEN_DMOP_create_ioreq_server: a new, disabled server; returns its id."""
        bufioreq = check_int_or_enum("create_ioreq_server", "handle_bufioreq", handle_bufioreq, BufIoreq)
        out, _ = self._calls.create_ioreq_server(domid, bufioreq)
        return int(out.id)

    def get_ioreq_server_info(self, domid: int, id: int, *, gfns: bool = False) -> IoreqServerInfo:
        """XEN_DMOP_get_ioreq_server_info.  Without ``gfns`` it sets ``XEN_DMOP_no_gfns``
        (pages are then reached by resource mapping), as libxendevicemodel does when
        both gfn pointers are NULL; ``gfns=True`` asks Xen for legacy gfns."""
        flags = 0 if gfns else XEN_DMOP_no_gfns
        out, _ = self._calls.get_ioreq_server_info(domid, id, flags)
        if gfns:
            return IoreqServerInfo(int(out.ioreq_gfn), int(out.bufioreq_gfn), int(out.bufioreq_port))
        return IoreqServerInfo(None, None, int(out.bufioreq_port))

    def map_io_range_to_ioreq_server(self, domid: int, id: int, is_mmio: bool, start: int, end: int) -> None:
        """XEN_DMOP_map_io_range_to_ioreq_server: route ports or MMIO [start, end] to the server."""
        kind = (
            XEN_DMOP_IO_RANGE_MEMORY
            if _bool("map_io_range_to_ioreq_server", "is_mmio", is_mmio)
            else XEN_DMOP_IO_RANGE_PORT
        )
        self._calls.map_io_range_to_ioreq_server(domid, id, kind, start, end)

    def unmap_io_range_from_ioreq_server(self, domid: int, id: int, is_mmio: bool, start: int, end: int) -> None:
        """XEN_DMOP_unmap_io_range_from_ioreq_server: stop routing a fully mapped range."""
        kind = (
            XEN_DMOP_IO_RANGE_MEMORY
            if _bool("unmap_io_range_from_ioreq_server", "is_mmio", is_mmio)
            else XEN_DMOP_IO_RANGE_PORT
        )
        self._calls.unmap_io_range_from_ioreq_server(domid, id, kind, start, end)

    def map_pcidev_to_ioreq_server(
        self, domid: int, id: int, segment: int, bus: int, device: int, function: int
    ) -> None:
        """XEN_DMOP_map_io_range_to_ioreq_server with one PCI function (config space)."""
        sbdf = check_sbdf("map_pcidev_to_ioreq_server", segment, bus, device, function)
        self._calls.map_io_range_to_ioreq_server(domid, id, XEN_DMOP_IO_RANGE_PCI, sbdf, sbdf)

    def unmap_pcidev_from_ioreq_server(
        self, domid: int, id: int, segment: int, bus: int, device: int, function: int
    ) -> None:
        """XEN_DMOP_unmap_io_range_from_ioreq_server with one PCI function."""
        sbdf = check_sbdf("unmap_pcidev_from_ioreq_server", segment, bus, device, function)
        self._calls.unmap_io_range_from_ioreq_server(domid, id, XEN_DMOP_IO_RANGE_PCI, sbdf, sbdf)

    def map_mem_type_to_ioreq_server(self, domid: int, id: int, type: HvmMemType | int, flags: MemAccess | int) -> None:
        """XEN_DMOP_map_mem_type_to_ioreq_server: claim HVMMEM_ioreq_server pages
        (``flags=MemAccess.WRITE``) or release them (``flags=0``)."""
        op = "map_mem_type_to_ioreq_server"
        type = check_int_or_enum(op, "type", type, HvmMemType)
        flags = check_int_or_enum(op, "flags", flags, MemAccess)
        if type != HvmMemType.ioreq_server:
            raise ArgumentError(op, "type", type, "must be HVMMEM_ioreq_server")
        if flags & ~MemAccess.WRITE:
            raise ArgumentError(op, "flags", flags, "only XEN_DMOP_IOREQ_MEM_ACCESS_WRITE is supported")
        self._calls.map_mem_type_to_ioreq_server(domid, id, type, flags)

    def set_ioreq_server_state(self, domid: int, id: int, enabled: bool) -> None:
        """XEN_DMOP_set_ioreq_server_state: enable or disable the server."""
        on = _bool("set_ioreq_server_state", "enabled", enabled)
        self._calls.set_ioreq_server_state(domid, id, on)

    def destroy_ioreq_server(self, domid: int, id: int) -> None:
        """XEN_DMOP_destroy_ioreq_server."""
        self._calls.destroy_ioreq_server(domid, id)

    # --- interrupts ----------------------------------------------------------------

    @_entry("set_pci_intx_level")
    def set_pci_intx_level(self, domid: int, segment: int, bus: int, device: int, intx: int, level: int) -> None:
        """XEN_DMOP_set_pci_intx_level: assert (1) or deassert (0) INTx (0-3 = A-D)."""
        self._calls.set_pci_intx_level(domid, segment, bus, device, intx, level)

    @_entry("set_isa_irq_level")
    def set_isa_irq_level(self, domid: int, irq: int, level: int) -> None:
        """XEN_DMOP_set_isa_irq_level: assert (1) or deassert (0) ISA IRQ ``irq``."""
        self._calls.set_isa_irq_level(domid, irq, level)

    @_entry("set_irq_level")
    def set_irq_level(self, domid: int, irq: int, level: int) -> None:
        """XEN_DMOP_set_irq_level (Arm): set the level of SPI ``irq``; x86 Xen says EOPNOTSUPP."""
        self._calls.set_irq_level(domid, irq, level)

    def set_pci_link_route(self, domid: int, link: int, irq: int) -> None:
        """XEN_DMOP_set_pci_link_route: route PCI link 0-3 to ISA IRQ ``irq`` (0 disables)."""
        self._calls.set_pci_link_route(domid, link, irq)

    @_entry("inject_msi")
    def inject_msi(self, domid: int, msi_addr: int, msi_data: int) -> None:
        """XEN_DMOP_inject_msi."""
        self._calls.inject_msi(domid, msi_addr, msi_data)

    def inject_event(
        self, domid: int, vcpu: int, vector: int, type: EventType | int, error_code: int, insn_len: int, extra: int
    ) -> None:
        """XEN_DMOP_inject_event: latch an event for ``vcpu`` (``extra`` is %cr2 for #PF)."""
        kind = check_int_or_enum("inject_event", "type", type, EventType)
        self._calls.inject_event(domid, vcpu, vector, kind, error_code, insn_len, extra)

    # --- memory --------------------------------------------------------------------

    @overload
    def track_dirty_vram(self, domid: int, first_pfn: int, nr: int, out: None = None) -> bytes: ...

    @overload
    def track_dirty_vram(self, domid: int, first_pfn: int, nr: int, out: _Buffer) -> _Buffer: ...

    @_entry("track_dirty_vram")
    def track_dirty_vram(self, domid: int, first_pfn: int, nr: int, out: Any = None) -> Any:
        """XEN_DMOP_track_dirty_vram: the dirty bitmap of ``nr`` pages from ``first_pfn``
        (bit ``i & 7`` of byte ``i >> 3`` is pfn ``first_pfn + i``), as new ``bytes``.

        ``out``: a writable buffer of at least ``(nr + 7) // 8`` bytes (a ctypes array,
        ``bytearray``, writable ``memoryview``) that receives the bitmap instead, and is
        returned.  On the DM_OP ioctl Xen writes into it directly, as libxendevicemodel's
        caller's ``dirty_bitmap``: no copy, no new object.  A read-only buffer is a
        ``TypeError`` (privcmd would refuse it with EFAULT), a short one an ``ArgumentError``.

        More pages than one privcmd buffer holds (``8 * max_buf_size``) are split into
        several calls and the bitmap reassembled.  Xen tracks one range per domain, so a
        split call re-arms tracking per chunk and reports every page dirty: keep ``nr``
        within one buffer for incremental tracking.  ``nr == 0`` stops tracking.  More than
        ``VRAM_MAX_PAGES`` (1 GiB of frames, Xen's own per-call limit) is an ``ArgumentError``
        before any DMOP.
        """
        call = self._calls.track_dirty_vram  # ClosedHandleError on a closed handle
        per_call = self._pages_per_call
        if nr <= per_call:
            _, (bitmap,) = call(domid, first_pfn, nr, out)
            return bitmap  # out itself, or bytes from either path: no copy
        BY_NAME["track_dirty_vram"].check({"first_pfn": first_pfn, "nr": nr})
        if nr > VRAM_MAX_PAGES:  # before any DMOP or bitmap: no split call could track it anyway
            raise ArgumentError(
                "track_dirty_vram",
                "nr",
                nr,
                f"more than the {VRAM_MAX_PAGES} pages (1 GiB) Xen tracks in one call "
                "(track_dirty_vram in xen/arch/x86/hvm/dm.c refuses more with EINVAL)",
            )
        nbytes = (nr + 7) // 8
        if out is not None:  # checked whole before the first call: each chunk lands in its slice
            address, size, keep = caller_memory("track_dirty_vram", "out", out, writable=True)
            if size < nbytes:
                raise ArgumentError("track_dirty_vram", "out", size, f"must hold at least {nbytes} bytes")
            self._track_in_place(call, domid, first_pfn, nr, address)
            del keep
            return out
        # Into a BytesIO sized once and zero-filled, Xen writing each chunk where it
        # belongs in its buffer; getvalue() then hands over that buffer as the bytes
        # object (it is exactly full and no longer exported): the bitmap exists once.
        assembled = io.BytesIO()
        assembled.seek(nbytes - 1)
        assembled.write(b"\0")
        with assembled.getbuffer() as buffer:
            anchor = ctypes.c_char.from_buffer(buffer)
            try:
                self._track_in_place(call, domid, first_pfn, nr, ctypes.addressof(anchor))
            finally:
                del anchor  # no export left: getvalue() hands over the buffer, no copy
        return assembled.getvalue()

    def _track_in_place(self, call: Callable[..., Any], domid: int, first_pfn: int, nr: int, address: int) -> None:
        """Split ``track_dirty_vram`` over one call per kernel-sized buffer, each writing its
        part of the bitmap at ``address`` in place (a ctypes view made at its address)."""
        per_call = self._pages_per_call  # a multiple of 8: chunks meet at byte edges
        for done in range(0, nr, per_call):
            n = min(per_call, nr - done)
            chunk = (ctypes.c_uint8 * ((n + 7) // 8)).from_address(address + done // 8)
            call(domid, first_pfn + done, n, chunk)

    def modified_memory(self, domid: int, first_pfn: int, nr: int) -> None:
        """XEN_DMOP_modified_memory with one extent."""
        self.modified_memory_bulk(domid, [(first_pfn, nr)])

    @_entry("modified_memory")
    def modified_memory_bulk(self, domid: int, extents: Iterable[tuple[int, int]] | Buffer) -> None:
        """XEN_DMOP_modified_memory: mark extents dirty for log-dirty.

        ``extents``: ``(first_pfn, nr)`` pairs, or extents already packed as
        ``struct xen_dm_op_modified_memory_extent``: a ctypes array of it, or any
        C-contiguous buffer whose length is a multiple of its 16 bytes and whose item
        size divides 16 or is a multiple of it (no Python object per extent).
        Split into calls of at most ``max_buf_size / 16`` extents.  On the DM_OP ioctl,
        packed extents in writable memory that fit one call are handed to the kernel
        where they are, as libxendevicemodel does; read-only ones (``bytes``), split ones
        and the HYPERCALL path go through the hypercall buffer.
        """
        call = self._calls.modified_memory  # ClosedHandleError on a closed handle
        op = "modified_memory"
        data: Any = extents
        ctypes_memory = isinstance(data, CTYPES_MEMORY)
        if ctypes_memory:  # its own memory: its address is the extents'
            total = ctypes.sizeof(data)
        else:
            try:
                view = memoryview(data)
            except TypeError:  # not a buffer: (first_pfn, nr) pairs
                data = self._pack_extents(BY_NAME[op], list(extents))  # type: ignore[arg-type]  # pairs, not a buffer
                total = ctypes.sizeof(data)
            else:
                if not view.c_contiguous:
                    raise ArgumentError(op, "extents", type(data).__name__, "must be C-contiguous memory")
                if _EXTENT_SIZE % view.itemsize and view.itemsize % _EXTENT_SIZE:
                    why = f"item size {view.itemsize} neither divides nor is a multiple of {_EXTENT_SIZE}"
                    raise ArgumentError(op, "extents", view.format, why)
                total = view.nbytes
        if total % _EXTENT_SIZE:
            raise ArgumentError(op, "extents", total, f"byte length must be a multiple of {_EXTENT_SIZE}")
        step = self._extent_bytes_per_call
        if 0 < total <= step:  # one kernel-sized call: the memory as it is
            call(domid, total // _EXTENT_SIZE, data)
            return
        check_domid(op, domid)
        # Split.  Writable memory: each chunk is a ctypes view made at its address
        # (``from_address``, about 0.1 us; a memoryview slice and its export cost 0.7),
        # handed over where it is like a one-call buffer.  Read-only memory (``bytes``),
        # which privcmd would not pin, is copied chunk by chunk into the hypercall buffer.
        address, _, keep = caller_memory(op, "extents", data, writable=False)
        raw = None if address else memoryview(keep).cast("B")
        for start in range(0, total, step):
            n = min(step, total - start)
            chunk = (ctypes.c_char * n).from_address(address + start) if raw is None else raw[start : start + n]
            call(domid, n // _EXTENT_SIZE, chunk)
        del keep  # the caller's buffer was exported until the last call

    @staticmethod
    def _pack_extents(decl: OpDecl, items: list[Any]) -> ctypes.Array[Any]:
        array = (_EXTENT * len(items))()
        for i, item in enumerate(items):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ArgumentError(decl.name, f"extents[{i}]", item, "must be a (first_pfn, nr) pair")
            first_pfn, nr = item
            for name, value, top in (("first_pfn", first_pfn, 2**64 - 1), ("nr", nr, 2**32 - 1)):
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
                    raise ArgumentError(decl.name, f"extents[{i}].{name}", value, "out of range")
            array[i].first_pfn, array[i].nr = first_pfn, nr
        return array

    def set_mem_type(self, domid: int, mem_type: HvmMemType | int, first_pfn: int, nr: int) -> None:
        """XEN_DMOP_set_mem_type: change the p2m type of ``nr`` pages from ``first_pfn``."""
        kind = check_int_or_enum("set_mem_type", "mem_type", mem_type, HvmMemType)
        self._calls.set_mem_type(domid, kind, first_pfn, nr)

    def relocate_memory(self, domid: int, size: int, src_gfn: int, dst_gfn: int) -> None:
        """XEN_DMOP_relocate_memory: move ``size`` pages from ``src_gfn`` to ``dst_gfn``."""
        self._calls.relocate_memory(domid, size, src_gfn, dst_gfn)

    def pin_memory_cacheattr(self, domid: int, start: int, end: int, type: CacheAttr | int) -> None:
        """XEN_DMOP_pin_memory_cacheattr: pin gfns [start, end] to a cache type (CacheAttr)."""
        kind = check_int_or_enum("pin_memory_cacheattr", "type", type, CacheAttr)
        self._calls.pin_memory_cacheattr(domid, start, end, kind)

    # --- domain --------------------------------------------------------------------

    def shutdown(self, domid: int, reason: ShutdownReason | int) -> None:
        """XEN_DMOP_remote_shutdown with a ShutdownReason."""
        self._calls.remote_shutdown(domid, check_int_or_enum("shutdown", "reason", reason, ShutdownReason))

    def nr_vcpus(self, domid: int) -> int:
        """XEN_DMOP_nr_vcpus: the domain's maximum vCPU count."""
        out, _ = self._calls.nr_vcpus(domid)
        return int(out.vcpus)

    def restrict(self, domid: int) -> None:
        """IOCTL_PRIVCMD_RESTRICT: from now on this handle may only target ``domid``;
        calls for other domains raise ``PermissionError`` before reaching the kernel."""
        check_domid("restrict", domid)
        if domid >= DOMID_FIRST_RESERVED:
            raise ArgumentError("restrict", "domid", domid, "must be a guest domid (< 0x7ff0)")
        self._open_backend("restrict").restrict(domid)

    def describe(self) -> dict[str, Any]:
        """What the backend found: device, ioctl path, buffers, restriction, limits."""
        return self._open_backend("describe").describe()
