"""xendmop.runtime.dm_program: the command line, targets, the HVM guard and serving, as the examples use them."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from xendmop.backends.libxen import DomainKind, LibxenCtrl
from xendmop.mock import MockXen
from xendmop.runtime import ServeLoop, dm_program
from xendmop.runtime.dm_program import NotHvmError, Target, UsageError, Where


class Answer:
    """A device that answers every read with one value."""

    def __init__(self, value: int) -> None:
        self.value = value

    def read(self, addr: int, size: int) -> int:
        return self.value

    def write(self, addr: int, size: int, value: int) -> None:
        self.value = value


def parser(**kw: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dm")
    dm_program.add_arguments(p, **kw)
    return p


# --- the command line ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--domid", "0"], "--domid: '0': expected a guest domid, 1..32751"),
        (["--domid", "32752"], "--domid: '32752': expected a guest domid"),
        (["--domid", "-3"], "--domid: '-3': expected a guest domid"),
        (["--domid", "5x"], "--domid: '5x': expected a guest domid"),
        (["--domid", "²"], "--domid: '²': expected a guest domid"),  # isdigit() says yes, int() no
        (["--depriv", "0:0"], "--depriv: '0:0': root (id 0) is no privilege drop"),
        (["--depriv", "990:0"], "--depriv: '990:0': root (id 0) is no privilege drop"),
        (["--depriv", "990"], "--depriv: '990': expected UID:GID, two numeric ids"),
        (["--depriv", "990:"], "--depriv: '990:': expected UID:GID"),
        (["--depriv", "²:1"], "--depriv: '²:1': expected UID:GID"),
        (["--depriv", "4294967295:1"], "--depriv: '4294967295:1': an id above 4294967294"),  # (uid_t)-1: "unchanged"
        (["--depriv", "1:" + "9" * 5000], "an id above 4294967294"),  # more digits than int() converts
        (["--domid", "9" * 5000], "expected a guest domid, 1..32751"),
    ],
)
def test_bad_values_are_usage_errors_naming_the_flag_once_and_the_value(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(argv)
    error = capsys.readouterr().err.splitlines()[-1]  # the lines before are the usage, which lists every flag
    assert exit_.value.code == 2 and named in error
    assert error.count(argv[0]) == 1, error


def test_good_ids_parse() -> None:
    args = parser().parse_args(["--domid", "32751", "--depriv", "4294967294:65534"])
    assert args.domid == 32751 and args.depriv == (4294967294, 65534)


def test_optional_flags_only_when_asked_for(capsys: pytest.CaptureFixture[str]) -> None:
    args = parser(hold=True, assume_hvm=True).parse_args(["--hold", "--assume-hvm", "--domid", "7"])
    assert args.hold and args.assume_hvm and args.domid == 7 and args.depriv is None
    with pytest.raises(SystemExit):
        parser().parse_args(["--hold"])
    assert "unrecognized arguments: --hold" in capsys.readouterr().err


def target(argv: list[str], env: dict[str, str] | None = None) -> Target:
    return Target.from_args(parser(assume_hvm=True).parse_args(argv), env or {})


def test_target_selection() -> None:
    assert target([]) == Target(Where.MOCK)
    assert target(["--domid", "5"]) == Target(Where.XEN, 5)
    assert target(["--domid", "5"], {"XENDMOP_MOCK_SOCKET": ""}).where is Where.XEN  # set but empty: not a host
    remote = target(["--domid", "1", "--depriv", "990:991"], {"XENDMOP_MOCK_SOCKET": "/run/x.sock"})
    assert remote == Target(Where.MOCK_HOST, 1, "/run/x.sock", (990, 991))
    assert target([], {"XENDMOP_MOCK_SOCKET": "/run/x.sock"}) == Target(Where.MOCK)  # no --domid: in process
    assert target(["--domid", "3", "--assume-hvm"]).assume_hvm


def test_target_reads_the_environment_when_not_given_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XENDMOP_MOCK_SOCKET", "/run/env.sock")
    assert Target.from_args(parser().parse_args(["--domid", "2"])).socket == "/run/env.sock"
    monkeypatch.delenv("XENDMOP_MOCK_SOCKET")
    assert Target.from_args(parser().parse_args(["--domid", "2"])).where is Where.XEN


@pytest.mark.parametrize(
    ("argv", "flag", "message"),
    [
        (["--domid", "5", "--chroot", "/var/empty"], "--chroot", "--chroot needs --depriv UID:GID"),
        (["--depriv", "990:990"], "--depriv", "needs a real dom0 (--domid N) or a mock host in another process"),
    ],
)
def test_combinations_that_cannot_work_are_refused(argv: list[str], flag: str, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)) as refused:
        target(argv)
    assert refused.value.flag == flag
    if flag == "--depriv":
        assert "XENDMOP_MOCK_SOCKET" in str(refused.value) and refused.value.value == (990, 990)


@pytest.mark.parametrize(
    ("namespace", "flag"),
    [
        (argparse.Namespace(domid=0), "--domid"),
        (argparse.Namespace(domid=True), "--domid"),
        (argparse.Namespace(domid=0x7FF0), "--domid"),
        (argparse.Namespace(domid=1, depriv=(0, 5)), "--depriv"),
    ],
)
def test_values_built_without_the_parser_are_checked_too(namespace: argparse.Namespace, flag: str) -> None:
    with pytest.raises(UsageError) as refused:
        Target.from_args(namespace, {})
    assert refused.value.flag == flag and repr(refused.value.value) in str(refused.value)


def test_parse_exits_on_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    args, where = dm_program.parse(parser(), ["--domid", "8"], {"XENDMOP_MOCK_SOCKET": "/run/m.sock"})
    assert args.domid == 8 and where == Target(Where.MOCK_HOST, 8, "/run/m.sock")
    with pytest.raises(SystemExit) as exit_:
        dm_program.parse(parser(), ["--chroot", "/var/empty"], {})
    assert exit_.value.code == 2 and "dm: error: --chroot needs --depriv UID:GID" in capsys.readouterr().err


def test_drop_config_follows_depriv_and_chroot() -> None:
    assert target(["--domid", "4"]).drop_config() is None
    drop = target(["--domid", "4", "--depriv", "990:991", "--chroot", "/var/empty"]).drop_config()
    assert drop is not None and (drop.uid, drop.gid, drop.chroot) == (990, 991, "/var/empty")


def test_connect_is_not_for_the_in_process_mock() -> None:
    with pytest.raises(UsageError, match="open_mock"), Target(Where.MOCK).connect():
        pass
    with pytest.raises(UsageError, match="--domid"), Target(Where.XEN).connect():
        pass
    with pytest.raises(UsageError, match="needs its socket") as refused, Target(Where.MOCK_HOST, 1).connect():
        pass
    assert refused.value.flag == "XENDMOP_MOCK_SOCKET"


# --- guest_kind and the HVM guard ------------------------------------------------------------------


def stand_in_xenstore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str | None) -> Path:
    """Put a ``xenstore-read`` running ``script`` (None: no tool at all) alone on PATH; return its argv log.

    The tool is written by a child process, never opened for writing by this one: exec
    fails with ETXTBSY while any process holds the file open for writing, and a child that
    another thread (or a library) of this process forked while the file was open here would
    hold a copy of that fd until it execs (tests/examples/test_example_cli.py shows it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    if script is not None:
        subprocess.run(
            ["/bin/sh", "-c", 'cat > "$1" && chmod 755 "$1"', "sh", str(bin_dir / "xenstore-read")],
            input=f'#!/bin/sh\necho "$@" >> {calls}\n{script}\n',
            text=True,
            check=True,
            timeout=30,
        )
    monkeypatch.setenv("PATH", str(bin_dir))
    return calls


class StubCtrl:
    """A ``LibxenCtrl`` that knows one domain's kind."""

    closed = 0

    def __init__(self, kind: DomainKind) -> None:
        self.kind = kind

    def domain_info(self, domid: int) -> Any:
        return argparse.Namespace(domid=domid, kind=self.kind)

    def close(self) -> None:
        StubCtrl.closed += 1


def absent_libxenctrl(tmp_path: Path) -> Any:
    """The real ``LibxenCtrl`` looking in an empty directory: ``FileNotFoundError``."""
    empty = tmp_path / "no-libs"
    empty.mkdir(exist_ok=True)
    return lambda: LibxenCtrl(empty)


@pytest.mark.parametrize("kind", list(DomainKind))
def test_libxenctrl_is_asked_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: DomainKind) -> None:
    calls = stand_in_xenstore(tmp_path, monkeypatch, "echo hvm")
    closed = StubCtrl.closed
    assert dm_program.guest_kind(5, libxenctrl=lambda: StubCtrl(kind)) == kind.value.lower()
    assert not calls.exists(), "Xenstore asked although libxenctrl answered"
    assert StubCtrl.closed == closed + 1  # the handle is not kept open


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("echo pvh", "pvh"),
        ("echo hvm", "hvm"),
        ("echo pv", "pv"),
        ("exit 1", None),
        ("echo", None),
        ("echo bogus", None),
    ],
)
def test_without_libxenctrl_xenstore_read_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str, expected: str | None
) -> None:
    calls = stand_in_xenstore(tmp_path, monkeypatch, script)
    assert dm_program.guest_kind(12, libxenctrl=absent_libxenctrl(tmp_path)) == expected
    assert calls.read_text() == "/libxl/12/type\n"  # one child process, asked for libxl's record


