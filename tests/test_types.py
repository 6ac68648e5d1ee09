"""Each public enum lists exactly the C constants of its prefix, with their values."""

from __future__ import annotations

import enum

import pytest

from xendmop.abi import CONSTANTS
from xendmop.types import PREFIXES, CacheAttr


@pytest.mark.parametrize("cls", list(PREFIXES), ids=lambda c: c.__name__)
def test_enum_matches_constants(cls: type[enum.Enum]) -> None:
    prefix = PREFIXES[cls]
    expected = {name[len(prefix) :]: value for name, value in CONSTANTS.items() if name.startswith(prefix)}
    members = {m.name: m.value for m in cls}  # type: ignore[var-annotated]
    if cls is CacheAttr:
        assert members.pop("DELETE") == CONSTANTS["XEN_DMOP_DELETE_MEM_CACHEATTR"]
    assert members == expected
