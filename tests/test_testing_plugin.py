"""The pytest plugin ``xendmop.testing`` as a device model's author uses it: test files run
by ``pytester``, with the plugin found through its ``pytest11`` entry point."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xendmop import DeviceModel
from xendmop.mock import MockXen
from xendmop.runtime.server import IoreqServer
from xendmop.testing import ServeThread, assert_no_ioreq_server

pytest_plugins = ["pytester"]

SCRATCH_DEVICE = """
import pytest

class Scratch:
    '''A one-register device: reads give back the last byte written (plus ``skew``).'''

    def __init__(self, skew=0):
        self.value, self.skew = 0, skew

    def read(self, addr, size):
        return (self.value + self.skew) & 0xFF

    def write(self, addr, size, value):
        self.value = value
"""


def test_a_users_device_test_passes_with_the_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        SCRATCH_DEVICE
        + """
@pytest.mark.xen_domain(vcpus=2, memory_mb=8)
def test_scratch(serve, guest, xen_host, hvm_domain, device_model, make_domain):
    server = serve(ports={(0x3FF, 0x3FF): Scratch()})
    assert server.running and xen_host.domain(hvm_domain).hvm
    assert device_model.nr_vcpus(hvm_domain) == 2
    guest.outb(0x3FF, 0x5A, vcpu=1)
    assert guest.inb(0x3FF) == 0x5A
    assert guest.inb(0x2F8) == 0xFF  # nobody claims COM2
    pv = make_domain(hvm=False, memory_mb=1)
    assert not xen_host.domain(pv).hvm
"""
    )
    # A subprocess: the plugin must come from its entry point, not from this process.
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_a_device_that_answers_wrongly_fails_the_users_test_clearly(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        SCRATCH_DEVICE
        + """
def test_scratch(serve, guest):
    serve(ports={(0x3FF, 0x3FF): Scratch(skew=1)})
    guest.outb(0x3FF, 0x5A)
    assert guest.inb(0x3FF) == 0x5A
"""
    )
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*assert 91 == 90*", "*where 91 = *inb*"])


def test_an_unanswered_access_times_out_naming_the_vcpu(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
import time
from pathlib import Path
import pytest

class Stuck:
    def read(self, addr, size):
        time.sleep(1.5)  # longer than the guest waits
        return 0

    def write(self, addr, size, value):
        pass

@pytest.mark.xen_domain(vcpus=2)
@pytest.mark.xen_guest(timeout=0.3)
def test_stuck(serve, guest):
    serve(ports={(0x60, 0x60): Stuck()})
    guest.inb(0x60, vcpu=1)
"""
    )
    began = time.monotonic()
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    assert time.monotonic() - began < 10
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*GuestTimeout: dom1 vCPU1: no answer in 0.3s to ?pio read addr=0x60*"])


def test_a_device_that_raises_fails_the_test_at_teardown(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
import pytest

class Buggy:
    def read(self, addr, size):
        return 1 // 0

    def write(self, addr, size, value):
        pass

def test_buggy(serve, guest):
    serve(ports={(0x70, 0x71): Buggy()})
    assert guest.inb(0x70) == 0xFF  # the dispatcher answers all-ones for a device that raised

def test_buggy_expected(serve, guest):
    serve(ports={(0x70, 0x71): Buggy()}, allow_device_errors=True)
    assert guest.inb(0x71) == 0xFF
"""
    )
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_buggy*", "*1 read(s) raised*the guest read all-ones*"])
    result.stdout.no_fnmatch_line("*teardown of test_buggy_expected*")


def test_a_leaked_ioreq_server_fails_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
from xendmop.runtime import IoreqServer

def test_leaks(serve, device_model, xen_host, hvm_domain):
    serve()
    IoreqServer(device_model, hvm_domain, opener=xen_host.open_device).start()  # never closed
"""
    )
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*dom1: ioreq server(s) [[]1[]] left behind after the test*"])


