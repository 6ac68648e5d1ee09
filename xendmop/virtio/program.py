"""What every ``examples/virtio_*.py`` shares around its device: the command line
(``runtime.dm_program``'s ``--domid/--depriv/--chroot``, ``--hold``, ``--assume-hvm``, ``--slot``
or ``--mmio``), serving a real dom0 or a mock host process until SIGINT/SIGTERM, and on the
in-process mock a simulated guest whose virtio driver (``driver.VirtioPciDriver``, or
``driver.VirtioMmioDriver`` on an Arm mock with ``--mmio``) uses the device.

``--slot N``: a PCI function at 0000:00:N.0 of an x86 HVM guest (MSI-X or INTx).
``--mmio N``: the virtio-mmio transport in libxl's N-th slot of an Arm guest (base
0x0200_0000 + N * 0x200, SPI 33 + N; ``mmio.slot_address``), where xl put a ``virtio,mmio``
node in the guest's device tree (xl's ``virtio = [...]`` from 4.18, a disk with
``specification=virtio`` in 4.17; see README)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..runtime import ServeLoop, dm_program
from .device import VirtioDevice
from .driver import VirtioDriver, VirtioMmioDriver, VirtioPciDriver, find_virtio
from .mmio import VirtioMmio, slot_address
from .pci import VirtioPci
from .transport import VirtioTransport

if TYPE_CHECKING:
    from ..depriv import DropConfig
    from ..runtime import IoreqServer
    from ..runtime.dispatch import GuestMemory

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


def mmio_problem(args: argparse.Namespace, where: dm_program.Where, machine: str) -> str | None:
    """``--mmio`` on a real x86 dom0: its interrupt would be ``XEN_DMOP_set_irq_level``, which
    only Xen/Arm has (x86 answers EOPNOTSUPP), so the device would never interrupt: refused."""
    if getattr(args, "mmio", None) is None or where is not dm_program.Where.XEN:
        return None
    if machine.startswith(("aarch64", "arm")):
        return None
    return (
        f"--mmio {args.mmio}: virtio-mmio interrupts need Xen/Arm's set_irq_level; this dom0 is {machine} (use --slot)"
    )


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
        guest_script: Callable[[VirtioDriver, VirtioDevice, argparse.Namespace], list[str]],
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
        where = self.parser.add_mutually_exclusive_group()
        where.add_argument(
            "--slot", type=int, default=default_slot, choices=range(1, 32), metavar="1..31", help="PCI slot on bus 0"
        )
        where.add_argument(
            "--mmio",
            type=int,
            choices=range(0, 11),
            metavar="0..10",
            help="virtio-mmio in libxl's Nth slot of an Arm guest (base 0x2000000 + N*0x200, SPI 33 + N), not PCI",
        )
        if add_arguments is not None:
            add_arguments(self.parser)
        self.make_device = make_device
        self.guest_script = guest_script
        self.validate = validate
        self.attach = attach
        self.close = close

    @staticmethod
    def place(
        device: VirtioDevice, server: IoreqServer, args: argparse.Namespace, name: str, *, ram_limit: int | None = None
    ) -> tuple[VirtioTransport, str]:
        """``device`` on ``server`` where ``args`` say (``--slot`` or ``--mmio``); returns the
        transport and where the guest finds it, for the log line."""

        def memory() -> GuestMemory | None:  # read at each access: None until the server is up
            return server.dispatcher.memory

        if args.mmio is not None:
            base, irq = slot_address(args.mmio)
            mmio = VirtioMmio(device, memory, base=base, irq=irq, ram_limit=ram_limit)
            mmio.add_to(server, name)
            return mmio, f"virtio-mmio {base:#x} (SPI {irq})"
        pci = VirtioPci(device, memory, ram_limit=ram_limit)
        server.add_pci(pci.pci, slot=args.slot, name=name)
        return pci, f"0000:00:{args.slot:02x}.0"

    def _make_device(self, args: argparse.Namespace) -> VirtioDevice:
        try:
            return self.make_device(args)
        except OSError as e:
            raise DeviceSetupError(f"cannot set the device up: {e}") from e

    def run_on_mock(
        self, args: argparse.Namespace, *, out: Callable[[str], None] = print
    ) -> tuple[list[str], VirtioTransport] | None:
        """Serve the device to a simulated guest on the in-process mock (an Arm one with
        ``--mmio``) and run the guest's script; returns its lines and the transport, or None
        when a signal ended the run first."""
        device = self._make_device(args)
        try:
            return self._run_on_mock(args, device, out)
        finally:
            if self.close is not None:
                self.close(device)

    def _run_on_mock(
        self, args: argparse.Namespace, device: VirtioDevice, out: Callable[[str], None]
    ) -> tuple[list[str], VirtioTransport] | None:
        from ..mock import MockXen
        from ..mock.simguest import SimGuest

        with contextlib.ExitStack() as stack:
            xen = stack.enter_context(MockXen(arch="arm" if args.mmio is not None else "x86"))
            mock = stack.enter_context(dm_program.open_mock(xen, memory_mb=MOCK_MEMORY_MB))
            server = mock.ioreq_server()
            transport, _ = self.place(device, server, args, self.name, ram_limit=MOCK_MEMORY_MB << 20)
            loop = ServeLoop(server)
            transport.attach(loop)  # notifications answered at once, queues served right after
            if self.attach is not None:
                self.attach(device, loop)

            def guest() -> list[str]:
                sim = SimGuest(mock.mock_xen, mock.domid, timeout=5)
                driver: VirtioDriver
                if isinstance(transport, VirtioMmio):
                    driver = VirtioMmioDriver(sim, transport.base)
                else:
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
        if problem is None:
            problem = mmio_problem(args, target.where, os.uname().machine)
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
            transport: VirtioTransport | None = None
            try:
                server = connection.ioreq_server(deprivilege=drop_for(device, connection.drop))
                transport, where = self.place(device, server, args, self.name)
                loop = ServeLoop(server)
                transport.attach(loop)  # notifications answered at once, queues served right after
                if self.attach is not None:
                    self.attach(device, loop)

                def ready() -> None:  # once the server is up (and deprivileged): a refused domain is never announced
                    drop = connection.drop
                    dropped = f"; deprivileged to uid {drop.uid} gid {drop.gid}" if drop else ""
                    print(
                        f"{self.name}: serving dom{connection.domid}'s {self.name} at {where}{dropped}; Ctrl-C to stop",
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
        # (An Arm guest's SPI needs no such check: Xen/Arm's dm_op serves any domain.)
        hvm_only = args.mmio is None
        return dm_program.run_target(target, serve, name=self.name, parser=self.parser, hvm_only=hvm_only)
