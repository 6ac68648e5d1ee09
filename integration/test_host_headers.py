"""The ABI mirrors and the golden bytes, checked in this dom0 against its own release's
headers (libxen-dev, linux-libc-dev) and its own libxendevicemodel: Xen 4.17 with Linux 6.1
headers on bookworm, Xen 4.20 with Linux 6.12 headers on trixie.  A name may be skipped only
when it is newer than this release's headers, or lives in a header no package installs
(Xen's ``tools/include``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _version(package: str) -> tuple[int, ...]:
    done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=True)
    return tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", done.stdout).groups())  # type: ignore[union-attr]


def test_abi_mirrors_and_golden_bytes_against_this_releases_headers_and_library() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
         "tests/test_abi_headers.py", "tests/test_golden_bytes.py"],
        cwd=REPO, capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert re.search(r"\d+ passed", done.stdout), done.stdout[-2000:]
    linux = _version("linux-libc-dev")
    wrongly_skipped = []
    for line in done.stdout.splitlines():
        if not line.startswith("SKIPPED"):
            continue
        since = re.search(r"from Linux (\d+)\.(\d+) include/uapi", line)
        if since and tuple(int(x) for x in since.groups()) > linux:
            continue  # newer than this release's uapi headers
        if re.search(r"from Xen [\d.]+ tools/include/", line):
            continue  # a header inside Xen's tree that no package installs
        wrongly_skipped.append(line)
    assert not wrongly_skipped, f"linux-libc-dev {linux}: " + "\n".join(wrongly_skipped)
    print(done.stdout.splitlines()[-1])
