"""The privcmd backend: DMOPs as ``IOCTL_PRIVCMD_DM_OP`` on ``/dev/xen/privcmd``.

The device is injected: a real ``OsDevice`` on a dom0, or the mock host's device
(``xendmop.mock``); the marshalling below is the same for both.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
from collections.abc import Callable, Mapping, Sequence
from struct import Struct
from types import CodeType, FunctionType
from typing import Any

from ..abi import CONSTANTS
from ..abi.privcmd import IOCTL_PRIVCMD_DM_OP, IOCTL_PRIVCMD_HYPERCALL, IOCTL_PRIVCMD_RESTRICT, privcmd_dm_op
from ..abi.xen import DOMID_FIRST_RESERVED, DOMID_INVALID, domid_t
from ..checks import check_domid
from ..errors import ArgumentError, ClosedHandleError, XenError, xen_error
from ..ops import CTYPES_MEMORY_CLASSES, DM_OP_HEADER, DM_OP_SIZE, CopyBack, OpDecl, Slot, caller_memory
from .base import Limits
from .buffers import EMPTY_SLOT_OFFSET, HEAD_AT, HYPERCALL_ARGS_AT, OP_AT, SLOT_BUF_AT, HypercallBuffers
from .device import PAGE_SIZE, PRIVCMD_PATH, Device, Opener, OsDevice, open_device

log = logging.getLogger(__name__)

_HYPERVISOR_dm_op = CONSTANTS["__HYPERVISOR_dm_op"]
_SLOT_AT = PAGE_SIZE  # Arena.slot_offset(0, n)
_ZEROS = memoryview(bytes(1 << 16))  # read-only zeros to clear an OUT slot without allocating

# The generated per-op call (``PrivcmdBackend.compile_call``).  Its steps are those of
# ``dm_op`` below, in the same order, with the declaration's facts written in as
# constants.  ``{...}`` holes are filled from the declaration; nothing per op is hand-written.
# A public method's entry (``compile_entry``) is the same code with the method's arguments,
# its size rule first (``{size}``), and ``_general`` where the guard fails (``{unguarded}``).
_CALL_TEMPLATE = """
def {name}(domid, {params}):
    if not (domid.__class__ is int and 0 <= domid <= 0xffff and {guard}):
        {unguarded}
{size}    _restricted = _backend.restricted_to
    if _restricted is not None and domid != _restricted:
        raise _xen_error(_EPERM, {op!r}, domid, {fields}, layer="privcmd")
    _device = _backend._device
    if _device is None:
        raise _ClosedHandleError("the privcmd handle is closed", {name!r})
    try:
        _arena = _pop()
    except IndexError:
        _arena = _acquire()
    _view = _arena.view
    try:
{slot}        {pack}
        {ioctl}
        {read_back}
    except _XenError:
        raise
    except OSError as _e:
        raise _xen_error(_e.errno or _EIO, {op!r}, domid, {fields}) from None
    finally:
        _push(_arena)
