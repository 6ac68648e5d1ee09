"""Golden bytes: what reaches ``ioctl`` from xendmop equals what Xen's libxendevicemodel sends.

Both run in subprocesses under ``golden/fakexen.c``, an ``LD_PRELOAD`` fake of
``/dev/xen/*`` below libc that records every request (request number, ``dom``,
``num``, each buffer's size and bytes) and answers like Xen, writing a known
pattern into the results, so that the values both read back are compared too.
Runs twice: with ``IOCTL_PRIVCMD_DM_OP``, and with the fake refusing it (ENOTTY,
a pre-4.11 kernel) so both fall back to ``IOCTL_PRIVCMD_HYPERCALL``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from golden import fake
from golden.calls import CALLS, KERNEL_BUF_MAX, Call, uncovered
from golden.compare import first_difference

from xendmop.abi.xen import DOMID_INVALID

NAMES = ("xendmop", "libxendevicemodel")
RESTRICT = next(i for i, call in enumerate(CALLS) if call.method == "restrict")
CASES = [pytest.param(i, call, id=f"{i:02}-{call.label}") for i, call in enumerate(CALLS)]


def test_every_devicemodel_method_has_a_case() -> None:
    assert uncovered() == set(), "DeviceModel methods without a golden-bytes case"


@pytest.fixture(scope="module")
def dm_op(fakexen: Path) -> tuple[fake.Run, fake.Run]:
    return fake.pair(fakexen, "privcmd", "libxendevicemodel")


@pytest.fixture(scope="module")
def hypercall(fakexen: Path) -> tuple[fake.Run, fake.Run]:
    return fake.pair(fakexen, "privcmd", "libxendevicemodel", dm_op_ioctl=False)


@pytest.mark.parametrize(("index", "call"), CASES)
def test_dm_op_requests_match(dm_op: tuple[fake.Run, fake.Run], index: int, call: Call) -> None:
    ours, theirs = dm_op
    assert ours.requests(index), f"{call.method} sent nothing"
    assert first_difference(ours.requests(index), theirs.requests(index), NAMES) is None
    kinds = {r["event"] for r in ours.requests(index)}
    assert kinds == ({"restrict"} if call.method == "restrict" else {"dm_op"})


@pytest.mark.parametrize(("index", "call"), CASES)
def test_dm_op_results_match(dm_op: tuple[fake.Run, fake.Run], index: int, call: Call) -> None:
    ours, theirs = dm_op
    assert ours.results[index] == theirs.results[index]
    assert "errno" not in ours.results[index]


def test_open_probes_the_same_way(dm_op: tuple[fake.Run, fake.Run]) -> None:
    """An empty DM_OP (num=0) to DOMID_INVALID on /dev/xen/privcmd, as xendevicemodel_open does."""
    ours, theirs = dm_op
    probe = [{"event": "dm_op", "dev": "privcmd", "dom": DOMID_INVALID, "num": 0, "bufs": [], "answer": 0}]
    assert [e for e in ours.opening if e["event"] in fake.REQUESTS] == probe
    assert [e for e in theirs.opening if e["event"] in fake.REQUESTS] == probe


def test_devices_opened_alike(dm_op: tuple[fake.Run, fake.Run]) -> None:
    """privcmd read-write and close-on-exec, as libxendevicemodel.  libxencall also opens the
    hypercall device, which DM_OP never uses; we do not: DM_OP's buffers are ordinary memory
    the kernel pins (backends/buffers.py; Linux 6.12 refuses hypercall pages there)."""
    ours, theirs = dm_op
    assert _opens(theirs) == {("privcmd", 2, True), ("hypercall", 2, True)}
    assert _opens(ours) == {("privcmd", 2, True)}
    assert not [e for e in ours.events() if e["event"] == "mmap"]


def test_hypercall_path_uses_the_hypercall_device(hypercall: tuple[fake.Run, fake.Run]) -> None:
    """Without IOCTL_PRIVCMD_DM_OP, Xen reads our memory directly: hypercall pages, as libxencall's."""
    ours, theirs = hypercall
    assert _opens(ours) == _opens(theirs) == {("privcmd", 2, True), ("hypercall", 2, True)}
    assert [e for e in ours.events() if e["event"] == "mmap"]


