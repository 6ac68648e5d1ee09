"""debugcon: the port-0xE9 debug console, the smallest useful device model.

A guest writes bytes to I/O port 0xE9 (as Bochs, QEMU's ``-debugcon`` and Xen's own
``guest_loglvl`` console do); this device model prints them, and answers reads of the
port with 0xE9 so a guest can detect it.

Run it:

    python examples/debugcon.py              # on the mock Xen: a simulated guest prints a banner
    python examples/debugcon.py --domid 5    # on a real dom0: serve domain 5 until Ctrl-C
    XENDMOP_MOCK_SOCKET=PATH python examples/debugcon.py --domid 1 --depriv 990:990
                                             # domain 1 of a mock host process, deprivileged

On the mock, the simulated guest's vCPU writes an ioreq into the real shared page,
notifies the server's event channel and waits for the answer, exactly as Xen would.
With ``--domid`` the guest's bytes go to stdout, and once the server is up (and
deprivileged) ``debugcon: serving domN's port 0xe9; Ctrl-C to stop`` to stderr.
The server is torn down on exit (also on Ctrl-C/SIGTERM), so no server is left in Xen;
Ctrl-C and SIGTERM are the ordinary way to stop, and exit 0 (``--help`` lists the statuses).
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from xendmop.runtime import ServeLoop, app

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
    from xendmop.runtime.simguest import SimGuest

    console = DebugConsole(out)
    with app.open_mock() as mock:
        server = mock.ioreq_server()
        server.add_port_range(PORT, PORT, console, "debugcon")

        def guest() -> None:
            vcpu = SimGuest(mock.mock_xen, mock.domid, timeout=5)
            if vcpu.inb(PORT) != PORT:
                raise RuntimeError("debug console not detected")
            vcpu.write_ram(0x1000, banner)
            vcpu.rep_outsb(PORT, 0x1000, len(banner))  # rep outsb, as a guest's puts does

        app.run_guest_while_serving(ServeLoop(server), guest)
        mock.check_no_server_left()
    return bytes(console.received)


def serve(connection: app.Connection) -> int:
    """Serve the console to a real domain (or a mock host's) until SIGINT/SIGTERM; 0 once the server is destroyed."""
    server = connection.ioreq_server()
    server.add_port_range(PORT, PORT, DebugConsole(sys.stdout), "debugcon")

    def ready() -> None:  # only once the server is up: a refused domain is never announced
        drop = connection.drop
        dropped = f"; deprivileged to uid {drop.uid} gid {drop.gid}" if drop else ""
        print(
            f"debugcon: serving dom{connection.domid}'s port {PORT:#x}{dropped}; Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )

    signum = app.serve_until_signal(ServeLoop(server), on_ready=ready)  # tears the server down on the way out
    print(app.stopped_line("debugcon", signum), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=app.EXIT_STATUS_HELP)
    app.add_arguments(p)
    _, target = app.parse(p, argv)
    if target.where is app.Where.MOCK:
        run_on_mock(b"Hello from the guest, through port 0xE9!\n", sys.stdout)
        return 0
    return app.run_target(target, serve, name="debugcon")


if __name__ == "__main__":
    sys.exit(main())
