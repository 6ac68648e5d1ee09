"""What every ``examples/virtio_*.py`` shares around its device: the command line
(``runtime.dm_program``'s ``--domid/--depriv/--chroot``, ``--hold``, ``--assume-hvm``, ``--slot``),
serving a real dom0 or a mock host process until SIGINT/SIGTERM, and on the in-process mock
a simulated guest whose virtio driver (``driver.VirtioPciDriver``) uses the device."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..runtime import ServeLoop, dm_program
from .device import VirtioDevice
from .driver import VirtioPciDriver, find_virtio
from .pci import VirtioPci

if TYPE_CHECKING:
    from ..depriv import DropConfig

__all__ = ["DeviceSetupError", "Example", "drop_for"]

log = logging.getLogger("xendmop.virtio")

#: the mock domain's RAM for the examples; the guest driver's rings and buffers live in its 1-3 MiB
MOCK_MEMORY_MB = 8


class DeviceSetupError(RuntimeError):
    """``make_device`` could not open the device's host side (an ``OSError``: a tap without
    CAP_NET_ADMIN, a missing file); reported as one line and exit status 1."""


def drop_for(device: VirtioDevice, drop: DropConfig | None) -> DropConfig | None:
    """``drop`` with RLIMIT_FSIZE raised to what ``device`` writes on the host
    (``host_write_extent``: a disk's size), when the default would be lower.  The default
    (256 KiB, from Xen's qemu-deprivilege.md) made every write past it fail with EFBIG: a
    deprivileged virtio_blk served reads and answered each guest write with an I/O error."""
    need = device.host_write_extent
    if drop is None or drop.rlimits is None or drop.rlimits.fsize is None or drop.rlimits.fsize >= need:
        return drop
    log.info("RLIMIT_FSIZE %d -> %d: the device writes that far into its file", drop.rlimits.fsize, need)
    return dataclasses.replace(drop, rlimits=dataclasses.replace(drop.rlimits, fsize=need))


class Example:
    """One virtio example: ``name``, its parser (from ``__doc__``), how to make the device from
    the parsed arguments, and the simulated guest's script on the mock (``guest_script(driver,
    device, args)``: lines to print).

    ``add_arguments(parser)``: the example's own flags; ``validate(args)``: a usage error's
    message or None; ``attach(device, loop)``: add the device's host fds to the loop;
    ``close(device)``: release what ``make_device`` opened, once serving is over."""

    def __init__(
        self,
        name: str,
        doc: str | None,
        make_device: Callable[[argparse.Namespace], VirtioDevice],
        guest_script: Callable[[VirtioPciDriver, VirtioDevice, argparse.Namespace], list[str]],
        *,
        add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
        validate: Callable[[argparse.Namespace], str | None] | None = None,
        attach: Callable[[VirtioDevice, ServeLoop], None] | None = None,
        close: Callable[[VirtioDevice], None] | None = None,
        default_slot: int = 5,
    ) -> None:
        self.name = name
        self.parser = argparse.ArgumentParser(
            description=(doc or name).splitlines()[0],
            epilog=dm_program.EXIT_STATUS_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        dm_program.add_arguments(self.parser, hold=True, assume_hvm=True)
        self.parser.add_argument(
            "--slot", type=int, default=default_slot, choices=range(1, 32), metavar="1..31", help="PCI slot on bus 0"
        )
        if add_arguments is not None:
            add_arguments(self.parser)
        self.make_device = make_device
        self.guest_script = guest_script
        self.validate = validate
        self.attach = attach
        self.close = close

    def _make_device(self, args: argparse.Namespace) -> VirtioDevice:
        try:
            return self.make_device(args)
        except OSError as e:
            raise DeviceSetupError(f"cannot set the device up: {e}") from e

    def run_on_mock(
        self, args: argparse.Namespace, *, out: Callable[[str], None] = print
    ) -> tuple[list[str], VirtioPci] | None:
        """Serve the device to a simulated guest on the in-process mock and run the guest's
        script; returns its lines and the transport, or None when a signal ended the run first."""
        device = self._make_device(args)
        try:
            return self._run_on_mock(args, device, out)
        finally:
            if self.close is not None:
                self.close(device)

    def _run_on_mock(
        self, args: argparse.Namespace, device: VirtioDevice, out: Callable[[str], None]
    ) -> tuple[list[str], VirtioPci] | None:
        from ..mock.simguest import SimGuest

        with dm_program.open_mock(memory_mb=MOCK_MEMORY_MB) as mock:
            server = mock.ioreq_server()
            transport = VirtioPci(device, lambda: server.dispatcher.memory, ram_limit=MOCK_MEMORY_MB << 20)
            server.add_pci(transport.pci, slot=args.slot, name=self.name)
            loop = ServeLoop(server)
            transport.attach(loop)  # notifications answered at once, queues served right after
            if self.attach is not None:
                self.attach(device, loop)

            def guest() -> list[str]:
                sim = SimGuest(mock.mock_xen, mock.domid, timeout=5)
                driver = VirtioPciDriver(sim, find_virtio(sim, device.device_type))
                return self.guest_script(driver, device, args)

            try:
                lines = dm_program.run_guest_script(
                    mock, loop, guest, lines=lambda lines: lines, hold=args.hold, out=out
                )
            finally:
                transport.close()
        return None if lines is None else (lines, transport)

    def main(self, argv: list[str] | None = None) -> int:
        args, target = dm_program.parse(self.parser, argv)
        problem = self.validate(args) if self.validate is not None else None
        if problem is not None:
            self.parser.error(problem)
        if target.where is dm_program.Where.MOCK:
            try:
                self.run_on_mock(args)
            except DeviceSetupError as e:  # the device's host side (a tap, a file) could not be opened
                print(f"{self.name}: {e}", file=sys.stderr)
                return 1
            return 0

        def serve(connection: dm_program.Connection) -> int:
            """Serve the device until SIGINT/SIGTERM; the server is destroyed on the way out."""
            device = self._make_device(args)
            transport: VirtioPci | None = None
            try:
                server = connection.ioreq_server(deprivilege=drop_for(device, connection.drop))
                transport = VirtioPci(device, lambda: server.dispatcher.memory)
                server.add_pci(transport.pci, slot=args.slot, name=self.name)
                loop = ServeLoop(server)
                transport.attach(loop)  # notifications answered at once, queues served right after
                if self.attach is not None:
                    self.attach(device, loop)

                def ready() -> None:  # once the server is up (and deprivileged): a refused domain is never announced
                    drop = connection.drop
                    dropped = f"; deprivileged to uid {drop.uid} gid {drop.gid}" if drop else ""
                    print(
                        f"{self.name}: serving dom{connection.domid}'s {self.name} at 0000:00:{args.slot:02x}.0"
                        f"{dropped}; Ctrl-C to stop",
                        file=sys.stderr,
                        flush=True,
                    )

                signum = dm_program.serve_until_signal(loop, on_ready=ready)
            finally:
                if transport is not None:
                    transport.close()
                if self.close is not None:
                    self.close(device)
            print(dm_program.stopped_line(self.name, signum), file=sys.stderr)
            return 0

        # MSI-X and INTx go out: a domain that is not HVM is refused before anything is opened.
        return dm_program.run_target(target, serve, name=self.name, parser=self.parser, hvm_only=True)
