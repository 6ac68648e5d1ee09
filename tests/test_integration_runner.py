"""integration/run_tests.py: tests that failed because Xen says their guest triple-faulted run
again on new boots (at most ATTEMPTS in all); any other failure is final at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RUNNER = REPO / "integration" / "run_tests.py"

# Stands in for integration/conftest.py's record: each failing test says whether its guest
# "crashed" (CRASHED_<name> file present), as hvmguest.crashed_guests would from `xl dmesg`.
CONFTEST = """
import json, os
from pathlib import Path

def pytest_runtest_logreport(report):
    record = os.environ.get("XENDMOP_FAILURES")
    if report.failed and record:
        name = report.nodeid.split("::")[-1]
        crashes = ["(XEN) d7v0 Triple fault"] if Path(f"CRASHED_{name}").exists() else []
        with open(record, "a") as f:
            f.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "crashes": crashes}) + "\\n")
"""

# A test "fails with a crash" until its budget of crashes is spent; RUNS_<name> counts its runs.
TESTS = """
from pathlib import Path

def _run(name, crashes, real_failure=False):
    runs = Path(f"RUNS_{name}")
    n = int(runs.read_text()) + 1 if runs.exists() else 1
    runs.write_text(str(n))
    with open("ORDER", "a") as f:
        f.write(name + "\\n")
    Path(f"CRASHED_{name}").unlink(missing_ok=True)
    if n <= crashes:
        Path(f"CRASHED_{name}").touch()
        raise TimeoutError("console closed")
    assert not real_failure, "a device model's own bug"

def test_fine():
    _run("test_fine", 0)

def test_crashes_once():
    _run("test_crashes_once", {once})

def test_buggy():
    _run("test_buggy", 0, real_failure={buggy})

def test_a_crashes_after_them():
    _run("test_a_crashes_after_them", {once})
"""


def run(tmp_path: Path, once: int, buggy: bool) -> tuple[int, str, dict[str, Any]]:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_guest.py").write_text(TESTS.replace("{once}", str(once)).replace("{buggy}", str(buggy)))
    done = subprocess.run(
        [sys.executable, str(RUNNER), "-p", "no:cacheprovider", "-q", "test_guest.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    runs: dict[str, Any] = {p.name[5:]: int(p.read_text()) for p in tmp_path.glob("RUNS_*")}
    runs["order"] = (tmp_path / "ORDER").read_text().split()
    return done.returncode, done.stdout, runs


def test_a_crashed_guests_tests_run_again_and_only_they(tmp_path: Path) -> None:
    rc, out, runs = run(tmp_path, once=1, buggy=False)
    assert rc == 0, out
    order = runs.pop("order")
    assert runs == {"test_fine": 1, "test_crashes_once": 2, "test_buggy": 1, "test_a_crashes_after_them": 2}
    # Run again in the order they first ran (a module's last test may power its guest off).
    assert order[4:] == ["test_crashes_once", "test_a_crashes_after_them"], order
    assert "Triple fault" in out and "test_guest.py::test_crashes_once" in out


def test_as_many_crashes_in_a_row_as_attempts_fail_the_run(tmp_path: Path) -> None:
    attempts = _attempts()
    rc, out, runs = run(tmp_path, once=attempts, buggy=False)
    assert rc == 1, out
    assert runs["test_crashes_once"] == attempts
    assert f"still triple-faulting after {attempts} attempts" in out


def test_one_crash_fewer_than_attempts_passes(tmp_path: Path) -> None:
    rc, out, runs = run(tmp_path, once=_attempts() - 1, buggy=False)
    assert rc == 0, out
    assert runs["test_crashes_once"] == _attempts()


def _attempts() -> int:
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_tests", RUNNER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.ATTEMPTS)


def test_a_failure_without_a_crash_is_never_retried(tmp_path: Path) -> None:
    rc, out, runs = run(tmp_path, once=1, buggy=True)
    assert rc == 1, out
    runs.pop("order")
    assert runs == {"test_fine": 1, "test_crashes_once": 1, "test_buggy": 1, "test_a_crashes_after_them": 1}
    assert "running them again" not in out
