"""privcmd's irqfd and ioeventfd wrappers (backends/eventfd.py): the bytes they hand the
kernel, their argument rules, and what the probe concludes from each answer."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from xendmop import mock
from xendmop.abi.privcmd import (
    IOCTL_PRIVCMD_IOEVENTFD,
    IOCTL_PRIVCMD_IRQFD,
    privcmd_ioeventfd,
    privcmd_irqfd,
)
from xendmop.backends import eventfd
from xendmop.cli import xen_version
from xendmop.errors import ArgumentError, UnsupportedError, XenError


class Recorder:
    """A privcmd device that keeps a copy of each ioctl argument (and what it points at,
    read during the call, as the kernel's copy_from_user) and answers ``answer``."""

    path = "/dev/xen/privcmd"

    def __init__(self, answer: int = 0) -> None:
        self.answer = answer
        self.calls: list[tuple[int, Any, bytes]] = []

    def fileno(self) -> int:
        return -1

    def ioctl(self, request: int, arg: Any) -> int:
        pointed = b""
        if isinstance(arg, privcmd_irqfd):
            pointed = ctypes.string_at(arg.dm_op, arg.size)
        elif isinstance(arg, privcmd_ioeventfd):
            pointed = ctypes.string_at(arg.ports, 4 * arg.vcpus)
        self.calls.append((request, type(arg).from_buffer_copy(arg), pointed))
        if self.answer:
            raise OSError(self.answer, os.strerror(self.answer))
        return 0

    def mmap(self, length: int, offset: int = 0) -> Any:
        raise OSError(errno.ENODEV, "no mmap")

    def close(self) -> None:
        pass


def test_irq_op_is_the_xen_dm_op_struct() -> None:
    # struct xen_dm_op: uint32 op, uint32 pad, then the union; XEN_DMOP_set_irq_level is 19
    op = eventfd.irq_op("set_irq_level", irq=40, level=1)
    assert len(op) == 32
    assert op[:16] == struct.pack("<IIIB3x", 19, 0, 40, 1)
    assert op[16:] == bytes(16)
    isa = eventfd.irq_op("set_isa_irq_level", isa_irq=4, level=1)
    assert isa[:10] == struct.pack("<IIBB", 9, 0, 4, 1)


@pytest.mark.parametrize(
    ("name", "fields", "bad"),
    [
        ("set_isa_irq_level", {"isa_irq": 256}, "isa_irq=256"),
        ("set_isa_irq_level", {"irq": 4}, "irq=4"),
        ("nr_vcpus", {}, "op='nr_vcpus'"),
        ("set_irq_level", {"level": -1}, "level=-1"),
    ],
)
def test_irq_op_refuses_what_the_struct_cannot_carry(name: str, fields: dict[str, int], bad: str) -> None:
    with pytest.raises(ArgumentError, match=bad):
        eventfd.irq_op(name, **fields)


def test_irqfd_hands_the_kernel_the_op_its_size_fd_and_domain() -> None:
    dev = Recorder()
    op = eventfd.irq_op("set_pci_intx_level", device=4, intx=0, level=1)
    eventfd.irqfd(dev, 7, op, 12)
    eventfd.irqfd(dev, 7, op, 12, deassign=True)
    (req, arg, pointed), (_, undo, _) = dev.calls
    assert req == IOCTL_PRIVCMD_IRQFD
    assert (arg.size, arg.fd, arg.flags, arg.dom) == (32, 12, 0, 7)
    assert pointed == op
    assert undo.flags == 1  # PRIVCMD_IRQFD_FLAG_DEASSIGN


def test_irqfd_argument_errors_name_the_value() -> None:
    dev = Recorder()
    with pytest.raises(ArgumentError, match="op=31"):
        eventfd.irqfd(dev, 7, bytes(31), 12)
    with pytest.raises(ArgumentError, match="domid=32752"):
        eventfd.irqfd(dev, 0x7FF0, eventfd.irq_op("set_irq_level"), 12)
    assert not dev.calls


def test_ioeventfd_marshals_ports_and_notify_address() -> None:
    dev = Recorder()
    eventfd.ioeventfd(dev, 3, ioreq_page=0x7F0000001000, ports=[5, 6], addr=0xF0003000, addr_len=2, vq=1, event_fd=9)
    req, arg, pointed = dev.calls[0]
    assert req == IOCTL_PRIVCMD_IOEVENTFD
    assert (arg.ioreq, arg.addr, arg.addr_len, arg.event_fd, arg.vcpus, arg.vq, arg.flags, arg.dom) == (
        0x7F0000001000,
        0xF0003000,
        2,
        9,
        2,
        1,
        0,
        3,
    )
    assert pointed == struct.pack("<II", 5, 6)


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"addr_len": 3}, "addr_len=3"),
        ({"ports": []}, "ports=0"),
        ({"ports": [1] * 4097}, "ports=4097"),
        ({"addr": 2**64 - 2, "addr_len": 4}, "addr="),
        ({"ports": [0]}, "port=0"),
    ],
)
def test_ioeventfd_refuses_what_privcmd_ioeventfd_assign_refuses(kwargs: dict[str, Any], bad: str) -> None:
    args: dict[str, Any] = {
        "ioreq_page": 0x1000,
        "ports": [5],
        "addr": 0xF0000000,
        "addr_len": 4,
        "vq": 0,
        "event_fd": 9,
    }
    args.update(kwargs)
    dev = Recorder()
    with pytest.raises(ArgumentError, match=bad):
        eventfd.ioeventfd(dev, 3, **args)
    assert not dev.calls


