"""The privcmd backend: DMOPs as ``IOCTL_PRIVCMD_DM_OP`` on ``/dev/xen/privcmd``.

The device is injected: a real ``OsDevice`` on a dom0, or the mock host's device
(``xendmop.mock``); the marshalling below is the same for both.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..abi import CONSTANTS
from ..abi.privcmd import IOCTL_PRIVCMD_DM_OP, IOCTL_PRIVCMD_HYPERCALL, IOCTL_PRIVCMD_RESTRICT, privcmd_dm_op
from ..abi.xen import DOMID_FIRST_RESERVED, DOMID_INVALID, domid_t
from ..errors import ArgumentError, ClosedHandleError, XenError, xen_error
from ..ops import OpDecl
from .base import Limits
from .buffers import HypercallBuffers
from .device import PRIVCMD_PATH, Device, Opener, open_device

log = logging.getLogger(__name__)

_HYPERVISOR_dm_op = CONSTANTS["__HYPERVISOR_dm_op"]


class PrivcmdBackend:
    """Owns a privcmd device and a pool of hypercall buffers."""

    name = "privcmd"

    def __init__(
        self, opener: Opener = open_device, limits: Limits = Limits(), *, on_close: Callable[[], None] | None = None
    ) -> None:
        self.limits = limits
        self._on_close = on_close  # e.g. closing a mock host this backend owns
        self._device: Device | None = opener(PRIVCMD_PATH)
        try:
            self._buffers = HypercallBuffers(opener, limits.max_buf_size)
            self.restricted_to: int | None = None
            self.uses_hypercall = not self._probe()
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
        if device is not None:
            self._buffers.close()
            device.close()
            if self._on_close is not None:
                self._on_close()
