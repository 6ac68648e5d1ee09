#!/usr/bin/env python3
"""Write ``xendmop/backends/privcmd_calls.py``: each DMOP's call on the privcmd device, as source.

    python tools/gen_privcmd_calls.py           # rewrite the module
    python tools/gen_privcmd_calls.py --check   # exit 1 if it is not what this tool writes now

Run it after changing an op's declaration (``xendmop/ops/table.py``), the methods ``DeviceModel``
marks ``@_entry``, or this tool; ``tests/test_privcmd_calls.py``
fails while the checked-in module differs from what it writes.

What it writes, per op, is the steps of ``PrivcmdBackend.dm_op`` (check, restriction, arena,
pack, ioctl, read-back) with the declaration's facts written in as constants: the op number,
the field order of the one ``Struct`` that packs the request, each field's range, the slot's
count rule.  Each call is a closure made by a factory, ``make(b)``, from what one backend binds
(``privcmd.Binding``: its arena pool, its ioctl, its slot room, the op's packers); so the
per-call path is one Python frame over ``Struct.pack_into`` and ``fcntl.ioctl``, as fast as
source built at run time was, and a reader, a debugger and a traceback see these lines.

Three kinds of factory:
- ``dm_op_<op>``: the op's call on ``IOCTL_PRIVCMD_DM_OP`` (``PrivcmdBackend.compile_call``),
  ``call(domid, *fields, *slot_data)`` -> ``(op struct or None, OUT slot data)``;
- ``hypercall_<op>``: the same on ``IOCTL_PRIVCMD_HYPERCALL`` (kernels without DM_OP), every
  buffer copied through the arena (hypercall-safe memory);
- ``entry_<method>``: a ``DeviceModel`` method's common form as one function with the method's
  own signature (``PrivcmdBackend.compile_entry``); any other form calls the method as written.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xendmop.backends.buffers import (  # noqa: E402
    EMPTY_SLOT_OFFSET,
    HEAD_AT,
    HYPERCALL_ARGS_AT,
    OP_AT,
    SLOT_BUF_AT,
)
from xendmop.backends.device import PAGE_SIZE  # noqa: E402
from xendmop.ops import DM_OP_HEADER, DM_OP_SIZE, CopyBack, OpDecl, Slot  # noqa: E402

TARGET = ROOT / "xendmop" / "backends" / "privcmd_calls.py"
SLOT_AT = PAGE_SIZE  # Arena.slot_offset(0, n)
#: what a factory may take from its Binding (``b``), and the local each becomes
BOUND = ("backend", "pop", "acquire", "push", "ioctl", "room", "max_bytes", "check", "pack_op", "pack_request",
         "from_copy", "general")

# One call's body, in ``PrivcmdBackend.dm_op``'s order.  ``{...}`` holes are filled from the
# declaration; nothing per op is hand-written.
_BODY = """\
    def {name}({signature}):
        if not (
            {guard}
        ):
            {unguarded}
{size}        _restricted = _backend.restricted_to
        if _restricted is not None and domid != _restricted:
            raise _xen_error(_EPERM, {op!r}, domid, {fields}, layer="privcmd")
        _target = _backend.ioctl_target
        if _target is None:
            raise _ClosedHandleError("the privcmd handle is closed", {name!r})
        try:
            _arena = _pop()
        except IndexError:
            _arena = _acquire()
        _view = _arena.view
        try:
{slot}            # {layout}
            {pack}
            _ioctl(_target, {request}, _arena.{arg}, True)
            {read_back}
        except _XenError:
            raise
        except OSError as _e:
            raise _xen_error(_e.errno or _EIO, {op!r}, domid, {fields}) from None
        finally:
            _push(_arena)
