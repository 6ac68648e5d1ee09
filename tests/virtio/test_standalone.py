"""``xendmop.virtio.standalone``: the backend's side of xl 4.17's wait for standalone virtio disks,
against a Xenstore tree kept here and reached through the same tool command lines."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xendmop.virtio.standalone import ROOT, StandaloneBackends

REPO = Path(__file__).resolve().parents[2]


class FakeXenstore:
    """``xenstore-ls -f DIR`` and ``xenstore-write PATH VALUE`` over a dict, as the tools print them."""

    def __init__(self, nodes: dict[str, str], refuse: set[str] | None = None) -> None:
        self.nodes = nodes
        self.refuse = refuse or set()
        self.writes: list[tuple[str, str]] = []

    def __call__(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        if args[:2] == ["xenstore-ls", "-f"]:
            under = [p for p in sorted(self.nodes) if p.startswith(args[2] + "/")]
            if not under:
                return subprocess.CompletedProcess(args, 1, "", f"xenstore-ls: could not access {args[2]}\n")
            return subprocess.CompletedProcess(args, 0, "".join(f'{p} = "{self.nodes[p]}"\n' for p in under), "")
        if args[0] == "xenstore-write":
            if args[1] in self.refuse:
                return subprocess.CompletedProcess(args, 1, "", "could not write path\n")
            self.nodes[args[1]] = args[2]
            self.writes.append((args[1], args[2]))
            return subprocess.CompletedProcess(args, 0, "", "")
        raise AssertionError(args)


def _disk(domid: int, devid: int, state: str) -> dict[str, str]:
    d = f"{ROOT}/{domid}/{devid}"
    return {f"{d}/frontend": f"/local/domain/{domid}/device/virtio_disk/{devid}", f"{d}/state": state,
            f"{d}/base": "33554432", f"{d}/irq": "33", f"{d}/params": "/tmp/disk.img"}  # fmt: skip


def test_each_new_disk_is_answered_init_wait_once() -> None:
    xs = FakeXenstore({**_disk(5, 51712, "1"), **_disk(5, 51728, "1"), **_disk(4, 51712, "4")})
    watcher = StandaloneBackends(run=xs)
    assert watcher.poll() == 2
    assert sorted(xs.writes) == [(f"{ROOT}/5/51712/state", "2"), (f"{ROOT}/5/51728/state", "2")]
    assert watcher.poll() == 0  # InitWait and Connected are libxl's and the frontend's to move on
    assert watcher.answered == [f"{ROOT}/5/51712: 1 -> 2", f"{ROOT}/5/51728: 1 -> 2"]


def test_closing_is_answered_closed() -> None:
    xs = FakeXenstore(_disk(7, 51712, "5"))
    StandaloneBackends(run=xs).poll()
    assert xs.nodes[f"{ROOT}/7/51712/state"] == "6"


def test_nothing_to_answer_when_no_disk_exists() -> None:
    xs = FakeXenstore({"/local/domain/0/backend/vbd/5/51712/state": "1"})  # a PV disk: not ours
    assert StandaloneBackends(run=xs).poll() == 0 and xs.writes == []


def test_a_refused_write_is_kept_as_an_error_and_tried_again() -> None:
    path = f"{ROOT}/5/51712/state"
    xs = FakeXenstore(_disk(5, 51712, "1"), refuse={path})
    watcher = StandaloneBackends(run=xs)
    assert watcher.poll() == 0 and watcher.errors == [f"{path}: could not write path"]
    xs.refuse.clear()
    assert watcher.poll() == 1


def test_the_thread_answers_while_it_runs() -> None:
    xs = FakeXenstore(_disk(5, 51712, "1"))
    with StandaloneBackends(run=xs, interval=0.01) as watcher:
        for _ in range(500):
            if watcher.answered:
                break
            time.sleep(0.01)
    assert watcher.answered == [f"{ROOT}/5/51712: 1 -> 2"]


def test_a_relative_root_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"root='local/domain': must be an absolute Xenstore path"):
        StandaloneBackends("local/domain")


def test_the_command_says_which_tool_is_missing(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "xendmop", "virtio-disk-backends"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": str(tmp_path), "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 1
    assert "xenstore-ls and xenstore-write not found (Debian: xenstore-utils)" in done.stderr
