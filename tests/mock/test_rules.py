"""The rule table: one case per check of Xen's dm_op / ioreq code and Linux privcmd.

Every case is driven with raw bytes through the mock device's ``ioctl`` (bypassing
DeviceModel, which refuses bad values first) and asserts the errno and, for a
refusal, that no domain's state changed.  References are to the project's
DMOP reference (§) and the Xen/Linux functions the mock cites.
"""

from __future__ import annotations

import ctypes
import errno as E
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from xendmop.abi.privcmd import IOCTL_PRIVCMD_RESTRICT, IOCTL_PRIVCMD_UNIMPLEMENTED
from xendmop.abi.xen import domid_t
from xendmop.mock import MockXen
from xendmop.mock.state import IoreqServerState

from .conftest import HVM, NOHAP, PV, make_host
from .raw import BAD, Raw, errno_of, snapshot

Setup = Callable[[MockXen, Raw], Any]
Action = Callable[[Raw], int]


@dataclass
class Case:
    id: str
    action: Action
    expected: int
    setup: Setup | None = None
    host_options: dict[str, Any] | None = None


def server(handle: int = 0, emulator: int | None = None) -> Setup:
    """Create a server through the mock; optionally hand it to another emulator domain."""

    def setup(host: MockXen, raw: Raw) -> Any:
        assert raw.call(HVM, "create_ioreq_server", handle_bufioreq=handle) == 0
        if emulator is not None:
            host.hypervisor.domains[HVM].ioreq_servers[0].emulator = emulator  # type: ignore[union-attr]

    return setup


def seq(*steps: Setup) -> Setup:
    def setup(host: MockXen, raw: Raw) -> None:
        for step in steps:
            step(host, raw)

    return setup


def ok(action: Action) -> Setup:
    def setup(host: MockXen, raw: Raw) -> None:
        assert action(raw) == 0

    return setup


def log_dirty(host: MockXen, raw: Raw) -> None:
    host.set_log_dirty(HVM)


def extent(first_pfn: int, nr: int, pad: int = 0) -> bytes:
    return bytes(ctypes.c_uint32(nr)) + bytes(ctypes.c_uint32(pad)) + bytes(ctypes.c_uint64(first_pfn))


def restricted(to: int) -> Setup:
    def setup(host: MockXen, raw: Raw) -> None:
        assert errno_of(raw.dev.ioctl, IOCTL_PRIVCMD_RESTRICT, domid_t(to)) == 0

    return setup


MAXPFN = 1024 + 10 - 1  # 4 MiB of RAM plus the 10 ioreq gfns (conftest)

