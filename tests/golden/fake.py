"""Build the fake Xen devices (``fakexen.c``) and run code under them.

``build(tmp)`` compiles the ``LD_PRELOAD`` library, or skips the test with the
reason when gcc or libxendevicemodel is missing; ``run(...)`` runs the driver for
one implementation in a subprocess and returns its log split per case.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
ROOT = TESTS.parent
SOURCE = HERE / "fakexen.c"
LIBXENDEVICEMODEL = "libxendevicemodel.so.1"

#: log events that are requests reaching the device
REQUESTS = ("dm_op", "hypercall", "restrict", "ioctl")


def need_libxendevicemodel() -> None:
    try:
        ctypes.CDLL(LIBXENDEVICEMODEL)
    except OSError as e:
        pytest.skip(f"{LIBXENDEVICEMODEL} not loadable ({e}); install Debian's libxendevicemodel1")


def build(tmp: Path) -> Path:
    """Compile the fake into ``tmp``; skip if there is no C compiler."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler (gcc) to build the fake /dev/xen devices")
    lib = tmp / "fakexen.so"
    subprocess.run(
        [gcc, "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror", "-o", str(lib), str(SOURCE), "-ldl"],
        check=True,
        capture_output=True,
        text=True,
    )
    return lib


def compile_library(tmp: Path, name: str, source: str) -> Path:
    """Compile a small shared library from C ``source`` (for stub libraries)."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler (gcc) to build a stub library")
    src = tmp / f"{name}.c"
    src.write_text(source)
    lib = tmp / name
    subprocess.run([gcc, "-shared", "-fPIC", f"-Wl,-soname,{name}", "-o", str(lib), str(src)], check=True)
    return lib


@dataclass
class Run:
    """One implementation's log, split at the driver's marks."""

    opening: list[dict[str, Any]] = field(default_factory=list)  # before the first case
    cases: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    closing: list[dict[str, Any]] = field(default_factory=list)

    def requests(self, case: int) -> list[dict[str, Any]]:
        return [e for e in self.cases[case] if e["event"] in REQUESTS]

    def events(self) -> list[dict[str, Any]]:
        return self.opening + [e for events in self.cases.values() for e in events] + self.closing


def fake_env(fake: Path, log: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        LD_PRELOAD=str(fake),
        FAKEXEN_LOG=str(log),
        PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]),
        **extra,
    )
    for key in ("FAKEXEN_NO_DM_OP", "FAKEXEN_ABSENT", "FAKEXEN_NO_RESOURCE", "FAKEXEN_EVTCHN_ERRNO"):
        if key not in extra:
            env.pop(key, None)
    return env


def run(fake: Path, tmp: Path, which: str, **extra: str) -> Run:
    """Run ``golden.driver which`` under the fake; ``extra`` adds FAKEXEN_* switches."""
    log = tmp / f"{which}-{'-'.join(sorted(extra)) or 'dm_op'}.log"
    log.write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "golden.driver", which],
        env=fake_env(fake, log, **extra),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{which} driver failed:\n{proc.stdout}\n{proc.stderr}"
    return parse(log)


def parse(log: Path) -> Run:
    result = Run()
    current: list[dict[str, Any]] = result.opening
    for line in log.read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "mark":
            if event["method"] == "close":
                current = result.closing
            else:
                current = result.cases.setdefault(event["case"], [])
        elif event["event"] == "result":
            result.results[event["case"]] = {k: v for k, v in event.items() if k not in ("event", "case")}
        else:
            current.append(event)
    return result


def pair(fake: Path, first: str, second: str, *, dm_op_ioctl: bool = True) -> tuple[Run, Run]:
    """Run two drivers under the same fake: the DM_OP path, or (``dm_op_ioctl=False``)
    a kernel answering ENOTTY to DM_OP, so both take the HYPERCALL fallback."""
    extra = {} if dm_op_ioctl else {"FAKEXEN_NO_DM_OP": "1"}
    return run(fake, fake.parent, first, **extra), run(fake, fake.parent, second, **extra)
