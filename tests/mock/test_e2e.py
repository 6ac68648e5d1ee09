"""The same scenarios through DeviceModel: the real PrivcmdBackend marshalling over the mock device."""

from __future__ import annotations

import ctypes
import errno
import select

import pytest

from xendmop import DeviceModel
from xendmop.abi.evtchn import (
    IOCTL_EVTCHN_BIND_INTERDOMAIN,
    IOCTL_EVTCHN_NOTIFY,
    IOCTL_EVTCHN_RESTRICT_DOMID,
    IOCTL_EVTCHN_UNBIND,
    ioctl_evtchn_bind_interdomain,
    ioctl_evtchn_notify,
    ioctl_evtchn_restrict_domid,
    ioctl_evtchn_unbind,
)
from xendmop.abi.ioreq import ioreq
from xendmop.abi.privcmd import (
    IOCTL_PRIVCMD_MMAP_RESOURCE,
    IOCTL_PRIVCMD_MMAPBATCH_V2,
    privcmd_mmap_resource,
    privcmd_mmapbatch_v2,
)
from xendmop.mock import MockXen, default_host
from xendmop.types import BufIoreq

from .conftest import HVM, PV, make_host


def open_dm(host: MockXen) -> DeviceModel:
    return DeviceModel.open("mock", xen=host)


def test_default_host_documented_domains() -> None:
    with default_host() as host:
        assert host.domain(1).hvm and host.domain(1).max_vcpus == 2 and host.domain(1).nr_pages == 128 * 256
        assert not host.domain(2).hvm
        with open_dm(host) as dm:
            assert dm.nr_vcpus(1) == 2


def test_ioreq_server_lifecycle(host: MockXen) -> None:
    with open_dm(host) as dm:
        sid = dm.create_ioreq_server(HVM, BufIoreq.ATOMIC)
        info = dm.get_ioreq_server_info(HVM, sid)
        s = host.domain(HVM).server(sid)
        assert s is not None and info.bufioreq_port == s["bufioreq_port"] and not s["enabled"]
        dm.map_io_range_to_ioreq_server(HVM, sid, True, 0xFE000000, 0xFE000FFF)
        dm.map_pcidev_to_ioreq_server(HVM, sid, 0, 0, 3, 0)
        with pytest.raises(FileExistsError):
            dm.map_io_range_to_ioreq_server(HVM, sid, True, 0xFE000800, 0xFE001000)
        with pytest.raises(FileNotFoundError):
            dm.unmap_io_range_from_ioreq_server(HVM, sid, False, 1, 2)
        dm.set_ioreq_server_state(HVM, sid, True)
        assert host.domain(HVM).server(sid)["enabled"]  # type: ignore[index]
        dm.destroy_ioreq_server(HVM, sid)
        assert host.domain(HVM).server(sid) is None
        with pytest.raises(FileNotFoundError):
            dm.destroy_ioreq_server(HVM, sid)


def test_errors_carry_errno_through_the_backend(host: MockXen) -> None:
    with open_dm(host) as dm:
        with pytest.raises(OSError) as e:
            dm.nr_vcpus(PV)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(ProcessLookupError):
            dm.nr_vcpus(77)
        for _ in range(8):
            dm.create_ioreq_server(HVM)
        with pytest.raises(OSError) as e:
            dm.create_ioreq_server(HVM)
        assert e.value.errno == errno.ENOSPC


def test_hypercall_fallback() -> None:
    host = make_host(dm_op_ioctl=False)
    with open_dm(host) as dm:
        assert dm.describe()["ioctl"] == "IOCTL_PRIVCMD_HYPERCALL"
        assert dm.nr_vcpus(HVM) == 2
        with pytest.raises(OSError) as e:
            dm.nr_vcpus(PV)
        assert e.value.errno == errno.EINVAL
    assert any(ev.request == "IOCTL_PRIVCMD_HYPERCALL" and ev.args.get("dm_op") == "nr_vcpus" for ev in host.events)