CASES = [
    # §1.2 do_dm_op / dm_op common checks, in order
    Case("1.2#1 nr_bufs 0 (hypercall path): ENODATA", lambda r: r.hypercall_op(HVM, "nr_vcpus", nr_bufs=0), E.ENODATA),
    Case("1.2#2 nr_bufs 3: E2BIG", lambda r: r.call(HVM, "nr_vcpus", extra=[8, 8]), E.E2BIG),
    Case("1.2#3 buffer array unreadable: EFAULT", lambda r: r.hypercall(HVM, 1, BAD), E.EFAULT),
    Case("1.2#4 unknown domain: ESRCH", lambda r: r.call(77, "nr_vcpus"), E.ESRCH),
    Case("1.2#4b own domain: EPERM", lambda r: r.call(0, "nr_vcpus"), E.EPERM),
    Case("1.2#5 PV target: EINVAL", lambda r: r.call(PV, "nr_vcpus"), E.EINVAL),
    # §1.2#6 xsm_dm_op(XSM_DM_PRIV, d): dummy XSM's xsm_default_action (xen/include/xsm/dummy.h)
    # lets src through if src->target == d or is_control_domain(src); the process here runs in
    # dom4 (MockXen.set_caller), made by setup.
    Case(
        "1.2#6 caller neither control domain nor a DM domain: EPERM",
        lambda r: r.call(HVM, "nr_vcpus"),
        E.EPERM,
        lambda h, r: _run_in(h, target=None),
    ),
    Case(
        "1.2#6 stub domain of another guest: EPERM",
        lambda r: r.call(HVM, "create_ioreq_server"),
        E.EPERM,
        lambda h, r: _run_in(h, target=NOHAP),
    ),
    Case(
        "1.2#6 stub domain of the target (src->target == d): 0",
        lambda r: r.call(NOHAP, "nr_vcpus"),
        0,
        lambda h, r: _run_in(h, target=NOHAP),
    ),
    Case(
        "1.2#6 after #4: unknown domain from an unprivileged caller: ESRCH",
        lambda r: r.call(77, "nr_vcpus"),
        E.ESRCH,
        lambda h, r: _run_in(h, target=None),
    ),
    Case(
        "1.2#6 after #5: PV target from an unprivileged caller: EINVAL",
        lambda r: r.call(PV, "nr_vcpus"),
        E.EINVAL,
        lambda h, r: _run_in(h, target=None),
    ),
    Case("1.2#7 buf[0] shorter than the header: EFAULT", lambda r: r.call(HVM, "nr_vcpus", size0=7), E.EFAULT),
    Case(
        "1.2#8 header unreadable (hypercall path): EFAULT",
        lambda r: r.hypercall(HVM, 1, ctypes.addressof(_bad_bufs)),
        E.EFAULT,
    ),
    Case("1.2#9 op 21: EOPNOTSUPP", lambda r: r.call(HVM, 21), E.EOPNOTSUPP),
    Case("1.2#9 op 0xffffffff: EOPNOTSUPP", lambda r: r.call(HVM, 0xFFFFFFFF), E.EOPNOTSUPP),
    Case("1.2#9 op 0 (no entry): EOPNOTSUPP", lambda r: r.call(HVM, 0, size0=8), E.EOPNOTSUPP),
    Case("1.2#10 short payload: EFAULT", lambda r: r.call(HVM, "map_io_range_to_ioreq_server", size0=31), E.EFAULT),
    Case("1.2#12 nonzero pad: EINVAL", lambda r: _with_pad(r), E.EINVAL),
    Case(
        "1.2#13 set_irq_level on x86: EOPNOTSUPP", lambda r: r.call(HVM, "set_irq_level", irq=40, level=1), E.EOPNOTSUPP
    ),
    Case(
        "1.2#13 x86-only op on Arm: EOPNOTSUPP",
        lambda r: r.call(HVM, "set_isa_irq_level", isa_irq=1, level=1),
        E.EOPNOTSUPP,
        host_options={"arch": "arm"},
    ),
    # §2.1 create_ioreq_server
    Case("2.1 pad: EINVAL", lambda r: _create_pad(r), E.EINVAL),
    Case("2.1 handle_bufioreq 3: EINVAL", lambda r: r.call(HVM, "create_ioreq_server", handle_bufioreq=3), E.EINVAL),
    Case(
        "2.1 Arm with bufioreq: EINVAL",
        lambda r: r.call(HVM, "create_ioreq_server", handle_bufioreq=1),
        E.EINVAL,
        host_options={"arch": "arm"},
    ),
    Case(
        "2.1 ninth server: ENOSPC", lambda r: r.call(HVM, "create_ioreq_server"), E.ENOSPC, setup=seq(*[server()] * 8)
    ),
    # §2.2 get_ioreq_server_info
    Case("2.2 flags 2: EINVAL", lambda r: r.call(HVM, "get_ioreq_server_info", flags=2), E.EINVAL, server()),
    Case("2.2 empty slot: ENOENT", lambda r: r.call(HVM, "get_ioreq_server_info", id=3, flags=1), E.ENOENT),
    Case("2.2 id >= 8: ENOENT", lambda r: r.call(HVM, "get_ioreq_server_info", id=9, flags=1), E.ENOENT),
    Case(
        "2.2 other emulator: EPERM",
        lambda r: r.call(HVM, "get_ioreq_server_info", flags=1),
        E.EPERM,
        server(emulator=5),
    ),
    Case(
        "2.2 gfns after acquire_resource: EPERM",
        lambda r: r.call(HVM, "get_ioreq_server_info"),
        E.EPERM,
        seq(server(), lambda h, r: h.hypervisor.alloc_ioreq_pages(h.hypervisor.domains[HVM].ioreq_servers[0])),
    ),
    Case(
        "2.2 gfns of a dying domain: EINVAL",
        lambda r: r.call(HVM, "get_ioreq_server_info"),
        E.EINVAL,
        seq(server(), lambda h, r: h.set_dying(HVM)),
    ),
    Case(
        "2.2 no spare gfn: ENOMEM",
        lambda r: r.call(HVM, "get_ioreq_server_info"),
        E.ENOMEM,
        seq(
            server(),
            lambda h, r: (
                h.hypervisor.domains[HVM].ioreq_gfn_free.clear(),
                h.hypervisor.domains[HVM].ioreq_gfn_legacy_free.clear(),
            ),
        ),
    ),
    Case(
        "2.2 gfns on Arm: EOPNOTSUPP",
        lambda r: r.call(HVM, "get_ioreq_server_info"),
        E.EOPNOTSUPP,
        server(),
        host_options={"arch": "arm"},
    ),
    # §2.3 map / unmap ranges
    Case("2.3 pad: EINVAL", lambda r: r.call(HVM, "map_io_range_to_ioreq_server", pad=1, end=1), E.EINVAL, server()),
    Case(
        "2.3 start > end: EINVAL",
        lambda r: r.call(HVM, "map_io_range_to_ioreq_server", start=2, end=1),
        E.EINVAL,
        server(),
    ),
    Case("2.3 no server: ENOENT", lambda r: r.call(HVM, "map_io_range_to_ioreq_server", end=1), E.ENOENT),
    Case(
        "2.3 other emulator: EPERM",
        lambda r: r.call(HVM, "map_io_range_to_ioreq_server", end=1),
        E.EPERM,
        server(emulator=5),
    ),
    Case(
        "2.3 type 3: EINVAL", lambda r: r.call(HVM, "map_io_range_to_ioreq_server", type=3, end=1), E.EINVAL, server()
    ),
    Case(
        "2.3 overlap in the same server: EEXIST",
        lambda r: r.call(HVM, "map_io_range_to_ioreq_server", type=1, start=0x1800, end=0x2800),
        E.EEXIST,
        seq(server(), ok(lambda r: r.call(HVM, "map_io_range_to_ioreq_server", type=1, start=0x1000, end=0x1FFF))),
    ),
    Case(
        "2.3 257th range: ENOMEM",
        lambda r: r.call(HVM, "map_io_range_to_ioreq_server", start=9999, end=9999),
        E.ENOMEM,
        seq(
            server(),
            *[
                ok(
                    lambda r, i=i: r.call(
                        HVM,
                        "map_io_range_to_ioreq_server",  # type: ignore
                        start=2 * i,
                        end=2 * i,
                    )
                )
                for i in range(256)
            ],
        ),
    ),
    Case(
        "2.4 unmap of a range not fully mapped: ENOENT",
        lambda r: r.call(HVM, "unmap_io_range_from_ioreq_server", start=0x10, end=0x30),
        E.ENOENT,
        seq(server(), ok(lambda r: r.call(HVM, "map_io_range_to_ioreq_server", start=0x10, end=0x20))),
    ),
    Case("2.4 unmap pad: EINVAL", lambda r: r.call(HVM, "unmap_io_range_from_ioreq_server", pad=1), E.EINVAL, server()),
    # §2.4 / §2.5 state, destroy
    Case(
        "2.4 set_state pad: EINVAL",
        lambda r: r.call(HVM, "set_ioreq_server_state", pad=1, enabled=1),
        E.EINVAL,
        server(),
    ),
    Case("2.4 set_state no server: ENOENT", lambda r: r.call(HVM, "set_ioreq_server_state", enabled=1), E.ENOENT),
    Case(
        "2.4 set_state other emulator: EPERM",
        lambda r: r.call(HVM, "set_ioreq_server_state", enabled=1),
        E.EPERM,
        server(emulator=5),
    ),
    Case("2.5 destroy pad: EINVAL", lambda r: r.call(HVM, "destroy_ioreq_server", pad=1), E.EINVAL, server()),
    Case("2.5 destroy empty slot: ENOENT", lambda r: r.call(HVM, "destroy_ioreq_server", id=7), E.ENOENT),
    Case(
        "2.5 destroy other emulator: EPERM", lambda r: r.call(HVM, "destroy_ioreq_server"), E.EPERM, server(emulator=5)
    ),
    # §2.6 track_dirty_vram
    Case("2.6 pad: EINVAL", lambda r: r.call(HVM, "track_dirty_vram", pad=1, nr=8, extra=[1]), E.EINVAL),
    Case("2.6 no bitmap buffer: EINVAL", lambda r: r.call(HVM, "track_dirty_vram", nr=8), E.EINVAL),
    Case(
        "2.6 nr > 1 GiB of pages: EINVAL", lambda r: r.call(HVM, "track_dirty_vram", nr=262145, extra=[4096]), E.EINVAL
    ),
    Case(
        "2.6 dying: ESRCH",
        lambda r: r.call(HVM, "track_dirty_vram", nr=8, extra=[1]),
        E.ESRCH,
        lambda h, r: h.set_dying(HVM),
    ),
    Case("2.6 bitmap too small: EINVAL", lambda r: r.call(HVM, "track_dirty_vram", nr=9, extra=[1]), E.EINVAL),
    # §2.7-2.9 interrupt lines
    Case("2.7 segment 1: EINVAL", lambda r: r.call(HVM, "set_pci_intx_level", domain=1, level=1), E.EINVAL),
    Case("2.7 bus 1: EINVAL", lambda r: r.call(HVM, "set_pci_intx_level", bus=1, level=1), E.EINVAL),
    Case("2.7 device 32: EINVAL", lambda r: r.call(HVM, "set_pci_intx_level", device=32, level=1), E.EINVAL),
    Case("2.7 intx 4: EINVAL", lambda r: r.call(HVM, "set_pci_intx_level", intx=4, level=1), E.EINVAL),
    Case("2.7 level 2: EINVAL", lambda r: r.call(HVM, "set_pci_intx_level", level=2), E.EINVAL),
    Case("2.8 isa_irq 16: EINVAL", lambda r: r.call(HVM, "set_isa_irq_level", isa_irq=16, level=1), E.EINVAL),
    Case("2.8 level 2: EINVAL", lambda r: r.call(HVM, "set_isa_irq_level", isa_irq=1, level=2), E.EINVAL),
    Case("2.9 link 4: EINVAL", lambda r: r.call(HVM, "set_pci_link_route", link=4, isa_irq=5), E.EINVAL),
    Case("2.9 isa_irq 16: EINVAL", lambda r: r.call(HVM, "set_pci_link_route", link=0, isa_irq=16), E.EINVAL),
    # §2.10 modified_memory
    Case("2.10#1 nr_bufs 1: EINVAL", lambda r: r.call(HVM, "modified_memory", nr_extents=1), E.EINVAL, log_dirty),
    Case("2.10#2 not log-dirty: 0, nothing read", lambda r: r.call(HVM, "modified_memory", nr_extents=5, extra=[1]), 0),
    Case(
        "2.10#3 buffer holds fewer extents: EINVAL",
        lambda r: r.call(HVM, "modified_memory", nr_extents=2, extra=[extent(0, 1)]),
        E.EINVAL,
        log_dirty,
    ),
    Case(
        "2.10#4 extent pad: EINVAL",
        lambda r: r.call(HVM, "modified_memory", nr_extents=1, extra=[extent(0, 1, pad=1)]),
        E.EINVAL,
        log_dirty,
    ),
    Case(
        "2.10#4 extent nr 0: EINVAL",
        lambda r: r.call(HVM, "modified_memory", nr_extents=1, extra=[extent(5, 0)]),
        E.EINVAL,
        log_dirty,
    ),
    Case(
        "2.10#4 extent end beyond max gpfn: EINVAL",
        lambda r: r.call(HVM, "modified_memory", nr_extents=1, extra=[extent(MAXPFN, 1)]),
        E.EINVAL,
        log_dirty,
    ),
    Case(
        "2.10#4 opaque >= nr: EINVAL",
        lambda r: r.call(HVM, "modified_memory", nr_extents=1, opaque=1, extra=[extent(5, 1)]),
        E.EINVAL,
        log_dirty,
    ),
    Case(
        "2.10 last extent checked first: EINVAL, the good first one untouched",
        lambda r: r.call(HVM, "modified_memory", nr_extents=2, extra=[extent(5, 1) + extent(7, 1, pad=1)]),
        E.EINVAL,
        log_dirty,
    ),
    # §2.11 set_mem_type
    Case("2.11 pad: EINVAL", lambda r: r.call(HVM, "set_mem_type", pad=1, nr=1), E.EINVAL),
    Case("2.11 nr 0: EINVAL", lambda r: r.call(HVM, "set_mem_type", nr=0, first_pfn=5), E.EINVAL),
    Case("2.11 beyond max gpfn: EINVAL", lambda r: r.call(HVM, "set_mem_type", nr=2, first_pfn=MAXPFN), E.EINVAL),
    Case("2.11 type 5: EINVAL", lambda r: r.call(HVM, "set_mem_type", nr=1, mem_type=5), E.EINVAL),
    Case("2.11 type unused: EINVAL", lambda r: r.call(HVM, "set_mem_type", nr=1, mem_type=3), E.EINVAL),
    Case(
        "2.11 ioreq_server without HAP: EOPNOTSUPP",
        lambda r: r.call(NOHAP, "set_mem_type", nr=1, mem_type=4),
        E.EOPNOTSUPP,
    ),
    Case("2.11 ioreq_server unclaimed: EINVAL", lambda r: r.call(HVM, "set_mem_type", nr=1, mem_type=4), E.EINVAL),
    Case(
        "2.11 ram_ro -> ioreq_server: EINVAL",
        lambda r: r.call(HVM, "set_mem_type", nr=1, mem_type=4),
        E.EINVAL,
        seq(
            server(),
            ok(lambda r: r.call(HVM, "set_mem_type", nr=1, mem_type=1)),
            ok(lambda r: r.call(HVM, "map_mem_type_to_ioreq_server", type=4, flags=2)),
        ),
    ),
    # §2.12 / §2.13 events and MSIs
    Case("2.12 pad0: EINVAL", lambda r: r.call(HVM, "inject_event", pad0=1), E.EINVAL),
    Case("2.12 pad1: EINVAL", lambda r: r.call(HVM, "inject_event", pad1=1), E.EINVAL),
    Case("2.12 vcpuid >= max: EINVAL", lambda r: r.call(HVM, "inject_event", vcpuid=2), E.EINVAL),
    Case(
        "2.12 already latched: EBUSY",
        lambda r: r.call(HVM, "inject_event", vector=14),
        E.EBUSY,
        ok(lambda r: r.call(HVM, "inject_event", vector=3)),
    ),
    Case("2.13 pad: EINVAL", lambda r: r.call(HVM, "inject_msi", pad=1, data=0x30), E.EINVAL),
    Case("2.13 pirq 0: ERANGE", lambda r: r.call(HVM, "inject_msi", data=0, addr=0xFEE00000), E.ERANGE),
    Case(
        "2.13 unsupported delivery mode: EINVAL",
        lambda r: r.call(HVM, "inject_msi", data=0x230, addr=0xFEE00000),
        E.EINVAL,
    ),
    # §2.14 map_mem_type_to_ioreq_server
    Case(
        "2.14 no HAP: EOPNOTSUPP",
        lambda r: r.call(NOHAP, "map_mem_type_to_ioreq_server", type=4, flags=2),
        E.EOPNOTSUPP,
    ),
    Case(
        "2.14 type 3: EINVAL",
        lambda r: r.call(HVM, "map_mem_type_to_ioreq_server", type=3, flags=2),
        E.EINVAL,
        server(),
    ),
    Case(
        "2.14 READ flag: EINVAL",
        lambda r: r.call(HVM, "map_mem_type_to_ioreq_server", type=4, flags=1),
        E.EINVAL,
        server(),
    ),
    Case("2.14 no server: ENOENT", lambda r: r.call(HVM, "map_mem_type_to_ioreq_server", type=4, flags=2), E.ENOENT),
    Case(
        "2.14 other emulator: EPERM",
        lambda r: r.call(HVM, "map_mem_type_to_ioreq_server", type=4, flags=2),
        E.EPERM,
        server(emulator=5),
    ),
    Case(
        "2.14 second claimant: EBUSY",
        lambda r: r.call(HVM, "map_mem_type_to_ioreq_server", id=1, type=4, flags=2),
        E.EBUSY,
        seq(server(), server(), ok(lambda r: r.call(HVM, "map_mem_type_to_ioreq_server", type=4, flags=2))),
    ),
    Case(
        "2.14 unmap by non-holder: EINVAL",
        lambda r: r.call(HVM, "map_mem_type_to_ioreq_server", type=4, flags=0),
        E.EINVAL,
        server(),
    ),
    # §2.16 relocate_memory
    Case("2.16 pad: EINVAL", lambda r: r.call(HVM, "relocate_memory", pad=1, size=1, dst_gfn=9), E.EINVAL),
    Case("2.16 dst INVALID_GFN: EINVAL", lambda r: r.call(HVM, "relocate_memory", size=1, dst_gfn=2**64 - 1), E.EINVAL),
    Case(
        "2.16 overflow: EOVERFLOW",
        lambda r: r.call(HVM, "relocate_memory", size=4, src_gfn=2**64 - 2, dst_gfn=5),
        E.EOVERFLOW,
    ),
    Case(
        "2.16 source is a hole: EINVAL",
        lambda r: r.call(HVM, "relocate_memory", size=1, src_gfn=5000, dst_gfn=5),
        E.EINVAL,
    ),
    # §2.17 pin_memory_cacheattr
    Case("2.17 pad: EINVAL", lambda r: r.call(HVM, "pin_memory_cacheattr", pad=1, type=6), E.EINVAL),
    Case("2.17 end < start: EINVAL", lambda r: r.call(HVM, "pin_memory_cacheattr", start=5, end=4, type=6), E.EINVAL),
    Case(
        "2.17 beyond paddr_bits: EINVAL", lambda r: r.call(HVM, "pin_memory_cacheattr", end=1 << 46, type=6), E.EINVAL
    ),
    Case(
        "2.17 delete without match: ENOENT",
        lambda r: r.call(HVM, "pin_memory_cacheattr", start=1, end=2, type=0xFFFFFFFF),
        E.ENOENT,
    ),
    Case("2.17 UC without IOMMU: 0 (4.17-4.20)", lambda r: r.call(HVM, "pin_memory_cacheattr", end=2, type=0), 0),
    Case(
        "2.17 UC without IOMMU: EPERM (4.21 on)",
        lambda r: r.call(HVM, "pin_memory_cacheattr", end=2, type=0),
        E.EPERM,
        host_options={"xen_version": (4, 21)},
    ),
    Case("2.17 type 2: EINVAL", lambda r: r.call(HVM, "pin_memory_cacheattr", end=2, type=2), E.EINVAL),
    Case(
        "2.17 overlap: EBUSY",
        lambda r: r.call(HVM, "pin_memory_cacheattr", start=5, end=20, type=6),
        E.EBUSY,
        ok(lambda r: r.call(HVM, "pin_memory_cacheattr", start=10, end=30, type=6)),
    ),
    Case(
        "2.17 65th range: ENOSPC",
        lambda r: r.call(HVM, "pin_memory_cacheattr", start=999, end=999, type=6),
        E.ENOSPC,
        seq(
            *[
                ok(
                    lambda r, i=i: r.call(
                        HVM,
                        "pin_memory_cacheattr",  # type: ignore[misc]
                        start=i,
                        end=i,
                        type=6,
                    )
                )
                for i in range(64)
            ]
        ),
    ),
    # §2.18 set_irq_level (Arm)
    Case(
        "2.18 SGI/PPI: EINVAL",
        lambda r: r.call(HVM, "set_irq_level", irq=31, level=1),
        E.EINVAL,
        host_options={"arch": "arm"},
    ),
    Case(
        "2.18 beyond vGIC: EINVAL",
        lambda r: r.call(HVM, "set_irq_level", irq=256, level=1),
        E.EINVAL,
        host_options={"arch": "arm"},
    ),
    Case(
        "2.18 level 2: EINVAL",
        lambda r: r.call(HVM, "set_irq_level", irq=40, level=2),
        E.EINVAL,
        host_options={"arch": "arm"},
    ),
    Case("2.18 pad: EINVAL", lambda r: _irq_pad(r), E.EINVAL, host_options={"arch": "arm"}),
    # §4.1 privcmd
    Case("4.1#1 argument unreadable: EFAULT", lambda r: errno_of(r.dev.ioctl, 0x105005, BAD), E.EFAULT),
    Case("4.1#2 restricted, other domain: EPERM", lambda r: r.call(PV, "nr_vcpus"), E.EPERM, restricted(HVM)),
    Case(
        "4.1#2 restricted beats the num == 0 shortcut: EPERM",
        lambda r: r.call(PV, "nr_vcpus", num=0),
        E.EPERM,
        restricted(HVM),
    ),
    Case("4.1#3 num 0: 0 without reaching Xen", lambda r: r.call(77, "nr_vcpus", num=0), 0),
    Case("4.1#4 num 17: E2BIG", lambda r: r.ioctl_dm_op(HVM, [(0, 0)] * 17), E.E2BIG),
    Case(
        "4.1#4 dm_op_max_nr_bufs=1, num 2: E2BIG",
        lambda r: r.call(HVM, "nr_vcpus", extra=[8]),
        E.E2BIG,
        host_options={"dm_op_max_nr_bufs": 1},
    ),
    Case("4.1#5 ubufs unreadable: EFAULT", lambda r: _bad_ubufs(r), E.EFAULT),
    Case("4.1#6 buffer over 4096: E2BIG", lambda r: r.call(HVM, "nr_vcpus", size0=4097), E.E2BIG),
    Case("4.1#6 buffer in kernel space: EFAULT", lambda r: r.ioctl_dm_op(HVM, [(BAD, 32)]), E.EFAULT),
    Case("4.1#7 buffer unmapped: EFAULT", lambda r: r.ioctl_dm_op(HVM, [(0x1000, 32)]), E.EFAULT),
    Case("4.1#7 buffer read-only: EFAULT", lambda r: r.ioctl_dm_op(HVM, [(_ro_addr(), 32)]), E.EFAULT),
    Case(
        "4.1 RESTRICT to another domid: EINVAL",
        lambda r: errno_of(r.dev.ioctl, IOCTL_PRIVCMD_RESTRICT, domid_t(PV)),
        E.EINVAL,
        restricted(HVM),
    ),
    Case(
        "4.1 RESTRICT to the same domid: 0",
        lambda r: errno_of(r.dev.ioctl, IOCTL_PRIVCMD_RESTRICT, domid_t(HVM)),
        0,
        restricted(HVM),
    ),
    Case("4.1 unknown ioctl: ENOTTY", lambda r: errno_of(r.dev.ioctl, IOCTL_PRIVCMD_UNIMPLEMENTED, 0), E.ENOTTY),
    Case(
        "4.1 HYPERCALL on a restricted fd: EPERM", lambda r: r.hypercall_op(HVM, "nr_vcpus"), E.EPERM, restricted(HVM)
    ),
    Case("4.1 HYPERCALL other than dm_op: ENOSYS", lambda r: r.hypercall(HVM, 1, 0, op=12), E.ENOSYS),
    Case(
        "4.1 DM_OP absent (old kernel): ENOTTY",
        lambda r: r.call(HVM, "nr_vcpus"),
        E.ENOTTY,
        host_options={"dm_op_ioctl": False},
    ),
]

