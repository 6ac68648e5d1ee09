"""Every DMOP sub-op (1-20), declared once.

``params`` are the fields libxendevicemodel's function (``function``, by default the op's name;
``tools/libs/devicemodel/core.c``) takes after the domid, in its argument order: ``DeviceModel``'s
call of the op, the libxen backend's C call and the CLI's arguments follow them.
``arg_names`` give a field's argument name in libxendevicemodel where the two differ:
``DeviceModel`` takes C's argument names, and its errors use them (a slot's name, its method's
buffer argument).
The source of each fact: ``xen/include/public/hvm/dm_op.h`` (structs, directions),
``xen/arch/x86/hvm/dm.c`` and ``xen/common/ioreq.c`` (``const_op``, continuations),
and ``git tag --contains`` for ``since`` (see the project's DMOP reference, §1.3, §2).
The mock's rule for each op is in ``xendmop/mock/hypervisor.py``, keyed by the same name.
"""

from __future__ import annotations

from ctypes import c_uint8

from ..abi import dm_op as d
from .decl import MANY, CopyBack, Dir, OpDecl

X86 = frozenset({"x86"})
BOTH = frozenset({"x86", "arm"})
ARM = frozenset({"arm"})

DECLARATIONS: tuple[OpDecl, ...] = (
    OpDecl(
        d.XEN_DMOP_create_ioreq_server,
        "create_ioreq_server",
        d.xen_dm_op_create_ioreq_server,
        params=("handle_bufioreq",),
        out=("id",),
        copy_back=CopyBack.ALWAYS,
        arch=BOTH,
        limits={"handle_bufioreq": 2},
        doc="Create an ioreq server for the domain; it starts disabled.",
    ),
    OpDecl(
        d.XEN_DMOP_get_ioreq_server_info,
        "get_ioreq_server_info",
        d.xen_dm_op_get_ioreq_server_info,
        params=("id", "flags"),
        out=("bufioreq_port", "ioreq_gfn", "bufioreq_gfn"),
        copy_back=CopyBack.ALWAYS,
        arch=BOTH,
        doc="Event channel and (legacy) gfns of an ioreq server's pages.",
    ),
    OpDecl(
        d.XEN_DMOP_map_io_range_to_ioreq_server,
        "map_io_range_to_ioreq_server",
        d.xen_dm_op_ioreq_server_range,
        params=("id", "type", "start", "end"),
        arch=BOTH,
        doc="Route a port, MMIO or PCI range (inclusive) to the server.",
    ),
    OpDecl(
        d.XEN_DMOP_unmap_io_range_from_ioreq_server,
        "unmap_io_range_from_ioreq_server",
        d.xen_dm_op_ioreq_server_range,
        params=("id", "type", "start", "end"),
        arch=BOTH,
        doc="Stop routing a range that is fully mapped to the server.",
    ),
    OpDecl(
        d.XEN_DMOP_set_ioreq_server_state,
        "set_ioreq_server_state",
        d.xen_dm_op_set_ioreq_server_state,
        params=("id", "enabled"),
        arch=BOTH,
        limits={"enabled": 1},
        doc="Enable or disable a server; Xen writes each vCPU's vp_eport on enable.",
    ),
    OpDecl(
        d.XEN_DMOP_destroy_ioreq_server,
        "destroy_ioreq_server",
        d.xen_dm_op_destroy_ioreq_server,
        params=("id",),
        arch=BOTH,
        doc="Destroy a server, its ranges, pages and event channels.",
    ),
    OpDecl(
        d.XEN_DMOP_track_dirty_vram,
        "track_dirty_vram",
        d.xen_dm_op_track_dirty_vram,
        params=("first_pfn", "nr"),
        slots=(MANY(Dir.OUT, c_uint8, "dirty_bitmap", count="(nr + 7) // 8"),),
        arg_names={"dirty_bitmap": "out"},
        doc="Dirty bitmap of a VRAM range (bit i of byte i>>3 is pfn first_pfn+i).",
    ),
    OpDecl(
        d.XEN_DMOP_set_pci_intx_level,
        "set_pci_intx_level",
        d.xen_dm_op_set_pci_intx_level,
        params=("domain", "bus", "device", "intx", "level"),
        limits={"device": 0x1F, "intx": 3, "level": 1},
        arg_names={"domain": "segment"},
        doc="Assert or deassert a PCI device's INTx line.",
    ),
    OpDecl(
        d.XEN_DMOP_set_isa_irq_level,
        "set_isa_irq_level",
        d.xen_dm_op_set_isa_irq_level,
        params=("isa_irq", "level"),
        limits={"level": 1},
        arg_names={"isa_irq": "irq"},
        doc="Assert or deassert an ISA IRQ line (0-15).",
    ),
    OpDecl(
        d.XEN_DMOP_set_pci_link_route,
        "set_pci_link_route",
        d.xen_dm_op_set_pci_link_route,
        params=("link", "isa_irq"),
        limits={"link": 3},
        arg_names={"isa_irq": "irq"},
        doc="Route PCI link 0-3 to an ISA IRQ (0 disables).",
    ),
    OpDecl(
        d.XEN_DMOP_modified_memory,
        "modified_memory",
        d.xen_dm_op_modified_memory,
        params=("nr_extents",),
        out=("nr_extents", "opaque"),
        copy_back=CopyBack.ON_RESTART,
        continuation=True,
        slots=(MANY(Dir.IN, d.xen_dm_op_modified_memory_extent, "extents", count="nr_extents"),),
        doc="Mark guest pages dirty for log-dirty (migration).",
    ),
    OpDecl(
        d.XEN_DMOP_set_mem_type,
        "set_mem_type",
        d.xen_dm_op_set_mem_type,
        params=("mem_type", "first_pfn", "nr"),
        out=("nr", "first_pfn"),
        copy_back=CopyBack.ALWAYS,
        continuation=True,
        doc="Change the p2m type of a range of guest pages.",
    ),
    OpDecl(
        d.XEN_DMOP_inject_event,
        "inject_event",
        d.xen_dm_op_inject_event,
        params=("vcpuid", "vector", "type", "error_code", "insn_len", "cr2"),
        arg_names={"vcpuid": "vcpu", "cr2": "extra"},
        doc="Latch an event (interrupt, exception) for a vCPU's next entry.",
    ),
    OpDecl(
        d.XEN_DMOP_inject_msi,
        "inject_msi",
        d.xen_dm_op_inject_msi,
        params=("addr", "data"),
        arg_names={"addr": "msi_addr", "data": "msi_data"},
        doc="Deliver an MSI (address/data) to the guest.",
    ),
    OpDecl(
        d.XEN_DMOP_map_mem_type_to_ioreq_server,
        "map_mem_type_to_ioreq_server",
        d.xen_dm_op_map_mem_type_to_ioreq_server,
        params=("id", "type", "flags"),
        out=("opaque",),
        copy_back=CopyBack.ALWAYS,
        continuation=True,
        doc="Claim (or release) p2m_ioreq_server pages for a server.",
    ),
    OpDecl(
        d.XEN_DMOP_remote_shutdown,
        "remote_shutdown",
        d.xen_dm_op_remote_shutdown,
        params=("reason",),
        function="shutdown",
        since=(4, 10),
        doc="Shut the domain down with a SHUTDOWN_* reason.",
    ),
    OpDecl(
        d.XEN_DMOP_relocate_memory,
        "relocate_memory",
        d.xen_dm_op_relocate_memory,
        params=("size", "src_gfn", "dst_gfn"),
        out=("size", "src_gfn", "dst_gfn"),
        copy_back=CopyBack.ON_RESTART,
        continuation=True,
        since=(4, 11),
        doc="Move guest pages to other gfns (add_to_physmap gmfn_range).",
    ),
    OpDecl(
        d.XEN_DMOP_pin_memory_cacheattr,
        "pin_memory_cacheattr",
        d.xen_dm_op_pin_memory_cacheattr,
        params=("start", "end", "type"),
        since=(4, 11),
        doc="Pin the cache attribute of a gfn range (or delete a pin).",
    ),
    OpDecl(
        d.XEN_DMOP_set_irq_level,
        "set_irq_level",
        d.xen_dm_op_set_irq_level,
        params=("irq", "level"),
        since=(4, 15),
        arch=ARM,
        limits={"level": 1},
        doc="Arm: set the level of an SPI (irq >= 32).",
    ),
    OpDecl(
        d.XEN_DMOP_nr_vcpus,
        "nr_vcpus",
        d.xen_dm_op_nr_vcpus,
        params=(),
        out=("vcpus",),
        copy_back=CopyBack.ALWAYS,
        since=(4, 15),
        arch=BOTH,
        doc="The domain's maximum number of vCPUs.",
    ),
)

OPS: dict[int, OpDecl] = {decl.number: decl for decl in DECLARATIONS}
BY_NAME: dict[str, OpDecl] = {decl.name: decl for decl in DECLARATIONS}
#: ``ARRAY_SIZE(op_size)`` in x86 ``dm_op()``: op numbers at or above it are -EOPNOTSUPP
NR_OPS = 21
