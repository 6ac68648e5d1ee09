"""xendmop's benchmarks: always ratios against a baseline measured in the same run.

These machines are shared and noisy, so every benchmark interleaves the thing
measured with its baseline, in repeated rounds (the order rotated per round), and
reports medians.  ``python -m bench`` runs them all, prints a table and writes one
JSON result per benchmark into ``bench/results/``; ``python -m bench --profile``
adds cProfile summaries of benchmarks 1 and 2.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
FAKE_SOURCE = HERE / "fastfake.c"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def calibrate(fn: Callable[[int], float], target_s: float = 0.02, start: int = 16) -> int:
    """Loop count so that one ``fn(n)`` (which returns seconds) takes about ``target_s``."""
    n = start
    while True:
        took = fn(n)
        if took >= target_s / 4 or n >= 1 << 22:
            return max(1, int(n * target_s / max(took, 1e-9)))
        n *= 4


def interleave(
    candidates: dict[str, Callable[[int], float]], rounds: int, target_s: float = 0.02
) -> dict[str, list[float]]:
    """Per-iteration seconds of each candidate, ``rounds`` times, rotating the order each round."""
    loops = {name: calibrate(fn, target_s) for name, fn in candidates.items()}
    names = list(candidates)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            n = loops[name]
            samples[name].append(candidates[name](n) / n)
    return samples


def ratio_samples(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of the per-round ratios (both measured in the same round)."""
    return median([a / b for a, b in zip(num, den)])


def build_fake(tmp: Path) -> Path:
    """Compile bench/fastfake.c (the golden fake without its log) into ``tmp``."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("no C compiler to build bench/fastfake.c")
    lib = tmp / "fastfake.so"
    subprocess.run(
        [gcc, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(lib), str(FAKE_SOURCE), "-ldl"],
        check=True,
        capture_output=True,
        text=True,
    )
    return lib


def environment() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    result = {"benchmark": name, "environment": environment(), **result}
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return path


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env
