"""Rule cases for MMAP_RESOURCE (§4.2) and /dev/xen/evtchn (§4.4), raw ioctls, errno + no state change."""

from __future__ import annotations

import ctypes
import errno as E
from collections.abc import Callable
from typing import Any

import pytest

from xendmop.abi.evtchn import (
    IOCTL_EVTCHN_BIND_INTERDOMAIN,
    IOCTL_EVTCHN_BIND_UNBOUND_PORT,
    IOCTL_EVTCHN_NOTIFY,
    IOCTL_EVTCHN_RESET,
    IOCTL_EVTCHN_RESTRICT_DOMID,
    IOCTL_EVTCHN_UNBIND,
    ioctl_evtchn_bind_interdomain,
    ioctl_evtchn_bind_unbound_port,
    ioctl_evtchn_notify,
    ioctl_evtchn_restrict_domid,
    ioctl_evtchn_unbind,
)
from xendmop.abi.privcmd import IOCTL_PRIVCMD_MMAP_RESOURCE, IOCTL_PRIVCMD_RESTRICT, privcmd_mmap_resource
from xendmop.abi.xen import domid_t
from xendmop.mock import MockXen

from .conftest import HVM, PV, make_host
from .raw import Raw, errno_of, snapshot


def res(
    raw: Raw, dom: int = HVM, idx: int = 1, num: int = 1, addr: int | None = None, sid: int = 0, rtype: int = 0
) -> int:
    if addr is None:
        raw.mapping = raw.dev.mmap(4096 * max(1, num))  # type: ignore[attr-defined]
        anchor = ctypes.c_char.from_buffer(raw.mapping)  # type: ignore[attr-defined]
        addr = ctypes.addressof(anchor)
        del anchor
    arg = privcmd_mmap_resource(dom=dom, type=rtype, id=sid, idx=idx, num=num, addr=addr)
    return errno_of(raw.dev.ioctl, IOCTL_PRIVCMD_MMAP_RESOURCE, arg)


def create(raw: Raw, handle: int = 0) -> None:
    assert raw.call(HVM, "create_ioreq_server", handle_bufioreq=handle) == 0


_plain = ctypes.create_string_buffer(4096)

RESOURCE: list[tuple[str, Callable[[Raw], Any] | None, Callable[[Raw], int], int]] = [
    ("addr without num: EINVAL", None, lambda r: res(r, num=0, addr=0x1000), E.EINVAL),
    ("num without addr: EINVAL", None, lambda r: res(r, num=1, addr=0), E.EINVAL),
    (
        "restricted to another domain: EPERM",
        lambda r: r.dev.ioctl(IOCTL_PRIVCMD_RESTRICT, domid_t(PV)),
        lambda r: res(r, num=0, addr=0),
        E.EPERM,
    ),
    ("size query of a PV domain: EINVAL", None, lambda r: res(r, dom=PV, num=0, addr=0), E.EINVAL),
    ("size query of an unknown type: EINVAL", None, lambda r: res(r, num=0, addr=0, rtype=7), E.EINVAL),
    ("size query of dom0 itself: EPERM", None, lambda r: res(r, dom=0, num=0, addr=0), E.EPERM),
    ("no such server: ENOENT", None, lambda r: res(r), E.ENOENT),
    ("frame 0 without bufioreq: ENOENT", create, lambda r: res(r, idx=0), E.ENOENT),
    ("frame 2: EINVAL", create, lambda r: res(r, idx=2), E.EINVAL),
    ("id beyond ioservid_t: EINVAL", create, lambda r: res(r, sid=0x10000), E.EINVAL),
    ("not a privcmd VMA: EINVAL", create, lambda r: res(r, addr=ctypes.addressof(_plain)), E.EINVAL),
    (
        "after legacy gfns: EPERM",
        lambda r: (create(r), r.call(HVM, "get_ioreq_server_info")),
        lambda r: res(r),
        E.EPERM,
    ),
    (
        "other emulator: EPERM",
        lambda r: (create(r), setattr(r.host.hypervisor.domains[HVM].ioreq_servers[0], "emulator", 5)),
        lambda r: res(r),
        E.EPERM,
    ),
]


