"""The ``xendmop`` command: backend info, the DMOP catalogue, and one subcommand per op.

    xendmop info [DOMID]              what each backend finds on this host (and, with
                                      libxenctrl, what kind of guest DOMID is)
    xendmop ops                       every DMOP, from the declarations
    xendmop nr-vcpus DOMID            one subcommand per libxendevicemodel function, its
    xendmop shutdown DOMID poweroff   arguments in C order, enums by name or number
    xendmop depriv-check PID          is a device-model process deprivileged? (see xendmop.depriv.check)
    xendmop mock-host --socket PATH   serve the mock Xen to other processes (see xendmop.mock.remote)

Every subcommand takes ``--json``, ``--backend``, ``--verbose`` and ``--quiet``, before or
after its name.  ``--backend`` (or ``$XENDMOP_BACKEND``) chooses privcmd, libxen or mock;
the default is auto (privcmd, then libxen, then, off Xen only, the mock, which it says on
stderr unless ``--quiet``).  Exit status: 0 done, 1 refused (by Xen, the kernel, the mock
host, or this machine), 2 a usage error; one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import enum
import errno
import inspect
import json
import logging
import os
import platform
import re
import sys
import typing
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from .abi.xen import DOMID_FIRST_RESERVED
from .backends import eventfd
from .backends.libxen import LIBDIR_ENV, LibxenCtrl, library_report
from .backends.privcmd import PrivcmdBackend
from .backends.selection import BACKENDS, MockFallbackWarning, make_backend
from .devicemodel import DeviceModel
from .errors import ArgumentError, UnsupportedError, XenError
from .ops import DECLARATIONS

ENV_SOCKET = "XENDMOP_MOCK_SOCKET"  # as xendmop.mock.remote.ENV_SOCKET (the mock stays unloaded on Xen)


# argparse names a type function in "invalid <name> value: 'x'": these are named for a user.
def integer(text: str) -> int:
    """An integer, decimal or with a 0x/0o/0b prefix."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer (decimal, or 0x… hex)") from None


def domid(text: str) -> int:
    """A domain id, 0..0x7fef (the ids above are Xen's reserved ones)."""
    value = integer(text)
    if not 0 <= value < DOMID_FIRST_RESERVED:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a domid, 0..{DOMID_FIRST_RESERVED - 1}")
    return value


def _enum_type(cls: type[enum.Enum]) -> Callable[[str], int]:
    names = {m.name.lower(): m for m in cls}

    def parse(text: str) -> int:
        member = names.get(text.lower())
        if member is not None:
            return int(member.value)
        try:
            return int(cls(integer(text)).value)
        except (ValueError, argparse.ArgumentTypeError):
            pass
        raise argparse.ArgumentTypeError(f"{text!r}: expected one of {', '.join(names)} (or its number)")

    parse.__name__ = cls.__name__
    return parse


def _extent(text: str) -> tuple[int, int]:
    first, sep, nr = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIRST_PFN:NR")
    return integer(first), integer(nr)


_extent.__name__ = "extent"

#: DeviceModel's public methods that are not one libxendevicemodel call each, or make no sense once
NOT_COMMANDS = {"open", "close", "describe", "restrict", "backend", "closed"}


def _enum_of(hint: Any) -> type[enum.Enum] | None:
    """The enum a method's argument takes (``ShutdownReason | int``): the CLI takes the member's
    name (``shutdown 1 poweroff``) or its number.  Read from the method's own hints, so that a
    new op's method brings its subcommand's arguments."""
    for kind in typing.get_args(hint) or (hint,):
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            return kind
    return None


def _plain(text: str) -> str:
    """A docstring's text for a terminal: no reST double backquotes."""
    return re.sub(r"``([^`]*)``", r"\1", text)


def _summary(doc: str) -> str:
    """A docstring's first sentence, on one line, for ``--help``."""
    paragraph = " ".join(_plain(doc).strip().split("\n\n")[0].split())
    head, dot, _ = paragraph.partition(". ")
    return head + "." if dot else paragraph


