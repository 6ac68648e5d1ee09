"""The ctypes mirrors of ``xendmop.abi`` checked against the real C headers, by gcc.

How it works: from the registries (``STRUCTS``, ``CONSTANTS``, ``TYPEDEFS``, ``MACROS``)
we generate one C program that prints, as JSON lines, every number the mirror also
knows (sizeof/alignof of each struct, offset/size/signedness of each field, the bytes a
bitfield occupies, each constant, each typedef's size, each function-like macro on
sample arguments), compile it against the installed headers and compare.

Names gcc cannot find are first sorted out by a cheap ``-fsyntax-only`` pass with one
check per source line, so a missing name becomes a list of names rather than one
compile error hiding the others.  Names in ``PROVENANCE`` are newer than Debian 12's
headers: they are reported as skipped (with where they come from) and checked against
upstream's declarations restated in ``abi_probe/newer_uapi.h`` instead.

For modules with ``COMPLETE = True`` the headers are also scanned for structs,
typedefs and integer ``#define``s the registry lacks.

Header-dependent tests skip without gcc or the headers (libxen-dev, linux-libc-dev);
the ``buf_ioreq`` tests at the end are pure Python.  ``pytest -rP`` shows the summaries
(owning packages, provenance, header scan).
"""

from __future__ import annotations

import ctypes
import inspect
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from xendmop.abi import CONSTANTS, MACROS, MODULES, PROVENANCE, STRUCTS, TYPEDEFS
from xendmop.abi.ioreq import buf_ioreq

INCLUDE_ROOT = Path("/usr/include")
PROBE_DIR = Path(__file__).parent / "abi_probe"  # holds the xen/interface/xen.h shim

CFLAGS = [
    "-std=gnu11",
    # memory.h shows xen_mem_acquire_resource only to the toolstack.
    "-D__XEN_TOOLS__",
    # Without it the compat interface (0x00000000) hides HVMMEM_unused behind the old name.
    "-D__XEN_INTERFACE_VERSION__=__XEN_LATEST_INTERFACE_VERSION__",
    f"-I{PROBE_DIR}",
    # Report errors where *our* line uses a macro, not where the header defines it.
    "-ftrack-macro-expansion=0",
    "-fmax-errors=0",
    "-w",  # the probe deliberately stores ~0 into narrow bitfields
]

# Every mirrored header, in MODULES order (xen.h first: evtchn.h needs domid_t).
HEADERS: tuple[str, ...] = tuple(dict.fromkeys(h for m in MODULES for h in getattr(m, "HEADERS", ())))
# privcmd.h/evtchn.h use __u64 and _IOC without including what defines them.
BASE_INCLUDES = ("stddef.h", "stdint.h", "stdio.h", "string.h", "linux/types.h", "linux/ioctl.h")

# Linux UAPI headers sit in the same directory as Xen's; everything else is Xen's.
EXPECTED_OWNER = {"xen/privcmd.h": "linux-libc-dev", "xen/evtchn.h": "linux-libc-dev"}
DEFAULT_OWNER = "libxen-dev"

# Header scan: things a COMPLETE header declares that are deliberately not mirrored.
# (Include guards are recognised by shape: ``#ifndef X`` + an empty ``#define X``.)
SCAN_EXCLUSIONS = {
    "uint64_aligned_t": "dm_op.h's fallback spelling of a *type* (uint64_t on x86_64), "
    "not a constant; the mirror spells those fields c_uint64",
    "bufioreq_pointers": "ioreq.h declares this union only #ifdef __XEN__ (the hypervisor's "
    "view); user space sees read_pointer/write_pointer directly",
}

# Arguments for function-like macros; unsigned long long in C, like Python's ints.
SAMPLE_VALUES = (0, 1, 2, 3, 7, 0x1F, 0x20, 0xFF, 0x100, 0xFFFF, 0x12345, 0xDEADBEEF)

# ---------------------------------------------------------------------------------
# The Python side: what the mirror says.
# ---------------------------------------------------------------------------------

_REGISTERED = set(STRUCTS.values())


@dataclass(frozen=True)
class Field:
    path: str  # "u.create_ioreq_server" for members of an anonymous nested union
    offset: int  # from the start of the outer struct
    size: int  # bytes; meaningless for bitfields (ctypes packs bit data in it)
    ctype: type
    bits: int | None  # bitfield width, None for ordinary fields


