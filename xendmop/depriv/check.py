"""``xendmop depriv-check PID``: audit a running device-model process from outside.

The successor of Xen's removed ``tools/tests/depriv/depriv-fd-checker``, standalone:
it reads ``/proc/PID`` (with psutil) and, for every privcmd and evtchn fd, takes a
copy of the fd with ``pidfd_getfd`` (Linux ≥ 5.6, needs ptrace rights: run as root)
and proves the restriction by trying calls that a restricted fd must refuse
(``xendmop.depriv.probe`` documents each call and why it has no side effect).

Checked: real/effective/saved/fs uids and gids (non-root, all equal, as expected),
supplementary groups (none), capabilities (none), no_new_privs, root directory
(chrooted, not writable by the process, empty), working directory (inside the root),
rlimits (``/proc/PID/limits``: finite hard limits no higher than the policy), and every open fd by class.

Exit status: 0 every check passed, 1 at least one finding (``--strict``: warnings
too), 2 the process could not be inspected (or a check could not be carried out).
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil  # type: ignore[import-untyped,unused-ignore]

from .probe import FdInfo, FdKind, Ioctl, ProbeResult, Verdict, _ioctl, list_fds, pidfd_getfd, pidfd_open, probe

__all__ = ["DEFAULT_MAX_RLIMITS", "Check", "Expect", "InspectError", "Report", "Status", "inspect", "main"]

#: the policy for hard limits (``--rlimit NAME=MAX`` changes it): at most these values
DEFAULT_MAX_RLIMITS: Mapping[str, int] = {"FSIZE": 256 * 1024, "NPROC": 256, "CORE": 0, "NOFILE": 4096}
#: rlimit name -> its row in /proc/PID/limits
_RLIMITS = {
    "FSIZE": "Max file size",
    "NPROC": "Max processes",
    "CORE": "Max core file size",
    "NOFILE": "Max open files",
    "MSGQUEUE": "Max msgqueue size",
}
UNLIMITED = -1
XEN_DEVICE_DIR = "/dev/xen"


class Status(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    WARN = "warn"
    INFO = "info"
    SKIP = "skip"
    ERROR = "error"


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    value: Any = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status.value, "detail": self.detail, "value": self.value}


@dataclass
class FdCheck:
    info: FdInfo
    status: Status
    detail: str
    probe: ProbeResult | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "fd": self.info.fd,
            "kind": self.info.kind.value,
            "target": self.info.target,
            "access": self.info.access,
            "status": self.status.value,
            "detail": self.detail,
        }
        if self.info.extra:
            d["fdinfo"] = self.info.extra
        if self.probe is not None:
            d["probe"] = {"verdict": self.probe.verdict.value, "calls": [list(c) for c in self.probe.calls]}
        return d


@dataclass(frozen=True)
class Expect:
    """What the process should look like; ``None``: only the generic rules apply."""

    uid: int | None = None
    gid: int | None = None
    #: the domain the privcmd fds must be restricted to
    domid: int | None = None
    max_rlimits: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_MAX_RLIMITS))


@dataclass
class Report:
    pid: int
    name: str
    checks: list[Check] = field(default_factory=list)
    fds: list[FdCheck] = field(default_factory=list)

    def statuses(self) -> list[Status]:
        return [c.status for c in self.checks] + [f.status for f in self.fds]

    def findings(self, strict: bool = False) -> list[str]:
        bad = {Status.FAIL, Status.WARN} if strict else {Status.FAIL}
        return [f"{c.name}: {c.detail}" for c in self.checks if c.status in bad] + [
            f"fd {f.info.fd} ({f.info.kind.value}): {f.detail}" for f in self.fds if f.status in bad
        ]

    def exit_code(self, strict: bool = False) -> int:
        if self.findings(strict):
            return 1
        return 2 if Status.ERROR in self.statuses() else 0

    def to_json(self, strict: bool = False) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "name": self.name,
            "checks": [c.to_json() for c in self.checks],
            "fds": [f.to_json() for f in self.fds],
            "findings": self.findings(strict),
            "exit": self.exit_code(strict),
        }


class InspectError(OSError):
    """The process could not be inspected at all (gone, or no permission)."""


# --- /proc/PID/status -------------------------------------------------------------------------


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f.read().splitlines())}


def _ids_check(name: str, ids: list[int], expected: int | None) -> Check:
    shown = "real={} effective={} saved={} fs={}".format(*ids)
    if 0 in ids:
        return Check(name, Status.FAIL, f"{shown}: still root", ids)
    if len(set(ids)) != 1:
        return Check(name, Status.FAIL, f"{shown}: not all equal (a saved or real id allows a way back)", ids)
    if expected is not None and ids[0] != expected:
        return Check(name, Status.FAIL, f"{shown}: expected {expected}", ids)
    return Check(name, Status.PASS, shown, ids)


def _identity(pid: int, status: Mapping[str, str], expect: Expect) -> list[Check]:
    uids = [int(x) for x in status["Uid"].split()]
    gids = [int(x) for x in status["Gid"].split()]
    groups = [int(x) for x in status.get("Groups", "").split()]
    checks = [_ids_check("uids", uids, expect.uid), _ids_check("gids", gids, expect.gid)]
    if groups:
        checks.append(Check("groups", Status.FAIL, f"supplementary groups kept: {groups}", groups))
    else:
        checks.append(Check("groups", Status.PASS, "no supplementary groups", groups))
    caps = {k: int(status.get(k, "0"), 16) for k in ("CapPrm", "CapEff", "CapAmb", "CapBnd")}
    held = {k: v for k, v in caps.items() if k != "CapBnd" and v}
    shown = " ".join(f"{k}={v:#x}" for k, v in caps.items())
    checks.append(
        Check("capabilities", Status.FAIL if held else Status.PASS, shown if held else f"none held ({shown})", caps)
    )
    nnp = status.get("NoNewPrivs")
    if nnp is None:
        checks.append(Check("no_new_privs", Status.ERROR, "no NoNewPrivs line in /proc/PID/status (Linux < 4.10)"))
    else:
        ok = nnp == "1"
        checks.append(Check("no_new_privs", Status.PASS if ok else Status.FAIL, f"NoNewPrivs: {nnp}", ok))
    seccomp = status.get("Seccomp", "?")
    checks.append(Check("seccomp", Status.INFO, {"0": "off", "1": "strict", "2": "filter"}.get(seccomp, seccomp)))
    return checks


def _root_and_cwd(pid: int, uid: int, gid: int) -> tuple[list[Check], str]:
    root = os.readlink(f"/proc/{pid}/root")
    cwd = os.readlink(f"/proc/{pid}/cwd")
    checks = []
    if root == "/":
        checks.append(Check("root", Status.FAIL, "not chrooted: the root directory is /", root))
    else:
        st = os.stat(f"/proc/{pid}/root")
        writable = st.st_uid == uid or st.st_mode & 0o002 or (st.st_mode & 0o020 and st.st_gid == gid)
        if writable:
            checks.append(
                Check("root", Status.FAIL, f"{root}: writable by the process (mode {st.st_mode & 0o7777:o})", root)
            )
        else:
            checks.append(Check("root", Status.PASS, f"{root} (owner {st.st_uid}, mode {st.st_mode & 0o7777:o})", root))
        entries = sorted(os.listdir(f"/proc/{pid}/root"))
        if entries:
            checks.append(
                Check("root-empty", Status.WARN, f"the root holds {len(entries)} entries: {entries[:8]}", entries)
            )
        else:
            checks.append(Check("root-empty", Status.PASS, "the root directory is empty", entries))
    inside = root == "/" or os.path.commonpath([root, cwd]) == root
    checks.append(
        Check(
            "cwd",
            Status.PASS if inside else Status.FAIL,
            cwd if inside else f"{cwd} is outside the root {root} (chdir('/') after chroot missing)",
            cwd,
        )
    )
    return checks, root


def read_limits(pid: int) -> dict[str, tuple[int, int]]:
    """``/proc/PID/limits`` as ``{row title: (soft, hard)}``, ``UNLIMITED`` for "unlimited".

    Read rather than ``prlimit(pid)``, which needs ``CAP_SYS_RESOURCE`` for another uid."""
    out = {}
    with open(f"/proc/{pid}/limits") as f:
        for line in f.read().splitlines()[1:]:
            m = re.match(r"(Max [a-z ]+?)\s{2,}(\S+)\s+(\S+)", line)
            if m:
                soft, hard = (UNLIMITED if v == "unlimited" else int(v) for v in m.group(2, 3))
                out[m.group(1)] = (soft, hard)
    return out


def _rlimits(pid: int, expect: Expect) -> list[Check]:
    checks = []
    limits = read_limits(pid)
    for name, row in _RLIMITS.items():
        if row not in limits:
            checks.append(Check(f"rlimit:{name}", Status.ERROR, f"no {row!r} row in /proc/PID/limits"))
            continue
        soft, hard = limits[row]
        shown = "soft={} hard={}".format(*("unlimited" if v == UNLIMITED else v for v in (soft, hard)))
        limit = expect.max_rlimits.get(name)
        if limit is None:
            checks.append(Check(f"rlimit:{name}", Status.INFO, shown, [soft, hard]))
        elif hard == UNLIMITED or hard > limit:
            checks.append(Check(f"rlimit:{name}", Status.FAIL, f"{shown}: hard limit above {limit}", [soft, hard]))
        else:
            checks.append(Check(f"rlimit:{name}", Status.PASS, shown, [soft, hard]))
    return checks


def _namespaces(pid: int) -> Check:
    own = []
    for ns in ("mnt", "ipc", "net", "pid", "user"):
        try:
            if os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"):
                own.append(ns)
        except OSError:
            pass
    return Check(
        "namespaces", Status.INFO, f"own: {', '.join(own)}" if own else "shares every namespace with the checker", own
    )


# --- fds --------------------------------------------------------------------------------------


def _sockets(proc: psutil.Process) -> dict[int, str]:
    get = getattr(proc, "net_connections", None) or proc.connections
    try:
        conns = get(kind="all")
    except (psutil.Error, OSError):
        return {}
    out = {}
    for c in conns:
        family = {1: "unix", 2: "inet", 10: "inet6", 16: "netlink"}.get(int(c.family), str(c.family))
        kind = {1: "stream", 2: "dgram", 5: "seqpacket"}.get(int(c.type), str(c.type))
        addr = c.laddr if isinstance(c.laddr, str) else (":".join(map(str, c.laddr)) if c.laddr else "")
        out[c.fd] = f"{family} {kind}" + (f" {addr}" if addr else "") + (f" ({c.status})" if c.status != "NONE" else "")
    return out


def _probe_fd(pid: int, info: FdInfo, domid: int | None, ioctl: Ioctl) -> FdCheck:
    try:
        pidfd = pidfd_open(pid)
        try:
            copy = pidfd_getfd(pidfd, info.fd)
        finally:
            os.close(pidfd)
    except OSError as e:
        return FdCheck(info, Status.ERROR, f"cannot take a copy of the fd to probe it: {e.strerror or e}")
    try:
        result = probe(info.kind, copy, domid, ioctl)
    finally:
        os.close(copy)
    assert result is not None
    if result.verdict is Verdict.RESTRICTED:
        status = Status.PASS
    elif result.verdict is Verdict.UNKNOWN:
        status = Status.ERROR
    else:
        status = Status.FAIL
    return FdCheck(info, status, result.describe(), result)


def _fd_check(
    pid: int, info: FdInfo, root: str, domid: int | None, ioctl: Ioctl, sockets: Mapping[int, str]
) -> FdCheck:
    kind = info.kind
    if kind in (FdKind.PRIVCMD, FdKind.EVTCHN):
        return _probe_fd(pid, info, domid, ioctl)
    if kind is FdKind.XENBUS:
        return FdCheck(info, Status.FAIL, "Xenstore fd open: a deprivileged device model must close it")
    if kind is FdKind.HYPERCALL:
        return FdCheck(info, Status.WARN, "hypercall-buffer fd not neutered (xentoolcore dup2s /dev/null over it)")
    if kind in (FdKind.GNTDEV, FdKind.GNTALLOC):
        return FdCheck(info, Status.WARN, "grant device: the kernel has no way to restrict it to one domain")
    if kind is FdKind.DIRECTORY:
        inside = root != "/" and os.path.commonpath([root, info.target]) == root
        if inside:
            return FdCheck(info, Status.INFO, "directory inside the root")
        return FdCheck(info, Status.FAIL, "directory fd outside the root: fchdir/openat escape the chroot")
    if kind is FdKind.TAP:
        return FdCheck(info, Status.INFO, f"tap interface {info.extra.get('iff', '?')}")
    if kind is FdKind.SOCKET:
        return FdCheck(info, Status.INFO, sockets.get(info.fd, "socket"))
    if kind is FdKind.REGULAR:
        return FdCheck(info, Status.INFO, f"file opened {info.access}")
    return FdCheck(info, Status.INFO, kind.value)


# --- the inspection ---------------------------------------------------------------------------


def inspect(
    pid: int,
    expect: Expect = Expect(),
    *,
    devices: Mapping[int, FdKind] | None = None,
    ioctl: Ioctl = _ioctl,
    xen_host: bool | None = None,
) -> Report:
    """Inspect process ``pid``.  ``devices`` (``st_rdev -> kind``) and ``ioctl`` replace
    the host's device table and ``fcntl.ioctl`` (tests); ``xen_host`` overrides the
    ``/dev/xen`` test.  Raises ``InspectError`` when the process cannot be read."""
    try:
        proc = psutil.Process(pid)
        report = Report(pid, proc.name())
        status = _status(pid)
        report.checks += _identity(pid, status, expect)
        uid, gid = int(status["Uid"].split()[1]), int(status["Gid"].split()[1])
        root_checks, root = _root_and_cwd(pid, uid, gid)
        report.checks += root_checks
        report.checks += _rlimits(pid, expect)
        report.checks.append(_namespaces(pid))
        fds = list_fds(pid, devices)
        sockets = _sockets(proc)
    except psutil.NoSuchProcess:
        raise InspectError(3, f"no process {pid}") from None
    except (psutil.AccessDenied, PermissionError) as e:
        raise InspectError(13, f"process {pid}: permission denied ({e}); run as root") from None
    except FileNotFoundError as e:
        raise InspectError(3, f"process {pid} vanished ({e})") from None
    on_xen = os.path.isdir(XEN_DEVICE_DIR) if xen_host is None else xen_host
    for info in fds:
        report.fds.append(_fd_check(pid, info, root, expect.domid, ioctl, sockets))
    restrictable = [f for f in report.fds if f.info.kind in (FdKind.PRIVCMD, FdKind.EVTCHN)]
    if not on_xen and not restrictable:
        report.checks.append(
            Check("xen-fds", Status.SKIP, f"not a Xen host (no {XEN_DEVICE_DIR}): privcmd/evtchn probes do not apply")
        )
    elif not restrictable:
        report.checks.append(Check("xen-fds", Status.INFO, "no privcmd or evtchn fd open"))
    else:
        n = sum(f.status is Status.PASS for f in restrictable)
        report.checks.append(
            Check(
                "xen-fds",
                Status.PASS if n == len(restrictable) else Status.FAIL,
                f"{n}/{len(restrictable)} proven restricted",
            )
        )
    return report


# --- output and command line ------------------------------------------------------------------


def format_table(report: Report, strict: bool = False) -> str:
    lines = [f"depriv-check: pid {report.pid} ({report.name})", ""]
    width = max(len(c.name) for c in report.checks) if report.checks else 8
    lines.append(f"{'CHECK':<{width}}  STATUS  DETAIL")
    lines += [f"{c.name:<{width}}  {c.status.value:<6}  {c.detail}" for c in report.checks]
    lines += ["", f"{'FD':>4}  {'KIND':<10}  STATUS  TARGET / DETAIL"]
    for f in report.fds:
        detail = f.info.target if f.detail in (f.info.kind.value, "") else f"{f.info.target}  {f.detail}"
        lines.append(f"{f.info.fd:>4}  {f.info.kind.value:<10}  {f.status.value:<6}  {detail}")
    findings = report.findings(strict)
    code = report.exit_code(strict)
    lines.append("")
    if findings:
        lines.append(f"{len(findings)} finding(s):")
        lines += [f"  - {x}" for x in findings]
    elif code == 2:
        lines.append("some checks could not be carried out (status error)")
    else:
        lines.append("all checks passed")
    return "\n".join(lines)


def _rlimit_arg(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    name = name.upper().removeprefix("RLIMIT_")
    if not sep or name not in _RLIMITS:
        raise argparse.ArgumentTypeError(f"expected NAME=MAX with NAME one of {', '.join(_RLIMITS)}")
    return name, int(value, 0)


def _pid(text: str) -> int:
    """A process id (a positive integer): psutil would raise ValueError on the rest, a traceback."""
    if not (text.isascii() and text.isdigit()) or int(text) <= 0 or len(text) > 10:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a process id, a positive integer")
    return int(text)


_pid.__name__ = "pid"


def parser(prog: str = "xendmop depriv-check") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Audit a running, deprivileged device-model process.")
    p.add_argument("pid", type=_pid, help="process to inspect")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--domid", type=int, help="the domain its privcmd fds must be restricted to")
    p.add_argument("--uid", type=int, help="expected uid")
    p.add_argument("--gid", type=int, help="expected gid")
    p.add_argument(
        "--rlimit",
        type=_rlimit_arg,
        action="append",
        default=[],
        metavar="NAME=MAX",
        help="highest acceptable hard limit (defaults: "
        + ", ".join(f"{k}={v}" for k, v in DEFAULT_MAX_RLIMITS.items())
        + ")",
    )
    p.add_argument("--strict", action="store_true", help="count warnings as findings")
    return p


def run(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    """Run the check for parsed ``args``; the lead's CLI can call this with its own parser."""
    limits = dict(DEFAULT_MAX_RLIMITS)
    limits.update(dict(args.rlimit))
    expect = Expect(uid=args.uid, gid=args.gid, domid=args.domid, max_rlimits=limits)
    try:
        report = inspect(args.pid, expect)
    except InspectError as e:
        if args.json:
            out(json.dumps({"pid": args.pid, "error": str(e), "exit": 2}))
        else:
            print(f"depriv-check: {e}", file=sys.stderr)
        return 2
    out(json.dumps(report.to_json(args.strict), indent=2) if args.json else format_table(report, args.strict))
    return report.exit_code(args.strict)


def main(argv: Sequence[str] | None = None) -> int:
    """``xendmop depriv-check PID [--json] [--domid D] [--uid U] [--gid G] [--rlimit N=MAX] [--strict]``."""
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
