"""What a DeviceModel needs from a backend."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..ops import OpDecl


@dataclass(frozen=True)
class Limits:
    """Linux privcmd's module parameters ``dm_op_max_nr_bufs`` and ``dm_op_buf_max_size``."""

    max_nr_bufs: int = 16
    max_buf_size: int = 4096


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
