"""The mock hypervisor's state: domains, vCPUs, ioreq servers, rangesets, event channels.

Plain data, mutated only by ``hypervisor.Hypervisor`` (and the evtchn device) under
the host lock.  ``snapshot()`` methods give a comparable picture of everything a
DMOP can change, for tests that assert a refused call changed nothing.
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import threading
import weakref
from collections.abc import Callable, Iterator, MutableMapping, ValuesView
from dataclasses import dataclass, field
from typing import Any

from ..abi.hvm import HVMMEM_ioreq_server, HVMMEM_ram_rw
from .pages import PageRef, PageStore

#: ``MAX_NR_IOREQ_SERVERS`` (xen/include/xen/sched.h)
MAX_NR_IOREQ_SERVERS = 8
#: ``MAX_NR_IO_RANGES`` (xen/include/xen/ioreq.h): rangeset_limit of each server's sets
MAX_NR_IO_RANGES = 256
#: ``NR_IO_RANGE_TYPES``: port, memory, pci
NR_IO_RANGE_TYPES = 3
#: ``NR_ISA_IRQS`` and the vIOAPIC's GSI count (``VIOAPIC_NUM_PINS``, 48)
NR_ISA_IRQS = 16
NR_GSIS = 48
NR_LINKS = 4
#: pinned cache-attribute ranges per domain (``hvm_set_mem_pinned_cacheattr``: "arbitrary")
MAX_PINNED_CACHEATTR = 64
#: Linux/Xen 2-level event channel ABI: ports per domain (``EVTCHN_2L_NR_CHANNELS`` on 64-bit)
NR_EVTCHN_PORTS = 4096
#: routes a domain remembers (``Domain.select_ioreq_server``) before it forgets them all
ROUTE_CACHE_SIZE = 1024


_WAKES = threading.local()


class WakeAfterUnlock:
    """``with WakeAfterUnlock(): with host.lock: ...``: the vCPU wake-ups Xen's ioreq
    consumers ask for inside (``wake``) are written after the host lock is let go.

    The eventfd write hands the CPU (and the GIL) to the woken vCPU thread, which then
    wants the host lock first thing; woken while the notifier still holds it, it would
    block and be woken a second time.  The notify itself (its count, its order) is
    unchanged: only the wake-up comes a few instructions later.  Nests: the outermost
    one writes.  ``defer_wakes``/``write_deferred_wakes`` are the same without a context
    manager's calls, for the evtchn NOTIFY that runs on every access."""

    __slots__ = ("_outer",)

    def __enter__(self) -> None:
        self._outer = defer_wakes()

    def __exit__(self, *exc: object) -> None:
        write_deferred_wakes(self._outer)


def defer_wakes() -> list[tuple[int, object]] | None:
    """Start deferring this thread's ``wake`` calls; the list to hand to
    ``write_deferred_wakes``, or None when an outer deferral already collects them."""
    if getattr(_WAKES, "fds", None) is not None:
        return None
    fds: list[tuple[int, object]] = []
    _WAKES.fds = fds
    return fds


def write_deferred_wakes(fds: list[tuple[int, object]] | None) -> None:
    """End the deferral ``defer_wakes`` started (None: an outer one goes on) and write its wake-ups."""
    if fds is not None:
        _WAKES.fds = None
        for fd, _owner in fds:
            os.eventfd_write(fd, 1)


def wake(fd: int, owner: object) -> None:
    """Signal eventfd ``fd`` now, or when the thread's outermost ``WakeAfterUnlock`` ends.
    ``owner`` closes ``fd`` when it goes away: it is kept alive until the write."""
    pending = getattr(_WAKES, "fds", None)
    if pending is None:
        os.eventfd_write(fd, 1)
    else:
        pending.append((fd, owner))


_EPOCHS = itertools.count(1)


