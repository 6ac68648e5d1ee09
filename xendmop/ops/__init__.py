"""Typed DMOP declarations: one per sub-op, and the slot machinery both sides use."""

from .decl import (
    CTYPES_MEMORY,
    CTYPES_MEMORY_CLASSES,
    DM_OP_HEADER,
    DM_OP_SIZE,
    MANY,
    ONE,
    CallerMemory,
    CopyBack,
    Dir,
    GuestArgs,
    GuestFault,
    OpDecl,
    Scratch,
    Slot,
    SlotAccess,
    caller_memory,
)
from .table import BY_NAME, DECLARATIONS, NR_OPS, OPS

__all__ = [
    "BY_NAME",
    "CTYPES_MEMORY",
    "CTYPES_MEMORY_CLASSES",
    "DECLARATIONS",
    "DM_OP_HEADER",
    "DM_OP_SIZE",
    "MANY",
    "NR_OPS",
    "ONE",
    "OPS",
    "CopyBack",
    "Dir",
    "GuestArgs",
    "GuestFault",
    "CallerMemory",
    "OpDecl",
    "Scratch",
    "Slot",
    "SlotAccess",
    "caller_memory",
]