_bad_bufs = (ctypes.c_uint64 * 2)(BAD, 32)


def _run_in(host: MockXen, target: int | None) -> None:
    """The process now runs in a new PV domain (dom4), the device model of ``target`` if given."""
    stub = host.create_domain(hvm=False, memory_mb=1, target=target)
    assert stub == 4
    host.set_caller(stub)


def _with_pad(r: Raw) -> int:
    r.build("nr_vcpus").pad = 1
    return r.ioctl_dm_op(HVM, r.bufs())


def _create_pad(r: Raw) -> int:
    r.build("create_ioreq_server").u.create_ioreq_server.pad[2] = 1
    return r.ioctl_dm_op(HVM, r.bufs())


def _irq_pad(r: Raw) -> int:
    op = r.build("set_irq_level", irq=40, level=1)
    op.u.set_irq_level.pad[1] = 1
    return r.ioctl_dm_op(HVM, r.bufs())


def _bad_ubufs(r: Raw) -> int:
    from xendmop.abi.privcmd import IOCTL_PRIVCMD_DM_OP, privcmd_dm_op

    return errno_of(r.dev.ioctl, IOCTL_PRIVCMD_DM_OP, privcmd_dm_op(dom=HVM, num=1, ubufs=0x1000))


def _ro_addr() -> int:
    """A read-only anonymous page (pin_user_pages_fast(FOLL_WRITE) refuses it)."""
    from xendmop.mock.usermem import _mmap

    addr = _mmap(None, 4096, 1, 0x22, -1, 0)  # PROT_READ, MAP_PRIVATE|MAP_ANONYMOUS; never unmapped
    assert addr not in (None, 2**64 - 1)
    return int(addr)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rule(case: Case) -> None:
    with make_host(**(case.host_options or {})) as host:
        _check_case(case, host)


