#!/usr/bin/env python3
"""Build (once) the Xen lab's dom0: a Debian root filesystem image plus the boot files.

The Debian release is a choice (``RELEASES``; ``--release`` or ``$XENDMOP_LAB_RELEASE``, default
bookworm): bookworm gives Xen 4.17 and Linux 6.1, trixie Xen 4.20 and Linux 6.12.  So is the
architecture (``ARCHES``; ``--arch`` or ``$XENDMOP_LAB_ARCH``, default amd64): arm64 builds an
arm64 root filesystem on this (x86-64) host through ``qemu-user-static`` and binfmt_misc.

The image is made with ``mmdebstrap --variant=minbase`` from the mirrors this machine's apt
already uses (read at run time, never written into the repository), packed with
``mkfs.ext4 -d``, and cached under ``${XDG_CACHE_HOME:-~/.cache}/xendmop-lab/<recipe hash>``
together with ``xen`` (on amd64 gunzipped: QEMU's multiboot loader wants an ELF), ``vmlinuz`` and
``initrd.img``, one folder per release and architecture (``<release>-<recipe hash>`` for amd64,
``<release>-arm64-<recipe hash>``).  The hash covers the release, the architecture, this file
and ``packages.txt``: editing either rebuilds, anything else reuses the cache.

Usage: ``python3 integration/lab/image.py [--release R] [--arch A] [--rebuild]`` prints the cache
directory.
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
#: what else makes a foreign architecture's image: its hypervisor's build (imported only to build)
FOREIGN_RECIPE = (LAB / "xen_source.py",)
#: the Debian releases the lab boots, and what each gives (packages.txt names no version).
RELEASES = {
    "bookworm": "Debian 12: Xen 4.17, Linux 6.1",
    "trixie": "Debian 13: Xen 4.20, Linux 6.12",
}
DEFAULT_RELEASE = "bookworm"
#: the CPU architectures the lab boots (Debian's names), and what runs them.
ARCHES = {
    "amd64": "x86-64: qemu-system-x86_64, Xen as a multiboot kernel",
    "arm64": "Arm64: qemu-system-aarch64 -M virt (GICv3, EL2), Xen as the kernel, dom0 by guest-loader",
}
DEFAULT_ARCH = "amd64"
#: the kernel's names for them (``uname -m``, jobs.py's RELEASE/ARCH), accepted as well
ARCH_ALIASES = {"x86_64": "amd64", "aarch64": "arm64"}
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


def lab_arch(name: str | None = None) -> str:
    """``name``, else ``$XENDMOP_LAB_ARCH``, else amd64, by Debian's name (``x86_64``/``aarch64``
    are taken for amd64/arm64); an architecture the lab does not know is a ValueError naming it
    and the known ones."""
    arch = name or os.environ.get("XENDMOP_LAB_ARCH") or DEFAULT_ARCH
    arch = ARCH_ALIASES.get(arch, arch)
    if arch not in ARCHES:
        raise ValueError(f"XENDMOP_LAB_ARCH / --arch: {arch!r} is not one of {', '.join(ARCHES)}")
    return arch


def host_arch() -> str:
    """This machine's architecture by Debian's name (the lab is built and run on amd64)."""
    machine = os.uname().machine
    return ARCH_ALIASES.get(machine, machine)


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


def packages(arch: str = DEFAULT_ARCH, text: str | None = None) -> list[str]:
    """The package list for ``arch``, shared with vagrant/provision.sh: a line ``name [a b]``
    is for those architectures only (Debian's build-dependency notation), any other line for all.
    An architecture qualifier naming no known architecture is a ValueError naming the line."""
    names = []
    for number, line in enumerate((PACKAGES.read_text() if text is None else text).splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, qualifier = line.partition("[")
        if qualifier:
            only = qualifier.rstrip("]").split()
            unknown = [a for a in only if a not in ARCHES]
            if not qualifier.endswith("]") or not only or unknown:
                known = ", ".join(ARCHES)
                raise ValueError(f"packages.txt line {number}: {line!r}: qualifier must be [arch ...] of {known}")
            if arch not in only:
                continue
        names.append(name.strip())
    return names


def image_name(release: str, arch: str = DEFAULT_ARCH) -> str:
    """The cache folder's name: ``<release>-<hash>`` (amd64, as before arm64 came), else
    ``<release>-<arch>-<hash>``."""
    prefix = release if arch == DEFAULT_ARCH else f"{release}-{arch}"
    return f"{prefix}-{recipe_hash(release, arch)}"


def recipe_hash(release: str, arch: str = DEFAULT_ARCH) -> str:
    # amd64's hash is what it was before the lab had a second architecture; arm64's also covers
    # the hypervisor's build (xen_source.py)
    h = hashlib.sha256(release.encode() + b"\0" + (b"" if arch == DEFAULT_ARCH else arch.encode() + b"\0"))
    for path in RECIPE if arch == DEFAULT_ARCH else (*RECIPE, *FOREIGN_RECIPE):
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


# A foreign architecture's dom0 initrd is made under qemu-user, where initramfs-tools' default
# (MODULES=most: every storage and filesystem driver) takes many minutes; that dom0 needs only what
# mounts its root, virtio on PCI and ext4 (udev in the initrd loads them; 9p comes from the root).
INITRD_CONF = "MODULES=list\n"
INITRD_HOOK = """#!/bin/sh
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
manual_add_modules virtio_pci virtio_blk ext4
"""


def _initrd_hooks(tmp: Path) -> list[str]:
    """mmdebstrap options that put INITRD_CONF and INITRD_HOOK in place before the kernel's
    package makes the initrd."""
    conf, hook = tmp / "initrd.conf", tmp / "initrd.hook"
    conf.write_text(INITRD_CONF)
    hook.write_text(INITRD_HOOK)
    where = "/etc/initramfs-tools"
    return [
        f'--essential-hook=mkdir -p "$1{where}/conf.d" "$1{where}/hooks"',
        f"--essential-hook=upload {conf} {where}/conf.d/xendmop-lab",
        f"--essential-hook=upload {hook} {where}/hooks/xendmop-lab",
        f'--essential-hook=chmod 755 "$1{where}/hooks/xendmop-lab"',
    ]


#: binfmt_misc's name for each foreign architecture's qemu-user interpreter
QEMU_USER = {"arm64": "aarch64"}
BINFMT = Path("/proc/sys/fs/binfmt_misc")


def ensure_foreign(arch: str) -> None:
    """Let this host run ``arch``'s programs (mmdebstrap runs the image's maintainer scripts):
    qemu-user-static registered with binfmt_misc, mounting binfmt_misc first if need be."""
    if arch == host_arch():
        return
    ensure_tools({f"qemu-{QEMU_USER[arch]}-static": "qemu-user-static", "update-binfmts": "binfmt-support"})
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=False)
    entry = BINFMT / f"qemu-{QEMU_USER[arch]}"
    if not entry.exists():
        subprocess.run(["update-binfmts", "--enable", entry.name], check=False)
    if not entry.exists():
        raise Unavailable(f"cannot register qemu-user-static for {arch} with binfmt_misc ({entry} missing)")


def _copy_boot_files(boot: Path, arch: str, out: Path, sources: list[str], tmp: Path) -> list[str]:
    """Xen, the dom0 kernel and its initrd out of the image's /boot, as QEMU loads them; lines
    for the recipe file saying where Xen came from."""
    if arch == "amd64":
        with gzip.open(_newest(boot, "xen-4.*-amd64.gz")) as src, open(out / "xen", "wb") as dst:
            shutil.copyfileobj(src, dst)
        said = []
    else:  # Debian's Xen/Arm has no DMOPs: the same source built with ioreq servers (xen_source.py)
        sys.path.insert(0, str(LAB))
        import xen_source

        ensure_tools(xen_source.HOST_TOOLS)
        log("building Xen/Arm with CONFIG_IOREQ_SERVER from Debian's source (Debian's binary has no dm_op)")
        shutil.copy(_newest(boot, f"xen-4.*-{arch}"), out / "xen-debian")  # kept, unbooted, for comparison
        said = [xen_source.build(tmp / "xen-source", sources, _newest(boot, f"xen-4.*-{arch}.config"), out / "xen")]
    shutil.copy(_newest(boot, "vmlinuz-*"), out / "vmlinuz")
    shutil.copy(_newest(boot, "initrd.img-*"), out / "initrd.img")
    return said


def build(dest: Path, release: str, arch: str = DEFAULT_ARCH) -> None:
    ensure_tools({"mmdebstrap": "mmdebstrap", "mkfs.ext4": "e2fsprogs"})
    ensure_foreign(arch)
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
            # a foreign architecture (the amd64 command is as it was)
            *([] if arch == host_arch() else [f"--architectures={arch}", *_initrd_hooks(Path(tmp))]),
            f"--include={','.join(packages(arch))}",
            release,
            str(root),
            *sources,
        ]
        log(f"building the {release} {arch} dom0 root filesystem ({RELEASES[release]}; mmdebstrap, a few minutes)")
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
        xen_said = _copy_boot_files(boot, arch, out, sources, Path(tmp))
        # 2 GiB sparse: room for the tests' temporary files; QEMU's snapshot=on keeps writes away anyway.
        mkfs = ["mkfs.ext4", "-q", "-F", "-L", "xendmop-dom0", "-d", str(root), str(out / "dom0.ext4"), "2G"]
        subprocess.run(mkfs, check=True, stdout=sys.stderr)
        recipe = [f"{release} {arch} {recipe_hash(release, arch)}", *sources, *xen_said]
        (out / "recipe").write_text("\n".join(recipe) + "\n")
        os.rename(out, dest)
        log(f"dom0 image built in {time.monotonic() - t0:.0f} s: {dest}")


def ensure_image(rebuild: bool = False, release: str | None = None, arch: str | None = None) -> Artifacts:
    """The cached artifacts of ``release``'s current recipe for ``arch``, building them first if
    needed."""
    release, arch = lab_release(release), lab_arch(arch)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    art = Artifacts(root / image_name(release, arch))
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others then reuse its result
        if rebuild and art.dir.exists():
            shutil.rmtree(art.dir)
        if not art.complete():
            if art.dir.exists():
                shutil.rmtree(art.dir)
            build(art.dir, release, arch)
            _prune(root, keep=art.dir, release=release, arch=arch)
    return art


def _prune(root: Path, keep: Path, release: str, arch: str = DEFAULT_ARCH) -> None:
    """Drop the release's images of older recipes for ``arch`` (about 1 GB each); other
    releases, other architectures and run results stay."""
    prefix = keep.name[: -len(recipe_hash(release, arch))]
    for old in root.glob(f"{prefix}*"):
        if old.is_dir() and old != keep and len(old.name) == len(keep.name):
            shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rebuild", action="store_true", help="rebuild even when the cache is current")
    ap.add_argument(
        "--release", choices=sorted(RELEASES), help="Debian release (default: $XENDMOP_LAB_RELEASE, else bookworm)"
    )
    ap.add_argument("--arch", choices=sorted([*ARCHES, *ARCH_ALIASES]),
                    help="architecture (default: $XENDMOP_LAB_ARCH, else amd64)")  # fmt: skip
    args = ap.parse_args(argv)
    try:
        art = ensure_image(args.rebuild, args.release, lab_arch(args.arch))
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
