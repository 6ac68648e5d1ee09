"""The mock's Arm vGIC against what Xen/Arm does (xen/arch/arm/dm.c, ``XEN_DMOP_set_irq_level``):
an SPI Xen reserved for a device it emulates itself (the SBSA UART's, xen/arch/arm/vpl011.c) is
refused like an SGI/PPI, the next SPI taken.  Seen the same on real Xen/Arm 4.17 (integration/test_arm.py)."""

from __future__ import annotations

import errno

import pytest

from xendmop import DeviceModel, XenError
from xendmop.mock import MockXen


def test_the_vuarts_spi_is_refused_and_the_next_one_taken() -> None:
    with MockXen(arch="arm", vgic_num_irqs=64) as host, DeviceModel.open("mock", xen=host) as dm:
        domid = host.create_domain(vuart=True)
        with pytest.raises(XenError) as e:
            dm.set_irq_level(domid, 32, 1)
        assert (e.value.errno, e.value.op) == (errno.EINVAL, "set_irq_level")
        assert host.hypervisor.domains[domid].irq_levels == {}
        dm.set_irq_level(domid, 33, 1)
        assert host.hypervisor.domains[domid].irq_levels == {33: 1}


def test_without_a_vuart_spi_32_is_free() -> None:
    with MockXen(arch="arm", vgic_num_irqs=64) as host, DeviceModel.open("mock", xen=host) as dm:
        domid = host.create_domain()
        dm.set_irq_level(domid, 32, 1)
        assert host.hypervisor.domains[domid].irq_levels == {32: 1}


def test_a_vuart_on_x86_is_refused_naming_it() -> None:
    with MockXen() as host, pytest.raises(ValueError, match=r"vuart: .* this mock is x86"):
        host.create_domain(vuart=True)
