"""xendmop: Xen device-model operations (DMOP) from a Linux dom0, in Python."""

from .backends.base import Limits
from .backends.selection import MockFallbackWarning
from .devicemodel import DeviceModel
from .errors import ArgumentError, ClosedHandleError, NotXenHostError, UnsupportedError, XenError
from .types import BufIoreq, CacheAttr, EventType, HvmMemType, IoRangeType, IoreqServerInfo, MemAccess, ShutdownReason

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "BufIoreq",
    "CacheAttr",
    "ClosedHandleError",
    "DeviceModel",
    "EventType",
    "HvmMemType",
    "IoRangeType",
    "IoreqServerInfo",
    "Limits",
    "MemAccess",
    "MockFallbackWarning",
    "NotXenHostError",
    "ShutdownReason",
    "UnsupportedError",
    "XenError",
    "__version__",
]