@pytest.mark.parametrize("case", RESOURCE, ids=[c[0] for c in RESOURCE])
def test_mmap_resource_rule(case: tuple[str, Any, Callable[[Raw], int], int]) -> None:
    _, setup, action, expected = case
    host = make_host()
    raw = Raw(host)
    if setup:
        setup(raw)
    before = snapshot(host)
    assert action(raw) == expected
    after = snapshot(host)
    if case[0] in ALLOCATES:
        # ioreq_server_get_frame calls ioreq_server_alloc_pages before looking at the
        # frame index: Xen keeps the pages even when the frame is refused.
        assert after[HVM]["servers"][0]["pages"] == (True, False)
        after[HVM]["servers"] = before[HVM]["servers"]
    assert after == before


ALLOCATES = {"frame 0 without bufioreq: ENOENT", "frame 2: EINVAL"}


def ev_ioctl(dev: Any, request: int, arg: Any) -> int:
    try:
        return int(dev.ioctl(request, arg))
    except OSError as e:
        return -(e.errno or 0)


def bound(host: MockXen, dev: Any) -> int:
    """Create a server and bind vCPU0's port; return the local port."""
    raw = Raw(host)
    create(raw)
    port = host.hypervisor.domains[HVM].servers[0].vcpu_ports[0]
    return ev_ioctl(dev, IOCTL_EVTCHN_BIND_INTERDOMAIN, ioctl_evtchn_bind_interdomain(HVM, port))


EVTCHN: list[tuple[str, Callable[[MockXen, Any], Any] | None, Callable[[MockXen, Any], int], int]] = [
    (
        "RESTRICT twice: EACCES",
        lambda h, d: d.ioctl(IOCTL_EVTCHN_RESTRICT_DOMID, ioctl_evtchn_restrict_domid(HVM)),
        lambda h, d: ev_ioctl(d, IOCTL_EVTCHN_RESTRICT_DOMID, ioctl_evtchn_restrict_domid(HVM)),
        -E.EACCES,
    ),
    (
        "RESTRICT to 0: EINVAL",
        None,
        lambda h, d: ev_ioctl(d, IOCTL_EVTCHN_RESTRICT_DOMID, ioctl_evtchn_restrict_domid(0)),
        -E.EINVAL,
    ),
    (
        "RESTRICT to DOMID_SELF: EINVAL",
        None,
        lambda h, d: ev_ioctl(d, IOCTL_EVTCHN_RESTRICT_DOMID, ioctl_evtchn_restrict_domid(0x7FF0)),
        -E.EINVAL,
    ),
    (
        "BIND_UNBOUND_PORT restricted: EACCES",
        lambda h, d: d.ioctl(IOCTL_EVTCHN_RESTRICT_DOMID, ioctl_evtchn_restrict_domid(HVM)),
        lambda h, d: ev_ioctl(d, IOCTL_EVTCHN_BIND_UNBOUND_PORT, ioctl_evtchn_bind_unbound_port(HVM)),
        -E.EACCES,
    ),
    (
        "BIND_INTERDOMAIN restricted elsewhere: EACCES",
        lambda h, d: d.ioctl(IOCTL_EVTCHN_RESTRICT_DOMID, ioctl_evtchn_restrict_domid(PV)),
        lambda h, d: ev_ioctl(d, IOCTL_EVTCHN_BIND_INTERDOMAIN, ioctl_evtchn_bind_interdomain(HVM, 1)),
        -E.EACCES,
    ),
    (
        "BIND_INTERDOMAIN to a port not awaiting dom0: EINVAL",
        None,
        lambda h, d: ev_ioctl(d, IOCTL_EVTCHN_BIND_INTERDOMAIN, ioctl_evtchn_bind_interdomain(HVM, 9)),
        -E.EINVAL,
    ),
    (
        "BIND_INTERDOMAIN to an unknown domain: ESRCH",
        None,
        lambda h, d: ev_ioctl(d, IOCTL_EVTCHN_BIND_INTERDOMAIN, ioctl_evtchn_bind_interdomain(77, 1)),
        -E.ESRCH,
    ),
    (
        "BIND_INTERDOMAIN twice to the same port: EINVAL",
        bound,
        lambda h, d: ev_ioctl(
            d,
            IOCTL_EVTCHN_BIND_INTERDOMAIN,
            ioctl_evtchn_bind_interdomain(HVM, h.hypervisor.domains[HVM].servers[0].vcpu_ports[0]),
        ),
        -E.EINVAL,
    ),
    (
        "UNBIND beyond nr_channels: EINVAL",
        None,
        lambda h, d: ev_ioctl(d, IOCTL_EVTCHN_UNBIND, ioctl_evtchn_unbind(5000)),
        -E.EINVAL,
    ),
    (
        "UNBIND of a port not bound here: ENOTCONN",
        bound,
        lambda h, d: ev_ioctl(h.open_device("/dev/xen/evtchn"), IOCTL_EVTCHN_UNBIND, ioctl_evtchn_unbind(1)),
        -E.ENOTCONN,
    ),
    (
        "NOTIFY of a port not bound here: ENOTCONN",
        None,
        lambda h, d: ev_ioctl(d, IOCTL_EVTCHN_NOTIFY, ioctl_evtchn_notify(1)),
        -E.ENOTCONN,
    ),
    ("unknown ioctl: ENOSYS", None, lambda h, d: ev_ioctl(d, 0x4599, 0), -E.ENOSYS),
    ("RESET: 0", None, lambda h, d: ev_ioctl(d, IOCTL_EVTCHN_RESET, 0), 0),
]


