"""The simulated hypervisor: ``do_dm_op`` and one rule per DMOP, in Xen's order.

Every check cites the Xen function it follows (paths relative to xen-project/xen).
The entry point is ``Hypervisor.do_dm_op(caller, domid, nr_bufs, bufs)``; it returns
Xen's ``rc`` (0 or ``-errno``), which the mock privcmd turns into ``OSError`` as
Linux does.  Extra guest buffers are reached only through the op declaration's
``GuestArgs`` slot accessors (``xendmop.ops``), which carry Xen's
``copy_buf_{from,to}_guest`` size checks.

Rules are registered in ``RULES`` by the declaration's name (``@rule("nr_vcpus")``):
adding a DMOP means one declaration in ``ops/table.py`` and one rule here.

The hypervisor simulates one Xen release, ``xen_version`` (major, minor; 4.9, DMOP's first, or
later). What differs between releases is decided by comparing it, each where Xen's code changed
(``Hypervisor.at_least``): which ops exist (the table's ``since``), 4.9/4.10's whole-struct
copy-in, PV targets before 4.15, ``get_ioreq_server_info``'s ``flags`` before 4.11, the resource
hypercall before 4.11 and its size query before 4.15, UC pins from 4.21 and overlapping
``relocate_memory`` from 4.22.  Patch releases are not told apart: the XSA-506 checks apply at every
version (an unfixed release read uninitialised stack there, which no simulation can specify).
"""

from __future__ import annotations

import ctypes
import errno
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..abi.dm_op import XEN_DMOP_DELETE_MEM_CACHEATTR, XEN_DMOP_IOREQ_MEM_ACCESS_WRITE, XEN_DMOP_no_gfns, xen_dm_op
from ..abi.hvm import (
    HVM_IOREQSRV_BUFIOREQ_ATOMIC,
    HVMMEM_ioreq_server,
    HVMMEM_mmio_dm,
    HVMMEM_ram_ro,
    HVMMEM_ram_rw,
    HVMMEM_unused,
)
from ..abi.memory import XENMEM_resource_ioreq_server, XENMEM_resource_ioreq_server_frame_bufioreq
from ..abi.xen import xen_ulong_t
from ..ops import OPS, CallerMemory, CopyBack, GuestArgs
from ..ops.decl import DM_OP_HEADER, OpDecl
from .pages import PageRef, PageStore
from .state import (
    MAX_NR_IOREQ_SERVERS,
    MAX_PINNED_CACHEATTR,
    NR_EVTCHN_PORTS,
    NR_ISA_IRQS,
    Domain,
    EvtchnPort,
    IoreqServerState,
    P2mEntry,
)
from .usermem import PAGE_SIZE

#: Xen's internal ``ERESTART`` (xen/include/public/errno.h): never seen by user space
ERESTART = 85
#: ``GB(1) >> PAGE_SHIFT``: track_dirty_vram's limit (xen/arch/x86/hvm/dm.c)
MAX_VRAM_PAGES = (1 << 30) // PAGE_SIZE
INVALID_GFN = (1 << 64) - 1
#: ``NR_LOCAL_IRQS`` on Arm (SGIs + PPIs)
NR_LOCAL_IRQS = 32
#: the SPI of an Arm guest's emulated SBSA UART (Xen's public/arch-arm.h)
GUEST_VPL011_SPI = 32
#: x86 cache types ``pin_memory_cacheattr`` accepts (X86_MT_*), and those needing an IOMMU
_MT_UNCACHED = {0, 1, 7}  # UC, WC, UCM
_MT_CACHED = {4, 5, 6}  # WT, WP, WB
#: MSI layout (xen/arch/x86/include/asm/msi.h)
_MSI_ADDR_DEST_ID_MASK, _MSI_ADDR_DEST_ID_SHIFT = 0xFF000, 12
_MSI_DATA_DELIVERY_MODE_SHIFT = 8
_DEST_FIXED, _DEST_LOWEST_PRIO = 0, 1
#: the mock's ``d->nr_pirqs`` for HVM guests (map_domain_emuirq_pirq bound)
NR_PIRQS = 256
#: the first release with XEN_DMOP (x86: 524a98c2ac), and the first with it on Arm
#: (xen/arch/arm/dm.c, RELEASE-4.15.0)
OLDEST_XEN_VERSION = {"x86": (4, 9), "arm": (4, 15)}
#: the release simulated unless told otherwise: the newest the lab checks the mock against
#: (integration/test_mock_vs_xen.py on Debian 13's Xen 4.20)
DEFAULT_XEN_VERSION = (4, 20)
#: ``mfn_list[32]`` in 4.11-4.14's acquire_resource (xen/common/memory.c): its per-call limit,
#: which a size query answered
OLD_ACQUIRE_RESOURCE_FRAMES = 32


def parse_xen_version(value: object) -> tuple[int, int]:
    """(major, minor) from a tuple or a string such as ``"4.17"`` or ``"4.20.5-pre"``."""
    if isinstance(value, str):
        found = re.match(r"(\d+)\.(\d+)", value)
        if found is None:
            raise ValueError(f"xen_version={value!r}: expected MAJOR.MINOR, e.g. '4.17'")
        return int(found[1]), int(found[2])
    if isinstance(value, tuple) and len(value) >= 2 and all(isinstance(v, int) for v in value[:2]):
        return value[0], value[1]
    raise ValueError(f"xen_version={value!r}: expected (major, minor) or 'MAJOR.MINOR'")


@dataclass
class Call:
    """One ``dm_op()`` invocation as a rule sees it."""

    hv: Hypervisor
    d: Domain
    caller: int
    args: GuestArgs

    @property
    def op(self) -> Any:
        return self.args.op


Rule = Callable[[Call], int]
RULES: dict[str, Rule] = {}


def rule(name: str) -> Callable[[Rule], Rule]:
    """Register the rule for the op declared as ``name`` (checked against ``ops.OPS`` at import)."""

    def register(fn: Rule) -> Rule:
        if name not in {d.name for d in OPS.values()}:
            raise KeyError(f"no DMOP declared as {name!r}")
        RULES[name] = fn
        return fn

    return register


