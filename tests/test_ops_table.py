"""The DMOP declarations against the ABI registry and Xen's copy-back rules."""

from __future__ import annotations

import ctypes

import pytest

from xendmop import abi
from xendmop.abi.dm_op import _xen_dm_op_u, xen_dm_op
from xendmop.ops import DECLARATIONS, NR_OPS, OPS, CopyBack, Dir

# Xen's per-op const_op decisions (xen/arch/x86/hvm/dm.c dm_op(), xen/common/ioreq.c
# ioreq_server_dm_op()), as listed in the reference §1.3.
XEN_COPY_BACK = {
    "create_ioreq_server": CopyBack.ALWAYS,
    "get_ioreq_server_info": CopyBack.ALWAYS,
    "set_mem_type": CopyBack.ALWAYS,
    "map_mem_type_to_ioreq_server": CopyBack.ALWAYS,
    "nr_vcpus": CopyBack.ALWAYS,
    "modified_memory": CopyBack.ON_RESTART,
    "relocate_memory": CopyBack.ON_RESTART,
}


def test_every_op_number_is_declared_once() -> None:
    numbers = {
        name: value
        for name, value in abi.CONSTANTS.items()
        if name.startswith("XEN_DMOP_") and name[len("XEN_DMOP_") :] in {m[0] for m in _xen_dm_op_u._fields_}
    }
    assert sorted(numbers.values()) == list(range(1, NR_OPS))
    assert sorted(OPS) == sorted(numbers.values())
    assert len(DECLARATIONS) == len(OPS)
    for decl in DECLARATIONS:
        assert abi.CONSTANTS[f"XEN_DMOP_{decl.name}"] == decl.number


@pytest.mark.parametrize("decl", DECLARATIONS, ids=lambda d: d.name)
def test_declaration_matches_abi(decl) -> None:  # type: ignore[no-untyped-def]
    member = getattr(_xen_dm_op_u, decl.name)
    union_fields = dict(_xen_dm_op_u._fields_)
    assert union_fields[decl.name] is decl.struct, "struct is not the union member's type"
    assert member.offset == 0
    assert abi.STRUCTS[decl.struct.__name__] is decl.struct
    # the op struct fits the 24-byte union, so bufs[0] is always 32 bytes
    assert decl.size == ctypes.sizeof(decl.struct) <= ctypes.sizeof(_xen_dm_op_u)
    assert ctypes.sizeof(xen_dm_op) == 32
    names = {f[0] for f in decl.struct._fields_}
    assert set(decl.out) <= names
    assert set(decl.limits) <= names
    for slot in decl.slots:
        assert abi.STRUCTS.get(slot.ctype.__name__, slot.ctype) is slot.ctype


@pytest.mark.parametrize("decl", DECLARATIONS, ids=lambda d: d.name)
def test_copy_back_agrees_with_xen(decl) -> None:  # type: ignore[no-untyped-def]
    assert decl.copy_back is XEN_COPY_BACK.get(decl.name, CopyBack.NEVER)
    # an op that reports results must be copied back, and one copied back must report something
    assert bool(decl.out) == (decl.copy_back is not CopyBack.NEVER)
    # Xen rewrites the request only for ops with a continuation; those must be copied back then
    if decl.continuation:
        assert decl.copy_back is not CopyBack.NEVER


def test_slots_are_xens_extra_buffers() -> None:
    slotted = {d.name: d.slots for d in DECLARATIONS if d.slots}
    assert set(slotted) == {"track_dirty_vram", "modified_memory"}
    (bitmap,) = slotted["track_dirty_vram"]
    assert bitmap.direction is Dir.OUT and bitmap.itemsize == 1
    assert bitmap.nbytes(abi.STRUCTS["xen_dm_op_track_dirty_vram"](nr=9)) == 2  # ceil(9/8)
    (extents,) = slotted["modified_memory"]
    assert extents.direction is Dir.IN and extents.itemsize == 16
    assert extents.nbytes(abi.STRUCTS["xen_dm_op_modified_memory"](nr_extents=3)) == 48
