"""privcmd's eventfd shortcuts: ``IOCTL_PRIVCMD_IRQFD`` and ``IOCTL_PRIVCMD_IOEVENTFD``.

Linux 6.7 added both to ``drivers/xen/privcmd.c`` for virtio backends:

- **irqfd**: the kernel keeps a copy of one DMOP (an interrupt op such as ``set_irq_level``)
  and issues it each time an eventfd is written, so a device thread raises an interrupt
  without a DMOP of its own (``privcmd_irqfd_assign``).
- **ioeventfd**: the kernel watches an ioreq server's shared page and answers a guest's
  write of a queue number to a notify address itself, completing the ioreq and signalling
  an eventfd, with no trip through the device model's ioreq loop (``privcmd_ioeventfd_assign``,
  ``ioeventfd_interrupt``).

Whether a kernel has them (``probe``): older than 6.7 the ioctl numbers are unknown
(``privcmd_ioctl``'s default, ENOTTY); a 6.7+ kernel built without
``CONFIG_XEN_PRIVCMD_EVENTFD`` (which needs ``CONFIG_XEN_VIRTIO``) answers EOPNOTSUPP from
its stubs.  Measured in the lab: Debian 12's 6.1 gives ENOTTY, Debian 13's 6.12 for amd64
EOPNOTSUPP (its config leaves ``XEN_VIRTIO`` unset), so on those hosts the runtime keeps
serving notifications and interrupts itself.  The probe sets a flag bit no kernel defines:
a kernel that has the feature refuses it (EINVAL) before doing anything.
"""

from __future__ import annotations

import ctypes
import enum
import errno
from collections.abc import Sequence

from ..abi import CONSTANTS
from ..abi.dm_op import xen_dm_op
from ..abi.privcmd import (
    IOCTL_PRIVCMD_IOEVENTFD,
    IOCTL_PRIVCMD_IRQFD,
    PRIVCMD_IOEVENTFD_FLAG_DEASSIGN,
    PRIVCMD_IRQFD_FLAG_DEASSIGN,
    privcmd_ioeventfd,
    privcmd_irqfd,
)
from ..checks import check_domid, check_int
from ..errors import ArgumentError, UnsupportedError, xen_error
from .device import Device

#: the interrupt DMOPs an irqfd can carry, with their field names in ``xen_dm_op.u``
IRQ_OPS = ("set_isa_irq_level", "set_pci_intx_level", "set_irq_level", "inject_msi")
_UNDEFINED_FLAG = 1 << 31  # no kernel defines it: a kernel with the ioctl answers EINVAL
MAX_VCPUS = 4096  # privcmd_ioeventfd_assign's limit


class Support(enum.Enum):
    """What ``probe`` found for one ioctl."""

    AVAILABLE = "available"
    KERNEL_TOO_OLD = "not in this kernel (Linux < 6.7: ENOTTY)"
    NOT_BUILT = "kernel built without CONFIG_XEN_PRIVCMD_EVENTFD (EOPNOTSUPP)"


def _support(device: Device, request: int, arg: ctypes.Structure) -> Support:
    try:
        device.ioctl(request, arg)
    except OSError as e:
        if e.errno == errno.ENOTTY:
            return Support.KERNEL_TOO_OLD
        if e.errno == errno.EOPNOTSUPP:
            return Support.NOT_BUILT
        if e.errno in (errno.EINVAL, errno.EPERM):  # flags refused, or a restricted fd's domid check
            return Support.AVAILABLE
        raise
    raise AssertionError("privcmd accepted an undefined flag")  # never: the kernel checks flags first


def probe(device: Device) -> dict[str, Support]:
    """Which of irqfd and ioeventfd this privcmd device offers; nothing is registered."""
    return {
        "irqfd": _support(device, IOCTL_PRIVCMD_IRQFD, privcmd_irqfd(flags=_UNDEFINED_FLAG)),
        "ioeventfd": _support(device, IOCTL_PRIVCMD_IOEVENTFD, privcmd_ioeventfd(flags=_UNDEFINED_FLAG)),
    }


