"""The Arm64 lab's hypervisor: Debian's own Xen source for the release, built for arm64 with ioreq
servers, because Debian's arm64 binary has no DMOPs at all.

Why: on Arm, ``IOREQ_SERVER`` is an EXPERT option (xen/common/Kconfig: ``bool "IOREQ support
(EXPERT)" if EXPERT && !X86``, default only on x86), and without it Xen/Arm builds neither
``dm.o`` nor ``ioreq.o`` (xen/arch/arm/Makefile) and has no ``dm_op`` hypercall
(xen/include/hypercall-defs.c lists it under ``#ifdef CONFIG_IOREQ_SERVER``): every DMOP is
ENOSYS.  Debian's ``xen-hypervisor-4.17-arm64`` is built that way (its
``/boot/xen-4.17-arm64.config``: ``# CONFIG_EXPERT is not set``).

So the image build fetches the release's ``xen`` source package from the same mirror (``deb-src``
of the suites the image uses; the newest version the mirror serves), applies Debian's patches
(``dpkg-source -x``), takes Debian's own arm64 configuration from the image and adds
``EXTRA_CONFIG``, and cross-compiles the hypervisor alone (``make -C xen``, about a minute on
2 cores).  The toolstack and libraries stay Debian's binaries.  EXPERT options are not
security-supported by Xen (SUPPORT.md): this is a test lab's hypervisor.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

#: host commands the build needs, and their Debian packages
HOST_TOOLS = {
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
    "flex": "flex",
    "bison": "bison",
    "dpkg-source": "dpkg-dev",
}
#: what the lab's hypervisor adds to Debian's configuration
EXTRA_CONFIG = ("CONFIG_EXPERT=y", "CONFIG_IOREQ_SERVER=y")
MAKE_ARGS = ("XEN_TARGET_ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-")


class SourceError(RuntimeError):
    """The hypervisor could not be built: no source package downloads, or Kconfig dropped an
    option.  run.py reports it as a failed image build (exit 125)."""


def source_lines(binary_lines: list[str]) -> list[str]:
    """The ``deb-src`` twins of one-line ``deb`` sources."""
    lines = []
    for line in binary_lines:
        kind, _, rest = line.partition(" ")
        if kind != "deb" or not rest:
            raise ValueError(f"source line {line!r}: expected 'deb URI SUITE COMPONENTS'")
        lines.append(f"deb-src {rest}")
    return lines


def newest_first(versions: list[str]) -> list[str]:
    """Debian versions, newest first (``dpkg --compare-versions``)."""
    ordered: list[str] = []
    for v in versions:
        i = 0
        while i < len(ordered) and subprocess.run(["dpkg", "--compare-versions", v, "lt", ordered[i]]).returncode == 0:
            i += 1
        ordered.insert(i, v)
    return ordered


def _apt(work: Path) -> list[str]:
    """apt-get options for a private source list and state: the host's apt is left alone."""
    return [
        "-o", f"Dir::Etc::SourceList={work / 'sources.list'}", "-o", "Dir::Etc::SourceParts=/nonexistent",
        "-o", f"Dir::State::Lists={work / 'lists'}", "-o", f"Dir::Cache={work / 'cache'}",
        "-o", "Acquire::Retries=3", "-q",
    ]  # fmt: skip


def fetch_source(work: Path, binary_lines: list[str]) -> Path:
    """Download and unpack the newest ``xen`` source package the mirror serves; its tree."""
    (work / "lists" / "partial").mkdir(parents=True)
    (work / "cache" / "archives" / "partial").mkdir(parents=True)
    (work / "sources.list").write_text("\n".join(source_lines(binary_lines)) + "\n")
    apt = ["apt-get", *_apt(work)]
    subprocess.run([*apt, "update"], check=True, cwd=work)
    shown = subprocess.run(["apt-cache", *_apt(work), "showsrc", "xen"], check=True, cwd=work,
                           capture_output=True, text=True).stdout  # fmt: skip
    versions = sorted({ln.split()[1] for ln in shown.splitlines() if ln.startswith("Version:")})
    # A mirror may index a suite's sources without serving them all (seen: -security's 404):
    # the newest version that downloads wins.
    for version in newest_first(versions):
        got = subprocess.run([*apt, "source", "--download-only", f"xen={version}"], cwd=work, check=False)
        if got.returncode == 0:
            dsc = next(work.glob("xen_*.dsc"))
            subprocess.run(["dpkg-source", "-x", dsc.name, "src"], check=True, cwd=work, stdout=subprocess.DEVNULL)
            return work / "src"
        for partial in work.glob("xen_*"):
            partial.unlink()
    raise SourceError(f"no xen source package downloads from the mirror (versions indexed: {versions})")


def build(work: Path, binary_lines: list[str], debian_config: Path, out: Path) -> str:
    """Build Xen/Arm with ``EXTRA_CONFIG`` on Debian's ``debian_config``; writes ``out`` (the
    Image QEMU boots) and returns the source version's line for the image's recipe file."""
    tree = fetch_source(work, binary_lines) / "xen"
    config = debian_config.read_text()
    (tree / ".config").write_text(config + "\n# xendmop lab\n" + "\n".join(EXTRA_CONFIG) + "\n")
    make = ["make", "-C", str(tree), *MAKE_ARGS]
    subprocess.run([*make, "olddefconfig"], check=True, stdout=subprocess.DEVNULL)
    built = (tree / ".config").read_text()
    missing = [line for line in EXTRA_CONFIG if line not in built.splitlines()]
    if missing:
        raise SourceError(f"Xen's Kconfig dropped {missing} (see {tree / '.config'})")
    subprocess.run([*make, f"-j{os.cpu_count() or 1}"], check=True, stdout=subprocess.DEVNULL)
    shutil.copy(tree / "xen", out)
    shutil.copy(tree / ".config", out.with_name(out.name + ".config"))
    changelog = (tree.parent / "debian" / "changelog").read_text().splitlines()[0]
    return f"xen built from source: {changelog} + {' '.join(EXTRA_CONFIG)}"
