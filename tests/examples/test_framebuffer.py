"""examples/framebuffer.py: the PNG encoder, dirty-page-only rendering on the mock, the command line."""

from __future__ import annotations

import errno
import os
import random
import runpy
import select
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from example_cli import deprivileged, example_env, hold_until_signal

from xendmop import DeviceModel
from xendmop.mock import MockXen
from xendmop.mock.simguest import SimGuest
from xendmop.runtime import ForeignMemory
from xendmop.testing import ServeFactory

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "framebuffer.py"
fbmod: dict[str, Any] = runpy.run_path(str(SCRIPT))
Framebuffer = fbmod["Framebuffer"]
PAGE = 4096


def decode_png(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, RGB bytes) of an 8-bit truecolour PNG with filter 0 rows; checks every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, compression, filtering, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = width * 3
    assert len(raw) == height * (stride + 1)
    rows = [raw[y * (stride + 1) : (y + 1) * (stride + 1)] for y in range(height)]
    assert all(row[0] == 0 for row in rows)  # filter type None
    return width, height, b"".join(row[1:] for row in rows)


# --- PNG encoder -------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(1, 1), (7, 3), (320, 200)])
def test_png_round_trips(width: int, height: int) -> None:
    rgb = random.Random(width * height).randbytes(width * height * 3)
    assert decode_png(fbmod["encode_png"](width, height, rgb)) == (width, height, rgb)


def test_incremental_png_deflates_only_the_bands_marked_changed() -> None:
    width, height = 40, 50  # four bands of 16 rows, the last one short
    rgb = bytearray(random.Random(1).randbytes(width * height * 3))
    png = fbmod["IncrementalPng"](width, height)
    assert decode_png(png.encode(rgb)) == (width, height, bytes(rgb)) and png.bands_deflated == 4
    before = bytes(rgb)
    rgb[(49 * width + 3) * 3] ^= 0xFF  # a pixel in the last row, unannounced: the cached band is reused
    assert decode_png(png.encode(rgb))[2] == before and png.bands_deflated == 4
    png.invalidate_rows(49, 49)
    assert decode_png(png.encode(rgb)) == (width, height, bytes(rgb)) and png.bands_deflated == 5
    rgb[(15 * width) * 3 : (17 * width) * 3] = bytes(2 * width * 3)  # rows 15-16 straddle bands 0 and 1
    png.invalidate_rows(15, 16)
    assert decode_png(png.encode(rgb)) == (width, height, bytes(rgb)) and png.bands_deflated == 7
    png.invalidate_rows(-5, 1000)  # clamped to the picture
    assert decode_png(png.encode(rgb))[2] == bytes(rgb) and png.bands_deflated == 11
    with pytest.raises(ValueError, match=r"png: 40x50 needs 6000 RGB bytes, got 3"):
        png.encode(b"abc")


@pytest.mark.parametrize("lengths", [(0, 0), (1, 0), (0, 7), (5, 70000), (200000, 3), (65521, 65521)])
def test_adler32_of_a_concatenation(lengths: tuple[int, int]) -> None:
    rng = random.Random(sum(lengths))
    a, b = rng.randbytes(lengths[0]), bytes([255]) * lengths[1]  # all-0xff: the sums wrap soonest
    assert fbmod["adler32_concat"](zlib.adler32(a), zlib.adler32(b), len(b)) == zlib.adler32(a + b)


def test_png_refuses_a_buffer_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match=r"png: 2x2 needs 12 RGB bytes, got 11"):
        fbmod["encode_png"](2, 2, bytes(11))
    with pytest.raises(ValueError, match=r"png: 0x2"):
        fbmod["encode_png"](0, 2, b"")


def test_png_file_replaces_atomically(tmp_path: Path) -> None:
    sink = fbmod["PngFile"](tmp_path / "shot.png")
    try:
        sink(b"first")
        sink(b"second")
    finally:
        sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shot.png"]
    assert (tmp_path / "shot.png").read_bytes() == b"second"


def test_png_file_in_place_rewrites_the_file_it_opened_and_holds_no_directory(tmp_path: Path) -> None:
    sink = fbmod["PngFile"](tmp_path / "shot.png", in_place=True)
    try:
        sink(b"a longer first snapshot")
        sink(b"second")  # shorter: the file is truncated to it
        held = [os.readlink(fd) for fd in Path("/proc/self/fd").iterdir() if os.path.exists(fd)]
        assert str(tmp_path) not in held and str(tmp_path / "shot.png") in held
    finally:
        sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shot.png"]
    assert (tmp_path / "shot.png").read_bytes() == b"second"


