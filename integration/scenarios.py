"""DMOP scenarios: declarative call sequences, valid and invalid, run the same way on a
real Xen and on the mock, with what Xen 4.17.7 does at each step.

A scenario is a list of `Step`s: a ``DeviceModel`` method, its arguments after the domid
(``Ref("name")`` stands for a value an earlier step saved), which domain it targets
(the scenario's guest, dom0, a missing domid, a PV guest), and the outcome Xen gives:
``OK``, a returned value, or an errno.  `run_scenario` executes one against any object
with DeviceModel's method names (xendmop's ``DeviceModel`` on any backend, or
``xenlab.LibXDM``) and records each step's outcome, normalised so that two runs compare
with ``==``.

Self-check on the mock alone (no Xen needed)::

    python -m integration.scenarios --mock        # or: python integration/scenarios.py --mock

runs every scenario on a MockXen guest shaped like the lab's (HVM, 2 vCPUs, 16 MiB) and
fails when the mock departs from Xen's outcome at a step not listed in
`KNOWN_DIFFERENCES`.  On a real dom0, integration/test_mock_vs_xen.py runs them on real
PVH guests and on the mock in the same process and compares step by step.

HAZARD: never add an ACCEPTED ``set_isa_irq_level`` (irq < 16, level 0/1) here: against
a PVH guest, which has no emulated PIC/IOAPIC, it crashed Xen 4.17.7 (#GP in
hvm_isa_irq_assert/deassert).  The same code is reached by ``set_pci_intx_level``
asserting while a PCI link is routed to an ISA IRQ, and by ``set_pci_link_route`` moving
an asserted link: assert INTx only while every link route is 0.  Calls Xen rejects
before the vIOAPIC (irq >= 16, level > 1, missing domid) are fine.

HAZARD 2: never issue ``track_dirty_vram(domid, pfn, 0)`` ("stop tracking") with the empty
bitmap as a 0-byte buffer at a page-aligned address (as xendmop's privcmd backend once
did): the Debian 6.1 dom0 kernel's privcmd (``lock_pages`` in
drivers/xen/privcmd.c) then asks ``pin_user_pages_fast`` for 0 pages: the call fails with
EFAULT but corrupts kernel memory (seen: an oops in ``try_grab_folio`` with list corruption
during a run; reproduced with raw ioctls, page-aligned 0-byte buffers: EFAULT, then a slab
GPF in dom0 seconds later).  An unaligned 0-byte buffer pins one page and works (0), which
is why libxendevicemodel's call usually succeeds.  A restricted fd can issue it: treat it
as a possible security issue, not for public trackers.  Both backends now point the empty
bitmap inside a page (tests/test_compiled_calls.py, tests/test_libxen_backend.py), and the
"dirty vram" scenario stops tracking through them.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

OK = "ok"
GUEST, DOM0, MISSING, PV = "guest", "dom0", "missing", "pv"
#: The lab guest's shape, mirrored by the mock's guest.
GUEST_VCPUS, GUEST_MEMORY_MB = 2, 16
PORT, MMIO = 0x5600, 0xFE000000
ARM_NR_IRQS = 64  # the Arm lab guest's vGIC: 32 local interrupts, one rank of SPIs (xenlab)
PCI = (0, 0, 3, 0)  # segment, bus, device, function
RAM_PFN = 0x800  # 8 MiB into the 16 MiB guest: RAM, clear of the tiny kernel at 1 MiB
BEYOND_PFN = 1 << 52  # above any guest's highest gfn, and gfn >> paddr_bits is nonzero for any paddr_bits
INVALID_GFN = 2**64 - 1
HVMMEM_ram_rw, HVMMEM_ram_ro, HVMMEM_unused, HVMMEM_ioreq_server = 0, 1, 3, 4
MEM_ACCESS_WRITE = 2
CACHE_UC, CACHE_WT, CACHE_WB, CACHE_DELETE = 0, 4, 6, 0xFFFFFFFF
EVENT_HW_EXC, PAGE_FAULT = 3, 14


@dataclass(frozen=True)
class Ref:
    """An argument filled in from the value an earlier step saved under `name`."""

    name: str


@dataclass(frozen=True)
class Step:
    label: str
    call: str  # a DeviceModel method
    args: tuple[Any, ...] = ()  # after the domid
    expect: object = OK  # Xen 4.17.7: OK, a value (normalised, see `normalise`), or an errno
    dom: str = GUEST  # which domain the call targets
    save: str | None = None  # keep the (raw) return value for later Refs
    field: str | None = None  # record only this attribute of the return value


@dataclass(frozen=True)
class Scenario:
    name: str
    steps: tuple[Step, ...]
    #: False when the scenario leaves the guest changed for good (an event latched until the
    #: guest runs, log-dirty mode left on, the guest shut down): it then needs its own guest.
    reuses_guest: bool = True
    #: domains the scenario needs besides its guest (a run without one skips those steps)
    needs: tuple[str, ...] = ()


def _s(label: str, call: str, *args: Any, expect: object = OK, **kw: Any) -> Step:
    return Step(label, call, args, expect, **kw)


ID = Ref("id")

# fmt: off
# How the devicemodel scenarios begin, on either architecture: the guest's vCPUs, then a server.
SERVER_START = (
    _s("nr_vcpus", "nr_vcpus", expect=GUEST_VCPUS),
    _s("create_ioreq_server (bufioreq off)", "create_ioreq_server", 0, expect=0, save="id"),
    _s("get_ioreq_server_info (no gfns)", "get_ioreq_server_info", ID, expect=0, field="bufioreq_port"),
)
# The 25 steps integration/test_devicemodel.py checks against libxendevicemodel: only
# methods xenlab.LibXDM also has, with C's argument order.
DEVICEMODEL = Scenario(
    "devicemodel",
    (
        *SERVER_START,
        _s("map ports", "map_io_range_to_ioreq_server", ID, False, PORT, PORT + 7),
        _s("map mmio", "map_io_range_to_ioreq_server", ID, True, MMIO, MMIO + 0xFFF),
        _s("map overlapping ports", "map_io_range_to_ioreq_server", ID, False, PORT + 4, PORT + 11,
           expect="EEXIST"),
        _s("map pcidev", "map_pcidev_to_ioreq_server", ID, *PCI),
        _s("enable", "set_ioreq_server_state", ID, True),
        _s("unmap pcidev", "unmap_pcidev_from_ioreq_server", ID, *PCI),
        _s("unmap sub-range", "unmap_io_range_from_ioreq_server", ID, False, PORT, PORT + 3),
        _s("unmap no longer whole range", "unmap_io_range_from_ioreq_server", ID, False, PORT, PORT + 7,
           expect="ENOENT"),
        _s("disable", "set_ioreq_server_state", ID, False),
        # INTx only while every PCI link route is 0 (see HAZARD above).
        _s("intx assert", "set_pci_intx_level", 0, 0, 3, 0, 1),
        _s("intx deassert", "set_pci_intx_level", 0, 0, 3, 0, 0),
        _s("intx device 32", "set_pci_intx_level", 0, 0, 32, 0, 1, expect="EINVAL"),
        _s("link route", "set_pci_link_route", 0, 5),
        _s("link route off", "set_pci_link_route", 0, 0),
        # HAZARD: rejected ISA IRQ levels only (see the module docstring).
        _s("isa irq 16 (rejected)", "set_isa_irq_level", 16, 0, expect="EINVAL"),
        _s("isa level 2 (rejected)", "set_isa_irq_level", 3, 2, expect="EINVAL"),
        _s("set_irq_level is Arm-only", "set_irq_level", 32, 1, expect="EOPNOTSUPP"),
        _s("inject msi", "inject_msi", 0xFEE00000, 0x30),
        _s("destroy", "destroy_ioreq_server", ID),
        _s("destroy again", "destroy_ioreq_server", ID, expect="ENOENT"),
        _s("dom0 as target", "nr_vcpus", expect="EPERM", dom=DOM0),
        _s("remote shutdown", "shutdown", 0),
    ),
    reuses_guest=False,
)

SLOTS = 8  # MAX_NR_IOREQ_SERVERS (xen/include/xen/sched.h), the same on 4.17

SCENARIOS: tuple[Scenario, ...] = (
    DEVICEMODEL,
    Scenario(
        "server lifecycle",
        (
            _s("create", "create_ioreq_server", 0, expect=0, save="id"),
            _s("info", "get_ioreq_server_info", ID, expect=0, field="bufioreq_port"),
            # Measured on 4.17.7: a legacy gfn is found for a PVH guest too (bufioreq off: port 0).
            _s("info with gfns", "get_ioreq_server_info", ID, expect=0, field="bufioreq_port"),
            _s("enable", "set_ioreq_server_state", ID, True),
            _s("enable again (idempotent)", "set_ioreq_server_state", ID, True),
            _s("disable", "set_ioreq_server_state", ID, False),
            _s("destroy", "destroy_ioreq_server", ID),
            _s("destroy again", "destroy_ioreq_server", ID, expect="ENOENT"),
            _s("info after destroy", "get_ioreq_server_info", ID, expect="ENOENT", field="bufioreq_port"),
            _s("enable after destroy", "set_ioreq_server_state", ID, True, expect="ENOENT"),
            _s("map after destroy", "map_io_range_to_ioreq_server", ID, False, PORT, PORT, expect="ENOENT"),
            _s("destroy id 8 (past the last slot)", "destroy_ioreq_server", 8, expect="ENOENT"),
            _s("destroy id 0xffff", "destroy_ioreq_server", 0xFFFF, expect="ENOENT"),
        ),
    ),
    Scenario(
        "server slots",
        (
            *(_s(f"create #{i}", "create_ioreq_server", 0, expect=i, save=f"s{i}") for i in range(SLOTS)),
            _s("create a ninth", "create_ioreq_server", 0, expect="ENOSPC"),
            _s("destroy #3", "destroy_ioreq_server", Ref("s3")),
            _s("create takes the lowest free slot", "create_ioreq_server", 0, expect=3, save="s3"),
            *(_s(f"destroy #{i}", "destroy_ioreq_server", Ref(f"s{i}")) for i in range(SLOTS)),
            _s("create after all destroyed", "create_ioreq_server", 0, expect=0, save="again"),
            _s("destroy it", "destroy_ioreq_server", Ref("again")),
        ),
    ),
    Scenario(
        "io ranges",
        (
            _s("create", "create_ioreq_server", 0, expect=0, save="id"),
            _s("map ports", "map_io_range_to_ioreq_server", ID, False, PORT, PORT + 7),
            _s("map overlapping ports", "map_io_range_to_ioreq_server", ID, False, PORT + 7, PORT + 8,
               expect="EEXIST"),
            _s("same numbers as MMIO (another rangeset)", "map_io_range_to_ioreq_server", ID, True, PORT, PORT + 7),
            _s("start > end", "map_io_range_to_ioreq_server", ID, False, PORT + 0x20, PORT + 0x10,
               expect="EINVAL"),
            _s("unmap sub-range", "unmap_io_range_from_ioreq_server", ID, False, PORT, PORT + 3),
            _s("unmap the whole range now", "unmap_io_range_from_ioreq_server", ID, False, PORT, PORT + 7,
               expect="ENOENT"),
            _s("unmap the rest", "unmap_io_range_from_ioreq_server", ID, False, PORT + 4, PORT + 7),
            _s("unmap the rest again", "unmap_io_range_from_ioreq_server", ID, False, PORT + 4, PORT + 7,
               expect="ENOENT"),
            _s("unmap never mapped mmio", "unmap_io_range_from_ioreq_server", ID, True, MMIO, MMIO + 1,
               expect="ENOENT"),
            _s("map pcidev", "map_pcidev_to_ioreq_server", ID, *PCI),
            _s("map pcidev again", "map_pcidev_to_ioreq_server", ID, *PCI, expect="EEXIST"),
            _s("unmap pcidev", "unmap_pcidev_from_ioreq_server", ID, *PCI),
            _s("unmap pcidev again", "unmap_pcidev_from_ioreq_server", ID, *PCI, expect="ENOENT"),
            _s("map on an empty slot", "map_io_range_to_ioreq_server", 5, False, PORT, PORT, expect="ENOENT"),
            _s("second server", "create_ioreq_server", 0, expect=1, save="id2"),
            _s("servers may overlap", "map_io_range_to_ioreq_server", Ref("id2"), True, PORT, PORT + 7),
            _s("destroy", "destroy_ioreq_server", ID),
            _s("destroy the second", "destroy_ioreq_server", Ref("id2")),
        ),
    ),
    Scenario(
        "domains",
        (
            _s("nr_vcpus", "nr_vcpus", expect=GUEST_VCPUS),
            _s("dom0: the caller's own domain", "nr_vcpus", expect="EPERM", dom=DOM0),
            _s("missing domid", "nr_vcpus", expect="ESRCH", dom=MISSING),
            _s("create on a missing domid", "create_ioreq_server", 0, expect="ESRCH", dom=MISSING),
            _s("PV guest: DMOPs are HVM-only", "nr_vcpus", expect="EINVAL", dom=PV),
            _s("create on a PV guest", "create_ioreq_server", 0, expect="EINVAL", dom=PV),
        ),
        needs=(PV,),
    ),
    Scenario(
        "restricted handle",
        (
            _s("restrict to the guest", "restrict"),
            _s("the guest still works", "nr_vcpus", expect=GUEST_VCPUS),
            _s("restrict again, same domid", "restrict"),
            _s("another domid: refused by privcmd", "nr_vcpus", expect="EPERM", dom=MISSING),
            _s("dom0: refused by privcmd", "nr_vcpus", expect="EPERM", dom=DOM0),
            _s("restrict to another domid", "restrict", expect="EINVAL", dom=MISSING),
            _s("create under restriction", "create_ioreq_server", 0, expect=0, save="id"),
            _s("destroy under restriction", "destroy_ioreq_server", ID),
        ),
    ),
    Scenario(
        "interrupts",
        (
            # INTx only while every PCI link route is 0 (see HAZARD above).
            _s("intx A assert", "set_pci_intx_level", 0, 0, 3, 0, 1),
            _s("intx A deassert", "set_pci_intx_level", 0, 0, 3, 0, 0),
            _s("intx on segment 1", "set_pci_intx_level", 1, 0, 3, 0, 1, expect="EINVAL"),
            _s("intx on bus 1", "set_pci_intx_level", 0, 1, 3, 0, 1, expect="EINVAL"),
            _s("intx pin 4", "set_pci_intx_level", 0, 0, 3, 4, 1, expect="EINVAL"),
            _s("intx level 2", "set_pci_intx_level", 0, 0, 3, 0, 2, expect="EINVAL"),
            _s("link 4", "set_pci_link_route", 4, 5, expect="EINVAL"),
            _s("link to irq 16", "set_pci_link_route", 0, 16, expect="EINVAL"),
            _s("link 3 to irq 10, then off", "set_pci_link_route", 3, 10),
            _s("link 3 off", "set_pci_link_route", 3, 0),
            # HAZARD: rejected ISA IRQ levels only (see the module docstring).
            _s("isa irq 255 (rejected)", "set_isa_irq_level", 255, 1, expect="EINVAL"),
            _s("isa level 255 (rejected)", "set_isa_irq_level", 1, 255, expect="EINVAL"),
            _s("set_irq_level (Arm only)", "set_irq_level", 40, 0, expect="EOPNOTSUPP"),
            _s("msi vector 0x31", "inject_msi", 0xFEE00000, 0x31),
            _s("msi vector 0: a PIRQ, here 0", "inject_msi", 0xFEE00000, 0x0, expect="ERANGE"),
        ),
    ),
    Scenario(
        "modified memory without log-dirty",
        (
            # hvm/dm.c modified_memory: a domain not in log-dirty mode returns 0 before reading extents.
            _s("one page", "modified_memory", RAM_PFN, 1),
            _s("beyond the highest gfn", "modified_memory", BEYOND_PFN, 1),
            _s("zero pages", "modified_memory", RAM_PFN, 0),
        ),
    ),
    Scenario(
        "dirty vram, then modified memory",
        (
            _s("track 64 pages: all dirty at first", "track_dirty_vram", RAM_PFN, 64, expect="ff" * 8),
            _s("again: nothing written since", "track_dirty_vram", RAM_PFN, 64, expect="00" * 8),
            _s("a different range: all dirty again", "track_dirty_vram", RAM_PFN + 64, 8, expect="ff"),
            # More than one privcmd buffer's bitmap (32768 pages): xendmop splits the call, and each
            # part is a new range for Xen (hap_track_dirty_vram), so all of it reads dirty.
            _s("32769 pages: two calls", "track_dirty_vram", RAM_PFN, 32769, expect="4097 x ff"),
            # "Stop tracking": both backends now pass the empty bitmap at an address that does not
            # start a page (HAZARD 2 in the module docstring was a page-aligned 0-byte buffer).
            _s("stop tracking (nr 0)", "track_dirty_vram", RAM_PFN, 0, expect=""),
            _s("track again: a new range, all dirty", "track_dirty_vram", RAM_PFN, 8, expect="ff"),
            # On 4.17.7 VRAM tracking leaves the domain out of log-dirty mode: modified_memory
            # still returns 0 before looking at its extents.
            _s("modified one page", "modified_memory", RAM_PFN, 1),
            _s("modified beyond the highest gfn", "modified_memory", BEYOND_PFN, 1),
            _s("modified zero pages", "modified_memory", RAM_PFN, 0),
            _s("modified, bulk of two", "modified_memory_bulk", ((RAM_PFN, 2), (RAM_PFN + 8, 1))),
        ),
        reuses_guest=False,
    ),
    Scenario(
        "memory types",
        (
            _s("ram_ro", "set_mem_type", HVMMEM_ram_ro, RAM_PFN, 4),
            _s("back to ram_rw", "set_mem_type", HVMMEM_ram_rw, RAM_PFN, 4),
            _s("zero pages", "set_mem_type", HVMMEM_ram_ro, RAM_PFN, 0, expect="EINVAL"),
            _s("beyond the highest gfn", "set_mem_type", HVMMEM_ram_ro, BEYOND_PFN, 1, expect="EINVAL"),
            _s("HVMMEM_unused", "set_mem_type", HVMMEM_unused, RAM_PFN, 1, expect="EINVAL"),
            _s("type 5", "set_mem_type", 5, RAM_PFN, 1, expect="EINVAL"),
            _s("ioreq_server type, unclaimed", "set_mem_type", HVMMEM_ioreq_server, RAM_PFN, 1, expect="EINVAL"),
            _s("create", "create_ioreq_server", 0, expect=0, save="id"),
            _s("claim ioreq_server pages", "map_mem_type_to_ioreq_server", ID, HVMMEM_ioreq_server, MEM_ACCESS_WRITE),
            _s("ioreq_server type, claimed", "set_mem_type", HVMMEM_ioreq_server, RAM_PFN, 1),
            _s("ioreq_server to ram_ro", "set_mem_type", HVMMEM_ram_ro, RAM_PFN, 1, expect="EINVAL"),
            _s("back to ram_rw", "set_mem_type", HVMMEM_ram_rw, RAM_PFN, 1),
            _s("release the claim", "map_mem_type_to_ioreq_server", ID, HVMMEM_ioreq_server, 0),
            _s("destroy", "destroy_ioreq_server", ID),
        ),
    ),
    Scenario(
        "inject event",
        (
            _s("#PF on vCPU 0", "inject_event", 0, PAGE_FAULT, EVENT_HW_EXC, 2, 0, 0x1000),
            _s("a second, not yet delivered", "inject_event", 0, PAGE_FAULT, EVENT_HW_EXC, 2, 0, 0x2000,
               expect="EBUSY"),
            _s("#PF on vCPU 1", "inject_event", 1, PAGE_FAULT, EVENT_HW_EXC, 2, 0, 0x1000),
            _s("vCPU 2 of 2", "inject_event", 2, PAGE_FAULT, EVENT_HW_EXC, 2, 0, 0x1000, expect="EINVAL"),
        ),
        reuses_guest=False,  # the latched events stay until the guest runs
    ),
    Scenario(
        "cache attributes",
        (
            _s("pin WB", "pin_memory_cacheattr", RAM_PFN, RAM_PFN + 15, CACHE_WB),
            _s("same range, now WT", "pin_memory_cacheattr", RAM_PFN, RAM_PFN + 15, CACHE_WT),
            _s("overlapping range", "pin_memory_cacheattr", RAM_PFN + 8, RAM_PFN + 23, CACHE_WB, expect="EBUSY"),
            _s("end < start", "pin_memory_cacheattr", RAM_PFN + 1, RAM_PFN, CACHE_WB, expect="EINVAL"),
            _s("beyond paddr_bits", "pin_memory_cacheattr", BEYOND_PFN, BEYOND_PFN, CACHE_WB, expect="EINVAL"),
            _s("type 2 (undefined)", "pin_memory_cacheattr", RAM_PFN + 32, RAM_PFN + 32, 2, expect="EINVAL"),
            _s("UC without an IOMMU", "pin_memory_cacheattr", RAM_PFN + 32, RAM_PFN + 32, CACHE_UC),
            _s("delete", "pin_memory_cacheattr", RAM_PFN, RAM_PFN + 15, CACHE_DELETE),
            _s("delete again", "pin_memory_cacheattr", RAM_PFN, RAM_PFN + 15, CACHE_DELETE, expect="ENOENT"),
        ),
    ),
    # Issue 17: raw ioctls whose errno was read from Linux, then measured in the lab (Linux 6.1,
    # Xen 4.17.7).  ``raw_*`` steps are the functions in RAW_STEPS below, not DeviceModel methods.
    Scenario(
        "raw privcmd hypercall",
        (
            # privcmd_ioctl_hypercall passes the op on; Xen answers ENOSYS for an op it lacks
            _s("op 200 (no such hypercall)", "raw_hypercall", 200, expect="ENOSYS"),
            # __u64 op 2**32+41 is not truncated into a dm_op (41) on the way: still ENOSYS
            _s("op 2**32+41, no buffers", "raw_hypercall", 2**32 + 41, expect="ENOSYS"),
            # the dm_op itself with no buffers: do_dm_op's nr_bufs == 0 check (XSA-506)
            _s("op 41 (dm_op), no buffers", "raw_hypercall", 41, expect="ENODATA"),
        ),
    ),
    Scenario(
        "raw mmapbatch array bounds",
        (
            # one gfn, its 8 bytes end a page that a PROT_NONE page follows
            _s("num 1", "raw_mmapbatch", 1),
            # gather_array copies m.num entries whatever the array holds: EFAULT where it ends
            _s("num 2", "raw_mmapbatch", 2, expect="EFAULT"),
            # nr_pages of an unsigned int never exceeds LONG_MAX >> PAGE_SHIFT: not EINVAL
            _s("num 2**31+1", "raw_mmapbatch", 2**31 + 1, expect="EFAULT"),
            _s("num 2**32-1", "raw_mmapbatch", 2**32 - 1, expect="EFAULT"),
            _s("num 0", "raw_mmapbatch", 0, expect="EINVAL"),
        ),
    ),
    Scenario(
        "evtchn truncation",
        (
            # evtchn.c assigns the unsigned int remote_domain to a domid_t: 0x10000|D is D
            _s("unbound, remote D", "raw_bind_unbound", 0),
            _s("unbound, remote 0x10000|D", "raw_bind_unbound", 0x10000),
            # evtchn_alloc_unbound records remote_dom without looking it up
            _s("unbound, remote missing", "raw_bind_unbound", 0, dom=MISSING),
            _s("unbound, remote 0xffff0000|D", "raw_bind_unbound", 0xFFFF0000),
            _s("interdomain 0x10000|D, no such port", "raw_bind_interdomain", 0x10000, False, expect="EINVAL"),
            _s("interdomain 0x10000|D, the bufioreq port", "raw_bind_interdomain", 0x10000, True),
            _s("interdomain D, the bufioreq port", "raw_bind_interdomain", 0, True),
            _s("interdomain 0x10000|missing", "raw_bind_interdomain", 0x10000, False, expect="ESRCH", dom=MISSING),
        ),
    ),
    Scenario(
        "relocate memory (refusals)",
        (
            _s("no pages", "relocate_memory", 0, RAM_PFN, RAM_PFN + 16),
            _s("to INVALID_GFN", "relocate_memory", 1, RAM_PFN, INVALID_GFN, expect="EINVAL"),
            _s("source wraps around", "relocate_memory", 2, INVALID_GFN, RAM_PFN, expect="EOVERFLOW"),
        ),
    ),
)

# fmt: on

BY_NAME = {s.name: s for s in SCENARIOS}

# (scenario, step label) -> why the mock knowingly differs from Xen there, with the Xen source.
# fmt: off
# Xen on Arm (xen/arch/arm/dm.c): the ops Xen/Arm has (ioreq servers through the common
# ioreq_server_dm_op, set_irq_level, nr_vcpus) and the x86 ones, which reach
# ioreq_server_dm_op's default: EOPNOTSUPP.  Only methods xenlab.LibXDM has, so the same steps
# run through xendmop, libxendevicemodel and the mock.  The guest has an SBSA UART (xl's vuart),
# so SPIs 32..63 exist and 32 is Xen's own (see integration/test_arm.py).
ARM_MMIO = 0x02000000  # in GUEST_VIRTIO_MMIO_BASE's window, free without virtio devices
ARM = Scenario(
    "arm devicemodel",
    (
        *SERVER_START,
        _s("map mmio", "map_io_range_to_ioreq_server", ID, True, ARM_MMIO, ARM_MMIO + 0xFFF),
        _s("map overlapping mmio", "map_io_range_to_ioreq_server", ID, True, ARM_MMIO + 0x800,
           ARM_MMIO + 0x17FF, expect="EEXIST"),
        _s("enable", "set_ioreq_server_state", ID, True),
        _s("unmap sub-range", "unmap_io_range_from_ioreq_server", ID, True, ARM_MMIO, ARM_MMIO + 0x7FF),
        _s("unmap no longer whole range", "unmap_io_range_from_ioreq_server", ID, True, ARM_MMIO,
           ARM_MMIO + 0xFFF, expect="ENOENT"),
        _s("disable", "set_ioreq_server_state", ID, False),
        _s("spi 33 assert", "set_irq_level", 33, 1),
        _s("spi 33 deassert", "set_irq_level", 33, 0),
        _s("ppi 31", "set_irq_level", 31, 1, expect="EINVAL"),
        _s("vuart's spi 32", "set_irq_level", 32, 1, expect="EINVAL"),
        _s("spi 64, past the vGIC", "set_irq_level", 64, 1, expect="EINVAL"),
        _s("level 2", "set_irq_level", 33, 2, expect="EINVAL"),
        _s("intx is x86's", "set_pci_intx_level", 0, 0, 3, 0, 1, expect="EOPNOTSUPP"),
        _s("isa irq is x86's", "set_isa_irq_level", 3, 1, expect="EOPNOTSUPP"),
        _s("link route is x86's", "set_pci_link_route", 0, 5, expect="EOPNOTSUPP"),
        _s("msi is x86's", "inject_msi", 0xFEE00000, 0x30, expect="EOPNOTSUPP"),
        _s("destroy", "destroy_ioreq_server", ID),
        _s("destroy again", "destroy_ioreq_server", ID, expect="ENOENT"),
        _s("dom0 as target", "nr_vcpus", expect="EPERM", dom=DOM0),
        _s("missing domain", "nr_vcpus", expect="ESRCH", dom=MISSING),
    ),
)
# fmt: on

KNOWN_DIFFERENCES: dict[tuple[str, str], str] = {
    # Empty: the three differences found in the lab (HAP VRAM tracking left log-dirty off;
    # UC pins accepted without an IOMMU) were fixed in the mock, where Xen 4.17.7 wins.
}

# --- raw ioctls ----------------------------------------------------------------------------------
# What a ``raw_*`` step does, through the devices ``api.raw_open`` opens (the mock's own devices
# on a MockLab handle; the real /dev/xen nodes otherwise): ``fn(api, domid, *args)``.  A success
# returns None (OK): port numbers and the like differ between the two sides and mean nothing here.


def _raw_open(api: Any, path: str) -> Any:
    opener = getattr(api, "raw_open", None)
    if opener is None:
        from xendmop.backends.device import open_device

        opener = open_device
    return opener(path)


def raw_hypercall(api: Any, domid: int, op: int) -> None:
    """IOCTL_PRIVCMD_HYPERCALL ``op`` with arg[0] = domid and no buffers."""
    from xendmop.abi.privcmd import IOCTL_PRIVCMD_HYPERCALL, privcmd_hypercall

    dev = _raw_open(api, "/dev/xen/privcmd")
    try:
        call = privcmd_hypercall()
        call.op, call.arg[0] = op, domid
        dev.ioctl(IOCTL_PRIVCMD_HYPERCALL, call)
    finally:
        dev.close()


def raw_mmapbatch(api: Any, domid: int, num: int) -> None:
    """IOCTL_PRIVCMD_MMAPBATCH_V2 of ``num`` frames into a one-page privcmd VMA, from an array
    holding one gfn (RAM_PFN) in the last 8 bytes of a page that a PROT_NONE page follows."""
    import ctypes
    import ctypes.util
    import mmap

    from xendmop.abi.privcmd import IOCTL_PRIVCMD_MMAPBATCH_V2, privcmd_mmapbatch_v2

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = mmap.PAGESIZE
    base = libc.mmap(None, 2 * page, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if base in (None, ctypes.c_void_p(-1).value):
        raise RuntimeError("mmap of the guard pages failed")
    dev = _raw_open(api, "/dev/xen/privcmd")
    try:
        if libc.mprotect(base + page, page, 0) != 0:  # PROT_NONE
            raise RuntimeError("mprotect of the guard page failed")
        arr = base + page - 8
        ctypes.c_uint64.from_address(arr).value = RAM_PFN
        vma = dev.mmap(page)
        err = (ctypes.c_int * 4)()
        anchor = ctypes.c_char.from_buffer(vma)
        try:
            m = privcmd_mmapbatch_v2(num, domid, ctypes.addressof(anchor), arr, ctypes.addressof(err))
            dev.ioctl(IOCTL_PRIVCMD_MMAPBATCH_V2, m)
        finally:
            del anchor
            vma.close()
    finally:
        dev.close()
        libc.munmap(base, 2 * page)


def raw_bind_unbound(api: Any, domid: int, high: int) -> None:
    """IOCTL_EVTCHN_BIND_UNBOUND_PORT with ``remote_domain = high | domid``."""
    from xendmop.abi.evtchn import IOCTL_EVTCHN_BIND_UNBOUND_PORT, ioctl_evtchn_bind_unbound_port

    dev = _raw_open(api, "/dev/xen/evtchn")
    try:
        dev.ioctl(IOCTL_EVTCHN_BIND_UNBOUND_PORT, ioctl_evtchn_bind_unbound_port(high | domid))
    finally:
        dev.close()


def raw_bind_interdomain(api: Any, domid: int, high: int, real_port: bool) -> None:
    """IOCTL_EVTCHN_BIND_INTERDOMAIN to ``high | domid``: its remote port a new server's
    bufioreq port (``real_port``, awaiting dom0) or 1000 (not allocated in the lab guest)."""
    from xendmop.abi.evtchn import IOCTL_EVTCHN_BIND_INTERDOMAIN, ioctl_evtchn_bind_interdomain

    sid = port = None
    if real_port:
        sid = api.create_ioreq_server(domid, 1)
        port = api.get_ioreq_server_info(domid, sid).bufioreq_port
    dev = _raw_open(api, "/dev/xen/evtchn")
    try:
        dev.ioctl(IOCTL_EVTCHN_BIND_INTERDOMAIN, ioctl_evtchn_bind_interdomain(high | domid, port or 1000))
    finally:
        dev.close()
        if sid is not None:
            api.destroy_ioreq_server(domid, sid)


RAW_STEPS: dict[str, Callable[..., None]] = {
    "raw_hypercall": raw_hypercall,
    "raw_mmapbatch": raw_mmapbatch,
    "raw_bind_unbound": raw_bind_unbound,
    "raw_bind_interdomain": raw_bind_interdomain,
}

# --- running ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One step's result: `value` (normalised) when it returned, else `error`: an errno name,
    ``refused:<field>`` for xendmop's own argument check, or ``skipped:<why>``."""

    label: str
    value: object = None
    error: str | None = None

    @property
    def key(self) -> object:
        return self.error if self.error is not None else self.value

    def as_json(self) -> dict[str, object]:
        return {"step": self.label, "value": self.value, "error": self.error}


