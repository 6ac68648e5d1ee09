"""The runtime's event-channel and foreign-memory handles over Xen's C libraries.

``LibxenEventChannel`` (``libxenevtchn.so.1``) and ``LibxenForeignMemory``
(``libxenforeignmemory.so.1``) have the methods and raise the errors of
``xendmop.runtime.EventChannel`` and ``xendmop.runtime.ForeignMemory``: same
argument checks before any call (``ArgumentError``/``TypeError``), same ``XenError``
(op name, domid, arguments shown, layer ``"evtchn"``/``"privcmd"``, errno) when the
library returns -1, ``ClosedHandleError`` after ``close``.  Every function is declared
from its prototype in ``xenevtchn.h``/``xenforeignmemory.h`` (Xen 4.17) and loaded with
``use_errno``; one the installed library lacks (``xenforeignmemory_map_resource``
before Xen 4.11, ``*_restrict`` before 4.8) raises ``MissingFunctionError`` naming it,
with errno EOPNOTSUPP, so ``IoreqServer`` falls back to legacy gfns exactly as for a
kernel without resource mapping.  Both handles register with libxentoolcore, so
``xentoolcore_restrict_all`` restricts them too.

Differences the libraries impose:
- libxenevtchn has no reset and no call for several pending ports: ``reset`` issues
  ``IOCTL_EVTCHN_RESET`` and ``pending_ports`` reads the handle's fd, as
  ``xenevtchn_pending`` reads it for one port;
- ``map`` retries frames the kernel reports paged out (``ENOENT``) inside the library,
  where ``ForeignMemory.map`` raises; the mmap and the ioctl of a mapping fail as one
  call, so a failing mmap is reported under the mapping's op name;
- libxenforeignmemory exposes no fd: there is no ``fileno``.

Mapped memory is a ``memoryview`` over the pointer the library returned (no copy).
Unmapping while a view of it is alive would leave Python pointing at unmapped memory,
so ``LibxenMapping.close`` refuses with ``BufferError`` (as ``mmap.close`` does) until
every view and slice is released; ``close`` of the handle defers such mappings, and the
library handle itself, until their last view goes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import weakref
from collections.abc import Callable, Sequence
from ctypes import POINTER, byref, c_int, c_size_t, c_uint, c_uint32, c_ulong, c_void_p
from functools import lru_cache
from typing import Any

from ..abi.evtchn import IOCTL_EVTCHN_RESET
from ..abi.memory import XENMEM_resource_ioreq_server
from ..abi.xen import DOMID_FIRST_RESERVED, domid_t, evtchn_port_t, xen_pfn_t
from ..checks import MAX_PENDING_PORTS, check_domid, check_int, check_port
from ..errors import ArgumentError, NotXenHostError, XenError, xen_error
from ..handle import OwnedHandle
from .device import EVTCHN_PATH, NOT_XEN, PAGE_SIZE, PRIVCMD_PATH, FrameViews
from .libxen import SONAMES, MissingFunctionError, QuietLogger, _describe_library, declare, load_library

__all__ = [
    "EVTCHN_PROTOTYPES",
    "FOREIGNMEMORY_PROTOTYPES",
    "LibxenEventChannel",
    "LibxenForeignMemory",
    "LibxenMapping",
]

#: frames per map call (as ``ForeignMemory``: keep calls small; the library refuses > INT_MAX)
MAX_BATCH = 1 << 20
_h = c_void_p

#: ``xenevtchn_<name>``: (restype, argtypes), from ``xenevtchn.h``.
EVTCHN_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "open": (c_void_p, [c_void_p, c_uint]),
    "close": (c_int, [_h]),
    "fd": (c_int, [_h]),
    "notify": (c_int, [_h, evtchn_port_t]),
    "bind_unbound_port": (c_int, [_h, c_uint32]),
    "bind_interdomain": (c_int, [_h, c_uint32, evtchn_port_t]),
    "unbind": (c_int, [_h, evtchn_port_t]),
    "pending": (c_int, [_h]),
    "unmask": (c_int, [_h, evtchn_port_t]),
    "restrict": (c_int, [_h, domid_t]),
}

#: ``xenforeignmemory_<name>``: (restype, argtypes), from ``xenforeignmemory.h``.
FOREIGNMEMORY_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "open": (c_void_p, [c_void_p, c_uint]),
    "close": (c_int, [_h]),
    "map": (c_void_p, [_h, c_uint32, c_int, c_size_t, POINTER(xen_pfn_t), POINTER(c_int)]),
    "unmap": (c_int, [_h, c_void_p, c_size_t]),
    "restrict": (c_int, [_h, domid_t]),
    "map_resource": (
        c_void_p,
        [_h, domid_t, c_uint, c_uint, c_ulong, c_ulong, POINTER(c_void_p), c_int, c_int],
    ),
    "unmap_resource": (c_int, [_h, c_void_p]),
}


class _Library:
    """One loaded library, its declared functions, a quiet logger and one open handle."""

    def __init__(
        self, key: str, prefix: str, prototypes: dict[str, tuple[Any, list[Any]]], libdir: str | None, path: str
    ) -> None:
        self.soname = SONAMES[key]
        self.prefix = prefix
        self.lib = load_library(self.soname, libdir)
        self.functions: dict[str, Any] = {}
        self.missing: list[str] = []
        for short, (restype, argtypes) in prototypes.items():
            function = declare(self.lib, prefix + short, restype, argtypes)
            if function is None:
                self.missing.append(prefix + short)
            else:
                self.functions[short] = function
        if "open" not in self.functions or "close" not in self.functions:
            raise FileNotFoundError(errno.ENOENT, f"{self.soname} lacks {prefix}open/close", self.soname)
        self.logger = QuietLogger(libdir)
        ctypes.set_errno(0)
        handle = self.functions["open"](self.logger.pointer, 0)  # flags 0: the library opens the device O_CLOEXEC
        if not handle:
            err = ctypes.get_errno() or errno.EIO
            self.logger.destroy()
            if err in NOT_XEN:
                raise NotXenHostError(err, f"{prefix}open: not a Xen host ({os.strerror(err)})", path)
            raise OSError(err, f"{prefix}open: {os.strerror(err)}", path)
        self.handle: int | None = handle

    def function(self, short: str, op: str, domid: int | None) -> Any:
        function = self.functions.get(short)
        if function is None:
            raise MissingFunctionError(self.prefix + short, self.soname, op, domid)
        return function

    def close(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            self.functions["close"](handle)
            self.logger.destroy()

    def describe(self) -> dict[str, Any]:
        return {**_describe_library(self.lib, self.soname, self.prefix + "open"), "missing": list(self.missing)}


# --- event channels -------------------------------------------------------------------------


class LibxenEventChannel(OwnedHandle[_Library]):
    """A ``xenevtchn_handle``: the methods of ``runtime.EventChannel`` through libxenevtchn.

    The handle's fd is switched to non-blocking so ``pending`` never blocks (the loop
    polls ``fileno()`` first, as QEMU does with ``xenevtchn_fd``)."""

    def __init__(self, libdir: str | os.PathLike[str] | None = None) -> None:
        self.libdir = None if libdir is None else os.fspath(libdir)
        super().__init__(_Library("evtchn", "xenevtchn_", EVTCHN_PROTOTYPES, self.libdir, EVTCHN_PATH))
        self.restricted_to: int | None = None
        try:
            fd = self.fileno()
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        except BaseException:
            self.close()
            raise

    @property
    def _open(self) -> _Library:
        return self._use()

    def _call(self, short: str, op: str, domid: int | None, *args: Any, **shown: int) -> int:
        lib = self._use(op)
        function = lib.function(short, op, domid)
        ctypes.set_errno(0)
        result = int(function(lib.handle, *args))
        if result < 0:
            raise xen_error(ctypes.get_errno() or errno.EIO, op, domid, shown, layer="evtchn")
        return result

    def fileno(self) -> int:
        """``xenevtchn_fd``: the fd to poll, readable while a bound port is pending."""
        lib = self._open
        return int(lib.function("fd", "fileno", None)(lib.handle))

    # close (``xenevtchn_close``: the kernel unbinds every port this handle bound), closed,
    # with: OwnedHandle's

    def __repr__(self) -> str:
        return f"<LibxenEventChannel {'closed' if self._resource is None else f'fd={self.fileno()}'}>"

    def describe(self) -> dict[str, Any]:
        return self._open.describe()

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        """``xenevtchn_bind_interdomain``: connect to ``domid``'s unbound ``remote_port``;
        returns the local port.  EACCES on a handle restricted to another domain."""
        check_domid("bind_interdomain", domid)
        check_port("bind_interdomain", remote_port)
        return self._call("bind_interdomain", "bind_interdomain", domid, domid, remote_port, remote_port=remote_port)

    def bind_unbound_port(self, domid: int) -> int:
        """``xenevtchn_bind_unbound_port``: a new local port ``domid`` may bind; returns it."""
        check_domid("bind_unbound_port", domid)
        return self._call("bind_unbound_port", "bind_unbound_port", domid, domid)

    def unbind(self, port: int) -> None:
        """``xenevtchn_unbind``: ENOTCONN for a port this handle did not bind."""
        check_port("unbind", port)
        self._call("unbind", "unbind", None, port, port=port)

    def notify(self, port: int) -> None:
        """``xenevtchn_notify``: raise the remote end of local ``port`` (ENOTCONN if not ours)."""
        check_port("notify", port)
        self._call("notify", "notify", None, port, port=port)

    def reset(self) -> None:
        """IOCTL_EVTCHN_RESET on the handle's fd (libxenevtchn exports no reset): empty
        the pending ring after an EFBIG overflow."""
        try:
            fcntl.ioctl(self.fileno(), IOCTL_EVTCHN_RESET, 0)
        except OSError as e:
            raise xen_error(e.errno or errno.EIO, "reset", None, {}, layer="evtchn") from None

    def restrict(self, domid: int) -> None:
        """``xenevtchn_restrict`` (IOCTL_EVTCHN_RESTRICT_DOMID): only interdomain binds to
        ``domid`` from now on (once per handle: EACCES the second time)."""
        check_domid("restrict", domid, guest_only=True)
        if domid == 0:
            raise ArgumentError("restrict", "domid", domid, "must be a guest domid, not dom0")
        self._call("restrict", "restrict", domid, domid)
        self.restricted_to = domid

    def pending(self) -> int | None:
        """``xenevtchn_pending``: one pending port, or None when none is pending.  The port
        stays masked until ``unmask``; EFBIG means the ring overflowed."""
        lib = self._open
        function = lib.function("pending", "pending", None)
        ctypes.set_errno(0)
        port = int(function(lib.handle))
        if port >= 0:
            return port
        err = ctypes.get_errno()
        if err in (0, errno.EAGAIN, errno.EWOULDBLOCK):  # 0: a short read, as EventChannel treats it
            return None
        raise xen_error(err, "pending", layer="evtchn")

    def pending_ports(self, limit: int) -> list[int]:
        """Up to ``limit`` pending ports in one ``read`` of the handle's fd (``[]`` when none
        is pending).  Each port stays masked until ``unmask``; EFBIG: the ring overflowed."""
        check_int("pending_ports", "limit", limit, 1, MAX_PENDING_PORTS)
        try:
            raw = os.read(self.fileno(), 4 * limit)
        except BlockingIOError:
            return []
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return []
            raise xen_error(e.errno or errno.EIO, "pending", layer="evtchn") from None
        usable = len(raw) & ~3
        return memoryview(raw)[:usable].cast("I").tolist() if usable else []

    def unmask(self, port: int) -> None:
        """``xenevtchn_unmask``: write ``port`` back so it can fire again."""
        check_port("unmask", port)
        lib = self._use("unmask")
        function = lib.function("unmask", "unmask", None)
        ctypes.set_errno(0)
        if function(lib.handle, port) != 0:
            raise xen_error(ctypes.get_errno() or errno.EIO, "unmask", args={"port": port}, layer="evtchn")


# --- foreign memory ---------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _pages_type(nbytes: int) -> type[ctypes.Array[ctypes.c_char]]:
    # A Python subclass, so that instances take weak references (the array types do not).
    return type(f"Pages{nbytes}", (ctypes.c_char * nbytes,), {})


class LibxenMapping(FrameViews):
    """Foreign frames the library mapped.  ``view`` is the live memory (no copy);
    ``errors[i]`` is 0 or the ``-errno`` for frame ``i`` (``map`` only).

    Every view and slice taken from ``view`` keeps one ctypes array alive; the mapping
    watches it through a weak reference, so it knows when none is left."""

    def __init__(
        self, domid: int, nr_frames: int, address: int, unmap: Callable[[], None], errors: tuple[int, ...] = ()
    ) -> None:
        self.domid = domid
        self.nr_frames = nr_frames
        self.errors = errors
        self.address = address
        pages = _pages_type(nr_frames * PAGE_SIZE).from_address(address)
        self._pages = weakref.ref(pages)
        self.view = memoryview(pages).cast("B")  # bytes, as an mmap's view; the only strong reference to ``pages``
        self._unmap: Callable[[], None] | None = self._unmapping(unmap)
        self._unmapped = False

    def _unmapping(self, unmap: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            self._unmapped = True
            unmap()

        return run

    @property
    def closed(self) -> bool:
        """Unmapped (not only asked to be)."""
        return self._unmapped

    def _drop_view(self) -> Any:
        """Release ``view``; return the pages if some other view still holds them."""
        self.view.release()  # BufferError if something holds a buffer of ``view`` itself
        return self._pages()

    def close(self) -> None:
        """Unmap.  ``BufferError`` (nothing unmapped) while a view or slice of it is alive."""
        unmap = self._unmap
        if unmap is None:
            return
        pages = self._drop_view()
        if pages is not None:
            self.view = memoryview(pages).cast("B")
            raise BufferError(f"dom{self.domid} mapping of {self.nr_frames} frames: views are still alive")
        self._unmap = None
        unmap()

    def close_when_released(self) -> None:
        """Unmap now, or as soon as the last view or slice is released."""
        unmap, self._unmap = self._unmap, None
        if unmap is None:
            return
        try:
            pages = self._drop_view()
        except BufferError:
            pages = self._pages()
        if pages is None:
            unmap()
        else:
            weakref.finalize(pages, unmap)


class _Owner:
    """The foreign-memory C handle, closed when closing was asked and no mapping is left."""

    def __init__(self, lib: _Library) -> None:
        self.lib = lib
        self.mappings = 0
        self.closing = False

    def release_one(self) -> None:
        self.mappings -= 1
        self.maybe_close()

    def maybe_close(self) -> None:
        if self.closing and self.mappings == 0:
            self.lib.close()

    def close(self) -> None:
        """Close the C handle now, or when the last mapping goes."""
        self.closing = True
        self.maybe_close()


class LibxenForeignMemory(OwnedHandle[_Owner]):
    """A ``xenforeignmemory_handle``: the methods of ``runtime.ForeignMemory`` through
    libxenforeignmemory; mappings are ``LibxenMapping`` objects."""

    def __init__(self, libdir: str | os.PathLike[str] | None = None) -> None:
        self.libdir = None if libdir is None else os.fspath(libdir)
        lib = _Library("foreignmemory", "xenforeignmemory_", FOREIGNMEMORY_PROTOTYPES, self.libdir, PRIVCMD_PATH)
        super().__init__(_Owner(lib))
        self._maps: list[LibxenMapping] = []
        self.restricted_to: int | None = None

    @property
    def _open(self) -> _Owner:
        return self._use()

    def _failed(self, op: str, domid: int, shown: dict[str, int]) -> XenError:
        return xen_error(ctypes.get_errno() or errno.EIO, op, domid, shown, layer="privcmd")

    def _track(self, owner: _Owner, unmap: Callable[[], object]) -> Callable[[], None]:
        owner.mappings += 1

        def release() -> None:
            try:
                unmap()
            finally:
                owner.release_one()

        return release

    def map_resource(
        self, domid: int, type: int = XENMEM_resource_ioreq_server, id: int = 0, frame: int = 0, nr_frames: int = 1
    ) -> LibxenMapping:
        """``xenforeignmemory_map_resource`` (XENMEM_acquire_resource): map ``nr_frames``
        frames of resource ``type``/``id`` from ``frame`` (ioreq server: frame 0 is the
        buffered page, 1 the synchronous page).  EOPNOTSUPP: no resource mapping here
        (old Xen, old kernel, or a library before Xen 4.11: ``MissingFunctionError``);
        ENOENT: no such frame (e.g. bufioreq off)."""
        check_int("map_resource", "domid", domid, 0, 0xFFFF)
        for name, value, top in (("type", type, 0xFFFF), ("id", id, 0xFFFFFFFF), ("frame", frame, 0xFFFFFFFF)):
            check_int("map_resource", name, value, 0, top)
        check_int("map_resource", "nr_frames", nr_frames, 1, 0xFFFFFFFF)
        owner = self._open
        lib = owner.lib
        map_resource = lib.function("map_resource", "map_resource", domid)
        unmap_resource = lib.function("unmap_resource", "map_resource", domid)
        address = c_void_p(None)  # NULL: the library picks the address (it mmaps, then IOCTL_PRIVCMD_MMAP_RESOURCE)
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        ctypes.set_errno(0)
        fres = map_resource(lib.handle, domid, type, id, frame, nr_frames, byref(address), prot, mmap.MAP_SHARED)
        if not fres or not address.value:
            raise self._failed("map_resource", domid, {"type": type, "id": id, "frame": frame, "nr": nr_frames})
        release = self._track(owner, lambda: unmap_resource(lib.handle, fres))
        return self._keep(LibxenMapping(domid, nr_frames, address.value, release))

    def map(self, domid: int, gfns: Sequence[int]) -> LibxenMapping:
        """``xenforeignmemory_map`` (IOCTL_PRIVCMD_MMAPBATCH_V2): map guest frames ``gfns``
        contiguously.  Per-frame failures do not raise: they are in
        ``LibxenMapping.errors`` (``-errno`` per frame).  Raises when the whole call fails."""
        check_int("map", "domid", domid, 0, 0xFFFF)
        n = len(gfns)
        check_int("map", "len(gfns)", n, 1, MAX_BATCH)
        arr = (xen_pfn_t * n)()
        for i, gfn in enumerate(gfns):
            arr[i] = check_int("map", f"gfns[{i}]", gfn, 0, (1 << 64) - 1)
        err = (c_int * n)()
        owner = self._open
        lib = owner.lib
        function = lib.function("map", "map", domid)
        unmap = lib.function("unmap", "map", domid)
        ctypes.set_errno(0)
        address = function(lib.handle, domid, mmap.PROT_READ | mmap.PROT_WRITE, n, arr, err)
        if not address:
            raise self._failed("map", domid, {"nr": n})
        release = self._track(owner, lambda: unmap(lib.handle, address, n))
        return self._keep(LibxenMapping(domid, n, address, release, tuple(int(e) for e in err)))

    def unmap(self, mapping: LibxenMapping) -> None:
        """Unmap a mapping made by this handle (``BufferError`` while views of it are alive)."""
        mapping.close()
        if mapping in self._maps:
            self._maps.remove(mapping)

    def _keep(self, m: LibxenMapping) -> LibxenMapping:
        self._maps = [x for x in self._maps if not x.closed]  # closed by their own close()
        self._maps.append(m)
        return m

    def restrict(self, domid: int) -> None:
        """``xenforeignmemory_restrict`` (IOCTL_PRIVCMD_RESTRICT): map only ``domid`` from now on."""
        check_int("restrict", "domid", domid, 0, 0xFFFF)
        if domid >= DOMID_FIRST_RESERVED:
            raise ArgumentError("restrict", "domid", domid, "must be a guest domid (< 0x7ff0)")
        lib = self._open.lib
        function = lib.function("restrict", "restrict", domid)
        ctypes.set_errno(0)
        if function(lib.handle, domid) != 0:
            raise self._failed("restrict", domid, {})
        self.restricted_to = domid

    def describe(self) -> dict[str, Any]:
        return self._open.lib.describe()

    def _release(self, owner: _Owner) -> None:
        """Unmap what this handle mapped, then close the library handle (``close``); a mapping
        whose views are still alive is unmapped (and the handle closed) when they are released."""
        maps, self._maps = self._maps, []
        owner.closing = True
        try:
            for m in maps:
                m.close_when_released()
        finally:
            owner.close()
