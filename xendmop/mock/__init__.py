"""A simulated Xen host (hypervisor + dom0 kernel) behind the real device interface.

``MockXen().open_device(path)`` gives objects with the same interface as the real
``/dev/xen/privcmd``, ``/dev/xen/hypercall`` and ``/dev/xen/evtchn`` (see
``xendmop.backends.device.Device``); ``DeviceModel.open(backend="mock", xen=host)``
runs the same marshalling as on real Xen.  The rules follow Xen's and Linux's
sources function by function (``hypervisor.py``, ``privcmd.py``, ``evtchn.py``).

The calling process is dom0 (the control domain).  ``default_host()`` builds:

- dom0: the control domain (PV, 1 vCPU, no RAM modelled);
- dom1: an HVM guest with 2 vCPUs and 128 MiB, HAP on, log-dirty off;
- dom2: a PV guest with 1 vCPU and 64 MiB (DMOPs to it fail with EINVAL on x86).

Guest memory layout: RAM at gfns ``0 .. nr_pages-1``; then the two legacy ioreq
pages (``HVM_PARAM_IOREQ_PFN``/``BUFIOREQ_PFN``) and ``ioreq_server_pages`` (8)
pages for ``HVM_PARAM_IOREQ_SERVER_PFN``, all RAM-backed and in the p2m.

The host can also run as its own process (``xendmop mock-host --socket PATH``,
``mock.remote``): device models and guests in other processes reach it with
``RemoteXen``/``RemoteGuest`` (``XENDMOP_MOCK_SOCKET``), sharing its pages and event
channels as real fds.  Each device reaches its opener's memory through the ``memory``
object it was opened with (this process's ``UserMemory`` by default).

Internal API for a simulated guest (thread-safe; hold ``xen.lock`` for compound steps):

- ``xen.hypervisor.domains[domid]`` → ``state.Domain``; ``domain.servers`` → {id: ``IoreqServerState``}
- ``server.page`` / ``server.bufpage``: live memoryviews of the shared ioreq pages
  (the same bytes a DM maps with MMAP_RESOURCE); ``server.vcpu_ports[v]``,
  ``server.bufioreq_port``; ``server.ranges[type]`` (``RangeSet``); ``server.enabled``
- ``xen.evtchn_notify_from_xen(domid, port)``: Xen raises a server port (guest posted an ioreq);
  ``xen.evtchn_notify_from_xen_locked(domain, port)`` the same inside a host-lock section
- ``domain.select_ioreq_server(range_type, first, last)``: Xen's routing of an access (cached per domain)
- ``server.wait_dm_notify(vcpu, timeout)`` / ``server.dm_notify_count[v]``: the DM's NOTIFY
  (``server.notify_fd(v)``: the eventfd behind it, readable while a notify is not taken)
- ``xen.guest_write(domid, gpa, data)`` / ``xen.guest_read(domid, gpa, n)``: guest RAM, marks dirty
"""

from __future__ import annotations

import collections
import errno
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from ..abi import evtchn as _evtchn_abi
from ..abi import privcmd as _privcmd_abi
from ..abi.evtchn import EVTCHN_PATH
from ..abi.hvm import HVMMEM_ram_ro
from ..abi.privcmd import HYPERCALL_PATH, PRIVCMD_PATH
from ..ops import OPS
from .evtchn import MockEvtchnDevice
from .hypervisor import DEFAULT_XEN_VERSION, GUEST_VPL011_SPI, Hypervisor, destroy_server
from .pages import PageStore
from .privcmd import HypercallDevice, PrivcmdDevice
from .state import Domain, IoreqServerState, P2m, Vcpu
from .usermem import PAGE_SIZE, UserMemory

__all__ = ["DomainView", "Event", "EventLog", "IoreqServerState", "MockXen", "default_host"]

#: how many ioctls ``MockXen.events`` keeps (the newest)
EVENT_LOG_SIZE = 10_000

_NAMES = {
    v: k
    for mod in (_privcmd_abi, _evtchn_abi)
    for k, v in vars(mod).items()
    if k.startswith("IOCTL_") and isinstance(v, int)
}
#: legacy ioreq pages (HVM_PARAM_IOREQ_PFN, HVM_PARAM_BUFIOREQ_PFN)
_LEGACY_IOREQ_PAGES = 2


@dataclass(frozen=True)
class Event:
    """One ioctl as the mock saw it: device, request name, decoded arguments, result (0/port or -errno)."""

    device: str
    request: str
    args: dict[str, Any] = field(hash=False)
    result: int