"""


_HEAD_HYPERCALL = Struct("<QQ")  # privcmd_hypercall.arg[0] = domid, arg[1] = nr_bufs (arg[2] once per arena)
_BUF = Struct("<QQ")  # bufs[1]: uptr, size
#: the DM_OP request's first 48 bytes: dom, num, ubufs, bufs[0] and bufs[1]; the op follows
_REQUEST_HEAD = "<HH4xQQQQQ"
assert (SLOT_BUF_AT, OP_AT) == (32, 48), "the arena layout _REQUEST_HEAD is written for"


def _fields_class_source(decl: OpDecl, params: Sequence[str]) -> str:
    """Source of a small record of the op's fields by name, for a slot's count rule
    (``count=lambda a: ...`` reads them as attributes); made once per compiled op."""
    names = decl._order
    body = "; ".join(f"self.{n} = {n if n in params else 0}" for n in names) or "pass"
    return f"class _Fields:\n    __slots__ = {names!r}\n    def __init__(self, {', '.join(params) or '*_'}): {body}\n"


_MADE: dict[tuple[Any, ...], tuple[CodeType, dict[str, Any]]] = {}


def _slot_buf(in_place: bool, addr: str, size: str) -> str:
    """Where ``bufs[1]`` is set: packed with the whole request on the DM_OP path, alone on the HYPERCALL path."""
    return f"_uptr, _usize = {addr}, {size}" if in_place else f"_pack_buf(_view, {SLOT_BUF_AT}, {addr}, {size})"


def _in_slot_lines(slot: Slot, arg: str, label: str, op: str, room: int, in_place: bool) -> list[str]:
    """An IN slot's marshalling: check its size, then point ``bufs[1]`` at it or copy it."""
    empty = f"_arena.slot_addr + {EMPTY_SLOT_OFFSET}"  # see buffers.py: never a page-aligned 0-byte buffer
    sized = f"_nbytes = _size // {slot.itemsize} * {slot.itemsize}" if slot.count is None else ""
    why = "f'must be {_nbytes} bytes'"
    if not in_place:  # the HYPERCALL path: Xen reads the pointer itself, so only hypercall memory will do
        return [
            f"_raw = {arg}",  # a byte view as is (the bulk path's slices), anything else cast to one
            "if _raw.__class__ is not _memoryview or _raw.format != 'B':",
            f"    _raw = _memoryview({arg}).cast('B')",
            "_size = _raw.nbytes",
            *([sized] if sized else []),
            "if _size != _nbytes:",
            f"    raise _ArgumentError({op!r}, {label!r}, _size, {why})",
            f"if _nbytes > {room}:",
            "    _arena.slot_offset(0, _nbytes)  # raises, naming the sizes",
            f"_view[{_SLOT_AT}:{_SLOT_AT} + _nbytes] = _raw",
            _slot_buf(in_place, f"_arena.slot_addr if _nbytes else {empty}", "_nbytes"),
        ]
    # DM_OP: privcmd pins the caller's pages itself (privcmd_ioctl_dm_op → lock_pages in Linux
    # drivers/xen/privcmd.c), so writable memory is passed where it is; read-only memory,
    # which that pin (FOLL_WRITE) refuses, is copied into the arena
    return [
        f"if {arg}.__class__ in _CTYPES_MEMORY_CLASSES:",  # a ctypes array met before (caller_memory adds it)
        f"    _addr, _size = _addressof({arg}), _sizeof({arg})",  # never 0: _keep is not needed
        "else:",
        f"    _addr, _size, _keep = _caller_memory({op!r}, {label!r}, {arg}, False)",
        *([sized] if sized else []),
        "if _size != _nbytes:",
        f"    raise _ArgumentError({op!r}, {label!r}, _size, {why})",
        f"if _nbytes > {room}:",
        "    _arena.slot_offset(0, _nbytes)  # raises, naming the sizes",
        "if _addr and _nbytes:",
        "    " + _slot_buf(in_place, "_addr", "_nbytes"),
        "else:",
        "    if _nbytes:",
        f"        _view[{_SLOT_AT}:{_SLOT_AT} + _nbytes] = _memoryview(_keep).cast('B')",
        "    " + _slot_buf(in_place, f"_arena.slot_addr if _nbytes else {empty}", "_nbytes"),
    ]


def _out_slot_lines(
    arg: str, label: str, op: str, room: int | None, in_place: bool
) -> tuple[list[str], list[str], str]:
    """An OUT slot's marshalling, what follows the ioctl, and the answer (an expression):
    ``None`` gets a new ``bytes``, a caller's writable buffer of at least ``_nbytes`` bytes
    gets Xen's answer in place and is the answer itself.  ``room``: the arena's slot size,
    or None where the caller has already bounded ``_nbytes`` by it."""
    empty = f"_arena.slot_addr + {EMPTY_SLOT_OFFSET}"  # see buffers.py: never a page-aligned 0-byte buffer
    why = "f'must hold at least {_nbytes} bytes'"
    before = (
        []
        if room is None
        else [f"if _nbytes > {room}:", "    _arena.slot_offset(0, _nbytes)  # raises, naming the sizes"]
    )
    before += [
        f"if {arg} is None:",  # never hand Xen a buffer holding the last call's answer
        f"    _view[{_SLOT_AT}:{_SLOT_AT} + _nbytes] = _zeros[:_nbytes]",
        "    " + _slot_buf(in_place, f"_arena.slot_addr if _nbytes else {empty}", "_nbytes"),
        "else:",
        f"    if {arg}.__class__ in _CTYPES_MEMORY_CLASSES:",  # a ctypes array met before (caller_memory adds it)
        f"        _addr, _size = _addressof({arg}), _sizeof({arg})",
        "    else:",
        f"        _addr, _size, _keep = _caller_memory({op!r}, {label!r}, {arg}, True)",
        "    if _size < _nbytes:",
        f"        raise _ArgumentError({op!r}, {label!r}, _size, {why})",
    ]
    answer = f"_view[{_SLOT_AT}:{_SLOT_AT} + _nbytes].tobytes() if {arg} is None else {arg}"
    if in_place:  # DM_OP: Xen writes through privcmd's pin of the caller's pages (lock_pages)
        before += ["    " + _slot_buf(in_place, f"_addr if _nbytes else {empty}", "_nbytes")]
        return before, [f"_outs = [{answer}]"], answer
    before += [  # HYPERCALL: through the arena, which starts as the caller's bytes (libxendevicemodel's bounce)
        "    if _nbytes:",
        "        _memmove(_arena.slot_addr, _addr, _nbytes)",
        "    " + _slot_buf(in_place, f"_arena.slot_addr if _nbytes else {empty}", "_nbytes"),
    ]
    after = [
        f"if {arg} is not None and _nbytes:",
        "    _memmove(_addr, _arena.slot_addr, _nbytes)",
        f"_outs = [{answer}]",
    ]
    return before, after, answer