def normalise(value: Any, attribute: str | None = None) -> object:
    """A comparable, JSON-friendly form: OK for None, ints as ints, bytes as hex (a long
    run of one byte as ``"N x hh"``, other long bytes as length and SHA-256)."""
    if attribute is not None and not isinstance(value, int):
        value = getattr(value, attribute)
    if value is None:
        return OK
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if len(data) <= 32:
            return data.hex()
        if data == data[:1] * len(data):
            return f"{len(data)} x {data[:1].hex()}"
        return f"{len(data)} bytes sha256 {hashlib.sha256(data).hexdigest()[:16]}"
    return repr(value)


def errno_name(code: int) -> str:
    """The errno's name, EOPNOTSUPP for 95 on every architecture (errorcode gives the alias
    ENOTSUP on some, aarch64's Python among them)."""
    if code == errno.EOPNOTSUPP:
        return "EOPNOTSUPP"
    return errno.errorcode.get(code, str(code))


def equivalent(x: object, y: object) -> bool:
    """Same outcome, or xendmop refusing an argument (``refused:<field>``) that Xen or the C
    library refuses with EINVAL."""
    if x == y:
        return True
    refused = {str(k).startswith("refused:") for k in (x, y)}
    return refused == {True, False} and "EINVAL" in (x, y)