def _commands() -> dict[str, tuple[str, list[inspect.Parameter]]]:
    """subcommand -> (DeviceModel method, its parameters): one per libxendevicemodel function,
    read from the methods themselves so that a new op's method brings its subcommand."""
    found: dict[str, tuple[str, list[inspect.Parameter]]] = {}
    for name, attr in sorted(vars(DeviceModel).items()):
        if name.startswith("_") or name in NOT_COMMANDS or isinstance(attr, (classmethod, staticmethod, property)):
            continue
        fn = getattr(DeviceModel, name)
        if not callable(fn):
            continue
        params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
        if params and params[0].name == "domid":
            found[name.replace("_", "-")] = (name, params)
    return found


COMMANDS = _commands()


def _argument(method: str, param: inspect.Parameter, hints: dict[str, Any]) -> tuple[list[str], dict[str, Any]] | None:
    """How ``param`` of ``method`` is given on the command line, or None for one it cannot take (a buffer)."""
    if param.name == "domid":
        return [param.name], {"type": domid, "help": "the target domain"}
    cls = _enum_of(hints.get(param.name))
    if cls is not None:
        choices = ", ".join(m.name.lower() for m in cls)
        kw: dict[str, Any] = {"type": _enum_type(cls), "metavar": param.name.upper(), "help": f"{choices} (or number)"}
        if param.default is not inspect.Parameter.empty:
            return [f"--{param.name.replace('_', '-')}"], {**kw, "default": int(param.default)}
        return [param.name], kw
    if param.name == "extents":
        return [param.name], {"type": _extent, "nargs": "+", "metavar": "FIRST_PFN:NR", "help": "the extents"}
    hint = hints.get(param.name)
    if hint is bool and param.default is not inspect.Parameter.empty:
        return [f"--{param.name.replace('_', '-')}"], {"action": "store_true", "help": f"set {param.name}"}
    if param.default is not inspect.Parameter.empty:
        return None  # an optional buffer (track_dirty_vram's out=): the library's own
    if hint is bool:
        return [param.name], {"type": integer, "choices": (0, 1), "metavar": param.name.upper(), "help": "0 or 1"}
    return [param.name], {"type": integer, "metavar": param.name.upper(), "help": param.name.replace("_", " ")}


def _catalogue() -> list[dict[str, Any]]:
    return [
        {
            "op": decl.number,
            "name": decl.name,
            "struct": decl.struct.__name__,
            "size": decl.size,
            "since": "{}.{}".format(*decl.since),
            "arch": sorted(decl.arch),
            "copy_back": decl.copy_back.value,
            "continuation": decl.continuation,
            "slots": [
                f"{'MANY' if s.many else 'ONE'}({s.direction.name}, {s.ctype.__name__}, {s.name})" for s in decl.slots
            ],
            "doc": decl.doc,
        }
        for decl in DECLARATIONS
    ]


def _info(args: argparse.Namespace) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in ("privcmd", "libxen", "mock"):
        try:
            backend = make_backend(name)
        except (OSError, ImportError) as e:
            found[name] = {"available": False, "why": str(e)}
            continue
        try:
            found[name] = {"available": True, **backend.describe()}
            if isinstance(backend, PrivcmdBackend):  # what this privcmd offers beyond DMOPs
                found[name]["eventfd"] = {k: v.value for k, v in eventfd.probe(backend.device).items()}
        finally:
            backend.close()
    with DeviceModel.open(args.backend) as dm:
        chosen = dm.backend.name
    libdir = os.environ.get(LIBDIR_ENV) or None
    info = {
        "xendmop": __version__,
        "kernel": platform.release(),
        "xen": xen_version(),
        "chosen": chosen,
        "mock_host": os.environ.get(ENV_SOCKET) or None if chosen == "mock" else None,
        "backends": found,
        "libraries": library_report(libdir),
    }
    if args.domid is not None:
        info["domain"] = _domain(args.domid, libdir)
    return info


def xen_version(root: str = "/") -> str | None:
    """The hypervisor's version from sysfs (``/sys/hypervisor/version``: Linux
    ``drivers/xen/sys-hypervisor.c``, e.g. "4.20.5-pre"), or None off Xen."""
    base = os.path.join(root, "sys/hypervisor/version")
    try:
        parts = [open(os.path.join(base, name)).read().strip() for name in ("major", "minor", "extra")]
    except OSError:
        return None
    return f"{parts[0]}.{parts[1]}{parts[2]}"


def _domain(domid: int, libdir: str | None) -> dict[str, Any]:
    """libxenctrl's read-only view of the domain, or why there is none."""
    try:
        ctrl = LibxenCtrl(libdir)
    except (OSError, UnsupportedError) as e:
        return {"domid": domid, "available": False, "why": f"libxenctrl: {e}"}
    try:
        return {"available": True, **ctrl.domain_info(domid).as_dict()}
    finally:
        ctrl.close()


