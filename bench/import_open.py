"""Benchmark 4: start-up cost, ``import xendmop`` and ``DeviceModel.open('mock')``, against
``python -c pass``, each a fresh subprocess, interleaved, median of ROUNDS.

Measured with bytecode cached (``PYTHONPYCACHEPREFIX`` in a temporary directory, so that
nothing is written into the tree), as an installed package runs; and, if the caller's
environment sets ``PYTHONDONTWRITEBYTECODE``, also as that environment runs (every module
compiled from source on every start)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from . import ROOT, child_env, median, ratio_samples, write_result

ROUNDS = 15
SCRIPTS = {
    "pass": "pass",
    "import": "import xendmop",
    "import+open": "import xendmop; xendmop.DeviceModel.open('mock').close()",
}


def once(code: str, env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True)
    return time.perf_counter() - t


def import_time(env: dict[str, str]) -> list[tuple[float, str]]:
    """The heaviest modules under ``import xendmop`` (-X importtime, cumulative us)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import xendmop"], env=env, cwd=ROOT, capture_output=True, text=True
    )
    rows = []
    for line in proc.stderr.splitlines()[1:]:
        parts = line.split("|")
        if len(parts) == 3:
            rows.append((float(parts[1]), parts[2].rstrip()))
    return sorted(rows, reverse=True)[:12]


def measure(env: dict[str, str]) -> dict[str, Any]:
    for code in SCRIPTS.values():
        once(code, env)  # warm the page cache and the bytecode cache
    samples: dict[str, list[float]] = {name: [] for name in SCRIPTS}
    names = list(SCRIPTS)
    for r in range(ROUNDS):
        for name in names[r % 3 :] + names[: r % 3]:
            samples[name].append(once(SCRIPTS[name], env))
    ms = {name: round(median(v) * 1e3, 2) for name, v in samples.items()}
    return {
        "ms": ms,
        "import/pass": round(ratio_samples(samples["import"], samples["pass"]), 3),
        "import+open/pass": round(ratio_samples(samples["import+open"], samples["pass"]), 3),
        "import_ms_over_pass": round(ms["import"] - ms["pass"], 2),
        "open_ms_over_import": round(ms["import+open"] - ms["import"], 2),
        "importtime_top_cumulative_us": import_time(env),
    }


def run() -> dict[str, Any]:
    base = child_env()
    base.pop("XENDMOP_BACKEND", None)
    result: dict[str, Any] = {"rounds": ROUNDS}
    with tempfile.TemporaryDirectory() as cache:
        cached = dict(base, PYTHONPYCACHEPREFIX=cache)
        cached.pop("PYTHONDONTWRITEBYTECODE", None)
        result["bytecode_cached"] = measure(cached)
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        result["no_bytecode_cache"] = measure(base)
    write_result("import_open", result)
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
