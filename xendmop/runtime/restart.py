"""Restart state: what a device model keeps where its successor finds it after a crash.

One file per device model and domain, ``<directory>/dom<N>-<name>.state`` (the directory
defaults to ``DEFAULT_DIRECTORY``, ``/run/xendmop``: tmpfs, gone with the host, as Xen's
servers are), mapped shared into the device model and written in place:

* the ioreq server's id, recorded as soon as Xen gave it (``IoreqServer(on_created=)``),
  before anything else is set up, and its buffered-ioreq mode;
* the device's own state, ``device_size`` bytes, kept twice: ``DeviceState.store`` writes
  the copy that is not current, then makes it current with one aligned 4-byte store, so
  a device model killed in the middle of a store (SIGKILL lands between any two
  instructions) leaves the previous state whole.  No syscall per store: the file's pages
  are the page cache's, which outlive the process.

``RestartState.ioreq_server(dm, ...)`` gives the ``IoreqServer`` to run: one that takes
over the recorded server if Xen still has it (``get_ioreq_server_info`` answers), else a
new one — ``stale`` then says, in one line, why the record was not used (server or
domain gone) and the device state is discarded.  The file is opened, locked (``flock``:
a second device model for the same domain and name is refused, and the lock goes with
the holder's death) and mapped when the object is made, so it keeps working after
``--depriv``/``--chroot``.  A clean stop calls ``clear()``: the record is emptied through
the mapping and the file unlinked if the path is still reachable.

What a takeover guarantees is the ``IoreqServer`` docstring's (``takeover=``) and, for a
device, what it stores: see ``examples/uart16550.py``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..devicemodel import DeviceModel
from ..errors import XenError
from ..types import BufIoreq
from .server import IoreqServer

__all__ = ["DEFAULT_DIRECTORY", "DeviceState", "RestartState", "StateBusyError"]

log = logging.getLogger("xendmop.runtime")

#: where ``--state-dir`` points when given no value
DEFAULT_DIRECTORY = "/run/xendmop"
_MAGIC = b"xdmstat1"
#: the header: magic, domid, server id + 1 (0: none), bufioreq, device size, current copy
#: (0: none, 1 or 2), the device model's name (NUL-padded)
_HEADER = struct.Struct("<8sIIIII4x64s")
_SID, _BUFIOREQ, _CURRENT = 12 // 4, 16 // 4, 24 // 4  # word indexes into the header
_DATA = 128
_NAME_MAX = 64


def _align(n: int) -> int:
    return (n + 63) & ~63


class StateBusyError(RuntimeError):
    """Another live device model holds ``path`` (its ``flock``)."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path}: held by another running device model")
        self.path = path


class DeviceState:
    """The device's state in the file: two copies and which one is current."""

    def __init__(self, view: memoryview, words: memoryview, size: int) -> None:
        self._view = view
        self._words = words
        self.size = size
        self._offsets = (0, _DATA, _DATA + _align(size))

    def load(self) -> bytes | None:
        """The current copy, or None when nothing was stored since the last reset."""
        current = self._words[_CURRENT]
        if current not in (1, 2):
            return None
        off = self._offsets[current]
        return bytes(self._view[off : off + self.size])

    def store(self, layout: struct.Struct, *values: Any) -> None:
        """``layout.pack_into`` the copy that is not current, then make it current (one store)."""
        words = self._words
        nxt = 1 if words[_CURRENT] == 2 else 2
        layout.pack_into(self._view, self._offsets[nxt], *values)
        words[_CURRENT] = nxt  # after the copy: x86 keeps the stores in order (runtime.dispatch)

    def store_bytes(self, data: bytes) -> None:
        """``store`` for bytes already packed (at most ``size``)."""
        if len(data) > self.size:
            raise ValueError(f"device state of {len(data)} bytes: the file holds {self.size}")
        self.store(struct.Struct(f"{len(data)}s"), data)

    def reset(self) -> None:
        """Forget the stored state (a fresh device)."""
        self._words[_CURRENT] = 0

    def detach(self) -> None:
        """From now on store into memory of its own, not the file (the file is being closed)."""
        spare = memoryview(bytearray(_DATA + 2 * _align(self.size)))
        self._view, self._words = spare, spare[:_DATA].cast("I")