def mirror_fields(cls: type, prefix: str = "", base: int = 0) -> Iterator[Field]:
    """Every field of ``cls``; descends into nested types the registry does not name
    (``xen_dm_op.u``), since nothing else would check those."""
    for spec in cls._fields_:  # type: ignore[attr-defined]
        name, ctype = spec[0], spec[1]
        bits = spec[2] if len(spec) == 3 else None
        desc = getattr(cls, name)
        yield Field(prefix + name, base + desc.offset, desc.size, ctype, bits)
        if bits is None and issubclass(ctype, ctypes.Structure | ctypes.Union) and ctype not in _REGISTERED:
            yield from mirror_fields(ctype, f"{prefix}{name}.", base + desc.offset)


def int_kind(ctype: type) -> int:
    """0: not an integer (pointer, array, struct), 1: unsigned, 2: signed (as XENDMOP_KIND)."""
    code = getattr(ctype, "_type_", None)
    if isinstance(code, str) and code in "bhilq":
        return 2
    if isinstance(code, str) and code in "BHILQ":
        return 1
    return 0


def mirror_bit_mask(cls: type, path: str, bits: int, ctype: type) -> str:
    """Hex bytes of a zeroed ``cls`` after setting the bitfield at ``path`` to all ones.
    Compared byte for byte with gcc's, this pins the bit position, whatever the ctypes
    version's encoding of bit offsets."""
    inst = cls()
    *outer, last = path.split(".")
    obj = inst
    for part in outer:
        obj = getattr(obj, part)
    setattr(obj, last, -1 if int_kind(ctype) == 2 else (1 << bits) - 1)
    return bytes(inst).hex()


def sample_args(arity: int) -> list[tuple[int, ...]]:
    n = len(SAMPLE_VALUES)
    rows = [tuple(range(1, arity + 1))]
    rows += [tuple(SAMPLE_VALUES[(i + 5 * j) % n] for j in range(arity)) for i in range(n)]
    return rows


# ---------------------------------------------------------------------------------
# The C side: generated checks.
# ---------------------------------------------------------------------------------

C_PRELUDE = r"""
#define XENDMOP_KIND(x) _Generic((x), \
    signed char: 2, short: 2, int: 2, long: 2, long long: 2, \
    unsigned char: 1, unsigned short: 1, unsigned int: 1, unsigned long: 1, \
    unsigned long long: 1, default: 0)
/* Print prefix, an integer constant expression in full (signed or not), and "}". */
#define XENDMOP_PUT(prefix, expr) do { __typeof__((expr) + 0) v_ = (expr); \
    if (v_ < 0) printf("%s%lld}\n", prefix, (long long)v_); \
    else printf("%s%llu}\n", prefix, (unsigned long long)v_); } while (0)
static void xendmop_put_bytes(const char *prefix, const void *p, size_t n)
{
    const unsigned char *b = p;
    printf("%s\"", prefix);
    for (size_t i = 0; i < n; i++)
        printf("%02x", b[i]);
    printf("\"}\n");
}
"""


def c_str(text: str) -> str:
    return json.dumps(text)  # JSON string escapes are valid C for ASCII


def json_prefix(key: tuple[str, ...]) -> str:
    """C string literal opening the JSON record for ``key``; the probe appends the value."""
    return c_str(json.dumps({"k": list(key)})[:-1] + ', "v": ')


def include_lines(headers: tuple[str, ...], extra: tuple[str, ...] = ()) -> str:
    lines = [f"#include <{h}>" for h in (*BASE_INCLUDES, *headers)]
    lines += [f'#include "{e}"' for e in extra]
    return "\n".join(lines) + "\n"


def gcc(args: list[str], source: str, workdir: Path, name: str) -> subprocess.CompletedProcess[str]:
    path = workdir / name
    path.write_text(source)
    return subprocess.run(["gcc", *CFLAGS, *args, name], cwd=workdir, capture_output=True, text=True, timeout=60)