class RoutingEpoch:
    """Moved by every change that can move an access to another ioreq server: a range
    added or removed, a server enabled or disabled, created or destroyed.  A domain's
    route cache is valid only for the epoch it was filled in (one counter for all hosts:
    such changes are rare next to accesses).

    Each epoch is a number handed out once (``next`` on a counter is one step under the
    GIL), so two hosts changing at once in two threads can never bring an old epoch
    back, as ``value += 1`` could."""

    value = 0

    @classmethod
    def bump(cls) -> None:
        cls.value = next(_EPOCHS)


class RangeSet:
    """``xen/common/rangeset.c``: sorted, merged inclusive ranges with a count limit."""

    def __init__(self, limit: int = MAX_NR_IO_RANGES) -> None:
        self.limit = limit
        self.ranges: list[tuple[int, int]] = []

    def overlaps(self, start: int, end: int) -> bool:
        """``rangeset_overlaps_range``."""
        return any(s <= end and start <= e for s, e in self.ranges)

    def contains(self, start: int, end: int) -> bool:
        """``rangeset_contains_range``: one stored range covers all of [start, end]."""
        return any(s <= start and end <= e for s, e in self.ranges)

    def add(self, start: int, end: int) -> int:
        """``rangeset_add_range``: merge with overlapping or adjacent ranges; -ENOMEM past the limit."""
        keep, lo, hi = [], start, end
        for s, e in self.ranges:
            if s <= hi + 1 and lo <= e + 1:  # overlapping or adjacent: absorbed
                lo, hi = min(lo, s), max(hi, e)
            else:
                keep.append((s, e))
        if len(keep) + 1 > self.limit:
            return -errno.ENOMEM  # alloc_range refused by rangeset_limit
        self.ranges = sorted([*keep, (lo, hi)])
        RoutingEpoch.bump()
        return 0

    def remove(self, start: int, end: int) -> int:
        """``rangeset_remove_range``: may split a range, which needs a new one (-ENOMEM)."""
        out: list[tuple[int, int]] = []
        for s, e in self.ranges:
            if e < start or end < s:
                out.append((s, e))
                continue
            if s < start:
                out.append((s, start - 1))
            if end < e:
                out.append((end + 1, e))
        if len(out) > self.limit:
            return -errno.ENOMEM
        self.ranges = out
        RoutingEpoch.bump()
        return 0

    def covers(self, start: int, end: int) -> bool:
        return self.contains(start, end)

    def __len__(self) -> int:
        return len(self.ranges)


@dataclass
class EvtchnPort:
    """One event channel port of a domain (``struct evtchn``)."""

    port: int
    state: str  # "unbound" | "interdomain" | "virq"
    remote_domid: int = 0
    remote_port: int = 0
    vcpu: int = 0
    pending: bool = False
    #: Xen-attached consumer (``alloc_unbound_xen_event_channel``): called when the remote end sends
    xen_consumer: Callable[[], None] | None = None
    #: Linux side, dom0 only: the evtchn device instance that bound this port
    user: Any = None

    def snapshot(self) -> tuple[Any, ...]:
        return (self.port, self.state, self.remote_domid, self.remote_port, self.vcpu, self.xen_consumer is not None)


@dataclass
class P2mEntry:
    """A gfn's p2m entry: its type (``HVMMEM_*`` numbering) and the frame behind it (None for mmio_dm)."""

    type: int
    page: PageRef | None


