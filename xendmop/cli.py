"""The ``xendmop`` command: backend info, the DMOP catalogue, and simple ops.

    xendmop info [DOMID]              what each backend finds on this host (and, with
                                      libxenctrl, what kind of guest DOMID is)
    xendmop ops                       every DMOP, from the declarations
    xendmop nr-vcpus DOMID            one subcommand per read-only or simple op
    xendmop depriv-check PID          is a device-model process deprivileged? (see xendmop.depriv.check)
    xendmop mock-host --socket PATH   serve the mock Xen to other processes (see xendmop.mock.remote)
    xendmop --json …                  machine-readable output

``--backend`` (or ``$XENDMOP_BACKEND``) chooses privcmd, libxen or mock; the default
is auto (privcmd, then libxen, then the mock, with the choice logged).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from .backends.libxen import LIBDIR_ENV, LibxenCtrl, library_report
from .devicemodel import BACKENDS, DeviceModel, make_backend
from .errors import ArgumentError, UnsupportedError, XenError
from .ops import DECLARATIONS


def _int(text: str) -> int:
    return int(text, 0)


# subcommand -> (DeviceModel method, [(argument, help)]); all arguments are integers
SIMPLE_OPS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "nr-vcpus": ("nr_vcpus", [("domid", "target domain")]),
    "set-isa-irq-level": (
        "set_isa_irq_level",
        [("domid", "target domain"), ("irq", "ISA IRQ 0-15"), ("level", "0 or 1")],
    ),
    "set-pci-intx-level": (
        "set_pci_intx_level",
        [
            ("domid", "target domain"),
            ("segment", "PCI segment"),
            ("bus", "bus"),
            ("device", "device 0-31"),
            ("intx", "INTx 0-3 (A-D)"),
            ("level", "0 or 1"),
        ],
    ),
    "set-pci-link-route": (
        "set_pci_link_route",
        [("domid", "target domain"), ("link", "link 0-3"), ("irq", "ISA IRQ, 0 disables")],
    ),
    "inject-msi": ("inject_msi", [("domid", "target domain"), ("msi_addr", "MSI address"), ("msi_data", "MSI data")]),
    "shutdown": ("shutdown", [("domid", "target domain"), ("reason", "SHUTDOWN_* reason (0 poweroff, 1 reboot, …)")]),
    "create-ioreq-server": (
        "create_ioreq_server",
        [("domid", "target domain"), ("handle_bufioreq", "0 off, 1 legacy, 2 atomic")],
    ),
    "destroy-ioreq-server": ("destroy_ioreq_server", [("domid", "target domain"), ("id", "ioreq server id")]),
    "set-ioreq-server-state": (
        "set_ioreq_server_state",
        [("domid", "target domain"), ("id", "server id"), ("enabled", "0 or 1")],
    ),
}


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
        finally:
            backend.close()
    with DeviceModel.open(args.backend) as dm:
        chosen = dm.backend.name
    libdir = os.environ.get(LIBDIR_ENV) or None
    info = {
        "xendmop": __version__,
        "kernel": platform.release(),
        "chosen": chosen,
        "backends": found,
        "libraries": library_report(libdir),
    }
    if args.domid is not None:
        info["domain"] = _domain(args.domid, libdir)
    return info


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
    print(f"xendmop {info['xendmop']} on Linux {info['kernel']}: backend in use: {info['chosen']}")
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


def _mock_host(args: argparse.Namespace) -> int:
    """Serve a mock Xen on a unix socket until SIGTERM/SIGINT; remove the socket on the way out."""
    import os
    import signal

    from .mock import MockXen, default_host
    from .mock.remote import ENV_SOCKET, MockHostServer

    xen = default_host() if args.domains == "default" else MockXen()
    try:
        server = MockHostServer(xen, args.socket, mode=args.mode)
    except OSError as e:
        xen.close()
        print(f"xendmop mock-host: cannot listen on {args.socket}: {e.strerror or e}", file=sys.stderr)
        return 1
    previous = {sig: signal.signal(sig, lambda signum, frame: server.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    print(f"xendmop mock-host: listening on {args.socket} (pid {os.getpid()}; clients: {ENV_SOCKET}={args.socket})")
    sys.stdout.flush()
    try:
        server.serve_forever()
    finally:
        server.close()
        xen.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xendmop", description="Xen device-model operations from dom0.")
    p.add_argument("--version", action="version", version=f"xendmop {__version__}")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="how to reach Xen (default: auto)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="log backend selection")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser(
        "info", help="what each backend finds on this host", description="What each backend and Xen library finds here."
    )
    info.add_argument("domid", type=_int, nargs="?", help="also show this domain's kind and state (libxenctrl)")
    sub.add_parser(
        "ops",
        help="the DMOP catalogue",
        description="Every DMOP: number, name, struct size, first Xen release, arch, copy-back rule, extra buffers.",
    )
    sub.add_parser("depriv-check", help="inspect a device-model process's deprivileging (own --help)")
    mh = sub.add_parser(
        "mock-host",
        help="serve the mock Xen to other processes on a unix socket",
        description="Serve a simulated Xen host (dom0 plus guests) to device models and guests in other "
        "processes: DeviceModel.open('mock') and the examples' --domid use it when XENDMOP_MOCK_SOCKET "
        "names the socket. Runs until SIGTERM/SIGINT, then removes the socket.",
    )
    mh.add_argument("--socket", required=True, help="where to listen (clients read $XENDMOP_MOCK_SOCKET)")
    mh.add_argument("--domains", choices=("default", "none"), default="default", help="default: dom1 HVM, dom2 PV")
    mh.add_argument("--mode", type=_mode, default=0o600, help="socket permissions, octal (default 0600)")
    for command, (method, params) in SIMPLE_OPS.items():
        doc = (getattr(DeviceModel, method).__doc__ or "").strip().splitlines()[0]
        sp = sub.add_parser(command, help=doc, description=doc)
        for name, help_text in params:
            sp.add_argument(name, type=_int, help=help_text)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["depriv-check"]:  # its own parser: options of its own, exit codes 0/1/2
        from .depriv.check import main as depriv_check

        return depriv_check(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.command == "mock-host":
        return _mock_host(args)
    out: Callable[[Any], None]
    try:
        if args.command == "info":
            result: Any = _info(args)
            out = _print_info
        elif args.command == "ops":
            result, out = _catalogue(), _print_ops
        else:
            method, params = SIMPLE_OPS[args.command]
            with DeviceModel.open(args.backend) as dm:
                value = getattr(dm, method)(*(getattr(args, name) for name, _ in params))
            result = {"op": method, "result": value}
            out = lambda r: print(r["result"] if r["result"] is not None else "ok")  # noqa: E731
    except (XenError, ArgumentError) as e:
        if args.json:
            print(json.dumps({"error": str(e), "errno": getattr(e, "errno", None)}))
        else:
            print(f"xendmop: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        out(result)
    return 0
