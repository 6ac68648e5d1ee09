"""The mock Xen as a separate host process, and the clients that reach it over a socket.

``MockHostServer(xen, path)`` serves one ``MockXen`` on a unix ``SOCK_SEQPACKET`` socket
(``xendmop mock-host --socket PATH``); ``RemoteXen(path)`` (or ``connect_from_env()``, which
reads ``XENDMOP_MOCK_SOCKET``) opens its devices from another process, and ``RemoteGuest``
drives a guest's vCPUs there.  The protocol is described once, in
``docs/mock-host-protocol.md``.

One module per job: ``wire`` (message kinds, layouts, framing), ``server`` (the host:
connections, client memory, the host's bounds), ``admin`` (``CALL`` requests), ``client``
(``RemoteXen`` and its devices), ``guest`` (``RemoteGuest``).  The host's bounds are read
from ``xendmop.mock.remote.server`` at each use: set them there.
"""

from __future__ import annotations

from .client import RemoteDevice, RemoteEvtchn, RemotePrivcmd, RemoteXen, connect_from_env
from .guest import RemoteGuest
from .server import (
    IDLE_TIMEOUT,
    MAX_CLIENTS,
    MAX_CLIENTS_PER_UID,
    MAX_COPY,
    MAX_MAP_COUNT,
    MEMORY_TIMEOUT,
    ClientInfo,
    MockHostServer,
)
from .wire import ENV_SOCKET, MAX_MESSAGE, MockHostError, Msg

__all__ = [
    "ENV_SOCKET",
    "IDLE_TIMEOUT",
    "MAX_CLIENTS",
    "MAX_CLIENTS_PER_UID",
    "MAX_COPY",
    "MAX_MAP_COUNT",
    "MAX_MESSAGE",
    "MEMORY_TIMEOUT",
    "ClientInfo",
    "MockHostError",
    "MockHostServer",
    "Msg",
    "RemoteDevice",
    "RemoteEvtchn",
    "RemoteGuest",
    "RemotePrivcmd",
    "RemoteXen",
    "connect_from_env",
]