def _check_case(case: Case, host: MockXen) -> None:
    raw = Raw(host)
    if case.setup is not None:
        case.setup(host, raw)
    before = snapshot(host)
    got = case.action(raw)
    assert got == case.expected, f"errno {got} ({E.errorcode.get(got)}), expected {E.errorcode.get(case.expected)}"
    if case.expected:
        assert snapshot(host) == before, "a refused call changed state"


SECTIONS = {  # reference section of each op's rules; 2.15 and 2.19 have no refusal to test
    "create_ioreq_server": "2.1",
    "get_ioreq_server_info": "2.2",
    "map_io_range_to_ioreq_server": "2.3",
    "unmap_io_range_from_ioreq_server": "2.4",
    "set_ioreq_server_state": "2.4",
    "destroy_ioreq_server": "2.5",
    "track_dirty_vram": "2.6",
    "set_pci_intx_level": "2.7",
    "set_isa_irq_level": "2.8",
    "set_pci_link_route": "2.9",
    "modified_memory": "2.10",
    "set_mem_type": "2.11",
    "inject_event": "2.12",
    "inject_msi": "2.13",
    "map_mem_type_to_ioreq_server": "2.14",
    "remote_shutdown": None,
    "relocate_memory": "2.16",
    "pin_memory_cacheattr": "2.17",
    "set_irq_level": "2.18",
    "nr_vcpus": None,
}