def run_step(api: Any, step: Step, domids: Mapping[str, int], saved: dict[str, Any]) -> Outcome:
    """Call one step; its outcome.  Only OSError (errno) and ValueError (xendmop's
    ArgumentError) are outcomes: anything else is a bug and propagates."""
    if step.dom not in domids:
        return Outcome(step.label, error=f"skipped:no {step.dom} domain here")
    missing = [a.name for a in step.args if isinstance(a, Ref) and a.name not in saved]
    if missing:
        return Outcome(step.label, error=f"skipped:no {missing[0]} saved")
    args = [saved[a.name] if isinstance(a, Ref) else a for a in step.args]
    raw = RAW_STEPS.get(step.call)
    try:
        if raw is not None:
            value = raw(api, domids[step.dom], *args)
        else:
            value = getattr(api, step.call)(domids[step.dom], *args)
    except OSError as e:
        return Outcome(step.label, error=errno_name(e.errno or 0))
    except ValueError as e:  # xendmop.ArgumentError: refused before any syscall
        return Outcome(step.label, error=f"refused:{getattr(e, 'name', type(e).__name__)}")
    if step.save is not None:
        saved[step.save] = value
    return Outcome(step.label, normalise(value, step.field))


def run_scenario(
    scenario: Scenario, api: Any, domids: Mapping[str, int], trace: Callable[[str], object] | None = None
) -> list[Outcome]:
    """Run every step (the guest is ``domids["guest"]``); then destroy any server the
    scenario created and left, so the guest can be reused when `reuses_guest`.
    ``trace`` is told each step before it runs (to see where a run died)."""
    saved: dict[str, Any] = {}
    outcomes = []
    for step in scenario.steps:
        if trace is not None:
            trace(f"{scenario.name} / {step.label}: {step.call}{step.args} on {step.dom}")
        outcomes.append(run_step(api, step, domids, saved))
    for step in scenario.steps:
        if step.call == "create_ioreq_server" and step.save in saved and step.dom in domids:
            try:
                api.destroy_ioreq_server(domids[step.dom], saved[step.save])
            except (OSError, ValueError):
                pass  # destroyed by the scenario itself (ENOENT), or the guest is gone
    return outcomes


