"""A device model as a program: its command line, where it runs, the HVM guard, serving until a signal.

What every example under ``examples/`` needs around its device, written once:

- ``add_arguments(parser)``: ``--domid``, ``--depriv UID:GID``, ``--chroot`` (and, on
  request, ``--hold`` and ``--assume-hvm``); ``Target.from_args(args)`` turns them into
  where the device model runs — a real dom0 (privcmd), a mock host in another process
  (``--domid`` with ``$XENDMOP_MOCK_SOCKET`` set) or the in-process mock (no ``--domid``)
  — refusing combinations that cannot work with ``UsageError``.
- ``guest_kind`` / ``require_hvm``: whether a domain may receive interrupt DMOPs.
- ``run_target(target, body, ...)``: connect (``Connection``: the ``DeviceModel``, the
  device opener, the privilege drop), guard, run ``body``; a refusal from Xen, the kernel
  or the mock host becomes one line on stderr and exit status 1, not a traceback.
- ``serve_until_signal(loop, on_ready=...)``: start the servers (dropping privileges),
  announce them (``on_ready``: the examples' "serving ...; Ctrl-C to stop" line), serve in
  this thread until SIGINT/SIGTERM, tear the servers down, also on errors;
  ``stopped_line`` says how it ended.
- ``EXIT_STATUS_HELP``: the exit statuses every example has, for its ``--help`` epilog.
  SIGINT and SIGTERM are how a device model is asked to stop, so a stop that destroyed
  the ioreq server is a success, 0 (not 130/143, which a service manager counts as a
  failure); 1 when Xen, the kernel or the mock host refused, or a server was left in the
  domain; 2 for a usage error, including a domain refused as not HVM.
- ``open_mock()`` and ``run_guest_while_serving(loop, guest)``: the in-process mock, a
  simulated guest in a thread of its own while this thread serves it;
  ``run_guest_script`` also tells what the guest's script found (``--hold`` demos).
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar

from ..abi.xen import DOMID_FIRST_RESERVED
from ..devicemodel import DeviceModel
from ..errors import XenError
from .foreignmemory import ForeignMemory
from .server import DOMAIN_GONE_ERRNOS, HOST_GONE_ERRNOS, DomainGone, HostGone, IoreqServer, ServeLoop

if TYPE_CHECKING:
    from ..depriv import DropConfig
    from ..mock import MockXen
    from ..mock.remote import RemoteXen

__all__ = [
    "DOMAIN_GONE_ERRNOS",
    "ENV_SOCKET",
    "EXIT_STATUS_HELP",
    "Connection",
    "DomainGone",
    "GuestKind",
    "HostGone",
    "means_gone",
    "not_xen_host",
    "GuestRun",
    "NotHvmError",
    "Target",
    "UsageError",
    "Where",
    "add_arguments",
    "check_hvm",
    "guest_kind",
    "open_mock",
    "parse",
    "parse_domid",
    "parse_ids",
    "require_hvm",
    "run_guest_script",
    "run_connection",
    "run_guest_while_serving",
    "run_target",
    "serve_until_signal",
    "setup_logging",
    "start_daemon_thread",
    "stopped_line",
    "unless_gone",
]

log = logging.getLogger("xendmop.dm_program")

#: names a mock host process (``xendmop mock-host --socket PATH``) whose domain ``--domid`` serves;
#: the same name as ``xendmop.mock.remote.ENV_SOCKET`` (not imported: the mock stays unloaded on Xen)
ENV_SOCKET = "XENDMOP_MOCK_SOCKET"
#: libxl's guest types, as ``/libxl/<domid>/type`` spells them
GuestKind = Literal["hvm", "pvh", "pv"]
_KINDS: tuple[GuestKind, ...] = ("hvm", "pvh", "pv")
#: how long ``xenstore-read`` may take before the kind counts as unknown
XENSTORE_TIMEOUT = 10.0
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: after a signal, how long the guest thread gets to finish (it may be blocked on the stopped device)
SIGNAL_JOIN_TIMEOUT = 1.0
_ID_MAX = 0xFFFFFFFE  # (uid_t)-1 means "unchanged" to setresuid
#: what every example's ``--help`` says about how it exits (the same statuses for all of them)
EXIT_STATUS_HELP = (
    "Exit status: 0 when done, also when stopped by SIGINT (Ctrl-C) or SIGTERM with the ioreq server destroyed, "
    "and when the domain is gone (destroyed or powered off: the normal end of a guest, and of its device model); "
    "1 when Xen, the kernel or the mock host refused, an ioreq server was left in the domain, "
    "or the mock host process is gone; "
    "2 for a usage error, such as a domain that is not HVM for a device that sends interrupts."
)

T = TypeVar("T")


class UsageError(ValueError):
    """A command-line value or combination that cannot work; ``flag`` and ``value`` name it."""

    def __init__(self, flag: str, value: object, why: str) -> None:
        super().__init__(why)
        self.flag = flag
        self.value = value


class NotHvmError(RuntimeError):
    """Refused: the domain is not (known to be) an HVM guest, so no interrupt DMOP may reach it."""

    def __init__(self, domid: int, kind: str | None, detail: str = "") -> None:
        self.domid = domid
        self.kind = kind
        what = kind or "of unknown type"
        message = f"dom{domid} is {what}, not HVM: interrupt DMOPs to a PVH guest can crash Xen (4.17.7)"
        if detail:
            message = f"dom{domid} is not HVM: {detail}"
        elif kind is None:
            message += "; pass --assume-hvm if you know it is HVM"
        super().__init__(message)


# --- the command line ---------------------------------------------------------------------------


# argparse puts "argument --flag: " before an ArgumentTypeError's message: the messages
# below name the value and why, not the flag again.


def _decimal(text: str) -> int | None:
    """``text`` as a decimal number of ASCII digits (``str.isdigit`` also takes "²", which
    ``int`` refuses), else None; more than 20 digits (past 2**64, and past what ``int``
    converts at all for thousands) is 2**64."""
    if not (text.isascii() and text.isdigit()):
        return None
    return int(text) if len(text) <= 20 else 1 << 64


def parse_domid(text: str) -> int:
    """A guest's domid (1..0x7fef) for ``--domid``; ``ArgumentTypeError`` names a bad value."""
    domid = _decimal(text)
    if domid is None or not 1 <= domid < DOMID_FIRST_RESERVED:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a guest domid, 1..{DOMID_FIRST_RESERVED - 1}")
    return domid


