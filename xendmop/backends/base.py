"""What a DeviceModel needs from a backend."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ..errors import ArgumentError
from ..ops import OpDecl

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
    name: str
    limits: Limits

    def dm_op(
        self, decl: OpDecl, domid: int, fields: Mapping[str, int], slot_data: Sequence[Any] = ()
    ) -> tuple[Any, list[bytes]]:
        """Issue one DMOP; return the op struct as Xen left it and every OUT slot's bytes."""
        ...

    def restrict(self, domid: int) -> None: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...
