#!/usr/bin/env python3
"""The lab's jobs: one per (Debian release, architecture), each a whole lab run of its own.

    python3 integration/lab/jobs.py          # one job a line: what ci.sh runs, in order
    python3 integration/lab/jobs.py --json   # {"job": [...]}: the GitHub Actions matrix
    python3 integration/lab/jobs.py --split JOB   # "RELEASE ARCH", or exit 2 naming what is wrong

A job is written RELEASE/ARCH (``bookworm/amd64``; Debian's architecture names, the kernel's
``x86_64``/``aarch64`` taken too).  ``ci.sh`` runs every job one after the
other (or those in ``$XENDMOP_LAB_JOBS``); ``.github/workflows/ci.yml`` runs each on a runner of
its own, in parallel.  Both read this list, so a new release or architecture is added here once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import image

#: every release on x86-64; Arm64 on bookworm only: the Arm lab builds Xen/Arm from the release's
#: source package (xen_source.py), and the mirror this list was made with serves no trixie xen
#: source (404) -- where yours does, XENDMOP_LAB_JOBS=trixie/arm64 runs it
JOBS = (*(f"{release}/amd64" for release in image.RELEASES), "bookworm/arm64")


class JobError(ValueError):
    """A job that names no release or architecture the lab has."""


def parse(job: str) -> tuple[str, str]:
    """``RELEASE/ARCH`` (ARCH defaults to amd64) → (release, Debian's arch), or JobError naming the job."""
    release, _, given = job.partition("/")
    arch = image.ARCH_ALIASES.get(given, given) or image.DEFAULT_ARCH
    if release not in image.RELEASES:
        raise JobError(f"lab job {job!r}: release {release!r} is not one of {', '.join(image.RELEASES)}")
    if arch not in image.ARCHES:
        raise JobError(f"lab job {job!r}: architecture {given!r} is not one of {', '.join(image.ARCHES)}")
    return release, arch


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--split":
        try:
            print(*parse(argv[1]))
        except JobError as e:
            print(e, file=sys.stderr)
            return 2
        return 0
    if argv not in ([], ["--json"]):
        print(f"usage: {Path(__file__).name} [--json | --split JOB]", file=sys.stderr)
        return 2
    print(json.dumps({"job": list(JOBS)}) if argv else "\n".join(JOBS))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
