"""What a user gets from the package: the licence the metadata names, an sdist that holds what its
tests need, and an editable install (``make``'s venv) that type checkers see."""

from __future__ import annotations

import configparser
import importlib.metadata
import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: what the sdist need not carry: the repository's own ignore files, the lab's image cache
NOT_IN_SDIST = (".gitignore", "bench/results/.gitignore", "vagrant/.gitignore")


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files cannot be listed")
    done = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [f for f in done.stdout.splitlines() if (ROOT / f).is_file()]  # a file deleted but not yet staged: gone


def test_the_licence_the_metadata_names_is_in_the_repository_and_the_package() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["license"] == "MIT"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "THE SOFTWARE IS PROVIDED \"AS IS\"" in text
    assert cfg["metadata"]["license_files"].split() == ["LICENSE"]


def test_the_sdist_holds_every_tracked_file_its_tests_and_examples_need(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for name in tracked_files():  # a clean copy: no .venv, no build leftovers
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    out = tmp_path / "dist"
    build = textwrap.dedent(
        """
        import sys
        from setuptools import build_meta
        print(build_meta.build_sdist(sys.argv[1]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", build, str(out)], cwd=tree, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    sdist = out / done.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        top = sdist.name.removesuffix(".tar.gz")
        members = {m.name.removeprefix(top + "/") for m in tar.getmembers() if m.isfile()}
    missing = sorted(set(tracked_files()) - members - set(NOT_IN_SDIST))
    assert missing == [], f"the sdist lacks {missing}"
    assert "LICENSE" in members and "Makefile" in members


def _editable_here() -> bool:
    """Whether this Python's site-packages hold xendmop as an editable install (the
    repository's own ``xendmop.egg-info``, on the path as the working directory, is not it)."""
    for dist in importlib.metadata.distributions(name="xendmop", path=site.getsitepackages()):
        text = dist.read_text("direct_url.json")
        if text and json.loads(text).get("dir_info", {}).get("editable"):
            return True
    return False


def test_mypy_strict_on_a_users_script_finds_the_editable_install(tmp_path: Path) -> None:
    if not _editable_here():
        pytest.skip("xendmop is not installed editable in this Python (make's .venv is)")
    if shutil.which("mypy", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("no mypy in this Python's environment")
    script = tmp_path / "user.py"
    script.write_text(
        textwrap.dedent(
            """
            import xendmop

            def vcpus(domid: int) -> int:
                with xendmop.DeviceModel.open("mock") as dm:
                    return dm.nr_vcpus(domid)
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(script)],
        cwd=tmp_path,  # not the repository: the package is found as installed, not as a folder here
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
