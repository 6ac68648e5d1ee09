"""``pytest`` for integration/, giving a Linux HVM guest that the CPU emulation killed new boots.

In the lab (Xen under QEMU's TCG, whose SVM is emulated), a Linux HVM guest's vCPU now and
then triple-faults at an instruction that QEMU, not a device model, was emulating: seen in
guests whose port I/O only QEMU's own devices served, and in early boot, each time with Xen's
"dNvM Triple fault" line and the guest gone (``on_reboot="destroy"``).  Such a failure says
nothing about xendmop, so the tests it failed run again in a new pytest (their module fixtures
boot a new guest), at most ``ATTEMPTS`` times in all.  A failure without such a line, in any
attempt, ends the run at once with pytest's status: it is never retried.  Every retry prints
Xen's lines, so a run that needed one says so.

Usage: the arguments are pytest's (``python3 integration/run_tests.py -q -rs integration/``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

#: 3 was not enough: a CI run on 2026-12-07 lost trixie's virtio guest in three boots running
#: (attempt 1, 2, and again alone), and a virtio module costs ~2.5 min a boot, well inside a job's
#: timeout
ATTEMPTS = 5


def _failures(record: Path) -> list[dict[str, object]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines() if line]


def main(argv: list[str]) -> int:
    # Options stay; the paths to test are replaced by the failed tests' ids on a retry.
    options = [a for a in argv if not Path(a.split("::")[0]).exists()]
    targets = argv
    with tempfile.TemporaryDirectory(prefix="xendmop-failures-") as tmp:
        for attempt in range(1, ATTEMPTS + 1):
            record = Path(tmp) / f"attempt{attempt}.jsonl"
            env = dict(os.environ, XENDMOP_FAILURES=str(record))
            rc = subprocess.run([sys.executable, "-m", "pytest", *targets], env=env, check=False).returncode
            failures = _failures(record)
            if rc == 0 or not failures or any(not f["crashes"] for f in failures):
                return rc
            # In the order they ran: a module's last test may end its guest (powering it off).
            nodeids = list(dict.fromkeys(str(f["nodeid"]) for f in failures))
            crashes = sorted({str(c) for f in failures for c in f["crashes"]})  # type: ignore[attr-defined]
            if attempt == ATTEMPTS:
                print(f"run_tests: guests still triple-faulting after {ATTEMPTS} attempts: {crashes}")
                return rc
            print(
                f"run_tests: attempt {attempt}: {len(nodeids)} failed test(s) whose Linux guest Xen reports "
                f"triple-faulted (under QEMU's emulated CPU, not a device model's doing): {crashes}; "
                f"running them again on new boots: {nodeids}",
                flush=True,
            )
            targets = [*options, *nodeids]
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