def parse_ids(text: str) -> tuple[int, int]:
    """``UID:GID`` (non-root numeric ids) for ``--depriv``; ``ArgumentTypeError`` names a bad value and why."""
    uid_text, sep, gid_text = text.partition(":")
    uid, gid = _decimal(uid_text), _decimal(gid_text)
    if not sep or uid is None or gid is None:
        why = "expected UID:GID, two numeric ids"
    elif uid == 0 or gid == 0:
        why = "root (id 0) is no privilege drop; expected UID:GID, two non-root ids"
    elif uid > _ID_MAX or gid > _ID_MAX:
        why = f"an id above {_ID_MAX} is not one setresuid/setresgid can drop to"
    else:
        return uid, gid
    raise argparse.ArgumentTypeError(f"{text!r}: {why}")


def add_arguments(parser: argparse.ArgumentParser, *, hold: bool = False, assume_hvm: bool = False) -> None:
    """Add ``--domid``, ``--depriv UID:GID`` and ``--chroot`` to ``parser``; ``--hold`` (keep
    serving the simulated guest after its script) and ``--assume-hvm`` when asked for."""
    parser.add_argument(
        "--domid",
        type=parse_domid,
        help=f"serve this HVM domain on a real dom0, or of the mock host ${ENV_SOCKET} names (default: the mock)",
    )
    parser.add_argument("--depriv", type=parse_ids, metavar="UID:GID", help="drop to these ids after bring-up")
    parser.add_argument("--chroot", help="with --depriv: an empty root-owned directory to chroot into")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the device model does (INFO)")
    parser.add_argument(
        "--trace", action="store_true", help="also log every ioreq: vCPU, type, address, size, data, the answer"
    )
    if hold:
        parser.add_argument("--hold", action="store_true", help="on the mock: keep serving after the guest script")
    if assume_hvm:
        parser.add_argument("--assume-hvm", action="store_true", help="serve even if the guest type cannot be read")