def _call_globals(decl: OpDecl) -> dict[str, Any]:
    """The names a generated call or entry of ``decl`` uses that depend on neither the backend nor the handle."""

    def slow_check(domid: int, fields: Mapping[str, int]) -> None:  # the typed error, or a bool/IntEnum's go-ahead
        check_domid(decl.name, domid)
        decl.check(fields)

    shared: dict[str, Any] = {
        "_check": slow_check,
        "_xen_error": xen_error,
        "_XenError": XenError,
        "_ClosedHandleError": ClosedHandleError,
        "_ArgumentError": ArgumentError,
        "_EPERM": errno.EPERM,
        "_EIO": errno.EIO,
        "_pack_op": decl._packer.pack_into,
        "_pack_head": _HEAD_HYPERCALL.pack_into,
        "_pack_request": Struct(_REQUEST_HEAD + decl._packer.format.lstrip("<")).pack_into,
        "_pack_buf": _BUF.pack_into,
        "_from_copy": decl.struct.from_buffer_copy,
        "_zeros": _ZEROS,
        "_memoryview": memoryview,
        "_fcntl_ioctl": fcntl.ioctl,
        "_CTYPES_MEMORY_CLASSES": CTYPES_MEMORY_CLASSES,
        "_addressof": ctypes.addressof,
        "_sizeof": ctypes.sizeof,
        "_caller_memory": caller_memory,
        "_memmove": ctypes.memmove,
    }
    return shared


