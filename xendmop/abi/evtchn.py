"""Mirror of Linux ``include/uapi/xen/evtchn.h`` (``/dev/xen/evtchn``).

Provenance: Linux 6.1 UAPI (Debian 12 ``linux-libc-dev``, ``/usr/include/xen/evtchn.h``);
``ioctl_evtchn_bind``/``IOCTL_EVTCHN_BIND_STATIC`` are newer (see ``PROVENANCE``).
"""

from __future__ import annotations

import ctypes
from ctypes import c_uint

from .ioctl import _IOC, _IOC_NONE
from .xen import domid_t

HEADERS = ("xen/evtchn.h",)

#: the device node (Linux drivers/xen/evtchn.c); defined here once
EVTCHN_PATH = "/dev/xen/evtchn"
COMPLETE = True

PROVENANCE = {
    "ioctl_evtchn_bind": "Linux 6.2 include/uapi/xen/evtchn.h",
    "IOCTL_EVTCHN_BIND_STATIC": "Linux 6.2 include/uapi/xen/evtchn.h",
}


class ioctl_evtchn_bind_virq(ctypes.Structure):
    _fields_ = [("virq", c_uint)]


class ioctl_evtchn_bind_interdomain(ctypes.Structure):
    _fields_ = [("remote_domain", c_uint), ("remote_port", c_uint)]


class ioctl_evtchn_bind_unbound_port(ctypes.Structure):
    _fields_ = [("remote_domain", c_uint)]


class ioctl_evtchn_unbind(ctypes.Structure):
    _fields_ = [("port", c_uint)]


class ioctl_evtchn_notify(ctypes.Structure):
    _fields_ = [("port", c_uint)]


class ioctl_evtchn_restrict_domid(ctypes.Structure):
    _fields_ = [("domid", domid_t)]


class ioctl_evtchn_bind(ctypes.Structure):
    _fields_ = [("port", c_uint)]


_E = "E"
IOCTL_EVTCHN_BIND_VIRQ = _IOC(_IOC_NONE, _E, 0, ctypes.sizeof(ioctl_evtchn_bind_virq))
IOCTL_EVTCHN_BIND_INTERDOMAIN = _IOC(_IOC_NONE, _E, 1, ctypes.sizeof(ioctl_evtchn_bind_interdomain))
IOCTL_EVTCHN_BIND_UNBOUND_PORT = _IOC(_IOC_NONE, _E, 2, ctypes.sizeof(ioctl_evtchn_bind_unbound_port))
IOCTL_EVTCHN_UNBIND = _IOC(_IOC_NONE, _E, 3, ctypes.sizeof(ioctl_evtchn_unbind))
IOCTL_EVTCHN_NOTIFY = _IOC(_IOC_NONE, _E, 4, ctypes.sizeof(ioctl_evtchn_notify))
IOCTL_EVTCHN_RESET = _IOC(_IOC_NONE, _E, 5, 0)
IOCTL_EVTCHN_RESTRICT_DOMID = _IOC(_IOC_NONE, _E, 6, ctypes.sizeof(ioctl_evtchn_restrict_domid))
IOCTL_EVTCHN_BIND_STATIC = _IOC(_IOC_NONE, _E, 7, ctypes.sizeof(ioctl_evtchn_bind))