def _print_info(info: dict[str, Any]) -> None:
    where = f" (the mock host at {info['mock_host']}, from {ENV_SOCKET})" if info.get("mock_host") else ""
    xen = f"Xen {info['xen']}, " if info.get("xen") else ""
    print(f"xendmop {info['xendmop']} on {xen}Linux {info['kernel']}: backend in use: {info['chosen']}{where}")
    for name, found in info["backends"].items():
        if found["available"]:
            detail = ", ".join(f"{k}={v}" for k, v in found.items() if k not in ("available", "backend"))
            print(f"  {name:8} available  {detail}")
        else:
            print(f"  {name:8} unavailable: {found['why']}")
    for soname, lib in info["libraries"].items():
        missing = lib.get("missing") or []
        found = lib["file"] + (f" (lacks {', '.join(missing)})" if missing else "") if lib["found"] else "not found"
        print(f"  {soname:25} {found}")
    domain = info.get("domain")
    if domain is not None:
        if not domain["available"]:
            print(f"dom{domain['domid']}: unknown ({domain['why']})")
            return
        states = ["dying"] * domain["dying"] + ["paused"] * domain["paused"]
        if domain["shutdown"]:
            states.append(f"shut down (reason {domain['shutdown_reason']})")
        print(
            f"dom{domain['domid']}: {domain['kind']}, {domain['vcpus']} vCPUs ({domain['online_vcpus']} online), "
            f"emulation_flags={domain['emulation_flags']:#x}" + "".join(f", {s}" for s in states)
        )


def _print_ops(ops: list[dict[str, Any]]) -> None:
    print(f"{'#':>2}  {'name':34} {'size':>4}  {'since':5}  {'arch':9} {'copy back':10} slots")
    for op in ops:
        print(
            f"{op['op']:>2}  {op['name']:34} {op['size']:>4}  {op['since']:5}  {','.join(op['arch']):9} "
            f"{op['copy_back']:10} {' '.join(op['slots'])}"
        )


def _mode(text: str) -> int:
    mode = int(text, 8)
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"mode {text!r}: want octal permission bits, e.g. 0600")
    return mode