"""


def _slot_buf(in_place: bool, addr: str, size: str) -> str:
    """Where ``bufs[1]`` is set: packed with the whole request on the DM_OP path, alone on the HYPERCALL path."""
    return f"_uptr, _usize = {addr}, {size}" if in_place else f"_pack_buf(_view, {SLOT_BUF_AT}, {addr}, {size})"


def _in_slot_lines(slot: Slot, arg: str, op: str, in_place: bool) -> list[str]:
    """An IN slot's marshalling: check its size, then point ``bufs[1]`` at it or copy it."""
    empty = f"_arena.slot_addr + {EMPTY_SLOT_OFFSET}"  # see buffers.py: never a page-aligned 0-byte buffer
    sized = f"_nbytes = _size // {slot.itemsize} * {slot.itemsize}" if slot.count_expr is None else ""
    why = "f'must be {_nbytes} bytes'"
    if not in_place:  # the HYPERCALL path: Xen reads the pointer itself, so only hypercall memory will do
        return [
            f"_raw = {arg}",  # a byte view as is (the bulk path's slices), anything else cast to one
            "if _raw.__class__ is not memoryview or _raw.format != 'B':",
            f"    _raw = memoryview({arg}).cast('B')",
            "_size = _raw.nbytes",
            *([sized] if sized else []),
            "if _size != _nbytes:",
            f"    raise _ArgumentError({op!r}, {arg!r}, _size, {why})",
            "if _nbytes > _room:",
            "    _arena.slot_offset(0, _nbytes)  # raises, naming the sizes",
            f"_view[{SLOT_AT}:{SLOT_AT} + _nbytes] = _raw",
            _slot_buf(in_place, f"_arena.slot_addr if _nbytes else {empty}", "_nbytes"),
        ]
    # DM_OP: privcmd pins the caller's pages itself (privcmd_ioctl_dm_op → lock_pages in Linux
    # drivers/xen/privcmd.c), so writable memory is passed where it is; read-only memory,
    # which that pin (FOLL_WRITE) refuses, is copied into the arena
    return [
        f"if {arg}.__class__ in _CTYPES_MEMORY_CLASSES:  # a ctypes class met before (caller_memory adds it)",
        f"    _addr, _size = _addressof({arg}), _sizeof({arg})",  # never 0: _keep is not needed
        "else:",
        f"    _addr, _size, _keep = _caller_memory({op!r}, {arg!r}, {arg}, False)",
        *([sized] if sized else []),
        "if _size != _nbytes:",
        f"    raise _ArgumentError({op!r}, {arg!r}, _size, {why})",
        "if _nbytes > _room:",
        "    _arena.slot_offset(0, _nbytes)  # raises, naming the sizes",
        "if _addr and _nbytes:",
        "    " + _slot_buf(in_place, "_addr", "_nbytes"),
        "else:",
        "    if _nbytes:",
        f"        _view[{SLOT_AT}:{SLOT_AT} + _nbytes] = memoryview(_keep).cast('B')",
        "    " + _slot_buf(in_place, f"_arena.slot_addr if _nbytes else {empty}", "_nbytes"),
    ]


def _out_slot_lines(arg: str, op: str, bounded: bool, in_place: bool) -> tuple[list[str], list[str], str]:
    """An OUT slot's marshalling, what follows the ioctl, and the answer (an expression):
    ``None`` gets a new ``bytes``, a caller's writable buffer of at least ``_nbytes`` bytes
    gets Xen's answer in place and is the answer itself.  ``bounded``: the caller has
    already bounded ``_nbytes`` by the arena's slot room."""
    empty = f"_arena.slot_addr + {EMPTY_SLOT_OFFSET}"  # see buffers.py: never a page-aligned 0-byte buffer
    why = "f'must hold at least {_nbytes} bytes'"
    before = [] if bounded else ["if _nbytes > _room:", "    _arena.slot_offset(0, _nbytes)  # raises, naming sizes"]
    before += [
        f"if {arg} is None:  # never hand Xen a buffer holding the last call's answer",
        f"    _view[{SLOT_AT}:{SLOT_AT} + _nbytes] = _ZEROS[:_nbytes]",
        "    " + _slot_buf(in_place, f"_arena.slot_addr if _nbytes else {empty}", "_nbytes"),
        "else:",
        f"    if {arg}.__class__ in _CTYPES_MEMORY_CLASSES:  # a ctypes class met before (caller_memory adds it)",
        f"        _addr, _size = _addressof({arg}), _sizeof({arg})",
        "    else:",
        f"        _addr, _size, _keep = _caller_memory({op!r}, {arg!r}, {arg}, True)",
        "    if _size < _nbytes:",
        f"        raise _ArgumentError({op!r}, {arg!r}, _size, {why})",
    ]
    answer = f"_view[{SLOT_AT}:{SLOT_AT} + _nbytes].tobytes() if {arg} is None else {arg}"
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


