"""``RemoteGuest``: a simulated guest's vCPUs driven from this process and run by the mock host
(``SimGuest`` there), reached through a ``RemoteXen``.
"""

from __future__ import annotations

from typing import Any

from .client import RemoteXen


class RemoteGuest:
    """A guest's vCPUs driven from this process, run by the host (``SimGuest`` there).

    Same methods as ``xendmop.mock.simguest.SimGuest``; ``GuestTimeout`` and
    ``GuestCrash`` come back as themselves, naming the vCPU and the ioreq.
    """

    def __init__(self, socket_path: str | RemoteXen, domid: int, *, timeout: float = 5.0) -> None:
        self.xen = socket_path if isinstance(socket_path, RemoteXen) else RemoteXen(socket_path)
        self.domid = domid
        self.timeout = timeout

    def _do(self, method: str, *args: int, data: bytes | None = None, **kw: Any) -> Any:
        extra: dict[str, Any] = {"data": data.hex()} if data is not None else {}
        return self.xen.call(
            "guest", domid=self.domid, method=method, args=list(args), kwargs=kw, timeout=self.timeout, **extra
        )

    def outb(self, port: int, value: int, vcpu: int = 0) -> None:
        self._do("outb", port, value, vcpu=vcpu)

    def outw(self, port: int, value: int, vcpu: int = 0) -> None:
        self._do("outw", port, value, vcpu=vcpu)

    def outl(self, port: int, value: int, vcpu: int = 0) -> None:
        self._do("outl", port, value, vcpu=vcpu)

    def inb(self, port: int, vcpu: int = 0) -> int:
        return int(self._do("inb", port, vcpu=vcpu))

    def inw(self, port: int, vcpu: int = 0) -> int:
        return int(self._do("inw", port, vcpu=vcpu))

    def inl(self, port: int, vcpu: int = 0) -> int:
        return int(self._do("inl", port, vcpu=vcpu))

    def mmio_read(self, addr: int, size: int, vcpu: int = 0) -> int:
        return int(self._do("mmio_read", addr, size, vcpu=vcpu))

    def mmio_write(self, addr: int, size: int, value: int, vcpu: int = 0) -> None:
        self._do("mmio_write", addr, size, value, vcpu=vcpu)

    def pci_config_read(self, sbdf: int, reg: int, size: int, vcpu: int = 0) -> int:
        return int(self._do("pci_config_read", sbdf, reg, size, vcpu=vcpu))

    def pci_config_write(self, sbdf: int, reg: int, size: int, value: int, vcpu: int = 0) -> None:
        self._do("pci_config_write", sbdf, reg, size, value, vcpu=vcpu)

    def rep_outsb(self, port: int, gpa: int, count: int, *, df: bool = False, vcpu: int = 0) -> None:
        self._do("rep_outsb", port, gpa, count, df=df, vcpu=vcpu)

    def rep_insb(self, port: int, gpa: int, count: int, *, df: bool = False, vcpu: int = 0) -> None:
        self._do("rep_insb", port, gpa, count, df=df, vcpu=vcpu)

    def rep_movs_to_mmio(self, addr: int, gpa: int, size: int, count: int, *, df: bool = False, vcpu: int = 0) -> None:
        self._do("rep_movs_to_mmio", addr, gpa, size, count, df=df, vcpu=vcpu)

    def send_buffered(self, type: int, addr: int, size: int, data: int) -> bool:
        return bool(self._do("send_buffered", type, addr, size, data))

    def write_ram(self, gpa: int, data: bytes) -> None:
        self._do("write_ram", gpa, data=bytes(data))

    def read_ram(self, gpa: int, n: int) -> bytes:
        return bytes.fromhex(self._do("read_ram", gpa, n))

    def close(self) -> None:
        self.xen.close()

    def __enter__(self) -> RemoteGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
