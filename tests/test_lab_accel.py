"""The lab's choice between KVM and TCG (integration/lab/accel.py), asked of real devices."""

import os
import sys
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parent.parent / "integration" / "lab"
sys.path.insert(0, str(LAB))
import accel  # noqa: E402
import image  # noqa: E402
import run  # noqa: E402

VMX_ONLY = {0x1: (0, 0, 1 << 5, 0)}
SVM_ONLY = {0x80000001: (0, 0, 1 << 2, 0)}


@pytest.mark.parametrize(
    "leaves, names",
    [({}, []), (VMX_ONLY, ["VMX"]), (SVM_ONLY, ["SVM"]), ({**VMX_ONLY, **SVM_ONLY}, ["VMX", "SVM"]),
     ({0x1: (0, 0, ~(1 << 5) & 0xFFFFFFFF, 0xFFFFFFFF), 0x80000001: (0xFFFFFFFF, 0, 0b11, 0)}, [])],
)  # fmt: skip
def test_nested_features_reads_the_vmx_and_svm_bits_only(leaves, names):
    assert accel.nested_features(leaves) == names


def test_a_bad_choice_is_refused_naming_it():
    with pytest.raises(accel.AccelError, match=r"XENDMOP_LAB_ACCEL='kqemu'"):
        accel.choose(env={"XENDMOP_LAB_ACCEL": "kqemu"})


def test_tcg_asked_for_is_tcg_with_the_reason():
    chosen = accel.choose(env={"XENDMOP_LAB_ACCEL": "tcg"})
    assert (chosen.name, chosen.why) == ("tcg", "XENDMOP_LAB_ACCEL=tcg")
    assert chosen.qemu_args[:2] == ("-accel", "tcg,thread=multi")


def test_no_device_falls_back_to_tcg_saying_so(tmp_path):
    chosen = accel.choose(env={}, dev=str(tmp_path / "kvm"))
    assert chosen.name == "tcg" and chosen.why == f"no {tmp_path / 'kvm'}"


def test_a_device_that_is_not_kvm_is_asked_and_refused():
    # /dev/null answers KVM's ioctl with ENOTTY: a real ioctl, a real refusal.
    chosen = accel.choose(env={}, dev="/dev/null")
    assert chosen.name == "tcg" and chosen.why.startswith("/dev/null: ")
    with pytest.raises(accel.AccelError, match="XENDMOP_LAB_ACCEL=kvm, but /dev/null: "):
        accel.choose(env={"XENDMOP_LAB_ACCEL": "kvm"}, dev="/dev/null")


def test_a_foreign_architecture_never_gets_kvm():
    other = "aarch64" if os.uname().machine != "aarch64" else "x86_64"
    chosen = accel.choose(other, env={"XENDMOP_LAB_ACCEL": "auto"})
    assert chosen.name == "tcg" and "host's own architecture" in chosen.why


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no usable /dev/kvm on this host")
def test_this_hosts_kvm_decides_by_what_it_offers_its_guests():
    offered = accel.nested_features(accel.supported_cpuid())
    chosen = accel.choose(env={})
    assert chosen.name == ("kvm" if offered else "tcg")
    assert (chosen.name == "kvm") == ("offers nested" in chosen.why)


def test_the_qemu_command_carries_the_chosen_accelerator(tmp_path):
    art = image.Artifacts(tmp_path)
    for name in ("tcg", "kvm"):
        cmd = run.qemu_command(art, tmp_path, accel.Accel(name, "test"))
        at = cmd.index("-accel")
        assert tuple(cmd[at : at + 4]) == accel.QEMU_ARGS[name]
        assert cmd.count("-accel") == 1 and cmd.count("-cpu") == 1