class P2m(MutableMapping[int, P2mEntry]):
    """A domain's p2m whose gfns ``0 .. nr_ram-1`` start as ``p2m_ram_rw`` on frame ``gfn`` of ``ram``.

    The same contents as a dict filled at domain build, but an entry is made only when
    first looked up, so creating a 128 MiB guest does not build 32768 entries up front.
    Changed entries live in ``_entries``; a removed initial gfn is in ``_removed``.
    """

    def __init__(self, ram: PageStore, nr_ram: int) -> None:
        self._ram = ram
        self._nr = nr_ram
        self._entries: dict[int, P2mEntry] = {}
        self._removed: set[int] = set()  # initial gfns deleted (never also in _entries)

    def _initial(self, gfn: int) -> bool:
        return isinstance(gfn, int) and 0 <= gfn < self._nr and gfn not in self._removed

    def __getitem__(self, gfn: int) -> P2mEntry:
        entry = self._entries.get(gfn)
        if entry is not None:
            return entry
        if self._initial(gfn):
            entry = self._entries[gfn] = P2mEntry(HVMMEM_ram_rw, PageRef(self._ram, gfn))
            return entry
        raise KeyError(gfn)

    def get(self, gfn: int, default: Any = None) -> Any:  # the hot path: no exception for a hit
        entry = self._entries.get(gfn)
        if entry is not None:
            return entry
        return self[gfn] if self._initial(gfn) else default

    def __contains__(self, gfn: object) -> bool:
        return gfn in self._entries or (isinstance(gfn, int) and self._initial(gfn))

    def __setitem__(self, gfn: int, entry: P2mEntry) -> None:
        self._entries[gfn] = entry
        self._removed.discard(gfn)

    def __delitem__(self, gfn: int) -> None:
        if gfn not in self:
            raise KeyError(gfn)
        self._entries.pop(gfn, None)
        if 0 <= gfn < self._nr:
            self._removed.add(gfn)

    def __iter__(self) -> Iterator[int]:
        for gfn in range(self._nr):
            if gfn not in self._removed:
                yield gfn
        yield from [g for g in self._entries if not 0 <= g < self._nr]

    def __len__(self) -> int:
        return self._nr - len(self._removed) + sum(1 for g in self._entries if not 0 <= g < self._nr)

    def touched(self) -> ValuesView[P2mEntry]:
        """The entries made so far (every other one is still ``p2m_ram_rw``)."""
        return self._entries.values()


@dataclass
class Vcpu:
    vcpu_id: int
    #: ``v->arch.hvm.inject_event``: latched by inject_event until the vCPU's next entry
    pending_event: dict[str, int] | None = None


