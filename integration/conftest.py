"""Live tests against a real Xen: run in a dom0, e.g. through integration/lab/run.py.

Everything here is skipped, with the reason, on a host without /dev/xen/privcmd, so
`pytest integration/` is harmless anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import xenlab


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "x86_only(what): the test needs x86 (says what); skipped on Arm")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not xenlab.have_xen():
        skip = pytest.mark.skip(reason=xenlab.skip_reason())
        for item in items:
            item.add_marker(skip)
        return
    if xenlab.X86:
        return
    for item in items:
        marker = item.get_closest_marker("x86_only")
        if marker is not None:
            item.add_marker(pytest.mark.skip(reason=xenlab.x86_only_reason(*marker.args)))


@pytest.fixture(scope="session")
def hvm_initramfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Linux HVM test guest's initramfs (hvmguest.build_initramfs), built once per session."""
    if not xenlab.X86:
        pytest.skip(xenlab.x86_only_reason("HVM Linux guests with QEMU, SeaBIOS and PCI: Xen/Arm has no HVM guests"))
    import hvmguest

    return hvmguest.build_initramfs(tmp_path_factory.mktemp("initramfs"))


@pytest.fixture
def privcmd_fd() -> Iterator[int]:
    fd = os.open(xenlab.PRIVCMD, os.O_RDWR | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def libxdm() -> Iterator[xenlab.LibXDM]:
    with xenlab.LibXDM() as lib:
        yield lib


@pytest.fixture
def make_guest() -> Iterator[Callable[..., xenlab.Guest]]:
    """Factory: make_guest(script=None, vcpus=1) creates a paused tiny guest running `script`
    once unpaused (``on_poweroff="preserve"`` keeps its domain when it is done): PVH on x86, the
    Arm64 guest (MMIO records only) on Arm.  Every guest made is destroyed after the test."""
    made: list[xenlab.Guest] = []

    def make(
        script: xenlab.Script | None = None, vcpus: int = 1, memory_mb: int = 16, on_poweroff: str = "destroy"
    ) -> xenlab.Guest:
        guest = xenlab.create_guest(script, vcpus=vcpus, memory_mb=memory_mb, on_poweroff=on_poweroff)
        made.append(guest)
        return guest

    yield make
    for guest in made:
        guest.destroy()


@pytest.fixture
def guest(make_guest: Callable[..., xenlab.Guest]) -> xenlab.Guest:
    """A paused 2-vCPU tiny guest (PVH on x86) with an empty script (it powers off when unpaused)."""
    return make_guest(vcpus=2)


@pytest.fixture
def pv_domid() -> Iterator[int | None]:
    """A paused PV domain's domid, or None (saying why) if this Xen cannot build one (x86 PV:
    Xen/Arm has no PV guests)."""
    if not xenlab.X86:
        print(xenlab.x86_only_reason("PV guests"))
        yield None
        return
    try:
        guest = xenlab.create_pv_guest()
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"no PV guest: {e}")
        yield None
        return
    try:
        yield guest.domid
    finally:
        guest.destroy()


@pytest.fixture
def missing_domid() -> int:
    """A guest domid that no domain has now."""
    used = {int(line.split()[1]) for line in xenlab.xl("list").splitlines()[1:]}
    return next(d for d in range(30000, 0x7FF0) if d not in used)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """For integration/run_tests.py: each failure, and the triple faults Xen logged for the
    Linux HVM guests its test module created (none: a failure of ours, never retried)."""
    record = os.environ.get("XENDMOP_FAILURES")
    if not report.failed or not record:
        return
    import hvmguest

    crashes = hvmguest.crashed_guests(report.nodeid.split("::")[0])
    with open(record, "a") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "crashes": crashes}) + "\n")