def _make_call(
    decl: OpDecl,
    params: tuple[str, ...],
    hypercall: bool,
    slot_room: int,
    os_device: bool,
    slot_params: tuple[str, ...] = (),
) -> tuple[CodeType, dict[str, Any]]:
    """The code of one op's call (``_CALL_TEMPLATE`` filled from ``decl``) and the
    globals it needs that do not depend on the backend.  On a real device file
    (``os_device``) it calls ``fcntl.ioctl`` on the fd itself, as ``OsDevice.ioctl`` would.
    ``slot_params`` name the slot arguments as the caller knows them (default: the slots' names)."""
    if len(decl.slots) > 1:
        raise TypeError(f"{decl.name}: the arena holds one slot; use dm_op")  # no DMOP has two
    slot = decl.slots[0] if decl.slots else None
    slot_args = slot_params or tuple(s.name for s in decl.slots)
    if len(slot_args) != len(decl.slots):
        raise TypeError(f"{decl.name}: {len(decl.slots)} slot name(s) expected, got {slot_args!r}")
    request = IOCTL_PRIVCMD_HYPERCALL if hypercall else IOCTL_PRIVCMD_DM_OP
    arg = "hypercall" if hypercall else "dm_op"
    for name in (*params, *slot_args):
        if not name.isidentifier() or name.startswith("_") or name == "domid":  # the generated code's own names
            raise TypeError(f"{decl.name}: {name!r} cannot be a parameter of a generated call")

    shared = _call_globals(decl)
    lines: list[str] = []
    after: list[str] = []
    if slot is not None:
        slot_arg = slot_args[0]
        if slot.count_expr is not None:  # the count rule, inline: fields not passed are 0
            names = compile(slot.count_expr, "<count>", "eval").co_names
            if not set(names) <= set(decl._order):
                raise TypeError(f"{decl.name}: count {slot.count_expr!r} names a field the op does not have")
            lines += [f"{n} = 0" for n in names if n not in params]
            lines.append(f"_nbytes = ({slot.count_expr}) * {slot.itemsize}")
        elif slot.count is not None:  # the count rule reads the op's fields by name
            shared["_count"] = slot.count
            exec(_fields_class_source(decl, params), shared)
            lines.append(f"_nbytes = _count(_Fields({', '.join(params)})) * {slot.itemsize}")
        elif slot.is_out:  # an OUT slot sized by the caller: an element count, not a buffer
            raise TypeError(f"{decl.name}: OUT slot {slot.name} has no count rule")
        if slot.is_in:
            lines += _in_slot_lines(slot, slot_arg, slot_arg, decl.name, slot_room, in_place=not hypercall)
        else:
            before, after, _ = _out_slot_lines(slot_arg, slot_arg, decl.name, slot_room, in_place=not hypercall)
            lines += before
    # the struct is a result only for ops Xen always copies back; ON_RESTART ops get it
    # back only as continuation progress, which privcmd finishes before returning
    result = f"_from_copy(_view, {OP_AT + DM_OP_HEADER})" if decl.copy_back is CopyBack.ALWAYS else "None"
    outs = "_outs" if after else "[]"
    values = "".join(f", {p}" if p in params else ", 0" for p in decl._order)
    nbufs = 2 if slot is not None else 1
    if hypercall:  # the op, then the hypercall's domid and buffer count (bufs[1] is packed above)
        pack = (
            f"_pack_op(_view, {OP_AT}, {decl.number}{values})\n"
            f"        _pack_head(_view, {HYPERCALL_ARGS_AT}, domid, {nbufs})"
        )
    else:  # one pack: dom, num, ubufs, bufs[0], bufs[1] and the op (see buffers.py's layout)
        slot_buf = "_uptr, _usize" if slot is not None else "0, 0"
        pack = (
            f"_pack_request(_view, {HEAD_AT}, domid, {nbufs}, _arena.bufs_addr, _arena.op_addr, {DM_OP_SIZE}, "
            f"{slot_buf}, {decl.number}{values})"
        )
    fields = "{" + ", ".join(f"{p!r}: {p}" for p in params) + "}"
    source = _CALL_TEMPLATE.format(
        name=decl.name,
        params=", ".join([*params, *slot_args]),
        guard=decl.guard_source(params),
        unguarded=f"_check(domid, {fields})",
        size="",
        fields=fields,
        op=decl.name,
        slot="".join(f"        {line}\n" for line in lines),
        pack=pack,
        ioctl=f"_fcntl_ioctl(_device._fd, {request}, _arena.{arg}, True)"
        if os_device
        else f"_device.ioctl({request}, _arena.{arg})",
        read_back="".join(f"{line}\n        " for line in after) + f"return {result}, {outs}",
    )
    scratch: dict[str, Any] = {}
    exec(compile(source, f"<xendmop dm_op {decl.name}>", "exec"), scratch)
    code: CodeType = scratch[decl.name].__code__
    return code, shared