def test_no_hypercall_device_still_works() -> None:
    host = make_host(hypercall_device=False)
    with open_dm(host) as dm:
        assert dm.nr_vcpus(HVM) == 2


def test_restrict(host: MockXen) -> None:
    with open_dm(host) as dm:
        dm.restrict(HVM)
        assert dm.nr_vcpus(HVM) == 2
        with pytest.raises(PermissionError):
            dm.nr_vcpus(PV)
        with pytest.raises(OSError) as e:
            dm.restrict(PV)
        assert e.value.errno == errno.EINVAL


def test_irq_lines_and_routes(host: MockXen) -> None:
    with open_dm(host) as dm:
        dm.set_isa_irq_level(HVM, 0, 1)
        assert host.domain(HVM).gsi_level(2)  # ISA IRQ0 is GSI2
        dm.set_isa_irq_level(HVM, 0, 0)
        assert not host.domain(HVM).gsi_level(2)
        dm.set_pci_link_route(HVM, 1, 10)
        dm.set_pci_intx_level(HVM, 0, 0, 1, 0, 1)  # device 1 INTA -> link (1+0)&3 = 1
        assert host.domain(HVM).gsi_level(10)
        dm.set_pci_link_route(HVM, 1, 11)  # an asserted link moves its level
        assert host.domain(HVM).gsi_level(11) and not host.domain(HVM).gsi_level(10)
        dm.set_pci_intx_level(HVM, 0, 0, 1, 0, 0)
        assert not host.domain(HVM).gsi_level(11)


def test_events_and_msis(host: MockXen) -> None:
    with open_dm(host) as dm:
        dm.inject_event(HVM, 1, 14, 3, 2, 0, 0xDEAD000)
        with pytest.raises(OSError) as e:
            dm.inject_event(HVM, 1, 13, 3, 0, 0, 0)
        assert e.value.errno == errno.EBUSY
        assert host.deliver_event(HVM, 1) == {"vector": 14, "type": 3, "insn_len": 0, "error_code": 2, "cr2": 0xDEAD000}
        dm.inject_event(HVM, 1, 13, 3, 0, 0, 0)  # delivered: a new one latches
        dm.inject_msi(HVM, 0xFEE00000, 0x4041)
        assert host.domain(HVM).msis == ((0xFEE00000, 0x4041),)


def test_dirty_vram(host: MockXen) -> None:
    with open_dm(host) as dm:
        assert dm.track_dirty_vram(HVM, 100, 20) == b"\xff" * 3  # a new range: all dirty
        assert dm.track_dirty_vram(HVM, 100, 20) == bytes(3)
        host.guest_write(HVM, 105 * 4096 + 7, b"x")
        host.guest_write(HVM, 119 * 4096, b"y")
        assert dm.track_dirty_vram(HVM, 100, 20) == bytes([1 << 5, 0, 1 << 3])
        assert dm.track_dirty_vram(HVM, 100, 20) == bytes(3)
        assert not host.domain(HVM).log_dirty  # HAP VRAM tracking leaves log-dirty mode off (as 4.17.7)


def test_modified_memory_and_log_dirty(host: MockXen) -> None:
    with open_dm(host) as dm:
        dm.modified_memory(HVM, 10, 4)
        assert host.domain(HVM).dirty == frozenset()  # not in log-dirty mode: a no-op
        host.set_log_dirty(HVM)
        dm.modified_memory_bulk(HVM, [(10, 4), (600, 2)])
        assert host.domain(HVM).dirty == frozenset({10, 11, 12, 13, 600, 601})


def test_mem_types_and_claim(host: MockXen) -> None:
    with open_dm(host) as dm:
        sid = dm.create_ioreq_server(HVM)
        dm.map_mem_type_to_ioreq_server(HVM, sid, 4, 2)
        dm.set_mem_type(HVM, 4, 50, 3)
        assert host.domain(HVM).mem_type(51) == 4
        with pytest.raises(OSError):
            dm.set_mem_type(HVM, 1, 50, 1)  # ioreq_server -> ram_ro is refused
        dm.map_mem_type_to_ioreq_server(HVM, sid, 4, 0)  # release: entries reset to ram_rw
        assert host.domain(HVM).mem_type(51) == 0 and host.domain(HVM).p2m_ioreq == (None, 0)


