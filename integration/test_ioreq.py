"""End to end: a tiny PVH guest's port IO, MMIO and PCI config accesses, served by a
Python ioreq server in dom0, with the DMOPs issued through libxendevicemodel and, when it
is importable, through xendmop."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from typing import Any

import pytest
import xenlab

pytestmark = pytest.mark.x86_only(
    "the tiny PVH guest's port IO and PCI config through 0xcf8; Arm's ioreq test is test_arm.py"
)

PORT, MMIO, PCI_DEV = 0x5600, 0xFE000000, 3
VENDOR_DEVICE = 0xCAFE1AF4  # config dword 0 of the fake PCI function 00:03.0


class RegisterFile:
    """8 bytes of ports and a 4 KiB MMIO page that read back what was written, plus one
    read-only PCI config dword; records every request it sees."""

    def __init__(self) -> None:
        self.ports = bytearray(8)
        self.mmio = bytearray(4096)
        self.seen: list[tuple[int, int, int, int]] = []

    def __call__(self, kind: int, addr: int, size: int, is_read: int, data: int | None) -> int:
        self.seen.append((kind, addr, size, is_read))
        if kind == xenlab.IOREQ_TYPE_PCI_CONFIG:
            return VENDOR_DEVICE if (addr & 0xFFF) == 0 else 0xFFFFFFFF
        mem, off = (self.ports, addr - PORT) if kind == xenlab.IOREQ_TYPE_PIO else (self.mmio, addr - MMIO)
        if is_read:
            return int.from_bytes(mem[off : off + size], "little")
        mem[off : off + size] = (data or 0).to_bytes(8, "little")[:size]
        return 0


def _dm(name: str) -> Any:
    if name == "libxendevicemodel":
        return xenlab.LibXDM()
    if importlib.util.find_spec("xendmop") is None:
        pytest.skip("xendmop is not importable")
    import xendmop

    return xendmop.DeviceModel.open(backend="privcmd")


@pytest.mark.parametrize("api", ["libxendevicemodel", "xendmop"])
def test_guest_io_served_by_python_ioreq_server(api: str, make_guest: Callable[..., xenlab.Guest]) -> None:
    s = xenlab.Script()
    s.out(PORT, 1, 0x12)
    b = s.inp(PORT, 1, expect=0x12)
    s.out(PORT + 2, 2, 0xBEEF)
    w = s.inp(PORT + 2, 2, expect=0xBEEF)
    s.out(PORT + 4, 4, 0xDEADBEEF)
    d = s.inp(PORT + 4, 4, expect=0xDEADBEEF)
    whole = s.inp(PORT, 4, expect=0xBEEF0012)
    unclaimed = s.inp(PORT + 0x10, 1, expect=0xFF)  # not mapped to the server: Xen answers all ones
    s.mmio_write(MMIO + 0x10, 4, 0x01020304)
    m = s.mmio_read(MMIO + 0x10, 4, expect=0x01020304)
    mb = s.mmio_read(MMIO + 0x11, 1, expect=0x03)
    p = s.pci_read(0, PCI_DEV, 0, 0, 4, expect=VENDOR_DEVICE)
    guest = make_guest(s, vcpus=1)
    dm = _dm(api)
    regs = RegisterFile()
    server = xenlab.IoreqServer(dm, guest.domid, regs)
    try:
        dm.map_io_range_to_ioreq_server(guest.domid, server.id, False, PORT, PORT + 7)
        dm.map_io_range_to_ioreq_server(guest.domid, server.id, True, MMIO, MMIO + 0xFFF)
        dm.map_pcidev_to_ioreq_server(guest.domid, server.id, 0, 0, PCI_DEV, 0)
        server.enable(guest.vcpus)
        t0 = time.monotonic()
        guest.unpause()
        server.serve(until=lambda: any(ln.startswith("xendmop-guest done") for ln in guest.output()), timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        server.close()
        dm.close()
    lines = guest.output()
    print(f"{api}: {server.served} requests served in {elapsed:.2f} s; guest said {lines}")
    reads = xenlab.parse_reads(lines)
    assert all(reads[i].ok for i in (b, w, d, whole, unclaimed, m, mb, p)), lines
    assert xenlab.guest_failures(lines) == 0
    kinds = {k for k, *_ in regs.seen}
    assert kinds == {xenlab.IOREQ_TYPE_PIO, xenlab.IOREQ_TYPE_COPY, xenlab.IOREQ_TYPE_PCI_CONFIG}