def _guard(decl: OpDecl, fields: Sequence[str], names: Sequence[str]) -> str:
    """The guard's terms, one a line: domid and each argument a plain ``int`` in range."""
    terms = ["domid.__class__ is int and 0 <= domid <= 0xffff"]
    if fields:
        terms += [decl.guard_source([field], [name]) for field, name in zip(fields, names)]
    return "\n            and ".join(terms)


def _layout(decl: OpDecl, hypercall: bool) -> str:
    """A comment naming what the pack below writes."""
    op = f"op {decl.number} (XEN_DMOP_{decl.name}): {', '.join(decl._order) or 'no fields'}"
    if hypercall:
        return f"{op}; then the hypercall's domid and buffer count"
    return f"request (dom, num, ubufs), bufs[0] (the op), bufs[1]; {op}"


def _lines(lines: Sequence[str], indent: str) -> str:
    return "".join(f"{indent}{line}\n" for line in lines)


def _check_names(decl: OpDecl, names: Sequence[str]) -> None:
    for name in names:
        if not name.isidentifier() or name.startswith("_") or name == "domid":  # the generated code's own names
            raise SystemExit(f"{decl.name}: {name!r} cannot be a parameter of a generated call")


def render_call(decl: OpDecl, params: tuple[str, ...], slot_params: tuple[str, ...], hypercall: bool) -> str:
    """The body of one op's call: ``(domid, *params, *slot_params)``, for one ioctl."""
    if len(decl.slots) > 1:
        raise SystemExit(f"{decl.name}: the arena holds one slot")  # no DMOP has two
    slot = decl.slots[0] if decl.slots else None
    slot_args = slot_params or tuple(s.name for s in decl.slots)
    if len(slot_args) != len(decl.slots):
        raise SystemExit(f"{decl.name}: {len(decl.slots)} slot name(s) expected, got {slot_args!r}")
    _check_names(decl, (*params, *slot_args))
    lines: list[str] = []
    after: list[str] = []
    if slot is not None:
        if slot.many and slot.count_expr is None:
            raise SystemExit(f"{decl.name}: declare slot {slot.name}'s count as an expression over the op's fields")
        if slot.many:  # the count rule, inline: fields not passed are 0
            assert slot.count_expr is not None
            names = compile(slot.count_expr, "<count>", "eval").co_names
            if not set(names) <= set(decl._order):
                raise SystemExit(f"{decl.name}: count {slot.count_expr!r} names a field the op does not have")
            lines += [f"{n} = 0" for n in names if n not in params]
            lines.append(f"_nbytes = ({slot.count_expr}) * {slot.itemsize}")
        else:
            lines.append(f"_nbytes = {slot.itemsize}")
        if slot.is_in:
            lines += _in_slot_lines(slot, slot_args[0], decl.name, in_place=not hypercall)
        else:
            before, after, _ = _out_slot_lines(slot_args[0], decl.name, False, in_place=not hypercall)
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
            f"            _pack_head(_view, {HYPERCALL_ARGS_AT}, domid, {nbufs})"
        )
    else:  # one pack: dom, num, ubufs, bufs[0], bufs[1] and the op (see buffers.py's layout)
        slot_buf = "_uptr, _usize" if slot is not None else "0, 0"
        pack = (
            f"_pack_request(_view, {HEAD_AT}, domid, {nbufs}, _arena.bufs_addr, _arena.op_addr, {DM_OP_SIZE}, "
            f"{slot_buf}, {decl.number}{values})"
        )
    fields = "{" + ", ".join(f"{p!r}: {p}" for p in params) + "}"
    return _BODY.format(
        name=decl.name,
        signature=", ".join(("domid", *params, *slot_args)),
        guard=_guard(decl, params, params),
        unguarded=f"_check(domid, {fields})",
        size="",
        fields=fields,
        op=decl.name,
        slot=_lines(lines, " " * 12),
        pack=pack,
        layout=_layout(decl, hypercall),
        request="IOCTL_PRIVCMD_HYPERCALL" if hypercall else "IOCTL_PRIVCMD_DM_OP",
        arg="hypercall" if hypercall else "dm_op",
        read_back="".join(f"{line}\n            " for line in after) + f"return {result}, {outs}",
    )


