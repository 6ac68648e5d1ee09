"""Errors of the deprivilege steps.

``DeprivError`` is an ``OSError``: each step is a syscall (or a check of one) that the
kernel refused or that did not take effect, and the error keeps the errno (``None``
when a step "succeeded" but its verification found it had not taken effect) and
names the step or handle.  Configuration mistakes found before anything is changed
raise ``DeprivConfigError`` (a ``ValueError``), never an ``OSError``.

After a ``DeprivError`` the process is in an unknown, partly deprivileged state:
the only safe thing to do is to exit (see ``xendmop.depriv.fail_closed``).
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = ["DeprivConfigError", "DeprivError", "DropError", "RestrictError", "VerifyError"]


class DeprivError(OSError):
    """A deprivilege step failed or did not verify.  ``step`` names it."""

    step: str

    def __init__(self, step: str, err: int | None, why: str) -> None:
        if err is None:
            super().__init__(f"{step}: {why}")
        else:
            super().__init__(err, f"{step}: {why} ({os.strerror(err)} [{_errno.errorcode.get(err, err)}])")
        self.step = step
        self.why = why

    def __str__(self) -> str:
        return str(self.strerror if self.errno is not None else self.args[0])


class RestrictError(DeprivError):
    """Restricting or neutering one handle failed.

    ``handle`` names the handle (or fd); ``failures`` lists every handle that failed
    as ``(handle, errno, why)``: ``restrict_all`` tries all of them before raising."""

    def __init__(
        self, handle: str, err: int | None, why: str, failures: list[tuple[str, int | None, str]] | None = None
    ) -> None:
        super().__init__(f"restrict {handle}", err, why)
        self.handle = handle
        self.failures = failures if failures is not None else [(handle, err, why)]

    def __str__(self) -> str:
        first = super().__str__()
        more = len(self.failures) - 1
        return first if more <= 0 else f"{first} (and {more} more: {', '.join(h for h, _, _ in self.failures[1:])})"


class DropError(DeprivError):
    """A privilege-drop step (``chroot``, ``setresuid``, ``rlimit:NOFILE``, …) was refused."""


class VerifyError(DropError):
    """A step returned success but re-reading the state shows it did not take effect,
    or an action that must now be impossible (``setuid(0)``) succeeded."""


class DeprivConfigError(ValueError):
    """The configuration is unusable (uid 0, missing or non-empty chroot directory, …);
    raised before any step is taken."""