def test_every_op_has_a_case() -> None:
    """Each declared op with a refusal has cases in the table (the table grows with the ops)."""
    from xendmop.ops import OPS

    assert set(SECTIONS) == {d.name for d in OPS.values()}
    for name, section in SECTIONS.items():
        if section is not None:
            assert any(c.id.split()[0].split("#")[0] == section for c in CASES), name


def test_server_type_is_exported() -> None:
    assert IoreqServerState.__name__ == "IoreqServerState"


# --- §1.2#11 and #14: faults inside buf[0], after the header ------------------------------------
#
# Through IOCTL_PRIVCMD_DM_OP the kernel pins every buffer whole with FOLL_WRITE before Xen runs
# (privcmd_ioctl_dm_op → lock_pages → pin_user_pages_fast), so a buffer that is partly unmapped or
# read-only is refused there with EFAULT and Xen is never reached.  Xen's own steps #11 and #14
# are reached through IOCTL_PRIVCMD_HYPERCALL, whose pointers Xen dereferences unpinned.  The event
# log tells the layers apart: privcmd records ``dm_op`` only once the buffers are pinned.

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_PAGE = 4096
_PROT_NONE, _PROT_READ, _PROT_RW = 0, 1, 3


@pytest.fixture
def two_pages() -> Iterator[int]:
    """Two fresh read-write anonymous pages; the test changes their protection."""
    addr = _libc.mmap(None, 2 * _PAGE, _PROT_RW, 0x22, -1, 0)  # MAP_PRIVATE | MAP_ANONYMOUS
    assert addr not in (None, 2**64 - 1)
    yield int(addr)
    assert _libc.munmap(addr, 2 * _PAGE) == 0


