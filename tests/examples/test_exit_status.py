"""What every example shares as a program: its --help states the same exit statuses, and serving a
domain it says "Ctrl-C to stop" once the server is up, then on SIGINT or SIGTERM destroys the
server and exits 0.  (debugcon's run is in test_debugcon.py; tapnet's, which needs a tap in a
network namespace, in test_tapnet.py.)"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from example_cli import example_env, read_until

from xendmop.runtime import dm_program

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ["debugcon", "uart16550", "pci_edu", "framebuffer", "tapnet"]


def squeeze(text: str) -> str:
    """``text`` with every run of whitespace one space: argparse re-wraps an epilog."""
    return " ".join(text.split())


@pytest.mark.parametrize("name", EXAMPLES)
def test_help_states_the_shared_exit_statuses(name: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=example_env(),
    )
    assert done.returncode == 0, done.stderr
    assert squeeze(dm_program.EXIT_STATUS_HELP) in squeeze(done.stdout)
    assert "0 when done, also when stopped by SIGINT (Ctrl-C) or SIGTERM" in dm_program.EXIT_STATUS_HELP


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize(
    ("name", "args", "serving"),
    [
        ("uart16550", [], "uart16550: serving dom1's COM1; Ctrl-C to stop"),
        ("pci_edu", [], "pci_edu: serving dom1's edu at 0000:00:04.0; Ctrl-C to stop"),
        (
            "framebuffer",
            ["--interval", "0"],
            "framebuffer: serving dom1's display on ports 0x1ce/0x1cf; Ctrl-C to stop",
        ),
    ],
)
def test_serving_a_domain_until_a_signal_exits_0_and_leaves_no_server(
    mock_host_process: str, tmp_path: Path, name: str, args: list[str], serving: str, signum: int
) -> None:
    from xendmop.mock.remote import RemoteXen

    if name == "framebuffer":
        args = [*args, "--output", str(tmp_path / "fb.png")]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / f"{name}.py"), "--domid", "1", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=example_env(XENDMOP_MOCK_SOCKET=mock_host_process),
    )
    try:
        seen = read_until(proc.stdout, "Ctrl-C to stop")
        with RemoteXen(mock_host_process) as remote:
            assert len(remote.servers(1)) == 1, "announced before the server was up"
            assert seen.splitlines()[-1] == serving
            proc.send_signal(signum)
            out, _ = proc.communicate(timeout=30)
            assert proc.returncode == 0, seen + out
            assert remote.servers(1) == {}
        last = out.strip().splitlines()[-1]
        assert last == dm_program.stopped_line(name, signum) and "Traceback" not in out
    finally:
        proc.kill()
        proc.wait()
