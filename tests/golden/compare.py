"""Compare two request streams recorded by the fake, with a readable first difference."""

from __future__ import annotations

from typing import Any


def first_difference(left: list[dict[str, Any]], right: list[dict[str, Any]], names: tuple[str, str]) -> str | None:
    """None if the streams are equal, else where they first differ (request, field, byte offset)."""
    a, b = names
    if len(left) != len(right):
        return f"{a} sent {len(left)} request(s), {b} sent {len(right)}: {_summary(left)} vs {_summary(right)}"
    for i, (x, y) in enumerate(zip(left, right)):
        for key in sorted(set(x) | set(y)):
            if key == "bufs":
                where = _buffers(x.get("bufs", []), y.get("bufs", []))
                if where:
                    return f"request {i}: {where} ({a} vs {b})"
            elif x.get(key) != y.get(key):
                return f"request {i}: {key} = {x.get(key)!r} ({a}) vs {y.get(key)!r} ({b})"
    return None


def _summary(requests: list[dict[str, Any]]) -> str:
    return str([(r["event"], r.get("num"), [buf["size"] for buf in r.get("bufs", [])]) for r in requests])


def _buffers(left: list[dict[str, Any]], right: list[dict[str, Any]]) -> str | None:
    if len(left) != len(right):
        return f"{len(left)} vs {len(right)} buffers"
    for n, (x, y) in enumerate(zip(left, right)):
        if x["size"] != y["size"]:
            return f"bufs[{n}].size {x['size']} vs {y['size']}"
        if x["bytes"] != y["bytes"]:
            bx, by = bytes.fromhex(x["bytes"]), bytes.fromhex(y["bytes"])
            at = next(i for i in range(len(bx)) if bx[i] != by[i])
            return f"bufs[{n}] byte {at}: {bx[at:at + 8].hex()} vs {by[at:at + 8].hex()}"
    return None
