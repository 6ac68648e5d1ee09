"""How a DMOP is declared, and the two sides derived from one declaration.

A declaration names the op's number, its argument struct (the member of
``xen_dm_op.u``), which fields Xen writes back and when, and its extra guest
buffers as typed slots: ``ONE(direction, Struct, name)`` or
``MANY(direction, Element, name, count=...)``.

From it come:

- the caller's side (``marshal``/``unmarshal``): ``bufs[0]`` is a zeroed 32-byte
  ``xen_dm_op`` as libxendevicemodel sends, one buffer per slot sized from its type;
- the hypervisor's side (``GuestArgs``): the only way the mock reads or writes a
  guest buffer, with Xen's size checks (``copy_buf_{from,to}_guest`` in
  ``xen/common/dm.c``) built in, so a missing range check cannot be written.
"""

from __future__ import annotations

import ctypes
import enum
import errno
from collections.abc import Callable, Mapping, Sequence
from struct import Struct
from typing import Any, Protocol

from ..abi.dm_op import xen_dm_op
from ..errors import ArgumentError

#: bytes before ``u`` in ``struct xen_dm_op`` (``op`` and ``pad``)
DM_OP_HEADER = ctypes.sizeof(ctypes.c_uint32) * 2
DM_OP_SIZE = ctypes.sizeof(xen_dm_op)


#: ctypes instances whose bytes are their own memory: their address is the data's
CTYPES_MEMORY = (ctypes.Array, ctypes.Structure, ctypes.Union)
#: the CTYPES_MEMORY classes met so far: ``x.__class__ in`` it costs a third of
#: ``isinstance(x, CTYPES_MEMORY)`` on the per-call path (ctypes' metaclasses make that slow)
CTYPES_MEMORY_CLASSES: set[type] = set()
_MAX_CLASSES = 256  # array types are made per length: keep the set small, the rest takes the slow path
#: ctypes instances whose bytes are an address: passing one is a mistake for the memory it points to
_CTYPES_POINTERS = (ctypes._Pointer, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_wchar_p)


def caller_memory(op: str, name: str, data: Any, writable: bool) -> tuple[int, int, Any]:
    """``(address, nbytes, keep)`` of the bytes of a caller's buffer, for a kernel to use in place.

    ``data``: a ctypes array or structure, or any C-contiguous buffer (``bytearray``,
    ``memoryview``, ``array.array``, ...).  ``keep`` holds the buffer exported while
    the address is in use.  A read-only buffer is ``(0, nbytes, view)`` (to be copied),
    or with ``writable`` a ``TypeError``: privcmd pins every DM_OP buffer for writing
    (``lock_pages``' ``pin_user_pages_fast(FOLL_WRITE)`` in Linux ``drivers/xen/privcmd.c``)
    and refuses read-only memory with EFAULT.  An empty buffer has address 0: a 0-byte
    buffer is never handed to the kernel as it is (see ``backends/buffers.py``).
    """
    if isinstance(data, CTYPES_MEMORY):
        if len(CTYPES_MEMORY_CLASSES) < _MAX_CLASSES:
            CTYPES_MEMORY_CLASSES.add(data.__class__)
        return ctypes.addressof(data), ctypes.sizeof(data), data
    if isinstance(data, _CTYPES_POINTERS):
        raise TypeError(f"{op}: {name} is a ctypes pointer ({type(data).__name__}): pass the memory it points to")
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(
            f"{op}: {name} must be a buffer (ctypes array, bytearray, memoryview), not {type(data).__name__}"
        ) from None
    if not view.c_contiguous:
        raise TypeError(f"{op}: {name} must be C-contiguous memory ({type(data).__name__} is not)")
    if view.readonly:
        if writable:
            raise TypeError(
                f"{op}: {name} is read-only ({type(data).__name__}): privcmd pins it for writing "
                "and would refuse it with EFAULT; pass a bytearray or a ctypes array"
            )
        return 0, view.nbytes, view
    if not view.nbytes:
        return 0, 0, view
    anchor = ctypes.c_char.from_buffer(view)  # the address of the first byte, held exported
    return ctypes.addressof(anchor), view.nbytes, anchor


class Dir(enum.Flag):
    """Direction of a field or slot, seen from the caller."""

    IN = 1
    OUT = 2
    INOUT = IN | OUT