def failing_checks(checks: Mapping[tuple[str, ...], str], includes: str, workdir: Path) -> set[tuple[str, ...]]:
    """Compile every check (one C statement, keyed) on a line of its own, with
    -fsyntax-only, and return the keys of those gcc reports an error on."""
    head = f"{includes}\nvoid xendmop_presence(void)\n{{\n"
    first = head.count("\n") + 1  # gcc's 1-based number of the first check's line
    line_of = {first + i: key for i, key in enumerate(checks)}
    body = "".join(stmt + "\n" for stmt in checks.values())
    result = gcc(["-fsyntax-only"], f"{head}{body}}}\n", workdir, "presence.c")
    bad = set()
    for match in re.finditer(r"^presence\.c:(\d+):\d+: (?:fatal )?error:", result.stderr, re.M):
        line = int(match.group(1))
        if line not in line_of:
            pytest.fail(f"presence probe broke outside its checks:\n{result.stderr[:4000]}")
        bad.add(line_of[line])
    return bad


def integer_check(name: str) -> str:
    # ``| 0`` rejects pointers, floats, types and empty macros; _Static_assert rejects
    # anything that is not an integer constant expression.
    return f'_Static_assert((({name}) | 0) || 1, "");'


@dataclass
class ProbeResult:
    expected: dict[tuple[str, ...], int | str]  # key -> value per the mirror
    actual: dict[tuple[str, ...], int | str]  # key -> value per gcc
    missing: dict[str, str]  # registry name -> what gcc could not find
    spelling: dict[str, str]  # struct name -> "struct X" / "union X" / "X_t"


def run_probe(
    structs: Mapping[str, type],
    constants: Mapping[str, int],
    typedefs: Mapping[str, type],
    macros: Mapping[str, Callable[..., int]],
    includes: str,
    workdir: Path,
) -> ProbeResult:
    """Find which names gcc knows, then compile and run one program printing every
    value the mirror has an opinion on."""
    missing: dict[str, str] = {}

    # Pass 1: which names exist, and is each struct a tag or a typedef name?
    checks: dict[tuple[str, ...], str] = {}
    for name, cls in structs.items():
        keyword = "union" if issubclass(cls, ctypes.Union) else "struct"
        checks["tag", name] = f"(void)sizeof({keyword} {name});"
        checks["typedef", name] = f"{{ typedef {name} xendmop_t; (void)sizeof(xendmop_t); }}"
    for name in constants:
        checks["constant", name] = integer_check(name)
    for name in typedefs:
        checks["scalar", name] = f"{{ {name} xendmop_v = 0; (void)xendmop_v; }}"
    bad = failing_checks(checks, includes, workdir)
    for name in macros:  # a preprocessor question; there are only a few
        if gcc(["-fsyntax-only"], f"{includes}\n#ifndef {name}\n#error missing\n#endif\n", workdir, "m.c").returncode:
            missing[name] = "function-like macro not defined"
    spelling: dict[str, str] = {}
    for name, cls in structs.items():
        keyword = "union" if issubclass(cls, ctypes.Union) else "struct"
        if ("tag", name) not in bad:
            spelling[name] = f"{keyword} {name}"
        elif ("typedef", name) not in bad:
            spelling[name] = name
        else:
            missing[name] = f"neither '{keyword} {name}' nor a typedef '{name}'"
    for kind, name in bad:
        if kind == "constant":
            missing[name] = "not an integer constant expression (undeclared?)"
        elif kind == "scalar":
            missing[name] = "not a scalar typedef"

    # Pass 2: does every mirrored field exist under that name?
    fields = {name: list(mirror_fields(structs[name])) for name in spelling}
    field_checks: dict[tuple[str, ...], str] = {
        ("field", name, f.path): f"(void)(({spelling[name]} *)0)->{f.path};" for name, fs in fields.items() for f in fs
    }
    for _, name, path in failing_checks(field_checks, includes, workdir):
        missing[f"{name}.{path}"] = f"{spelling[name]} has no member {path}"
        fields[name] = [f for f in fields[name] if f.path != path]

    # Pass 3: one program printing everything; expected holds the mirror's answers.
    expected: dict[tuple[str, ...], int | str] = {}
    stmts: list[str] = []

    def put(key: tuple[str, ...], c_expr: str, value: int | str) -> None:
        expected[key] = value
        stmts.append(f"XENDMOP_PUT({json_prefix(key)}, {c_expr});")

    for name, ctype_name in spelling.items():
        cls = structs[name]
        put(("sizeof", name), f"sizeof({ctype_name})", ctypes.sizeof(cls))
        put(("alignof", name), f"_Alignof({ctype_name})", ctypes.alignment(cls))
        for f in fields[name]:
            member = f"(({ctype_name} *)0)->{f.path}"
            if f.bits is None:
                put(("offset", name, f.path), f"offsetof({ctype_name}, {f.path})", f.offset)
                put(("size", name, f.path), f"sizeof({member})", f.size)
                put(("signedness", name, f.path), f"XENDMOP_KIND({member})", int_kind(f.ctype))
            else:
                key = ("bits", name, f.path)
                expected[key] = mirror_bit_mask(cls, f.path, f.bits, f.ctype)
                stmts.append(
                    f"{{ {ctype_name} v; memset(&v, 0, sizeof v); v.{f.path} = ~0ULL; "
                    f"xendmop_put_bytes({json_prefix(key)}, &v, sizeof v); }}"
                )
    for name, value in constants.items():
        if name not in missing:
            put(("value", name), name, value)
    for name, ctype in typedefs.items():
        if name not in missing:
            put(("sizeof", name), f"sizeof({name})", ctypes.sizeof(ctype))
            put(("signedness", name), f"(({name})-1 < 0) ? 2 : 1", int_kind(ctype))
    for name, fn in macros.items():
        if name not in missing:
            arity = len(inspect.signature(fn).parameters)
            for args in sample_args(arity):
                c_args = ", ".join(f"{a}ULL" for a in args)
                put(("macro", name, repr(args)), f"{name}({c_args})", fn(*args))

    program = "\n".join([includes, C_PRELUDE, "int main(void)\n{", *stmts, "return 0;\n}\n"])
    built = gcc(["-o", "probe"], program, workdir, "probe.c")
    if built.returncode:
        pytest.fail(f"the probe does not compile although every name passed pass 1:\n{built.stderr[:4000]}")
    ran = subprocess.run([str(workdir / "probe")], capture_output=True, text=True, timeout=30, check=True)
    actual = {}
    for line in ran.stdout.splitlines():
        record = json.loads(line)
        actual[tuple(record["k"])] = record["v"]
    return ProbeResult(expected, actual, missing, spelling)


