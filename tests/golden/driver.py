"""Run every case of ``CALLS`` through one implementation, under the fake device.

    python -m golden.driver {libxendevicemodel|privcmd|libxen}

Run by the tests in a subprocess with ``LD_PRELOAD`` set to the fake and
``FAKEXEN_LOG`` naming its log.  Before each case a ``mark`` line is appended to
that log, after it a ``result`` line (the Python value returned, or the errno), so
the log holds, per case, exactly the requests that case sent.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from .calls import CALLS


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return {"hex": bytes(value).hex()}
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _open(which: str) -> Any:
    if which == "libxendevicemodel":
        from .reference import CReference

        return CReference()
    from xendmop import DeviceModel

    if which == "privcmd":
        from xendmop.backends.privcmd import PrivcmdBackend

        return DeviceModel(PrivcmdBackend())
    if which == "libxen":
        from xendmop.backends.libxen import LibxenBackend

        return DeviceModel(LibxenBackend())
    raise SystemExit(f"unknown implementation {which!r}")


def main(which: str) -> None:
    log = os.open(os.environ["FAKEXEN_LOG"], os.O_WRONLY | os.O_APPEND)

    def emit(event: dict[str, Any]) -> None:
        os.write(log, (json.dumps(event) + "\n").encode())

    impl = _open(which)
    for index, call in enumerate(CALLS):
        emit({"event": "mark", "case": index, "method": call.method})
        try:
            result: dict[str, Any] = {"value": _jsonable(getattr(impl, call.method)(*call.args, **call.kwargs))}
        except OSError as e:
            result = {"errno": e.errno, "type": type(e).__name__, "op": getattr(e, "op", None)}
        emit({"event": "result", "case": index, **result})
    impl.close()
    emit({"event": "mark", "case": len(CALLS), "method": "close"})


if __name__ == "__main__":
    main(sys.argv[1])
