"""Real processes: a child deprivileges itself; depriv-check inspects it from outside."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from xendmop.depriv import STEPS, check

from .helpers import REPO, TIMEOUT, needs_root

DOMID = 7
UID = GID = 60000 + DOMID

# The child holds a memfd, a socket, /dev/null, a pipe and a stand-in for the
# hypercall-buffer fd; restricts (nothing to restrict here; the stand-in is neutered)
# and drops privileges as its JSON config says; reports; then blocks on stdin.
CHILD = r"""
import json, os, socket, sys
from xendmop.depriv import DropConfig, RLimits, drop_privileges, fail_closed, restrict_all

cfg = json.loads(sys.argv[1])
fds = {"memfd": os.memfd_create("guest-ram"), "devnull": os.open(os.devnull, os.O_RDWR)}
sock, peer = socket.socketpair()
fds["socket"] = sock.fileno()
fds["pipe"], pipe_w = os.pipe()
fds["hypercall"] = os.open(cfg["fake_hypercall"], os.O_RDWR)
if cfg["keep_dir"]:
    fds["dir"] = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
if cfg["groups"]:
    os.setgroups(cfg["groups"])
with fail_closed():
    restrict_all(cfg["domid"], [], neuter=[fds["hypercall"]])
    report = drop_privileges(DropConfig(
        uid=cfg["uid"], gid=cfg["gid"], chroot=cfg["chroot"], clear_groups=cfg["clear_groups"],
        no_new_privs=cfg["no_new_privs"], rlimits=RLimits() if cfg["rlimits"] else None,
    ))
try:
    os.setuid(0)
    back = 0
except OSError as e:
    back = e.errno
print(json.dumps({"fds": fds, "setuid0": back, "steps": [s for s, _ in report.steps]}), flush=True)
sys.stdin.read()
"""


def child_config(tmp_path: Path, root: Path, **changes: Any) -> str:
    fake = tmp_path / "hypercall"
    fake.write_bytes(b"x")
    cfg = {
        "domid": DOMID,
        "uid": UID,
        "gid": GID,
        "chroot": str(root),
        "clear_groups": True,
        "no_new_privs": True,
        "rlimits": True,
        "groups": [],
        "keep_dir": False,
        "fake_hypercall": str(fake),
    }
    cfg.update(changes)
    return json.dumps(cfg)


def run_check(pid: int, *extra: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    code = check.main([str(pid), "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


def by_name(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in result["checks"]}


@needs_root
def test_deprivileged_child_passes_every_check(spawn, tmp_path, empty_root, capsys):
    child = spawn(CHILD, child_config(tmp_path, empty_root))
    told = child.ready()
    assert told["setuid0"] == errno.EPERM, "no way back: setuid(0) must fail with EPERM"
    assert told["steps"] == list(STEPS)

    code, result = run_check(child.pid, "--uid", str(UID), "--gid", str(GID), capsys=capsys)
    checks = by_name(result)
    assert result["findings"] == [] and code == 0, result["findings"]
    assert checks["uids"]["value"] == [UID] * 4 and checks["gids"]["value"] == [GID] * 4
    assert checks["groups"]["value"] == []
    assert checks["root"]["value"] == str(empty_root) and checks["root-empty"]["status"] == "pass"
    assert checks["cwd"]["value"] == str(empty_root)
    assert checks["no_new_privs"]["value"] is True
    assert checks["capabilities"]["status"] == "pass"
    assert checks["rlimit:FSIZE"]["value"] == [256 * 1024] * 2
    assert checks["rlimit:CORE"]["value"] == [0, 0]
    assert checks["rlimit:NPROC"]["value"] == [1, 1]
    assert checks["rlimit:NOFILE"]["value"] == [256, 256]
    assert checks["rlimit:MSGQUEUE"]["value"] == [0, 0]
    kinds = {f["fd"]: f["kind"] for f in result["fds"]}
    fds = told["fds"]
    assert kinds[fds["memfd"]] == "memfd"
    assert kinds[fds["socket"]] == "socket"
    assert kinds[fds["pipe"]] == "pipe"
    assert kinds[fds["devnull"]] == "devnull"
    assert kinds[fds["hypercall"]] == "devnull", "the hypercall stand-in must have been neutered"
    if not os.path.isdir("/dev/xen"):
        assert checks["xen-fds"]["status"] == "skip"
    assert child.finish()[0] == 0


@needs_root
@pytest.mark.parametrize(
    ("changes", "failing"),
    [
        ({"chroot": None}, "root"),
        ({"clear_groups": False, "groups": [4242]}, "groups"),
        ({"no_new_privs": False}, "no_new_privs"),
        ({"rlimits": False}, "rlimit:FSIZE"),
        ({"uid": None, "gid": None}, "uids"),
    ],
    ids=["no-chroot", "kept-groups", "no-nnp", "no-rlimits", "still-root"],
)
def test_skipped_step_is_reported(spawn, tmp_path, empty_root, capsys, changes, failing):
    child = spawn(CHILD, child_config(tmp_path, empty_root, **changes))
    child.ready()
    code, result = run_check(child.pid, capsys=capsys)
    assert code == 1
    assert by_name(result)[failing]["status"] == "fail"
    assert any(f.startswith(failing + ":") for f in result["findings"])


@needs_root
def test_directory_fd_outside_the_chroot_is_a_finding(spawn, tmp_path, empty_root, capsys):
    child = spawn(CHILD, child_config(tmp_path, empty_root, keep_dir=True))
    told = child.ready()
    code, result = run_check(child.pid, capsys=capsys)
    assert code == 1
    fd = next(f for f in result["fds"] if f["fd"] == told["fds"]["dir"])
    assert (fd["kind"], fd["status"]) == ("directory", "fail")


@needs_root
def test_command_line_table_and_exit_code(spawn, tmp_path, empty_root):
    """End to end through ``python -m``: the human table and the exit status."""
    child = spawn(CHILD, child_config(tmp_path, empty_root, chroot=None))
    child.ready()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run(
        [sys.executable, "-m", "xendmop.depriv.check", str(child.pid)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
    )
    assert run.returncode == 1
    assert "root" in run.stdout and "not chrooted" in run.stdout and "finding(s)" in run.stdout


def test_missing_process_exits_2(capsys):
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) + 1  # never a valid pid
    assert check.main([str(pid)]) == 2
    assert check.main([str(pid), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["exit"] == 2


@needs_root
def test_drop_failure_exits_through_fail_closed(spawn):
    """A refused step (setgroups as a non-root user) names the step; fail_closed exits 70."""
    code = r"""
import os, sys
from xendmop.depriv import DropConfig, drop_privileges, fail_closed
os.setresgid(60100, 60100, 60100); os.setresuid(60100, 60100, 60100)
with fail_closed():
    drop_privileges(DropConfig(uid=60101, gid=60101))
print("not reached", flush=True)
"""
    child = spawn(code)
    status, err = child.finish()
    assert status == 70
    assert "DropError: setgroups: refused" in err and "EPERM" in err
