"""The lab's architecture switch (integration/lab/image.py, run.py): amd64 as before, arm64 beside it."""

import shutil
import sys
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parent.parent / "integration" / "lab"
sys.path.insert(0, str(LAB))
import accel  # noqa: E402
import image  # noqa: E402
import run  # noqa: E402
import xen_source  # noqa: E402

TCG = accel.Accel("tcg", "test")


def test_the_arch_comes_from_the_argument_then_the_environment_then_amd64(monkeypatch):
    monkeypatch.delenv("XENDMOP_LAB_ARCH", raising=False)
    assert image.lab_arch() == "amd64"
    monkeypatch.setenv("XENDMOP_LAB_ARCH", "arm64")
    assert image.lab_arch() == "arm64"
    assert image.lab_arch("amd64") == "amd64"


def test_an_unknown_arch_is_refused_naming_it_and_the_known_ones(monkeypatch):
    monkeypatch.setenv("XENDMOP_LAB_ARCH", "riscv64")
    with pytest.raises(ValueError, match=r"'riscv64' is not one of amd64, arm64"):
        image.lab_arch()


def test_run_refuses_an_unknown_arch_before_booting(monkeypatch, capsys):
    monkeypatch.setenv("XENDMOP_LAB_ARCH", "mips")
    with pytest.raises(SystemExit) as e:
        run.main(["true"])
    assert e.value.code == 2
    assert "'mips'" in capsys.readouterr().err


PACKAGES = """# comment
common-a
only-x86 [amd64]
only-arm [arm64]  # with a comment
both [amd64 arm64]
"""


def test_package_lines_with_an_arch_qualifier_are_for_that_arch_only():
    assert image.packages("amd64", PACKAGES) == ["common-a", "only-x86", "both"]
    assert image.packages("arm64", PACKAGES) == ["common-a", "only-arm", "both"]


@pytest.mark.parametrize("line", ["bad [sparc]", "bad [amd64", "bad []"])
def test_a_bad_qualifier_is_refused_naming_the_line(line):
    with pytest.raises(ValueError, match=r"line 2: 'bad \["):
        image.packages("amd64", f"ok\n{line}\n")


def test_the_real_list_gives_each_arch_its_own_xen_and_kernel():
    amd64, arm64 = image.packages("amd64"), image.packages("arm64")
    assert {"xen-system-amd64", "linux-image-amd64", "qemu-system-xen"} <= set(amd64)
    assert {"xen-system-arm64", "linux-image-arm64"} <= set(arm64)
    assert [name for name in arm64 if name.endswith("-amd64") or name == "qemu-system-xen"] == []


def test_images_are_cached_per_release_and_arch():
    names = {image.image_name(r, a) for r in image.RELEASES for a in image.ARCHES}
    assert len(names) == len(image.RELEASES) * len(image.ARCHES)
    assert image.image_name("bookworm").startswith("bookworm-") and "arm64" not in image.image_name("bookworm")
    assert image.image_name("trixie", "arm64").startswith("trixie-arm64-")


def test_pruning_an_arch_keeps_the_other_archs_and_releases(tmp_path):
    keep = tmp_path / image.image_name("bookworm", "arm64")
    old_arm = tmp_path / ("bookworm-arm64-" + "0" * 16)
    others = [tmp_path / image.image_name(r, a) for r, a in (("bookworm", "amd64"), ("trixie", "arm64"))]
    others.append(tmp_path / "runs")
    for d in [keep, old_arm, *others]:
        d.mkdir()
    image._prune(tmp_path, keep=keep, release="bookworm", arch="arm64")
    assert keep.is_dir() and not old_arm.exists() and all(d.is_dir() for d in others)
    image._prune(tmp_path, keep=others[0], release="bookworm")
    assert keep.is_dir() and others[0].is_dir()


@pytest.fixture
def art(tmp_path):
    a = image.Artifacts(tmp_path / "img")
    a.dir.mkdir()
    for path, size in ((a.xen, 1000), (a.vmlinuz, (3 << 20) + 1), (a.initrd, 5000), (a.image, 10)):
        path.write_bytes(bytes(size))
    return a


def test_the_amd64_command_is_what_it_was(art, tmp_path):
    cmd = run.qemu_command(art, tmp_path / "res", TCG)
    assert cmd[:5] == ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "qemu64,+svm,+npt,+nrip-save"]
    assert cmd[cmd.index("-append") + 1] == run.XEN_ARGS
    assert cmd[cmd.index("-initrd") + 1] == f"{art.vmlinuz} {run.DOM0_ARGS},{art.initrd}"
    assert "earlyprintk=xen" in run.DOM0_ARGS and "console=com1" in run.XEN_ARGS


