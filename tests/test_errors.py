"""XenError keeps the op, domid and arguments, and inherits the matching builtin."""

from __future__ import annotations

import errno
import pickle

import pytest

from xendmop.errors import ArgumentError, XenError, xen_error


@pytest.mark.parametrize(
    ("err", "builtin"),
    [
        (errno.EPERM, PermissionError),
        (errno.EACCES, PermissionError),
        (errno.ENOENT, FileNotFoundError),
        (errno.ESRCH, ProcessLookupError),
        (errno.EEXIST, FileExistsError),
        (errno.EAGAIN, BlockingIOError),
    ],
)
def test_subclass_by_errno(err: int, builtin: type[OSError]) -> None:
    e = xen_error(err, "create_ioreq_server", 3)
    assert isinstance(e, XenError) and isinstance(e, builtin) and isinstance(e, OSError)
    assert e.errno == err and e.op == "create_ioreq_server" and e.domid == 3


def test_message_names_op_domid_args_and_errno() -> None:
    e = xen_error(errno.EINVAL, "set_isa_irq_level", 7, {"isa_irq": 16})
    assert type(e) is XenError
    assert str(e) == "dm_op set_isa_irq_level(domid=7, isa_irq=16): Invalid argument [EINVAL]"


def test_pickles_with_context() -> None:
    e = pickle.loads(pickle.dumps(xen_error(errno.EPERM, "nr_vcpus", 0)))
    assert isinstance(e, PermissionError) and e.op == "nr_vcpus" and e.domid == 0


def test_argument_error_is_not_oserror() -> None:
    e = ArgumentError("set_isa_irq_level", "isa_irq", 300, "does not fit uint8_t")
    assert isinstance(e, ValueError) and not isinstance(e, OSError)
    assert "isa_irq=300" in str(e)