Runs = dict[str, list[Outcome]]


def run_all(
    open_api: Callable[[], Any],
    new_guest: Callable[[Scenario], int],
    domids: Mapping[str, int],
    scenarios: tuple[Scenario, ...] = SCENARIOS,
    trace: Callable[[str], object] | None = None,
) -> Runs:
    """Each scenario through a fresh handle (``open_api``: restriction is per handle), the
    ones that leave their guest as they found it (`Scenario.reuses_guest`) on one shared
    guest, the others each on a fresh one (``new_guest``: guests are slow to make under
    TCG); ``domids`` gives dom0, the missing and the PV domid."""
    runs: Runs = {}
    shared: int | None = None
    for scenario in scenarios:
        if scenario.reuses_guest:
            shared = guest = new_guest(scenario) if shared is None else shared
        else:
            guest = new_guest(scenario)
        api = open_api()
        try:
            runs[scenario.name] = run_scenario(scenario, api, {**domids, GUEST: guest}, trace)
        finally:
            api.close()
    return runs


# --- comparing ---------------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    step: str
    expected: object
    got: dict[str, object]  # side name -> Outcome.key
    status: str  # "identical", "known", "skipped" or "DIFFERENT"
    reason: str = ""


@dataclass
class Report:
    sides: tuple[str, str]
    rows: list[Row] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.rows)

    @property
    def differences(self) -> list[Row]:
        return [r for r in self.rows if r.status == "DIFFERENT"]

    def summary(self) -> str:
        scenarios = len({r.scenario for r in self.rows})
        line = (
            f"{scenarios} scenarios, {len(self.rows)} steps, {self.count('identical')} identical, "
            f"{self.count('known')} known differences"
        )
        extra = [f"{self.count(s)} {s.lower()}" for s in ("skipped", "DIFFERENT") if self.count(s)]
        return line + (", " + ", ".join(extra) if extra else "")

    def lines(self) -> Iterator[str]:
        a, b = self.sides
        for r in self.rows:
            mark = {"identical": "ok  ", "known": "KNWN", "skipped": "skip", "DIFFERENT": "DIFF"}[r.status]
            why = f"  ({r.reason})" if r.reason else ""
            yield (f"{mark} {r.scenario} / {r.step}: {a}={r.got[a]!r} {b}={r.got[b]!r} expected={r.expected!r}{why}")

    def as_json(self) -> dict[str, object]:
        return {
            "sides": list(self.sides),
            "summary": self.summary(),
            "counts": {s: self.count(s) for s in ("identical", "known", "skipped", "DIFFERENT")},
            "rows": [vars(r) for r in self.rows],
        }