def test_no_tool_and_no_library_is_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in_xenstore(tmp_path, monkeypatch, None)
    assert dm_program.guest_kind(3, libxenctrl=absent_libxenctrl(tmp_path)) is None


def test_the_installed_libxenctrl_off_xen_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.path.exists("/dev/xen/privcmd"):
        pytest.skip("a Xen dom0: libxenctrl answers for itself")
    calls = stand_in_xenstore(tmp_path, monkeypatch, "echo pvh")
    assert dm_program.guest_kind(4) == "pvh"  # no libxenctrl, or one that cannot reach Xen here
    assert calls.read_text() == "/libxl/4/type\n"


def test_a_hung_xenstore_read_is_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in_xenstore(tmp_path, monkeypatch, "exec sleep 30")
    monkeypatch.setattr(dm_program, "XENSTORE_TIMEOUT", 0.2)
    assert dm_program.guest_kind(6, libxenctrl=absent_libxenctrl(tmp_path)) is None


@pytest.mark.parametrize("domid", [-1, 0x7FF0, True, "5"])
def test_guest_kind_refuses_a_bad_domid(domid: Any) -> None:
    with pytest.raises(UsageError, match=repr(domid)):
        dm_program.guest_kind(domid)


@pytest.mark.parametrize("kind", ["hvm", "pvh", "pv", None])
@pytest.mark.parametrize("assume_hvm", [False, True])
def test_require_hvm_matrix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str | None, assume_hvm: bool
) -> None:
    stand_in_xenstore(tmp_path, monkeypatch, f"echo {kind}" if kind else "exit 1")
    allowed = kind == "hvm" or (kind is None and assume_hvm)
    if allowed:
        assert dm_program.require_hvm(9, assume_hvm=assume_hvm, libxenctrl=absent_libxenctrl(tmp_path)) == kind
        return
    with pytest.raises(NotHvmError) as refused:
        dm_program.require_hvm(9, assume_hvm=assume_hvm, libxenctrl=absent_libxenctrl(tmp_path))
    message = str(refused.value)
    assert f"dom9 is {kind or 'of unknown type'}, not HVM" in message and "crash Xen (4.17.7)" in message
    assert ("--assume-hvm" in message) == (kind is None) and refused.value.kind == kind


