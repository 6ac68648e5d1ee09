"""The DMOP scenarios of integration/scenarios.py on the mock: the self-check the lab's
mock-vs-Xen comparison relies on, run here without Xen."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

from integration import scenarios

REPO = Path(__file__).resolve().parent.parent


def test_command_line_self_check_passes_and_prints_the_summary() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "integration.scenarios", "--mock"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    steps = sum(len(s.steps) for s in scenarios.SCENARIOS)
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"{len(scenarios.SCENARIOS)} scenarios, {steps} steps, ")
    assert "DIFF " not in done.stdout


def test_mock_matches_xen_outcomes_except_the_listed_differences() -> None:
    report = scenarios.self_check()
    assert [r for r in report.rows if r.status == "DIFFERENT"] == []
    assert report.count("skipped") == 0  # the mock has every domain a scenario needs
    assert len(report.rows) == sum(len(s.steps) for s in scenarios.SCENARIOS)
    # every listed difference names a real step, and the mock really differs there
    known = {(r.scenario, r.step) for r in report.rows if r.status == "known"}
    assert known == set(scenarios.KNOWN_DIFFERENCES)


def test_a_changed_outcome_is_reported_as_a_difference() -> None:
    with scenarios.MockLab() as lab:
        runs = lab.run(scenarios.SCENARIOS[:2])
    changed = {name: list(outcomes) for name, outcomes in runs.items()}
    first = changed["devicemodel"][0]
    changed["devicemodel"][0] = dataclasses.replace(first, value=3)  # nr_vcpus: 3 instead of 2
    report = scenarios.compare(("a", "b"), runs, changed, scenarios=scenarios.SCENARIOS[:2])
    assert [(r.step, r.got) for r in report.differences] == [("nr_vcpus", {"a": 2, "b": 3})]
    assert "1 different" in report.summary()


def test_refused_argument_counts_as_einval_but_other_errors_do_not() -> None:
    assert scenarios.equivalent("refused:level", "EINVAL")
    assert not scenarios.equivalent("refused:level", "EPERM")
    assert not scenarios.equivalent("ENOENT", "EINVAL")


def test_steps_that_cannot_run_are_skipped_not_failed() -> None:
    with scenarios.MockLab() as lab, lab.open() as dm:
        guest = lab.new_guest(scenarios.SCENARIOS[0])
        needs_pv = scenarios.Step("pv", "nr_vcpus", dom=scenarios.PV)
        needs_id = scenarios.Step("ref", "destroy_ioreq_server", (scenarios.Ref("id"),))
        got = [scenarios.run_step(dm, s, {scenarios.GUEST: guest}, {}) for s in (needs_pv, needs_id)]
    assert [o.error for o in got] == ["skipped:no pv domain here", "skipped:no id saved"]


def test_long_bitmaps_are_summarised() -> None:
    assert scenarios.normalise(b"\xff" * 4097) == "4097 x ff"
    assert scenarios.normalise(b"\x01\x02") == "0102"
    assert scenarios.normalise(bytes(range(40))).startswith("40 bytes sha256 ")


def test_the_arm_scenario_on_the_arm_mock_is_what_xen_arm_does() -> None:
    """scenarios.ARM as declared (Xen/Arm 4.17's outcomes, seen in the Arm lab) on the mock's Arm guest."""
    only = (scenarios.ARM,)
    with scenarios.MockLab(arch="arm") as lab:
        mock = lab.run(only)
    report = scenarios.compare(("declared", "mock"), scenarios.expected_runs(only), mock, known={}, scenarios=only)
    assert [(r.step, r.got) for r in report.differences] == []
    assert report.count("identical") == len(scenarios.ARM.steps)
