"""The lazy p2m (``mock.state.P2m``) that lets a host process create big guests at once: under
any sequence of lookups, stores and removals it holds what the eager dict Xen's domain build
would have held, and it makes no entry before one is asked for."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from xendmop.abi.hvm import HVMMEM_ioreq_server, HVMMEM_ram_rw
from xendmop.mock import MockXen
from xendmop.mock.pages import PageRef, PageStore
from xendmop.mock.state import P2m, P2mEntry
from xendmop.mock.usermem import PAGE_SIZE

NR = 8
gfns = st.integers(min_value=-2, max_value=NR + 3)
steps = st.lists(st.tuples(st.sampled_from(["get", "set", "del", "pop", "contains"]), gfns, st.booleans()), max_size=40)


def _view(p2m: object) -> list[tuple[int, int, int | None]]:
    assert isinstance(p2m, (dict, P2m))
    return sorted((g, e.type, e.page.index if e.page else None) for g, e in p2m.items())


@settings(max_examples=200, deadline=None)
@given(steps)
def test_lazy_p2m_behaves_as_the_eager_dict(ops: list[tuple[str, int, bool]]) -> None:
    store = PageStore("p2m-test", NR)
    try:
        lazy = P2m(store, NR)
        eager = {g: P2mEntry(HVMMEM_ram_rw, PageRef(store, g)) for g in range(NR)}
        for op, gfn, flag in ops:
            if op == "get":
                got, want = lazy.get(gfn), eager.get(gfn)
                assert (got is None) == (want is None)
                if got is not None and want is not None:
                    assert (got.type, got.page and got.page.index) == (want.type, want.page and want.page.index)
            elif op == "set":
                page = PageRef(store, gfn % NR) if flag else None
                lazy[gfn] = P2mEntry(HVMMEM_ioreq_server, page)
                eager[gfn] = P2mEntry(HVMMEM_ioreq_server, page)
            elif op == "del":
                assert (gfn in lazy) == (gfn in eager)
                if gfn in eager:
                    del lazy[gfn], eager[gfn]
            elif op == "pop":
                assert (lazy.pop(gfn, None) is None) == (eager.pop(gfn, None) is None)
            else:
                assert (gfn in lazy) == (gfn in eager)
            assert len(lazy) == len(eager)
        assert _view(lazy) == _view(eager)
        assert sum(e.type == HVMMEM_ioreq_server for e in lazy.touched()) == sum(
            e.type == HVMMEM_ioreq_server for e in eager.values()
        )
    finally:
        store.close()


def test_a_new_domain_makes_no_p2m_entry_until_one_is_used() -> None:
    with MockXen() as xen:
        domid = xen.create_domain(vcpus=1, memory_mb=128)
        p2m = xen.hypervisor.domains[domid].p2m
        assert isinstance(p2m, P2m) and len(p2m.touched()) == 0
        # RAM, the two legacy ioreq pages, the ioreq server pages
        assert len(p2m) == 128 * (1 << 20) // PAGE_SIZE + 2 + xen.ioreq_server_pages
        xen.guest_write(domid, 5 * PAGE_SIZE, b"x")
        assert len(p2m.touched()) == 1 and xen.guest_read(domid, 5 * PAGE_SIZE, 1) == b"x"
