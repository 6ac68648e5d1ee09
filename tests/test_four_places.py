"""Adding a DMOP touches four places (docs/architecture.md): its ABI struct, its table entry,
its mock rule and, if it needs one, its method.  A fixture op made of nothing but the first
three is called through ``DeviceModel`` on the mock, with Xen's checks and copy-back, and the
tool that writes the privcmd calls writes its call; the libxen backend and the CLI restate
nothing of it."""

from __future__ import annotations

import ctypes
import errno
import importlib.util
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

from xendmop import DeviceModel, XenError
from xendmop.backends import libxen
from xendmop.mock.hypervisor import RULES, Call
from xendmop.ops import BY_NAME, OPS, CopyBack, OpDecl

ROOT = Path(__file__).resolve().parents[1]


# 1. the ABI struct (in xendmop/abi/dm_op.py for a real op)
class xen_dm_op_fixture_double(ctypes.Structure):  # C's name
    _fields_ = [("value", ctypes.c_uint32), ("result", ctypes.c_uint32)]


# 2. the table entry (xendmop/ops/table.py); op 0 is free in Xen's numbering
FIXTURE = OpDecl(
    0,
    "fixture_double",
    xen_dm_op_fixture_double,
    params=("value",),
    out=("result",),
    copy_back=CopyBack.ALWAYS,
    limits={"value": 0xFFFF},
    doc="A fixture: Xen writes back twice the value.",
)


# 3. the mock rule (xendmop/mock/hypervisor.py, @rule("fixture_double"))
def fixture_double(call: Call) -> int:
    if call.op.value == 0:
        return -errno.EINVAL
    call.op.result = 2 * call.op.value
    return 0


@pytest.fixture
def declared(monkeypatch: pytest.MonkeyPatch) -> OpDecl:
    """The three places, as the table and the rule registry would hold them."""
    monkeypatch.setitem(OPS, FIXTURE.number, FIXTURE)
    monkeypatch.setitem(BY_NAME, FIXTURE.name, FIXTURE)
    monkeypatch.setitem(RULES, FIXTURE.name, fixture_double)
    return FIXTURE


def test_the_op_is_called_through_devicemodel_on_the_mock(declared: OpDecl) -> None:
    with DeviceModel.open("mock") as dm:
        out, outs = dm._calls.fixture_double(1, 21)  # 4. a method would call this, as nr_vcpus does
        assert (out.value, out.result, outs) == (21, 42, [])
        with pytest.raises(XenError) as info:  # the rule's refusal, carrying the op and the domid
            dm._calls.fixture_double(1, 0)
        assert info.value.errno == errno.EINVAL and info.value.op == "fixture_double"


def test_its_arguments_are_checked_from_the_declaration(declared: OpDecl) -> None:
    from xendmop import ArgumentError

    with DeviceModel.open("mock") as dm, pytest.raises(ArgumentError, match="value"):
        dm._calls.fixture_double(1, 0x10000)


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_privcmd_calls", ROOT / "tools" / "gen_privcmd_calls.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tool_writes_its_privcmd_call(declared: OpDecl) -> None:
    tool = _tool()
    assert (FIXTURE.name, ("value",), ()) in tool.shapes()[0]
    for hypercall in (False, True):
        body = tool.render_call(FIXTURE, FIXTURE.params, FIXTURE.slot_args, hypercall)
        compile(textwrap.dedent(body), "<fixture>", "exec")  # valid Python as the tool writes it
        assert "def fixture_double(domid, value):" in body


def test_libxen_and_the_cli_restate_nothing(declared: OpDecl) -> None:
    """The libxen backend takes the C function and argument order from the declaration: with
    libxendevicemodel's prototype of ``xendevicemodel_fixture_double`` declared (as a real op's is,
    in ``PROTOTYPES``) it would call it; without one it refuses, naming the op."""
    assert FIXTURE.function == "fixture_double" and FIXTURE.params == ("value",)
    assert FIXTURE.name not in libxen._HANDLERS  # a plain call: _simple, from the declaration
    assert FIXTURE.function not in libxen.PROTOTYPES
