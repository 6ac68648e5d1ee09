"""The privcmd calls are source a reader can open: ``xendmop/backends/privcmd_calls.py``, written
by ``tools/gen_privcmd_calls.py`` and checked in.  It must be what the tool writes now, every
call ``DeviceModel`` makes must have its factory there, and nothing in the package runs source
text it builds."""

from __future__ import annotations

import ast
import errno
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from xendmop import DeviceModel, XenError
from xendmop.backends import PrivcmdBackend, privcmd_calls

ROOT = Path(__file__).resolve().parents[1]


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_privcmd_calls", ROOT / "tools" / "gen_privcmd_calls.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_checked_in_module_is_what_the_tool_writes() -> None:
    written = _tool().render()
    current = (ROOT / "xendmop" / "backends" / "privcmd_calls.py").read_text()
    assert current == written, "xendmop/backends/privcmd_calls.py is out of date: run tools/gen_privcmd_calls.py"


def test_every_call_and_entry_devicemodel_makes_has_a_factory() -> None:
    calls, entries = _tool().shapes()
    for op, params, slots in calls:
        for hypercall in (False, True):
            assert (op, params, slots, hypercall) in privcmd_calls.CALLS
    for op, pairs, slot, method in entries:
        assert (op, pairs, slot, method) in privcmd_calls.ENTRIES


def test_nothing_in_the_package_runs_source_it_builds() -> None:
    """No ``exec``, no ``compile`` of source, no ``FunctionType`` made from a code object."""
    found = []
    for path in sorted((ROOT / "xendmop").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("exec",):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.func.id}")
            if isinstance(node, ast.Name) and node.id in ("FunctionType", "CodeType"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.id}")
    assert found == []


def test_nothing_probes_a_backend_for_what_the_protocol_does_not_name() -> None:
    """What a DeviceModel or the runtime asks of a backend is in ``Backend``: no getattr probing."""
    found = []
    for path in sorted((ROOT / "xendmop").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
                and node.args
                and "backend" in ast.unparse(node.args[0])
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert found == []


class RefusingPrivcmd:
    """Answers the open-time probe, refuses every DMOP with EINVAL."""

    path = "/dev/xen/privcmd"

    def fileno(self) -> int:
        return -1

    def ioctl(self, request: int, arg: Any) -> int:
        from xendmop.abi.privcmd import privcmd_dm_op

        if privcmd_dm_op.from_buffer_copy(arg).num == 0:
            return 0
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    def mmap(self, length: int, offset: int = 0) -> Any:
        raise OSError(errno.ENODEV, "no mmap")

    def close(self) -> None:
        pass


def _no_device(path: str) -> Any:
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)


@pytest.mark.parametrize("call", ["nr_vcpus", "set_isa_irq_level"], ids=["call", "entry"])
def test_a_traceback_shows_the_calls_own_lines(call: str) -> None:
    device = RefusingPrivcmd()

    def opener(path: str) -> Any:
        return device if path == device.path else _no_device(path)

    dm = DeviceModel(PrivcmdBackend(opener))
    with pytest.raises(XenError) as info:
        if call == "nr_vcpus":
            dm.nr_vcpus(3)
        else:
            dm.set_isa_irq_level(3, 4, 1)
    frames = traceback.extract_tb(info.value.__traceback__)
    last = frames[-1]
    assert last.filename == privcmd_calls.__file__
    assert last.name == call
    assert last.line and "_xen_error" in last.line  # the line as it is in the file, readable
    assert sys.modules["xendmop.backends.privcmd_calls"] is privcmd_calls