def describe(key: tuple[str, ...]) -> str:
    what, name, *rest = key
    if what == "macro":
        return f"{name}{rest[0]}"
    if what == "bits":
        return f"{name}.{rest[0]} bit mask (bytes after setting it to all ones)"
    if rest:
        return f"{name}.{rest[0]} {what}"
    return f"{name} {what}"


def mismatches(result: ProbeResult, kinds: set[str], names: set[str]) -> list[str]:
    out = []
    for key, want in result.expected.items():
        if key[0] in kinds and key[1] in names:
            got = result.actual.get(key, "<not printed>")
            if got != want:
                out.append(f"{describe(key)}: gcc says {got!r}, xendmop.abi says {want!r}")
    return out


# ---------------------------------------------------------------------------------
# Fixtures.
# ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toolchain() -> None:
    absent = [h for h in HEADERS if not (INCLUDE_ROOT / h).is_file()]
    if absent:
        pytest.skip(
            f"libxen-dev not installed: apt-get install libxen-dev linux-libc-dev (missing {', '.join(absent)})"
        )
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found: apt-get install gcc")


@pytest.fixture(scope="module")
def installed(toolchain: None, tmp_path_factory: pytest.TempPathFactory) -> ProbeResult:
    """The whole registry, probed against the installed headers."""
    return run_probe(
        STRUCTS, CONSTANTS, TYPEDEFS, MACROS, include_lines(HEADERS), tmp_path_factory.mktemp("abi_installed")
    )


# ---------------------------------------------------------------------------------
# Tests against the installed headers.
# ---------------------------------------------------------------------------------


