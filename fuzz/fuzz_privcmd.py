"""Coverage-guided fuzz target for the mock privcmd/evtchn ioctl decoding (atheris).

Each input becomes one ioctl on a fresh-ish mock host: either raw argument bytes
(pointers included, so garbage addresses are exercised) or a structured
IOCTL_PRIVCMD_DM_OP / HYPERCALL whose buffers hold fuzz bytes.  Anything but an
``OSError`` from the device, or a broken invariant, is a finding.

Short run (CI, also done by tests/mock/test_fuzz.py):
    python3 fuzz/fuzz_privcmd.py -runs=2000
Long run (keeps a corpus; stop with Ctrl-C):
    mkdir -p fuzz/corpus && python3 fuzz/fuzz_privcmd.py fuzz/corpus -max_len=512 -timeout=10
"""

from __future__ import annotations

import ctypes
import itertools
import sys

import atheris

with atheris.instrument_imports():
    from xendmop.abi import evtchn as evtchn_abi
    from xendmop.abi import privcmd as privcmd_abi
    from xendmop.abi.privcmd import privcmd_dm_op, privcmd_dm_op_buf, privcmd_hypercall
    from xendmop.mock import MockXen

PRIVCMD_REQUESTS = [
    privcmd_abi.IOCTL_PRIVCMD_HYPERCALL,
    privcmd_abi.IOCTL_PRIVCMD_DM_OP,
    privcmd_abi.IOCTL_PRIVCMD_RESTRICT,
    privcmd_abi.IOCTL_PRIVCMD_MMAP_RESOURCE,
    privcmd_abi.IOCTL_PRIVCMD_MMAPBATCH_V2,
    privcmd_abi.IOCTL_PRIVCMD_UNIMPLEMENTED,
]
EVTCHN_REQUESTS = [v for k, v in vars(evtchn_abi).items() if k.startswith("IOCTL_EVTCHN_")]

_host: MockXen | None = None
_calls = 0


def host() -> MockXen:
    """A host reused for a while (state carries over, as in real use), rebuilt every 500 inputs."""
    global _host, _calls
    _calls += 1
    if _host is None or _calls % 500 == 0:
        if _host is not None:
            _host.close()  # its memfds and device fds
        _host = MockXen()
        _host.create_domain(vcpus=2, hvm=True, memory_mb=2)
        _host.create_domain(vcpus=1, hvm=False, memory_mb=1)
        _host.set_log_dirty(1)
    return _host


def structured_dm_op(fdp: atheris.FuzzedDataProvider, hypercall: bool) -> tuple[int, object, list[object]]:
    keep: list[object] = []
    nbufs = fdp.ConsumeIntInRange(0, 3)
    bufs = (privcmd_dm_op_buf * max(1, nbufs))()
    for i in range(nbufs):
        data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
        if i == 0:  # bufs[0]: a plausible op number then fuzz
            data = bytes([fdp.ConsumeIntInRange(0, 22), 0, 0, 0, 0, 0, 0, 0]) + data
        raw = ctypes.create_string_buffer(data, max(1, len(data)))
        keep.append(raw)
        bufs[i].uptr = ctypes.addressof(raw)
        bufs[i].size = fdp.ConsumeIntInRange(0, len(data) + 8)
    keep.append(bufs)
    domid = fdp.ConsumeIntInRange(0, 3)
    if hypercall:
        call = privcmd_hypercall(op=41)
        call.arg[0], call.arg[1], call.arg[2] = domid, nbufs, ctypes.addressof(bufs)
        return privcmd_abi.IOCTL_PRIVCMD_HYPERCALL, call, keep
    return privcmd_abi.IOCTL_PRIVCMD_DM_OP, privcmd_dm_op(dom=domid, num=nbufs, ubufs=ctypes.addressof(bufs)), keep


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    h = host()
    mode = fdp.ConsumeIntInRange(0, 3)
    if mode == 3:
        dev = h.open_device("/dev/xen/evtchn")
        request = fdp.PickValueInList([*EVTCHN_REQUESTS, 0x4599])
    else:
        dev = h.open_device("/dev/xen/privcmd")
        request = fdp.PickValueInList(PRIVCMD_REQUESTS)
    keep: list[object] = []
    if mode in (1, 2):
        request, arg, keep = structured_dm_op(fdp, hypercall=mode == 2)
    else:
        arg = ctypes.create_string_buffer(fdp.ConsumeBytes(48).ljust(48, b"\0"), 48)
    try:
        dev.ioctl(request, arg)
    except OSError:
        pass
    finally:
        dev.close()
    del keep
    for d in h.hypervisor.domains.values():  # invariants the rules must keep
        servers = [s for s in d.ioreq_servers if s is not None]
        assert len(servers) <= 8
        for s in servers:
            for r in s.ranges:
                spans = sorted(r.ranges)
                assert len(spans) <= 256 and all(a[1] < b[0] for a, b in itertools.pairwise(spans))


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