def test_the_arm64_command_boots_xen_at_el2_on_gicv3_with_dom0_from_guest_loader(art, tmp_path):
    cmd = run.qemu_command(art, tmp_path / "res", TCG, "arm64")
    assert cmd[0] == "qemu-system-aarch64"
    assert cmd[cmd.index("-M") + 1] == "virt,virtualization=on,gic-version=3"
    assert cmd[cmd.index("-cpu") + 1] == "cortex-a57"
    assert cmd[cmd.index("-kernel") + 1] == str(art.xen)
    assert cmd[cmd.index("-append") + 1].startswith("console=dtuart ")
    loaders = [cmd[i + 1] for i, word in enumerate(cmd) if word == "-device" and cmd[i + 1].startswith("guest-loader")]
    # the kernel is 3 MiB + 1 byte: the initrd goes on the next 2 MiB boundary after it
    assert loaders == [
        f"guest-loader,addr=0x50000000,kernel={art.vmlinuz},bootargs={run.DOM0_ARGS_ARM64}",
        f"guest-loader,addr=0x50400000,initrd={art.initrd}",
    ]
    assert "earlyprintk=xen" not in run.DOM0_ARGS_ARM64 and "-initrd" not in cmd


def test_the_shared_devices_are_the_same_on_both_arches(art, tmp_path):
    x86 = run.qemu_command(art, tmp_path / "res", TCG)
    arm = run.qemu_command(art, tmp_path / "res", TCG, "arm64")
    assert x86[x86.index("-drive") :] == arm[arm.index("-drive") :]


def test_an_arm64_lab_is_never_asked_to_use_kvm(art, tmp_path):
    with pytest.raises(accel.AccelError, match="TCG only"):
        run.qemu_command(art, tmp_path / "res", accel.Accel("kvm", "test"), "arm64")
    assert accel.choose("aarch64", env={}, dev=str(tmp_path / "no-kvm")).name == "tcg"


@pytest.mark.parametrize("size", [0, -1])
def test_module_addresses_refuse_a_size_that_is_no_size(size):
    with pytest.raises(ValueError, match=f"kernel_size: {size}"):
        run.arm64_module_addrs(size)


def test_module_addresses_align_the_initrd_after_the_kernel():
    assert run.arm64_module_addrs(1) == (0x50000000, 0x50200000)
    assert run.arm64_module_addrs(2 << 20) == (0x50000000, 0x50200000)
    assert run.arm64_module_addrs((2 << 20) + 1) == (0x50000000, 0x50400000)


def test_the_hypervisor_source_comes_from_the_images_own_suites():
    lines = ["deb http://mirror.invalid/debian bookworm main", "deb http://mirror.invalid/sec bookworm-security main"]
    assert xen_source.source_lines(lines) == [line.replace("deb ", "deb-src ", 1) for line in lines]
    with pytest.raises(ValueError, match=r"source line 'deb-src x y': expected"):
        xen_source.source_lines(["deb-src x y"])


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="needs dpkg --compare-versions (a Debian host)")
def test_source_versions_are_tried_newest_first_by_debians_rules():
    found = ["4.17.5+72-g01140da4e8-1", "4.17.7+13-g2445b30a44-0+deb12u1", "4.17.10-1", "4.17.7~rc1-1"]
    assert xen_source.newest_first(found) == [
        "4.17.10-1", "4.17.7+13-g2445b30a44-0+deb12u1", "4.17.7~rc1-1", "4.17.5+72-g01140da4e8-1",
    ]  # fmt: skip


def test_the_arm64_recipe_covers_the_hypervisor_build_and_amd64s_does_not(monkeypatch):
    before = image.recipe_hash("bookworm", "arm64"), image.recipe_hash("bookworm")
    monkeypatch.setattr(image, "FOREIGN_RECIPE", (LAB / "dom0-init.sh",))  # stands for an edited xen_source.py
    assert image.recipe_hash("bookworm", "arm64") != before[0]
    assert image.recipe_hash("bookworm") == before[1]


@pytest.mark.parametrize("alias, arch", [("x86_64", "amd64"), ("aarch64", "arm64")])
def test_the_kernels_names_are_taken_as_jobs_py_writes_them(alias, arch):
    assert image.lab_arch(alias) == arch


def test_a_hypervisor_source_the_mirror_will_not_serve_is_a_failed_build(monkeypatch, capsys, tmp_path):
    def no_source(**kw):
        raise xen_source.SourceError("no xen source package downloads from the mirror (versions indexed: ['4.20.4'])")

    monkeypatch.setattr(image, "ensure_tools", lambda tools: None)
    monkeypatch.setattr(run, "boot", lambda *a, **kw: no_source())
    assert run.main(["--arch", "arm64", "--results", str(tmp_path), "true"]) == run.EXIT_BOOT_FAILED
    assert "no xen source package downloads" in capsys.readouterr().err