#: what ``EventLog`` keeps per ioctl: device, request number, arguments (or a NOTIFY's port), result
_Record = tuple[str, int, Any, int]
_NOTIFY = _evtchn_abi.IOCTL_EVTCHN_NOTIFY


def _as_event(record: _Record) -> Event:
    device, request, args, result = record
    if args.__class__ is int:  # logged by ``EventLog.notified``: the NOTIFY's port
        args = {"arg": {"port": args}}
    return Event(device, _NAMES.get(request, hex(request)), args, result)


class EventLog(Sequence[Event]):
    """``MockXen.events``: the newest ``maxlen`` ioctls the mock saw, oldest first, as ``Event`` objects.

    An entry is kept as the values it was logged with and made an ``Event`` when read, so
    logging is one tuple appended (the evtchn NOTIFY that follows every ioreq keeps just
    its port); each read builds a new ``Event`` with the same content.  Appends and reads
    are each one step under the GIL: a reader never sees a half-written entry."""

    def __init__(self, maxlen: int) -> None:
        self._records: collections.deque[_Record] = collections.deque(maxlen=maxlen)

    @property
    def maxlen(self) -> int | None:
        return self._records.maxlen

    def log(self, device: str, request: int, args: dict[str, Any], result: int) -> None:
        """One ioctl of ``device`` (``"privcmd"``, ``"evtchn"``): its request number, decoded
        arguments and result (0, a port, or -errno)."""
        self._records.append((device, request, args, result))

    def notified(self, port: int, result: int) -> None:
        """An evtchn ``IOCTL_EVTCHN_NOTIFY`` of ``port``: read back with ``{"arg": {"port": port}}``."""
        self._records.append(("evtchn", _NOTIFY, port, result))

    def clear(self) -> None:
        self._records.clear()

    def __len__(self) -> int:
        return len(self._records)

    @overload
    def __getitem__(self, index: int) -> Event: ...

    @overload
    def __getitem__(self, index: slice) -> list[Event]: ...

    def __getitem__(self, index: int | slice) -> Event | list[Event]:
        if isinstance(index, slice):
            return [_as_event(r) for r in list(self._records)[index]]
        return _as_event(self._records[index])

    def __iter__(self) -> Iterator[Event]:
        # a copy first (one step): iterating the deque itself fails if an ioctl logs meanwhile
        return map(_as_event, list(self._records))

    def __repr__(self) -> str:
        return f"EventLog({list(self)!r}, maxlen={self.maxlen})"


class DomainView:
    """Read-only view of one domain's state (``xen.domain(domid)``)."""

    def __init__(self, domain: Domain) -> None:
        self._d = domain

    def __getattr__(self, name: str) -> Any:
        snap = self._d.snapshot()
        if name in snap:
            return snap[name]
        if name in ("hvm", "max_vcpus", "nr_pages", "hap", "log_dirty", "max_mapped_pfn", "iommu"):
            return getattr(self._d, name)
        raise AttributeError(name)

    def snapshot(self) -> dict[str, Any]:
        return self._d.snapshot()

    def server(self, sid: int) -> dict[str, Any] | None:
        s = self._d.server(sid)
        return s.snapshot() if s else None

    def gsi_level(self, gsi: int) -> bool:
        """The line as the vIOAPIC sees it: asserted by at least one source."""
        return self._d.gsi_assert_count[gsi] > 0

    def mem_type(self, gfn: int) -> int | None:
        return self._d.p2m_type(gfn)


