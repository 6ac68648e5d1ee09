"""Every object that owns an fd or a C library handle is an ``OwnedHandle``: one close, one
``closed``, one context manager, one closed-use error naming the handle."""

from __future__ import annotations

import pytest

from xendmop import ClosedHandleError, DeviceModel
from xendmop.backends.libxen_handles import LibxenEventChannel, LibxenForeignMemory
from xendmop.handle import OwnedHandle
from xendmop.runtime.evtchn import EventChannel
from xendmop.runtime.foreignmemory import ForeignMemory


@pytest.mark.parametrize("cls", [DeviceModel, EventChannel, ForeignMemory, LibxenEventChannel, LibxenForeignMemory])
def test_each_fd_owner_is_an_owned_handle(cls: type) -> None:
    assert issubclass(cls, OwnedHandle)
    for name in ("close", "closed", "__enter__", "__exit__"):  # the skeleton is the base's, not restated
        assert name not in vars(cls), f"{cls.__name__}.{name}"


def test_a_closed_handle_says_which_it_is_and_closes_once() -> None:
    with DeviceModel.open("mock") as dm:
        assert not dm.closed
    assert dm.closed
    dm.close()  # a second close does nothing
    with pytest.raises(ClosedHandleError, match="the DeviceModel is closed") as info:
        dm.nr_vcpus(1)
    assert not isinstance(info.value, OSError)  # misuse, not a refusal


class Resource:
    def __init__(self) -> None:
        self.closes = 0

    def close(self) -> None:
        self.closes += 1


class Named(OwnedHandle[Resource]):
    def poke(self) -> Resource:
        return self._use("poke")


def test_the_base_names_the_handle_and_the_call() -> None:
    resource = Resource()
    with Named(resource) as handle:
        assert handle.poke() is resource
    handle.close()
    assert resource.closes == 1
    with pytest.raises(ClosedHandleError, match="Named is closed") as info:
        handle.poke()
    assert "poke" in str(info.value)
