"""Fixtures shared by the tests that run under the fake /dev/xen devices (tests/golden/)."""

from __future__ import annotations

from pathlib import Path

import pytest
from golden import fake


@pytest.fixture(scope="session")
def fakexen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LD_PRELOAD fake, built once per run (skips with the reason if it cannot be)."""
    fake.need_libxendevicemodel()
    return fake.build(tmp_path_factory.mktemp("fakexen"))
