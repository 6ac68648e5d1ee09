"""What a DeviceModel needs from a backend."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from ..checks import check_domid
from ..errors import ArgumentError
from ..ops import OpDecl, caller_memory
from .device import Opener

#: an extent of modified_memory_bulk (``struct xen_dm_op_modified_memory_extent``): the
#: smallest piece a split call carries, so a buffer must hold at least one
_MIN_BUF_SIZE = 16


class Limits:
    """Linux privcmd's module parameters ``dm_op_max_nr_bufs`` and ``dm_op_buf_max_size``
    (``drivers/xen/privcmd.c``; 16 and 4096 unless the kernel was booted with others).

    An immutable value, compared and hashed by its two fields.  A plain class rather than
    a dataclass: ``import xendmop`` then needs no ``dataclasses`` (and its ``inspect``).
    ``max_nr_bufs`` must be at least 1 (the op itself is a buffer), ``max_buf_size`` at
    least 16 (one extent of ``modified_memory_bulk``, which is split to fit); anything
    else raises ``ArgumentError``, a non-int ``TypeError``, each naming field and value.
    """

    __slots__ = ("max_buf_size", "max_nr_bufs")
    max_nr_bufs: int
    max_buf_size: int

    def __init__(self, max_nr_bufs: int = 16, max_buf_size: int = 4096) -> None:
        for name, value, least in (("max_nr_bufs", max_nr_bufs, 1), ("max_buf_size", max_buf_size, _MIN_BUF_SIZE)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"Limits: {name}={value!r}: must be an int")
            if value < least:
                raise ArgumentError("Limits", name, value, f"must be at least {least}")
            object.__setattr__(self, name, int(value))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Limits is immutable: cannot set {name}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Limits is immutable: cannot delete {name}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Limits):
            return NotImplemented
        return (self.max_nr_bufs, self.max_buf_size) == (other.max_nr_bufs, other.max_buf_size)

    def __hash__(self) -> int:
        return hash((Limits, self.max_nr_bufs, self.max_buf_size))

    def __repr__(self) -> str:
        return f"Limits(max_nr_bufs={self.max_nr_bufs}, max_buf_size={self.max_buf_size})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Limits, (self.max_nr_bufs, self.max_buf_size))


class Backend(Protocol):
    """Everything a ``DeviceModel`` asks of a backend.  A backend with nothing faster than
    ``dm_op`` subclasses this to take the generic ``compile_call`` and ``compile_entry``."""

    name: str
    limits: Limits
    #: how the host the backend reaches opens its devices, when that is not the real
    #: ``/dev/xen`` (a mock host's): an ``IoreqServer`` on the same handle opens there too
    host_opener: Opener | None = None
    #: the directory the backend loaded Xen's C libraries from (libxen), for the runtime's
    #: libxen handles; None for the loader's own search, and on a backend without libraries
    libdir: str | None = None

    def dm_op(
        self, decl: OpDecl, domid: int, fields: Mapping[str, int], slot_data: Sequence[Any] = ()
    ) -> tuple[Any, list[bytes]]:
        """Issue one DMOP; return the op struct as Xen left it and every OUT slot's bytes."""
        ...

    def compile_call(
        self, decl: OpDecl, params: Sequence[str], slot_params: Sequence[str] = ()
    ) -> Callable[..., tuple[Any, list[Any]]]:
        """One op's call, ``call(domid, *values, *slot_data)`` -> ``(op struct or None, OUT
        slot data)``: ``params`` name the fields passed, in order (the others are 0);
        ``slot_params`` the slot arguments, as errors name them (by default the slots' own
        names).  An OUT slot takes ``None`` (its answer comes back as ``bytes``) or a
        writable buffer that gets the answer and comes back itself.  Made once per handle
        and op.  By default the generic call over ``dm_op`` (``generic_call``)."""
        return generic_call(self, decl, params, slot_params)

    def compile_entry(
        self,
        decl: OpDecl,
        params: Sequence[tuple[str, str]],
        slot_param: str | None,
        name: str,
        general: Callable[..., Any],
    ) -> Callable[..., Any] | None:
        """A public method's common form as one function with the method's signature
        (``params``: its ``(argument, field)`` pairs after ``domid``; ``slot_param``: its
        buffer argument), which calls ``general`` for every other form; or None, and the
        method runs as written.  None by default."""
        return None

    def restrict(self, domid: int) -> None: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def generic_call(
    backend: Backend, decl: OpDecl, params: Sequence[str], slot_params: Sequence[str] = ()
) -> Callable[..., tuple[Any, list[Any]]]:
    """The op's call through ``backend.dm_op``, taking the slot data ``compile_call``'s calls
    take: a caller's buffer for an OUT slot is checked before the call (writable, large
    enough) and gets the backend's bytes after it."""
    n = len(params)
    names = tuple(slot_params) or tuple(slot.name for slot in decl.slots)

    def call(domid: int, *args: Any) -> tuple[Any, list[Any]]:
        fields = dict(zip(params, args[:n]))
        check_domid(decl.name, domid)
        decl.check(fields)
        slot_data = list(args[n:])
        targets: list[tuple[int, Any, int]] = []  # (index among OUT slots, buffer, address)
        outs_seen = 0
        for index, (slot, name, data) in enumerate(zip(decl.slots, names, slot_data)):
            if slot.is_out and data is not None:
                address, size, _keep = caller_memory(decl.name, name, data, writable=True)
                needed = slot.nbytes(decl.struct(**fields))
                if size < needed:
                    raise ArgumentError(decl.name, name, size, f"must hold at least {needed} bytes")
                targets.append((outs_seen, data, address))
                slot_data[index] = None
            outs_seen += slot.is_out
        struct, outs = backend.dm_op(decl, domid, fields, slot_data)
        for out_index, buffer, address in targets:
            answer = outs[out_index]
            if answer:
                ctypes.memmove(address, answer, len(answer))
            outs[out_index] = buffer
        return struct, outs

    return call