def test_headers_come_from_expected_packages(toolchain: None) -> None:
    if shutil.which("dpkg") is None:
        pytest.skip("dpkg not found (not a Debian system)")
    paths = [str(INCLUDE_ROOT / h) for h in HEADERS]
    out = subprocess.run(["dpkg", "-S", *paths], capture_output=True, text=True).stdout
    owner = {}
    for line in out.splitlines():
        match = re.match(r"^([^:\s]+)(?::\S+)?: (\S+)$", line)
        if match:
            owner[str(Path(match.group(2)).relative_to(INCLUDE_ROOT))] = match.group(1)
    print("\nheader owners (dpkg -S):")
    for h in HEADERS:
        print(f"  {h:24} {owner.get(h, '<no package>')}")
    wrong = [
        f"{h}: owned by {owner.get(h, '<no package>')}, expected {EXPECTED_OWNER.get(h, DEFAULT_OWNER)}"
        for h in HEADERS
        if owner.get(h) != EXPECTED_OWNER.get(h, DEFAULT_OWNER)
    ]
    assert not wrong, "\n".join(wrong)


def test_every_registry_name_is_in_the_headers(installed: ProbeResult) -> None:
    # Names listed in PROVENANCE may be absent: test_provenance reports them.
    unknown = {name: why for name, why in installed.missing.items() if name.split(".")[0] not in PROVENANCE}
    counts: dict[str, int] = {}
    for key in installed.expected:
        counts[key[0]] = counts.get(key[0], 0) + 1
    print(f"\nprobe compared {len(installed.expected)} values with gcc: {counts}")
    print(f"not in the installed headers (PROVENANCE): {sorted(set(installed.missing) - set(unknown))}")
    assert not unknown, "gcc cannot find these registry names in the installed headers:\n" + "\n".join(
        f"  {name}: {why}" for name, why in sorted(unknown.items())
    )


def test_struct_layouts_match_gcc(installed: ProbeResult) -> None:
    bad = mismatches(installed, {"sizeof", "alignof", "offset", "size", "signedness", "bits"}, set(STRUCTS))
    assert not bad, "struct layouts differ:\n" + "\n".join(bad)
    assert any(k[0] == "bits" for k in installed.expected), "no bitfield was checked"


def test_constants_match_gcc(installed: ProbeResult) -> None:
    bad = mismatches(installed, {"value"}, set(CONSTANTS))
    assert not bad, "constants differ:\n" + "\n".join(bad)


def test_typedefs_match_gcc(installed: ProbeResult) -> None:
    bad = mismatches(installed, {"sizeof", "signedness"}, set(TYPEDEFS))
    assert not bad, "typedefs differ:\n" + "\n".join(bad)


def test_macros_match_gcc(installed: ProbeResult) -> None:
    bad = mismatches(installed, {"macro"}, set(MACROS))
    assert not bad, "function-like macros differ (arguments passed as unsigned long long):\n" + "\n".join(bad)
    assert {k[1] for k in installed.expected if k[0] == "macro"} == set(MACROS) - set(installed.missing)


@pytest.mark.parametrize("name", sorted(PROVENANCE))
def test_provenance(name: str, installed: ProbeResult) -> None:
    """Names newer than the installed headers cannot be checked against them: say so."""
    assert name in STRUCTS or name in CONSTANTS or name in TYPEDEFS or name in MACROS, (
        f"PROVENANCE lists {name}, which is not in any registry"
    )
    if name in installed.missing:
        pytest.skip(f"{name}: not in the installed headers; from {PROVENANCE[name]} (see newer_uapi test)")
    print(f"{name} ({PROVENANCE[name]}) is in the installed headers and was checked there")


# ---------------------------------------------------------------------------------
# PROVENANCE names: internal consistency, and gcc on upstream's declarations.
# ---------------------------------------------------------------------------------

# How upstream defines each newer ioctl: (direction, type, nr, struct tag or None for size 0).
UPSTREAM_IOCTLS = {
    "IOCTL_PRIVCMD_IRQFD": ("_IOC_WRITE", "P", 8, "privcmd_irqfd"),
    "IOCTL_PRIVCMD_IOEVENTFD": ("_IOC_WRITE", "P", 9, "privcmd_ioeventfd"),
    "IOCTL_PRIVCMD_PCIDEV_GET_GSI": ("_IOC_NONE", "P", 10, "privcmd_pcidev_get_gsi"),
    "IOCTL_EVTCHN_BIND_STATIC": ("_IOC_NONE", "E", 7, "ioctl_evtchn_bind"),
    "IOCTL_PRIVCMD_UNIMPLEMENTED": ("_IOC_NONE", "P", 0xFF, None),
}