# A public method's entry (``PrivcmdBackend.compile_entry``): the generated call with the
# method's own signature, for the one form that needs nothing but the op, so that form
# costs one Python frame, as a ctypes call into libxendevicemodel does.  Anything else
# (a bool or IntEnum, a bad value, more than one kernel-sized buffer, memory not met
# before as a ctypes object) goes to the method's general path, ``_general``.
def _make_entry(
    decl: OpDecl,
    params: tuple[tuple[str, str], ...],
    slot_param: str | None,
    name: str,
    max_bytes: int,
    os_device: bool,
) -> tuple[CodeType, dict[str, Any]]:
    """The code of a public method's entry (``_CALL_TEMPLATE`` filled from ``decl``) for the
    DM_OP ioctl, and the globals it needs that do not depend on the backend or the handle.

    ``params``: ``(argument, field)`` pairs, the method's arguments after ``domid`` and the
    op fields they fill.  The op's result must be nothing or its slot's data.  A slot's data
    is the argument ``slot_param``.  An OUT slot defaults to ``None`` (new ``bytes``) or takes
    a writable buffer that Xen writes into and that is returned.  An IN slot takes a ctypes
    object of a class met before: when the count rule is one field no argument fills
    (``nr_extents``), that field is the object's size in items.  Both go to ``_general``
    past ``max_bytes``, the most one kernel-sized buffer holds."""
    if len(decl.slots) != (slot_param is not None) or decl.copy_back is CopyBack.ALWAYS:
        raise TypeError(f"{decl.name}: an entry is for an op with at most one slot and no result struct")
    args, filled = tuple(a for a, _ in params), tuple(f for _, f in params)
    for arg in (*args, *([slot_param] if slot_param else [])):
        if not arg.isidentifier() or arg.startswith("_") or arg == "domid":  # the generated code's own names
            raise TypeError(f"{decl.name}: {arg!r} cannot be an argument of an entry")
    var = dict(zip(filled, args))  # field -> the argument holding it
    shared = _call_globals(decl)
    fields = "{" + ", ".join(f"{f!r}: {a}" for a, f in params) + "}"
    guard = decl.guard_source(filled, args)
    size: list[str] = []
    lines: list[str] = []
    result = "None"
    nbufs, slot_buf = 1, "0, 0"
    if slot_param is not None:
        slot = decl.slots[0]
        expr = slot.count_expr
        if expr is None:
            raise TypeError(f"{decl.name}: an entry needs the slot's count rule as an expression")
        nbufs, slot_buf = 2, "_uptr, _usize"
        too_big = [f"if _nbytes > {max_bytes}:", f"    return _general(domid, {', '.join([*args, slot_param])})"]
        if slot.is_in:
            if not expr.isidentifier() or expr in var or expr not in decl._order:
                raise TypeError(f"{decl.name}: an IN entry sizes the op from {slot_param}: count must be one field")
            var[expr] = expr
            guard = f"{guard} and {slot_param}.__class__ in _CTYPES_MEMORY_CLASSES"
            size = [  # whole items, at least one: anything else is the general path's to refuse or split
                f"_nbytes = _sizeof({slot_param})",
                f"if _nbytes % {slot.itemsize} or not _nbytes:",
                f"    return _general(domid, {', '.join([*args, slot_param])})",
                *too_big,
                f"{expr} = _nbytes // {slot.itemsize}",
            ]
            lines = [f"_uptr, _usize = _addressof({slot_param}), _nbytes"]  # ctypes memory is writable: pinned as it is
        else:
            names = compile(expr, "<count>", "eval").co_names
            if not set(names) <= set(var):
                raise TypeError(f"{decl.name}: count {expr!r} needs a field no argument fills")
            renamed = [f"{field} = {var[field]}" for field in names if var[field] != field]
            size = [*renamed, f"_nbytes = ({expr}) * {slot.itemsize}", *too_big]
            lines, _, result = _out_slot_lines(slot_param, slot_param, decl.name, None, in_place=True)  # too_big
    values = ", ".join([str(decl.number), *(var.get(f, "0") for f in decl._order)])
    signature = [*args, *([slot_param + ("=None" if decl.slots[0].is_out else "")] if slot_param else [])]
    source = _CALL_TEMPLATE.format(
        name=name,
        params=", ".join(signature),
        unguarded=f"return _general(domid, {', '.join([*args, *([slot_param] if slot_param else [])])})",
        guard=guard,
        size="".join(f"    {line}\n" for line in size),
        op=decl.name,
        fields=fields,
        slot="".join(f"        {line}\n" for line in lines),
        pack=f"_pack_request(_view, {HEAD_AT}, domid, {nbufs}, _arena.bufs_addr, _arena.op_addr, {DM_OP_SIZE}, "
        f"{slot_buf}, {values})",
        ioctl=f"_fcntl_ioctl(_device._fd, {IOCTL_PRIVCMD_DM_OP}, _arena.dm_op, True)"
        if os_device
        else f"_device.ioctl({IOCTL_PRIVCMD_DM_OP}, _arena.dm_op)",
        read_back=f"return {result}",
    )
    scratch: dict[str, Any] = {}
    exec(compile(source, f"<xendmop entry {name}>", "exec"), scratch)
    entry: CodeType = scratch[name].__code__
    return entry, shared