def _opens(run: fake.Run) -> set[tuple[str, int, bool]]:
    return {(e["dev"], e["accmode"], e["cloexec"]) for e in run.events() if e["event"] == "open"}


def test_hypercall_buffers_mapped_shared(dm_op: tuple[fake.Run, fake.Run], hypercall: tuple[fake.Run, ...]) -> None:
    for run in (*dm_op, *hypercall):
        for e in run.events():
            if e["event"] == "mmap":
                assert (e["dev"], e["prot"], e["shared"], e["offset"]) == ("hypercall", 3, True, 0)


def test_fake_answers_are_not_trivial(dm_op: tuple[fake.Run, fake.Run]) -> None:
    """The outputs compared above carry the fake's pattern, not zeros (else parsing is untested)."""
    ours, _ = dm_op
    first = {call.method: i for i, call in reversed(list(enumerate(CALLS))) if not call.kwargs}
    by_method = {method: ours.results[i]["value"] for method, i in first.items()}
    assert by_method["create_ioreq_server"] != 0
    assert by_method["nr_vcpus"] != 0
    info = next(ours.results[i]["value"] for i, call in enumerate(CALLS) if call.kwargs.get("gfns"))
    assert all(info)
    bitmap = bytes.fromhex(by_method["track_dirty_vram"]["hex"])
    assert len(bitmap) == 13 and any(bitmap)


SPLIT = [pytest.param(i, call, id=f"{i:02}-{call.label}") for i, call in enumerate(CALLS) if call.requests > 1]


@pytest.mark.parametrize(("index", "call"), SPLIT)
def test_split_to_kernel_limits(dm_op: tuple[fake.Run, fake.Run], index: int, call: Call) -> None:
    """Bulk calls are split so no buffer exceeds privcmd's 4096 bytes; the reference sends
    libxendevicemodel the same chunks (it would otherwise send one oversized buffer)."""
    ours, _ = dm_op
    requests = ours.requests(index)
    assert len(requests) == call.requests
    assert all(buf["size"] <= KERNEL_BUF_MAX for r in requests for buf in r["bufs"])
    assert requests[0]["bufs"][1]["size"] == KERNEL_BUF_MAX


# --- IOCTL_PRIVCMD_HYPERCALL fallback --------------------------------------------------


@pytest.mark.parametrize(("index", "call"), [c for c in CASES if c.values[0] != RESTRICT])
def test_hypercall_fallback_matches(hypercall: tuple[fake.Run, fake.Run], index: int, call: Call) -> None:
    ours, theirs = hypercall
    assert {r["event"] for r in ours.requests(index)} == {"hypercall"}
    assert all(r["op"] == 41 for r in ours.requests(index))  # __HYPERVISOR_dm_op
    assert first_difference(ours.requests(index), theirs.requests(index), NAMES) is None
    assert ours.results[index] == theirs.results[index]


def test_hypercall_fallback_same_requests_as_dm_op(
    dm_op: tuple[fake.Run, fake.Run], hypercall: tuple[fake.Run, fake.Run]
) -> None:
    """The buffers behind HYPERCALL's arg[2] are the ones DM_OP would have carried."""
    for index in range(len(CALLS)):
        if index == RESTRICT:
            continue
        direct = [(r["dom"], r["num"], r["bufs"]) for r in dm_op[0].requests(index)]
        fallback = [(r["dom"], r["num"], r["bufs"]) for r in hypercall[0].requests(index)]
        assert direct == fallback, CALLS[index].label


def test_restrict_fails_without_dm_op(hypercall: tuple[fake.Run, fake.Run]) -> None:
    """A kernel without IOCTL_PRIVCMD_DM_OP has no RESTRICT either: both refuse.

    libxendevicemodel says EOPNOTSUPP without asking the kernel; xendmop asks and
    reports the kernel's ENOTTY."""
    ours, theirs = hypercall
    assert theirs.results[RESTRICT]["errno"] is not None
    assert ours.results[RESTRICT]["errno"] is not None
    assert ours.results[RESTRICT]["op"] == "restrict"