class CopyBack(enum.Enum):
    """When Xen writes ``op.u`` back to ``bufs[0]`` (``const_op`` in ``dm_op()``).

    Xen copies back only if ``(rc == 0 || rc == -ERESTART) && !const_op``
    (``do_dm_op`` in ``xen/common/dm.c``); each op decides ``const_op``.
    """

    NEVER = "never"  # const_op stays true
    ALWAYS = "always"  # const_op = false: on success and on -ERESTART
    ON_RESTART = "on_restart"  # only with a continuation (modified_memory, relocate_memory)


class _Frozen:
    """Immutable after ``__init__``, compared, hashed and shown by its declared fields
    (``_FIELDS``), as a frozen dataclass is: written out because ``dataclasses`` (with
    ``inspect`` and ``ast``) is the largest part of ``import xendmop``."""

    __slots__ = ()
    _FIELDS: tuple[str, ...] = ()

    def _set(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot set {name}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot delete {name}")

    def _key(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._FIELDS)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._FIELDS)
        return f"{type(self).__name__}({shown})"


class Slot(_Frozen):
    """An extra guest buffer ``bufs[index]`` of an op."""

    __slots__ = ("count", "count_expr", "ctype", "direction", "is_in", "is_out", "itemsize", "many", "name")
    _FIELDS = ("direction", "ctype", "name", "many", "count", "count_expr")
    direction: Dir
    ctype: type[ctypes._CData]
    name: str
    many: bool
    #: elements the request implies, from the op struct (MANY only)
    count: Callable[[Any], int] | None
    #: the same rule as an expression over the op's field names, when declared as one
    #: (generated calls write it inline instead of building a struct to call ``count`` on)
    count_expr: str | None
    # precomputed once: Flag arithmetic costs more than the rest of a slot's work
    is_in: bool
    is_out: bool
    itemsize: int

    def __init__(
        self,
        direction: Dir,
        ctype: type[ctypes._CData],
        name: str,
        many: bool,
        count: Callable[[Any], int] | None = None,
        count_expr: str | None = None,
    ) -> None:
        self._set(direction=direction, ctype=ctype, name=name, many=many, count=count, count_expr=count_expr)
        self._set(is_in=bool(direction & Dir.IN), is_out=bool(direction & Dir.OUT), itemsize=ctypes.sizeof(ctype))

    def nbytes(self, args: Any, given: int | None = None) -> int:
        """Bytes of the buffer a caller passes for these op arguments."""
        if not self.many:
            return self.itemsize
        n = self.count(args) if self.count is not None else given
        if n is None:
            raise TypeError(f"slot {self.name}: element count unknown")
        return n * self.itemsize


def ONE(direction: Dir, ctype: type[ctypes._CData], name: str) -> Slot:
    """A slot holding exactly one ``ctype``."""
    return Slot(direction, ctype, name, many=False)


def MANY(
    direction: Dir,
    ctype: type[ctypes._CData],
    name: str,
    count: Callable[[Any], int] | str | None = None,
) -> Slot:
    """A slot holding an array of ``ctype``; ``count`` derives its length from the op:
    a function of the op struct, or an expression over its field names (``"nr_extents"``)."""
    if isinstance(count, str):
        return Slot(direction, ctype, name, many=True, count=_count_rule(count), count_expr=count)
    return Slot(direction, ctype, name, many=True, count=count)


def _count_rule(expr: str) -> Callable[[Any], int]:
    """``expr`` (field names, integer arithmetic) as a function of an op struct."""
    code = compile(expr, f"<count {expr}>", "eval")
    names = code.co_names

    def count(args: Any) -> int:
        return int(eval(code, {"__builtins__": {}}, {n: getattr(args, n) for n in names}))

    return count


_FIELD_LIMITS: dict[Any, int] = {
    ctypes.c_uint8: 0xFF,
    ctypes.c_uint16: 0xFFFF,
    ctypes.c_uint32: 0xFFFFFFFF,
    ctypes.c_uint64: 0xFFFFFFFFFFFFFFFF,
}


_FORMAT = {ctypes.c_uint8: "B", ctypes.c_uint16: "H", ctypes.c_uint32: "I", ctypes.c_uint64: "Q"}