def test_periodic_timer_is_a_real_fd() -> None:
    slow, fast = fbmod["PeriodicTimer"](5), fbmod["PeriodicTimer"](0.01)
    try:
        time.sleep(0.1)
        assert slow.expirations() == 0  # not due yet: a non-blocking read, no wait
        assert fast.expirations() >= 2
        assert select.select([fast], [], [], 5)[0] == [fast]  # readable when due: what the serve loop waits on
    finally:
        slow.close()
        fast.close()
    with pytest.raises(ValueError, match="interval=0"):
        fbmod["PeriodicTimer"](0)


# --- the guest script on the mock: only dirty pages are re-read --------------------------------


def square_pages() -> int:
    """Pages the script's square touches, from its geometry (not from the device)."""
    width, _ = fbmod["MODE"]
    x0, y0, w, h = fbmod["SQUARE"]
    pages = {((y * width + x) * 4) // PAGE for y in range(y0, y0 + h) for x in (x0, x0 + w - 1)}
    return len(pages)


def test_guest_script_rerenders_only_dirty_pages() -> None:
    pngs: list[bytes] = []
    lines: list[str] = []
    report = fbmod["run_on_mock"](pngs.append, out=lines.append)
    assert report.detected and report.enabled_with_bad_mode == 0
    width, height = fbmod["MODE"]
    total = -(-width * height * 4 // PAGE)
    assert report.nr_pages == total
    assert report.pages_read == [total, square_pages(), 0, 1]
    assert len(pngs) == 3  # nothing dirty, no new snapshot
    background = bytes(fbmod["BACKGROUND"]) * (width * height)
    assert decode_png(pngs[0]) == (width, height, background)
    assert decode_png(pngs[-1]) == (width, height, fbmod["expected_image"]())
    assert report.tracking_after_disable is None  # display off: Xen tracks nothing any more
    assert lines[1] == f"background: re-read {total} of {total} pages"


def fb_on(serve: ServeFactory, xen: MockXen, domid: int, dm: DeviceModel) -> tuple[Any, ForeignMemory]:
    fmem = ForeignMemory(xen.open_device)
    fmem.restrict(domid)
    fb = Framebuffer(dm, domid, fmem)
    serve(ports={(0x1CE, 0x1D0): fb})
    return fb, fmem


def program(guest: Any, **regs: int) -> None:
    index = {"xres": 1, "yres": 2, "bpp": 3, "enable": 4, "gfn_lo": 0x10, "gfn_hi": 0x11, "flush": 0x12}
    for name, value in regs.items():
        guest.outw(0x1CE, index[name])
        guest.outw(0x1CF, value)


@pytest.mark.parametrize(
    ("regs", "why"),
    [
        ({"xres": 0, "yres": 10, "bpp": 32}, "xres=0: must be 1..1024"),
        ({"xres": 10, "yres": 769, "bpp": 32}, "yres=769: must be 1..768"),
        ({"xres": 10, "yres": 10, "bpp": 24}, "bpp=24: only 32 is supported"),
        ({"xres": 64, "yres": 64, "bpp": 32, "gfn_lo": 0xFFFF, "gfn_hi": 0xF}, "fb_gfn=0xfffff"),
    ],
)
def test_bad_mode_is_refused_naming_the_field(
    serve: ServeFactory, xen_host: MockXen, hvm_domain: int, device_model: DeviceModel, guest: SimGuest,
    regs: dict[str, int], why: str,
) -> None:  # fmt: skip
    fb, fmem = fb_on(serve, xen_host, hvm_domain, device_model)
    try:
        program(guest, **regs, enable=1)
        guest.outw(0x1CE, 4)
        assert guest.inw(0x1CF) == 0 and why in fb.error
        program(guest, flush=1)
        assert fb.pages_read == 0 and xen_host.domain(hvm_domain).snapshot()["vram"] is None
    finally:
        fb.close()
        fmem.close()


def test_mode_is_frozen_while_on_and_unseen_writes_are_not_reread(
    serve: ServeFactory, xen_host: MockXen, hvm_domain: int, device_model: DeviceModel, guest: SimGuest
) -> None:
    fb, fmem = fb_on(serve, xen_host, hvm_domain, device_model)
    try:
        program(guest, xres=64, yres=64, bpp=32, gfn_lo=0x200, gfn_hi=0, enable=1, flush=1)
        assert fb.polls[-1].pages_read == 4 and (fb.width, fb.height, fb.gfn) == (64, 64, 0x200)
        program(guest, xres=128)  # ignored while the display is on
        guest.outw(0x1CE, 1)
        assert guest.inw(0x1CF) == 64
        # A store Xen does not see (dom0's own mapping, no modified_memory) is not re-read ...
        sneaky = fmem.map(hvm_domain, [0x202])
        sneaky.view[:4] = bytes((1, 2, 3, 0))
        fmem.unmap(sneaky)
        program(guest, flush=1)
        assert fb.polls[-1].pages_read == 0 and fb.rgb[2 * 1024 * 3 : 2 * 1024 * 3 + 3] == b"\0\0\0"
        # ... a guest store to the same page is, and then the page's current contents show.
        guest.write_ram(0x202000 + 4, bytes((4, 5, 6, 0)))
        program(guest, flush=1)
        assert fb.polls[-1].pages_read == 1
        assert fb.rgb[2 * 1024 * 3 : 2 * 1024 * 3 + 6] == bytes((3, 2, 1, 6, 5, 4))
    finally:
        fb.close()
        fmem.close()


def test_a_dirty_page_costs_one_band_of_compression(
    serve: ServeFactory, xen_host: MockXen, hvm_domain: int, device_model: DeviceModel, guest: SimGuest
) -> None:
    fmem = ForeignMemory(xen_host.open_device)
    fmem.restrict(hvm_domain)
    pngs: list[bytes] = []
    fb = Framebuffer(device_model, hvm_domain, fmem, pngs.append)
    serve(ports={(0x1CE, 0x1D0): fb})
    try:
        program(guest, xres=256, yres=64, bpp=32, gfn_lo=0x200, gfn_hi=0, enable=1, flush=1)
        assert fb.polls[-1].pages_read == 16 and fb.png.bands_deflated == 4  # 256x64: 16 pages, 4 bands
        guest.write_ram(0x200000 + (40 * 256 + 7) * 4, bytes((9, 8, 7, 0)))  # pixel (7, 40): page 10, band 2
        program(guest, flush=1)
        assert fb.polls[-1].pages_read == 1 and fb.png.bands_deflated == 5
        picture = bytearray(256 * 64 * 3)
        picture[(40 * 256 + 7) * 3 : (40 * 256 + 7) * 3 + 3] = bytes((7, 8, 9))
        assert len(pngs) == 2 and decode_png(pngs[-1]) == (256, 64, bytes(picture))
    finally:
        fb.close()
        fmem.close()


def test_a_snapshot_that_cannot_be_written_does_not_stop_the_display(
    serve: ServeFactory, xen_host: MockXen, hvm_domain: int, device_model: DeviceModel, guest: SimGuest
) -> None:
    def full_disk(png: bytes) -> None:
        raise OSError(errno.EFBIG, "File too large")  # what RLIMIT_FSIZE gives a deprivileged model

    fmem = ForeignMemory(xen_host.open_device)
    fmem.restrict(hvm_domain)
    fb = Framebuffer(device_model, hvm_domain, fmem, full_disk)
    serve(ports={(0x1CE, 0x1D0): fb})
    try:
        program(guest, xres=16, yres=16, bpp=32, gfn_lo=0x200, gfn_hi=0, enable=1, flush=1)
        guest.write_ram(0x200000, b"\1\2\3\0")
        program(guest, flush=1)
        assert [(p.pages_read, p.wrote_png) for p in fb.polls] == [(1, False), (1, False)]
        assert fb.rgb[:3] == b"\3\2\1" and detected(guest)
    finally:
        fb.close()
        fmem.close()


# --- the command line ------------------------------------------------------------------------------


def run(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=example_env(),
    )


def test_command_line_writes_the_snapshot(tmp_path: Path) -> None:
    done = run("--verbose", "--output", str(tmp_path / "out.png"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"square: re-read {square_pages()} of 63 pages" in done.stdout
    assert "ioreq server 0 destroyed" in done.stderr
    width, height = fbmod["MODE"]
    assert decode_png((tmp_path / "out.png").read_bytes()) == (width, height, fbmod["expected_image"]())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_command_line_refusals(tmp_path: Path) -> None:
    done = run("--depriv", "990:990", cwd=tmp_path)
    assert done.returncode == 2
    assert "real dom0" in done.stderr and "XENDMOP_MOCK_SOCKET" in done.stderr
    missing = run("--output", str(tmp_path / "no" / "such.png"), cwd=tmp_path)
    assert missing.returncode == 2 and "--output" in missing.stderr.splitlines()[-1]
    bad = run("--interval", "-1", cwd=tmp_path)
    assert bad.returncode == 2 and "--interval -1.0: must be 0 (FLUSH only) or 0.001..3600" in bad.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_tears_the_server_down(tmp_path: Path, signum: int) -> None:
    status, out, err = hold_until_signal(SCRIPT, "--verbose", "--output", str(tmp_path / "fb.png"), signum=signum)
    assert status == 0, err
    assert f"signal {signum}: ioreq server destroyed, none left in the domain" in out
    assert "ioreq server 0 destroyed" in err


# --- a deprivileged device model in its own process, on a mock host process -------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_deprivileged_device_model_serves_a_mock_host_process(mock_host_process: str, tmp_path: Path) -> None:
    from xendmop.mock.remote import RemoteGuest, RemoteXen

    shots = tmp_path / "shots"
    shots.mkdir()
    png = shots / "fb.png"  # opened before the drop, rewritten in place: no path lookups after it
    with deprivileged(
        SCRIPT, mock_host_process, "--interval", "0", "--output", str(png), ready="deprivileged to uid 65534"
    ) as proc:
        with RemoteXen(mock_host_process) as remote:
            report = fbmod["guest_script"](RemoteGuest(remote, 1), lambda: remote.snapshot(1))
            assert report.pages_read == [report.nr_pages, square_pages(), 0, 1]
            assert report.tracking_after_disable is None
            held = [os.readlink(fd) for fd in Path(f"/proc/{proc.pid}/fd").iterdir()]
            # A directory fd would let the process fchdir out of its chroot (depriv-check fails it).
            assert not [path for path in held if os.path.isdir(path)], held
            assert str(png) in held
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            assert remote.servers(1) == {}
    width, height = fbmod["MODE"]
    assert decode_png(png.read_bytes()) == (width, height, fbmod["expected_image"]())
    assert sorted(p.name for p in shots.iterdir()) == ["fb.png"]  # in place: no temporary file


def detected(guest: Any) -> bool:
    """The driver's probe: ID reads 0xB0C5 (unrouted ports read all-ones)."""
    guest.outw(0x1CE, 0)
    return bool(guest.inw(0x1CF) == 0xB0C5)


def test_timer_renders_what_the_guest_draws_without_a_flush(mock_host_process: str, tmp_path: Path) -> None:
    from xendmop.mock.remote import RemoteGuest, RemoteXen

    png = tmp_path / "timer.png"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--domid", "1", "--interval", "0.05", "--output", str(png)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=example_env(XENDMOP_MOCK_SOCKET=mock_host_process),
    )
    try:
        with RemoteXen(mock_host_process) as remote:
            guest = RemoteGuest(remote, 1)
            deadline = time.monotonic() + 30
            while not detected(guest) and time.monotonic() < deadline:  # until its ports are routed
                time.sleep(0.05)
            program(guest, xres=8, yres=8, bpp=32, gfn_lo=0x300, gfn_hi=0, enable=1)  # no FLUSH from here on
            picture = random.Random(8).randbytes(8 * 8 * 4)
            guest.write_ram(0x300000, picture)
            want = bytes(b for i in range(0, len(picture), 4) for b in picture[i : i + 3][::-1])
            got = None
            while got != (8, 8, want) and time.monotonic() < deadline:
                time.sleep(0.05)
                got = decode_png(png.read_bytes()) if png.exists() else None
            assert got == (8, 8, want)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            assert remote.servers(1) == {} and remote.snapshot(1)["vram"] is None  # tracking stopped on exit
    finally:
        proc.kill()
        proc.wait()


def test_bad_domid_and_unreachable_host_are_reported_not_raised(tmp_path: Path) -> None:
    bad = run("--domid", "0", cwd=tmp_path)
    assert bad.returncode == 2 and "error: argument --domid: '0': expected a guest domid, 1..32751" in bad.stderr
    gone = subprocess.run(
        [sys.executable, str(SCRIPT), "--domid", "1", "--output", str(tmp_path / "fb.png")],
        capture_output=True,
        text=True,
        timeout=60,
        env=example_env(XENDMOP_MOCK_SOCKET=str(tmp_path / "no-such.sock")),
    )
    assert gone.returncode == 1 and "Traceback" not in gone.stderr
    assert gone.stderr.startswith("framebuffer: dom1: ") and "No such file or directory" in gone.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_domain_that_cannot_be_served_is_not_announced_as_served(mock_host_process: str, tmp_path: Path) -> None:
    refused = subprocess.run(
        [sys.executable, str(SCRIPT), "--domid", "2", "--output", str(tmp_path / "fb.png")],  # dom2 is PV
        capture_output=True,
        text=True,
        timeout=60,
        env=example_env(XENDMOP_MOCK_SOCKET=mock_host_process),
    )
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "framebuffer: dom2: " in refused.stderr and "Invalid argument" in refused.stderr
    assert "Ctrl-C to stop" not in refused.stderr, refused.stderr
