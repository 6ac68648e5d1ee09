"""Errors: ``XenError`` for what Xen or the kernel refused, plain Python errors for misuse.

``XenError`` is an ``OSError`` that keeps the context an errno alone loses: which
operation, against which domain, with which arguments.  Its subclasses also inherit
the matching builtin, chosen by errno through one table, so ``except PermissionError``
reads naturally.  Misuse of the library (a bad argument, a closed handle) never
reaches a syscall and raises ``ValueError``/``TypeError``/``ClosedHandleError``.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Mapping
from typing import Any

__all__ = [
    "ArgumentError",
    "ClosedHandleError",
    "NotXenHostError",
    "UnsupportedError",
    "XenError",
    "raise_xen_error",
    "xen_error",
]


class XenError(OSError):
    """A refusal from Xen or the dom0 kernel, with the op and domain it concerns."""

    op: str
    domid: int | None
    args_shown: Mapping[str, Any]

    def __init__(
        self,
        err: int,
        op: str,
        domid: int | None = None,
        args: Mapping[str, Any] | None = None,
        layer: str = "dm_op",
    ) -> None:
        super().__init__(err, os.strerror(err))
        self.op = op
        self.domid = domid
        self.args_shown = dict(args or {})
        self.layer = layer

    def __str__(self) -> str:
        parts = [] if self.domid is None else [f"domid={self.domid}"]
        parts += [f"{k}={_show(v)}" for k, v in self.args_shown.items()]
        name = _errno.errorcode.get(self.errno or 0, str(self.errno))
        return f"{self.layer} {self.op}({', '.join(parts)}): {self.strerror} [{name}]"

    def __reduce__(self) -> tuple[Any, ...]:
        return (xen_error, (self.errno, self.op, self.domid, self.args_shown, self.layer))


def _show(value: Any) -> str:
    return hex(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0xFFFF else repr(value)


class XenPermissionError(XenError, PermissionError):
    pass


class XenNotFoundError(XenError, FileNotFoundError):
    pass


class XenProcessLookupError(XenError, ProcessLookupError):
    pass


class XenFileExistsError(XenError, FileExistsError):
    pass


class XenInterruptedError(XenError, InterruptedError):
    pass


class XenBlockingIOError(XenError, BlockingIOError):
    pass


# One table: errno -> subclass.  ENOENT from Xen means "no such server/range";
# FileNotFoundError is what Python users catch for ENOENT, so it is kept.
_BY_ERRNO: dict[int, type[XenError]] = {
    _errno.EPERM: XenPermissionError,
    _errno.EACCES: XenPermissionError,
    _errno.ENOENT: XenNotFoundError,
    _errno.ESRCH: XenProcessLookupError,
    _errno.EEXIST: XenFileExistsError,
    _errno.EINTR: XenInterruptedError,
    _errno.EAGAIN: XenBlockingIOError,
}


def xen_error(
    err: int,
    op: str,
    domid: int | None = None,
    args: Mapping[str, Any] | None = None,
    layer: str = "dm_op",
) -> XenError:
    """Build the ``XenError`` subclass that ``err`` maps to."""
    return _BY_ERRNO.get(err, XenError)(err, op, domid, args, layer)


def raise_xen_error(
    err: int, op: str, domid: int | None = None, args: Mapping[str, Any] | None = None, layer: str = "dm_op"
) -> None:
    raise xen_error(err, op, domid, args, layer)


class ArgumentError(ValueError):
    """A Python argument outside what the ABI can carry; raised before any syscall."""

    def __init__(self, op: str, name: str, value: object, why: str) -> None:
        super().__init__(f"{op}: {name}={value!r}: {why}")
        self.op = op
        self.name = name
        self.value = value


class ClosedHandleError(ValueError):
    """A call on a handle that was already closed; ``op`` names the call when known."""

    def __init__(self, message: str, op: str | None = None) -> None:
        super().__init__(f"{op}: {message}" if op else message)
        self.op = op


class NotXenHostError(OSError):
    """``/dev/xen/privcmd`` could not be opened because this is not a Xen dom0."""


class UnsupportedError(XenError):
    """The backend (kernel, Xen or C library) lacks this operation."""
