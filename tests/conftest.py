"""Fixtures shared across tests/: the LD_PRELOAD fake of /dev/xen (tests/golden/) and an empty chroot."""

from __future__ import annotations

from pathlib import Path

import pytest
from golden import fake


@pytest.fixture(scope="session")
def fakexen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LD_PRELOAD fake, built once per run (skips with the reason if it cannot be)."""
    fake.need_libxendevicemodel()
    return fake.build(tmp_path_factory.mktemp("fakexen"))


@pytest.fixture
def empty_root(tmp_path: Path) -> Path:
    """An empty directory owned by root, mode 0755, for chroot."""
    root = tmp_path / "root"
    root.mkdir()
    root.chmod(0o755)
    return root
