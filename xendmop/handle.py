"""The one skeleton of every object that owns an fd or a C library handle.

``EventChannel``, ``ForeignMemory``, ``LibxenEventChannel``, ``LibxenForeignMemory`` and
``DeviceModel`` each own one resource (a device, a library handle, a backend).  They share
what owning it means: ``close`` releases it once and later calls do nothing; ``closed`` says
whether it has been; the object is a context manager that closes on exit; and using it after
``close`` is a ``ClosedHandleError`` (misuse, not an ``OSError``) naming the handle and the call.
"""

from __future__ import annotations

from types import TracebackType
from typing import ClassVar, Generic, Protocol, Self, TypeVar

from .errors import ClosedHandleError


class Closable(Protocol):
    def close(self) -> None: ...


R = TypeVar("R", bound=Closable)


class OwnedHandle(Generic[R]):
    """Owns ``_resource`` until ``close``.  A subclass says what releasing it takes
    (``_release``: unmap its mappings first, say) and how errors name it (``what``)."""

    #: how a ClosedHandleError names the handle ("EventChannel is closed")
    what: ClassVar[str] = ""
    _resource: R | None

    def __init__(self, resource: R) -> None:
        self._resource = resource

    def _use(self, op: str | None = None) -> R:
        """The resource, or ``ClosedHandleError`` naming the handle and ``op``."""
        resource = self._resource
        if resource is None:
            raise ClosedHandleError(f"{self.what or type(self).__name__} is closed", op)
        return resource

    @property
    def closed(self) -> bool:
        return self._resource is None

    def close(self) -> None:
        """Release the resource; a second call does nothing."""
        resource, self._resource = self._resource, None
        if resource is not None:
            self._release(resource)

    def _release(self, resource: R) -> None:
        resource.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
