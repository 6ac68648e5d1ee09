#!/usr/bin/env python3
"""Build (once) the Xen lab's dom0: a Debian root filesystem image plus the boot files.

The Debian release is a choice (``RELEASES``; ``--release`` or ``$XENDMOP_LAB_RELEASE``, default
bookworm): bookworm gives Xen 4.17 and Linux 6.1, trixie Xen 4.20 and Linux 6.12.

The image is made with ``mmdebstrap --variant=minbase`` from the mirrors this machine's apt
already uses (read at run time, never written into the repository), packed with
``mkfs.ext4 -d``, and cached under ``${XDG_CACHE_HOME:-~/.cache}/xendmop-lab/<recipe hash>``
together with ``xen`` (gunzipped, QEMU's multiboot loader wants an ELF), ``vmlinuz`` and
``initrd.img``, one folder per release (``<release>-<recipe hash>``).  The hash covers the
release, this file and ``packages.txt``: editing either rebuilds, anything else reuses the cache.

Usage: ``python3 integration/lab/image.py [--release R] [--rebuild]`` prints the cache directory.
Exit status 0, or 77 when the lab cannot be had here (no tools, no Debian mirror).
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

LAB = Path(__file__).resolve().parent
PACKAGES = LAB / "packages.txt"
RECIPE = (Path(__file__).resolve(), PACKAGES)
#: the Debian releases the lab boots, and what each gives (packages.txt names no version).
RELEASES = {
    "bookworm": "Debian 12: Xen 4.17, Linux 6.1",
    "trixie": "Debian 13: Xen 4.20, Linux 6.12",
}
DEFAULT_RELEASE = "bookworm"
EXIT_UNAVAILABLE = 77  # automake's "skipped": the lab cannot run on this host

# PID 1 of dom0.  It only reaches the runner's writable 9p share and hands over to the init
# script the runner put there, so changing what a boot does never rebuilds the image.
STUB_INIT = """#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
modprobe 9pnet_virtio
modprobe 9p
mkdir -p /lab
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=none results /lab; then
    exec /bin/sh /lab/init.sh
fi
echo "xendmop-lab: cannot mount the results share" >&2
echo o > /proc/sysrq-trigger
sleep 60
"""


def lab_release(name: str | None = None) -> str:
    """``name``, else ``$XENDMOP_LAB_RELEASE``, else bookworm; a release the lab does not know
    is a ValueError naming it and the known ones."""
    release = name or os.environ.get("XENDMOP_LAB_RELEASE") or DEFAULT_RELEASE
    if release not in RELEASES:
        raise ValueError(f"XENDMOP_LAB_RELEASE / --release: {release!r} is not one of {', '.join(RELEASES)}")
    return release


class Unavailable(RuntimeError):
    """The lab cannot be built or booted on this host (said plainly, exit 77)."""


class BuildError(RuntimeError):
    """The mirror was there but the image did not build: a recipe bug, not a missing lab."""


@dataclass(frozen=True)
class Artifacts:
    dir: Path

    @property
    def image(self) -> Path:
        return self.dir / "dom0.ext4"

    @property
    def xen(self) -> Path:
        return self.dir / "xen"

    @property
    def vmlinuz(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    def complete(self) -> bool:
        return all(p.is_file() for p in (self.image, self.xen, self.vmlinuz, self.initrd))


def log(msg: str) -> None:
    print(f"xendmop-lab: {msg}", file=sys.stderr, flush=True)


def packages() -> list[str]:
    """The package list, shared with vagrant/provision.sh."""
    names = []
    for line in PACKAGES.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def recipe_hash(release: str) -> str:
    h = hashlib.sha256(release.encode() + b"\0")
    for path in RECIPE:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xendmop-lab"


# --- host tools --------------------------------------------------------------------------


def ensure_tools(tools: dict[str, str]) -> None:
    """Install the Debian packages providing missing commands ({command: package}), or say why not."""
    missing = sorted({pkg for cmd, pkg in tools.items() if shutil.which(cmd) is None})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable(f"missing host packages {' '.join(missing)} and cannot install them (needs root and apt-get)")
    log(f"installing host packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # apt's lock may be held by another installer for a while: wait for it instead of failing.
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    for attempt in range(3):
        if attempt:
            subprocess.run(["apt-get", *lock, "update", "-q"], env=env, check=False)
        done = subprocess.run(["apt-get", *lock, "install", "-y", "-q", *missing], env=env, check=False)
        if done.returncode == 0:
            return
        time.sleep(5)
    raise Unavailable(f"apt-get install {' '.join(missing)} failed")


# --- mirrors from this machine's apt configuration ------------------------------------------


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    key = ""
    for raw in [*text.splitlines(), ""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if cur:
                stanzas.append(cur)
            cur, key = {}, ""
        elif raw[0] in " \t" and key:
            cur[key] += " " + raw.strip()
        elif ":" in raw:
            key, _, value = raw.partition(":")
            key = key.strip().lower()
            cur[key] = value.strip()
    return stanzas


def apt_sources() -> list[tuple[str, str, str]]:
    """(uri, suite, components) of every enabled 'deb' source on this machine."""
    found: list[tuple[str, str, str]] = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for st in _deb822_stanzas(Path(path).read_text()):
            if "deb" not in st.get("types", "").split() or st.get("enabled", "yes").lower() == "no":
                continue
            comps = st.get("components", "main")
            for uri in st.get("uris", "").split():
                for suite in st.get("suites", "").split():
                    found.append((uri, suite, comps))
    lists = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]
    for path in lists:
        if not os.path.isfile(path):
            continue
        for line in Path(path).read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) < 3 or words[0] != "deb":
                continue
            if words[1].startswith("["):  # options such as [signed-by=...]
                while words and not words[0].endswith("]"):
                    words.pop(0)
                words = ["deb", *words[1:]]
            if len(words) >= 3:
                found.append((words[1], words[2], " ".join(words[3:]) or "main"))
    return found


def mirror_lines(release: str) -> list[str]:
    """One-line sources for ``release``, -updates and -security, from the host's apt config.

    A host names its own release's suites; another release comes from the same mirrors (the
    URI of each suite kind, e.g. bookworm-security's for trixie-security), checked to answer."""
    sources = apt_sources()
    kinds = ("", "-updates", "-security")
    debian = [(uri, suite) for uri, suite, _ in sources if suite in RELEASES or suite.endswith(kinds[1:])]
    lines = []
    for kind in kinds:
        uris = [uri for uri, suite in debian if suite.removeprefix(suite.split("-")[0]) == kind]
        if not uris:
            if kind == "":
                raise Unavailable(f"this machine's apt sources name no Debian release to find a {release} mirror from")
            log(f"warning: no {release}{kind} mirror in apt sources; building without it")
            continue
        lines.append(f"deb {uris[0]} {release}{kind} main")
    _check_reachable(lines[0].split()[1], release)
    return lines


