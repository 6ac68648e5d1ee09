"""A mock host owns real fds (memfds for guest RAM and ioreq pages, device fds, eventfds)
and mappings; ``MockXen.close()`` gives every one of them back."""

from __future__ import annotations

import errno
import gc
import os

import pytest

from xendmop import DeviceModel
from xendmop.mock import MockXen, default_host

from .conftest import HVM, make_host
from .raw import Raw


def nr_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def busy_host() -> MockXen:
    """A host that has touched every kind of resource: RAM memfds, legacy and resource
    ioreq pages, a privcmd fd with a mapping, an evtchn eventfd with a bound port, a DeviceModel."""
    host = make_host()
    raw = Raw(host)
    assert raw.call(HVM, "create_ioreq_server", handle_bufioreq=1) == 0
    assert raw.call(HVM, "get_ioreq_server_info") == 0  # legacy gfns in guest RAM
    assert raw.call(HVM, "create_ioreq_server", handle_bufioreq=1) == 0
    second = host.hypervisor.domains[HVM].ioreq_servers[1]
    assert second is not None and host.hypervisor.alloc_ioreq_pages(second) == 0  # own memfd
    evtchn = host.open_device("/dev/xen/evtchn")
    evtchn.nonblocking = True
    raw.dev.mmap(4096)
    with DeviceModel.open("mock", xen=host) as dm:
        assert dm.nr_vcpus(HVM) == 2
    return host


def test_fifty_hosts_leave_the_fd_count_unchanged() -> None:
    busy_host().close()  # first-use imports and caches are not leaks
    gc.collect()
    before = nr_fds()
    for _ in range(50):
        busy_host().close()
    assert nr_fds() == before
    with default_host() as host:
        host.open_device("/dev/xen/privcmd")
    assert nr_fds() == before


def test_close_is_idempotent_and_final() -> None:
    host = busy_host()
    dev = host.open_device("/dev/xen/privcmd")
    host.close()
    host.close()
    assert host.closed and list(host.hypervisor.domains) == [0]
    with pytest.raises(OSError) as e:  # the device's fd went with the host
        dev.ioctl(0x105005, 0)
    assert e.value.errno == errno.EBADF
    with pytest.raises(ValueError):
        host.open_device("/dev/xen/privcmd")
    with pytest.raises(ValueError):
        host.create_domain()


def test_devices_closed_by_their_user_are_not_closed_twice() -> None:
    before = nr_fds()
    with make_host() as host:
        dev = host.open_device("/dev/xen/evtchn")
        dev.close()
        host.open_device("/dev/xen/privcmd").close()
    assert nr_fds() == before


def test_close_with_a_page_view_still_held() -> None:
    """A live view of an ioreq page cannot stop ``close``; its mapping goes with the view."""
    before = nr_fds()
    host = make_host()
    raw = Raw(host)
    assert raw.call(HVM, "create_ioreq_server", handle_bufioreq=1) == 0
    server = host.hypervisor.domains[HVM].ioreq_servers[0]
    assert server is not None and host.hypervisor.alloc_ioreq_pages(server) == 0
    page = server.page
    assert page is not None
    host.close()
    assert nr_fds() == before + 1  # the mapping's own fd, held by the view
    page.release()
    del page, server, raw, host
    gc.collect()
    assert nr_fds() == before