def test_provenance_ioctls_encode_their_struct_sizes() -> None:
    """Pure Python: each newer IOCTL_* value is _IOC(dir, type, nr, sizeof(its struct))
    with the mirror's own struct, decoded field by field (asm-generic/ioctl.h layout)."""
    bad = []
    for name in sorted(n for n in PROVENANCE if n.startswith("IOCTL_")):
        assert name in UPSTREAM_IOCTLS, f"{name}: add its upstream definition to UPSTREAM_IOCTLS"
        direction, kind, nr, tag = UPSTREAM_IOCTLS[name]
        value = CONSTANTS[name]
        decoded = (value >> 30, chr((value >> 8) & 0xFF), value & 0xFF, (value >> 16) & 0x3FFF)
        if tag is not None and tag not in STRUCTS:
            bad.append(f"{name}: upstream sizes it by struct {tag}, which the registry lacks (mirror bug?)")
            continue
        size = ctypes.sizeof(STRUCTS[tag]) if tag else 0
        want = (CONSTANTS[direction], kind, nr, size)
        if decoded != want:
            bad.append(f"{name} = {value:#x} decodes to (dir, type, nr, size) {decoded}, expected {want}")
    assert not bad, "\n".join(bad)


def test_provenance_layouts_match_gcc_on_upstream_declarations(
    toolchain: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """gcc lays out upstream's declarations (restated in abi_probe/newer_uapi.h, without
    the installed privcmd.h/evtchn.h) exactly as the mirror does."""
    result = run_probe(
        {n: c for n, c in STRUCTS.items() if n in PROVENANCE},
        {n: v for n, v in CONSTANTS.items() if n in PROVENANCE},
        {n: t for n, t in TYPEDEFS.items() if n in PROVENANCE},
        {n: f for n, f in MACROS.items() if n in PROVENANCE},
        include_lines(("xen/xen.h",), ("newer_uapi.h",)),
        tmp_path_factory.mktemp("abi_newer"),
    )
    problems = [
        f"{n}: {why} in upstream's declarations (mirror bug: C name differs)" for n, why in result.missing.items()
    ]
    problems += mismatches(
        result, {"sizeof", "alignof", "offset", "size", "signedness", "bits", "value"}, set(PROVENANCE)
    )
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------
# Header scan: COMPLETE modules mirror everything their headers declare.
# ---------------------------------------------------------------------------------


@dataclass
class HeaderDecls:
    tags: set[str]  # struct/union NAME { ... }
    struct_typedefs: set[str]  # typedef struct X NAME;
    scalar_typedefs: set[str]  # typedef uint16_t NAME;
    defines: dict[str, str]  # object-like #define NAME value
    function_macros: set[str]  # #define NAME(args) ...
    guards: set[str]  # #ifndef NAME + empty #define NAME


def scan_header(text: str) -> HeaderDecls:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)  # comments out, then
    text = re.sub(r"//[^\n]*", " ", text)
    text = re.sub(r"\\\n", " ", text)  # continuation lines joined
    defines: dict[str, str] = {}
    function_macros: set[str] = set()
    for match in re.finditer(r"^\s*#\s*define\s+(\w+)(\()?(.*)$", text, re.M):
        if match.group(2):
            function_macros.add(match.group(1))
        else:
            defines[match.group(1)] = match.group(3).strip()
    ifndefs = set(re.findall(r"^\s*#\s*ifndef\s+(\w+)", text, re.M))
    guards = {name for name, value in defines.items() if not value and name in ifndefs}
    return HeaderDecls(
        tags=set(re.findall(r"\b(?:struct|union)\s+(\w+)\s*\{", text)),
        struct_typedefs=set(re.findall(r"\btypedef\s+(?:struct|union)\s+\w+\s+(\w+)\s*;", text)),
        scalar_typedefs=set(re.findall(r"\btypedef\s+(?!struct\b|union\b|enum\b)\w[\w\s]*?\s(\w+)\s*;", text)),
        defines={n: v for n, v in defines.items() if n not in guards},
        function_macros=function_macros,
        guards=guards,
    )


COMPLETE_MODULES = [m for m in MODULES if getattr(m, "COMPLETE", False)]