def render_entry(decl: OpDecl, params: tuple[tuple[str, str], ...], slot_param: str | None, name: str) -> str:
    """The body of a public method's entry on the DM_OP ioctl: the op's call with the method's
    signature, for the one form that needs nothing but the op, so that form costs one Python
    frame, as a ctypes call into libxendevicemodel does.  Anything else (a bool or IntEnum, a
    bad value, more than one kernel-sized buffer, memory not met before as a ctypes object)
    goes to the method as written, ``_general``.

    ``params``: ``(argument, field)`` pairs, the method's arguments after ``domid`` and the
    op fields they fill.  The op's result must be nothing or its slot's data.  A slot's data
    is the argument ``slot_param``.  An OUT slot defaults to ``None`` (new ``bytes``) or takes
    a writable buffer that Xen writes into and that is returned.  An IN slot takes a ctypes
    object of a class met before: when the count rule is one field no argument fills
    (``nr_extents``), that field is the object's size in items.  Both go to ``_general``
    past ``_max_bytes``, the most one kernel-sized buffer holds."""
    if len(decl.slots) != (slot_param is not None) or decl.copy_back is CopyBack.ALWAYS:
        raise SystemExit(f"{decl.name}: an entry is for an op with at most one slot and no result struct")
    args, filled = tuple(a for a, _ in params), tuple(f for _, f in params)
    _check_names(decl, (*args, *([slot_param] if slot_param else [])))
    var = dict(zip(filled, args))  # field -> the argument holding it
    fields = "{" + ", ".join(f"{f!r}: {a}" for a, f in params) + "}"
    guard = _guard(decl, filled, args)
    all_args = ", ".join([*args, *([slot_param] if slot_param else [])])
    size: list[str] = []
    lines: list[str] = []
    result = "None"
    nbufs, slot_buf = 1, "0, 0"
    if slot_param is not None:
        slot = decl.slots[0]
        expr = slot.count_expr
        if expr is None:
            raise SystemExit(f"{decl.name}: an entry needs the slot's count rule as an expression")
        nbufs, slot_buf = 2, "_uptr, _usize"
        too_big = ["if _nbytes > _max_bytes:", f"    return _general(domid, {all_args})"]
        if slot.is_in:
            if not expr.isidentifier() or expr in var or expr not in decl._order:
                raise SystemExit(f"{decl.name}: an IN entry sizes the op from {slot_param}: count must be one field")
            var[expr] = expr
            guard += f"\n            and {slot_param}.__class__ in _CTYPES_MEMORY_CLASSES"
            size = [  # whole items, at least one: anything else is the general path's to refuse or split
                f"_nbytes = _sizeof({slot_param})",
                f"if _nbytes % {slot.itemsize} or not _nbytes:",
                f"    return _general(domid, {all_args})",
                *too_big,
                f"{expr} = _nbytes // {slot.itemsize}",
            ]
            lines = [f"_uptr, _usize = _addressof({slot_param}), _nbytes"]  # ctypes memory is writable: pinned as is
        else:
            names = compile(expr, "<count>", "eval").co_names
            if not set(names) <= set(var):
                raise SystemExit(f"{decl.name}: count {expr!r} needs a field no argument fills")
            renamed = [f"{field} = {var[field]}" for field in names if var[field] != field]
            size = [*renamed, f"_nbytes = ({expr}) * {slot.itemsize}", *too_big]
            lines, _, result = _out_slot_lines(slot_param, decl.name, True, in_place=True)
    values = ", ".join([str(decl.number), *(var.get(f, "0") for f in decl._order)])
    signature = ["domid", *args]
    if slot_param:
        signature.append(slot_param + ("=None" if decl.slots[0].is_out else ""))
    return _BODY.format(
        name=name,
        signature=", ".join(signature),
        unguarded=f"return _general(domid, {all_args})",
        guard=guard,
        size=_lines(size, " " * 8),
        op=decl.name,
        fields=fields,
        slot=_lines(lines, " " * 12),
        pack=f"_pack_request(_view, {HEAD_AT}, domid, {nbufs}, _arena.bufs_addr, _arena.op_addr, {DM_OP_SIZE}, "
        f"{slot_buf}, {values})",
        layout=_layout(decl, False),
        request="IOCTL_PRIVCMD_DM_OP",
        arg="dm_op",
        read_back=f"return {result}",
    )


