"""debugcon: the port-0xE9 debug console, the smallest useful device model.

A guest writes bytes to I/O port 0xE9 (as Bochs, QEMU's ``-debugcon`` and Xen's own
``guest_loglvl`` console do); this device model prints them, and answers reads of the
port with 0xE9 so a guest can detect it.

Run it:

    python examples/debugcon.py              # on the mock Xen: a simulated guest prints a banner
    python examples/debugcon.py --domid 5    # on a real dom0: serve domain 5 until Ctrl-C

On the mock, the simulated guest's vCPU writes an ioreq into the real shared page,
notifies the server's event channel and waits for the answer, exactly as Xen would.
The server is torn down on exit (also on Ctrl-C/SIGTERM), so no server is left in Xen.
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import TextIO

from xendmop import DeviceModel
from xendmop.runtime import IoreqServer, ServeLoop

PORT = 0xE9


class DebugConsole:
    """Port 0xE9: each byte written is one character of output."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.received = bytearray()

    def read(self, addr: int, size: int) -> int:
        return PORT  # Bochs' "is the console there?" answer

    def write(self, addr: int, size: int, value: int) -> None:
        data = value.to_bytes(size, "little")[:1]  # the port is one byte wide
        self.received += data
        self.out.write(data.decode("latin-1"))
        self.out.flush()


def run_on_mock(banner: bytes, out: TextIO) -> bytes:
    """Serve a simulated guest on the mock Xen; return what the console received."""
    from xendmop.mock import MockXen
    from xendmop.runtime.simguest import SimGuest

    xen = MockXen()
    domid = xen.create_domain(vcpus=1, hvm=True, memory_mb=4)
    console = DebugConsole(out)
    with DeviceModel.open("mock", xen=xen) as dm:
        server = IoreqServer(dm, domid, opener=xen.open_device)
        server.add_port_range(PORT, PORT, console, "debugcon")
        server.start()
        loop = ServeLoop(server)
        thread = threading.Thread(target=loop.run, kwargs={"handle_signals": False}, daemon=True)
        thread.start()
        try:
            guest = SimGuest(xen, domid, timeout=5)
            assert guest.inb(PORT) == PORT, "debug console not detected"
            guest.write_ram(0x1000, banner)
            guest.rep_outsb(PORT, 0x1000, len(banner))  # rep outsb, as a guest's puts does
        finally:
            loop.stop()
            thread.join(5)
        assert xen.domain(domid).snapshot()["servers"] == (None,) * 8, "server left behind"
    return bytes(console.received)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--domid", type=int, help="serve this domain on a real dom0 (default: the mock)")
    args = p.parse_args(argv)
    if args.domid is None:
        run_on_mock(b"Hello from the guest, through port 0xE9!\n", sys.stdout)
        return 0
    with DeviceModel.open("privcmd") as dm:
        server = IoreqServer(dm, args.domid)
        server.add_port_range(PORT, PORT, DebugConsole(sys.stdout), "debugcon")
        server.start()
        ServeLoop(server).run()  # until SIGINT/SIGTERM; tears the server down
    return 0


if __name__ == "__main__":
    sys.exit(main())
