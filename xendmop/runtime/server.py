"""``IoreqServer``: one ioreq server of one domain, brought up and torn down as Xen
requires, and the loops (epoll and asyncio) that serve one or several of them.

Bring-up (the order of QEMU's ``xen_register_ioreq``/``xen_map_ioreq_server`` and of
varstored; reference §6): ``create_ioreq_server`` → map the pages by resource
(``IOCTL_PRIVCMD_MMAP_RESOURCE``), falling back to legacy gfns +
``IOCTL_PRIVCMD_MMAPBATCH_V2`` only when resource mapping is missing (EOPNOTSUPP or
ENOTTY) and never mixing the two → ``set_ioreq_server_state(enabled)`` → read each
vCPU's ``vp_eport`` and bind one event channel per vCPU (plus the buffered port) →
register the device ranges.  Teardown runs in reverse — unbind → disable → unmap →
destroy — on ``close()``, on leaving ``with``/``async with``, on an exception, and
when the loop stops for SIGTERM/SIGINT: Xen does not free a server when its device
model dies, and a leaked one holds one of the domain's 8 slots.

Takeover (``IoreqServer(..., takeover=ID)``): a device model started after another one
of the same server died attaches to server ``ID`` instead of creating one.  What it
rests on, on Xen and Linux:

* The server outlives its device model: Xen frees it only on ``destroy_ioreq_server``
  or with the domain (``ioreq_server_destroy``/``ioreq_server_destroy_all`` in
  xen/common/ioreq.c); it belongs to the emulating domain (dom0), not to a process, so
  a new process of dom0 passes every op's ``s->emulator == current->domain`` check.
* Its pages map again by id: ``IOCTL_PRIVCMD_MMAP_RESOURCE`` (drivers/xen/privcmd.c
  ``privcmd_ioctl_mmap_resource``) → ``XENMEM_acquire_resource`` → ``acquire_ioreq_server``
  / ``ioreq_server_get_frame``, whose ``ioreq_server_alloc_mfn`` returns the frames already
  allocated: the same domheap pages every time.  Only this path: a server brought up on
  legacy gfns had them taken out of the guest's p2m when it was enabled
  (``arch_ioreq_server_enable`` → ``hvm_remove_ioreq_gfn``, xen/arch/x86/hvm/ioreq.c), so they
  cannot be mapped by gfn again: a takeover needs resource mapping (Xen 4.11, Linux 4.18).
* Its ports can be bound again: the dead process's evtchn fd is released
  (drivers/xen/evtchn.c ``evtchn_release`` → ``evtchn_unbind_from_user`` →
  ``unbind_from_irqhandler``, which closes the port, drivers/xen/events/events_base.c),
  and ``evtchn_close`` (xen/common/event_channel.c) puts each guest-side port back to
  ECS_UNBOUND with dom0 as its remote domain, which ``evtchn_bind_interdomain`` accepts.
  A vCPU's notification sent meanwhile was dropped (``notify_via_xen_event_channel``
  raises only an ECS_INTERDOMAIN port), so the new device model looks at every slot
  (``Dispatcher.resume_slot``) rather than waiting for events.
* A waiting vCPU's slot is still READY, or INPROCESS if the dead one had taken it
  (``wait_for_io`` in xen/common/ioreq.c only reads it), and an answer + notify
  releases the vCPU as any other.

Ranges added before ``start()`` are registered again, one refused with EEXIST (already in
the server's rangeset) counting as registered: so a predecessor killed half-way through its
bring-up leaves nothing missing.  The DMOPs cannot read Xen's rangesets back, so a range the
previous device model registered and this one does not add stays routed to the server.  The
server stays enabled throughout (``set_ioreq_server_state`` is issued again, a no-op in Xen
for an enabled server).
``detach()`` is the other half: let go of the server without destroying it (a planned
handover, or a test standing in for a crash).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import platform
import select
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from types import FrameType, TracebackType
from typing import Any

from ..abi.ioreq_slot import IOREQ_SIZE
from ..abi.memory import XENMEM_resource_ioreq_server
from ..backends.device import PAGE_SIZE, open_device
from ..checks import check_sbdf
from ..depriv import DeprivReport, DropConfig, deprivilege, fail_closed
from ..devicemodel import DeviceModel
from ..errors import XenError
from ..types import BufIoreq
from .dispatch import (
    MAX_REP,
    AtomicAddReadPointer,
    Dispatcher,
    IoDevice,
    ReadPointer,
    Region,
    StoreReadPointer,
)
from .dispatch import trace as ioreq_trace
from .evtchn import EventChannel, open_evtchn_device
from .foreignmemory import ForeignMapping, ForeignMemory, GuestRam
from .pci import PciFunction

log = logging.getLogger("xendmop.runtime")

__all__ = [
    "DOMAIN_GONE_ERRNOS",
    "HOST_GONE_ERRNOS",
    "DomainGone",
    "HostGone",
    "IoreqServer",
    "ServeLoop",
    "TakeoverError",
    "serve_forever",
    "serve_forever_async",
]

#: How Xen answers a DMOP about our own ioreq server once the domain is gone.  ESRCH: the
#: domain no longer exists (``rcu_lock_remote_domain_by_id``, xen/common/domain.c, as
#: ``dm_op`` in xen/arch/x86/hvm/dm.c looks it up).  ENOENT: the domain still exists but is
#: dying, and ``domain_kill`` has already destroyed its ioreq servers
#: (``domain_relinquish_resources`` → ``hvm_domain_relinquish_resources``,
#: xen/arch/x86/hvm/hvm.c → ``ioreq_server_destroy_all``, xen/common/ioreq.c), so
#: ``get_server`` finds no server by our id.  Xen sends no event for either.
DOMAIN_GONE_ERRNOS = frozenset({errno.ESRCH, errno.ENOENT})
#: How a call fails once a mock host process went away (its socket broken): never on real Xen.
HOST_GONE_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNREFUSED})
#: seconds between ``ServeLoop``'s checks that each server's domain (and the host) is still there
WATCH_INTERVAL = 1.0


class DomainGone(Exception):
    """The served domain is gone (destroyed, or dying with its ioreq servers already freed by Xen).

    Raised by ``IoreqServer.check_alive`` and so by ``ServeLoop.run``, after which the servers
    are torn down quietly (what fails then fails only because the domain is gone).  Not an
    error for a device model: a guest powering off ends it, as it ends QEMU (exit 0)."""

    def __init__(self, domid: int, cause: BaseException | None = None) -> None:
        super().__init__(f"dom{domid} is gone (destroyed or powered off)")
        self.domid = domid
        self.cause = cause


class HostGone(ConnectionError):
    """The Xen the server talked to cannot be reached any more: a mock host process that died."""

    def __init__(self, domid: int, cause: BaseException | None = None) -> None:
        why = f": {cause.strerror if isinstance(cause, OSError) and cause.strerror else cause}" if cause else ""
        super().__init__(errno.EPIPE, f"the host serving dom{domid} is gone{why}")
        self.domid = domid
        self.cause = cause


#: errno of MMAP_RESOURCE meaning "no resource mapping here" (QEMU falls back on EOPNOTSUPP;
#: a kernel without the ioctl says ENOTTY, libxenforeignmemory turns that into EOPNOTSUPP).
_NO_RESOURCE = {errno.EOPNOTSUPP, errno.ENOTTY}
#: guest RAM is mapped 64 frames (256 KiB) at a time, at most 4096 frames (16 MiB) kept: a
#: device moving a guest's buffers (virtio-blk's 4 KiB segments) then pays one MMAPBATCH per
#: group, where a page at a time was one per page, and as many munmaps
RAM_BUCKET_FRAMES, RAM_CACHE_FRAMES = 64, 4096
_X86 = {"x86_64", "amd64", "i386", "i686"}
_warned_arch = False


def _warn_arch() -> None:
    global _warned_arch
    if not _warned_arch and platform.machine().lower() not in _X86:
        log.warning(
            "xendmop runtime on %s: the ioreq protocol needs memory barriers pure Python cannot "
            "issue on weakly ordered CPUs (see xendmop.runtime.dispatch)",
            platform.machine(),
        )
        _warned_arch = True


class TakeoverError(RuntimeError):
    """``IoreqServer(takeover=...)`` cannot attach to server ``server_id`` of ``domid``: ``why``."""

    def __init__(self, domid: int, server_id: int, why: str) -> None:
        super().__init__(f"dom{domid}: cannot take over ioreq server {server_id}: {why}")
        self.domid = domid
        self.server_id = server_id
        self.why = why


class IoreqServer:
    """An ioreq server for ``domid`` with the devices registered on it.

    ``dm``: the ``DeviceModel`` handle that issues the DMOPs (not closed here).
    ``opener``: opens ``/dev/xen/privcmd`` and ``/dev/xen/evtchn`` (the mock host's
    ``open_device``); by default the way ``dm`` opened its own (the real devices, or the
    mock's that ``DeviceModel.open("mock", ...)`` was given).  ``bufioreq``: OFF by default;
    LEGACY drains the ring with plain stores; ATOMIC needs libatomic (see
    ``dispatch.StoreReadPointer``).  ``restrict``: restrict this server's privcmd and
    evtchn handles to ``domid`` before creating anything.
    ``handles``: ``"device"`` opens the devices itself (through ``opener``);
    ``"libxen"`` uses libxenforeignmemory and libxenevtchn (``backends.libxen_handles``).

    ``takeover``: the id of an existing server of ``domid`` whose device model is gone;
    ``start()`` then attaches to it instead of creating one (module docstring), and answers
    the slots the previous device model left (``Dispatcher.resume_slot``).
    ``on_created(server)``: called as soon as the server's id is known (created or taken
    over), before anything else is set up: where a restart state records it.

    Register devices with ``add_port_range``/``add_mmio_range``/``add_pci`` before
    or after ``start()``; then ``serve_forever()`` or ``async with``.
    """

    def __init__(
        self,
        dm: DeviceModel,
        domid: int,
        *,
        bufioreq: BufIoreq = BufIoreq.OFF,
        opener: Callable[[str], Any] | None = None,
        nr_vcpus: int | None = None,
        restrict: bool = False,
        max_rep: int = MAX_REP,
        on_timeoffset: Callable[[int], None] | None = None,
        deprivilege: DropConfig | None = None,
        handles: str = "device",
        takeover: int | None = None,
        on_created: Callable[[IoreqServer], None] | None = None,
    ) -> None:
        if takeover is not None and (isinstance(takeover, bool) or not isinstance(takeover, int)):
            raise TypeError(f"takeover={takeover!r}: expected an ioreq server id (int)")
        if takeover is not None and not 0 <= takeover <= 0xFFFF:
            raise ValueError(f"takeover={takeover}: not an ioreq server id (ioservid_t, 0..65535)")
        if handles not in ("device", "libxen"):
            raise ValueError(f"handles={handles!r}: must be 'device' or 'libxen'")
        if handles == "libxen" and opener is not None:
            raise ValueError("handles='libxen' opens no device: it cannot take an opener")
        self._handles = handles
        if opener is None and handles == "device":
            # Reach Xen the way the DeviceModel does: a DeviceModel opened on a mock (in this
            # process or a mock host's) hands its opener on, so privcmd and evtchn are the mock's.
            opener = dm.backend.host_opener
        if deprivilege is not None:
            deprivilege.validate()  # DeprivConfigError now, before anything exists in Xen
        self.dm = dm
        self._drop = deprivilege
        self.depriv_report: DeprivReport | None = None
        self.domid = domid
        self.bufioreq = BufIoreq(bufioreq)
        self._opener = opener
        self._nr_vcpus = nr_vcpus
        self._restrict = restrict
        self.dispatcher = Dispatcher(None, max_rep=max_rep, on_timeoffset=on_timeoffset)
        self._pointer: ReadPointer = AtomicAddReadPointer() if self.bufioreq == BufIoreq.ATOMIC else StoreReadPointer()
        self.id: int | None = None
        self.page: memoryview | None = None
        self.bufpage: memoryview | None = None
        self.legacy_gfns = False
        self.enabled = False
        self._fmem: ForeignMemory | None = None
        self._evtchn: EventChannel | None = None
        self._ram: GuestRam | None = None
        self._maps: list[ForeignMapping] = []
        self._vcpu_by_port: dict[int, int] = {}
        self.vcpu_ports: list[int] = []
        self.buf_port: int | None = None
        self._xen_ranges: list[tuple[str, tuple[int, ...]]] = []  # (kind, args) registered in Xen
        self._pci: dict[int, IoDevice] = {}
        self._lock = threading.RLock()  # one thread serves; close() may come from another
        self.takeover = takeover
        self._on_created = on_created
        #: slots answered or notified again at a takeover (READY, INPROCESS or IORESP_READY ones)
        self.resumed: list[int] = []
        #: ``"domain"`` once ``check_alive`` found the domain gone, ``"host"`` once the host; teardown is then quiet
        self.gone: str | None = None
        self._unwatchable = False  # check_alive's question was refused for another reason: not asked again

    # --- bring-up ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.id is not None and self._evtchn is not None

    def start(self) -> IoreqServer:
        """Bring the server up (see the module docstring); on failure undo what was done and raise."""
        if self.id is not None:
            return self
        _warn_arch()
        try:
            self._start()
        except BaseException:
            if self.takeover is not None:
                self.detach()  # not ours to destroy: another attempt (or device model) may take it
            else:
                self.close()
            raise
        if self._drop is not None:
            self._deprivilege(self._drop)
        return self

    def _deprivilege(self, config: DropConfig) -> None:
        """Restrict every handle this server uses to its domain, then drop privileges."""
        with fail_closed():
            handles = {"devicemodel": self.dm, "foreignmemory": self._fmem, "evtchn": self._evtchn}
            self.depriv_report = deprivilege(self.domid, handles, config)  # type: ignore[arg-type]
        log.info("dom%d: deprivileged to uid %s gid %s", self.domid, config.uid, config.gid)

    def _start(self) -> None:
        opener = self._opener
        if self._handles == "libxen":
            from typing import cast

            from ..backends.libxen_handles import LibxenEventChannel, LibxenForeignMemory

            # Same methods and errors as ForeignMemory/EventChannel; duck-typed, as backends/ cannot import runtime/.
            libdir = self.dm.backend.libdir  # the DeviceModel's library directory, if libxen
            self._fmem = cast(ForeignMemory, LibxenForeignMemory(libdir))
            self._evtchn = cast(EventChannel, LibxenEventChannel(libdir))
        else:
            self._fmem = ForeignMemory(opener or open_device)
            self._evtchn = EventChannel(opener or open_evtchn_device)
        if self._restrict:
            self._fmem.restrict(self.domid)
            self._evtchn.restrict(self.domid)
        nr_vcpus = self._nr_vcpus if self._nr_vcpus is not None else self.dm.nr_vcpus(self.domid)
        if not 0 < nr_vcpus <= PAGE_SIZE // IOREQ_SIZE:
            raise ValueError(f"dom{self.domid}: {nr_vcpus} vCPUs do not fit one ioreq page")
        if self.takeover is None:
            self.id = self.dm.create_ioreq_server(self.domid, self.bufioreq)
        else:
            self.id = self.takeover
        if self._on_created is not None:
            self._on_created(self)
        buf_port = self._map_pages()
        self.dm.set_ioreq_server_state(self.domid, self.id, True)
        self.enabled = True
        assert self.page is not None
        # vp_eport is Xen's end of each vCPU's channel, written by ioreq_server_update_evtchn on enable.
        for vcpu in range(nr_vcpus):
            remote = int.from_bytes(self.page[vcpu * IOREQ_SIZE + 24 : vcpu * IOREQ_SIZE + 28], "little")
            local = self._bind(remote, f"vCPU {vcpu}'s port")
            self.vcpu_ports.append(local)
            self._vcpu_by_port[local] = vcpu
        if buf_port is not None and self.bufpage is not None:
            self.buf_port = self._bind(buf_port, "the buffered port")
        self._ram = GuestRam(self._fmem, self.domid, max_pages=RAM_CACHE_FRAMES, bucket=RAM_BUCKET_FRAMES)
        self.dispatcher.memory = self._ram
        for kind, region in self._regions():
            self._registered(partial(self._xen_map, kind, region.start, region.end), (kind, (region.start, region.end)))
        for sbdf in self._pci:
            self._registered(partial(self._xen_map_pci, sbdf), ("pci", (sbdf,)))
        for device in self._pci.values():
            if isinstance(device, PciFunction):
                device.update_mappings()
        log.info(
            "dom%d: ioreq server %d %s (%s pages, %d vCPUs, bufioreq %s)",
            self.domid,
            self.id,
            "up" if self.takeover is None else "taken over",
            "legacy gfn" if self.legacy_gfns else "resource",
            nr_vcpus,
            self.bufioreq.name,
        )
        if self.takeover is not None:
            self._resume()

    def _registered(self, register: Callable[[], None], entry: tuple[str, tuple[int, ...]]) -> None:
        """Register a range; on a takeover one the previous device model registered is kept:
        ``rangeset_add_range`` refuses an overlap within one server with EEXIST
        (``ioreq_server_map_io_range``, xen/common/ioreq.c), and a predecessor killed before it
        registered them all leaves the rest to do."""
        try:
            register()
        except XenError as e:
            if self.takeover is None or e.errno != errno.EEXIST:
                raise
            self._xen_ranges.append(entry)

    def _bind(self, remote: int, what: str) -> int:
        assert self._evtchn is not None
        try:
            return self._evtchn.bind_interdomain(self.domid, remote)
        except XenError as e:
            if self.takeover is None or e.errno != errno.EINVAL:
                raise
            # evtchn_bind_interdomain: EINVAL unless the port is ECS_UNBOUND towards dom0
            raise TakeoverError(
                self.domid, self.takeover, f"{what} {remote} is not free to bind (is its device model still running?)"
            ) from e

    def _resume(self) -> None:
        """Answer what the previous device model left: every vCPU's slot, then the buffered ring."""
        assert self._evtchn is not None and self.page is not None
        for vcpu, port in enumerate(self.vcpu_ports):
            if self.dispatcher.resume_slot(self.page, vcpu):
                self._evtchn.notify(port)
                self.resumed.append(vcpu)
        if self.bufpage is not None:
            self.drain_buffered()
        if self.resumed:
            log.info("dom%d: ioreq server %d: answered vCPU(s) %s left waiting", self.domid, self.id, self.resumed)

    def detach(self) -> None:
        """Let go of the server without destroying it: unbind the ports, unmap the pages, close
        the handles, and leave the server enabled with its ranges in Xen, for a device model
        started with ``takeover=`` this server's id (a planned handover; what a crash leaves)."""
        with self._lock:
            self.enabled = False  # not disabled in Xen: nothing is sent
            self.id = None  # nor destroyed
            self._close()

    def _map_pages(self) -> int | None:
        """Map the ioreq (and buffered) page; return Xen's buffered port or None."""
        assert self._fmem is not None and self.id is not None
        buf = self.bufioreq != BufIoreq.OFF
        try:
            # Frame 0 is the buffered page, frame 1 the synchronous one (XENMEM_resource_ioreq_server_frame_*).
            m = self._fmem.map_resource(
                self.domid, XENMEM_resource_ioreq_server, self.id, 0 if buf else 1, 2 if buf else 1
            )
        except XenError as e:
            if e.errno not in _NO_RESOURCE:
                raise
            log.info("dom%d: no resource mapping (%s); using legacy gfns", self.domid, e)
            return self._map_legacy(buf)
        self._maps.append(m)
        self.page = m.view[PAGE_SIZE : 2 * PAGE_SIZE] if buf else m.view[:PAGE_SIZE]
        self.bufpage = m.view[:PAGE_SIZE] if buf else None
        return self.dm.get_ioreq_server_info(self.domid, self.id).bufioreq_port if buf else None

    def _map_legacy(self, buf: bool) -> int | None:
        assert self._fmem is not None and self.id is not None
        info = self.dm.get_ioreq_server_info(self.domid, self.id, gfns=True)
        gfns = [info.ioreq_gfn] + ([info.bufioreq_gfn] if buf else [])
        if any(g is None for g in gfns):
            raise XenError(errno.EINVAL, "get_ioreq_server_info", self.domid, {"gfns": str(gfns)}, layer="runtime")
        m = self._fmem.map(self.domid, [g for g in gfns if g is not None])
        self._maps.append(m)
        if not m.ok:
            raise XenError(-min(m.errors), "map", self.domid, {"gfns": str(gfns)}, layer="privcmd")
        self.legacy_gfns = True
        self.page = m.view[:PAGE_SIZE]
        self.bufpage = m.view[PAGE_SIZE : 2 * PAGE_SIZE] if buf else None
        return info.bufioreq_port if buf else None

    # --- is the domain still there? ------------------------------------------------------

    def check_alive(self) -> None:
        """Ask Xen about this server (``get_ioreq_server_info`` without gfns: nothing is
        allocated or mapped); raise ``DomainGone`` when it answers that the domain or the
        server is gone (``DOMAIN_GONE_ERRNOS``), ``HostGone`` when a mock host process is
        gone (``HOST_GONE_ERRNOS``).  Any other refusal is logged once and the server is not
        asked again (serving goes on).  Nothing on a server not started.  ``ServeLoop``
        calls it every ``WATCH_INTERVAL`` seconds."""
        sid = self.id
        if sid is None or self._unwatchable:
            return
        try:
            # A server on legacy gfns asks for them again (Xen before 4.12 has no XEN_DMOP_no_gfns
            # flag: its pad must be 0); one on resource-mapped pages must not ask for gfns.
            self.dm.get_ioreq_server_info(self.domid, sid, gfns=self.legacy_gfns)
        except XenError as e:
            if e.errno in DOMAIN_GONE_ERRNOS:
                self.gone = "domain"
                raise DomainGone(self.domid, e) from None
            if e.errno in HOST_GONE_ERRNOS:
                self.gone = "host"
                raise HostGone(self.domid, e) from None
            # Anything else says nothing about the domain: keep serving, without the watch.
            self._unwatchable = True
            log.warning(
                "dom%d: cannot ask Xen about ioreq server %d (%s); its end will not be noticed", self.domid, sid, e
            )

    def _quiet(self, e: BaseException) -> bool:
        """Whether a teardown failure is only the consequence of the domain or the host being gone."""
        if self.gone == "host":
            return True
        return self.gone == "domain" and isinstance(e, OSError) and e.errno in DOMAIN_GONE_ERRNOS

    # --- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        """Tear down in reverse; idempotent; logs failures instead of raising over the
        error that may have brought us here."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        def step(what: str, fn: Callable[[], object]) -> bool:
            try:
                fn()
            except Exception as e:
                level = logging.DEBUG if self._quiet(e) else logging.ERROR
                log.log(level, "dom%d: ioreq server %s: %s failed: %s", self.domid, self.id, what, e)
                return False
            return True

        evtchn, self._evtchn = self._evtchn, None
        if evtchn is not None:
            for port in [*self.vcpu_ports, *([self.buf_port] if self.buf_port is not None else [])]:
                step(f"unbind {port}", lambda p=port: evtchn.unbind(p))  # type: ignore[misc]
            step("close evtchn", evtchn.close)
        self.vcpu_ports, self.buf_port, self._vcpu_by_port = [], None, {}
        sid = self.id
        if sid is not None and self.enabled:
            step("disable", lambda: self.dm.set_ioreq_server_state(self.domid, sid, False))
        self.enabled = False
        for view in (self.page, self.bufpage):
            if view is not None:
                view.release()
        self.page = self.bufpage = None
        self.dispatcher.memory = None
        if self._ram is not None:
            step("drop guest mappings", self._ram.close)
            self._ram = None
        fmem, self._fmem = self._fmem, None
        for m in self._maps:
            if fmem is not None:
                step("unmap pages", lambda m=m: fmem.unmap(m))  # type: ignore[misc]
        self._maps = []
        if sid is not None:
            if step("destroy", lambda: self.dm.destroy_ioreq_server(self.domid, sid)):  # also frees its ranges
                log.info("dom%d: ioreq server %d destroyed", self.domid, sid)
        self.id = None
        self._xen_ranges = []
        if fmem is not None:
            step("close privcmd", fmem.close)

    def __enter__(self) -> IoreqServer:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # --- asyncio ---------------------------------------------------------------------------

    async def __aenter__(self) -> IoreqServer:
        self.start()
        loop = asyncio.get_running_loop()
        loop.add_reader(self.fileno(), self.handle_events)
        self._aloop: asyncio.AbstractEventLoop | None = loop
        self._tick: asyncio.TimerHandle | None = loop.call_later(0.1, self._atick) if self.bufpage else None
        return self

    def _atick(self) -> None:  # QEMU's 100 ms buffered-io timer
        if self.bufpage is not None and self._aloop is not None:
            self.drain_buffered()
            self._tick = self._aloop.call_later(0.1, self._atick)

    async def __aexit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        loop, self._aloop = getattr(self, "_aloop", None), None
        if getattr(self, "_tick", None) is not None:
            self._tick.cancel()  # type: ignore[union-attr]
        if loop is not None and self._evtchn is not None:
            loop.remove_reader(self._evtchn.fileno())
        self.close()

    # --- the loop core (shared by ServeLoop and asyncio) ----------------------------------------

    def fileno(self) -> int:
        """The evtchn fd: readable when a vCPU or the buffered ring needs us."""
        if self._evtchn is None:
            raise ValueError("ioreq server is not running")
        return self._evtchn.fileno()

    def handle_events(self) -> int:
        """Handle the pending event channels (bounded per call); return how many."""
        with self._lock:
            evtchn, page = self._evtchn, self.page
            if evtchn is None or page is None:
                return 0
            limit = 4 * (len(self.vcpu_ports) + 1)  # bounded: other servers get their turn
            handled = 0
            while True:
                # One read takes every pending port (the fd is level-triggered: ports that
                # arrive later wake the loop again), so no read fails just to say "empty".
                try:
                    ports = evtchn.pending_ports(limit - handled)
                    break
                except XenError as e:
                    if e.errno != errno.EFBIG:
                        raise
                    # The kernel's ring overflowed and lost ports: reset and look at every slot.
                    log.warning("dom%d: event ring overflow; rescanning all vCPUs", self.domid)
                    evtchn.reset()
                    self._rescan(evtchn, page)
                    handled += 1
                    if handled >= limit:
                        return handled
            unmask, notify, handle_slot = evtchn.unmask, evtchn.notify, self._slot_handler()
            vcpu_by_port, buffered = self._vcpu_by_port, self.bufpage is not None
            for port in ports:
                # Unmask before handling, as QEMU's cpu_get_ioreq: an event raised from here
                # on is delivered again, so none is lost.  The notify comes after
                # handle_slot's last store (IORESP_READY): a syscall (on the mock, a call
                # under the GIL) orders it after every store before it (see dispatch's
                # docstring), so Xen never sees the event before the answer.
                unmask(port)
                if buffered:
                    self.drain_buffered()
                vcpu = vcpu_by_port.get(port)
                if vcpu is not None and handle_slot(page, vcpu):
                    notify(port)
            return handled + len(ports)

    def _slot_handler(self) -> Callable[[memoryview, int], bool]:
        """``handle_slot``, or its tracing form while the ``xendmop.ioreq`` logger is on at DEBUG."""
        if ioreq_trace.isEnabledFor(logging.DEBUG):
            return self.dispatcher.handle_slot_traced
        return self.dispatcher.handle_slot

    def _rescan(self, evtchn: EventChannel, page: memoryview) -> None:
        handle_slot = self._slot_handler()
        for vcpu, port in enumerate(self.vcpu_ports):
            evtchn.unmask(port)
            if handle_slot(page, vcpu):
                evtchn.notify(port)

    def drain_buffered(self) -> int:
        """Drain the buffered ring (on every event and on a 100 ms tick)."""
        with self._lock:
            if self.bufpage is None:
                return 0
            return self.dispatcher.drain_buffered(self.bufpage, self._pointer)

    def serve_forever(self, *, handle_signals: bool = True) -> int | None:
        """Serve until SIGTERM/SIGINT or ``stop``; then tear down.  Returns the signal, if any."""
        return serve_forever(self, handle_signals=handle_signals)

    # --- registering devices -------------------------------------------------------------

    def _regions(self) -> list[tuple[str, Region]]:
        return [("port", r) for r in self.dispatcher.ports] + [("mmio", r) for r in self.dispatcher.mmio]

    def _xen_map(self, kind: str, start: int, end: int) -> None:
        if self.id is None:
            return
        self.dm.map_io_range_to_ioreq_server(self.domid, self.id, kind == "mmio", start, end)
        self._xen_ranges.append((kind, (start, end)))

    def _xen_unmap(self, kind: str, start: int, end: int) -> None:
        if self.id is None or (kind, (start, end)) not in self._xen_ranges:
            return
        self._xen_ranges.remove((kind, (start, end)))
        self.dm.unmap_io_range_from_ioreq_server(self.domid, self.id, kind == "mmio", start, end)

    def _xen_map_pci(self, sbdf: int) -> None:
        if self.id is None:
            return
        seg, bus, dev, fn = sbdf >> 16, (sbdf >> 8) & 0xFF, (sbdf >> 3) & 0x1F, sbdf & 7
        self.dm.map_pcidev_to_ioreq_server(self.domid, self.id, seg, bus, dev, fn)
        self._xen_ranges.append(("pci", (sbdf,)))

    def _add(self, kind: str, start: int, end: int, device: IoDevice, name: str) -> None:
        table = self.dispatcher.mmio if kind == "mmio" else self.dispatcher.ports
        with self._lock:
            table.add(start, end, device, name)
            try:
                self._xen_map(kind, start, end)
            except BaseException:
                table.remove(start, end)
                raise

    def add_port_range(self, start: int, end: int, device: IoDevice, name: str = "") -> None:
        """Route guest ports ``[start, end]`` to ``device`` (offsets from ``start``)."""
        if start > end:
            raise ValueError(f"port range [{start:#x}, {end:#x}] is reversed: the first port comes first")
        if not 0 <= start <= end <= 0xFFFF:
            raise ValueError(f"port range [{start:#x}, {end:#x}] outside 0..0xffff")
        self._add("port", start, end, device, name)

    def add_mmio_range(self, start: int, end: int, device: IoDevice, name: str = "") -> None:
        """Route guest-physical ``[start, end]`` to ``device`` (offsets from ``start``)."""
        if start > end:
            raise ValueError(f"MMIO range [{start:#x}, {end:#x}] is reversed: the first address comes first")
        self._add("mmio", start, end, device, name)

    def remove_range(self, is_mmio: bool, start: int, end: int) -> None:
        kind = "mmio" if is_mmio else "port"
        with self._lock:
            (self.dispatcher.mmio if is_mmio else self.dispatcher.ports).remove(start, end)
            self._xen_unmap(kind, start, end)

    def add_pci(
        self, device: IoDevice, *, bus: int = 0, slot: int, function: int = 0, segment: int = 0, name: str = ""
    ) -> int:
        """Route config space of ``segment:bus:slot.function`` to ``device``; a
        ``PciFunction`` also gets its BARs mapped and its interrupts wired.  Returns the SBDF."""
        # The check DeviceModel.map_pcidev_to_ioreq_server makes: a part out of its field would
        # alias another function (slot 32 is 01:00.0) in the dispatcher and in Xen alike.
        sbdf = check_sbdf("add_pci", segment, bus, slot, function, ("segment", "bus", "slot", "function"))
        with self._lock:
            self.dispatcher.add_pci(sbdf, device, name)
            self._pci[sbdf] = device
            try:
                self._xen_map_pci(sbdf)
            except BaseException:
                self.dispatcher.remove_pci(sbdf)
                del self._pci[sbdf]
                raise
            if isinstance(device, PciFunction):
                device.host, device.sbdf = self, sbdf
                if self.running:
                    device.update_mappings()
        return sbdf

    # --- PciHost: what PciFunction calls ---------------------------------------------------------

    def map_bar(self, fn: PciFunction, index: int, start: int) -> None:
        bar = fn.bars[index]
        assert bar is not None
        name = f"{type(fn).__name__} {fn.sbdf or 0:#x} BAR{index}"
        self._add("port" if bar.io else "mmio", start, start + bar.size - 1, bar.device, name)

    def unmap_bar(self, fn: PciFunction, index: int, start: int) -> None:
        bar = fn.bars[index]
        assert bar is not None
        self.remove_range(not bar.io, start, start + bar.size - 1)

    def set_intx(self, fn: PciFunction, level: bool) -> None:
        sbdf = fn.sbdf or 0
        pin = fn.read(0x3D, 1)
        self.dm.set_pci_intx_level(self.domid, sbdf >> 16, (sbdf >> 8) & 0xFF, (sbdf >> 3) & 0x1F, pin - 1, int(level))

    def inject_msi(self, fn: PciFunction, addr: int, data: int) -> None:
        self.dm.inject_msi(self.domid, addr, data)

    def set_irq_level(self, irq: int, level: int) -> None:
        """Drive the guest's interrupt line ``irq`` (an Arm SPI: ``XEN_DMOP_set_irq_level``)."""
        self.dm.set_irq_level(self.domid, irq, level)

    def __repr__(self) -> str:
        return f"<IoreqServer dom{self.domid} id={self.id} {'running' if self.running else 'stopped'}>"


