"""xendmop.runtime.IoreqServer serving a real PVH guest: port IO, MMIO, string IO (rep
outsb/insb, data in guest RAM reached through real foreign mappings) and PCI config space,
with the ioreq page mapped by resource and real event channels, one per vCPU; after
teardown the guest has no server left: all eight slots can be taken again.

integration/test_ioreq.py proves the lab and the guest with the lab's own minimal server
(xenlab.IoreqServer); here the library's runtime is the subject.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import xenlab

xendmop = pytest.importorskip("xendmop", reason="xendmop is not importable (PYTHONPATH should be the checkout)")
from xendmop.runtime import IoreqServer, ServeLoop  # noqa: E402

pytestmark = pytest.mark.x86_only(
    "port IO, rep outs/ins and PCI config from the tiny PVH guest; Arm's ioreq test is test_arm.py"
)

PORT, FIFO_PORT, MMIO, PCI_SLOT = 0x5600, 0x5610, 0xFE000000, 3
VENDOR_DEVICE = 0xCAFE1AF4
SLOTS = 8  # MAX_NR_IOREQ_SERVERS (xen/include/xen/sched.h)


class Fifo:
    """One port: writes are collected, reads give the bytes of `to_guest` in turn."""

    def __init__(self, to_guest: bytes) -> None:
        self.received = bytearray()
        self.to_guest = bytearray(to_guest)

    def read(self, addr: int, size: int) -> int:
        value = int.from_bytes(self.to_guest[:size].ljust(size, b"\xff"), "little")
        del self.to_guest[:size]
        return value

    def write(self, addr: int, size: int, value: int) -> None:
        self.received += value.to_bytes(size, "little")


class ConfigSpace:
    """A PCI function's config space: the ID dword, all ones elsewhere."""

    def read(self, addr: int, size: int) -> int:
        return (VENDOR_DEVICE >> (8 * (addr & 3))) & ((1 << (8 * size)) - 1) if addr < 4 else (1 << (8 * size)) - 1

    def write(self, addr: int, size: int, value: int) -> None:
        pass


def test_ioreq_server_serves_a_real_guest_and_leaves_no_server(make_guest: Callable[..., xenlab.Guest]) -> None:
    sent, answer = b"hello, ioreq server", b"answer from dom0!"
    s = xenlab.Script()
    s.out(PORT, 1, 0x5A)
    b = s.inp(PORT, 1, expect=0x5A)
    s.out(PORT + 4, 4, 0xDEADBEEF)
    d = s.inp(PORT + 4, 4, expect=0xDEADBEEF)
    s.mmio_write(MMIO + 0x20, 4, 0x01020304)
    m = s.mmio_read(MMIO + 0x20, 4, expect=0x01020304)
    mw = s.mmio_read(MMIO + 0x22, 2, expect=0x0102)
    s.outs(FIFO_PORT, 1, sent)
    ins = s.ins(FIFO_PORT, 1, len(answer), expect=answer)
    p = s.pci_read(0, PCI_SLOT, 0, 0, 4, expect=VENDOR_DEVICE)
    guest = make_guest(s, vcpus=2, on_poweroff="preserve")  # its domain outlives the script
    ports, mmio, fifo = xenlab.RegisterFile(8), xenlab.RegisterFile(4096), Fifo(answer)
    with xendmop.DeviceModel.open("privcmd") as dm:
        server = IoreqServer(dm, guest.domid)
        server.add_port_range(PORT, PORT + 7, ports, "regs")
        server.add_port_range(FIFO_PORT, FIFO_PORT, fifo, "fifo")
        server.add_mmio_range(MMIO, MMIO + 0xFFF, mmio, "mmio")
        server.add_pci(ConfigSpace(), slot=PCI_SLOT, name="config")
        loop = ServeLoop(server)
        with xenlab.running_in_thread(loop):
            deadline = time.monotonic() + 60
            while not server.running and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.running, "the server did not come up"
            assert (server.id, server.legacy_gfns, len(server.vcpu_ports)) == (0, False, 2)
            t0 = time.monotonic()
            guest.unpause()
            lines = guest.wait_done(timeout=120, poll=0.3)
            elapsed = time.monotonic() - t0
        assert server.id is None and not server.running  # the loop tore it down
        print(f"guest served in {elapsed:.2f} s: {lines}")
        reads = xenlab.parse_reads(lines)
        assert {i: reads[i].ok for i in (b, d, m, mw, ins, p)} == dict.fromkeys((b, d, m, mw, ins, p), True), lines
        assert xenlab.guest_failures(lines) == 0
        assert bytes(fifo.received) == sent  # rep outsb: the bytes came from guest RAM
        assert ("w", 0x20, 4) in mmio.seen and ("r", 0x22, 2) in mmio.seen
        # Teardown left nothing in Xen: all eight slots are free on the still-existing domain.
        ids = [dm.create_ioreq_server(guest.domid) for _ in range(SLOTS)]
        for sid in ids:
            dm.destroy_ioreq_server(guest.domid, sid)
    assert sorted(ids) == list(range(SLOTS))
