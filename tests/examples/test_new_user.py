"""What a new user hits with the examples: a signal during bring-up or teardown, a directory given
as the PNG, ``--domid`` on a machine without Xen, INFO lines in some examples and not others,
and a way to see every ioreq (``--trace``)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from example_cli import example_env

from xendmop.backends.device import xen_host_signs
from xendmop.runtime import ServeLoop, dm_program

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = ROOT / "examples"
EXAMPLES = ["debugcon", "uart16550", "pci_edu", "framebuffer", "tapnet"]


def run(name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={k: v for k, v in example_env().items() if k != "XENDMOP_MOCK_SOCKET"},
    )


# --- signals while the servers come up or go down ---------------------------------------------------


@pytest.fixture
def handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("when", ["bring-up", "teardown"])
def test_a_signal_during_bring_up_or_teardown_stops_cleanly(handlers: None, when: str) -> None:
    """A second SIGINT while the server is torn down (tapnet's 4 in 32 ``timeout -s INT`` runs),
    or one while it comes up, is only noted: no KeyboardInterrupt, the server destroyed."""
    with dm_program.open_mock() as mock:
        server = mock.ioreq_server()
        server.add_port_range(0x510, 0x511, _Nothing(), "nothing")
        loop = ServeLoop(server)
        start, close = server.start, server.close

        def interrupted_start() -> object:
            result = start()
            os.kill(os.getpid(), signal.SIGINT)  # delivered here, in the main thread, before start returns
            return result

        def interrupted_close() -> None:
            os.kill(os.getpid(), signal.SIGINT)
            close()

        if when == "bring-up":
            server.start = interrupted_start  # type: ignore[method-assign]
        else:
            server.close = interrupted_close  # type: ignore[method-assign]
            go = os.eventfd(1, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            loop.add_reader(go, lambda: os.kill(os.getpid(), signal.SIGINT))
        try:
            assert dm_program.serve_until_signal(loop) == signal.SIGINT
        finally:
            if when == "teardown":
                os.close(go)
        mock.check_no_server_left()
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # stopping: a later signal cannot break what follows


class _Nothing:
    def read(self, addr: int, size: int) -> int:
        return 0

    def write(self, addr: int, size: int, value: int) -> None:
        pass


# --- framebuffer: a directory as --output ----------------------------------------------------------------


@pytest.mark.parametrize("form", ["{d}/", "{d}"])
def test_framebuffer_refuses_a_directory_as_its_png_at_start(tmp_path: Path, form: str) -> None:
    done = run("framebuffer", "--output", form.format(d=tmp_path))
    assert done.returncode == 2, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "--output" in last and "directory" in last
    assert "snapshot:" not in done.stdout and "Is a directory" not in done.stdout
    assert list(tmp_path.iterdir()) == []  # no .run.tmp or other leftover


# --- --domid off Xen ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["uart16550", "pci_edu"])
def test_domid_on_a_machine_without_xen_says_so(name: str) -> None:
    if xen_host_signs():
        pytest.skip("a Xen host")
    done = run(name, "--domid", "1")
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert "not a Xen host" in last and "--assume-hvm" not in last, done.stderr


# --- the same logging in every example ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["debugcon", "uart16550", "pci_edu", "framebuffer"])
def test_no_example_prints_info_lines_unless_verbose(name: str, tmp_path: Path) -> None:
    extra = ["--output", str(tmp_path / "fb.png")] if name == "framebuffer" else []
    quiet = run(name, *extra)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "", quiet.stderr  # neither INFO lines nor the guest's deliberate mistakes as errors
    assert f"{name}: {name}:" not in quiet.stdout + quiet.stderr
    verbose = run(name, "--verbose", *extra)
    assert verbose.returncode == 0 and "ioreq server 0 destroyed" in verbose.stderr, verbose.stderr
    assert f"{name}: {name}:" not in verbose.stderr


def test_framebuffer_guest_error_reads_as_the_guests_on_purpose(tmp_path: Path) -> None:
    done = run("framebuffer", "--verbose", "--output", str(tmp_path / "fb.png"))
    assert "framebuffer: framebuffer:" not in done.stderr
    assert "the guest's mode is refused" in done.stderr
    assert "a bad mode tried first on purpose, xres=5000: refused" in done.stdout


# --- --trace: every ioreq ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["debugcon", "uart16550", "pci_edu", "framebuffer"])
def test_trace_shows_every_ioreq_with_its_answer(name: str, tmp_path: Path) -> None:
    extra = ["--output", str(tmp_path / "fb.png")] if name == "framebuffer" else []
    done = run(name, "--trace", *extra)
    assert done.returncode == 0, done.stderr
    traced = [line for line in done.stderr.splitlines() if line.startswith("xendmop.ioreq: vCPU 0: ")]
    assert traced, done.stderr
    assert all(" addr=" in line and " size=" in line and " -> data=" in line for line in traced)


def test_trace_is_the_runtimes_logging_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    from xendmop.mock.simguest import SimGuest

    caplog.set_level(logging.DEBUG, logger="xendmop.ioreq")
    with dm_program.open_mock() as mock:
        server = mock.ioreq_server()
        server.add_port_range(0x510, 0x511, _Nothing(), "nothing")
        with server:
            guest = SimGuest(mock.mock_xen, mock.domid, timeout=5)
            import threading

            t = threading.Thread(target=lambda: guest.outb(0x510, 0x5A))
            t.start()
            while t.is_alive():
                server.handle_events()
                t.join(0.01)
    lines = [r.getMessage() for r in caplog.records if r.name == "xendmop.ioreq"]
    assert lines == ["vCPU 0: pio write addr=0x510 data=0x5a size=1 count=1 state=1 -> data=0x5a"]


# --- tapnet without CAP_NET_ADMIN ---------------------------------------------------------------------------------


def test_tapnet_without_cap_net_admin_says_so_in_one_line() -> None:
    """As root without CAP_NET_ADMIN (dropped from the bounding set), creating the tap is refused
    by netlink (pyroute2's NetlinkError, not an OSError): one line and exit 1, no traceback."""
    import shutil

    if os.geteuid() != 0 or shutil.which("setpriv") is None or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root, setpriv and /dev/net/tun to run tapnet without CAP_NET_ADMIN")
    done = subprocess.run(
        ["setpriv", "--bounding-set=-net_admin", sys.executable, str(EXAMPLE_DIR / "tapnet.py"), "--tap", "xdmc0"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={k: v for k, v in example_env().items() if k != "XENDMOP_MOCK_SOCKET"},
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "tapnet: cannot open tap 'xdmc0': [Errno 1] netlink: Operation not permitted (needs root and /dev/net/tun)"
    ]


def test_the_asyncio_form_also_notices_the_domain_gone() -> None:
    """``serve_forever_async`` watches as ``ServeLoop`` does: DomainGone, the server torn down quietly."""
    import asyncio

    from xendmop.runtime.server import DomainGone, serve_forever_async

    with dm_program.open_mock() as mock:
        server = mock.ioreq_server()
        server.add_port_range(0x510, 0x511, _Nothing(), "nothing")

        async def main() -> None:
            async def destroy() -> None:
                for _ in range(500):  # up to 5 s for the server to come up
                    if server.id is not None:
                        mock.mock_xen.destroy_domain(mock.domid)
                        return
                    await asyncio.sleep(0.01)

            killer = asyncio.get_running_loop().create_task(destroy())
            try:
                await asyncio.wait_for(serve_forever_async(server, handle_signals=False, watch=0.1), 10)
            finally:
                await killer

        with pytest.raises(DomainGone):
            asyncio.run(main())
        assert server.id is None and server.gone == "domain"


def test_a_watch_xen_refuses_for_another_reason_is_dropped_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    """A Xen that refuses the watch's question for a reason that says nothing about the domain
    (EINVAL: e.g. a flag it does not know) keeps the device model serving: one warning, no more asking."""
    import errno

    from xendmop.errors import XenError

    with dm_program.open_mock() as mock:
        server = mock.ioreq_server()
        server.add_port_range(0x510, 0x511, _Nothing(), "nothing")
        with server:
            asked: list[bool] = []

            def refuse(domid: int, sid: int, *, gfns: bool = False) -> None:
                asked.append(gfns)
                raise XenError(errno.EINVAL, "get_ioreq_server_info", domid, {})

            server.dm.get_ioreq_server_info = refuse  # type: ignore[method-assign]
            server.check_alive()
            server.check_alive()
            assert asked == [server.legacy_gfns]  # asked once, in the form its pages were mapped
            assert "its end will not be noticed" in caplog.text