def _factory(factory: str, doc: str, body: str, name: str) -> str:
    """``body`` as a closure over the names it takes from its Binding."""
    used = [n for n in BOUND if re.search(rf"\b_{n}\b", body)]
    unpack = "".join(f"    _{n} = b.{n}\n" for n in used)
    return f'def {factory}(b: Binding) -> Callable[..., Any]:\n    """{doc}"""\n{unpack}\n{body}\n    return {name}\n'


Call = tuple[str, tuple[str, ...], tuple[str, ...]]  # op, fields, slot arguments
Entry = tuple[str, tuple[tuple[str, str], ...], str | None, str]  # op, (argument, field) pairs, slot argument, method


def shapes() -> tuple[list[Call], list[Entry]]:
    """The calls ``DeviceModel`` makes (one per declaration: its ``params``, its slots' arguments)
    and its entries (the methods marked ``@_entry``)."""
    from xendmop.devicemodel import _ENTRIES, entry_shape
    from xendmop.ops import BY_NAME

    calls: list[Call] = [(decl.name, decl.params, decl.slot_args) for decl in BY_NAME.values()]
    entries: list[Entry] = []
    for method, op in _ENTRIES.items():
        _, pairs, slot = entry_shape(op)
        entries.append((op, pairs, slot, method))
    return sorted(calls), sorted(entries, key=lambda e: e[3])


HEADER = '''\
"""Each DMOP's call on the privcmd device, written out from its declaration.

Generated by ``tools/gen_privcmd_calls.py`` from ``xendmop/ops/table.py`` and the calls
``DeviceModel`` makes: do not edit; change those and run the tool
(``tests/test_privcmd_calls.py`` fails while this file differs from what it writes).
Read that tool's docstring for what each factory makes; ``privcmd.Binding`` for what it binds.
"""

# stamp: {stamp}
# ruff: noqa: E501

from __future__ import annotations

import ctypes
from collections.abc import Callable
from struct import Struct
from typing import TYPE_CHECKING, Any

from ..abi.privcmd import IOCTL_PRIVCMD_DM_OP, IOCTL_PRIVCMD_HYPERCALL
from ..errors import ArgumentError as _ArgumentError
from ..errors import ClosedHandleError as _ClosedHandleError
from ..errors import XenError as _XenError
from ..errors import xen_error as _xen_error
from ..ops import CTYPES_MEMORY_CLASSES as _CTYPES_MEMORY_CLASSES
from ..ops import caller_memory as _caller_memory

if TYPE_CHECKING:
    from .privcmd import Binding

_EPERM = {eperm}
_EIO = {eio}
_ZEROS = memoryview(bytes(1 << 16))  # read-only zeros to clear an OUT slot without allocating
_pack_head = Struct("<QQ").pack_into  # privcmd_hypercall.arg[0] = domid, arg[1] = nr_bufs
_pack_buf = Struct("<QQ").pack_into  # bufs[1]: uptr, size
_addressof: Callable[[Any], int] = ctypes.addressof
_sizeof: Callable[[Any], int] = ctypes.sizeof
_memmove = ctypes.memmove
'''