def test_connection_require_hvm_on_the_in_process_mock() -> None:
    with MockXen() as xen:
        pv = xen.create_domain(vcpus=1, hvm=False, memory_mb=4)
        with dm_program.open_mock(xen, pv) as conn, pytest.raises(NotHvmError, match=f"dom{pv} is pv, not HVM"):
            conn.require_hvm()
        with dm_program.open_mock(xen) as conn:
            conn.require_hvm()
            assert conn.domid != pv and conn.mock_xen is xen


def test_connection_require_hvm_on_a_mock_host_process(mock_host_process: str) -> None:
    with Target(Where.MOCK_HOST, 2, mock_host_process).connect() as conn:
        with pytest.raises(NotHvmError, match=r"dom2 is not HVM: .*EINVAL"):
            conn.require_hvm()
    with Target(Where.MOCK_HOST, 1, mock_host_process).connect() as conn:
        conn.require_hvm()
        assert conn.servers_left() == []
        with pytest.raises(TypeError, match="mock-host, not on the in-process mock"):
            conn.mock_xen.domain(1)


# --- run_target --------------------------------------------------------------------------------------


def test_run_target_reports_an_unreachable_host_in_one_line(tmp_path: Path) -> None:
    lines: list[str] = []
    gone = Target(Where.MOCK_HOST, 1, str(tmp_path / "no-such.sock"))
    assert dm_program.run_target(gone, lambda conn: 0, name="dm", report=lines.append) == 1
    assert len(lines) == 1 and lines[0].startswith("dm: dom1: ") and "No such file or directory" in lines[0]


