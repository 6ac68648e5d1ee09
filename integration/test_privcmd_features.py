"""What this dom0's privcmd offers beyond DMOPs, and what ``xendmop info`` says of the host.

irqfd and ioeventfd (Linux 6.7+, ``CONFIG_XEN_PRIVCMD_EVENTFD``) are probed on the real
privcmd, and the answer must be the one the running kernel's own config predicts: ENOTTY
before 6.7 (Debian 12's 6.1), EOPNOTSUPP when built without the option (Debian 13's 6.12 for
amd64: it needs ``CONFIG_XEN_VIRTIO``, which that config leaves unset), available with it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import xenlab

from xendmop.backends import eventfd
from xendmop.backends.device import OsDevice


def _expected() -> eventfd.Support:
    config = Path("/boot") / f"config-{platform.release()}"
    if "CONFIG_XEN_PRIVCMD_EVENTFD=y" in config.read_text().splitlines():
        return eventfd.Support.AVAILABLE
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    return eventfd.Support.NOT_BUILT if (major, minor) >= (6, 7) else eventfd.Support.KERNEL_TOO_OLD


def test_irqfd_and_ioeventfd_are_what_the_kernels_config_says() -> None:
    fd = os.open(xenlab.PRIVCMD, os.O_RDWR | os.O_CLOEXEC)
    device = OsDevice(xenlab.PRIVCMD, fd)
    try:
        found = eventfd.probe(device)
    finally:
        device.close()
    expected = _expected()
    assert found == {"irqfd": expected, "ioeventfd": expected}, (platform.release(), found)
    print(f"Linux {platform.release()}: irqfd/ioeventfd {expected.value}")


def test_info_names_xen_the_kernel_and_the_eventfd_features() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "xendmop", "info", "--json"], capture_output=True, text=True, timeout=120, check=True
    )
    info = json.loads(done.stdout)
    xl = dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in xenlab.xl("info").splitlines()))
    assert info["xen"] == f"{xl['xen_major']}.{xl['xen_minor']}{xl['xen_extra']}"
    assert info["kernel"] == platform.release()
    assert info["backends"]["privcmd"]["eventfd"] == {"irqfd": _expected().value, "ioeventfd": _expected().value}