def _packer_for(op_struct: type[ctypes.Structure]) -> tuple[tuple[str, ...], Struct]:
    """A ``Struct`` writing a whole 32-byte ``xen_dm_op`` for this op: ``op``,
    ``pad`` = 0, the scalar fields at their ctypes offsets, zeros in every gap and pad
    array.  Built from the ctypes layout, so it cannot disagree with the mirror."""
    fmt, at, order = "<I4x", DM_OP_HEADER, []
    for name, ctype, *_ in op_struct._fields_:
        offset = DM_OP_HEADER + getattr(op_struct, name).offset
        fmt += f"{offset - at}x" if offset > at else ""
        size = ctypes.sizeof(ctype)
        if ctype in _FORMAT:
            fmt += _FORMAT[ctype]
            order.append(name)
        else:  # a pad array: never set by a caller, always zero
            fmt += f"{size}x"
        at = offset + size
    fmt += f"{DM_OP_SIZE - at}x" if at < DM_OP_SIZE else ""
    packer = Struct(fmt)
    assert packer.size == DM_OP_SIZE, (op_struct.__name__, fmt)
    return tuple(order), packer


class Scratch(Protocol):
    """Memory a backend lends for one call: where ``bufs[0]`` and the slots go."""

    op_addr: int
    view: memoryview

    def slot_offset(self, index: int, nbytes: int) -> int:
        """Offset in ``view`` of room for slot ``index`` (``bufs[index + 1]``)."""
        ...

    @property
    def base(self) -> int: ...