def irq_op(name: str, **fields: int) -> bytes:
    """The ``struct xen_dm_op`` an irqfd issues: one of ``IRQ_OPS`` with its fields by their C
    names (e.g. ``irq_op("set_irq_level", irq=40, level=1)``)."""
    if name not in IRQ_OPS:
        raise ArgumentError("irqfd", "op", name, f"must be one of {', '.join(IRQ_OPS)}")
    op = xen_dm_op(op=CONSTANTS[f"XEN_DMOP_{name}"])
    body = getattr(op.u, name)
    known = {f[0] for f in body._fields_ if f[0] != "pad"}
    for key, value in fields.items():
        if key not in known:
            raise ArgumentError("irqfd", key, value, f"is not a field of xen_dm_op_{name} ({', '.join(sorted(known))})")
        ctype = dict(body._fields_)[key]
        check_int("irqfd", key, value, 0, (1 << (8 * ctypes.sizeof(ctype))) - 1)
        setattr(body, key, value)
    return bytes(op)


def _call(device: Device, request: int, arg: ctypes.Structure, op: str, domid: int) -> None:
    try:
        device.ioctl(request, arg)
    except OSError as e:
        err = e.errno or errno.EIO
        if err in (errno.ENOTTY, errno.EOPNOTSUPP):
            raise UnsupportedError(err, op, domid, layer="privcmd") from None
        raise xen_error(err, op, domid, layer="privcmd") from None


def irqfd(device: Device, domid: int, op: bytes, event_fd: int, *, deassign: bool = False) -> None:
    """Have the kernel issue ``op`` (``irq_op``'s bytes) for ``domid`` whenever ``event_fd``
    is written; ``deassign`` undoes it.  The kernel copies ``op`` at assignment."""
    check_domid("irqfd", domid, guest_only=True)
    check_int("irqfd", "event_fd", event_fd, 0, 0x7FFFFFFF)
    if len(op) != ctypes.sizeof(xen_dm_op):
        raise ArgumentError("irqfd", "op", len(op), f"must be one struct xen_dm_op ({ctypes.sizeof(xen_dm_op)} bytes)")
    buf = ctypes.create_string_buffer(op, len(op))
    arg = privcmd_irqfd(
        dm_op=ctypes.addressof(buf),
        size=len(op),
        fd=event_fd,
        flags=PRIVCMD_IRQFD_FLAG_DEASSIGN if deassign else 0,
        dom=domid,
    )
    _call(device, IOCTL_PRIVCMD_IRQFD, arg, "irqfd", domid)


def ioeventfd(
    device: Device,
    domid: int,
    *,
    ioreq_page: int,
    ports: Sequence[int],
    addr: int,
    addr_len: int,
    vq: int,
    event_fd: int,
    deassign: bool = False,
) -> None:
    """Have the kernel answer the guest's ``addr_len``-byte write of ``vq`` to ``addr`` (an
    MMIO notify register served by the ioreq server whose shared page is mapped at the
    address ``ioreq_page``) by signalling ``event_fd``; ``ports``: that server's local
    event-channel port of each vCPU.  Argument rules as ``privcmd_ioeventfd_assign``'s."""
    check_domid("ioeventfd", domid, guest_only=True)
    if addr_len not in (1, 2, 4, 8):
        raise ArgumentError("ioeventfd", "addr_len", addr_len, "must be 1, 2, 4 or 8")
    check_int("ioeventfd", "addr", addr, 0, (1 << 64) - 1 - addr_len)
    if not 0 < len(ports) <= MAX_VCPUS:
        raise ArgumentError("ioeventfd", "ports", len(ports), f"must be one port per vCPU, 1..{MAX_VCPUS}")
    for port in ports:
        check_int("ioeventfd", "port", port, 1, 0xFFFFFFFF)
    check_int("ioeventfd", "ioreq_page", ioreq_page, 1, (1 << 64) - 1)
    check_int("ioeventfd", "vq", vq, 0, 0xFFFFFFFF)
    check_int("ioeventfd", "event_fd", event_fd, 0, 0x7FFFFFFF)
    port_array = (ctypes.c_uint32 * len(ports))(*ports)
    arg = privcmd_ioeventfd(
        ioreq=ioreq_page,
        ports=ctypes.addressof(port_array),
        addr=addr,
        addr_len=addr_len,
        event_fd=event_fd,
        vcpus=len(ports),
        vq=vq,
        flags=PRIVCMD_IOEVENTFD_FLAG_DEASSIGN if deassign else 0,
        dom=domid,
    )
    _call(device, IOCTL_PRIVCMD_IOEVENTFD, arg, "ioeventfd", domid)
