"""Backends: how DMOPs reach Xen.  All share the device interface of ``device``."""

from .base import Backend, Limits
from .device import Device, OsDevice, open_device
from .privcmd import PrivcmdBackend

__all__ = ["Backend", "Device", "Limits", "OsDevice", "PrivcmdBackend", "open_device"]
