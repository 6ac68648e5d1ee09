"""Enums of the public API.  Values come from the ABI registry and member names are
the C names without their prefix; ``tests/test_types.py`` checks each enum lists
every constant of its prefix, so the two cannot drift."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, NamedTuple

from .abi import CONSTANTS as C

if TYPE_CHECKING:
    # A buffer (PEP 688): ctypes arrays, bytearray, memoryview, array.array...  For type
    # checkers only (collections.abc.Buffer is Python 3.12's; typeshed carries this one).
    from typing_extensions import Buffer as Buffer


class BufIoreq(enum.IntEnum):
    """``handle_bufioreq`` of create_ioreq_server (``HVM_IOREQSRV_BUFIOREQ_*``)."""

    OFF = C["HVM_IOREQSRV_BUFIOREQ_OFF"]
    LEGACY = C["HVM_IOREQSRV_BUFIOREQ_LEGACY"]
    ATOMIC = C["HVM_IOREQSRV_BUFIOREQ_ATOMIC"]


class IoRangeType(enum.IntEnum):
    """Range kinds of map_io_range_to_ioreq_server (``XEN_DMOP_IO_RANGE_*``)."""

    PORT = C["XEN_DMOP_IO_RANGE_PORT"]
    MEMORY = C["XEN_DMOP_IO_RANGE_MEMORY"]
    PCI = C["XEN_DMOP_IO_RANGE_PCI"]


class HvmMemType(enum.IntEnum):
    """``hvmmem_type_t`` (``HVMMEM_*``)."""

    ram_rw = C["HVMMEM_ram_rw"]
    ram_ro = C["HVMMEM_ram_ro"]
    mmio_dm = C["HVMMEM_mmio_dm"]
    unused = C["HVMMEM_unused"]
    ioreq_server = C["HVMMEM_ioreq_server"]


class CacheAttr(enum.IntEnum):
    """pin_memory_cacheattr types (``XEN_DMOP_MEM_CACHEATTR_*``, ``XEN_DMOP_DELETE_MEM_CACHEATTR``)."""

    UC = C["XEN_DMOP_MEM_CACHEATTR_UC"]
    WC = C["XEN_DMOP_MEM_CACHEATTR_WC"]
    WT = C["XEN_DMOP_MEM_CACHEATTR_WT"]
    WP = C["XEN_DMOP_MEM_CACHEATTR_WP"]
    WB = C["XEN_DMOP_MEM_CACHEATTR_WB"]
    UCM = C["XEN_DMOP_MEM_CACHEATTR_UCM"]
    DELETE = C["XEN_DMOP_DELETE_MEM_CACHEATTR"]


class EventType(enum.IntEnum):
    """inject_event types (``XEN_DMOP_EVENT_*``)."""

    ext_int = C["XEN_DMOP_EVENT_ext_int"]
    nmi = C["XEN_DMOP_EVENT_nmi"]
    hw_exc = C["XEN_DMOP_EVENT_hw_exc"]
    sw_int = C["XEN_DMOP_EVENT_sw_int"]
    pri_sw_exc = C["XEN_DMOP_EVENT_pri_sw_exc"]
    sw_exc = C["XEN_DMOP_EVENT_sw_exc"]


class MemAccess(enum.IntFlag):
    """map_mem_type_to_ioreq_server flags (``XEN_DMOP_IOREQ_MEM_ACCESS_*``)."""

    READ = C["XEN_DMOP_IOREQ_MEM_ACCESS_READ"]
    WRITE = C["XEN_DMOP_IOREQ_MEM_ACCESS_WRITE"]


class ShutdownReason(enum.IntEnum):
    """remote_shutdown reasons (``SHUTDOWN_*``, ``xen/include/public/sched.h``)."""

    poweroff = C["SHUTDOWN_poweroff"]
    reboot = C["SHUTDOWN_reboot"]
    suspend = C["SHUTDOWN_suspend"]
    crash = C["SHUTDOWN_crash"]
    watchdog = C["SHUTDOWN_watchdog"]
    soft_reset = C["SHUTDOWN_soft_reset"]


#: enum -> the C prefix its members are named after (checked by the tests)
PREFIXES: dict[type[enum.Enum], str] = {
    BufIoreq: "HVM_IOREQSRV_BUFIOREQ_",
    IoRangeType: "XEN_DMOP_IO_RANGE_",
    HvmMemType: "HVMMEM_",
    CacheAttr: "XEN_DMOP_MEM_CACHEATTR_",
    EventType: "XEN_DMOP_EVENT_",
    MemAccess: "XEN_DMOP_IOREQ_MEM_ACCESS_",
    ShutdownReason: "SHUTDOWN_",
}


class IoreqServerInfo(NamedTuple):
    """What get_ioreq_server_info returns; gfns are None when not asked for."""

    ioreq_gfn: int | None
    bufioreq_gfn: int | None
    bufioreq_port: int | None


__all__ = [
    "PREFIXES",
    "BufIoreq",
    "CacheAttr",
    "EventType",
    "HvmMemType",
    "IoRangeType",
    "IoreqServerInfo",
    "MemAccess",
    "ShutdownReason",
]