class RestartState:
    """``<directory>/dom<domid>-<name>.state``: opened, locked and mapped now (see the module docstring).

    ``device_size``: bytes the device keeps (``device``); 0 for none.
    Raises ``StateBusyError`` when another device model holds the file, ``ValueError`` for
    a bad name or size, ``OSError`` when the directory or file cannot be made."""

    def __init__(self, directory: str | os.PathLike[str], domid: int, name: str, *, device_size: int = 0) -> None:
        if not name or len(name.encode()) > _NAME_MAX or "/" in name or name.startswith("."):
            raise ValueError(f"name={name!r}: expected a file-name part of at most {_NAME_MAX} bytes")
        if isinstance(device_size, bool) or not isinstance(device_size, int) or not 0 <= device_size <= 1 << 20:
            raise ValueError(f"device_size={device_size!r}: expected 0..{1 << 20} bytes")
        if isinstance(domid, bool) or not isinstance(domid, int) or not 0 < domid < 0x7FF0:
            raise ValueError(f"domid={domid!r}: expected a guest domid, 1..{0x7FEF}")
        self.domid = domid
        self.name = name
        self.directory = Path(directory)
        self.path = self.directory / f"dom{domid}-{name}.state"
        #: why the recorded server was not taken over (one line), once ``check`` found it so
        self.stale: str | None = None
        #: the server id taken over, once ``check`` found the recorded one alive
        self.takeover_id: int | None = None
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StateBusyError(self.path) from None
            length = mmap.PAGESIZE * -(-(_DATA + 2 * _align(device_size)) // mmap.PAGESIZE)
            found = os.fstat(fd).st_size
            if found != length:
                if found:
                    self.stale = f"{self.path} is not a state file of this layout ({found} bytes); starting afresh"
                os.ftruncate(fd, 0)
                os.ftruncate(fd, length)
            self._map = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._view = memoryview(self._map)
        self._words = self._view[:_DATA].cast("I")
        magic, fdomid, _sid, _buf, size, _cur, fname = _HEADER.unpack_from(self._view)
        if magic != _MAGIC or fdomid != domid or size != device_size or fname.rstrip(b"\0") != name.encode():
            if magic == _MAGIC and self.stale is None:
                self.stale = f"{self.path} belongs to another device or domain; starting afresh"
            _HEADER.pack_into(self._view, 0, _MAGIC, domid, 0, 0, device_size, 0, name.encode())
        self.device = DeviceState(self._view, self._words, device_size)

    # --- the server record ------------------------------------------------------------------

    @property
    def server_id(self) -> int | None:
        """The recorded ioreq server id, or None."""
        sid = self._words[_SID]
        return sid - 1 if sid else None

    @property
    def bufioreq(self) -> BufIoreq:
        """The recorded server's buffered-ioreq mode."""
        return BufIoreq(self._words[_BUFIOREQ])

    def record(self, server: IoreqServer) -> None:
        """Record ``server``'s id (``IoreqServer(on_created=...)``): its mode, then the id, one store."""
        if server.id is None:
            raise ValueError("record: the server has no id yet")
        self._words[_BUFIOREQ] = int(server.bufioreq)
        self._words[_SID] = server.id + 1

    def check(self, dm: DeviceModel) -> int | None:
        """The recorded server's id if Xen still has it for this domain (``get_ioreq_server_info``
        answers), else None: the record and the device state are then forgotten and ``stale``
        says why (ENOENT: the server is gone; ESRCH: the domain is gone; others as Xen says)."""
        self.takeover_id = None
        sid = self.server_id
        if sid is None:
            self.device.reset()
            return None
        try:
            dm.get_ioreq_server_info(self.domid, sid)
        except XenError as e:
            what = {errno.ENOENT: "the server is gone", errno.ESRCH: "the domain is gone"}.get(e.errno or 0, str(e))
            self.stale = f"{self.path} names ioreq server {sid} of dom{self.domid}, but {what}; starting afresh"
            self._words[_SID] = 0
            self.device.reset()
            return None
        self.takeover_id = sid
        return sid

    def ioreq_server(self, dm: DeviceModel, **options: Any) -> IoreqServer:
        """An ``IoreqServer`` (``options`` as its constructor's) that takes over the recorded
        server when Xen still has it (then in its recorded buffered-ioreq mode), else creates
        one; either way its id is recorded here as soon as it is known."""
        sid = self.check(dm)
        if sid is not None:
            options["bufioreq"] = self.bufioreq
        chained: Callable[[IoreqServer], None] | None = options.pop("on_created", None)

        def on_created(server: IoreqServer) -> None:
            self.record(server)
            if chained is not None:
                chained(server)

        return IoreqServer(dm, self.domid, takeover=sid, on_created=on_created, **options)

    # --- the end ------------------------------------------------------------------------------

    def clear(self) -> None:
        """A clean stop (the server destroyed): empty the record through the mapping, which works
        after a privilege drop or chroot too, then unlink the file if its path is reachable."""
        if self._map.closed:
            return
        self._words[_SID] = 0
        self.device.reset()
        try:
            os.unlink(self.path)
        except OSError as e:  # chrooted or deprivileged: the emptied record says "none"
            log.debug("%s: not removed (%s); its record is emptied", self.path, e)

    def close(self) -> None:
        """Unmap and close (the lock goes with the fd); the file stays as it is."""
        if self._map.closed:
            return
        self.device.detach()
        self._words.release()
        self._view.release()
        self._map.close()
        os.close(self._fd)

    def __enter__(self) -> RestartState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RestartState {self.path} server={self.server_id}>"
