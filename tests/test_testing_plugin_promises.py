"""What the pytest plugin promises and let pass before: a server left in a domain by a test that
used ``device_model`` directly, a read wider than its access, impossible access sizes, a write's
failure told as a read's, a reversed range, ``GuestTimeout`` buried under the guest's source, and
an ``IoreqServer`` on a mock ``DeviceModel`` that went for the real ``/dev/xen/privcmd``."""

from __future__ import annotations

import pytest

from xendmop import DeviceModel
from xendmop.errors import ArgumentError
from xendmop.mock import MockXen
from xendmop.mock.simguest import SimGuest
from xendmop.runtime.server import IoreqServer

pytest_plugins = ["pytester"]

DEVICES = """
class Wide:
    def read(self, addr, size):
        return 0x12345          # more than a 1-byte read can carry

    def write(self, addr, size, value):
        pass


class BadWrite:
    def read(self, addr, size):
        return 0

    def write(self, addr, size, value):
        raise RuntimeError("the device broke on write")
"""


def test_a_server_left_by_a_test_that_used_device_model_fails_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_leaves_a_server(device_model, hvm_domain):
            sid = device_model.create_ioreq_server(hvm_domain, 0)
            device_model.set_ioreq_server_state(hvm_domain, sid, True)
        """
    )
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*ioreq server(s) [[]0[]] left behind*"])


def test_a_read_wider_than_its_access_is_a_device_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        DEVICES
        + """
def test_wide(serve, guest):
    serve(ports={(0x510, 0x510): Wide()})
    assert guest.inb(0x510) == 0xFF   # floated, not silently truncated to 0x45
"""
    )
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*1 read(s) raised or returned a value wider than the access*"])


def test_a_write_that_raised_is_told_as_a_write(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        DEVICES
        + """
def test_bad_write(serve, guest):
    serve(ports={(0x510, 0x510): BadWrite()})
    guest.outb(0x510, 1)
"""
    )
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*1 write(s) raised (the write was dropped)*"])
    result.stdout.no_fnmatch_line("*the guest read all-ones*")


@pytest.mark.parametrize("size", [0, 3, 16])
def test_impossible_access_sizes_are_argument_errors(guest: SimGuest, size: int) -> None:
    with pytest.raises(ArgumentError, match=f"size={size}"):
        guest.mmio_read(0x1000, size)
    with pytest.raises(ArgumentError, match=f"size={size}"):
        guest.mmio_write(0x1000, size, 0)
    with pytest.raises(ArgumentError, match=f"size={size}"):
        guest.pci_config_read(0, 0, size)


def test_a_reversed_range_says_it_is_reversed(device_model: DeviceModel, xen_host: MockXen, hvm_domain: int) -> None:
    server = IoreqServer(device_model, hvm_domain)
    with pytest.raises(ValueError, match="reversed"):
        server.add_port_range(0x511, 0x510, object(), "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reversed"):
        server.add_mmio_range(0x2000, 0x1000, object(), "x")  # type: ignore[arg-type]


def test_guest_timeout_shows_the_tests_line_not_the_guests_source(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import time
        import pytest

        class Slow:
            def read(self, addr, size):
                time.sleep(1)   # longer than the guest waits
                return 0

            def write(self, addr, size, value):
                pass

        @pytest.mark.xen_guest(timeout=0.2)
        def test_times_out(serve, guest):
            serve(ports={(0x600, 0x600): Slow()})
            guest.inb(0x600)
        """
    )
    result = pytester.runpytest("-q", "-p", "no:cacheprovider", "-k", "times_out")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "GuestTimeout" in text and "guest.inb(0x600)" in text
    assert "simguest.py" not in text, text
    assert len(text.splitlines()) < 40, text


def test_an_ioreq_server_reaches_xen_the_way_its_device_model_does(hvm_domain: int, xen_host: MockXen) -> None:
    with DeviceModel.open("mock", xen=xen_host) as dm:
        server = IoreqServer(dm, hvm_domain)  # no opener: the DeviceModel's mock, not /dev/xen/privcmd
        with server:
            assert server.running
            assert len(xen_host.domain(hvm_domain).snapshot()["servers"]) >= 1
        assert not any(s is not None for s in xen_host.domain(hvm_domain).snapshot()["servers"])
