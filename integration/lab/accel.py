"""Which accelerator the lab's QEMU uses: KVM when the host's KVM offers its guests the
hardware virtualisation Xen needs (nested SVM or VMX), QEMU's software emulation (TCG) otherwise.

Xen is itself a hypervisor, so under KVM it needs SVM or VMX inside its virtual CPU. KVM offers
those only when its module allows nesting (Linux arch/x86/kvm/svm/svm.c, svm_set_cpu_caps, and
arch/x86/kvm/vmx/vmx.c, vmx_set_cpu_caps: the feature bit is set only `if (nested)`), and the
CPUID bits KVM can give a guest are exactly what KVM_GET_SUPPORTED_CPUID returns
(Documentation/virt/kvm/api.rst, arch/x86/kvm/cpuid.c kvm_dev_ioctl_get_cpuid). So the lab asks
/dev/kvm itself rather than guessing from module parameters, which a sandbox may hide.

`$XENDMOP_LAB_ACCEL` = `auto` (default), `tcg` or `kvm` overrides the choice; `kvm` on a host
that cannot give it is an error naming the reason, not a silent fallback.
"""

from __future__ import annotations

import errno
import fcntl
import os
import platform
import struct
from dataclasses import dataclass

KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
KVM_GET_SUPPORTED_CPUID = 0xC008AE05  # _IOWR(KVMIO, 0x05, struct kvm_cpuid2): 8-byte header
KVM_API_VERSION = 12
CPUID_ENTRY = struct.Struct("<7I12x")  # struct kvm_cpuid_entry2: function, index, flags, eax..edx, padding[3]
CPUID_ENTRIES = 256

# (leaf, register, bit, name): CPUID.1:ECX.VMX[5] (Intel), CPUID.80000001h:ECX.SVM[2] (AMD).
NESTED_BITS = ((0x1, "ecx", 5, "VMX"), (0x80000001, "ecx", 2, "SVM"))

# QEMU's arguments per accelerator, for an x86-64 Xen.  Under TCG `-cpu max` crashes dom0 at its
# first page fault; this model gives Xen SVM + HAP (nested paging).  Under KVM the host CPU model
# carries the nested SVM/VMX that KVM offers.
QEMU_ARGS = {
    "tcg": ("-accel", "tcg,thread=multi", "-cpu", "qemu64,+svm,+npt,+nrip-save"),
    "kvm": ("-accel", "kvm", "-cpu", "host"),
}
CHOICES = ("auto", "tcg", "kvm")


class AccelError(ValueError):
    """$XENDMOP_LAB_ACCEL names no accelerator, or asks for KVM where it cannot serve Xen."""


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    why: str  # one line a person reads: why this one

    @property
    def qemu_args(self) -> tuple[str, ...]:
        return QEMU_ARGS[self.name]

    def __str__(self) -> str:
        return f"{self.name.upper()} ({self.why})"


def supported_cpuid(dev: str = "/dev/kvm") -> dict[int, tuple[int, int, int, int]]:
    """KVM_GET_SUPPORTED_CPUID: leaf (index 0) → (eax, ebx, ecx, edx) that KVM can give a guest."""
    fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            raise OSError(errno.EPROTO, f"KVM API version {version}, expected {KVM_API_VERSION}")
        buf = bytearray(struct.pack("<II", CPUID_ENTRIES, 0) + bytes(CPUID_ENTRY.size * CPUID_ENTRIES))
        fcntl.ioctl(fd, KVM_GET_SUPPORTED_CPUID, buf)
    finally:
        os.close(fd)
    (count,) = struct.unpack_from("<I", buf)
    leaves = {}
    for i in range(min(count, CPUID_ENTRIES)):
        function, index, _flags, *regs = CPUID_ENTRY.unpack_from(buf, 8 + i * CPUID_ENTRY.size)
        if index == 0:
            leaves[function] = tuple(regs)
    return leaves


def nested_features(leaves: dict[int, tuple[int, int, int, int]]) -> list[str]:
    """The names of the nesting features (VMX, SVM) among KVM's supported CPUID leaves."""
    found = []
    for leaf, reg, bit, name in NESTED_BITS:
        regs = leaves.get(leaf)
        if regs is not None and regs["eax ebx ecx edx".split().index(reg)] >> bit & 1:
            found.append(name)
    return found


def kvm_nesting(arch: str = "x86_64", dev: str = "/dev/kvm", host: str | None = None) -> tuple[list[str], str]:
    """The nesting features KVM offers a lab of `arch` here, and why none when the list is empty."""
    host = host or platform.machine()
    if arch != host:
        return [], f"KVM runs only the host's own architecture ({host}), not {arch}"
    if arch != "x86_64":
        return [], f"nested KVM is checked only on x86_64, not {arch}"
    try:
        features = nested_features(supported_cpuid(dev))
    except FileNotFoundError:
        return [], f"no {dev}"
    except OSError as e:
        return [], f"{dev}: {e.strerror or e}"
    if not features:
        return [], "KVM here offers its guests neither SVM nor VMX, which Xen needs"
    return features, f"{dev} offers nested {'/'.join(features)}"


def choose(arch: str = "x86_64", env: dict[str, str] | None = None, dev: str = "/dev/kvm") -> Accel:
    """The accelerator for a lab of `arch`, honouring $XENDMOP_LAB_ACCEL."""
    want = (env if env is not None else os.environ).get("XENDMOP_LAB_ACCEL", "auto") or "auto"
    if want not in CHOICES:
        raise AccelError(f"XENDMOP_LAB_ACCEL={want!r}: expected one of {', '.join(CHOICES)}")
    if want == "tcg":
        return Accel("tcg", "XENDMOP_LAB_ACCEL=tcg")
    features, why = kvm_nesting(arch, dev)
    if features:
        return Accel("kvm", why)
    if want == "kvm":
        raise AccelError(f"XENDMOP_LAB_ACCEL=kvm, but {why}")
    return Accel("tcg", why)