def _facts(decl: OpDecl) -> tuple[object, ...]:
    """What of a declaration the generated code depends on (for the stamp)."""
    slots = [(s.direction.name, s.itemsize, s.name, s.count_expr) for s in decl.slots]
    return (decl.number, decl.name, decl._packer.format, decl._order, decl._tops, decl.copy_back.name, slots)


def render() -> str:
    import errno

    calls, entries = shapes()
    from xendmop.ops import BY_NAME

    parts: list[str] = []
    table: list[str] = []
    for op, params, slots in calls:
        decl = BY_NAME[op]
        for hypercall in (False, True):
            ioctl = "IOCTL_PRIVCMD_HYPERCALL" if hypercall else "IOCTL_PRIVCMD_DM_OP"
            factory = f"{'hypercall' if hypercall else 'dm_op'}_{op}"
            doc = f"``{op}(domid, {', '.join((*params, *(slots or [s.name for s in decl.slots])))})`` on {ioctl}."
            parts.append(_factory(factory, doc, render_call(decl, params, slots, hypercall), op))
            table.append(f"    ({op!r}, {params!r}, {slots!r}, {hypercall!r}): {factory},\n")
    entry_table: list[str] = []
    for op, pairs, slot, method in entries:
        decl = BY_NAME[op]
        factory = f"entry_{method}"
        doc = f"``DeviceModel.{method}``'s common form, one call of {op} on IOCTL_PRIVCMD_DM_OP."
        parts.append(_factory(factory, doc, render_entry(decl, pairs, slot, method), method))
        entry_table.append(f"    ({op!r}, {pairs!r}, {slot!r}, {method!r}): {factory},\n")
    body = "\n\n".join(parts)
    tail = (
        "\n\n#: (op, fields, slot arguments, HYPERCALL?) -> factory of ``PrivcmdBackend.compile_call``\n"
        "CALLS: dict[tuple[str, tuple[str, ...], tuple[str, ...], bool], Callable[[Binding], Callable[..., Any]]] = {\n"
        + "".join(table)
        + "}\n"
        "#: (op, (argument, field) pairs, slot argument, method) -> factory of ``PrivcmdBackend.compile_entry``\n"
        "ENTRIES: dict[tuple[str, tuple[tuple[str, str], ...], str | None, str], "
        "Callable[[Binding], Callable[..., Any]]] = {\n" + "".join(entry_table) + "}\n"
    )
    stamp_of = hashlib.sha256(Path(__file__).read_bytes())
    stamp_of.update(repr((calls, entries, [_facts(BY_NAME[op]) for op, *_ in calls])).encode())
    header = HEADER.format(stamp=f"sha256 {stamp_of.hexdigest()[:16]} of the tool, the declarations and the shapes",
                           eperm=errno.EPERM, eio=errno.EIO)
    return header + "\n\n" + body + tail


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the checked-in module is out of date")
    args = parser.parse_args(argv)
    text = render()
    current = TARGET.read_text() if TARGET.exists() else ""
    if args.check:
        if current != text:
            print(f"{TARGET.relative_to(ROOT)} is out of date: run tools/gen_privcmd_calls.py", file=sys.stderr)
            return 1
        return 0
    if current != text:
        TARGET.write_text(text)
        print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
