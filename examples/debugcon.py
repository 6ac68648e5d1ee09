"""debugcon: a debug console on one I/O port, the smallest useful device model.

A guest writes bytes to the port (as to Bochs' and QEMU's ``isa-debugcon``); this device
model prints them, and answers reads of the port with 0xE9, Bochs' "the console is here"
value, so a guest can detect it.

The port is ``--port`` (default 0x402, where OVMF and QEMU's ``-debugcon`` recipes put it),
not the classic 0xE9: **Xen handles port 0xE9 itself for every HVM and PVH guest**
(``hvm_print_line`` in ``xen/arch/x86/hvm/hvm.c``, registered for each HVM domain before
any ioreq server is asked), so a guest's bytes there go to the hypervisor's console, in
``xl dmesg`` as ``(dN) ...`` lines, and never reach a device model.  Serving 0xE9 on Xen
is therefore refused as a usage error; the example says so at start.

Run it:

    python examples/debugcon.py              # on the mock Xen: a simulated guest prints a banner
    python examples/debugcon.py --domid 5    # on a real dom0: serve domain 5's port 0x402 until Ctrl-C
    python examples/debugcon.py --domid 5 --port 0x500
    XENDMOP_MOCK_SOCKET=PATH python examples/debugcon.py --domid 1 --depriv 990:990
                                             # domain 1 of a mock host process, deprivileged

On the mock, the simulated guest's vCPU writes an ioreq into the real shared page,
notifies the server's event channel and waits for the answer, exactly as Xen would.
With ``--domid`` the guest's bytes go to stdout, and once the server is up (and
deprivileged) ``debugcon: serving domN's port 0x402; Ctrl-C to stop`` to stderr.
The server is torn down on exit (also on Ctrl-C/SIGTERM), so no server is left in Xen;
Ctrl-C and SIGTERM are the ordinary way to stop, and exit 0 (``--help`` lists the statuses).
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from xendmop.runtime import ServeLoop, dm_program

DEFAULT_PORT = 0x402
XEN_DEBUG_PORT = 0xE9  # Xen's own (XEN_HVM_DEBUGCONS_IOPORT): never forwarded to an ioreq server
DETECT = 0xE9  # what a read of the port answers


def parse_port(text: str) -> int:
    """``--port``: an I/O port, 0..0xffff, decimal or 0x-hex; Xen's own 0xE9 is refused."""
    try:
        port = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an I/O port, 0..0xffff (decimal or 0x-hex)") from None
    if not 0 <= port <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an I/O port, 0..0xffff")
    if port == XEN_DEBUG_PORT:
        raise argparse.ArgumentTypeError(
            "0xe9: Xen handles port 0xe9 itself for every HVM and PVH guest (the output is in `xl dmesg`);"
            " no ioreq server ever sees it, so choose another port"
        )
    return port


class DebugConsole:
    """One port: each byte written is one character of output."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.received = bytearray()

    def read(self, addr: int, size: int) -> int:
        return DETECT  # Bochs' "is the console there?" answer

    def write(self, addr: int, size: int, value: int) -> None:
        data = value.to_bytes(size, "little")[:1]  # the port is one byte wide
        self.received += data
        self.out.write(data.decode("latin-1"))
        self.out.flush()


def run_on_mock(banner: bytes, out: TextIO, port: int = DEFAULT_PORT) -> bytes:
    """Serve a simulated guest on the mock Xen; return what the console received."""
    from xendmop.mock.simguest import SimGuest

    console = DebugConsole(out)
    with dm_program.open_mock() as mock:
        server = mock.ioreq_server()
        server.add_port_range(port, port, console, "debugcon")

        def guest() -> None:
            vcpu = SimGuest(mock.mock_xen, mock.domid, timeout=5)
            if vcpu.inb(port) != DETECT:
                raise RuntimeError("debug console not detected")
            vcpu.write_ram(0x1000, banner)
            vcpu.rep_outsb(port, 0x1000, len(banner))  # rep outsb, as a guest's puts does

        dm_program.run_guest_while_serving(ServeLoop(server), guest)
        mock.check_no_server_left()
    return bytes(console.received)


def serve(connection: dm_program.Connection, port: int = DEFAULT_PORT) -> int:
    """Serve the console to a real domain (or a mock host's) until SIGINT/SIGTERM; 0 once the server is destroyed."""
    server = connection.ioreq_server()
    server.add_port_range(port, port, DebugConsole(sys.stdout), "debugcon")

    def ready() -> None:  # only once the server is up: a refused domain is never announced
        drop = connection.drop
        dropped = f"; deprivileged to uid {drop.uid} gid {drop.gid}" if drop else ""
        print(f"debugcon: {XEN_PORT_NOTE}", file=sys.stderr)
        print(
            f"debugcon: serving dom{connection.domid}'s port {port:#x}{dropped}; Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )

    signum = dm_program.serve_until_signal(ServeLoop(server), on_ready=ready)  # tears the server down on the way out
    print(dm_program.stopped_line("debugcon", signum), file=sys.stderr)
    return 0


XEN_PORT_NOTE = (
    "Xen handles port 0xe9 itself for every HVM and PVH guest (the guest's bytes there are in `xl dmesg`),"
    " so this console serves another port (--port)."
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=XEN_PORT_NOTE + "\n\n" + dm_program.EXIT_STATUS_HELP
    )
    dm_program.add_arguments(p)
    p.add_argument("--port", type=parse_port, default=DEFAULT_PORT, help="the I/O port to serve (default: 0x402)")
    args, target = dm_program.parse(p, argv)
    if target.where is dm_program.Where.MOCK:
        run_on_mock(f"Hello from the guest, through port {args.port:#x}!\n".encode(), sys.stdout, args.port)
        return 0
    return dm_program.run_target(target, lambda connection: serve(connection, args.port), name="debugcon")


if __name__ == "__main__":
    sys.exit(main())
