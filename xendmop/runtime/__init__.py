"""Run a device model: ioreq servers, event channels, foreign memory and the dispatch loop."""

from ..abi.ioreq_slot import Ioreq
from .dispatch import Dispatcher, GuestMemory, GuestMemoryError, IoDevice, RateLimitedLog
from .dm_program import Connection, GuestRun, NotHvmError, Target, UsageError
from .evtchn import EventChannel
from .foreignmemory import ForeignMapping, ForeignMemory, GuestRam
from .pci import Bar, PciFunction
from .server import IoreqServer, ServeLoop, serve_forever, serve_forever_async

__all__ = [
    "Connection",
    "GuestRun",
    "NotHvmError",
    "Target",
    "UsageError",
    "Bar",
    "IoreqServer",
    "PciFunction",
    "ServeLoop",
    "serve_forever",
    "serve_forever_async",
    "Dispatcher",
    "EventChannel",
    "ForeignMemory",
    "GuestMemory",
    "GuestMemoryError",
    "GuestRam",
    "IoDevice",
    "Ioreq",
    "ForeignMapping",
    "RateLimitedLog",
]