def _protect(addr: int, prot: int) -> None:
    assert _libc.mprotect(addr, _PAGE, prot) == 0


def _place(raw: Raw, addr: int) -> None:
    """Copy the op built in ``raw.op`` (32 bytes) to ``addr``."""
    ctypes.memmove(addr, ctypes.addressof(raw.op), ctypes.sizeof(raw.op))


def _xen_bufs(addr: int, size: int = 32) -> int:
    """A one-entry xen_dm_op_buf_t array for the HYPERCALL path (kept alive by the module)."""
    global _keep_bufs
    _keep_bufs = (ctypes.c_uint64 * 2)(addr, size)
    return ctypes.addressof(_keep_bufs)


_keep_bufs: Any = None


def _reached_xen(host: MockXen) -> bool:
    return "dm_op" in host.events[-1].args


def test_1_2_11_union_copy_faults_partway(host: MockXen, raw: Raw, two_pages: int) -> None:
    """#11: header readable, the 24-byte map_io_range payload crosses into a PROT_NONE page."""
    assert raw.call(HVM, "create_ioreq_server") == 0
    addr = two_pages + _PAGE - 16  # header + 8 payload bytes on page 0, 16 bytes on page 1
    raw.build("map_io_range_to_ioreq_server", type=1, start=0x1000, end=0x1FFF)
    _place(raw, addr)
    _protect(two_pages + _PAGE, _PROT_NONE)
    before = snapshot(host)

    # Xen: copy_from_guest_offset(&op.u, buf[0].h, 8, op_size[op]) fails → -EFAULT (dm_op, x86/hvm/dm.c)
    assert raw.hypercall(HVM, 1, _xen_bufs(addr)) == E.EFAULT
    assert snapshot(host) == before

    # #11 comes before #12: a nonzero pad behind a faulting payload is never looked at
    raw.op.pad = 1
    _protect(two_pages + _PAGE, _PROT_RW)
    _place(raw, addr)
    _protect(two_pages + _PAGE, _PROT_NONE)
    assert raw.hypercall(HVM, 1, _xen_bufs(addr)) == E.EFAULT
    # ...and the header itself was read: an unknown op number there gives #9's EOPNOTSUPP
    ctypes.c_uint32.from_address(addr).value = 21
    assert raw.hypercall(HVM, 1, _xen_bufs(addr)) == E.EOPNOTSUPP
    assert snapshot(host) == before

    # through DM_OP the same buffer is refused by privcmd's pin, before Xen
    assert raw.ioctl_dm_op(HVM, [(addr, 32)]) == E.EFAULT
    assert not _reached_xen(host)
    assert snapshot(host) == before


