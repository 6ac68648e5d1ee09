"""One fixed argument set per ``DeviceModel`` method, shared by the golden-bytes,
bad-fd and libxen-backend tests.

``op`` is the DMOP (declaration) name the method issues, which is what a
``XenError`` from it carries; ``restrict`` is not a DMOP but keeps its own name.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from xendmop import BufIoreq, CacheAttr, DeviceModel, EventType, HvmMemType, MemAccess, ShutdownReason

DOMID = 7
SERVER = 3
#: privcmd's default dm_op_buf_max_size: the chunk size xendmop splits at
KERNEL_BUF_MAX = 4096

#: Public DeviceModel attributes that do not issue a request.
NOT_REQUESTS = frozenset({"open", "close", "describe", "backend"})


@dataclass(frozen=True)
class Call:
    method: str
    args: tuple[Any, ...]
    op: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: how many requests xendmop sends for it (after splitting to kernel limits)
    requests: int = 1

    @property
    def label(self) -> str:
        shown = ", ".join(f"{a:#x}" if isinstance(a, int) and a > 0xFFFF else repr(a) for a in self.args[1:])
        if len(shown) > 40:
            shown = shown[:37] + "..."
        extra = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.method}({shown}{extra})"


_BULK_300 = [(0x10_0000 + 0x40 * i, 1 + i % 7) for i in range(300)]

CALLS: tuple[Call, ...] = (
    Call("create_ioreq_server", (DOMID, BufIoreq.ATOMIC), "create_ioreq_server"),
    Call("get_ioreq_server_info", (DOMID, SERVER), "get_ioreq_server_info"),
    Call("get_ioreq_server_info", (DOMID, SERVER), "get_ioreq_server_info", {"gfns": True}),
    Call("map_io_range_to_ioreq_server", (DOMID, SERVER, True, 0xFEBF_0000, 0xFEBF_0FFF),
         "map_io_range_to_ioreq_server"),
    Call("map_io_range_to_ioreq_server", (DOMID, SERVER, False, 0x3F8, 0x3FF), "map_io_range_to_ioreq_server"),
    Call("unmap_io_range_from_ioreq_server", (DOMID, SERVER, True, 0xFEBF_0000, 0xFEBF_0FFF),
         "unmap_io_range_from_ioreq_server"),
    Call("map_pcidev_to_ioreq_server", (DOMID, SERVER, 0x12, 0x34, 0x1D, 5), "map_io_range_to_ioreq_server"),
    Call("unmap_pcidev_from_ioreq_server", (DOMID, SERVER, 0x12, 0x34, 0x1D, 5), "unmap_io_range_from_ioreq_server"),
    Call("map_mem_type_to_ioreq_server", (DOMID, SERVER, HvmMemType.ioreq_server, MemAccess.WRITE),
         "map_mem_type_to_ioreq_server"),
    Call("set_ioreq_server_state", (DOMID, SERVER, True), "set_ioreq_server_state"),
    Call("destroy_ioreq_server", (DOMID, SERVER), "destroy_ioreq_server"),
    Call("set_pci_intx_level", (DOMID, 0, 0, 4, 2, 1), "set_pci_intx_level"),
    Call("set_isa_irq_level", (DOMID, 11, 1), "set_isa_irq_level"),
    Call("set_irq_level", (DOMID, 40, 1), "set_irq_level"),
    Call("set_pci_link_route", (DOMID, 2, 10), "set_pci_link_route"),
    Call("inject_msi", (DOMID, 0xFEE0_1000, 0x4041), "inject_msi"),
    Call("track_dirty_vram", (DOMID, 0xF_0000, 100), "track_dirty_vram"),
    Call("track_dirty_vram", (DOMID, 0xF_0000, 40000), "track_dirty_vram", requests=2),
    Call("modified_memory", (DOMID, 0x2000, 16), "modified_memory"),
    Call("modified_memory_bulk", (DOMID, [(0x3000, 1), (0x3010, 2), (0x1_0000_0000, 0xFFFF)]), "modified_memory"),
    Call("modified_memory_bulk", (DOMID, _BULK_300), "modified_memory", requests=2),
    Call("set_mem_type", (DOMID, HvmMemType.ram_ro, 0x4000, 32), "set_mem_type"),
    Call("inject_event", (DOMID, 1, 14, EventType.hw_exc, 0x2, 0, 0xDEAD_BEEF_F000), "inject_event"),
    Call("inject_event", (DOMID, 0x8000_0001, 2, EventType.nmi, 0xFFFF_FFFF, 3, 0), "inject_event"),  # vcpu > INT_MAX
    Call("shutdown", (DOMID, ShutdownReason.reboot), "remote_shutdown"),
    Call("relocate_memory", (DOMID, 64, 0x5000, 0x6000), "relocate_memory"),
    Call("pin_memory_cacheattr", (DOMID, 0x7000, 0x70FF, CacheAttr.WB), "pin_memory_cacheattr"),
    Call("nr_vcpus", (DOMID,), "nr_vcpus"),
    Call("restrict", (DOMID,), "restrict"),  # last: afterwards only DOMID may be targeted
)


def request_methods() -> set[str]:
    """Every public DeviceModel method that issues a request."""
    return {
        name
        for name, value in inspect.getmembers(DeviceModel)
        if not name.startswith("_") and name not in NOT_REQUESTS and callable(value)
    }


def uncovered() -> set[str]:
    """Request methods of DeviceModel that have no case in ``CALLS``."""
    return request_methods() - {call.method for call in CALLS}