class Hypervisor:
    """Domains plus the hypercalls a device model reaches (dm_op, acquire_resource, evtchn)."""

    def __init__(
        self,
        arch: str = "x86",
        paddr_bits: int = 46,
        vgic_num_irqs: int = 256,
        xen_version: tuple[int, int] | str = DEFAULT_XEN_VERSION,
    ) -> None:
        self.arch = arch
        self.xen_version = parse_xen_version(xen_version)
        oldest = OLDEST_XEN_VERSION[arch]
        if self.xen_version < oldest:
            raise ValueError(
                f"xen_version={'.'.join(map(str, self.xen_version))}: Xen on {arch} has DMOP from "
                f"{'.'.join(map(str, oldest))} on"
            )
        #: the ops this release's ``dm_op`` has a case for on this architecture (``since``, ``arch``)
        self.ops: dict[int, OpDecl] = {
            n: decl for n, decl in OPS.items() if arch in decl.arch and self.at_least(*decl.since)
        }
        #: ``ARRAY_SIZE(op_size)`` in this release's ``dm_op`` (4.11 on): its highest op + 1
        self.nr_ops = 1 + max(decl.number for decl in OPS.values() if self.at_least(*decl.since))
        self.paddr_bits = paddr_bits
        self.vgic_num_irqs = vgic_num_irqs
        self.domains: dict[int, Domain] = {}
        #: remaining ``hypercall_preempt_check()`` answers of True
        self.preempt_budget = 0
        #: called between continuation rounds (tests use it to model a caller thread
        #: touching the request while Xen is preempted)
        self.on_continuation: Callable[[int], None] | None = None
        self.continuations = 0

    # --- helpers shared by rules ---------------------------------------------------

    def at_least(self, major: int, minor: int) -> bool:
        """Whether the simulated release is ``major.minor`` or newer (where Xen's code changed)."""
        return self.xen_version >= (major, minor)

    def preempt_check(self) -> bool:
        """``hypercall_preempt_check()``: True while the test-set budget lasts."""
        if self.preempt_budget > 0:
            self.preempt_budget -= 1
            return True
        return False

    def lock_remote_domain(self, caller: int, domid: int) -> Domain | int:
        """``rcu_lock_remote_domain_by_id`` (xen/common/domain.c): -ESRCH, or -EPERM for oneself."""
        d = self.domains.get(domid)
        if d is None:
            return -errno.ESRCH
        if domid == caller:
            return -errno.EPERM
        return d

    def xsm_dm_priv(self, caller: int, d: Domain) -> int:
        """Dummy XSM ``xsm_default_action(XSM_DM_PRIV, src, d)`` (xen/include/xsm/dummy.h).

        ``if ( target && src->target == target ) return 0;`` then
        ``if ( is_control_domain(src) ) return 0; return -EPERM;``: the caller is
        ``d``'s device-model domain (its ``target``, set by XEN_DOMCTL_set_target,
        is ``d``) or the control domain (dom0 in the mock).
        """
        src = self.domains.get(caller)
        if src is not None and src.target == d.domid:
            return 0
        if src is not None and caller == 0:  # is_control_domain(src)
            return 0
        return -errno.EPERM

    # --- the hypercall -------------------------------------------------------------

    def do_dm_op(
        self, caller: int, domid: int, nr_bufs: int, bufs: Sequence[tuple[int, int]] | int, memory: CallerMemory
    ) -> int:
        """``do_dm_op`` (xen/common/dm.c) with its continuation loop.

        ``bufs`` is the buffer array already in hypervisor memory (privcmd copied it),
        or the caller's address of it (IOCTL_PRIVCMD_HYPERCALL), read each round as
        ``hypercall_create_continuation`` re-issues the same call.
        """
        while True:
            rc = self._do_dm_op_once(caller, domid & 0xFFFF, nr_bufs & 0xFFFFFFFF, bufs, memory)
            if rc != -ERESTART:
                return rc
            self.continuations += 1
            if self.on_continuation is not None:
                self.on_continuation(self.continuations)

    def _do_dm_op_once(
        self, caller: int, domid: int, nr_bufs: int, bufs: Sequence[tuple[int, int]] | int, memory: CallerMemory
    ) -> int:
        if nr_bufs == 0:  # do_dm_op: XSA-506
            return -errno.ENODATA
        if nr_bufs > 2:  # do_dm_op: ARRAY_SIZE(args.buf)
            return -errno.E2BIG
        if isinstance(bufs, int):  # do_dm_op: copy_from_guest_offset(&args.buf[0], bufs, ...)
            try:
                raw = memory.read(bufs, 16 * nr_bufs)
            except OSError:
                return -errno.EFAULT
            array = (_dm_op_buf * nr_bufs).from_buffer_copy(raw)
            bufs = [(b.h, b.size) for b in array]
        return self.dm_op(caller, domid, list(bufs)[:nr_bufs], memory)

    def dm_op(self, caller: int, domid: int, bufs: list[tuple[int, int]], memory: CallerMemory) -> int:
        """``dm_op`` (xen/arch/x86/hvm/dm.c, xen/arch/arm/dm.c): common checks, rule, copy-back."""
        d = self.lock_remote_domain(caller, domid)
        if isinstance(d, int):
            return d
        if self.arch == "x86" and not d.hvm:  # x86 dm_op: !is_hvm_domain(d)
            # -EINVAL since 4.15 (615367b527); before, rc still held the domain lookup's 0
            return -errno.EINVAL if self.at_least(4, 15) else 0
        rc = self.xsm_dm_priv(caller, d)
        if rc:
            return rc
        addr, size = bufs[0]
        # 4.9/4.10 copied all of struct xen_dm_op in and switched on the op; 4.11 (85cb15dfe4)
        # copies the header, bounds the op by ARRAY_SIZE(op_size), then copies op_size[op] bytes.
        whole = not self.at_least(4, 11)
        if size < (ctypes.sizeof(xen_dm_op) if whole else DM_OP_HEADER):
            return -errno.EFAULT
        try:
            op_no, pad = _header.from_buffer_copy(memory.read(addr, DM_OP_HEADER)).fields()
        except OSError:
            return -errno.EFAULT
        if not whole and op_no >= self.nr_ops:
            return -errno.EOPNOTSUPP
        decl = self.ops.get(op_no)
        op_size = decl.size if decl is not None else 0  # sparse op_size[]
        if not whole and size < DM_OP_HEADER + op_size:
            return -errno.EFAULT
        try:
            copied = ctypes.sizeof(xen_dm_op) - DM_OP_HEADER if whole else op_size
            raw = memory.read(addr + DM_OP_HEADER, copied)[:op_size]
        except OSError:
            return -errno.EFAULT
        if pad:
            return -errno.EINVAL
        if decl is None:  # no case for it: ioreq_server_dm_op's default
            return -errno.EOPNOTSUPP
        op = decl.struct.from_buffer_copy(raw)
        call = Call(self, d, caller, decl.guest_args(op, bufs, memory))
        try:
            rc = RULES[decl.name](call)
        except OSError as e:  # GuestFault from a slot accessor
            rc = -(e.errno or errno.EFAULT)
        copy_back = decl.copy_back is CopyBack.ALWAYS and rc in (0, -ERESTART)
        copy_back |= decl.copy_back is CopyBack.ON_RESTART and rc == -ERESTART
        if copy_back:
            try:
                memory.write(addr + DM_OP_HEADER, bytes(op))
            except OSError:
                rc = -errno.EFAULT
        return rc

    # --- event channels (xen/common/event_channel.c) -------------------------------

    def get_free_port(self, d: Domain) -> int:
        """``get_free_port``: the lowest unused port (0 is never used); -ENOSPC when full."""
        for port in range(1, NR_EVTCHN_PORTS):
            if port not in d.ports:
                return port
        return -errno.ENOSPC

    def alloc_unbound(
        self, d: Domain, remote_domid: int, vcpu: int = 0, consumer: Callable[[], None] | None = None
    ) -> int:
        """``evtchn_alloc_unbound`` / ``alloc_unbound_xen_event_channel``: a port awaiting ``remote_domid``."""
        port = self.get_free_port(d)
        if port > 0:
            d.ports[port] = EvtchnPort(port, "unbound", remote_domid, vcpu=vcpu, xen_consumer=consumer)
        return port

    def bind_interdomain(self, ld: Domain, remote_domid: int, remote_port: int) -> int:
        """``evtchn_bind_interdomain``: connect a new local port to ``remote_domid``'s unbound port."""
        rd = self.domains.get(remote_domid)
        if rd is None:
            return -errno.ESRCH
        rchn = rd.ports.get(remote_port)
        if rchn is None or rchn.state != "unbound" or rchn.remote_domid != ld.domid:
            return -errno.EINVAL
        lport = self.get_free_port(ld)
        if lport < 0:
            return lport
        ld.ports[lport] = EvtchnPort(lport, "interdomain", rd.domid, remote_port)
        rchn.state, rchn.remote_domid, rchn.remote_port = "interdomain", ld.domid, lport
        # evtchn_bind_interdomain (xen/common/event_channel.c) sets the new local port pending
        # *always* ("we may have lost notifications on the remote unbound port"): sends to an
        # unbound port are dropped there.  The mock keeps the notification that was dropped and
        # sets the port pending only then, one spurious event fewer per bind (a known gap: a
        # device model must take a stale event in its stride, and IoreqServer's takeover looks
        # at every slot instead of waiting for one).
        if rchn.pending:
            self._set_pending(ld, ld.ports[lport])
        return lport

    def close_port(self, d: Domain, port: int) -> int:
        """``evtchn_close``: free ``port``; an interdomain peer goes back to unbound."""
        chn = d.ports.pop(port, None)
        if chn is None:
            return -errno.EINVAL
        if chn.state == "interdomain":
            rd = self.domains.get(chn.remote_domid)
            peer = rd.ports.get(chn.remote_port) if rd else None
            if peer is not None and peer.state == "interdomain":
                peer.state, peer.remote_domid, peer.remote_port = "unbound", d.domid, 0
        return 0

    def evtchn_send(self, d: Domain, port: int) -> int:
        """``evtchn_send``: notify the peer of ``port``; sends on an unbound port are dropped."""
        chn = d.ports.get(port)
        if chn is None:
            return -errno.EINVAL
        if chn.state == "interdomain":
            rd = self.domains.get(chn.remote_domid)
            peer = rd.ports.get(chn.remote_port) if rd else None
            if rd is not None and peer is not None:
                if peer.xen_consumer is not None:  # Xen-attached: Xen's handler runs
                    peer.xen_consumer()
                else:
                    self._set_pending(rd, peer)
        elif chn.state == "unbound":
            chn.pending = True  # kept only so a later bind can observe it (mock convenience)
        return 0

    def _set_pending(self, d: Domain, chn: EvtchnPort) -> None:
        chn.pending = True
        if chn.user is not None:  # dom0 port bound through a /dev/xen/evtchn instance
            chn.user.port_pending(chn.port)

    # --- ioreq-server pages (xen/common/ioreq.c, xen/arch/x86/hvm/ioreq.c) -----------

    def map_ioreq_gfn(self, d: Domain, s: IoreqServerState, buf: bool) -> int:
        """``hvm_map_ioreq_gfn``: put the page at a spare guest gfn (legacy get_info path)."""
        if (s.bufioreq_page if buf else s.ioreq_page) is not None:
            # already allocated by ioreq_server_get_frame: no guest frame allowed
            return -errno.EPERM if (s.bufioreq_gfn if buf else s.ioreq_gfn) is None else 0
        if d.dying:
            return -errno.EINVAL
        pool = d.ioreq_gfn_free or d.ioreq_gfn_legacy_free  # hvm_alloc_ioreq_gfn, then the legacy params
        if not pool:
            return -errno.ENOMEM
        gfn = pool.pop(0)
        entry = d.p2m.get(gfn)
        if entry is None or entry.page is None:  # prepare_ring_for_helper: no page there
            _free_ioreq_gfn(d, gfn)
            return -errno.EINVAL
        if buf:
            s.bufioreq_page, s.bufioreq_gfn = entry.page, gfn
        else:
            s.ioreq_page, s.ioreq_gfn = entry.page, gfn
        return 0

    def unmap_ioreq_gfn(self, d: Domain, s: IoreqServerState, buf: bool) -> None:
        """``hvm_unmap_ioreq_gfn``: give the gfn back to the pool."""
        gfn = s.bufioreq_gfn if buf else s.ioreq_gfn
        if gfn is None:
            return
        _free_ioreq_gfn(d, gfn)
        if buf:
            s.bufioreq_page, s.bufioreq_gfn = None, None
        else:
            s.ioreq_page, s.ioreq_gfn = None, None

    def alloc_ioreq_pages(self, s: IoreqServerState) -> int:
        """``ioreq_server_alloc_pages``/``ioreq_server_alloc_mfn``: domheap pages never in the p2m."""
        for buf in (False, True) if s.handles_bufioreq else (False,):
            page = s.bufioreq_page if buf else s.ioreq_page
            if page is not None:
                if (s.bufioreq_gfn if buf else s.ioreq_gfn) is not None:
                    return -errno.EPERM  # already mapped as a legacy gfn
                continue
            if s.store is None:
                s.store = PageStore(f"ioreq-server-{s.id}", 2)
            ref = PageRef(s.store, 0 if buf else 1)  # frame 0 = bufioreq, 1 = ioreq(0)
            ref.store.clear(ref.index)
            if buf:
                s.bufioreq_page = ref
            else:
                s.ioreq_page = ref
        return 0

    def update_evtchn(self, s: IoreqServerState) -> None:
        """``ioreq_server_update_evtchn``: write each vCPU's ``vp_eport`` into its ioreq slot, if the page exists."""
        page = s.page
        if page is None:
            return
        for vcpu, port in enumerate(s.vcpu_ports):
            off = vcpu * 32 + 24  # struct ioreq: vp_eport at 24, 32 bytes per vCPU
            page[off : off + 4] = port.to_bytes(4, "little")

    def acquire_resource(
        self, caller: int, domid: int, rtype: int, rid: int, frame: int, nr_frames: int, query: bool
    ) -> list[PageRef] | int:
        """``acquire_resource`` (xen/common/memory.c): frames of an ioreq server, or their count.

        Returns the frames, the size for a query (as a non-negative int), or ``-errno``.
        """
        if not self.at_least(4, 11):  # XENMEM_acquire_resource came in 4.11 (3f8f12281d): do_memory_op's default
            return -errno.ENOSYS
        if not self.at_least(4, 15):  # 4.11-4.14: a query answers the per-call limit, checked before the domain
            if query:
                return -errno.EINVAL if nr_frames else OLD_ACQUIRE_RESOURCE_FRAMES
            if nr_frames > OLD_ACQUIRE_RESOURCE_FRAMES:
                return -errno.E2BIG
        if frame >> 32 or (frame + nr_frames) >> 32:
            return -errno.EINVAL
        d = self.lock_remote_domain(caller, domid)
        if isinstance(d, int):
            return d
        rc = self.xsm_dm_priv(caller, d)  # xsm_domain_resource_map(XSM_DM_PRIV)
        if rc:
            return rc
        max_frames = 0
        if rtype == XENMEM_resource_ioreq_server and d.hvm:  # ioreq_server_max_frames
            max_frames = 1 + -(-(d.max_vcpus * 32) // PAGE_SIZE)
        if not max_frames:  # resource_max_frames' 0 "is converted to -EINVAL"
            return -errno.EINVAL
        if query:
            return -errno.EINVAL if nr_frames or frame else max_frames
        if nr_frames == 0:  # start_extent >= nr_frames
            return -errno.EINVAL
        return self._acquire_ioreq_server(caller, d, rid, frame, nr_frames)

    def _acquire_ioreq_server(self, caller: int, d: Domain, rid: int, frame: int, nr: int) -> list[PageRef] | int:
        """``acquire_ioreq_server`` + ``ioreq_server_get_frame`` per frame."""
        if rid != rid & 0xFFFF:  # not representable as ioservid_t
            return -errno.EINVAL
        refs: list[PageRef] = []
        for idx in range(frame, frame + nr):
            s = d.server(rid)
            if s is None:
                return -errno.ENOENT
            if s.emulator != caller:
                return -errno.EPERM
            rc = self.alloc_ioreq_pages(s)
            if rc:
                return rc
            if idx == XENMEM_resource_ioreq_server_frame_bufioreq:
                if not s.handles_bufioreq or s.bufioreq_page is None:
                    return -errno.ENOENT
                refs.append(s.bufioreq_page)
            elif idx == 1 and s.ioreq_page is not None:
                refs.append(s.ioreq_page)
            else:
                return -errno.EINVAL
        return refs


class _header(ctypes.Structure):
    _fields_ = [("op", ctypes.c_uint32), ("pad", ctypes.c_uint32)]

    def fields(self) -> tuple[int, int]:
        return int(self.op), int(self.pad)


class _dm_op_buf(ctypes.Structure):
    _fields_ = [("h", ctypes.c_uint64), ("size", xen_ulong_t)]


def _free_ioreq_gfn(d: Domain, gfn: int) -> None:
    """``hvm_free_ioreq_gfn``: back to the legacy params or the per-domain mask."""
    pool = d.ioreq_gfn_legacy_free if gfn in d.legacy_gfns else d.ioreq_gfn_free
    pool.append(gfn)
    pool.sort()


def _server(call: Call, sid: int) -> IoreqServerState | int:
    """The ``get_ioreq_server`` + emulator check every ioreq op makes (xen/common/ioreq.c)."""
    s = call.d.server(sid)
    if s is None:
        return -errno.ENOENT
    if s.emulator != call.caller:
        return -errno.EPERM
    return s


# --- ioreq servers: xen/common/ioreq.c ----------------------------------------------


@rule("create_ioreq_server")
def create_ioreq_server(call: Call) -> int:
    """``ioreq_server_dm_op`` → ``ioreq_server_create`` → ``ioreq_server_init``."""
    data, d, hv = call.op, call.d, call.hv
    if any(data.pad):
        return -errno.EINVAL
    if hv.arch != "x86" and data.handle_bufioreq:
        return -errno.EINVAL
    if data.handle_bufioreq > HVM_IOREQSRV_BUFIOREQ_ATOMIC:
        return -errno.EINVAL
    free = [i for i in range(MAX_NR_IOREQ_SERVERS) if d.ioreq_servers[i] is None]
    if not free:
        return -errno.ENOSPC
    s = IoreqServerState(free[0], call.caller, data.handle_bufioreq, d.max_vcpus)
    rc = _add_vcpus(hv, d, s)
    if rc < 0:
        _remove_vcpus(hv, d, s)
        return rc
    d.set_server(s.id, s)
    data.id = s.id
    return 0


def _add_vcpus(hv: Hypervisor, d: Domain, s: IoreqServerState) -> int:
    """``ioreq_server_add_vcpu`` for each vCPU: one Xen-attached unbound port, plus the buffered one on vCPU0."""
    for v in d.vcpus:
        port = hv.alloc_unbound(d, s.emulator, v.vcpu_id, _dm_notify(s, v.vcpu_id))
        if port < 0:
            return port
        s.vcpu_ports.append(port)
        if v.vcpu_id == 0 and s.handles_bufioreq:
            port = hv.alloc_unbound(d, s.emulator, 0, _dm_notify(s, d.max_vcpus))
            if port < 0:
                return port
            s.bufioreq_port = port
    return 0


def _dm_notify(s: IoreqServerState, index: int) -> Callable[[], None]:
    def notified() -> None:  # Xen's consumer of the ioreq port (ioreq.c): wakes the waiting vCPU
        s.dm_notified(index)

    return notified


def _remove_vcpus(hv: Hypervisor, d: Domain, s: IoreqServerState) -> None:
    """``ioreq_server_remove_all_vcpus``: ``free_xen_event_channel`` for every port."""
    for port in [*s.vcpu_ports, *([s.bufioreq_port] if s.bufioreq_port is not None else [])]:
        hv.close_port(d, port)
    s.vcpu_ports, s.bufioreq_port = [], None


@rule("get_ioreq_server_info")
def get_ioreq_server_info(call: Call) -> int:
    """``ioreq_server_dm_op`` → ``ioreq_server_get_info``."""
    data = call.op
    if data.flags & ~(XEN_DMOP_no_gfns if call.hv.at_least(4, 11) else 0):  # a pad before 4.11 (3fefa0f15d)
        return -errno.EINVAL
    s = _server(call, data.id)
    if isinstance(s, int):
        return s
    want_gfns = not data.flags & XEN_DMOP_no_gfns
    if want_gfns:
        if call.hv.arch != "x86":  # Arm arch_ioreq_server_map_pages
            return -errno.EOPNOTSUPP
        rc = call.hv.map_ioreq_gfn(call.d, s, False)  # arch_ioreq_server_map_pages
        if not rc and s.handles_bufioreq:
            rc = call.hv.map_ioreq_gfn(call.d, s, True)
        if rc:
            call.hv.unmap_ioreq_gfn(call.d, s, False)
            return rc
        data.ioreq_gfn = s.ioreq_gfn if s.ioreq_gfn is not None else INVALID_GFN
    if s.handles_bufioreq:
        if want_gfns:
            data.bufioreq_gfn = s.bufioreq_gfn if s.bufioreq_gfn is not None else INVALID_GFN
        data.bufioreq_port = s.bufioreq_port or 0
    return 0


def _range_set(call: Call, start: int, end: int, sid: int, rtype: int) -> Any:
    if start > end:
        return -errno.EINVAL
    s = _server(call, sid)
    if isinstance(s, int):
        return s
    if rtype >= len(s.ranges):
        return -errno.EINVAL
    return s.ranges[rtype]


@rule("map_io_range_to_ioreq_server")
def map_io_range_to_ioreq_server(call: Call) -> int:
    """``ioreq_server_dm_op`` → ``ioreq_server_map_io_range``."""
    data = call.op
    if data.pad:
        return -errno.EINVAL
    r = _range_set(call, data.start, data.end, data.id, data.type)
    if isinstance(r, int):
        return r
    if r.overlaps(data.start, data.end):
        return -errno.EEXIST
    return int(r.add(data.start, data.end))


@rule("unmap_io_range_from_ioreq_server")
def unmap_io_range_from_ioreq_server(call: Call) -> int:
    """``ioreq_server_dm_op`` → ``ioreq_server_unmap_io_range``."""
    data = call.op
    if data.pad:
        return -errno.EINVAL
    r = _range_set(call, data.start, data.end, data.id, data.type)
    if isinstance(r, int):
        return r
    if not r.contains(data.start, data.end):
        return -errno.ENOENT
    return int(r.remove(data.start, data.end))


@rule("set_ioreq_server_state")
def set_ioreq_server_state(call: Call) -> int:
    """``ioreq_server_dm_op`` → ``ioreq_server_set_state`` → ``ioreq_server_{en,dis}able``."""
    data = call.op
    if data.pad:
        return -errno.EINVAL
    s = _server(call, data.id)
    if isinstance(s, int):
        return s
    if data.enabled:
        _enable(call.hv, call.d, s)
    else:
        _disable(call.d, s)
    return 0


def _enable(hv: Hypervisor, d: Domain, s: IoreqServerState) -> None:
    if s.enabled:
        return
    for ref, gfn in ((s.ioreq_page, s.ioreq_gfn), (s.bufioreq_page, s.bufioreq_gfn)):
        if ref is not None and gfn is not None:  # hvm_remove_ioreq_gfn: out of the p2m, then clear_page
            d.p2m.pop(gfn, None)
            ref.store.clear(ref.index)
    s.enabled = True
    hv.update_evtchn(s)


def _disable(d: Domain, s: IoreqServerState) -> None:
    if not s.enabled:
        return
    for ref, gfn in ((s.bufioreq_page, s.bufioreq_gfn), (s.ioreq_page, s.ioreq_gfn)):
        if ref is not None and gfn is not None:  # hvm_add_ioreq_gfn: clear_page, back into the p2m
            ref.store.clear(ref.index)
            d.p2m[gfn] = P2mEntry(HVMMEM_ram_rw, ref)
    s.enabled = False


@rule("destroy_ioreq_server")
def destroy_ioreq_server(call: Call) -> int:
    """``ioreq_server_dm_op`` → ``ioreq_server_destroy``."""
    data = call.op
    if data.pad:
        return -errno.EINVAL
    s = _server(call, data.id)
    if isinstance(s, int):
        return s
    destroy_server(call.hv, call.d, s)
    return 0


def destroy_server(hv: Hypervisor, d: Domain, s: IoreqServerState) -> None:
    """``ioreq_server_destroy``: drop the p2m claim, disable, free ports, pages and ranges."""
    if d.p2m_ioreq_server == s.id:  # arch_ioreq_server_destroy → p2m_set_ioreq_server(d, 0, s)
        d.p2m_ioreq_server, d.p2m_ioreq_flags = None, 0
    _disable(d, s)
    _remove_vcpus(hv, d, s)
    hv.unmap_ioreq_gfn(d, s, True)  # arch_ioreq_server_unmap_pages
    hv.unmap_ioreq_gfn(d, s, False)
    s.ioreq_page = s.bufioreq_page = None  # ioreq_server_free_pages
    if s.store is not None:
        s.store.close()
        s.store = None
    d.set_server(s.id, None)


# --- interrupts: xen/arch/x86/hvm/dm.c, xen/arch/x86/hvm/irq.c --------------------------


def _isa_gsi(isa_irq: int) -> int:
    """``hvm_isa_irq_to_gsi``: IRQ0 is wired to GSI2."""
    return isa_irq if isa_irq else 2


def _intx_gsi(device: int, intx: int) -> int:
    """``hvm_pci_intx_gsi``."""
    return (((device << 2) + (device >> 3) + intx) & 31) + 16


@rule("set_pci_intx_level")
def set_pci_intx_level(call: Call) -> int:
    """``set_pci_intx_level`` → ``__hvm_pci_intx_{assert,deassert}``."""
    data, d = call.op, call.d
    if data.domain != 0 or data.bus != 0 or data.device > 0x1F or data.intx > 3:
        return -errno.EINVAL
    if data.level not in (0, 1):
        return -errno.EINVAL
    bit = 1 << (data.device * 4 + data.intx)
    if bool(d.pci_intx & bit) == bool(data.level):  # __test_and_{set,clear}_bit: no change
        return 0
    d.pci_intx ^= bit
    step = 1 if data.level else -1
    d.gsi_assert_count[_intx_gsi(data.device, data.intx)] += step
    link = (data.device + data.intx) & 3  # hvm_pci_intx_link
    isa_irq = d.pci_link_route[link]
    before = d.pci_link_assert_count[link]
    d.pci_link_assert_count[link] += step
    if isa_irq and ((step > 0 and before == 0) or (step < 0 and before == 1)):
        d.gsi_assert_count[isa_irq] += step
    return 0


@rule("set_isa_irq_level")
def set_isa_irq_level(call: Call) -> int:
    """``set_isa_irq_level`` → ``hvm_isa_irq_{assert,deassert}``."""
    data, d = call.op, call.d
    if data.isa_irq >= NR_ISA_IRQS:
        return -errno.EINVAL
    if data.level not in (0, 1):
        return -errno.EINVAL
    bit = 1 << data.isa_irq
    if bool(d.isa_irq & bit) != bool(data.level):
        d.isa_irq ^= bit
        d.gsi_assert_count[_isa_gsi(data.isa_irq)] += 1 if data.level else -1
    return 0


@rule("set_pci_link_route")
def set_pci_link_route(call: Call) -> int:
    """``hvm_set_pci_link_route``: move an asserted link's contribution to the new ISA IRQ."""
    data, d = call.op, call.d
    if data.link > 3 or data.isa_irq >= NR_ISA_IRQS:
        return -errno.EINVAL
    old = d.pci_link_route[data.link]
    if old == data.isa_irq:
        return 0
    d.pci_link_route[data.link] = data.isa_irq
    if d.pci_link_assert_count[data.link]:
        if old:
            d.gsi_assert_count[old] -= 1
        if data.isa_irq:
            d.gsi_assert_count[data.isa_irq] += 1
    return 0


@rule("inject_event")
def inject_event(call: Call) -> int:
    """x86 ``dm_op`` case + ``inject_event``: one latched event per vCPU (-EBUSY)."""
    data, d = call.op, call.d
    if data.pad0 or data.pad1:
        return -errno.EINVAL
    if data.vcpuid >= d.max_vcpus or data.vcpuid >= len(d.vcpus):
        return -errno.EINVAL
    v = d.vcpus[data.vcpuid]
    if v.pending_event is not None:  # cmpxchg(vector, UNSET, UPDATING) failed
        return -errno.EBUSY
    v.pending_event = {
        "vector": data.vector,
        "type": data.type,
        "insn_len": data.insn_len,
        "error_code": data.error_code,
        "cr2": data.cr2,
    }
    return 0


@rule("inject_msi")
def inject_msi(call: Call) -> int:
    """``hvm_inject_msi``: vector 0 is a Xen PIRQ (emulated), else ``vmsi_deliver``."""
    data, d = call.op, call.d
    if data.pad:
        return -errno.EINVAL
    dest = (data.addr & _MSI_ADDR_DEST_ID_MASK) >> _MSI_ADDR_DEST_ID_SHIFT
    if data.data & 0xFF == 0:
        pirq = ((data.addr >> 32) & 0xFFFFFF00) | dest
        if pirq == 0:
            return -errno.ERANGE
        if pirq not in d.emu_pirqs:
            if pirq >= NR_PIRQS:  # map_domain_emuirq_pirq: pirq >= d->nr_pirqs
                return -errno.EINVAL
            d.emu_pirqs.add(pirq)
    elif (data.data >> _MSI_DATA_DELIVERY_MODE_SHIFT) & 7 not in (_DEST_FIXED, _DEST_LOWEST_PRIO):
        return -errno.EINVAL  # vmsi_deliver: unsupported delivery mode
    d.msis.append((int(data.addr), int(data.data)))
    return 0


@rule("set_irq_level")
def set_irq_level(call: Call) -> int:
    """Arm ``dm_op`` case ``XEN_DMOP_set_irq_level`` (xen/arch/arm/dm.c); never reached on x86."""
    data, d = call.op, call.d
    if data.irq < NR_LOCAL_IRQS or data.irq >= call.hv.vgic_num_irqs:
        return -errno.EINVAL
    if data.level not in (0, 1):
        return -errno.EINVAL
    if any(data.pad):
        return -errno.EINVAL
    if data.irq in d.vgic_allocated:  # "only for non-allocated interrupts"
        return -errno.EINVAL
    d.irq_levels[data.irq] = data.level
    if data.level:  # vgic_inject_irq: "we always ignore a falling edge"; a rising one is injected
        d.spi_injections[data.irq] = d.spi_injections.get(data.irq, 0) + 1
    return 0


# --- memory: xen/arch/x86/hvm/dm.c, xen/arch/x86/mm/ -----------------------------------


@rule("track_dirty_vram")
def track_dirty_vram(call: Call) -> int:
    """x86 ``dm_op`` case + ``track_dirty_vram`` + ``hap_track_dirty_vram``."""
    data, d, args = call.op, call.d, call.args
    if data.pad:
        return -errno.EINVAL
    if args.nr_bufs < 2:
        return -errno.EINVAL
    if data.nr > MAX_VRAM_PAGES:
        return -errno.EINVAL
    if d.dying:
        return -errno.ESRCH
    if not d.max_vcpus or not d.vcpus:
        return -errno.EINVAL
    bitmap = args["dirty_bitmap"]
    size = (data.nr + 7) // 8
    if size > bitmap.size:
        return -errno.EINVAL
    if data.nr == 0:  # stop tracking
        d.vram, d.vram_dirty = None, set()
        return 0
    # hap_track_dirty_vram (xen/arch/x86/mm/hap/hap.c) turns only the range's p2m entries
    # to logdirty; the domain's log-dirty mode stays off (measured on 4.17.7: modified_memory
    # still returns 0 at once afterwards; integration/scenarios.py "dirty vram, then modified memory").
    first, nr = int(data.first_pfn), int(data.nr)
    if d.vram != (first, nr):  # a new range: arm it, report every page dirty
        d.vram, d.vram_dirty = (first, nr), set()
        out = bytearray(b"\xff" * size)
    else:  # paging_log_dirty_range: pages written since the last call, re-armed
        out = bytearray(size)
        for pfn in d.vram_dirty:
            i = pfn - first
            out[i >> 3] |= 1 << (i & 7)
        d.vram_dirty = set()
    bitmap.write(bytes(out))
    return 0


@rule("modified_memory")
def modified_memory(call: Call) -> int:
    """x86 ``dm_op`` case + ``modified_memory``: extents last to first, 256-pfn batches."""
    header, d, args = call.op, call.d, call.args
    if args.nr_bufs != 2:  # XSA-506
        return -errno.EINVAL
    if not d.log_dirty:  # !paging_mode_log_dirty(d): nothing is read
        return 0
    extents = args["extents"]
    if extents.count < header.nr_extents:
        return -errno.EINVAL
    batch_rem = 0x100
    while header.nr_extents > 0:
        extent = extents.read(header.nr_extents - 1)
        if extent.pad:
            return -errno.EINVAL
        end = extent.first_pfn + extent.nr
        if end <= extent.first_pfn or end > d.max_mapped_pfn:
            return -errno.EINVAL  # (Xen compares the exclusive end with the max gpfn)
        if header.opaque >= extent.nr:
            return -errno.EINVAL
        pfn = extent.first_pfn + header.opaque
        batch = extent.nr - header.opaque
        if batch > batch_rem:
            batch = batch_rem
            header.opaque += batch
            end = pfn + batch
        else:
            header.nr_extents -= 1
            header.opaque = 0
        batch_rem -= batch
        for gfn in range(pfn, end):
            entry = d.p2m.get(gfn)
            if entry is not None and entry.page is not None:  # get_page_from_gfn
                d.dirty.add(gfn)  # paging_mark_pfn_dirty
        if batch_rem == 0 and header.nr_extents > 0:
            if call.hv.preempt_check():
                return -ERESTART
            batch_rem = 0x100
    return 0


def _allow_type_change(old: int | None, new: int) -> bool:
    """``allow_p2m_type_change`` (xen/arch/x86/hvm/dm.c)."""
    if new == HVMMEM_ioreq_server:
        return old == HVMMEM_ram_rw
    if old == HVMMEM_ioreq_server:
        return new == HVMMEM_ram_rw
    is_ram = old in (HVMMEM_ram_rw, HVMMEM_ram_ro)
    is_hole = old is None or old == HVMMEM_mmio_dm
    return is_ram or (is_hole and new == HVMMEM_mmio_dm)


@rule("set_mem_type")
def set_mem_type(call: Call) -> int:
    """x86 ``dm_op`` case + ``set_mem_type``: per page, no rollback, continuation every 256."""
    data, d = call.op, call.d
    if data.pad:
        return -errno.EINVAL
    last = (data.first_pfn + data.nr - 1) & INVALID_GFN  # xen_pfn_t arithmetic wraps
    if data.first_pfn > last or last > d.max_mapped_pfn:
        return -errno.EINVAL
    if data.mem_type > HVMMEM_ioreq_server or data.mem_type == HVMMEM_unused:
        return -errno.EINVAL
    new = int(data.mem_type)
    if new == HVMMEM_ioreq_server:
        if not d.hap:
            return -errno.EOPNOTSUPP
        if d.p2m_ioreq_server is None:  # p2m_get_ioreq_server
            return -errno.EINVAL
    it = 0
    while it < data.nr:
        pfn = data.first_pfn + it
        entry = d.p2m.get(pfn)
        old = None if entry is None else entry.type
        if not _allow_type_change(old, new):
            return -errno.EINVAL
        if entry is None:
            d.p2m[pfn] = P2mEntry(new, None)
        else:
            entry.type = new
        it += 1
        if it < data.nr and it & 0xFF == 0 and call.hv.preempt_check():
            data.first_pfn += it
            data.nr -= it
            return -ERESTART
    return 0


@rule("map_mem_type_to_ioreq_server")
def map_mem_type_to_ioreq_server(call: Call) -> int:
    """x86 ``dm_op`` case + ``ioreq_server_map_mem_type`` + ``p2m_set_ioreq_server``."""
    data, d = call.op, call.d
    if not d.hap:
        return -errno.EOPNOTSUPP
    first_gfn = int(data.opaque)
    rc = _map_mem_type(call) if first_gfn == 0 else 0
    if rc == 0 and data.flags == 0:  # reset leftover p2m_ioreq_server entries, 256 at a time
        while d.p2m_ioreq_entry_count and first_gfn <= d.max_mapped_pfn:
            for gfn in range(first_gfn, first_gfn + 256):  # p2m_finish_type_change
                entry = d.p2m.get(gfn)
                if entry is not None and entry.type == HVMMEM_ioreq_server:
                    entry.type = HVMMEM_ram_rw
            first_gfn += 256
            if first_gfn <= d.max_mapped_pfn and call.hv.preempt_check():
                data.opaque = first_gfn
                return -ERESTART
    return rc


def _map_mem_type(call: Call) -> int:
    data, d = call.op, call.d
    if data.type != HVMMEM_ioreq_server:
        return -errno.EINVAL
    if data.flags & ~XEN_DMOP_IOREQ_MEM_ACCESS_WRITE:
        return -errno.EINVAL
    s = _server(call, data.id)
    if isinstance(s, int):
        return s
    if data.flags == 0:  # p2m_set_ioreq_server: unmap
        if d.p2m_ioreq_server != s.id:
            return -errno.EINVAL
        d.p2m_ioreq_server, d.p2m_ioreq_flags = None, 0
        return 0
    if d.p2m_ioreq_server is not None or d.p2m_ioreq_entry_count:
        return -errno.EBUSY
    d.p2m_ioreq_server, d.p2m_ioreq_flags = s.id, int(data.flags)
    return 0


@rule("remote_shutdown")
def remote_shutdown(call: Call) -> int:
    """x86 ``dm_op`` case → ``domain_shutdown`` (reason is a u8 there; the first one sticks)."""
    if call.d.shutdown_reason is None:
        call.d.shutdown_reason = call.op.reason & 0xFF
    return 0


@rule("relocate_memory")
def relocate_memory(call: Call) -> int:
    """x86 ``dm_op`` case + ``xenmem_add_to_physmap`` (gmfn_range) (xen/common/memory.c)."""
    data, d = call.op, call.d
    if data.pad:
        return -errno.EINVAL
    size, idx, gpfn = int(data.size), int(data.src_gfn), int(data.dst_gfn)
    if gpfn == INVALID_GFN:
        return -errno.EINVAL
    if gpfn + size > INVALID_GFN + 1 or idx + size > INVALID_GFN + 1:
        return -errno.EOVERFLOW
    adjust = 1
    # overlap with dst above src: backwards since 4.22 (7acc7dd36b); before, forwards, moving a
    # page twice
    if idx < gpfn < idx + size and call.hv.at_least(4, 22):
        adjust, idx, gpfn = -1, idx + size - 1, gpfn + size - 1
    done, rc = 0, 0
    while size > done:
        rc = _add_to_physmap_one(d, idx, gpfn)
        if rc < 0:
            return rc
        idx, gpfn = idx + adjust, gpfn + adjust
        done += 1
        if size > done and ((done >= 16 and d.iommu) or call.hv.preempt_check()):
            rc = done
            break
    if rc > 0:  # dm.c: advance the request and continue
        data.size -= rc
        data.src_gfn, data.dst_gfn = idx, gpfn
        return -ERESTART
    return 0


def _add_to_physmap_one(d: Domain, src: int, dst: int) -> int:
    """x86 ``xenmem_add_to_physmap_one`` (XENMAPSPACE_gmfn): move the RAM page at ``src`` to ``dst``."""
    entry = d.p2m.get(src)
    if entry is None or entry.page is None or entry.type not in (HVMMEM_ram_rw, HVMMEM_ram_ro):
        return -errno.EINVAL
    if src == dst:  # mock: nothing to move
        return 0
    d.p2m.pop(dst, None)  # the previous mapping at dst is removed
    del d.p2m[src]
    d.p2m[dst] = P2mEntry(HVMMEM_ram_rw, entry.page)  # guest_physmap_add_page: p2m_ram_rw
    d.max_mapped_pfn = max(d.max_mapped_pfn, dst)
    return 0


@rule("pin_memory_cacheattr")
def pin_memory_cacheattr(call: Call) -> int:
    """x86 ``dm_op`` case + ``hvm_set_mem_pinned_cacheattr`` (xen/arch/x86/hvm/mtrr.c)."""
    data, d = call.op, call.d
    if data.pad:
        return -errno.EINVAL
    start, end, mtype = int(data.start), int(data.end), int(data.type)
    if not d.hvm:
        return -errno.EOPNOTSUPP
    if end < start or (start | end) >> call.hv.paddr_bits:
        return -errno.EINVAL
    if mtype == XEN_DMOP_DELETE_MEM_CACHEATTR:
        for i, (s, e, _) in enumerate(d.cacheattr):
            if (s, e) == (start, end):
                del d.cacheattr[i]
                return 0
        return -errno.ENOENT
    if mtype in _MT_UNCACHED:
        # From 4.21 (d63b2c60f7) Xen refuses UC/UCM/WC for a domain without an IOMMU or
        # cache-flush permission (!is_iommu_enabled(d) && !cache_flush_permitted(d)); 4.17 and
        # 4.20 accept them (measured in the lab).
        if call.hv.at_least(4, 21) and not d.iommu:
            return -errno.EPERM
    elif mtype not in _MT_CACHED:
        return -errno.EINVAL
    for i, (s, e, _) in enumerate(d.cacheattr):
        if (s, e) == (start, end):
            d.cacheattr[i] = (s, e, mtype)
            return 0
        if s <= end and start <= e:
            return -errno.EBUSY
    if len(d.cacheattr) >= MAX_PINNED_CACHEATTR:
        return -errno.ENOSPC
    d.cacheattr.append((start, end, mtype))
    return 0


@rule("nr_vcpus")
def nr_vcpus(call: Call) -> int:
    """x86/Arm ``dm_op`` case ``XEN_DMOP_nr_vcpus``: ``d->max_vcpus``."""
    call.op.vcpus = call.d.max_vcpus
    return 0


_missing = {d.name for d in OPS.values()} - set(RULES)
if _missing:  # every declared op has its rule: checked once, at import
    raise ImportError(f"mock hypervisor lacks rules for {sorted(_missing)}")
# ram_ro is listed so a reader sees every type the rules handle
_TYPES = (HVMMEM_ram_rw, HVMMEM_ram_ro, HVMMEM_mmio_dm, HVMMEM_ioreq_server)
