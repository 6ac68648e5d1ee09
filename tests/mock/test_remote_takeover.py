"""The mock host process follows Xen and Linux when a device model process dies: its evtchn fd
is released (``evtchn_release``), so each guest-side port of its ioreq server — every vCPU's
and the buffered one — is ECS_UNBOUND again with dom0 as its remote domain (``evtchn_close``);
the server stays, enabled, and another process maps its pages by id and binds those ports
again (``IoreqServer(takeover=)``), answering the vCPU that waited meanwhile."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from xendmop import DeviceModel
from xendmop.mock.remote import RemoteGuest, RemoteXen
from xendmop.runtime.server import IoreqServer
from xendmop.testing import ServeThread
from xendmop.types import BufIoreq

from .remote_helpers import wait_for
from .test_remote import DOMID, TIMEOUT, UART, Host, host, spawn_dm  # noqa: F401 (fixtures)


class Answer:
    def __init__(self, value: int) -> None:
        self.value = value
        self.writes: list[tuple[int, int]] = []

    def read(self, off: int, size: int) -> int:
        return self.value

    def write(self, off: int, size: int, value: int) -> None:
        self.writes.append((off, value))


def test_a_killed_device_models_server_is_taken_over_by_another_process(spawn_dm: Any, host: Host) -> None:  # noqa: F811
    proc, ready = spawn_dm()
    sid = ready["server"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(TIMEOUT)
    with RemoteXen(host.path) as admin:
        wait_for(lambda: len(admin.call("clients")) == 1, TIMEOUT)
        server = admin.servers(DOMID)[sid]
        assert server["enabled"] and server["bufioreq_port"] is not None
        guest_ports = {p[0]: p for p in admin.snapshot(DOMID)["ports"]}
        for port in [*server["vcpu_ports"], server["bufioreq_port"]]:
            _, state, remote_domid, *_ = guest_ports[port]
            assert (state, remote_domid) == ("unbound", 0)  # evtchn_close: back to unbound, towards dom0
        got: list[int] = []
        with RemoteGuest(host.path, DOMID, timeout=TIMEOUT) as guest:
            waiting = threading.Thread(target=lambda: got.append(guest.inb(UART + 2, vcpu=1)), daemon=True)
            waiting.start()  # a vCPU posts a read nobody answers
            with DeviceModel.open("mock", xen=admin) as dm:
                successor = IoreqServer(
                    dm, DOMID, opener=admin.open_device, takeover=sid, bufioreq=BufIoreq(server["bufioreq_handling"])
                )
                device = Answer(0x6B)
                successor.add_port_range(UART, UART + 7, device)
                time.sleep(0.3)
                assert waiting.is_alive() and not got  # nobody answers while no device model runs
                with ServeThread(successor):
                    waiting.join(TIMEOUT)
                    assert got == [0x6B]  # answered by the successor
                    assert guest.inb(UART, vcpu=0) == 0x6B
                    guest.outb(UART + 1, 0x42)
                    assert device.writes == [(1, 0x42)]
                    bound = {p[0]: p for p in admin.snapshot(DOMID)["ports"]}
                    assert all(bound[p][1] == "interdomain" for p in [*server["vcpu_ports"], server["bufioreq_port"]])
            assert admin.servers(DOMID) == {}  # the successor's clean stop destroyed it