def test_shutdown_relocate_cacheattr(host: MockXen) -> None:
    with open_dm(host) as dm:
        dm.shutdown(HVM, 1)
        dm.shutdown(HVM, 3)
        assert host.domain(HVM).shutdown_reason == 1  # the first reason sticks
        host.guest_write(HVM, 7 * 4096, b"page7")
        dm.relocate_memory(HVM, 1, 7, 2000)
        assert host.domain(HVM).mem_type(7) is None and host.guest_read(HVM, 2000 * 4096, 5) == b"page7"
        dm.pin_memory_cacheattr(HVM, 10, 20, 6)
        dm.pin_memory_cacheattr(HVM, 10, 20, 4)
        assert host.domain(HVM).cacheattr == ((10, 20, 4),)


def test_continuations_rewrite_and_reread_the_request(host: MockXen) -> None:
    host.set_log_dirty(HVM)
    rounds: list[int] = []
    host.hypervisor.on_continuation = rounds.append
    host.preempt(2)
    with open_dm(host) as dm:
        dm.modified_memory(HVM, 0, 900)  # 256-pfn batches: two preemptions, three rounds
        assert host.domain(HVM).dirty == frozenset(range(900))
        assert rounds == [1, 2]
        host.preempt(1)
        dm.set_mem_type(HVM, 1, 0, 600)
        assert all(host.domain(HVM).mem_type(g) == 1 for g in range(600)) and host.domain(HVM).mem_type(600) == 0


def test_continuation_sees_a_rewritten_buffer(host: MockXen, raw: object) -> None:
    """A caller that clobbers its request while Xen is preempted gets what Xen re-reads."""
    from .raw import Raw

    r = Raw(host)
    host.preempt(1)

    def clobber(_: int) -> None:
        r.member("set_mem_type").mem_type = 5  # invalid: the second round must see it

    host.hypervisor.on_continuation = clobber
    assert r.call(HVM, "set_mem_type", nr=300, mem_type=1) == errno.EINVAL
    assert host.domain(HVM).mem_type(255) == 1 and host.domain(HVM).mem_type(256) == 0
    assert r.member("set_mem_type").first_pfn == 256 and r.member("set_mem_type").nr == 44


def _resource(dev: object, dom: int, sid: int, idx: int, num: int, addr: int) -> privcmd_mmap_resource:
    arg = privcmd_mmap_resource(dom=dom, type=0, id=sid, idx=idx, num=num, addr=addr)
    dev.ioctl(IOCTL_PRIVCMD_MMAP_RESOURCE, arg)  # type: ignore[attr-defined]
    return arg