def compare(
    sides: tuple[str, str],
    a: Runs,
    b: Runs,
    known: Mapping[tuple[str, str], str] = KNOWN_DIFFERENCES,
    scenarios: tuple[Scenario, ...] = SCENARIOS,
) -> Report:
    """Step-by-step comparison of two runs; a difference is "known" only if listed in `known`."""
    report = Report(sides)
    for scenario in scenarios:
        if scenario.name not in a or scenario.name not in b:
            continue
        for step, x, y in zip(scenario.steps, a[scenario.name], b[scenario.name], strict=True):
            got = {sides[0]: x.key, sides[1]: y.key}
            why = known.get((scenario.name, step.label), "")
            if any(str(k).startswith("skipped:") for k in got.values()):
                status = "skipped"
            elif equivalent(x.key, y.key):
                status, why = "identical", ""
            else:
                status = "known" if why else "DIFFERENT"
            report.rows.append(Row(scenario.name, step.label, step.expect, got, status, why))
    return report


def expected_runs(scenarios: tuple[Scenario, ...] = SCENARIOS) -> Runs:
    """What Xen 4.17.7 does, as runs: the steps' `expect`."""
    return {s.name: [Outcome(st.label, st.expect) for st in s.steps] for s in scenarios}


# --- the mock --------------------------------------------------------------------------------------