def test_run_target_refuses_a_pv_domain_before_the_body_runs(mock_host_process: str) -> None:
    ran: list[int] = []
    pv = Target(Where.MOCK_HOST, 2, mock_host_process)

    def body(conn: dm_program.Connection) -> int:
        ran.append(conn.domid)
        return 7

    with pytest.raises(NotHvmError):
        dm_program.run_target(pv, body, name="dm", hvm_only=True)
    with pytest.raises(SystemExit) as exit_:
        dm_program.run_target(pv, body, name="dm", hvm_only=True, parser=parser())
    assert exit_.value.code == 2 and ran == []
    assert dm_program.run_target(pv, body, name="dm") == 7  # no interrupts: served
    assert ran == [2]


def test_run_target_checks_a_real_domain_before_opening_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stand_in_xenstore(tmp_path, monkeypatch, "echo pvh")
    with pytest.raises(NotHvmError, match="dom5 is pvh"):
        dm_program.run_target(Target(Where.XEN, 5, assume_hvm=True), lambda conn: 0, name="dm", hvm_only=True)


# --- serving ----------------------------------------------------------------------------------------


def test_serve_until_signal_serves_then_tears_down_on_sigterm() -> None:
    from xendmop.mock.simguest import SimGuest

    seen: list[int] = []
    with dm_program.open_mock() as conn:
        assert conn.xen is not None and isinstance(conn.xen, MockXen)
        xen = conn.xen
        server = conn.ioreq_server()
        server.add_port_range(0x510, 0x510, Answer(0x5A), "answer")

        def guest() -> None:
            seen.append(SimGuest(xen, conn.domid, timeout=5).inb(0x510))
            os.kill(os.getpid(), signal.SIGTERM)

        start_guest = lambda: dm_program.start_daemon_thread(guest, "g")  # noqa: E731
        signum = dm_program.serve_until_signal(ServeLoop(server), on_ready=start_guest)
        assert signum == signal.SIGTERM and seen == [0x5A]
        assert conn.servers_left() == []
        conn.check_no_server_left()


def test_serve_until_signal_tears_down_when_on_ready_fails() -> None:
    with dm_program.open_mock() as conn:
        server = conn.ioreq_server()
        server.add_port_range(0x510, 0x510, Answer(1), "answer")

        def fail() -> None:
            assert conn.servers_left() == [0]  # up before on_ready
            raise OSError(5, "cannot announce")

        with pytest.raises(OSError, match="cannot announce"):
            dm_program.serve_until_signal(ServeLoop(server), on_ready=fail)
        assert conn.servers_left() == []


def test_check_no_server_left_names_them() -> None:
    with dm_program.open_mock() as conn:
        server = conn.ioreq_server().start()
        try:
            with pytest.raises(RuntimeError, match=rf"ioreq server\(s\) \[0\] left behind in dom{conn.domid}"):
                conn.check_no_server_left()
        finally:
            server.close()


def test_the_guest_thread_leaves_signals_to_the_caller() -> None:
    masks: list[set[int]] = []
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    thread = dm_program.start_daemon_thread(
        lambda: masks.append(set(signal.pthread_sigmask(signal.SIG_BLOCK, []))), "t"
    )
    thread.join(5)
    assert thread.daemon and masks and {signal.SIGINT, signal.SIGTERM} <= masks[0]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_run_guest_while_serving_returns_what_the_guest_found() -> None:
    from xendmop.mock.simguest import SimGuest

    stopping = threading.Event()
    with dm_program.open_mock() as conn:
        assert isinstance(conn.xen, MockXen)
        xen = conn.xen
        server = conn.ioreq_server()
        server.add_port_range(0x510, 0x510, Answer(0x33), "answer")
        run = dm_program.run_guest_while_serving(
            ServeLoop(server), lambda: SimGuest(xen, conn.domid, timeout=5).inb(0x510), stopping=stopping
        )
        assert run == dm_program.GuestRun(0x33, None) and stopping.is_set()
        conn.check_no_server_left()