class IoreqServerState:
    """``struct ioreq_server`` (xen/include/xen/ioreq.h), as the runtime engineer may read it.

    Pages: ``ioreq_page`` (one ``ioreq_t`` per vCPU, indexed by vcpu id) and
    ``bufioreq_page`` (the buffered ring) are ``PageRef``\\ s once allocated, either
    in the server's own memfd (resource acquisition) or in guest RAM at a legacy gfn.
    """

    def __init__(self, sid: int, emulator: int, bufioreq_handling: int, nr_vcpus: int) -> None:
        self.id = sid
        self.emulator = emulator
        self.bufioreq_handling = bufioreq_handling
        self._enabled = False
        self.ranges = [RangeSet() for _ in range(NR_IO_RANGE_TYPES)]
        self.vcpu_ports: list[int] = []
        self.bufioreq_port: int | None = None
        self._ioreq_page: PageRef | None = None
        self._page: memoryview | None = None  # the ioreq page's bytes, made when it is set
        self.bufioreq_page: PageRef | None = None
        self.ioreq_gfn: int | None = None  # None = INVALID_GFN
        self.bufioreq_gfn: int | None = None
        self.store: PageStore | None = None  # own frames (resource path)
        #: how many times the DM notified the port of vCPU i (index nr_vcpus: the buffered port)
        self.dm_notify_count = [0] * (nr_vcpus + 1)
        # One eventfd per port, made at the first wait or notify: the DM's EVTCHNOP_send
        # wakes a waiting vCPU with one eventfd write, the same hand-off as a real event
        # channel (a threading.Event costs a Condition and a GIL hand-off more).  They are
        # closed with the server object, never under a vCPU that may still be polling one.
        self._notify_fds = [-1] * (nr_vcpus + 1)
        # The vCPU's wait polls its eventfd through an epoll of its own, made at the first
        # wait: epoll.poll costs less than half of select.select with a timeout, and several
        # threads may wait in it at once (a poll object refuses a second one).
        self._notify_pollers: list[select.epoll | None] = [None] * (nr_vcpus + 1)
        #: the doorbell each poller also watches (``wait_dm_notify``): kept referenced, so its
        #: eventfd stays open while it is registered
        self._notify_doorbells: list[Any] = [None] * (nr_vcpus + 1)
        self._notify_fds_lock = threading.Lock()
        self._close_notify_fds = weakref.finalize(self, _close_eventfds, self._notify_fds, self._notify_pollers)

    @property
    def enabled(self) -> bool:
        """``s->enabled``: only enabled servers are selected for an access."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = value
        RoutingEpoch.bump()  # the route of every access may change

    @property
    def handles_bufioreq(self) -> bool:
        """``HANDLE_BUFIOREQ(s)``."""
        return self.bufioreq_handling != 0

    @property
    def ioreq_page(self) -> PageRef | None:
        return self._ioreq_page

    @ioreq_page.setter
    def ioreq_page(self, ref: PageRef | None) -> None:
        # The view is made here, not at every access: a vCPU reads it on each ioreq.  It goes
        # with the page (ioreq_server_free_pages sets None before the frames are freed).
        self._ioreq_page = ref
        self._page = None if ref is None else ref.view()

    @property
    def page(self) -> memoryview | None:
        """The synchronous ioreq page (live shared bytes), or None before allocation."""
        return self._page

    @property
    def bufpage(self) -> memoryview | None:
        return self.bufioreq_page.view() if self.bufioreq_page else None

    def notify_fd(self, index: int) -> int:
        """The eventfd the DM's notify of port ``index`` (vCPU id, or ``nr_vcpus`` for the
        buffered port) writes: readable while a notify is not yet taken by ``wait_dm_notify``."""
        fd = self._notify_fds[index]
        if fd < 0:
            with self._notify_fds_lock:
                fd = self._notify_fds[index]
                if fd < 0:
                    fd = self._notify_fds[index] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return fd

    def dm_notified(self, index: int) -> None:
        """Xen's consumer of port ``index`` ran (the DM's ``EVTCHNOP_send``): count it and
        wake the vCPU waiting for it."""
        self.dm_notify_count[index] += 1
        fd = self._notify_fds[index]
        wake(fd if fd >= 0 else self.notify_fd(index), self)

    def wait_dm_notify(self, vcpu: int, timeout: float | None = None, doorbell: Any = None) -> bool:
        """Block until the DM notifies vCPU ``vcpu``'s port (or the buffered port for
        ``vcpu == nr_vcpus``), at most ``timeout`` seconds (None: no limit); take every
        notify so far and return True, or False on timeout.  Several notifies before one
        wait are one wake-up, as a pending event channel bit is.

        ``doorbell`` (``evtchn.Doorbell``): a device model in another process rings it after
        queueing its NOTIFY; the same wait watches it and applies what it finds (``answer``),
        and only a NOTIFY so applied that reached this port (``dm_notified``) ends the wait:
        a doorbell rung with nothing valid queued is a wake-up that returns False."""
        poller = self._notify_pollers[vcpu]
        if poller is None:
            poller = self._notify_poller(vcpu)
        if doorbell is not self._notify_doorbells[vcpu]:
            self._watch_doorbell(vcpu, poller, doorbell)
        if timeout is not None and timeout < 0:
            timeout = 0  # epoll's negative timeout would wait for ever
        if not poller.poll(timeout):
            return False
        if doorbell is not None:
            doorbell.answer()
        try:
            os.eventfd_read(self._notify_fds[vcpu])
        except BlockingIOError:  # another waiter on the same port took it first
            return False
        return True

    def _watch_doorbell(self, index: int, poller: select.epoll, doorbell: Any) -> None:
        """Make ``poller`` watch ``doorbell`` instead of the one it watched (either may be None)."""
        with self._notify_fds_lock:
            old = self._notify_doorbells[index]
            if old is doorbell:
                return
            if old is not None:
                poller.unregister(old.fd)  # still open: referenced until now
            if doorbell is not None:
                # Edge-triggered: the host never drains the doorbell, whose counter its client
                # controls (a read could block: ``evtchn.Doorbell``); each client write is a wake-up.
                poller.register(doorbell.fd, select.EPOLLIN | select.EPOLLET)
            self._notify_doorbells[index] = doorbell

    def _notify_poller(self, index: int) -> select.epoll:
        """The epoll watching ``notify_fd(index)`` for reading, made once."""
        fd = self.notify_fd(index)
        with self._notify_fds_lock:
            poller = self._notify_pollers[index]
            if poller is None:
                poller = select.epoll()
                poller.register(fd, select.EPOLLIN)
                self._notify_pollers[index] = poller
        return poller

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "emulator": self.emulator,
            "bufioreq_handling": self.bufioreq_handling,
            "enabled": self.enabled,
            "ranges": tuple(tuple(r.ranges) for r in self.ranges),
            "vcpu_ports": tuple(self.vcpu_ports),
            "bufioreq_port": self.bufioreq_port,
            "pages": (self.ioreq_page is not None, self.bufioreq_page is not None),
            "gfns": (self.ioreq_gfn, self.bufioreq_gfn),
        }


def _close_eventfds(fds: list[int], pollers: list[select.epoll | None]) -> None:
    for i, poller in enumerate(pollers):
        if poller is not None:
            pollers[i] = None
            poller.close()
    for i, fd in enumerate(fds):
        if fd >= 0:
            fds[i] = -1
            os.close(fd)


@dataclass
class Domain:
    """``struct domain`` as far as the DMOPs reach."""

    domid: int
    hvm: bool
    max_vcpus: int
    nr_pages: int
    ram: PageStore | None
    hap: bool = True
    iommu: bool = False
    log_dirty: bool = False
    dying: bool = False
    shutdown_reason: int | None = None
    #: the domain this one is device model for (``XEN_DOMCTL_set_target``), None for none
    target: int | None = None
    vcpus: list[Vcpu] = field(default_factory=list)
    p2m: MutableMapping[int, P2mEntry] = field(default_factory=dict)
    max_mapped_pfn: int = 0
    dirty: set[int] = field(default_factory=set)  # log-dirty bitmap
    vram: tuple[int, int] | None = None  # (first_pfn, nr) tracked by track_dirty_vram
    vram_dirty: set[int] = field(default_factory=set)
    ioreq_servers: list[IoreqServerState | None] = field(default_factory=lambda: [None] * MAX_NR_IOREQ_SERVERS)
    ioreq_gfn_free: list[int] = field(default_factory=list)  # d->arch.hvm.ioreq_gfn.mask
    ioreq_gfn_legacy_free: list[int] = field(default_factory=list)  # HVM_PARAM_{,BUF}IOREQ_PFN
    legacy_gfns: tuple[int, ...] = ()  # the values of those two params
    # vPIC / vIOAPIC inputs (struct hvm_irq)
    isa_irq: int = 0  # bitmap of asserted ISA lines
    pci_intx: int = 0  # bitmap, bit device*4+intx
    gsi_assert_count: list[int] = field(default_factory=lambda: [0] * NR_GSIS)
    pci_link_route: list[int] = field(default_factory=lambda: [0] * NR_LINKS)
    pci_link_assert_count: list[int] = field(default_factory=lambda: [0] * NR_LINKS)
    msis: list[tuple[int, int]] = field(default_factory=list)  # delivered (addr, data)
    emu_pirqs: set[int] = field(default_factory=set)
    p2m_ioreq_server: int | None = None  # id of the server holding p2m_ioreq_server
    p2m_ioreq_flags: int = 0
    cacheattr: list[tuple[int, int, int]] = field(default_factory=list)
    irq_levels: dict[int, int] = field(default_factory=dict)  # Arm SPIs
    #: Arm: level-1 calls per SPI, each an injection: Xen's vGIC takes every one as an edge
    #: and ignores level 0 (xen/arch/arm/vgic.c, ``vgic_inject_irq``)
    spi_injections: dict[int, int] = field(default_factory=dict)
    #: Arm: SPIs Xen emulates a device on itself (``d->arch.vgic.allocated_irqs``, set by
    #: ``vgic_reserve_virq``, xen/arch/arm/vgic.c), which ``set_irq_level`` refuses
    vgic_allocated: set[int] = field(default_factory=set)
    ports: dict[int, EvtchnPort] = field(default_factory=dict)
    #: (range type, first, last) -> the server ``select_ioreq_server`` chose, for ``_routes_epoch``
    _routes: dict[tuple[int, int, int], IoreqServerState | None] = field(
        default_factory=dict, repr=False, compare=False
    )
    _routes_epoch: int = field(default=-1, repr=False, compare=False)

    def server(self, sid: int) -> IoreqServerState | None:
        """``get_ioreq_server``: None for an id out of range or an empty slot."""
        return self.ioreq_servers[sid] if 0 <= sid < MAX_NR_IOREQ_SERVERS else None

    def set_server(self, sid: int, s: IoreqServerState | None) -> None:
        """Fill or empty server slot ``sid`` (create, destroy): routes may change."""
        self.ioreq_servers[sid] = s
        RoutingEpoch.bump()

    def select_ioreq_server(self, rtype: int, first: int, last: int) -> IoreqServerState | None:
        """``ioreq_server_select`` (xen/common/ioreq.c): the server an access of range type
        ``rtype`` covering ``[first, last]`` goes to, or None (Xen's null handler then).

        Servers are tried from the highest id down (``FOR_EACH_IOREQ_SERVER`` iterates
        backwards; ids are handed out lowest-free first), disabled ones skipped, and a
        server takes the access only if one of its ranges holds all of it
        (``rangeset_contains_range``).  The answer is remembered until the routing epoch
        moves (a range, a server or its enabled state changed).  Call with the host lock.
        """
        routes = self._routes
        if self._routes_epoch != RoutingEpoch.value:
            routes.clear()
            self._routes_epoch = RoutingEpoch.value
        key = (rtype, first, last)
        try:
            return routes[key]
        except KeyError:
            pass
        found = None
        for s in reversed(self.ioreq_servers):
            if s is not None and s.enabled and s.ranges[rtype].contains(first, last):
                found = s
                break
        if len(routes) >= ROUTE_CACHE_SIZE:
            routes.clear()
        routes[key] = found
        return found

    @property
    def servers(self) -> dict[int, IoreqServerState]:
        return {s.id: s for s in self.ioreq_servers if s is not None}

    def p2m_type(self, gfn: int) -> int | None:
        entry = self.p2m.get(gfn)
        return None if entry is None else entry.type

    @property
    def p2m_ioreq_entry_count(self) -> int:
        """``p2m->ioreq.entry_count``: gfns still typed p2m_ioreq_server."""
        entries = self.p2m.touched() if isinstance(self.p2m, P2m) else self.p2m.values()
        return sum(1 for e in entries if e.type == HVMMEM_ioreq_server)

    def snapshot(self) -> dict[str, Any]:
        """Everything a DMOP or privcmd call can change (page contents excepted)."""
        return {
            "domid": self.domid,
            "dying": self.dying,
            "shutdown_reason": self.shutdown_reason,
            "servers": tuple(s.snapshot() if s else None for s in self.ioreq_servers),
            "ioreq_gfn_free": tuple(self.ioreq_gfn_free + self.ioreq_gfn_legacy_free),
            "p2m": tuple(sorted((g, e.type, e.page.index if e.page else None) for g, e in self.p2m.items())),
            "dirty": frozenset(self.dirty),
            "vram": self.vram,
            "vram_dirty": frozenset(self.vram_dirty),
            "irq": (self.isa_irq, self.pci_intx, tuple(self.gsi_assert_count)),
            "links": (tuple(self.pci_link_route), tuple(self.pci_link_assert_count)),
            "msis": tuple(self.msis),
            "emu_pirqs": frozenset(self.emu_pirqs),
            "events": tuple(tuple(sorted(v.pending_event.items())) if v.pending_event else None for v in self.vcpus),
            "p2m_ioreq": (self.p2m_ioreq_server, self.p2m_ioreq_flags),
            "cacheattr": tuple(self.cacheattr),
            "irq_levels": tuple(sorted(self.irq_levels.items())),
            "spi_injections": tuple(sorted(self.spi_injections.items())),
            "ports": tuple(p.snapshot() for _, p in sorted(self.ports.items())),
        }
