"""Fixtures for the depriv tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .helpers import Child


@pytest.fixture
def spawn() -> Iterator[Any]:
    children: list[Child] = []

    def make(code: str, *args: str) -> Child:
        child = Child(code, *args)
        children.append(child)
        return child

    yield make
    for child in children:
        child.kill()
        for stream in (child.proc.stdin, child.proc.stdout, child.proc.stderr):
            if stream is not None:
                stream.close()