class ServeLoop:
    """An epoll loop over several servers (one process, several domains).

    ``stop()`` is safe from any thread and from signal handlers.  When ``run``
    returns — stopped, signalled or by an exception — every server is closed.

    The loop sleeps until an event channel, a reader or the wake-up fires; it wakes by
    itself only for the next ``watch`` and, when a server has a buffered ring, every
    ``tick`` seconds (default 0.1) to drain it, as QEMU's buffered-io timer does.

    Xen tells a device model nothing when its domain is destroyed, so every ``watch``
    seconds (default ``WATCH_INTERVAL``; None: never) the loop asks Xen whether each
    server is still there (``IoreqServer.check_alive``, one DMOP), and also at once when
    a callback fails with an errno that may mean so; ``run`` then raises ``DomainGone``
    (or ``HostGone`` for a mock host process that died) after a quiet teardown.
    """

    def __init__(self, *servers: IoreqServer, tick: float = 0.1, watch: float | None = WATCH_INTERVAL) -> None:
        self.servers = servers
        self.tick = tick
        self.watch = watch
        self.signal: int | None = None
        self._stop = False
        # The wake-up eventfd lives only while run() does: a loop never run leaks nothing,
        # and stop() after run() cannot write into an fd number since reused (a tap, a socket).
        self._wake = -1
        self._wake_lock = threading.Lock()
        self._readers: dict[int, Callable[[], object]] = {}
        self._soon: list[Callable[[], object]] = []  # call_soon's callbacks for the end of this round
        self._poller: select.epoll | None = None  # while run() runs
        self._handlers: dict[int, Callable[[], object]] = {}  # while run() runs: every watched fd's callback

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None:
        """Also watch ``fd`` (a device's backend: a tap, a pty, a socket): ``callback()``
        runs in the loop's thread when it is readable, between ioreqs, never during one.
        Call before ``run``, or from a callback in the loop's thread."""
        if fd in self._readers:
            raise ValueError(f"fd {fd} is already watched by this loop")
        probe = select.epoll()  # refuse now what epoll refuses later (regular files, /dev/null: EPERM)
        try:
            probe.register(fd, select.EPOLLIN)
        except OSError as e:
            raise ValueError(f"fd {fd} cannot be watched by the loop: {e.strerror}; read it whole instead") from None
        finally:
            probe.close()
        self._readers[fd] = callback
        if self._poller is not None:
            self._poller.register(fd, select.EPOLLIN)
            self._handlers[fd] = callback

    def call_soon(self, callback: Callable[[], object]) -> None:
        """Run ``callback()`` in the loop's thread once the events that woke the loop are
        handled (every ioreq among them answered), before it waits again; one added by such a
        callback runs after the next round's events, which the loop then only polls for (no
        wait).  Call from a callback or a server's handler in the loop's thread.  Unlike a
        reader on an eventfd, this makes no syscall: nothing is written, polled or read."""
        self._soon.append(callback)

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd`` (before ``run``, or from a callback in the loop's thread)."""
        if self._readers.pop(fd, None) is None:
            raise ValueError(f"fd {fd} is not watched by this loop")
        if self._poller is not None:
            self._poller.unregister(fd)
            del self._handlers[fd]

    def stop(self) -> None:
        self._stop = True
        with self._wake_lock:  # not while run() is closing the fd
            self._poke()

    def _poke(self) -> None:
        fd = self._wake
        if fd >= 0:
            try:
                os.eventfd_write(fd, 1)
            except OSError:  # counter saturated: the loop is being woken anyway
                pass

    def on_signal(self, signum: int, frame: FrameType | None = None) -> None:
        """A signal handler that stops the loop and records ``signum`` (what ``run`` installs
        for SIGINT/SIGTERM; a program may install it for longer, as ``app.serve_until_signal``)."""
        self._on_signal(signum, frame)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag and a wake-up: the access in progress completes before teardown.
        # No lock: the handler runs in the main thread, which may hold it in run()'s finally.
        self.signal = signum
        self._stop = True
        self._poke()

    def _check_alive(self) -> None:
        for s in self.servers:
            s.check_alive()

    def run(self, *, handle_signals: bool = True) -> int | None:
        """Start the servers, serve until ``stop()`` or SIGTERM/SIGINT (returns the signal, or
        None), close every server.  Raises ``DomainGone``/``HostGone`` when a server's domain or
        its host went away (see the class), and what a server or callback raised."""
        previous: dict[signal.Signals, Any] = {}
        # One epoll for everything: each server's event channel, the wake-up and the readers.
        # A wake-up is one epoll.poll and a dict lookup, a reader's too (no second epoll to
        # ask which reader: in a PV dom0 every syscall is a trip through Xen).
        poller = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        handlers = self._handlers
        handlers.clear()
        try:
            if handle_signals and threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGTERM, signal.SIGINT):
                    previous[sig] = signal.signal(sig, self._on_signal)
            for s in self.servers:
                s.start()
                poller.register(s.fileno(), select.EPOLLIN)
                handlers[s.fileno()] = s.handle_events
            wake = self._wake
            poller.register(wake, select.EPOLLIN)
            for fd, callback in self._readers.items():
                poller.register(fd, select.EPOLLIN)
                handlers[fd] = callback
            self._poller = poller
            # Only a buffered ring needs the loop to wake by itself (QEMU's 100 ms timer); else
            # it sleeps until an event, a reader or the next watch: an idle device model costs
            # its dom0 nothing, where ten wake-ups a second, each a scheduling trip through Xen,
            # took dom0 time from every other device model and from the guest's own vCPUs.
            buffered = any(s.bufpage is not None for s in self.servers)
            poll, tick, handler_for = poller.poll, self.tick if buffered else None, handlers.get
            watch, monotonic = self.watch, time.monotonic
            next_check = monotonic() + watch if watch is not None else None
            while not self._stop:
                if self._soon:
                    timeout: float | None = 0
                elif next_check is None:
                    timeout = tick
                else:
                    timeout = max(0.0, next_check - monotonic())
                    if tick is not None and tick < timeout:
                        timeout = tick
                ready = poll(timeout)
                try:
                    for fd, _events in ready:
                        handle = handler_for(fd)
                        if fd == wake:
                            try:
                                os.eventfd_read(wake)
                            except BlockingIOError:
                                pass
                        elif handle is not None:  # None: a reader removed by a callback this round
                            handle()
                    if self._soon:  # those of this round; what they add waits for the next
                        soon, self._soon = self._soon, []
                        for callback in soon:
                            callback()
                    if not ready and buffered:
                        for s in self.servers:
                            s.drain_buffered()
                except OSError as e:
                    if e.errno in DOMAIN_GONE_ERRNOS or e.errno in HOST_GONE_ERRNOS:
                        self._check_alive()  # a domain or host gone explains it: DomainGone or HostGone
                    raise
                if next_check is not None and monotonic() >= next_check:
                    self._check_alive()
                    next_check = monotonic() + (watch or 0.0)
            return self.signal
        finally:
            self._poller = None
            handlers.clear()
            poller.close()
            for s in reversed(self.servers):
                s.close()  # before the previous handlers are back: a second signal cannot break the teardown
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            with self._wake_lock:
                fd, self._wake = self._wake, -1
                os.close(fd)


