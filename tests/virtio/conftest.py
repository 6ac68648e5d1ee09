"""Fixtures for virtio tests: a device behind ``VirtioPci``, served on the mock, and the
simulated guest's driver for it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from xendmop.mock import MockXen
from xendmop.mock.simguest import SimGuest
from xendmop.testing import ServeFactory
from xendmop.virtio import VirtioDevice, VirtioPci
from xendmop.virtio.driver import VirtioPciDriver, find_virtio

SLOT = 5


@dataclass
class Setup:
    transport: VirtioPci
    driver: VirtioPciDriver
    guest: SimGuest
    xen: MockXen
    domid: int

    def msis(self) -> tuple[tuple[int, int], ...]:
        """Every MSI the domain received so far (address, data)."""
        return tuple(self.xen.domain(self.domid).snapshot()["msis"])

    def msis_for(self, vector: int) -> int:
        data = self.driver.msi_vector_data(vector)
        return sum(1 for _, d in self.msis() if d == data)

    def intx(self) -> bool:
        """INTA# of the device's slot as the domain sees it."""
        return bool(self.xen.domain(self.domid).snapshot()["irq"][1] & 1 << (SLOT * 4))


VirtioFactory = Callable[..., Setup]


@pytest.fixture
def virtio(serve: ServeFactory, guest: SimGuest, xen_host: MockXen, hvm_domain: int) -> VirtioFactory:
    """``virtio(device, msix=True, **transport_options)``: serve ``device`` at slot 5 and
    return a ``Setup`` whose driver has probed it (not yet negotiated)."""

    def make(device: VirtioDevice, *, msix: bool = True, **options: Any) -> Setup:
        holder: list[Any] = []
        transport = VirtioPci(device, lambda: holder[0].dispatcher.memory if holder else None, **options)
        holder.append(serve(pci={SLOT: transport.pci}))
        sbdf = find_virtio(guest, device.device_type)
        return Setup(transport, VirtioPciDriver(guest, sbdf, msix=msix), guest, xen_host, hvm_domain)

    return make