@pytest.mark.parametrize("case", EVTCHN, ids=[c[0] for c in EVTCHN])
def test_evtchn_rule(case: tuple[str, Any, Callable[[MockXen, Any], int], int]) -> None:
    _, setup, action, expected = case
    host = make_host()
    dev = host.open_device("/dev/xen/evtchn")
    if setup:
        setup(host, dev)
    before = snapshot(host)
    assert action(host, dev) == expected
    assert snapshot(host) == before


def test_evtchn_nonblocking_read_and_close() -> None:
    host = make_host()
    dev = host.open_device("/dev/xen/evtchn")
    dev.nonblocking = True
    with pytest.raises(BlockingIOError):
        dev.read(4)
    assert dev.read(3) == b""
    local = bound(host, dev)
    dev.close()  # evtchn_release unbinds: the server's port awaits dom0 again
    assert host.hypervisor.domains[HVM].ports[host.hypervisor.domains[HVM].servers[0].vcpu_ports[0]].state == "unbound"
    assert local not in host.dom0.ports


def test_evtchn_ring_overflow_until_reset() -> None:
    """§4.4: ring overflow → read gives EFBIG (poll: POLLERR) until IOCTL_EVTCHN_RESET.

    Linux ``evtchn_interrupt`` queues a port only while ``prod - cons < ring_size`` and else
    sets ``ring_overflow`` (the event is lost); ``evtchn_read`` checks ``ring_overflow`` before
    the ring; ``evtchn_poll`` answers only EPOLLERR; RESET empties the ring and clears it.  The
    ring (64 entries for up to 64 bound ports, ``evtchn_resize_ring``) fills when a port is
    unmasked by a write and fires again without the queued entries being read.
    """
    import select

    host = make_host()
    dev = host.open_device("/dev/xen/evtchn")
    dev.nonblocking = True
    local = bound(host, dev)
    xen_port = host.hypervisor.domains[HVM].servers[0].vcpu_ports[0]
    unmask = local.to_bytes(4, "little")
    assert dev.ring_size == 64
    for _ in range(64):
        host.evtchn_notify_from_xen(HVM, xen_port)
        assert dev.write(unmask) == 4
    assert not dev.ring_overflow and dev.poll() & select.POLLIN
    host.evtchn_notify_from_xen(HVM, xen_port)  # the 65th: no room
    assert dev.ring_overflow and dev.poll() == select.POLLERR
    for nbytes in (4, 4096):
        with pytest.raises(OSError) as e:
            dev.read(nbytes)
        assert e.value.errno == E.EFBIG
    assert dev.read(3) == b""  # a count under 4 returns before the overflow check
    assert ev_ioctl(dev, IOCTL_EVTCHN_RESET, 0) == 0
    assert not dev.ring_overflow and dev.poll() == select.POLLOUT | select.POLLWRNORM
    with pytest.raises(BlockingIOError):  # empty: the 64 queued entries went with the reset
        dev.read(4)
    assert not dev.readable()
    # the lost event left the port masked: a new one stays pending in Xen until the port is
    # written back, and is delivered then (xen_irq_lateeoi)
    host.evtchn_notify_from_xen(HVM, xen_port)
    with pytest.raises(BlockingIOError):
        dev.read(4)
    dev.write(unmask)
    assert dev.read(8) == unmask


