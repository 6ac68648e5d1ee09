"""The backend's Xenstore handshake for Xen 4.17's virtio-mmio disks (``backendtype=standalone``).

xl 4.17 makes an Arm guest's virtio-mmio slots only from disks with ``specification=virtio``
(the generic ``virtio = [...]`` came in 4.18), and for such a disk ``xl create`` waits up to
10 s for the backend's ``state`` node to reach InitWait: a standalone disk is no QEMU backend,
so ``libxl__wait_device_connection`` (tools/libs/light/libxl_device.c) waits for it with
``LIBXL_INIT_TIMEOUT``.  At teardown libxl writes Closing and waits for Closed.  A device model
cannot answer this itself: it starts after ``xl create -p`` returns, and a deprivileged one
keeps no Xenstore connection.  ``StandaloneBackends`` is the small watcher that does, run beside
``xl create`` (``xendmop virtio-disk-backends``).  States are xen/include/public/io/xenbus.h's.

It uses the ``xenstore-ls``/``xenstore-write`` tools in child processes, as the rest of
xendmop reads Xenstore (``runtime.dm_program``): no Xenstore fd stays open here.
"""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["ROOT", "StandaloneBackends"]

#: where libxl puts a dom0-backed standalone virtio disk (``LIBXL__DEVICE_KIND_VIRTIO_DISK``)
ROOT = "/local/domain/0/backend/virtio_disk"
INITIALISING, INIT_WAIT, CLOSING, CLOSED = "1", "2", "5", "6"
_ANSWER = {INITIALISING: INIT_WAIT, CLOSING: CLOSED}
_STATE = re.compile(r'^(/\S+)/state = "([0-9]+)"$')

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def _run(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=10, check=False)


class StandaloneBackends:
    """Answer libxl for every standalone virtio disk under ``root``: Initialising → InitWait
    when it adds one, Closing → Closed when it removes one.  ``poll()`` once, or ``start()`` a
    thread that polls every ``interval`` seconds until ``stop()``; ``answered`` lists what was
    written, as ``"PATH: OLD -> NEW"``."""

    def __init__(self, root: str = ROOT, *, run: Runner = _run, interval: float = 0.1) -> None:
        if not root.startswith("/"):
            raise ValueError(f"root={root!r}: must be an absolute Xenstore path")
        self.root = root.rstrip("/")
        self.run = run
        self.interval = interval
        self.answered: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> int:
        """One pass over ``root``; returns how many states it answered."""
        listing = self.run(["xenstore-ls", "-f", self.root])
        if listing.returncode != 0:
            return 0  # nothing there yet (no such directory): no disk to answer
        done = 0
        for line in listing.stdout.splitlines():
            m = _STATE.match(line.strip())
            if m is None or not m.group(1).startswith(self.root + "/"):
                continue
            path, state = m.groups()
            answer = _ANSWER.get(state)
            if answer is None:
                continue
            wrote = self.run(["xenstore-write", f"{path}/state", answer])
            if wrote.returncode == 0:
                self.answered.append(f"{path}: {state} -> {answer}")
                done += 1
            else:
                self.errors = [*self.errors[-15:], f"{path}/state: {wrote.stderr.strip() or wrote.returncode}"]
        return done

    def start(self) -> StandaloneBackends:
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._loop, name="virtio-disk-backends", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> StandaloneBackends:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
