"""Every import inside ``xendmop`` runs downward through the layers (docs/architecture.md).

From the bottom; a module may import its own layer and the layers below it, never one above:

0. ``abi`` (C-named mirrors, ioreq slot layout), ``errors``, ``types``, ``checks``, ``handle``
1. ``ops`` (one declaration per DMOP)
2. ``mock`` (the simulated host: devices, hypervisor rules, domains, simulated guest, host process)
3. ``backends`` (device interface, privcmd, libxen, backend selection), ``depriv``
4. ``devicemodel`` (the ``DeviceModel`` handle)
5. ``runtime`` (ioreq servers, event channels, foreign memory, dispatch, the serving app)
6. ``virtio``
7. ``testing``, ``cli``, ``__main__`` and the package's ``__init__``

The mock sits below the backends because a backend is chosen over a device: the selection
(``backends/selection.py``) opens the mock's devices, and nothing in the mock needs a backend.
``depriv`` needs only ``abi`` and is used by ``runtime``.  Imports inside functions and under
``TYPE_CHECKING`` count as well: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "xendmop"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("abi", "errors", "types", "checks", "handle"),
    ("ops",),
    ("mock",),
    ("backends", "depriv"),
    ("devicemodel",),
    ("runtime",),
    ("virtio",),
    ("testing", "cli", "__main__", "__init__"),
)
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """``xendmop.mock.state`` -> ``mock``; the package itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every ``xendmop`` import in the file, relative ones resolved."""
    return imports_in(path.read_text(), module_name(path), is_package=path.name == "__init__.py")


def imports_in(source: str, name: str, *, is_package: bool = False) -> list[tuple[int, str]]:
    package = name.split(".") if is_package else name.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # ``from . import x``: each name is a module or a name in it
                    found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
                    continue
            else:
                target = node.module or ""
            found.append((node.lineno, target))
    return [(line, target) for line, target in found if target == "xendmop" or target.startswith("xendmop.")]


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_top_level_part_has_a_layer() -> None:
    parts = {layer_of(module_name(path)) for path in MODULES}
    assert parts <= set(RANK), f"give these a layer in LAYERS and docs/architecture.md: {sorted(parts - set(RANK))}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_run_downward(path: Path) -> None:
    mine = RANK[layer_of(module_name(path))]
    upward = [
        f"line {line}: {target} ({layer_of(target)}, layer {RANK[layer_of(target)]})"
        for line, target in imports_of(path)
        if layer_of(target) in RANK and RANK[layer_of(target)] > mine
    ]
    assert not upward, f"{module_name(path)} (layer {mine}) imports upward: " + "; ".join(upward)


def test_the_rule_sees_upward_imports() -> None:
    """The checker itself: relative, absolute and in-function imports of a higher layer are found."""
    source = (
        "from ..runtime.foreignmemory import ForeignMemory\n"
        "import xendmop.cli\n"
        "def f():\n    from .. import devicemodel\n"
        "from .device import Device\n"
    )
    targets = [target for _, target in imports_in(source, "xendmop.backends.probe")]
    assert sorted(targets) == sorted(
        ["xendmop.runtime.foreignmemory", "xendmop.cli", "xendmop.devicemodel", "xendmop.backends.device"]
    )
    assert [layer_of(t) for t in targets if RANK[layer_of(t)] > RANK["backends"]] != []