class MockLab:
    """A MockXen host shaped like the lab: a PV guest, and one HVM guest per scenario with
    the lab guest's vCPUs and memory (the mock has no PVH flavour; see KNOWN_DIFFERENCES).
    ``arch="arm"``: the Arm lab's instead, guests with an SBSA UART and 64 vGIC interrupts
    (xenlab.create_guest's Arm guest), no PV guest (Xen/Arm has none)."""

    def __init__(self, xen_version: tuple[int, int] | str = (4, 17), arch: str = "x86") -> None:
        from xendmop.mock import MockXen

        self.arch = arch
        if arch == "arm":
            self.host = MockXen(arch="arm", vgic_num_irqs=ARM_NR_IRQS, xen_version=xen_version)
            self.domids = {DOM0: 0, MISSING: 30000}
        else:
            self.host = MockXen(xen_version=xen_version)
            self.pv = self.host.create_domain(vcpus=1, hvm=False, memory_mb=GUEST_MEMORY_MB)
            self.domids = {DOM0: 0, PV: self.pv, MISSING: 30000}

    def new_guest(self, scenario: Scenario) -> int:
        vuart = {"vuart": True} if self.arch == "arm" else {}
        return self.host.create_domain(vcpus=GUEST_VCPUS, hvm=True, memory_mb=GUEST_MEMORY_MB, **vuart)

    def open(self) -> Any:
        from xendmop import DeviceModel

        dm = DeviceModel.open("mock", xen=self.host)
        dm.raw_open = self.host.open_device  # type: ignore[attr-defined]  # for the raw_* steps
        return dm

    def run(self, scenarios: tuple[Scenario, ...] = SCENARIOS) -> Runs:
        return run_all(self.open, self.new_guest, self.domids, scenarios)

    def close(self) -> None:
        self.host.close()

    def __enter__(self) -> MockLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def self_check() -> Report:
    """Every scenario on the mock, compared with Xen's outcomes (`Step.expect`)."""
    with MockLab() as lab:
        return compare(("xen-4.17.7", "mock"), expected_runs(), lab.run())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mock", action="store_true", required=True, help="run every scenario on the mock Xen")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    report = self_check()
    if args.json:
        print(json.dumps(report.as_json(), indent=1))
    else:
        for line in report.lines():
            print(line)
        print(report.summary())
    return 1 if report.differences else 0


if __name__ == "__main__":
    sys.exit(main())