class OpDecl(_Frozen):
    """One DMOP sub-op, declared once."""

    __slots__ = (
        "_order",
        "_packer",
        "_reads_back",
        "_tops",
        "_types",
        "arch",
        "arg_names",
        "continuation",
        "copy_back",
        "doc",
        "function",
        "limits",
        "name",
        "number",
        "out",
        "params",
        "since",
        "slots",
        "struct",
    )
    _FIELDS = (
        "number",
        "name",
        "struct",
        "out",
        "copy_back",
        "since",
        "arch",
        "slots",
        "continuation",
        "limits",
        "arg_names",
        "params",
        "function",
        "doc",
    )
    number: int
    name: str  # member of xen_dm_op.u, and the libxendevicemodel name
    struct: type[ctypes.Structure]
    out: tuple[str, ...]  # fields Xen writes
    copy_back: CopyBack
    since: tuple[int, int]
    arch: frozenset[str]
    slots: tuple[Slot, ...]
    continuation: bool  # Xen may preempt and rewrite the request
    #: API-side limits narrower than the field type (name -> max inclusive)
    limits: Mapping[str, int]
    #: field (or slot) -> the argument libxendevicemodel's function (and ``DeviceModel``'s method)
    #: names it, where the two differ (``isa_irq`` is ``irq``): what errors call it
    arg_names: Mapping[str, str]
    #: the fields libxendevicemodel's function takes after the domid, in its argument order:
    #: what ``DeviceModel``'s call of the op, the libxen backend and the CLI pass
    params: tuple[str, ...]
    #: libxendevicemodel's function for the op, without ``xendevicemodel_`` (and the
    #: ``DeviceModel`` method): the op's name unless they differ (``remote_shutdown``: ``shutdown``)
    function: str
    doc: str
    _types: dict[str, Any]
    _tops: dict[str, int | None]
    _reads_back: bool
    _order: tuple[str, ...]
    _packer: Struct

    def __init__(
        self,
        number: int,
        name: str,
        struct: type[ctypes.Structure],
        out: tuple[str, ...] = (),
        copy_back: CopyBack = CopyBack.NEVER,
        since: tuple[int, int] = (4, 9),
        arch: frozenset[str] = frozenset({"x86"}),
        slots: tuple[Slot, ...] = (),
        continuation: bool = False,
        limits: Mapping[str, int] | None = None,
        arg_names: Mapping[str, str] | None = None,
        params: tuple[str, ...] = (),
        function: str = "",
        doc: str = "",
    ) -> None:
        self._set(number=number, name=name, struct=struct, out=out, copy_back=copy_back, since=since, arch=arch)
        self._set(slots=slots, continuation=continuation, limits={} if limits is None else limits, doc=doc)
        self._set(arg_names={} if arg_names is None else arg_names, params=params, function=function or name)
        self._derive()
        self.guard_source(params)  # every parameter is a scalar field of the op

    @property
    def size(self) -> int:
        """``op_size[op]`` in Xen: bytes of ``u`` copied in (and out)."""
        return ctypes.sizeof(self.struct)

    @property
    def field_types(self) -> dict[str, Any]:
        return self._types

    @property
    def slot_args(self) -> tuple[str, ...]:
        """Each slot's argument as the caller knows it (``arg_names``, else the slot's name)."""
        return tuple(self.arg_names.get(slot.name, slot.name) for slot in self.slots)

    def _derive(self) -> None:
        # Per-call work is done here once: field types, range limits, whether
        # anything is read back after the call.
        types = {f[0]: f[1] for f in self.struct._fields_}
        tops = {name: self.limits.get(name, _FIELD_LIMITS.get(ctype)) for name, ctype in types.items()}
        reads_back = self.copy_back is not CopyBack.NEVER or any(slot.is_out for slot in self.slots)
        order, packer = _packer_for(self.struct)
        self._set(_types=types, _tops=tops, _reads_back=reads_back, _order=order, _packer=packer)

    def check(self, fields: Mapping[str, int]) -> None:
        """Refuse a value the struct cannot carry before any syscall, naming the argument as
        the caller knows it (``arg_names``; the field's own name where they agree)."""
        tops = self._tops
        for name, value in fields.items():
            if name not in tops:
                raise TypeError(f"{self.name}: no field {name!r} in {self.struct.__name__}")
            shown = self.arg_names.get(name, name)
            if not isinstance(value, int):
                raise TypeError(f"{self.name}: {shown} must be an int, not {type(value).__name__}")
            top = tops[name]
            if top is not None and not 0 <= value <= top:
                ctype = self._types[name]
                width = ctypes.sizeof(ctype) * 8
                why = f"must be 0..{top:#x}" if name in self.limits else f"does not fit uint{width}_t"
                raise ArgumentError(self.name, shown, value, why)

    def guard_source(self, params: Sequence[str], names: Sequence[str] | None = None) -> str:
        """A Python expression over variables named ``params`` (fields of this op) that is
        true when each is a plain ``int`` within the field's range: a generated fast path's
        whole argument check.  It accepts a strict subset of what ``check`` accepts, so a
        caller that finds it false calls ``check`` for the typed error (or, for a bool or
        an ``IntEnum``, for the go-ahead).  ``names``: the variables holding ``params``,
        when they are named otherwise (a method's own argument names)."""
        terms = []
        for name, var in zip(params, names or params):
            if name not in self._types:
                raise TypeError(f"{self.name}: no field {name!r} in {self.struct.__name__}")
            top = self._tops[name]
            if top is None or not name.isidentifier():
                raise TypeError(f"{self.name}: {name} is not a scalar field")
            terms.append(f"{var}.__class__ is int and 0 <= {var} <= {top:#x}")
        return " and ".join(terms) or "True"

    def marshal(
        self,
        scratch: Scratch,
        fields: Mapping[str, int],
        slot_data: Sequence[Any] = (),
    ) -> list[tuple[int, int]]:
        """Write the request into ``scratch``; return ``bufs`` as ``(address, size)``.

        ``slot_data[i]`` is a bytes-like object for an IN slot, or the element
        count (``int``) for an OUT MANY slot without a ``count`` rule.
        """
        op_offset = scratch.op_addr - scratch.base
        # one pack_into writes all 32 bytes: op, pad 0, the fields, zeros elsewhere
        self._packer.pack_into(scratch.view, op_offset, self.number, *[fields.get(n, 0) for n in self._order])
        bufs = [(scratch.op_addr, DM_OP_SIZE)]
        if len(slot_data) != len(self.slots):
            raise TypeError(f"{self.name}: {len(self.slots)} slot(s) expected, got {len(slot_data)}")
        member = self.struct.from_buffer(scratch.view, op_offset + DM_OP_HEADER) if self.slots else None
        for index, (slot, data) in enumerate(zip(self.slots, slot_data)):
            if slot.is_in:
                raw = memoryview(data).cast("B")
                nbytes = slot.nbytes(member, raw.nbytes // slot.itemsize)
                if raw.nbytes != nbytes:
                    raise ArgumentError(self.name, slot.name, raw.nbytes, f"must be {nbytes} bytes")
                offset = scratch.slot_offset(index, nbytes)
                scratch.view[offset : offset + nbytes] = raw
            else:
                nbytes = slot.nbytes(member, data if isinstance(data, int) else None)
                offset = scratch.slot_offset(index, nbytes)
                scratch.view[offset : offset + nbytes] = bytes(nbytes)
            bufs.append((scratch.base + offset, nbytes))
        return bufs

    def unmarshal(self, scratch: Scratch, bufs: Sequence[tuple[int, int]]) -> tuple[Any, list[bytes]]:
        """Read back the op struct and every OUT slot after a successful call
        (``None`` and no slots for an op Xen never writes back to)."""
        if not self._reads_back:
            return None, []
        result = self.struct.from_buffer_copy(scratch.view, scratch.op_addr - scratch.base + DM_OP_HEADER)
        outs: list[bytes] = []
        for slot, (addr, nbytes) in zip(self.slots, bufs[1:]):
            if slot.is_out:
                offset = addr - scratch.base
                outs.append(bytes(scratch.view[offset : offset + nbytes]))
        return result, outs

    # --- hypervisor side -----------------------------------------------------

    def guest_args(self, op_struct: Any, bufs: Sequence[tuple[int, int]], memory: CallerMemory) -> GuestArgs:
        """The hypervisor's view of one call: the op struct and checked slot accessors."""
        return GuestArgs(self, op_struct, bufs, memory)


class CallerMemory(Protocol):
    """The memory of a DMOP's caller as Xen reaches it (``copy_{from,to}_guest`` on the
    calling domain's buffers); raise ``OSError(EFAULT)`` on a bad address.  Not the guest's
    RAM a device model reaches (``runtime.GuestMemory``)."""

    def read(self, addr: int, nbytes: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


class GuestFault(OSError):
    """A guest-buffer access Xen refuses (``-EFAULT``)."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.EFAULT, why)


class SlotAccess:
    """Checked access to one extra buffer, as ``copy_buf_{from,to}_guest_offset`` does.

    Xen's ``_raw_copy_{from,to}_guest_buf_offset`` (``xen/common/dm.c``): a buffer
    index beyond ``nr_bufs`` or a range past the buffer's size is ``-EFAULT``.
    """

    def __init__(self, slot: Slot, index: int, bufs: Sequence[tuple[int, int]], memory: CallerMemory) -> None:
        self.slot = slot
        self.index = index  # index in bufs[]
        self._memory = memory
        self.present = index < len(bufs)
        self.addr, self.size = bufs[index] if self.present else (0, 0)

    @property
    def count(self) -> int:
        """Whole elements the buffer holds (``buf.size / sizeof(element)``)."""
        return self.size // self.slot.itemsize

    def _range(self, offset: int, nbytes: int) -> int:
        if not self.present:
            raise GuestFault(f"{self.slot.name}: bufs[{self.index}] not passed")
        if offset + nbytes > self.size:
            raise GuestFault(f"{self.slot.name}: {offset}+{nbytes} beyond buffer of {self.size}")
        return self.addr + offset

    def read(self, index: int = 0) -> Any:
        """copy_buf_from_guest: element ``index``."""
        if not self.slot.is_in:
            raise TypeError(f"{self.slot.name} is an OUT slot")
        n = self.slot.itemsize
        data = self._memory.read(self._range(index * n, n), n)
        return self.slot.ctype.from_buffer_copy(data)  # type: ignore[attr-defined]

    def write(self, data: bytes, offset: int = 0) -> None:
        """copy_buf_to_guest at byte ``offset``."""
        if not self.slot.is_out:
            raise TypeError(f"{self.slot.name} is an IN slot")
        self._memory.write(self._range(offset, len(data)), data)


class GuestArgs:
    """One DMOP call as the hypervisor sees it: ``op`` and its slots by name."""

    def __init__(self, decl: OpDecl, op: Any, bufs: Sequence[tuple[int, int]], memory: CallerMemory) -> None:
        self.decl = decl
        self.op = op
        self.nr_bufs = len(bufs)
        self.slots = {slot.name: SlotAccess(slot, i + 1, bufs, memory) for i, slot in enumerate(decl.slots)}

    def __getitem__(self, name: str) -> SlotAccess:
        return self.slots[name]
