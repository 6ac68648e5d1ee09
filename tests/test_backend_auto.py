"""``backend="auto"`` never lies: the mock only off Xen, said once on stderr; on a Xen host whose
privcmd cannot be opened, an error naming the device and what to do."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from xendmop.backends import device, selection
from xendmop.backends.selection import MockFallbackWarning
from xendmop.devicemodel import DeviceModel
from xendmop.errors import ArgumentError

ROOT = Path(__file__).resolve().parents[1]


def fake_root(tmp_path: Path, *, privcmd: bool = False, proc_xen: bool = False, hypervisor: str | None = None) -> str:
    """A directory shaped like ``/`` with the given signs of a Xen host."""
    if privcmd:
        (tmp_path / "dev/xen").mkdir(parents=True)
        (tmp_path / "dev/xen/privcmd").touch()
    if proc_xen:
        (tmp_path / "proc/xen").mkdir(parents=True)
    if hypervisor is not None:
        (tmp_path / "sys/hypervisor").mkdir(parents=True)
        (tmp_path / "sys/hypervisor/type").write_text(hypervisor + "\n")
    return str(tmp_path)


@pytest.mark.parametrize(
    ("shape", "signs"),
    [
        ({}, []),
        ({"hypervisor": "kvm"}, []),
        ({"privcmd": True}, ["/dev/xen/privcmd exists"]),
        ({"proc_xen": True}, ["/proc/xen exists"]),
        ({"hypervisor": "xen"}, ["/sys/hypervisor/type is xen"]),
    ],
)
def test_the_signs_of_a_xen_host(tmp_path: Path, shape: dict[str, Any], signs: list[str]) -> None:
    assert device.xen_host_signs(fake_root(tmp_path, **shape)) == signs


def refuse_real_backends(monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    real = selection.make_backend

    def make(name: str, **kw: Any) -> Any:
        if name in ("privcmd", "libxen"):
            raise OSError(err, f"{name}: {os.strerror(err)}", device.PRIVCMD_PATH)
        return real(name, **kw)

    monkeypatch.setattr(selection, "make_backend", make)
    monkeypatch.delenv("XENDMOP_BACKEND", raising=False)
    monkeypatch.delenv("XENDMOP_MOCK_SOCKET", raising=False)


def test_on_a_xen_host_a_privcmd_that_cannot_be_opened_is_an_error_not_the_mock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refuse_real_backends(monkeypatch, errno.EACCES)
    monkeypatch.setattr(selection, "xen_host_signs", lambda: ["/proc/xen exists"])
    with pytest.raises(PermissionError) as caught:
        DeviceModel.open()
    message = str(caught.value)
    assert "/dev/xen/privcmd" in message and "/proc/xen exists" in message
    assert "root" in message and "mock" in message  # what to do: access, or ask for the mock by name


def test_off_xen_auto_picks_the_mock_and_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    refuse_real_backends(monkeypatch, errno.ENOENT)
    monkeypatch.setattr(selection, "xen_host_signs", lambda: [])
    monkeypatch.setattr(selection, "_mock_warned", False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with DeviceModel.open() as dm:
            assert dm.backend.name == "mock"
        with DeviceModel.open() as dm:
            assert dm.backend.name == "mock"
    said = [w for w in seen if issubclass(w.category, MockFallbackWarning)]
    assert len(said) == 1
    assert "not a Xen host" in str(said[0].message) and "mock" in str(said[0].message)


def test_a_bogus_xendmop_backend_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XENDMOP_BACKEND", "bogus")
    with pytest.raises(ArgumentError, match="XENDMOP_BACKEND='bogus'"):
        DeviceModel.open()


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("XENDMOP_BACKEND", "XENDMOP_MOCK_SOCKET")}
    return subprocess.run(
        [sys.executable, "-m", "xendmop", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, "PYTHONPATH": str(ROOT), **env},
    )


def test_the_cli_says_once_on_stderr_that_auto_chose_the_mock_and_quiet_silences_it() -> None:
    if device.xen_host_signs():
        pytest.skip("this is a Xen host: auto does not pick the mock here")
    done = cli("nr-vcpus", "1")
    assert done.returncode == 0 and done.stdout == "2\n"
    assert done.stderr.count("\n") == 1 and "not a Xen host" in done.stderr and "mock" in done.stderr
    assert "Warning" not in done.stderr and ".py:" not in done.stderr  # a line for a person, not a warnings dump
    quiet = cli("--quiet", "nr-vcpus", "1")
    assert quiet.returncode == 0 and quiet.stdout == "2\n" and quiet.stderr == ""
    after = cli("nr-vcpus", "1", "--quiet")
    assert after.returncode == 0 and after.stderr == ""


def test_info_names_the_mock_host_socket_in_use(mock_host_process: str) -> None:
    done = cli("info", XENDMOP_MOCK_SOCKET=mock_host_process)
    assert done.returncode == 0, done.stderr
    assert f"mock host at {mock_host_process}" in done.stdout