class MockXen:
    """A simulated host; the process calling it is dom0.

    Options: ``arch`` ("x86" or "arm"), privcmd module parameters
    ``dm_op_max_nr_bufs``/``dm_op_buf_max_size``, ``dm_op_ioctl=False`` for a kernel
    without IOCTL_PRIVCMD_DM_OP (callers fall back to IOCTL_PRIVCMD_HYPERCALL),
    ``hypercall_device=False`` for a kernel without ``/dev/xen/hypercall``,
    ``paddr_bits``, ``vgic_num_irqs`` (Arm), ``ioreq_server_pages``,
    ``xen_version`` (``(4, 17)`` or ``"4.17"``; default ``DEFAULT_XEN_VERSION``, 4.20): the
    release simulated, from 4.9 (Arm: 4.15); what differs between releases is listed in
    ``xendmop.mock.hypervisor``.

    The host owns real resources (a memfd and a mapping per guest's RAM and per
    ioreq server's pages, an fd per opened device, an eventfd per evtchn open):
    ``close()`` (or ``with MockXen() as host:``) releases all of them.
    """

    def __init__(
        self,
        *,
        arch: str = "x86",
        dm_op_max_nr_bufs: int = 16,
        dm_op_buf_max_size: int = 4096,
        dm_op_ioctl: bool = True,
        hypercall_device: bool = True,
        paddr_bits: int = 46,
        vgic_num_irqs: int = 256,
        ioreq_server_pages: int = 8,
        xen_version: tuple[int, int] | str = DEFAULT_XEN_VERSION,
    ) -> None:
        if arch not in ("x86", "arm"):
            raise ValueError(f"arch must be 'x86' or 'arm', not {arch!r}")
        self.lock = threading.RLock()
        self.arch = arch
        self.dm_op_max_nr_bufs = dm_op_max_nr_bufs
        self.dm_op_buf_max_size = dm_op_buf_max_size
        self.dm_op_ioctl = dm_op_ioctl
        self.hypercall_device = hypercall_device
        self.ioreq_server_pages = ioreq_server_pages
        self.hypervisor = Hypervisor(arch, paddr_bits, vgic_num_irqs, xen_version)
        self.memory = UserMemory()
        # the newest events only: a long-running mock must not grow without bound
        self.events = EventLog(EVENT_LOG_SIZE)
        self.dom0 = Domain(0, hvm=False, max_vcpus=1, nr_pages=0, ram=None, vcpus=[Vcpu(0)])
        self.hypervisor.domains[0] = self.dom0
        #: the domain the calling process runs in (``current->domain`` of its hypercalls)
        self.caller = 0
        self._devices: set[Any] = set()  # opened and not yet closed
        #: evtchn fds whose ring is shared with a client process (``MockEvtchnDevice.share_ring``):
        #: while there is none, a vCPU's access looks for no doorbell
        self.shared_evtchn_rings = 0
        self.closed = False

    # --- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Release every fd and mapping the host owns (idempotent).

        Open devices are closed (evtchn opens unbind their ports), every domain but
        dom0 is destroyed (its ioreq servers' pages and its RAM memfd freed).  The
        host refuses to open devices or create domains afterwards.
        """
        with self.lock:
            if self.closed:
                return
            self.closed = True
            for dev in list(self._devices):
                dev.close()
            self._devices.clear()
            for domid in sorted(self.hypervisor.domains, reverse=True):
                if domid != 0:
                    self.destroy_domain(domid)

    def __enter__(self) -> MockXen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("mock Xen host is closed")

    def _forget(self, device: Any) -> None:
        """A device was closed: the host no longer needs to close it."""
        self._devices.discard(device)

    # --- domains ----------------------------------------------------------------------

    def create_domain(
        self,
        vcpus: int = 1,
        hvm: bool = True,
        memory_mb: int = 64,
        *,
        hap: bool = True,
        log_dirty: bool = False,
        iommu: bool = False,
        target: int | None = None,
        domid: int | None = None,
        vuart: bool = False,
    ) -> int:
        """Create a running domain; return its domid (the lowest free one unless given).

        ``vuart`` (Arm only): the guest has Xen's emulated SBSA UART, as xl's ``vuart =
        "sbsa_uart"`` gives it, whose interrupt, SPI ``GUEST_VPL011_SPI`` (32), Xen reserves
        (xen/arch/arm/vpl011.c, ``domain_vpl011_init``: ``vgic_reserve_virq``)."""
        with self.lock:
            self._check_open()
            if vuart and self.arch != "arm":
                raise ValueError(f"vuart: an SBSA UART is an Arm guest's; this mock is {self.arch}")
            domains = self.hypervisor.domains
            if domid is None:
                domid = next(i for i in range(1, 0x7FF0) if i not in domains)
            if domid in domains or not 0 < domid < 0x7FF0:
                raise ValueError(f"domid {domid} is taken or reserved")
            nr_pages = memory_mb * (1 << 20) // PAGE_SIZE
            special = _LEGACY_IOREQ_PAGES + self.ioreq_server_pages if hvm else 0
            ram = PageStore(f"dom{domid}-ram", nr_pages + special)
            d = Domain(
                domid,
                hvm=hvm,
                max_vcpus=vcpus,
                nr_pages=nr_pages,
                ram=ram,
                hap=hap and hvm,
                log_dirty=log_dirty,
                iommu=iommu,
                target=target,
                vcpus=[Vcpu(i) for i in range(vcpus)],
            )
            d.p2m = P2m(ram, nr_pages + special)  # every page RAM, each entry made on first use
            d.max_mapped_pfn = nr_pages + special - 1
            if hvm:
                d.legacy_gfns = (nr_pages, nr_pages + 1)
                d.ioreq_gfn_legacy_free = list(d.legacy_gfns)
                d.ioreq_gfn_free = list(range(nr_pages + 2, nr_pages + special))
            if vuart:
                d.vgic_allocated.add(GUEST_VPL011_SPI)
            domains[domid] = d
            return domid

    def set_caller(self, domid: int) -> None:
        """Make the calling process run in ``domid`` instead of dom0 (privcmd's hypercalls only).

        Dummy XSM (``xsm_default_action(XSM_DM_PRIV)``, xen/include/xsm/dummy.h) lets a
        DMOP or resource mapping through when ``current->domain->target == d`` (a stub
        domain made with ``create_domain(..., target=guest)``, as
        ``XEN_DOMCTL_set_target`` does) or when the caller is the control domain
        (dom0 here); any other caller gets EPERM.  ``/dev/xen/evtchn`` stays dom0's.
        """
        with self.lock:
            self._dom(domid)
            self.caller = domid

    def set_dying(self, domid: int) -> None:
        """``domain_kill`` first stage: the domain still exists but ``is_dying``."""
        with self.lock:
            self._dom(domid).dying = True

    def destroy_domain(self, domid: int) -> None:
        """Tear a domain down: its ioreq servers, event channels and memory go."""
        with self.lock:
            d = self._dom(domid)
            if domid == 0:
                raise ValueError("dom0 cannot be destroyed")
            d.dying = True
            for s in list(d.servers.values()):
                destroy_server(self.hypervisor, d, s)
            for port in list(d.ports):
                self.hypervisor.close_port(d, port)
            del self.hypervisor.domains[domid]
            if d.ram is not None:
                d.ram.close()

    def set_log_dirty(self, domid: int, enabled: bool = True) -> None:
        """Turn log-dirty mode on or off (the toolstack's XEN_DOMCTL_SHADOW_OP, e.g. migration)."""
        with self.lock:
            d = self._dom(domid)
            d.log_dirty = enabled
            if not enabled:
                d.dirty.clear()

    def domain(self, domid: int) -> DomainView:
        """Read-only view of a domain's state."""
        with self.lock:
            return DomainView(self._dom(domid))

    def _dom(self, domid: int) -> Domain:
        d = self.hypervisor.domains.get(domid)
        if d is None:
            raise LookupError(f"no domain {domid}")
        return d

    # --- guest side (for tests and the simulated guest) -----------------------------------

    def guest_write(self, domid: int, gpa: int, data: bytes) -> None:
        """A guest store to RAM: writes the frames and marks them dirty (log-dirty, VRAM tracking)."""
        with self.lock:
            d = self._dom(domid)
            for off in range(0, len(data)):
                gfn, inpage = divmod(gpa + off, PAGE_SIZE)
                entry = d.p2m.get(gfn)
                if entry is None or entry.page is None or entry.type == HVMMEM_ram_ro:
                    raise ValueError(f"dom{domid}: gpa {gpa + off:#x} is not writable RAM")
                entry.page.view()[inpage] = data[off]
                if d.log_dirty:
                    d.dirty.add(gfn)
                if d.vram and d.vram[0] <= gfn < d.vram[0] + d.vram[1]:
                    d.vram_dirty.add(gfn)

    def guest_read(self, domid: int, gpa: int, nbytes: int) -> bytes:
        with self.lock:
            d = self._dom(domid)
            out = bytearray()
            for off in range(nbytes):
                gfn, inpage = divmod(gpa + off, PAGE_SIZE)
                entry = d.p2m.get(gfn)
                out.append(entry.page.view()[inpage] if entry and entry.page else 0xFF)
            return bytes(out)

    def evtchn_notify_from_xen(self, domid: int, port: int) -> None:
        """``notify_via_xen_event_channel``: Xen raises ``port`` of ``domid`` towards its peer (the DM)."""
        with self.lock:
            self.evtchn_notify_from_xen_locked(self._dom(domid), port)

    def evtchn_notify_from_xen_locked(self, d: Domain, port: int) -> None:
        """``evtchn_notify_from_xen`` for a caller that holds the host lock and has the domain."""
        chn = d.ports.get(port)
        if chn is None:
            raise LookupError(f"dom{d.domid} has no port {port}")
        if chn.state == "interdomain":
            rd = self.hypervisor.domains.get(chn.remote_domid)
            peer = rd.ports.get(chn.remote_port) if rd else None
            if rd is not None and peer is not None:
                self.hypervisor._set_pending(rd, peer)
        else:
            chn.pending = True  # nobody bound yet: seen when the DM binds

    def dm_doorbell_locked(self, d: Domain, port: int, wanted: bool) -> Any:
        """A vCPU of ``d`` starts (``wanted``) or stops waiting for the device model's NOTIFY on
        the dom0 end of ``d``'s ``port``: the ``evtchn.Doorbell`` of the dom0 evtchn fd that bound
        that end, if its client is in another process (``MockEvtchnDevice.want_doorbell``), else
        None.  For a caller that holds the host lock."""
        if not self.shared_evtchn_rings:
            return None
        chn = d.ports.get(port)
        if chn is None or chn.state != "interdomain" or chn.remote_domid != 0:
            return None
        peer = self.dom0.ports.get(chn.remote_port)
        user = None if peer is None else peer.user
        if user is None:
            return None
        return user.want_doorbell(chn.remote_port, wanted)

    def deliver_event(self, domid: int, vcpu: int) -> dict[str, int] | None:
        """The vCPU's next VM entry: take the event latched by inject_event."""
        with self.lock:
            v = self._dom(domid).vcpus[vcpu]
            event, v.pending_event = v.pending_event, None
            return event

    def preempt(self, times: int) -> None:
        """Make ``hypercall_preempt_check()`` answer True ``times`` more times (continuations)."""
        with self.lock:
            self.hypervisor.preempt_budget = times

    # --- dom0 kernel ------------------------------------------------------------------------

    def open_device(self, path: str, *, memory: Any = None) -> Any:
        """Open a mock device file, as ``os.open(path, O_RDWR)`` would on a dom0.

        ``memory``: how the device reaches its opener's memory (``read``/``write``/
        ``clear``/``check_writable``/``remap_pages``, as ``usermem.UserMemory``); by
        default this process's.  ``xendmop.mock.remote`` passes a client process's.
        """
        with self.lock:
            self._check_open()
            dev: PrivcmdDevice | HypercallDevice | MockEvtchnDevice
            if path == PRIVCMD_PATH:
                dev = PrivcmdDevice(self, memory)
            elif path == HYPERCALL_PATH and self.hypercall_device:
                dev = HypercallDevice(self, memory)
            elif path == EVTCHN_PATH:
                dev = MockEvtchnDevice(self, memory)
            else:
                raise FileNotFoundError(errno.ENOENT, f"mock Xen host has no {path}", path)
            self._devices.add(dev)
            return dev

    def foreign_map(self, domid: int, gfns: list[int], addr: int, memory: Any = None) -> list[int]:
        """Map guest frames at ``addr`` page by page into ``memory``'s process (by default
        this one); per-frame ``-errno`` (0 for mapped)."""
        d = self.hypervisor.domains.get(domid)
        errs = []
        pages = []
        for i, gfn in enumerate(gfns):
            entry = d.p2m.get(gfn) if d is not None else None
            if d is None:
                errs.append(-errno.ESRCH)
            elif entry is None or entry.page is None:  # get_page_from_gfn: no page
                errs.append(-errno.EINVAL)
            else:
                pages.append((addr + i * PAGE_SIZE, entry.page.store.fd, entry.page.offset))
                errs.append(0)
        (self.memory if memory is None else memory).remap_pages(pages)
        return errs

    def peek_op(self, bufs: Any, nr_bufs: int, memory: Any = None) -> str | None:
        """For the event log: the op named in bufs[0], if readable (in ``memory``, by default ours)."""
        memory = self.memory if memory is None else memory
        try:
            if isinstance(bufs, int):
                raw = memory.read(bufs, 16)
                addr, size = int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")
            else:
                addr, size = bufs[0]
            op = int.from_bytes(memory.read(addr, 4), "little") if nr_bufs and size >= 4 else None
        except (OSError, IndexError):
            return None
        decl = OPS.get(op) if op is not None else None
        return decl.name if decl else (None if op is None else f"op{op}")

    def log(self, device: str, request: int, args: dict[str, Any], result: int) -> None:
        """Record one ioctl in ``events`` (``EventLog.log``)."""
        self.events.log(device, request, args, result)


def default_host(**options: Any) -> MockXen:
    """The documented default host: dom0, HVM dom1 (2 vCPUs, 128 MiB), PV dom2 (1 vCPU, 64 MiB);
    ``options`` go to ``MockXen`` (e.g. ``xen_version="4.17"``)."""
    host = MockXen(**options)
    host.create_domain(vcpus=2, hvm=True, memory_mb=128)
    host.create_domain(vcpus=1, hvm=False, memory_mb=64)
    return host