def test_1_2_14_copy_back_fault_keeps_the_server(host: MockXen, raw: Raw, two_pages: int) -> None:
    """#14: create_ioreq_server copies ``id`` back; buf[0] on a read-only page.

    dm_op (xen/common/ioreq.c ioreq_server_dm_op, then xen/arch/x86/hvm/dm.c dm_op) runs the
    handler first and only then ``if ((!rc || rc == -ERESTART) && !const_op &&
    copy_to_guest_offset(buf[0].h, 8, &op.u, op_size[op])) rc = -EFAULT;`` — nothing is undone:
    the server exists, owned by the caller, and the caller never learns its id.
    """
    assert raw.call(HVM, "create_ioreq_server") == 0  # takes id 0
    raw.build("create_ioreq_server", handle_bufioreq=1, id=0x5555)  # id is output only
    _place(raw, two_pages)
    _protect(two_pages, _PROT_READ)

    # DM_OP: pin_user_pages_fast(FOLL_WRITE) refuses the read-only page; Xen never runs
    before = snapshot(host)
    assert raw.ioctl_dm_op(HVM, [(two_pages, 32)]) == E.EFAULT
    assert not _reached_xen(host)
    assert snapshot(host) == before

    # HYPERCALL: Xen reads the op, creates server 1, then the copy-back faults
    assert raw.hypercall(HVM, 1, _xen_bufs(two_pages)) == E.EFAULT
    d = host.hypervisor.domains[HVM]
    created = d.ioreq_servers[1]
    assert created is not None and created.emulator == 0 and created.handles_bufioreq
    assert [s is not None for s in d.ioreq_servers] == [True, True] + [False] * 6
    assert ctypes.c_uint16.from_address(two_pages + 12).value == 0x5555  # nothing written back

    # an op that copies back but changes nothing (nr_vcpus) faults the same way, state untouched
    _protect(two_pages, _PROT_RW)
    raw.build("nr_vcpus")
    _place(raw, two_pages)
    _protect(two_pages, _PROT_READ)
    before = snapshot(host)
    assert raw.hypercall(HVM, 1, _xen_bufs(two_pages)) == E.EFAULT
    assert snapshot(host) == before
