"""The lab's job list (integration/lab/jobs.py), ci.sh running it, and the GitHub workflow using it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "integration" / "lab"
sys.path.insert(0, str(LAB))
import image  # noqa: E402
import jobs  # noqa: E402


def test_every_release_is_a_job_and_every_job_parses():
    assert {jobs.parse(job)[0] for job in jobs.JOBS} == set(image.RELEASES)
    assert {jobs.parse(job)[1] for job in jobs.JOBS} == set(image.ARCHES)
    assert len(set(jobs.JOBS)) == len(jobs.JOBS)


@pytest.mark.parametrize(
    "job, parsed",
    [
        ("bookworm", ("bookworm", "amd64")),
        ("trixie/x86_64", ("trixie", "amd64")),
        ("bookworm/aarch64", ("bookworm", "arm64")),
    ],
)
def test_a_job_is_release_slash_arch(job, parsed):
    assert jobs.parse(job) == parsed


@pytest.mark.parametrize("job, named", [("sid/x86_64", "release 'sid'"), ("bookworm/sparc", "architecture 'sparc'")])
def test_a_bad_job_is_refused_naming_it(job, named):
    with pytest.raises(jobs.JobError, match=f"lab job '{job}': {named}"):
        jobs.parse(job)


def _jobs_cli(*args):
    return subprocess.run([sys.executable, str(LAB / "jobs.py"), *args], capture_output=True, text=True)


def test_the_cli_prints_the_list_the_matrix_and_a_split():
    assert _jobs_cli().stdout.split() == list(jobs.JOBS)
    assert json.loads(_jobs_cli("--json").stdout) == {"job": list(jobs.JOBS)}
    assert _jobs_cli("--split", "trixie").stdout == "trixie amd64\n"
    bad = _jobs_cli("--split", "sid")
    assert bad.returncode == 2 and "release 'sid'" in bad.stderr
    assert _jobs_cli("--yaml").returncode == 2


FAKE_RUN = """#!/usr/bin/env python3
import os, sys
job = sys.argv[sys.argv.index("--release") + 1] + "/" + sys.argv[sys.argv.index("--arch") + 1]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(job + "\\n")
codes = os.environ.get("FAKE_CODES_" + job.replace("/", "_"), "0").split()
n = sum(1 for line in open(os.environ["FAKE_LOG"]) if line.strip() == job)
sys.exit(int(codes[min(n, len(codes)) - 1]))
"""


def _ci(tmp_path, env):
    """ci.sh in a tree of its own whose run.py records each RELEASE/ARCH it is given and exits as told."""
    tree = tmp_path / "tree" / "integration" / "lab"
    tree.mkdir(parents=True)
    for name in ("ci.sh", "jobs.py", "image.py"):
        shutil.copy(LAB / name, tree / name)
    (tree / "run.py").write_text(FAKE_RUN)
    log = tmp_path / "log"
    log.write_text("")
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("XENDMOP_LAB")}
    run_env.update(env, FAKE_LOG=str(log))
    done = subprocess.run(["sh", str(tree / "ci.sh")], capture_output=True, text=True, env=run_env)
    return done, log.read_text().split()


def test_ci_runs_every_job_in_order(tmp_path):
    done, ran = _ci(tmp_path, {})
    assert done.returncode == 0, done.stdout + done.stderr
    assert ran == ["/".join(jobs.parse(job)) for job in jobs.JOBS]
    assert "exit status per job: " + " ".join(f"{job}=0" for job in jobs.JOBS) in done.stdout


def test_ci_retries_a_failed_boot_once_and_reports_the_first_failure(tmp_path):
    done, ran = _ci(tmp_path, {"FAKE_CODES_bookworm_amd64": "125 1", "FAKE_CODES_trixie_amd64": "124"})
    assert ran[:3] == ["bookworm/amd64", "bookworm/amd64", "trixie/amd64"]
    assert done.returncode == 1
    assert "bookworm/amd64=1 trixie/amd64=124" in done.stdout


def test_ci_runs_only_the_jobs_asked_for(tmp_path):
    done, ran = _ci(tmp_path, {"XENDMOP_LAB_JOBS": "trixie/aarch64 bookworm"})
    assert (done.returncode, ran) == (0, ["trixie/arm64", "bookworm/amd64"])
    done, ran = _ci(tmp_path / "bad", {"XENDMOP_LAB_JOBS": "sid/amd64"})
    assert done.returncode == 2 and ran == [] and "release 'sid'" in done.stderr


def test_an_unavailable_lab_passes_unless_required(tmp_path):
    done, _ = _ci(tmp_path, {"FAKE_CODES_bookworm_amd64": "77"})
    assert done.returncode == 0 and "LAB UNAVAILABLE" in done.stdout
    done, _ = _ci(tmp_path / "required", {"FAKE_CODES_bookworm_amd64": "77", "XENDMOP_LAB_REQUIRED": "1"})
    assert done.returncode == 77 and "XENDMOP_LAB_REQUIRED=1: failing" in done.stdout


def test_the_workflow_runs_what_ci_runs():
    workflow = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    ci_run = (ROOT / ".ci" / "run").read_text()
    for command in ("make test", "make lint"):
        assert f"\n{command}\n" in ci_run and f"- run: {command}\n" in workflow
    assert "bash integration/lab/ci.sh\n" in ci_run
    assert "run: echo \"matrix=$(python3 integration/lab/jobs.py --json)\"" in workflow
    assert "matrix: ${{ fromJSON(needs.plan.outputs.matrix) }}" in workflow
    lab_step = workflow[workflow.index("- run: bash integration/lab/ci.sh") :]
    assert "XENDMOP_LAB_JOBS: ${{ matrix.job }}" in lab_step and 'XENDMOP_LAB_REQUIRED: "1"' in lab_step