def _check_reachable(uri: str, release: str) -> None:
    """Tell "no mirror here" (the lab is unavailable) apart from a failing build."""
    url = f"{uri.rstrip('/')}/dists/{release}/InRelease"
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            reply.read(1)
    except OSError as e:
        raise Unavailable(f"the Debian mirror from apt's sources is not reachable ({e})") from None


# --- the build ------------------------------------------------------------------------------


def _newest(root: Path, pattern: str) -> Path:
    hits = sorted(root.glob(pattern))
    if not hits:
        raise RuntimeError(f"image has no /boot/{pattern}")
    return hits[-1]


def build(dest: Path, release: str) -> None:
    ensure_tools({"mmdebstrap": "mmdebstrap", "mkfs.ext4": "e2fsprogs"})
    sources = mirror_lines(release)
    with tempfile.TemporaryDirectory(prefix="build-", dir=dest.parent) as tmp:
        root = Path(tmp) / "root"
        cmd = [
            "mmdebstrap",
            "--variant=minbase",
            "--mode=root",
            "--format=directory",
            "--aptopt=Acquire::Retries \"3\"",
            # docs and translations are most of the bytes no test reads
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            f"--include={','.join(packages())}",
            release,
            str(root),
            *sources,
        ]
        log(f"building the {release} dom0 root filesystem ({RELEASES[release]}; mmdebstrap, a few minutes)")
        t0 = time.monotonic()
        if subprocess.run(cmd, check=False).returncode != 0:
            raise BuildError("mmdebstrap failed (see its output above)")
        init = root / "sbin/xendmop-lab-init"
        init.write_text(STUB_INIT)
        init.chmod(0o755)
        (root / "etc/hostname").write_text("xendmop-dom0\n")
        boot = root / "boot"
        out = Path(tmp) / "out"
        out.mkdir()
        with gzip.open(_newest(boot, "xen-4.*-amd64.gz")) as src, open(out / "xen", "wb") as dst:
            shutil.copyfileobj(src, dst)
        shutil.copy(_newest(boot, "vmlinuz-*"), out / "vmlinuz")
        shutil.copy(_newest(boot, "initrd.img-*"), out / "initrd.img")
        # 2 GiB sparse: room for the tests' temporary files; QEMU's snapshot=on keeps writes away anyway.
        mkfs = ["mkfs.ext4", "-q", "-F", "-L", "xendmop-dom0", "-d", str(root), str(out / "dom0.ext4"), "2G"]
        subprocess.run(mkfs, check=True, stdout=sys.stderr)
        (out / "recipe").write_text(f"{release} {recipe_hash(release)}\n" + "\n".join(sources) + "\n")
        os.rename(out, dest)
        log(f"dom0 image built in {time.monotonic() - t0:.0f} s: {dest}")


def ensure_image(rebuild: bool = False, release: str | None = None) -> Artifacts:
    """The cached artifacts of ``release``'s current recipe, building them first if needed."""
    release = lab_release(release)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    art = Artifacts(root / f"{release}-{recipe_hash(release)}")
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others then reuse its result
        if rebuild and art.dir.exists():
            shutil.rmtree(art.dir)
        if not art.complete():
            if art.dir.exists():
                shutil.rmtree(art.dir)
            build(art.dir, release)
            _prune(root, keep=art.dir, release=release)
    return art


def _prune(root: Path, keep: Path, release: str) -> None:
    """Drop the release's images of older recipes (about 1 GB each); other releases and run
    results stay."""
    for old in root.glob(f"{release}-*"):
        if old.is_dir() and old != keep and len(old.name) == len(release) + 17:
            shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rebuild", action="store_true", help="rebuild even when the cache is current")
    ap.add_argument(
        "--release", choices=sorted(RELEASES), help="Debian release (default: $XENDMOP_LAB_RELEASE, else bookworm)"
    )
    args = ap.parse_args(argv)
    try:
        art = ensure_image(args.rebuild, args.release)
    except Unavailable as e:
        log(f"lab unavailable: {e}")
        return EXIT_UNAVAILABLE
    except (BuildError, subprocess.CalledProcessError) as e:
        log(f"image build failed: {e}")
        return 1
    print(art.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
