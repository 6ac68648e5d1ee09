from __future__ import annotations

from collections.abc import Iterator

import pytest

from xendmop.mock import MockXen

from .raw import Raw

HVM, PV, NOHAP = 1, 2, 3


_made: list[MockXen] = []


def make_host(**options: object) -> MockXen:
    """dom1 HVM (2 vCPUs, 4 MiB), dom2 PV, dom3 HVM without HAP (closed after the test at the latest)."""
    host = MockXen(**options)  # type: ignore[arg-type]
    _made.append(host)
    host.create_domain(vcpus=2, hvm=True, memory_mb=4)
    host.create_domain(vcpus=1, hvm=False, memory_mb=1)
    host.create_domain(vcpus=1, hvm=True, memory_mb=1, hap=False)
    return host


@pytest.fixture
def host() -> Iterator[MockXen]:
    with make_host() as h:
        yield h


@pytest.fixture
def raw(host: MockXen) -> Raw:
    return Raw(host)


@pytest.fixture(autouse=True)
def _close_hosts() -> Iterator[None]:
    """Every host a test made with ``make_host`` is closed when the test ends (no fd leaks)."""
    yield
    while _made:
        _made.pop().close()