def test_run_guest_while_serving_raises_what_the_guest_raised() -> None:
    def guest() -> int:
        raise LookupError("no device where the guest looked")

    with dm_program.open_mock() as conn:
        server = conn.ioreq_server()
        with pytest.raises(LookupError, match="no device"):
            dm_program.run_guest_while_serving(ServeLoop(server), guest)
        conn.check_no_server_left()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_hold_serves_until_a_signal(signum: int) -> None:
    def guest() -> str:
        os.kill(os.getpid(), signum)  # the guest's thread blocks it: the serving main thread takes it
        return "done"

    with dm_program.open_mock() as conn:
        run = dm_program.run_guest_while_serving(ServeLoop(conn.ioreq_server()), guest, hold=True)
        assert run == dm_program.GuestRun("done", signum)
        conn.check_no_server_left()


def test_a_guest_that_never_ends_is_reported() -> None:
    never = threading.Event()
    with dm_program.open_mock() as conn:
        loop = ServeLoop(conn.ioreq_server())
        threading.Timer(0.1, loop.stop).start()
        with pytest.raises(RuntimeError, match=r"did not finish in 0\.2s"):
            dm_program.run_guest_while_serving(loop, lambda: never.wait(30), hold=True, join_timeout=0.2)
        never.set()
        conn.check_no_server_left()


def test_run_guest_script_shows_the_lines_at_the_end() -> None:
    shown: list[str] = []
    with dm_program.open_mock() as conn:
        result = dm_program.run_guest_script(
            conn, ServeLoop(conn.ioreq_server()), lambda: ["a", "b"], lines=lambda r: r, out=shown.append
        )
    assert result == ["a", "b"] and shown == ["a", "b"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_run_guest_script_held_until_a_signal(signum: int) -> None:
    shown: list[str] = []

    def script() -> list[str]:
        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
        return ["found it"]

    with dm_program.open_mock() as conn:
        result = dm_program.run_guest_script(
            conn, ServeLoop(conn.ioreq_server()), script, lines=lambda r: r, hold=True, out=shown.append
        )
    assert result == ["found it"]
    assert shown == [
        "found it",
        "guest script done; serving until Ctrl-C",
        f"signal {signum}: ioreq server destroyed, none left in the domain",
    ]


def test_run_guest_script_names_a_server_left_behind() -> None:
    with dm_program.open_mock() as conn:
        stray = conn.ioreq_server().start()  # not served by the loop, so not torn down by it
        try:
            with pytest.raises(RuntimeError, match=rf"ioreq server\(s\) \[{stray.id}\] left behind"):
                dm_program.run_guest_script(conn, ServeLoop(conn.ioreq_server()), lambda: 0, lines=lambda r: [])
        finally:
            stray.close()


def test_after_a_signal_the_guest_gets_its_grace_and_no_more() -> None:
    import time

    never = threading.Event()

    def guest() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        never.wait(30)  # blocked on something else than the device: a keyboard

    with dm_program.open_mock() as conn:
        started = time.monotonic()
        run = dm_program.run_guest_while_serving(ServeLoop(conn.ioreq_server()), guest, signal_grace=0.3)
        waited = time.monotonic() - started
        never.set()
    assert run == dm_program.GuestRun(None, signal.SIGTERM) and 0.3 <= waited < 5


def test_the_socket_variable_is_the_mock_hosts() -> None:
    from xendmop.mock import remote

    assert dm_program.ENV_SOCKET == remote.ENV_SOCKET  # spelled here so that real Xen never imports the mock


def test_stopped_line_names_the_signal() -> None:
    assert dm_program.stopped_line("dm", signal.SIGINT) == "dm: stopped (SIGINT); the ioreq server was destroyed"
    assert dm_program.stopped_line("dm", None) == "dm: stopped (done); the ioreq server was destroyed"
