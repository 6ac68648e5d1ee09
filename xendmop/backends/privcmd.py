"""The privcmd backend: DMOPs as ``IOCTL_PRIVCMD_DM_OP`` on ``/dev/xen/privcmd``.

The device is injected: a real ``OsDevice`` on a dom0, or the mock host's device
(``xendmop.mock``); the marshalling is the same for both.  ``dm_op`` takes any op and any
fields through the declaration (``OpDecl.marshal``); each op's own call, the hot path, is a
function in ``privcmd_calls.py``, written out from its declaration by
``tools/gen_privcmd_calls.py`` and bound to a backend here (``compile_call``, ``Binding``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
from collections.abc import Callable, Mapping, Sequence
from struct import Struct
from typing import Any

from ..abi import CONSTANTS
from ..abi.privcmd import IOCTL_PRIVCMD_DM_OP, IOCTL_PRIVCMD_HYPERCALL, IOCTL_PRIVCMD_RESTRICT, privcmd_dm_op
from ..abi.xen import DOMID_FIRST_RESERVED, DOMID_INVALID, domid_t
from ..checks import check_domid
from ..errors import ArgumentError, ClosedHandleError, XenError, xen_error
from ..ops import BY_NAME, OpDecl
from .base import Limits, generic_call
from .buffers import OP_AT, SLOT_BUF_AT, HypercallBuffers
from .device import PRIVCMD_PATH, Device, Opener, OsDevice, open_device
from .privcmd_calls import CALLS, ENTRIES

log = logging.getLogger(__name__)

_HYPERVISOR_dm_op = CONSTANTS["__HYPERVISOR_dm_op"]
#: the DM_OP request's first 48 bytes: dom, num, ubufs, bufs[0] and bufs[1]; the op follows
_REQUEST_HEAD = "<HH4xQQQQQ"
assert (SLOT_BUF_AT, OP_AT) == (32, 48), "the arena layout _REQUEST_HEAD is written for"


def _device_ioctl(device: Device, request: int, arg: Any, mutate: bool = True) -> int:
    """``fcntl.ioctl``'s shape for a device that is not a file (the mock's, a test's)."""
    return device.ioctl(request, arg)


class _OpParts:
    """What an op's generated calls use that depends on neither the backend nor the handle."""

    __slots__ = ("check", "decl", "from_copy", "pack_op", "pack_request")

    def __init__(self, decl: OpDecl) -> None:
        self.decl = decl

        def check(domid: int, fields: Mapping[str, int]) -> None:  # the typed error, or a bool/IntEnum's go-ahead
            check_domid(decl.name, domid)
            decl.check(fields)

        self.check = check
        self.pack_op = decl._packer.pack_into
        self.pack_request = Struct(_REQUEST_HEAD + decl._packer.format.lstrip("<")).pack_into
        self.from_copy = decl.struct.from_buffer_copy


_PARTS: dict[str, _OpParts] = {}  # by op name (a declaration holds dicts: it is not hashable)


class Binding:
    """What one backend binds into an op's generated call (``privcmd_calls``, written by
    ``tools/gen_privcmd_calls.py``): its arena pool, its ioctl and sizes, the op's packers,
    and for a method's entry the method itself (``general``)."""

    __slots__ = (
        "acquire",
        "backend",
        "check",
        "from_copy",
        "general",
        "ioctl",
        "max_bytes",
        "pack_op",
        "pack_request",
        "pop",
        "push",
        "room",
    )

    general: Any  # the method an entry calls for every other form (None for a call)

    def __init__(self, backend: PrivcmdBackend, decl: OpDecl, general: Callable[..., Any] | None = None) -> None:
        parts = _PARTS.get(decl.name)
        if parts is None or parts.decl is not decl:
            parts = _PARTS[decl.name] = _OpParts(decl)
        pool = backend._buffers
        self.backend = backend
        self.pop, self.acquire, self.push = pool._free.pop, pool.acquire, pool._free.append
        self.ioctl = backend._ioctl
        self.room = pool.slot_room
        self.max_bytes = min(backend.limits.max_buf_size, pool.slot_room)  # one kernel-sized buffer
        self.check, self.pack_op, self.pack_request = parts.check, parts.pack_op, parts.pack_request
        self.from_copy = parts.from_copy
        self.general = general