@pytest.mark.parametrize("module", COMPLETE_MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_complete_module_mirrors_whole_header(
    module: ModuleType, toolchain: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    lacking: list[str] = []
    for header in module.HEADERS:
        decls = scan_header((INCLUDE_ROOT / header).read_text())
        candidates = {n: v for n, v in decls.defines.items() if n not in SCAN_EXCLUSIONS}
        # gcc decides which object-like macros are integer constants.
        not_int = {
            name
            for _, name in failing_checks(
                {("define", n): integer_check(n) for n in candidates},
                include_lines(HEADERS),
                tmp_path_factory.mktemp("scan"),
            )
        }
        print(
            f"\n{header}: {len(decls.tags)} struct/union tags, {len(decls.struct_typedefs)} struct typedefs, "
            f"{len(decls.scalar_typedefs)} scalar typedefs, {len(candidates) - len(not_int)} integer defines, "
            f"{len(decls.function_macros)} function-like macros; guards {sorted(decls.guards)}; "
            f"excluded {sorted(n for n in SCAN_EXCLUSIONS if n in decls.defines or n in decls.tags)}"
        )
        lacking += [
            f"{header}: #define {n} {candidates[n]!r} is not an integer constant; "
            "mirror it or add it to SCAN_EXCLUSIONS with a reason"
            for n in sorted(not_int)
        ]
        wanted: list[tuple[str, set[str], Mapping[str, object]]] = [
            ("struct", decls.tags | decls.struct_typedefs, STRUCTS),
            ("typedef", decls.scalar_typedefs, TYPEDEFS),
            ("constant", set(candidates) - not_int, CONSTANTS),
            ("function-like macro", decls.function_macros, MACROS),
        ]
        for what, names, registry in wanted:
            lacking += [
                f"{header}: {what} {n} is not in the registry"
                for n in sorted(names)
                if n not in registry and n not in SCAN_EXCLUSIONS
            ]
    assert not lacking, f"{module.__name__} says COMPLETE = True, but:\n" + "\n".join(lacking)


# ---------------------------------------------------------------------------------
# Pure Python: buf_ioreq and the CPython bitfield pitfall (no headers needed).
# ---------------------------------------------------------------------------------

# gcc's layout of struct buf_ioreq (x86_64): one 32-bit word of bitfields, then data.
BUF_IOREQ_BITS = {"type": (0, 7), "pad": (8, 8), "dir": (9, 9), "size": (10, 11), "addr": (12, 31)}


def test_buf_ioreq_mirror_has_gccs_layout() -> None:
    assert ctypes.sizeof(buf_ioreq) == 8
    assert buf_ioreq.data.offset == 4
    for name, (lo, hi) in BUF_IOREQ_BITS.items():
        req = buf_ioreq()
        setattr(req, name, (1 << (hi - lo + 1)) - 1)
        raw = bytes(req)
        word = int.from_bytes(raw[:4], "little")
        assert word == ((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1), f"{name}: bits {word:#010x}, want {lo}..{hi}"
        assert raw[4:] == bytes(4), f"{name} spills into data"
    req = buf_ioreq(data=0xDEADBEEF)
    assert bytes(req) == bytes(4) + (0xDEADBEEF).to_bytes(4, "little")


def test_literal_buf_ioreq_spelling_is_not_gccs_layout_in_ctypes() -> None:
    """Why the mirror puts every bitfield on c_uint32: spelled as in the header
    (uint8_t bitfields, then ``uint32_t addr:20``), CPython's ctypes opens a new
    32-bit unit for addr, giving 12 bytes with data at 8; gcc gives 8 with data at 4."""

    class literal(ctypes.Structure):
        _fields_ = [
            ("type", ctypes.c_uint8),
            ("pad", ctypes.c_uint8, 1),
            ("dir", ctypes.c_uint8, 1),
            ("size", ctypes.c_uint8, 2),
            ("addr", ctypes.c_uint32, 20),
            ("data", ctypes.c_uint32),
        ]

    if sys.version_info >= (3, 14) and ctypes.sizeof(literal) == 8:
        pytest.skip("this CPython's ctypes lays out mixed-width bitfields as gcc does")
    assert ctypes.sizeof(literal) == 12
    assert literal.data.offset == 8