def test_hvm_domain_marker_refuses_a_pv_domain(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
import pytest

@pytest.mark.xen_domain(hvm=False)
def test_pv(hvm_domain):
    pass
"""
    )
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*hvm_domain is always HVM*"])


def test_serve_thread_tears_the_server_down_when_it_stops() -> None:
    with MockXen() as xen:
        domid = xen.create_domain(vcpus=1, memory_mb=4)
        with DeviceModel.open("mock", xen=xen) as dm:
            server = IoreqServer(dm, domid, opener=xen.open_device)
            with ServeThread(server):
                with pytest.raises(AssertionError, match=r"dom1: ioreq server\(s\) \[0\] left behind"):
                    assert_no_ioreq_server(xen, domid)
            assert_no_ioreq_server(xen, domid)
            assert not server.running


def test_the_plugin_imports_neither_the_mock_nor_the_runtime() -> None:
    code = (
        "import sys, xendmop.testing; "
        "print(sorted(m for m in sys.modules if m.startswith(('xendmop.mock', 'xendmop.runtime'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_the_readme_example_passes_as_a_test_file(pytester: pytest.Pytester) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Testing a device model", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None, "README lost its plugin example"
    pytester.makepyfile(block.group(1))
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_mock_host_process_serves_another_process(mock_host_process: str) -> None:
    from xendmop.mock.remote import RemoteXen

    with RemoteXen(mock_host_process) as remote, DeviceModel.open("mock", xen=remote) as dm:
        assert dm.nr_vcpus(1) >= 1 and remote.servers(1) == {}
        server = IoreqServer(dm, 1, opener=remote.open_device).start()
        try:
            assert list(remote.servers(1)) == [server.id]
        finally:
            server.close()
        assert remote.servers(1) == {}


def blocked_signals(task_status: str) -> set[int]:
    """The signals a thread blocks, from its /proc status file."""
    found = re.search(r"^SigBlk:\s*([0-9a-f]+)$", Path(task_status).read_text(), re.M)
    assert found is not None, task_status
    mask = int(found.group(1), 16)
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


def test_the_serving_thread_leaves_sigint_and_sigterm_to_the_main_thread() -> None:
    with MockXen() as xen, DeviceModel.open("mock", xen=xen) as dm:
        domid = xen.create_domain(vcpus=1, memory_mb=4)
        serving = ServeThread(IoreqServer(dm, domid, opener=xen.open_device))
        with serving:
            in_serving_thread = blocked_signals(f"/proc/self/task/{serving._thread.native_id}/status")
        assert {signal.SIGINT, signal.SIGTERM} <= in_serving_thread
        assert signal.SIGTERM not in blocked_signals("/proc/thread-self/status")  # the caller's mask as it was


def test_a_bad_xen_guest_marker_is_refused_naming_the_marker_and_the_value(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
import pytest

@pytest.mark.xen_guest(timeout="x")
def test_text(guest):
    pass

@pytest.mark.xen_guest(timeout=0)
def test_zero(guest):
    pass

@pytest.mark.xen_guest(timeout=float("nan"))
def test_nan(guest):
    pass

@pytest.mark.xen_guest(timeout=True)
def test_bool(guest):
    pass

@pytest.mark.xen_guest(0.5, timout=1)
def test_misspelt(guest):
    pass

@pytest.mark.xen_guest(timeout=0.25)
def test_good(guest):
    assert guest.timeout == 0.25
"""
    )
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=5)
    result.stdout.fnmatch_lines_random(
        [
            "*xen_guest(timeout=...): 'x' is not a number of seconds above 0*",
            "*xen_guest(timeout=...): 0 is not a number of seconds above 0*",
            "*xen_guest(timeout=...): nan is not a number of seconds above 0*",
            "*xen_guest(timeout=...): True is not a number of seconds above 0*",
            "*xen_guest marker: takes timeout=SECONDS only, not 0.5, timout=*",
        ]
    )