class PrivcmdBackend:
    """Owns a privcmd device and a pool of hypercall buffers."""

    name = "privcmd"
    #: set on a simulated host's backend (``make_backend("mock")``): how that host opens its
    #: devices, so that an IoreqServer on the same DeviceModel opens privcmd and evtchn there too
    host_opener: Opener | None = None

    def __init__(
        self, opener: Opener = open_device, limits: Limits = Limits(), *, on_close: Callable[[], None] | None = None
    ) -> None:
        self.limits = limits
        self._on_close = on_close  # e.g. closing a mock host this backend owns
        self._device: Device | None = opener(PRIVCMD_PATH)
        try:
            self.restricted_to: int | None = None
            self.uses_hypercall = not self._probe()
            # DM_OP's buffers are pinned by the kernel; only the HYPERCALL path needs
            # hypercall-safe pages (buffers.py says why the device's are wrong for DM_OP)
            self._buffers = HypercallBuffers(opener, limits.max_buf_size, hypercall=self.uses_hypercall)
        except BaseException:
            with contextlib.suppress(OSError):  # never mask the original error
                self._device.close()
            raise

    @classmethod
    def from_device(cls, device: Device, opener: Opener = open_device, limits: Limits = Limits()) -> PrivcmdBackend:
        """Wrap an already open device (e.g. a bad fd or ``/dev/null`` in tests)."""
        return cls(lambda path: device if path == PRIVCMD_PATH else opener(path), limits)

    @property
    def device(self) -> Device:
        if self._device is None:
            raise ClosedHandleError("the privcmd handle is closed")
        return self._device

    def _probe(self) -> bool:
        """Does this kernel have IOCTL_PRIVCMD_DM_OP?  An empty call to DOMID_INVALID,
        as ``xendevicemodel_open`` does (``tools/libs/devicemodel/common.c``)."""
        probe = privcmd_dm_op(dom=DOMID_INVALID, num=0, ubufs=None)
        try:
            self.device.ioctl(IOCTL_PRIVCMD_DM_OP, probe)
        except OSError as e:
            if e.errno == errno.ENOTTY:
                log.info("privcmd lacks IOCTL_PRIVCMD_DM_OP: using IOCTL_PRIVCMD_HYPERCALL")
                return False
            if e.errno != errno.EPERM:  # EPERM: a pre-restricted fd still has the ioctl
                raise xen_error(e.errno or errno.EIO, "probe", DOMID_INVALID, layer="privcmd") from None
        return True

    def dm_op(
        self, decl: OpDecl, domid: int, fields: Mapping[str, int], slot_data: Sequence[Any] = ()
    ) -> tuple[Any, list[bytes]]:
        if self.restricted_to is not None and domid != self.restricted_to:
            raise xen_error(errno.EPERM, decl.name, domid, fields, layer="privcmd")
        arena = self._buffers.acquire()
        try:
            bufs = decl.marshal(arena, fields, slot_data)
            arena.set_bufs(bufs)
            if self.uses_hypercall:
                call = arena.hypercall
                call.op = _HYPERVISOR_dm_op
                call.arg[0], call.arg[1], call.arg[2] = domid, len(bufs), arena.bufs_addr
                self.device.ioctl(IOCTL_PRIVCMD_HYPERCALL, call)
            else:
                request = arena.dm_op
                request.dom, request.num, request.ubufs = domid, len(bufs), arena.bufs_addr
                self.device.ioctl(IOCTL_PRIVCMD_DM_OP, request)
            return decl.unmarshal(arena, bufs)
        except XenError:
            raise
        except OSError as e:
            raise xen_error(e.errno or errno.EIO, decl.name, domid, fields) from None
        finally:
            self._buffers.release(arena)

    def compile_call(
        self, decl: OpDecl, params: Sequence[str], slot_params: Sequence[str] = ()
    ) -> Callable[..., tuple[Any, list[Any]]]:
        """``dm_op`` for one op, generated from its declaration: ``call(domid, *values, *slot_data)``.

        ``params`` name the op's fields the caller passes, in the order it passes them
        (the others are 0); the slot data (one value per slot) follows, under the names
        ``slot_params`` (by default the slots' own) that its errors give.
        The same checks, typed errors and bytes as ``dm_op``, without the per-call dict,
        the Mapping walk or ctypes attribute writes: one ``Struct.pack_into`` for the op,
        one for the request header, the arena's fixed parts written once.  It returns
        ``(op struct or None, OUT slot data)``: the struct only for an op Xen always copies
        back (``CopyBack.ALWAYS``), whose fields are results.

        Slot data: an IN slot takes a buffer of exactly the count rule's size (a ctypes
        array, or any C-contiguous buffer).  An OUT slot takes ``None``, and its answer
        comes back as new ``bytes``, or a writable buffer of at least that size, which
        gets the answer and comes back itself.  On the DM_OP ioctl a writable buffer is
        handed to the kernel where it is, as libxendevicemodel hands over the caller's
        pointers: privcmd pins the caller's pages itself.  On the HYPERCALL path, and
        for read-only IN data, the bytes go through the arena (hypercall-safe memory).
        The code is made once per op and shape and bound to this backend's buffers.
        """
        params, slots = tuple(params), tuple(slot_params)
        os_device = type(self.device) is OsDevice
        room = self._buffers.slot_room
        key = (decl.name, decl.number, params, slots, self.uses_hypercall, room, os_device)
        made = _MADE.get(key)
        if made is None:
            made = _MADE[key] = _make_call(decl, params, self.uses_hypercall, room, os_device, slots)
        code, shared = made
        pool = self._buffers
        names = {"_backend": self, "_pop": pool._free.pop, "_acquire": pool.acquire, "_push": pool._free.append}
        call: Callable[..., tuple[Any, list[Any]]] = FunctionType(code, {**shared, **names})
        return call

    def compile_entry(
        self,
        decl: OpDecl,
        params: Sequence[tuple[str, str]],
        slot_param: str | None,
        name: str,
        general: Callable[..., Any],
    ) -> Callable[..., Any] | None:
        """A public method's common form as one generated function (see ``_make_entry``):
        ``name(domid, *arguments, slot_param)`` for ``params``' ``(argument, field)`` pairs,
        which calls ``general`` with the same arguments for everything else.  ``None`` on the
        HYPERCALL path, where every buffer is copied into hypercall memory anyway and the
        method's own path is as fast."""
        if self.uses_hypercall:
            return None
        params = tuple(params)
        os_device = type(self.device) is OsDevice
        max_bytes = min(self.limits.max_buf_size, self._buffers.slot_room)
        key = ("entry", decl.name, decl.number, params, slot_param, name, max_bytes, os_device)
        made = _MADE.get(key)
        if made is None:
            made = _MADE[key] = _make_entry(decl, params, slot_param, name, max_bytes, os_device)
        code, shared = made
        pool = self._buffers
        names = {
            "_backend": self,
            "_pop": pool._free.pop,
            "_acquire": pool.acquire,
            "_push": pool._free.append,
            "_general": general,
        }
        defaults = (None,) if decl.slots and decl.slots[0].is_out else None  # FunctionType keeps none of the code's
        entry: Callable[..., Any] = FunctionType(code, {**shared, **names}, name, defaults)
        return entry

    def restrict(self, domid: int) -> None:
        """``IOCTL_PRIVCMD_RESTRICT``: this fd may only target ``domid`` from now on."""
        if not 0 <= domid < DOMID_FIRST_RESERVED:
            raise ArgumentError("restrict", "domid", domid, "must be a guest domid (0..0x7fef)")
        try:
            self.device.ioctl(IOCTL_PRIVCMD_RESTRICT, domid_t(domid))
        except OSError as e:
            raise xen_error(e.errno or errno.EIO, "restrict", domid, layer="privcmd") from None
        self.restricted_to = domid

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device": getattr(self.device, "path", PRIVCMD_PATH),
            "ioctl": "IOCTL_PRIVCMD_HYPERCALL" if self.uses_hypercall else "IOCTL_PRIVCMD_DM_OP",
            "buffers": self._buffers.source,
            "restricted_to": self.restricted_to,
            "limits": {"max_nr_bufs": self.limits.max_nr_bufs, "max_buf_size": self.limits.max_buf_size},
        }

    def close(self) -> None:
        device, self._device = self._device, None
        if device is not None:
            self._buffers.close()
            device.close()
            if self._on_close is not None:
                self._on_close()