def serve_forever(*servers: IoreqServer, handle_signals: bool = True) -> int | None:
    """Serve ``servers`` until SIGTERM/SIGINT; tear them all down; return the signal."""
    return ServeLoop(*servers).run(handle_signals=handle_signals)


def _finish(done: asyncio.Future[int | None], signum: int) -> None:
    if not done.done():
        done.set_result(signum)


async def serve_forever_async(
    *servers: IoreqServer, handle_signals: bool = True, watch: float | None = WATCH_INTERVAL
) -> int | None:
    """The asyncio form: readers on each server's fd; returns on SIGTERM/SIGINT (the
    signal) or raises ``CancelledError`` when cancelled; servers are closed either way.
    As ``ServeLoop``, every ``watch`` seconds it asks Xen whether each server's domain is
    still there, and raises ``DomainGone`` (``HostGone``) after a quiet teardown if not."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int | None] = loop.create_future()
    installed: list[signal.Signals] = []
    entered: list[IoreqServer] = []

    async def watching(interval: float) -> None:
        try:
            while True:
                await asyncio.sleep(interval)
                for s in entered:
                    s.check_alive()
        except (DomainGone, HostGone, OSError) as e:
            if not done.done():
                done.set_exception(e)

    watcher: asyncio.Task[None] | None = None
    try:
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(sig, _finish, done, int(sig))
                    installed.append(sig)
                except (NotImplementedError, RuntimeError):  # not the main thread
                    pass
        for s in servers:
            await s.__aenter__()
            entered.append(s)
        if watch is not None:
            watcher = loop.create_task(watching(watch))
        return await done
    finally:
        if watcher is not None:
            watcher.cancel()
        for sig in installed:
            loop.remove_signal_handler(sig)
        for s in reversed(entered):
            await s.__aexit__(None, None, None)
        for s in servers:
            s.close()