def _virtio_disk_backends(args: argparse.Namespace) -> int:
    """Answer libxl's handshake for Xen 4.17's standalone virtio disks until SIGTERM/SIGINT."""
    import shutil
    import signal
    import threading

    from .virtio.standalone import StandaloneBackends

    missing = [tool for tool in ("xenstore-ls", "xenstore-write") if shutil.which(tool) is None]
    if missing:
        tools = " and ".join(missing)
        print(f"xendmop virtio-disk-backends: {tools} not found (Debian: xenstore-utils)", file=sys.stderr)
        return 1
    done = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: done.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    watcher = StandaloneBackends(args.root)
    print(f"xendmop virtio-disk-backends: answering libxl under {watcher.root}; Ctrl-C to stop", flush=True)
    seen = 0
    try:
        while not done.wait(watcher.interval):
            watcher.poll()
            for line in watcher.answered[seen:]:
                print(line, flush=True)
            seen = len(watcher.answered)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _mock_host(args: argparse.Namespace) -> int:
    """Serve a mock Xen on a unix socket until SIGTERM/SIGINT; remove the socket on the way out."""
    import os
    import signal

    from .mock import MockXen, default_host
    from .mock.remote import ENV_SOCKET, MockHostServer

    options = {} if args.xen_version is None else {"xen_version": args.xen_version}
    try:
        xen = default_host(**options) if args.domains == "default" else MockXen(**options)
    except ValueError as e:  # a version the mock does not simulate
        print(f"xendmop mock-host: {e}", file=sys.stderr)
        return 2
    try:
        server = MockHostServer(xen, args.socket, mode=args.mode)
    except OSError as e:
        xen.close()
        print(f"xendmop mock-host: cannot listen on {args.socket}: {e.strerror or e}", file=sys.stderr)
        return 1
    previous = {sig: signal.signal(sig, lambda signum, frame: server.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    print(f"xendmop mock-host: listening on {args.socket} (pid {os.getpid()}; clients: {ENV_SOCKET}={args.socket})")
    sys.stdout.flush()
    log = logging.getLogger("xendmop.mock.remote")
    if not args.quiet:  # a daemon's log is its output: who came and went, what they left
        log.setLevel(logging.INFO)
    try:
        server.serve_forever()
    finally:
        server.close()
        left = [
            f"dom{domid} {ids}"
            for domid in sorted(xen.hypervisor.domains)
            if (ids := [i for i, s in enumerate(xen.domain(domid).snapshot()["servers"]) if s is not None])
        ]
        if left:
            log.warning("mock-host: exiting with ioreq server(s) left: %s", ", ".join(left))
        xen.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _common(defaults: bool) -> argparse.ArgumentParser:
    """The options every subcommand takes, before or after its name (``--json``, ``--backend``, …);
    after it, only when given (``SUPPRESS``), so that one given before is not reset."""
    c = argparse.ArgumentParser(add_help=False)

    def d(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    c.add_argument("--backend", choices=BACKENDS, default=d("auto"), help="how to reach Xen (default: auto)")
    c.add_argument("--json", action="store_true", default=d(False), help="print JSON")
    c.add_argument("-v", "--verbose", action="store_true", default=d(False), help="log what is chosen and done")
    c.add_argument(
        "-q", "--quiet", action="store_true", default=d(False), help="do not warn that auto chose the simulated Xen"
    )
    return c


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xendmop", description="Xen device-model operations from dom0.", parents=[_common(True)]
    )
    p.add_argument("--version", action="version", version=f"xendmop {__version__}")
    common = _common(False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser(
        "info",
        help="what each backend finds on this host",
        description="What each backend and Xen library finds here.",
        parents=[common],
    )
    info.add_argument("domid", type=domid, nargs="?", help="also show this domain's kind and state (libxenctrl)")
    sub.add_parser(
        "ops",
        help="the DMOP catalogue",
        description="Every DMOP: number, name, struct size, first Xen release, arch, copy-back rule, extra buffers.",
        parents=[common],
    )
    sub.add_parser("depriv-check", help="inspect a device-model process's deprivileging (own --help)")
    vd = sub.add_parser(
        "virtio-disk-backends",
        help="answer xl 4.17's wait for standalone virtio disks (Arm virtio-mmio slots)",
        description="Xen 4.17's xl makes an Arm guest's virtio-mmio slots from disks with specification=virtio, "
        "backendtype=standalone, and waits up to 10 s in 'xl create' for each disk's backend state to reach "
        "InitWait (2); at teardown it writes Closing (5) and waits for Closed (6). Run this beside 'xl create' to "
        "answer both, until SIGTERM/SIGINT; the device models (examples' --mmio N) start after 'xl create -p'.",
        parents=[common],
    )
    vd.add_argument("--root", default="/local/domain/0/backend/virtio_disk", help="the backend directory to watch")
    mh = sub.add_parser(
        "mock-host",
        help="serve the mock Xen to other processes on a unix socket",
        description="Serve a simulated Xen host (dom0 plus guests) to device models and guests in other "
        "processes: DeviceModel.open('mock') and the examples' --domid use it when XENDMOP_MOCK_SOCKET "
        "names the socket. Runs until SIGTERM/SIGINT, then removes the socket.",
        parents=[common],
    )
    mh.add_argument("--socket", required=True, help="where to listen (clients read $XENDMOP_MOCK_SOCKET)")
    mh.add_argument("--domains", choices=("default", "none"), default="default", help="default: dom1 HVM, dom2 PV")
    mh.add_argument("--mode", type=_mode, default=0o600, help="socket permissions, octal (default 0600)")
    mh.add_argument(
        "--xen-version",
        help="the Xen release to simulate, MAJOR.MINOR from 4.9 (default: MockXen's, the newest the lab checks)",
    )
    for command, (method, params) in COMMANDS.items():
        doc = _summary(getattr(DeviceModel, method).__doc__ or "")
        sp = sub.add_parser(command, help=doc.replace("%", "%%"), description=doc, parents=[common])
        sp.set_defaults(parser=sp)
        # ``Buffer`` (out=, extents=) is a name for type checkers only; no subcommand takes one.
        hints = typing.get_type_hints(getattr(DeviceModel, method), localns={"Buffer": object})
        for param in params:
            spec = _argument(method, param, hints)
            if spec is not None:
                sp.add_argument(*spec[0], **spec[1])
    return p


def _call(args: argparse.Namespace) -> Any:
    method, params = COMMANDS[args.command]
    positional, keyword = [], {}
    for param in params:
        if not hasattr(args, param.name):
            continue  # a buffer the command line does not take
        if param.kind is inspect.Parameter.KEYWORD_ONLY or param.default is not inspect.Parameter.empty:
            keyword[param.name] = getattr(args, param.name)
        else:
            positional.append(getattr(args, param.name))
    with DeviceModel.open(args.backend) as dm:
        value = getattr(dm, method)(*positional, **keyword)
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        value = value._asdict()
    elif isinstance(value, (bytes, bytearray)):
        value = value.hex()
    return {"op": method, "result": value}


def _print_result(result: dict[str, Any]) -> None:
    value = result["result"]
    if value is None:
        print("ok")
    elif isinstance(value, dict):
        print(" ".join(f"{k}={'-' if v is None else v}" for k, v in value.items()))
    else:
        print(value)


def _depriv_check(argv: list[str]) -> int:
    from .depriv.check import main as depriv_check

    return depriv_check(argv)


def _split_depriv_check(argv: list[str]) -> list[str] | None:
    """``depriv-check``'s own arguments when it is the command (after global options only), else None;
    a global ``--json`` is handed on to it."""
    if "depriv-check" not in argv:
        return None
    at = argv.index("depriv-check")
    before = argv[:at]
    flags = {"--json", "-q", "--quiet", "-v", "--verbose"}
    i = 0
    while i < len(before):
        if before[i] in flags:
            i += 1
        elif before[i] == "--backend" and i + 1 < len(before):
            i += 2
        elif before[i].startswith("--backend="):
            i += 1
        else:
            return None  # something else before it: let the main parser say what
    return argv[at + 1 :] + (["--json"] if "--json" in before and "--json" not in argv[at + 1 :] else [])


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _show_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    if issubclass(category, MockFallbackWarning):
        _say(str(message))  # a line for a person, not a warnings dump
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: Sequence[str] | None = None) -> int:
    """The ``xendmop`` command.  Exit status: 0 done, 1 refused (by Xen, the kernel, the mock host,
    or the machine: not a Xen host, no access), 2 a usage error (argparse's, or an argument the
    library refused before any syscall).  Never a traceback."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # `xendmop ops | head -3`: the reader went away; say nothing more
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 1
    except KeyboardInterrupt:
        return 130


def _main(argv: list[str]) -> int:
    depriv = _split_depriv_check(argv)
    if depriv is not None:  # its own parser: options of its own, exit codes 0/1/2
        return _depriv_check(depriv)
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    warnings.showwarning = _show_warning
    if args.quiet:
        warnings.simplefilter("ignore", MockFallbackWarning)
    if args.command == "mock-host":
        return _mock_host(args)
    if args.command == "virtio-disk-backends":
        return _virtio_disk_backends(args)
    out: Callable[[Any], None]
    try:
        if args.command == "info":
            result: Any = _info(args)
            out = _print_info
        elif args.command == "ops":
            result, out = _catalogue(), _print_ops
        else:
            result, out = _call(args), _print_result
    except ArgumentError as e:  # refused before any syscall: the value given is the problem
        sub: argparse.ArgumentParser = getattr(args, "parser", parser)
        sub.error(str(e))
    except (OSError, ValueError, RuntimeError) as e:
        message = _why(e)
        if args.json:
            print(json.dumps({"error": message, "errno": getattr(e, "errno", None)}))
        else:
            _say(f"xendmop {args.command}: {message}")
        return 1
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        out(result)
    return 0


def _why(e: BaseException) -> str:
    """One line for a refusal; a mock host socket that cannot be reached is named, with its variable."""
    socket_path = os.environ.get(ENV_SOCKET)
    if (
        socket_path
        and isinstance(e, OSError)
        and not isinstance(e, XenError)
        and e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.EACCES, errno.ENOTSOCK)
    ):
        return f"the mock host socket {ENV_SOCKET}={socket_path}: {e.strerror or e}"
    if isinstance(e, OSError) and not isinstance(e, XenError) and e.strerror:
        named = f" ({e.filename})" if e.filename and str(e.filename) not in e.strerror else ""
        return e.strerror + named  # without "[Errno N]": the message already says why
    return str(e)