def test_mmap_resource_is_shared_memory_and_evtchn_round_trip(host: MockXen) -> None:
    """The runtime path: map the pages, enable, bind vp_eport, Xen notifies, DM notifies back."""
    with open_dm(host) as dm:
        sid = dm.create_ioreq_server(HVM, BufIoreq.OFF)
        priv = host.open_device("/dev/xen/privcmd")
        size = privcmd_mmap_resource(dom=HVM, type=0, id=sid)
        priv.ioctl(IOCTL_PRIVCMD_MMAP_RESOURCE, size)
        assert size.num == 2
        mapping = priv.mmap(4096)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        with pytest.raises(FileNotFoundError):  # frame 0 of a server without buffered ioreqs
            _resource(priv, HVM, sid, 0, 1, addr)
        _resource(priv, HVM, sid, 1, 1, addr)
        server = host.hypervisor.domains[HVM].servers[sid]
        with pytest.raises(PermissionError):  # now the legacy gfn path is closed
            dm.get_ioreq_server_info(HVM, sid, gfns=True)
        dm.set_ioreq_server_state(HVM, sid, True)
        slots = (ioreq * 2).from_address(addr)
        assert [s.vp_eport for s in slots] == server.vcpu_ports  # written at enable time
        server.page[8] = 0x42  # type: ignore[index]
        assert slots[0].data == 0x42  # same bytes

        ev = host.open_device("/dev/xen/evtchn")
        ev.ioctl(IOCTL_EVTCHN_RESTRICT_DOMID, ioctl_evtchn_restrict_domid(HVM))
        with pytest.raises(PermissionError):
            ev.ioctl(IOCTL_EVTCHN_BIND_INTERDOMAIN, ioctl_evtchn_bind_interdomain(PV, 1))
        local = ev.ioctl(IOCTL_EVTCHN_BIND_INTERDOMAIN, ioctl_evtchn_bind_interdomain(HVM, slots[1].vp_eport))
        assert local > 0
        assert not select.select([ev.fileno()], [], [], 0)[0]
        host.evtchn_notify_from_xen(HVM, server.vcpu_ports[1])
        assert select.select([ev.fileno()], [], [], 1)[0]
        assert ev.read(64) == local.to_bytes(4, "little")
        host.evtchn_notify_from_xen(HVM, server.vcpu_ports[1])  # masked until written back
        assert not select.select([ev.fileno()], [], [], 0)[0]
        ev.write(local.to_bytes(4, "little"))
        assert ev.read(4) == local.to_bytes(4, "little")
        ev.ioctl(IOCTL_EVTCHN_NOTIFY, ioctl_evtchn_notify(local))
        assert server.wait_dm_notify(1, timeout=1) and server.dm_notify_count[1] == 1
        with pytest.raises(OSError) as e:
            ev.ioctl(IOCTL_EVTCHN_NOTIFY, ioctl_evtchn_notify(local + 1))
        assert e.value.errno == errno.ENOTCONN
        ev.ioctl(IOCTL_EVTCHN_UNBIND, ioctl_evtchn_unbind(local))
        assert host.hypervisor.domains[HVM].ports[server.vcpu_ports[1]].state == "unbound"
        with pytest.raises(OSError) as e:
            ev.ioctl(0x4599, 0)
        assert e.value.errno == errno.ENOSYS
        ev.close()
        priv.close()
        del slots
        mapping.close()


def test_legacy_gfns_and_foreign_map(host: MockXen) -> None:
    with open_dm(host) as dm:
        sid = dm.create_ioreq_server(HVM, BufIoreq.LEGACY)
        info = dm.get_ioreq_server_info(HVM, sid, gfns=True)
        assert info.ioreq_gfn is not None and info.bufioreq_gfn is not None
        priv = host.open_device("/dev/xen/privcmd")
        mapping = priv.mmap(4096)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        with pytest.raises(PermissionError):  # resource mapping after legacy gfns
            _resource(priv, HVM, sid, 1, 1, addr)
        gfns = (ctypes.c_uint64 * 1)(info.ioreq_gfn)
        errs = (ctypes.c_int32 * 1)(-1)
        priv.ioctl(
            IOCTL_PRIVCMD_MMAPBATCH_V2,
            privcmd_mmapbatch_v2(num=1, dom=HVM, addr=addr, arr=ctypes.addressof(gfns), err=ctypes.addressof(errs)),
        )
        assert errs[0] == 0
        dm.set_ioreq_server_state(HVM, sid, True)  # enable: gfn leaves the p2m, vp_eport written
        server = host.hypervisor.domains[HVM].servers[sid]
        assert ioreq.from_address(addr).vp_eport == server.vcpu_ports[0]
        assert host.domain(HVM).mem_type(info.ioreq_gfn) is None
        priv.close()


def test_destroy_domain_releases_everything(host: MockXen) -> None:
    with open_dm(host) as dm:
        dm.create_ioreq_server(HVM)
        host.destroy_domain(HVM)
        with pytest.raises(ProcessLookupError):
            dm.nr_vcpus(HVM)
