"""The ``xendmop`` command as a new user meets it: one line per error and never a traceback, the
same flags before or after the subcommand, 2 for every usage error and 1 for a refusal, enum
names, help without reST, and a subcommand for every libxendevicemodel function."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from xendmop import cli
from xendmop.backends.device import xen_host_signs

ROOT = Path(__file__).resolve().parents[1]
#: libxendevicemodel 4.17's functions (``nm -D libxendevicemodel.so.1``) but open, close and restrict,
#: which a one-shot command has no use for
LIBXENDEVICEMODEL = """
    create_ioreq_server destroy_ioreq_server get_ioreq_server_info inject_event inject_msi
    map_io_range_to_ioreq_server map_mem_type_to_ioreq_server map_pcidev_to_ioreq_server modified_memory
    modified_memory_bulk nr_vcpus pin_memory_cacheattr relocate_memory set_ioreq_server_state set_irq_level
    set_isa_irq_level set_mem_type set_pci_intx_level set_pci_link_route shutdown track_dirty_vram
    unmap_io_range_from_ioreq_server unmap_pcidev_from_ioreq_server
""".split()


def run(*args: str, shell: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("XENDMOP_BACKEND", "XENDMOP_MOCK_SOCKET")}
    command: list[str] | str = [sys.executable, "-m", "xendmop", *args] if shell is None else shell
    return subprocess.run(
        command,
        shell=shell is not None,
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, "PYTHONPATH": str(ROOT), **env},
    )


@pytest.fixture(autouse=True)
def _off_xen() -> None:
    if xen_host_signs():
        pytest.skip("a Xen host: these runs expect auto to pick the mock")


@pytest.mark.parametrize(
    ("args", "env", "status", "named"),
    [
        (["--backend", "privcmd", "info"], {}, 1, "/dev/xen/privcmd"),
        (["nr-vcpus", "1"], {"XENDMOP_MOCK_SOCKET": "/nonexistent"}, 1, "XENDMOP_MOCK_SOCKET=/nonexistent"),
        (["depriv-check", "-1"], {}, 2, "'-1'"),
        (["nr-vcpus", "-1"], {}, 2, "'-1'"),
        (["nr-vcpus", "x"], {}, 2, "'x'"),
        (["info", "-5"], {}, 2, "'-5'"),
        (["info", str(2**70)], {}, 2, str(2**70)),
        (["shutdown", "1", "sideways"], {}, 2, "poweroff"),
        (["nr-vcpus", "1"], {"XENDMOP_BACKEND": "bogus"}, 2, "XENDMOP_BACKEND='bogus'"),
    ],
)
def test_one_line_and_the_status_for_each_mistake_never_a_traceback(
    args: list[str], env: dict[str, str], status: int, named: str
) -> None:
    done = run("--quiet", *args, **env) if args[0] != "depriv-check" else run(*args, **env)
    assert done.returncode == status, done.stderr
    assert "Traceback" not in done.stderr and named in done.stderr
    assert "_int" not in done.stderr  # argparse's "invalid _int value": an internal name
    last = done.stderr.strip().splitlines()[-1]
    assert named in last  # the reason is on the last line (argparse puts its usage above it)


def test_a_closed_pipe_ends_the_output_without_a_traceback() -> None:
    done = run(shell=f"{sys.executable} -m xendmop ops | head -3")
    assert done.stdout.count("\n") == 3 and "Traceback" not in done.stderr and done.stderr == ""


@pytest.mark.parametrize("args", [["info"], ["ops"], ["nr-vcpus", "1"], ["shutdown", "1", "poweroff"]])
def test_json_is_taken_before_and_after_the_subcommand(args: list[str]) -> None:
    after = run("--quiet", *args, "--json")
    before = run("--quiet", "--json", *args)
    assert after.returncode == before.returncode == 0, after.stderr + before.stderr
    assert after.stdout.lstrip().startswith(("{", "[")) and before.stdout.lstrip().startswith(("{", "["))


def test_depriv_check_takes_json_before_its_name_too() -> None:
    done = run("--json", "depriv-check", str(os.getpid()))
    assert done.stdout.lstrip().startswith("{"), done.stdout + done.stderr


def test_enum_arguments_take_their_names() -> None:
    done = run("--quiet", "shutdown", "1", "poweroff")
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
    done = run("--quiet", "create-ioreq-server", "1", "--handle-bufioreq", "atomic")
    assert done.returncode == 0 and done.stdout.strip().isdigit(), done.stderr


def test_every_libxendevicemodel_function_has_its_subcommand() -> None:
    missing = [f for f in LIBXENDEVICEMODEL if f.replace("_", "-") not in cli.COMMANDS]
    assert missing == []


def test_subcommands_that_were_missing_run() -> None:
    done = run("--quiet", "get-ioreq-server-info", "1", "0")
    assert done.returncode == 1 and "ENOENT" in done.stderr  # no server 0 in dom1: Xen's refusal, one line
    assert run("--quiet", "map-io-range-to-ioreq-server", "1", "0", "0", "0x3f8", "0x3ff").returncode == 1
    assert run("--quiet", "track-dirty-vram", "1", "0", "8").returncode == 0


def test_help_has_no_rest_markup() -> None:
    texts = [run("--help").stdout] + [run(name, "--help").stdout for name in ("get-ioreq-server-info", "inject-event")]
    for text in texts:
        assert "``" not in text and "Traceback" not in text, text


def test_the_mock_host_logs_clients_and_the_servers_left_at_exit(tmp_path: Path) -> None:
    import signal

    from xendmop import DeviceModel
    from xendmop.mock.remote import RemoteXen

    sock = str(tmp_path / "xen.sock")
    host = subprocess.Popen(
        [sys.executable, "-m", "xendmop", "mock-host", "--socket", sock],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert host.stdout is not None and "listening" in host.stdout.readline()
        with RemoteXen(sock) as remote, DeviceModel.open("mock", xen=remote) as dm:
            sid = dm.create_ioreq_server(1, 0)  # left behind on purpose
        host.send_signal(signal.SIGTERM)
        _, err = host.communicate(timeout=30)
    finally:
        host.kill()
        host.wait()
    assert host.returncode == 0, err
    lines = err.splitlines()
    assert any("connected" in line and "disconnected" not in line for line in lines), err
    assert any("disconnected" in line for line in lines), err
    assert any(f"ioreq server(s) left: dom1 [{sid}]" in line for line in lines), err
