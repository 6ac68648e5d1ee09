"""``xendmop.runtime.restart``: the state file a restarted device model finds (the server's id,
the device's state kept twice so a kill mid-store leaves the previous one whole), and the
choice it makes: take the recorded server over, or start afresh saying why."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from xendmop import DeviceModel
from xendmop.mock import MockXen
from xendmop.runtime.restart import RestartState, StateBusyError

from .helpers import Recorder

pytestmark = pytest.mark.xen_domain(vcpus=1, memory_mb=4)
LAYOUT = struct.Struct("<II")


def test_a_fresh_directory_gives_a_new_server_and_records_its_id(
    tmp_path: Path, device_model: DeviceModel, xen_host: MockXen, hvm_domain: int
) -> None:
    with RestartState(tmp_path / "run", hvm_domain, "dev", device_size=8) as state:
        assert state.server_id is None and state.stale is None
        s = state.ioreq_server(device_model, opener=xen_host.open_device)
        s.add_port_range(0x3F8, 0x3FF, Recorder({}))
        with s:
            assert state.server_id == s.id and s.takeover is None
        assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700


def test_a_restart_takes_the_recorded_server_over_with_the_device_state(
    tmp_path: Path, device_model: DeviceModel, xen_host: MockXen, hvm_domain: int
) -> None:
    with RestartState(tmp_path, hvm_domain, "dev", device_size=8) as state:
        s = state.ioreq_server(device_model, opener=xen_host.open_device)
        s.add_port_range(0x3F8, 0x3FF, Recorder({}))
        s.start()
        state.device.store(LAYOUT, 7, 9)
        sid = s.id
        s.detach()  # killed: the file and the server stay
    with RestartState(tmp_path, hvm_domain, "dev", device_size=8) as again:
        assert again.server_id == sid
        t = again.ioreq_server(device_model, opener=xen_host.open_device)
        assert t.takeover == sid and again.takeover_id == sid and again.stale is None
        assert again.device.load() == LAYOUT.pack(7, 9)
        t.add_port_range(0x3F8, 0x3FF, Recorder({}))
        with t:
            assert t.id == sid
        again.clear()
    assert not (tmp_path / f"dom{hvm_domain}-dev.state").exists()


def test_a_record_whose_server_is_gone_is_stale_said_in_one_line_and_replaced(
    tmp_path: Path, device_model: DeviceModel, xen_host: MockXen, hvm_domain: int
) -> None:
    with RestartState(tmp_path, hvm_domain, "dev", device_size=8) as state:
        s = state.ioreq_server(device_model, opener=xen_host.open_device)
        s.start()
        state.device.store(LAYOUT, 1, 2)
        s.close()  # destroyed, but the record was not cleared (killed after the destroy)
    with RestartState(tmp_path, hvm_domain, "dev", device_size=8) as again:
        t = again.ioreq_server(device_model, opener=xen_host.open_device)
        assert t.takeover is None and again.device.load() is None
        assert again.stale is not None and "\n" not in again.stale
        assert "the server is gone" in again.stale and "starting afresh" in again.stale
        t.close()


def test_a_record_whose_domain_is_gone_is_stale(
    tmp_path: Path, device_model: DeviceModel, xen_host: MockXen, hvm_domain: int
) -> None:
    with RestartState(tmp_path, hvm_domain, "dev") as state:
        s = state.ioreq_server(device_model, opener=xen_host.open_device)
        s.start()
        s.detach()
    xen_host.destroy_domain(hvm_domain)
    with RestartState(tmp_path, hvm_domain, "dev") as again:
        assert again.check(device_model) is None and "the domain is gone" in (again.stale or "")
        assert again.server_id is None


def test_a_second_device_model_for_the_same_domain_is_refused(tmp_path: Path) -> None:
    with RestartState(tmp_path, 3, "dev"):
        with pytest.raises(StateBusyError, match="held by another running device model"):
            RestartState(tmp_path, 3, "dev")
    RestartState(tmp_path, 3, "dev").close()  # the lock went with the first one's close


def test_a_store_cut_short_leaves_the_previous_state_whole(tmp_path: Path) -> None:
    with RestartState(tmp_path, 3, "dev", device_size=8) as state:
        state.device.store(LAYOUT, 1, 1)
        state.device.store(LAYOUT, 2, 2)
        # a kill in the middle of the next store: half of the other copy written, no switch
        current = state._words[6]
        other = 1 if current == 2 else 2
        off = state.device._offsets[other]
        state._view[off : off + 4] = b"\xff" * 4
    with RestartState(tmp_path, 3, "dev", device_size=8) as again:
        assert again.device.load() == LAYOUT.pack(2, 2)


def test_a_file_of_another_layout_or_domain_is_replaced_saying_so(tmp_path: Path) -> None:
    (tmp_path / "dom3-dev.state").write_bytes(b"junk")
    with RestartState(tmp_path, 3, "dev") as state:
        assert state.stale is not None and "not a state file" in state.stale and state.server_id is None
    RestartState(tmp_path, 3, "dev", device_size=8).close()  # another size: afresh
    with RestartState(tmp_path, 3, "dev", device_size=8) as state:
        state._words[3] = 5  # a record...
    (tmp_path / "dom3-dev.state").rename(tmp_path / "dom4-dev.state")  # ... moved to another domain's name
    with RestartState(tmp_path, 4, "dev", device_size=8) as state:
        assert state.server_id is None and "another device or domain" in (state.stale or "")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(domid=0, name="x"), "domid=0"),
        (dict(domid=True, name="x"), "domid=True"),
        (dict(domid=1, name="a/b"), "name='a/b'"),
        (dict(domid=1, name=""), "name=''"),
        (dict(domid=1, name="x", device_size=-1), "device_size=-1"),
    ],
)
def test_bad_arguments_are_named(tmp_path: Path, kw: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RestartState(tmp_path, **kw)  # type: ignore[arg-type]


def test_clear_empties_the_record_when_the_file_cannot_be_removed(tmp_path: Path) -> None:
    state = RestartState(tmp_path, 3, "dev", device_size=8)
    state._words[3] = 2
    state.device.store(LAYOUT, 1, 1)
    keep = tmp_path / "kept"
    os.link(state.path, keep)  # the same file under another name, for the test to read
    state.path.unlink()  # its path unreachable, as after a chroot: the mapping is all that is left
    state.clear()
    state.close()
    state.device.store(LAYOUT, 3, 3)  # after the close: harmless, not into the file
    data = keep.read_bytes()
    assert struct.unpack_from("<I", data, 12)[0] == 0 and struct.unpack_from("<I", data, 24)[0] == 0
