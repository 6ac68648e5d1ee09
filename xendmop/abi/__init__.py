"""C-named ctypes mirrors of Xen's and Linux's public headers, x86_64 layouts.

One module per header; each module names its header(s) in ``HEADERS`` and says in
``COMPLETE`` whether every struct and constant of that header is mirrored.  The
registries below are built by walking the modules, so nothing is listed twice:

- ``STRUCTS``: C struct tag (or typedef name) -> ctypes class
- ``TYPEDEFS``: scalar typedef name (``domid_t``, ``ioservid_t`` …) -> ctypes type
- ``CONSTANTS``: C macro or enumerator name -> value
- ``MACROS``: function-like C macro name -> Python function
- ``PROVENANCE``: names newer than Debian 12's headers -> where they come from

``tests/test_abi_headers.py`` compiles the real headers and checks all of them.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable
from types import ModuleType

from . import dm_op, evtchn, hvm, ioctl, ioreq, memory, privcmd, xen

MODULES: tuple[ModuleType, ...] = (xen, dm_op, ioreq, hvm, memory, privcmd, evtchn, ioctl)

# C names: anything but a Python-private helper (``_lower``) or a module attribute.
_C_NAME = re.compile(r"^(?!_[a-z])[A-Za-z_][A-Za-z0-9_]*$")
_NOT_C = {"HEADERS", "COMPLETE", "PROVENANCE", "MODULES"}


def _walk() -> tuple[
    dict[str, type[ctypes.Structure | ctypes.Union]],
    dict[str, type],
    dict[str, int],
    dict[str, Callable[..., int]],
    dict[str, str],
]:
    structs: dict[str, type[ctypes.Structure | ctypes.Union]] = {}
    typedefs: dict[str, type] = {}
    constants: dict[str, int] = {}
    macros: dict[str, Callable[..., int]] = {}
    provenance: dict[str, str] = {}
    for module in MODULES:
        provenance.update(getattr(module, "PROVENANCE", {}))
        for name, value in vars(module).items():
            if (
                name in _NOT_C
                or not _C_NAME.match(name)
                or (name.startswith("__") and not name.startswith("__HYPERVISOR"))
            ):
                continue
            if isinstance(value, type) and issubclass(value, (ctypes.Structure, ctypes.Union)):
                structs[name] = value
            elif isinstance(value, type) and issubclass(value, ctypes._SimpleCData):
                if not name.startswith("c_"):
                    typedefs[name] = value
            elif type(value) is int:
                constants[name] = value
            elif callable(value) and getattr(value, "__module__", None) == module.__name__:
                if module is not ioctl:
                    macros[name] = value
    return structs, typedefs, constants, macros, provenance


STRUCTS, TYPEDEFS, CONSTANTS, MACROS, PROVENANCE = _walk()

__all__ = ["CONSTANTS", "MACROS", "MODULES", "PROVENANCE", "STRUCTS", "TYPEDEFS"]