def setup_logging(args: argparse.Namespace) -> None:
    """The examples' logging: warnings and errors only, as ``<logger>: <message>`` on stderr;
    ``--verbose`` adds INFO, ``--trace`` also every ioreq (DEBUG on ``xendmop.ioreq``)."""
    verbose, trace = bool(getattr(args, "verbose", False)), bool(getattr(args, "trace", False))
    logging.basicConfig(level=logging.INFO if verbose or trace else logging.WARNING, format="%(name)s: %(message)s")
    if trace:
        logging.getLogger("xendmop.ioreq").setLevel(logging.DEBUG)


def parse(
    parser: argparse.ArgumentParser, argv: list[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[argparse.Namespace, Target]:
    """``parser.parse_args(argv)`` and its ``Target``; a ``UsageError`` exits through ``parser.error`` (status 2)."""
    args = parser.parse_args(argv)
    setup_logging(args)
    try:
        return args, Target.from_args(args, environ)
    except UsageError as e:
        parser.error(str(e))


class Where(enum.Enum):
    """Where a device model runs."""

    XEN = "xen"  # a real dom0: privcmd
    MOCK_HOST = "mock-host"  # a mock Xen in another process, over its socket
    MOCK = "mock"  # the mock Xen in this very process, with a simulated guest


@dataclass(frozen=True)
class Target:
    """Where to serve which domain, and how to drop privileges once the server is up."""

    where: Where
    domid: int | None = None  # None only for Where.MOCK: the mock makes its own domain
    socket: str | None = None  # the mock host's socket (Where.MOCK_HOST)
    depriv: tuple[int, int] | None = None
    chroot: str | None = None
    assume_hvm: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Target:
        """From ``add_arguments``' flags and ``environ`` (default ``os.environ``): with ``--domid``
        a real dom0, or the mock host ``$XENDMOP_MOCK_SOCKET`` names; without, the in-process mock.

        Raises ``UsageError`` for ``--chroot`` without ``--depriv``, for ``--depriv`` on the
        in-process mock (which lives in this process: dropping privileges would drop the
        simulated Xen's with it), and for a domid or ids outside their range."""
        env = os.environ if environ is None else environ
        domid: int | None = getattr(args, "domid", None)
        depriv: tuple[int, int] | None = getattr(args, "depriv", None)
        chroot: str | None = getattr(args, "chroot", None)
        if domid is not None and (isinstance(domid, bool) or not 1 <= domid < DOMID_FIRST_RESERVED):
            raise UsageError(
                "--domid", domid, f"--domid {domid!r}: expected a guest domid, 1..{DOMID_FIRST_RESERVED - 1}"
            )
        if depriv is not None and not (len(depriv) == 2 and all(0 < i <= _ID_MAX for i in depriv)):
            raise UsageError("--depriv", depriv, f"--depriv {depriv!r}: expected UID:GID, two non-root numeric ids")
        if chroot and not depriv:
            raise UsageError("--chroot", chroot, "--chroot needs --depriv UID:GID")
        if domid is None and depriv:
            raise UsageError(
                "--depriv",
                depriv,
                f"--depriv needs a real dom0 (--domid N) or a mock host in another process ({ENV_SOCKET}): "
                "the in-process mock lives in this process, which must stay privileged",
            )
        socket_path = env.get(ENV_SOCKET) or None
        if domid is None:
            where = Where.MOCK
        else:
            where = Where.MOCK_HOST if socket_path else Where.XEN
        return cls(
            where,
            domid,
            socket_path if where is Where.MOCK_HOST else None,
            depriv,
            chroot,
            bool(getattr(args, "assume_hvm", False)),
        )

    def drop_config(self) -> DropConfig | None:
        """The privilege drop ``--depriv``/``--chroot`` ask for (``IoreqServer(deprivilege=)``), or None."""
        if self.depriv is None:
            return None
        from ..depriv import DropConfig

        return DropConfig(uid=self.depriv[0], gid=self.depriv[1], chroot=self.chroot)

    def describe(self) -> str:
        """``Xen``, ``the mock host at PATH`` or ``the mock``, for messages."""
        return {Where.XEN: "Xen", Where.MOCK_HOST: f"the mock host at {self.socket}", Where.MOCK: "the mock"}[
            self.where
        ]

    @contextlib.contextmanager
    def connect(self) -> Iterator[Connection]:
        """The ``Connection`` to a real dom0 or a mock host process (not the in-process mock:
        that is ``open_mock``); closed on the way out."""
        if self.where is Where.MOCK or self.domid is None:
            raise UsageError("--domid", self.domid, "connect() serves --domid on Xen or a mock host; use open_mock()")
        with contextlib.ExitStack() as stack:
            if self.where is Where.MOCK_HOST:
                from ..mock.remote import RemoteXen

                if not self.socket:
                    raise UsageError(ENV_SOCKET, self.socket, f"a mock host target needs its socket (${ENV_SOCKET})")
                remote = stack.enter_context(RemoteXen(self.socket))
                dm = stack.enter_context(DeviceModel.open("mock", xen=remote))
                yield Connection(self.where, dm, self.domid, remote.open_device, remote, self.drop_config())
            else:
                dm = stack.enter_context(DeviceModel.open("privcmd"))
                yield Connection(self.where, dm, self.domid, None, None, self.drop_config())


class _Opener(Protocol):
    def __call__(self, path: str) -> Any: ...


@dataclass
class Connection:
    """An open ``DeviceModel`` for one domain, and what its other handles need.

    ``opener``: how ``IoreqServer``/``ForeignMemory`` open their devices (None: the real
    ones); ``xen``: the ``MockXen`` or ``RemoteXen`` behind them (None on real Xen);
    ``drop``: the privilege drop applied once the server is up."""

    where: Where
    dm: DeviceModel
    domid: int
    opener: _Opener | None = None
    xen: MockXen | RemoteXen | None = None
    drop: DropConfig | None = None

    def ioreq_server(self, **options: Any) -> IoreqServer:
        """An ``IoreqServer`` for the domain (``options`` as its constructor), deprivileging as asked."""
        options.setdefault("opener", self.opener)
        options.setdefault("deprivilege", self.drop)
        return IoreqServer(self.dm, self.domid, **options)

    def foreign_memory(self) -> ForeignMemory:
        """A ``ForeignMemory`` handle on the same host (restrict it to the domain before any drop)."""
        return ForeignMemory() if self.opener is None else ForeignMemory(self.opener)

    @property
    def mock_xen(self) -> MockXen:
        """The in-process mock behind this connection (``open_mock``); ``TypeError`` on any other."""
        from ..mock import MockXen

        if not isinstance(self.xen, MockXen):
            raise TypeError(f"dom{self.domid} is served on {self.where.value}, not on the in-process mock")
        return self.xen

    def require_hvm(self) -> None:
        """Refuse a domain that is not HVM (``NotHvmError``) where the connection itself can tell:
        the in-process mock's domain view, or on a mock host process one harmless DMOP — a PV
        domain refuses every DMOP with EINVAL (``dm_op``'s "not HVM" check, ``xen/arch/x86/hvm/dm.c``,
        since Xen 4.15; the mock follows it).
        Neither has PVH guests.  On real Xen nothing is checked here: see ``require_hvm``, which
        must run before anything is opened."""
        if self.where is Where.MOCK:
            if not self.mock_xen.domain(self.domid).hvm:
                raise NotHvmError(self.domid, "pv")
        elif self.where is Where.MOCK_HOST:
            try:
                self.dm.nr_vcpus(self.domid)
            except XenError as e:
                if e.errno == errno.EINVAL:
                    raise NotHvmError(self.domid, None, str(e)) from None
                raise

    def servers_left(self) -> list[int]:
        """The ioreq server ids still in the domain (on a mock; always empty on real Xen, which cannot be asked)."""
        from ..mock import MockXen

        if isinstance(self.xen, MockXen):
            return [i for i, s in enumerate(self.xen.domain(self.domid).snapshot()["servers"]) if s is not None]
        if self.xen is not None:
            return sorted(int(i) for i in self.xen.servers(self.domid))
        return []

    def check_no_server_left(self) -> None:
        """``RuntimeError`` naming the ioreq servers left in the domain, if any."""
        left = self.servers_left()
        if left:
            raise RuntimeError(f"ioreq server(s) {left} left behind in dom{self.domid}")


@contextlib.contextmanager
def open_mock(
    xen: MockXen | None = None, domid: int | None = None, *, hvm: bool = True, memory_mb: int = 4
) -> Iterator[Connection]:
    """The in-process mock: ``xen`` (default a new ``MockXen``, closed on the way out) and
    ``domid`` (default a new one-vCPU domain of ``memory_mb`` MiB, HVM unless ``hvm=False``)."""
    from ..mock import MockXen

    with contextlib.ExitStack() as stack:
        host = stack.enter_context(MockXen()) if xen is None else xen
        if domid is None:
            domid = host.create_domain(vcpus=1, hvm=hvm, memory_mb=memory_mb)
        dm = stack.enter_context(DeviceModel.open("mock", xen=host))
        yield Connection(Where.MOCK, dm, domid, host.open_device, host)


# --- is it HVM? ------------------------------------------------------------------------------------


def guest_kind(domid: int, *, libxenctrl: Callable[[], Any] | None = None) -> GuestKind | None:
    """``"hvm"``, ``"pvh"`` or ``"pv"``, or None when nothing can tell.

    First the hypervisor's own view (libxenctrl's ``xc_domain_getinfolist``: the HVM flag
    and the emulated devices, see ``xendmop.backends.libxen.domain_kind``); when libxenctrl
    is missing or cannot answer, libxl's record ``/libxl/<domid>/type``, read by the
    ``xenstore-read`` tool in a child process so that no Xenstore fd stays open in this
    one (a device model about to deprivilege must hold none).  ``libxenctrl``: a factory
    for the ``LibxenCtrl`` to ask (default the installed library's)."""
    if isinstance(domid, bool) or not isinstance(domid, int) or not 0 <= domid < DOMID_FIRST_RESERVED:
        raise UsageError("--domid", domid, f"domid {domid!r}: expected 0..{DOMID_FIRST_RESERVED - 1}")
    if libxenctrl is None:
        from ..backends.libxen import LibxenCtrl

        libxenctrl = LibxenCtrl
    try:
        with contextlib.closing(libxenctrl()) as ctrl:
            kind = str(ctrl.domain_info(domid).kind.value).lower()
        if kind in _KINDS:
            return kind
        log.warning("dom%d: libxenctrl says kind %r; asking Xenstore", domid, kind)
    except OSError as e:  # no libxenctrl, not a Xen host, no such domain: libxl's record may still say
        log.info("dom%d: libxenctrl cannot tell its kind (%s); asking Xenstore", domid, e)
    return _xenstore_kind(domid)


def _xenstore_kind(domid: int) -> GuestKind | None:
    tool = shutil.which("xenstore-read")
    if tool is None:
        return None
    try:
        done = subprocess.run(
            [tool, f"/libxl/{domid}/type"], capture_output=True, text=True, timeout=XENSTORE_TIMEOUT, check=False
        )
    except (OSError, subprocess.SubprocessError) as e:
        log.info("dom%d: xenstore-read failed (%s)", domid, e)
        return None
    kind = done.stdout.strip()
    if done.returncode != 0 or not kind:
        return None
    if kind not in _KINDS:
        log.warning("dom%d: /libxl/%d/type is %r, not a guest type this knows", domid, domid, kind)
        return None
    return kind


def check_hvm(domid: int, kind: str | None, *, assume_hvm: bool = False) -> None:
    """Refuse (``NotHvmError``) any ``kind`` but ``"hvm"``; an unknown one (None) only passes with ``assume_hvm``."""
    if kind == "hvm" or (kind is None and assume_hvm):
        return
    raise NotHvmError(domid, kind)


def require_hvm(
    domid: int, *, assume_hvm: bool = False, libxenctrl: Callable[[], Any] | None = None
) -> GuestKind | None:
    """Refuse a real domain that is not HVM before any interrupt DMOP can reach it; return its kind.

    HAZARD: on Xen 4.17.7 an accepted ``set_isa_irq_level`` for a PVH guest crashed the
    hypervisor, and ``dm_op`` cannot tell PVH from HVM (both pass its HVM check).  So PVH
    and PV are refused always, and a kind nothing can tell (``guest_kind`` None) unless
    ``assume_hvm``.  Raises ``NotHvmError``.  Call it before opening anything."""
    kind = guest_kind(domid, libxenctrl=libxenctrl)
    check_hvm(domid, kind, assume_hvm=assume_hvm)
    return kind


# --- running it ------------------------------------------------------------------------------------


def run_target(
    target: Target,
    body: Callable[[Connection], int],
    *,
    name: str,
    parser: argparse.ArgumentParser | None = None,
    hvm_only: bool = False,
    report: Callable[[str], None] | None = None,
) -> int:
    """Connect to ``target`` (a real dom0 or a mock host process) and return ``body(connection)``.

    ``hvm_only``: the device sends interrupt DMOPs, so a domain that is not HVM is refused
    first — on real Xen before anything is opened (``require_hvm``, honouring
    ``target.assume_hvm``), on a mock host by ``Connection.require_hvm``; the refusal is a
    usage error (``parser.error``: exit status 2) or, without a parser, ``NotHvmError``.
    Xen's, the kernel's or the mock host's refusal (``OSError``, ``ValueError``,
    ``RuntimeError``) is reported as one line, ``<name>: dom<N>: <why>``, through ``report``
    (default: stderr) and gives 1."""
    if report is None:
        report = _to_stderr
    try:
        if hvm_only and target.where is Where.XEN and target.domid is not None:  # connect() refuses None
            require_hvm(target.domid, assume_hvm=target.assume_hvm)
        with target.connect() as connection:
            if hvm_only:
                connection.require_hvm()
            return run_connection(connection, body, name=name, report=report)
    except NotHvmError as e:
        if e.kind is None and target.where is Where.XEN:
            e = not_xen_host(e)
        if parser is None:
            raise e from None
        parser.error(str(e))
    except (OSError, ValueError, RuntimeError) as e:
        if target.where is Where.MOCK_HOST and _host_gone(e):  # also while closing the connection
            report(_host_gone_line(name))
            return 1
        report(f"{name}: dom{target.domid}: {e}")
        return 1


def run_connection(
    connection: Connection, body: Callable[[Connection], int], *, name: str, report: Callable[[str], None] | None = None
) -> int:
    """``body(connection)``, ending well when the domain or the mock host went away meanwhile.

    ``DomainGone`` (from ``ServeLoop.run``: the guest was destroyed or powered off while
    served) is reported as one line, ``<name>: dom<N> is gone (destroyed or powered off);
    stopped serving``, and gives 0: a guest's end is a device model's normal end (QEMU exits
    0 then).  ``HostGone`` (a mock host process that died) gives ``<name>: the mock host is
    gone; stopped serving`` and 1.  The teardown before either is quiet: what fails there
    fails only because the domain or the host is gone.  Anything else ``body`` raises
    propagates (``run_target`` reports it)."""
    if report is None:
        report = _to_stderr
    try:
        return body(connection)
    except DomainGone as e:
        report(f"{name}: {e}; stopped serving")
        return 0
    except HostGone:
        report(_host_gone_line(name))
        return 1


def not_xen_host(e: NotHvmError) -> NotHvmError:
    """``e`` (a domain of unknown type) as what it is off Xen: no domain to serve at all, rather
    than a hint to ``--assume-hvm``; ``e`` itself on a Xen host."""
    from ..backends.device import xen_host_signs

    if xen_host_signs():
        return e
    said = NotHvmError(e.domid, None)
    said.args = (
        f"--domid {e.domid}: this is not a Xen host (no /dev/xen/privcmd, no /proc/xen); --domid serves a domain "
        f"of a real dom0, or of the mock host process ${ENV_SOCKET} names; without --domid the example runs on "
        "the simulated Xen",
    )
    return said


def _host_gone(e: BaseException) -> bool:
    return isinstance(e, HostGone) or (isinstance(e, OSError) and e.errno in HOST_GONE_ERRNOS)


def _host_gone_line(name: str) -> str:
    return f"{name}: the mock host is gone; stopped serving"


def means_gone(e: BaseException) -> bool:
    """Whether a failed call may say only that the domain is gone (ESRCH, ENOENT: see
    ``DOMAIN_GONE_ERRNOS``) or that the mock host process is (a broken connection)."""
    return isinstance(e, OSError) and (e.errno in DOMAIN_GONE_ERRNOS or e.errno in HOST_GONE_ERRNOS)


@contextlib.contextmanager
def unless_gone() -> Iterator[None]:
    """For a device's own teardown DMOPs (lowering its IRQ, stopping dirty tracking): suppress
    a failure that only says the domain or the mock host is gone (``DomainGone``'s errnos
    ESRCH/ENOENT, a broken mock host connection); anything else propagates."""
    try:
        yield
    except OSError as e:
        if not means_gone(e):
            raise
        log.debug("teardown after the domain or host went away: %s", e)


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def serve_until_signal(loop: ServeLoop, *, on_ready: Callable[[], object] | None = None) -> int | None:
    """Start ``loop``'s servers (each drops privileges if it was built to), call ``on_ready``,
    then serve in this thread until SIGINT/SIGTERM (or ``loop.stop()``); return the signal.
    The servers are torn down on the way out, also when starting or ``on_ready`` failed.
    A signal is the ordinary way to stop: the caller exits 0 after it (``EXIT_STATUS_HELP``).

    In the main thread SIGINT/SIGTERM only ask the loop to stop from the first server's
    bring-up to the last one's teardown (a signal during bring-up stops it once up; a
    KeyboardInterrupt can break neither), and once a signal has stopped the loop, later
    ones are ignored for the rest of the program: it is on its way out, and its own
    teardown (a tap, a terminal) must finish too."""
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, loop.on_signal) for sig in _STOP_SIGNALS} if main else {}
    try:
        for server in loop.servers:
            server.start()
        if on_ready is not None:
            on_ready()
        return loop.run()
    finally:
        for server in reversed(loop.servers):
            server.close()  # idempotent: run() closes them too
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_IGN if loop.signal is not None else handler)


