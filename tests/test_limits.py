"""``Limits``: an immutable value checked on construction, and ``import xendmop`` without dataclasses."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from xendmop import ArgumentError, Limits


def test_limits_is_a_value() -> None:
    assert Limits() == Limits(16, 4096) and Limits(max_buf_size=8192) != Limits()
    assert hash(Limits(2, 64)) == hash(Limits(max_nr_bufs=2, max_buf_size=64))
    assert pickle.loads(pickle.dumps(Limits(2, 64))) == Limits(2, 64)
    assert repr(Limits()) == "Limits(max_nr_bufs=16, max_buf_size=4096)"
    with pytest.raises(AttributeError):
        Limits().max_buf_size = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"max_buf_size": 15}, ArgumentError, "max_buf_size"),
        ({"max_nr_bufs": 0}, ArgumentError, "max_nr_bufs"),
        ({"max_nr_bufs": True}, TypeError, "max_nr_bufs"),
        ({"max_buf_size": 4096.0}, TypeError, "max_buf_size"),
    ],
)
def test_bad_limits_name_field_and_value(kwargs: dict[str, object], error: type[Exception], name: str) -> None:
    with pytest.raises(error) as e:
        Limits(**kwargs)  # type: ignore[arg-type]
    assert f"{name}={next(iter(kwargs.values()))!r}" in str(e.value)


def test_import_xendmop_needs_no_dataclasses() -> None:
    code = "import sys, xendmop; print('dataclasses' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