@pytest.mark.parametrize(
    ("answer", "support"),
    [
        (errno.ENOTTY, eventfd.Support.KERNEL_TOO_OLD),
        (errno.EOPNOTSUPP, eventfd.Support.NOT_BUILT),
        (errno.EINVAL, eventfd.Support.AVAILABLE),
    ],
)
def test_probe_reads_the_kernels_answer(answer: int, support: eventfd.Support) -> None:
    dev = Recorder(answer)
    assert eventfd.probe(dev) == {"irqfd": support, "ioeventfd": support}
    assert all(arg.flags == 1 << 31 for _, arg, _ in dev.calls)  # a flag no kernel defines


def test_probe_does_not_hide_another_failure() -> None:
    with pytest.raises(OSError) as e:
        eventfd.probe(Recorder(errno.EBADF))
    assert e.value.errno == errno.EBADF


def test_on_the_mock_kernel_the_ioctls_are_unknown() -> None:
    dev = mock.MockXen().open_device("/dev/xen/privcmd")
    assert set(eventfd.probe(dev).values()) == {eventfd.Support.KERNEL_TOO_OLD}
    with pytest.raises(UnsupportedError) as e:
        eventfd.irqfd(dev, 1, eventfd.irq_op("set_isa_irq_level", isa_irq=4, level=1), 5)
    assert e.value.errno == errno.ENOTTY and "irqfd" in str(e.value)


def test_a_refusal_is_a_typed_error_naming_the_call() -> None:
    with pytest.raises(XenError, match=r"privcmd ioeventfd\(domid=3\).*EBADF"):
        eventfd.ioeventfd(Recorder(errno.EBADF), 3, ioreq_page=0x1000, ports=[5], addr=0, addr_len=4, vq=0, event_fd=9)


def test_xen_version_from_sysfs(tmp_path: Path) -> None:
    assert xen_version(str(tmp_path)) is None
    version = tmp_path / "sys/hypervisor/version"
    version.mkdir(parents=True)
    for name, value in (("major", "4"), ("minor", "20"), ("extra", ".5-pre")):
        (version / name).write_text(value + "\n")
    assert xen_version(str(tmp_path)) == "4.20.5-pre"