def stopped_line(name: str, signum: int | None) -> str:
    """How serving ended, for the examples' last line: ``<name>: stopped (SIGTERM); the ioreq
    server was destroyed`` (``done`` instead of a signal name when the loop was stopped)."""
    how = signal.Signals(signum).name if signum is not None else "done"
    return f"{name}: stopped ({how}); the ioreq server was destroyed"


def start_daemon_thread(target: Callable[[], object], name: str) -> threading.Thread:
    """Start ``target`` in a daemon thread that leaves SIGINT/SIGTERM to the main thread.

    A signal the other thread took would set Python's flag without waking the main
    thread from a blocking wait (a keyboard read, a join), leaving it stuck; with the
    signals blocked there the kernel delivers them to the main thread."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        thread.start()  # the new thread inherits the blocked mask
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
    return thread


@dataclass
class GuestRun(Generic[T]):
    """How ``run_guest_while_serving`` ended: the guest's result (None if it had not
    finished, or failed, when a signal ended the run) and the signal (None: no signal)."""

    result: T | None
    signal: int | None


def run_guest_while_serving(
    loop: ServeLoop,
    guest: Callable[[], T],
    *,
    hold: bool = False,
    stopping: threading.Event | None = None,
    join_timeout: float = 10.0,
    signal_grace: float = SIGNAL_JOIN_TIMEOUT,
) -> GuestRun[T]:
    """Serve ``loop`` in this thread while ``guest()`` (a simulated guest's script) runs in another.

    The guest starts once the servers are up, so its first access is already routed.  When
    ``guest`` returns the loop stops, unless ``hold``: then it serves until SIGINT/SIGTERM.
    Signals are handled by the loop when this is the main thread (the guest's thread
    blocks them).  When the loop has ended ``stopping`` is set, for a guest that runs until
    told.  After a signal the guest gets ``signal_grace`` seconds to finish (0 for one that
    may be blocked on something else than the device, a keyboard).  Raises what ``guest``
    raised (unless a signal ended the run), ``RuntimeError`` if it did not finish in
    ``join_timeout`` seconds after the loop stopped."""
    results: list[T] = []
    errors: list[BaseException] = []

    def run_guest() -> None:
        try:
            results.append(guest())
        except BaseException as e:  # handed to the serving thread
            errors.append(e)
            loop.stop()
            return
        if not hold:
            loop.stop()

    threads: list[threading.Thread] = []
    # The guest starts from inside run(), once the loop's signal handlers are in place:
    # a signal the guest provokes at once must not find Python's default handlers.
    go = os.eventfd(1, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def start_guest() -> None:
        loop.remove_reader(go)
        if not threads:
            threads.append(start_daemon_thread(run_guest, "guest"))

    signum: int | None = None
    try:
        loop.add_reader(go, start_guest)
        signum = loop.run(handle_signals=threading.current_thread() is threading.main_thread())
    finally:
        for server in reversed(loop.servers):
            server.close()  # idempotent: run() closes them too
        os.close(go)
        if stopping is not None:
            stopping.set()
        for thread in threads:
            thread.join(join_timeout if signum is None else min(join_timeout, signal_grace))
    if signum is not None:
        return GuestRun(results[0] if results else None, signum)
    if errors:
        raise errors[0]
    if not results:
        raise RuntimeError(f"the guest did not finish in {join_timeout}s after the loop stopped")
    return GuestRun(results[0], None)


def run_guest_script(
    mock: Connection,
    loop: ServeLoop,
    script: Callable[[], T],
    *,
    lines: Callable[[T], Iterable[str]],
    hold: bool = False,
    out: Callable[[str], None] = print,
) -> T | None:
    """``run_guest_while_serving`` for a demo on the in-process mock, telling ``out`` how it went.

    The script's ``lines(result)`` are shown once it is done — with ``hold`` at once, then
    ``guest script done; serving until Ctrl-C``, and the loop serves on until a signal,
    which is reported once the domain is checked to hold no ioreq server (``RuntimeError``
    naming them otherwise).  Returns the script's result, or None when a signal ended the
    run before it finished; raises what the script raised."""

    def narrated() -> T:
        result = script()
        if hold:
            for line in lines(result):
                out(line)
            out("guest script done; serving until Ctrl-C")
        return result

    run = run_guest_while_serving(loop, narrated, hold=hold)
    mock.check_no_server_left()
    if run.signal is not None:
        out(f"signal {run.signal}: ioreq server destroyed, none left in the domain")
    elif run.result is not None and not hold:
        for line in lines(run.result):
            out(line)
    return run.result
