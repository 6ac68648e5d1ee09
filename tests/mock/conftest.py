from __future__ import annotations

import pytest

from xendmop.mock import MockXen

from .raw import Raw

HVM, PV, NOHAP = 1, 2, 3


def make_host(**options: object) -> MockXen:
    """dom1 HVM (2 vCPUs, 4 MiB), dom2 PV, dom3 HVM without HAP."""
    host = MockXen(**options)  # type: ignore[arg-type]
    host.create_domain(vcpus=2, hvm=True, memory_mb=4)
    host.create_domain(vcpus=1, hvm=False, memory_mb=1)
    host.create_domain(vcpus=1, hvm=True, memory_mb=1, hap=False)
    return host


@pytest.fixture
def host() -> MockXen:
    return make_host()


@pytest.fixture
def raw(host: MockXen) -> Raw:
    return Raw(host)