def test_evtchn_ring_grows_with_bound_ports() -> None:
    """``evtchn_resize_ring``: 64 entries at the first bind, doubled when the 65th port is bound."""
    host = make_host()
    dev = host.open_device("/dev/xen/evtchn")
    assert dev.ring_size == 0
    for i in range(65):
        port = ev_ioctl(dev, IOCTL_EVTCHN_BIND_UNBOUND_PORT, ioctl_evtchn_bind_unbound_port(HVM))
        assert port > 0, port
        assert dev.ring_size == (64 if i < 64 else 128)


def test_dm_op_zero_byte_buffer_page_aligned_is_efault_unaligned_is_fine() -> None:
    """privcmd ``lock_pages`` pins DIV_ROUND_UP(offset_in_page(uptr) + size, PAGE_SIZE) pages:
    none for a page-aligned 0-byte buffer, which is -EFAULT (HAZARD 2 on a 6.1 dom0)."""
    import mmap

    host = make_host()
    raw = Raw(host)
    page = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        anchor = ctypes.c_char.from_buffer(page)
        aligned = ctypes.addressof(anchor)
        del anchor
        raw.build("track_dirty_vram", first_pfn=0, nr=0)
        op = raw.bufs()[0]
        assert raw.ioctl_dm_op(HVM, [op, (aligned, 0)]) == E.EFAULT
        assert raw.ioctl_dm_op(HVM, [op, (aligned + 16, 0)]) == 0  # stop tracking, as libxendevicemodel's
    finally:
        page.close()


def test_evtchn_unbind_leaves_queued_entries_in_process_too() -> None:
    """``evtchn_unbind_from_user`` (drivers/xen/evtchn.c) leaves the ring alone."""
    import select

    from xendmop.runtime.evtchn import EventChannel

    host = make_host()
    with EventChannel(host.open_device) as ev:
        a = ev.bind_unbound_port(0)
        a_peer = ev.bind_interdomain(0, a)
        b = ev.bind_unbound_port(0)
        b_peer = ev.bind_interdomain(0, b)
        ev.notify(a_peer)
        ev.notify(b_peer)
        ev.unbind(a)
        assert ev.pending_ports(8) == [a, b]
        ev.device.write(a.to_bytes(4, "little"))  # not this fd's port any more: ignored
        assert not select.select([ev], [], [], 0)[0]


def test_hypercall_buffers_map_at_any_offset_as_privcmd_buf_mmap() -> None:
    """privcmd_buf_mmap (privcmd-buf.c) checks only VM_SHARED and maps zeroed pages with
    vm_map_pages_zero, which ignores vm_pgoff; do_mmap refuses no length or a wrapping offset."""
    host = make_host()
    dev = host.open_device("/dev/xen/hypercall")
    try:
        mapping = dev.mmap(8192, 3 * 4096)
        assert bytes(mapping[:8192]) == bytes(8192)
        mapping.close()
        for length, offset in ((0, 0), (4096, -4096)):
            with pytest.raises(OSError) as e:
                dev.mmap(length, offset)
            assert e.value.errno == E.EINVAL
    finally:
        dev.close()
        host.close()