class PrivcmdBackend:
    """Owns a privcmd device and a pool of hypercall buffers."""

    name = "privcmd"
    #: set on a simulated host's backend (``make_backend("mock")``): how that host opens its
    #: devices, so that an IoreqServer on the same DeviceModel opens privcmd and evtchn there too
    host_opener: Opener | None = None
    libdir: str | None = None  # no C libraries

    def __init__(
        self, opener: Opener = open_device, limits: Limits = Limits(), *, on_close: Callable[[], None] | None = None
    ) -> None:
        self.limits = limits
        self._on_close = on_close  # e.g. closing a mock host this backend owns
        self._device: Device | None = opener(PRIVCMD_PATH)
        # what the generated calls hand their ioctl: the fd itself for a device file (one
        # ``fcntl.ioctl``, no method frame), the device for any other; None once closed.
        # The backend owns the device: it is closed through ``close`` only.
        os_device = type(self._device) is OsDevice
        self._ioctl: Callable[..., Any] = fcntl.ioctl if os_device else _device_ioctl
        self.ioctl_target: Any = self._device.fileno() if os_device else self._device
        try:
            self.restricted_to: int | None = None
            self.uses_hypercall = not self._probe()
            # DM_OP's buffers are pinned by the kernel; only the HYPERCALL path needs
            # hypercall-safe pages (buffers.py says why the device's are wrong for DM_OP)
            self._buffers = HypercallBuffers(opener, limits.max_buf_size, hypercall=self.uses_hypercall)
        except BaseException:
            with contextlib.suppress(OSError):  # never mask the original error
                self._device.close()
            raise

    @classmethod
    def from_device(cls, device: Device, opener: Opener = open_device, limits: Limits = Limits()) -> PrivcmdBackend:
        """Wrap an already open device (e.g. a bad fd or ``/dev/null`` in tests)."""
        return cls(lambda path: device if path == PRIVCMD_PATH else opener(path), limits)

    @property
    def device(self) -> Device:
        if self._device is None:
            raise ClosedHandleError("the privcmd handle is closed")
        return self._device

    def _probe(self) -> bool:
        """Does this kernel have IOCTL_PRIVCMD_DM_OP?  An empty call to DOMID_INVALID,
        as ``xendevicemodel_open`` does (``tools/libs/devicemodel/common.c``)."""
        probe = privcmd_dm_op(dom=DOMID_INVALID, num=0, ubufs=None)
        try:
            self.device.ioctl(IOCTL_PRIVCMD_DM_OP, probe)
        except OSError as e:
            if e.errno == errno.ENOTTY:
                log.info("privcmd lacks IOCTL_PRIVCMD_DM_OP: using IOCTL_PRIVCMD_HYPERCALL")
                return False
            if e.errno != errno.EPERM:  # EPERM: a pre-restricted fd still has the ioctl
                raise xen_error(e.errno or errno.EIO, "probe", DOMID_INVALID, layer="privcmd") from None
        return True

    def dm_op(
        self, decl: OpDecl, domid: int, fields: Mapping[str, int], slot_data: Sequence[Any] = ()
    ) -> tuple[Any, list[bytes]]:
        if self.restricted_to is not None and domid != self.restricted_to:
            raise xen_error(errno.EPERM, decl.name, domid, fields, layer="privcmd")
        arena = self._buffers.acquire()
        try:
            bufs = decl.marshal(arena, fields, slot_data)
            arena.set_bufs(bufs)
            if self.uses_hypercall:
                call = arena.hypercall
                call.op = _HYPERVISOR_dm_op
                call.arg[0], call.arg[1], call.arg[2] = domid, len(bufs), arena.bufs_addr
                self.device.ioctl(IOCTL_PRIVCMD_HYPERCALL, call)
            else:
                request = arena.dm_op
                request.dom, request.num, request.ubufs = domid, len(bufs), arena.bufs_addr
                self.device.ioctl(IOCTL_PRIVCMD_DM_OP, request)
            return decl.unmarshal(arena, bufs)
        except XenError:
            raise
        except OSError as e:
            raise xen_error(e.errno or errno.EIO, decl.name, domid, fields) from None
        finally:
            self._buffers.release(arena)

    def compile_call(
        self, decl: OpDecl, params: Sequence[str], slot_params: Sequence[str] = ()
    ) -> Callable[..., tuple[Any, list[Any]]]:
        """``dm_op`` for one op, written out from its declaration: ``call(domid, *values, *slot_data)``.

        ``params`` name the op's fields the caller passes, in the order it passes them
        (the others are 0); the slot data (one value per slot) follows, under the names
        ``slot_params`` (by default the slots' own) that its errors give.
        The same checks, typed errors and bytes as ``dm_op``, without the per-call dict,
        the Mapping walk or ctypes attribute writes: one ``Struct.pack_into`` for the op
        and the request header, the arena's fixed parts written once.  It returns
        ``(op struct or None, OUT slot data)``: the struct only for an op Xen always copies
        back (``CopyBack.ALWAYS``), whose fields are results.

        Slot data: an IN slot takes a buffer of exactly the count rule's size (a ctypes
        array, or any C-contiguous buffer).  An OUT slot takes ``None``, and its answer
        comes back as new ``bytes``, or a writable buffer of at least that size, which
        gets the answer and comes back itself.  On the DM_OP ioctl a writable buffer is
        handed to the kernel where it is, as libxendevicemodel hands over the caller's
        pointers: privcmd pins the caller's pages itself.  On the HYPERCALL path, and
        for read-only IN data, the bytes go through the arena (hypercall-safe memory).

        The call is the closure ``privcmd_calls`` makes for this shape (the calls
        ``DeviceModel`` makes; ``tools/gen_privcmd_calls.py`` writes them), bound to this
        backend; a shape it has none for gets the generic call over ``dm_op``.
        """
        key = (decl.name, tuple(params), tuple(slot_params), self.uses_hypercall)
        factory = CALLS.get(key)
        if factory is None or BY_NAME.get(decl.name) is not decl:
            return generic_call(self, decl, params, slot_params)
        return factory(Binding(self, decl))

    def compile_entry(
        self,
        decl: OpDecl,
        params: Sequence[tuple[str, str]],
        slot_param: str | None,
        name: str,
        general: Callable[..., Any],
    ) -> Callable[..., Any] | None:
        """A public method's common form as one function (``privcmd_calls``' ``entry_<name>``):
        ``name(domid, *arguments, slot_param)`` for ``params``' ``(argument, field)`` pairs,
        which calls ``general`` with the same arguments for everything else.  ``None`` on the
        HYPERCALL path, where every buffer is copied into hypercall memory anyway and the
        method's own path is as fast, and for a shape ``privcmd_calls`` has no entry for."""
        if self.uses_hypercall:
            return None
        factory = ENTRIES.get((decl.name, tuple(params), slot_param, name))
        if factory is None or BY_NAME.get(decl.name) is not decl:
            return None
        return factory(Binding(self, decl, general))

    def restrict(self, domid: int) -> None:
        """``IOCTL_PRIVCMD_RESTRICT``: this fd may only target ``domid`` from now on."""
        if not 0 <= domid < DOMID_FIRST_RESERVED:
            raise ArgumentError("restrict", "domid", domid, "must be a guest domid (0..0x7fef)")
        try:
            self.device.ioctl(IOCTL_PRIVCMD_RESTRICT, domid_t(domid))
        except OSError as e:
            raise xen_error(e.errno or errno.EIO, "restrict", domid, layer="privcmd") from None
        self.restricted_to = domid

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device": getattr(self.device, "path", PRIVCMD_PATH),
            "ioctl": "IOCTL_PRIVCMD_HYPERCALL" if self.uses_hypercall else "IOCTL_PRIVCMD_DM_OP",
            "buffers": self._buffers.source,
            "restricted_to": self.restricted_to,
            "limits": {"max_nr_bufs": self.limits.max_nr_bufs, "max_buf_size": self.limits.max_buf_size},
        }

    def close(self) -> None:
        device, self._device = self._device, None
        self.ioctl_target = None
        if device is not None:
            self._buffers.close()
            device.close()
            if self._on_close is not None:
                self._on_close()
