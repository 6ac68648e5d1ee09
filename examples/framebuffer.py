"""framebuffer: a linear framebuffer in guest RAM, rendered to a PNG from its dirty pages.

It emulates a minimal display in the style of Bochs' VBE "dispi" interface: an
index/data register pair at I/O ports 0x1CE/0x1CF (16-bit accesses) sets the mode
and says where in its own RAM the guest keeps the framebuffer:

====== ========= ===========================================================
index  name      meaning
====== ========= ===========================================================
0x00   ID        reads 0xB0C5 (Bochs' VBE_DISPI_ID5): "the display is here"
0x01   XRES      width in pixels, 1..1024
0x02   YRES      height in pixels, 1..768
0x03   BPP       bits per pixel: 32 (XRGB, little-endian) only
0x04   ENABLE    bit 0: display on (the mode registers are frozen while on)
0x10   FB_GFN_LO guest frame number of the framebuffer, low 16 bits
0x11   FB_GFN_HI ... and high 16 bits
0x12   FLUSH     any write: render the dirty pages now (also done on a timer)
0x13   LAST_READ pages the last poll re-read (read-only; what "only dirty pages" costs)
====== ========= ===========================================================

The device model maps the framebuffer's frames once (foreign mapping through
privcmd, restricted to the domain), asks Xen which of them the guest wrote since the
last look (``XEN_DMOP_track_dirty_vram``; Xen needs the domain in HAP or shadow mode
and turns log-dirty on), converts only those pages into its own RGB pixel buffer and
writes a PNG snapshot with its own small encoder (zlib + struct) that re-compresses only
the 16-row bands those pages touch.  A mode that is out of
range, or a framebuffer outside the guest's RAM, is refused (the display stays off)
and the reason is kept in ``Framebuffer.error``.  At most 768 pages are tracked, well
inside one DMOP buffer (the library would split a larger range itself).

Run it:

    python examples/framebuffer.py                    # on the mock Xen: a simulated guest draws
    python examples/framebuffer.py --output shot.png  # ... and the snapshot goes here
    python examples/framebuffer.py --hold             # the same, then serve until Ctrl-C
    python examples/framebuffer.py --domid 5 --output /srv/dom5.png   # a real dom0, until Ctrl-C
    python examples/framebuffer.py --domid 5 --depriv 990:990 --chroot /var/empty
    XENDMOP_MOCK_SOCKET=/run/mock.sock python examples/framebuffer.py --domid 1 --depriv 990:990
                                                      # domain 1 of a mock host process

With ``--domid`` the PNG is rewritten every ``--interval`` seconds when pages changed
(0: only on FLUSH) and on every FLUSH, replaced atomically (a temporary file and a rename);
with ``--depriv`` the output file is opened before the privileges drop and rewritten in
place (an open directory would let the process out of its chroot), and the snapshot must stay
under the deprivileged file-size limit (256 KiB; a failed write is logged, the
display keeps running).  Once the server is up ``framebuffer: serving domN's display
on ports 0x1ce/0x1cf; Ctrl-C to stop`` goes to stderr.  Ctrl-C or SIGTERM destroys the
ioreq server, stops dirty tracking and exits 0, as after ``--hold`` on the mock
(``--help`` lists the statuses).  ``--depriv`` needs a real dom0 or a mock host in
another process (``XENDMOP_MOCK_SOCKET``, then ``--domid`` serves that host's domain):
the in-process mock shares this process, so it refuses the flag.  This example issues
no interrupt DMOPs.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import errno
import logging
import os
import struct
import sys
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xendmop import DeviceModel
from xendmop.errors import ArgumentError, XenError
from xendmop.runtime import ForeignMapping, ForeignMemory, ServeLoop, dm_program
from xendmop.runtime.dispatch import RateLimitedLog

log = logging.getLogger("framebuffer")

INDEX_PORT, DATA_PORT = 0x1CE, 0x1CF
#: a 16-bit access to the data port also covers 0x1D0 (QEMU's VBE ports include it)
LAST_PORT = 0x1D0
DISPI_ID = 0xB0C5
REG_ID, REG_XRES, REG_YRES, REG_BPP, REG_ENABLE = 0x00, 0x01, 0x02, 0x03, 0x04
REG_FB_GFN_LO, REG_FB_GFN_HI, REG_FLUSH, REG_LAST_READ = 0x10, 0x11, 0x12, 0x13
MAX_XRES, MAX_YRES, BPP = 1024, 768, 32
PAGE_SIZE = 4096
BYTES_PER_PIXEL = BPP // 8
PIXELS_PER_PAGE = PAGE_SIZE // BYTES_PER_PIXEL  # a page always holds whole pixels


# --- PNG ------------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def adler32_concat(first: int, second: int, second_len: int) -> int:
    """Adler-32 of A + B from Adler-32(A), Adler-32(B) and len(B).  Both sums start at
    (1, 0): s1(AB) = s1(A) + s1(B) - 1 and s2(AB) = s2(A) + s2(B) + len(B) * (s1(A) - 1), mod 65521."""
    base = 65521
    s1 = ((first & 0xFFFF) + (second & 0xFFFF) - 1) % base
    s2 = ((first >> 16) + (second >> 16) + second_len * ((first & 0xFFFF) - 1)) % base
    return s2 << 16 | s1


class IncrementalPng:
    """8-bit RGB PNG snapshots of a ``width * height * 3`` buffer that re-deflate only the
    bands of rows marked changed (``invalidate_rows``); other bands are reused as they were.

    IDAT holds one zlib stream (RFC 1950) whose deflate data (RFC 1951) is a run of
    independently compressed bands: each ends with a full flush (byte-aligned, history
    reset), so a band's bytes never depend on another's.  An empty final block and the
    Adler-32 of all rows, combined from each band's own checksum, close the stream.
    """

    ROWS_PER_BAND = 16
    #: zlib header: deflate, 32 KiB window, no dictionary ((0x78 << 8 | 0x01) % 31 == 0)
    ZLIB_HEADER = b"\x78\x01"
    #: an empty fixed-Huffman block with BFINAL set: what ends the stream
    FINAL_BLOCK = b"\x03\x00"

    def __init__(self, width: int, height: int) -> None:
        if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
            raise ValueError(f"png: size {width!r}x{height!r} must be positive integers")
        self.width, self.height, self.stride = width, height, width * 3
        #: per band: (deflated bytes, Adler-32 of its filtered rows, their length), None when stale
        self._bands: list[tuple[bytes, int, int] | None] = [None] * -(-height // self.ROWS_PER_BAND)
        self.bands_deflated = 0  # how many bands were (re)compressed, over the encoder's life

    def invalidate_rows(self, first: int, last: int) -> None:
        """Rows ``first..last`` (inclusive) changed: their bands are deflated again next time."""
        for band in range(max(first, 0) // self.ROWS_PER_BAND, min(last, self.height - 1) // self.ROWS_PER_BAND + 1):
            self._bands[band] = None

    def encode(self, rgb: bytes | bytearray | memoryview) -> bytes:
        """The PNG: stale bands deflated from ``rgb``, the others as they were last deflated."""
        if len(rgb) != self.stride * self.height:
            raise ValueError(
                f"png: {self.width}x{self.height} needs {self.stride * self.height} RGB bytes, got {len(rgb)}"
            )
        view, adler, parts = memoryview(rgb), 1, []
        for band, cached in enumerate(self._bands):
            if cached is None:
                rows = range(band * self.ROWS_PER_BAND, min((band + 1) * self.ROWS_PER_BAND, self.height))
                raw = b"".join(b"\0" + view[y * self.stride : (y + 1) * self.stride] for y in rows)  # filter 0
                deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
                cached = (deflate.compress(raw) + deflate.flush(zlib.Z_FULL_FLUSH), zlib.adler32(raw), len(raw))
                self._bands[band] = cached
                self.bands_deflated += 1
            parts.append(cached[0])
            adler = adler32_concat(adler, cached[1], cached[2])
        idat = self.ZLIB_HEADER + b"".join(parts) + self.FINAL_BLOCK + struct.pack(">I", adler)
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit truecolour, no interlace
        return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def encode_png(width: int, height: int, rgb: bytes | bytearray | memoryview) -> bytes:
    """An 8-bit RGB PNG of ``rgb`` (``width * height * 3`` bytes, rows top to bottom)."""
    if width <= 0 or height <= 0 or len(rgb) != width * 3 * height:
        raise ValueError(f"png: {width}x{height} needs {width * 3 * height} RGB bytes, got {len(rgb)}")
    return IncrementalPng(width, height).encode(rgb)


class PngFile:
    """Writes snapshots to ``path``.

    By default atomically (a temporary file, then a rename) through a directory fd opened
    now.  ``in_place`` (what ``--depriv`` uses) instead opens the file itself now and
    rewrites it in place (write, then truncate to the new length): a directory fd kept
    across a chroot would let the deprivileged process ``fchdir`` out of it (``xendmop
    depriv-check`` fails such a process), while an fd on a regular file reaches only that
    file.  A reader may then see a snapshot being rewritten; read it between FLUSHes."""

    def __init__(self, path: str | os.PathLike[str], *, in_place: bool = False) -> None:
        text = os.fspath(path)
        self.path = Path(text)
        self.in_place = in_place
        self._dir = self._file = -1
        # A directory is no PNG file: refused now, not at every snapshot (Path drops a trailing "/").
        if text.endswith(os.sep) or self.path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a directory; give the PNG file's name, e.g. DIR/shot.png", text)
        if in_place:
            self._file = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        else:
            self._dir = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def __call__(self, png: bytes) -> None:
        if self.in_place:
            os.pwrite(self._file, png, 0)
            os.ftruncate(self._file, len(png))
            return
        tmp = f".{self.path.name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644, dir_fd=self._dir)
        try:
            try:
                os.write(fd, png)
            finally:
                os.close(fd)
            os.replace(tmp, self.path.name, src_dir_fd=self._dir, dst_dir_fd=self._dir)
        except OSError:
            with contextlib.suppress(OSError):  # no half-written temporary file left behind
                os.unlink(tmp, dir_fd=self._dir)
            raise

    def close(self) -> None:
        for fd in (self._dir, self._file):
            if fd >= 0:
                os.close(fd)
        self._dir = self._file = -1


# --- the timer the serve loop watches -------------------------------------------------------------


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class PeriodicTimer:
    """A Linux timerfd expiring every ``interval`` seconds: a real fd for ``ServeLoop.add_reader``,
    so polling runs in the loop's thread, between ioreqs, with no second thread."""

    CLOCK_MONOTONIC, TFD_NONBLOCK, TFD_CLOEXEC = 1, os.O_NONBLOCK, os.O_CLOEXEC

    def __init__(self, interval: float) -> None:
        if not 0.001 <= interval <= 3600:
            raise ValueError(f"interval={interval!r}: must be 0.001..3600 seconds")
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd: int = libc.timerfd_create(self.CLOCK_MONOTONIC, self.TFD_NONBLOCK | self.TFD_CLOEXEC)
        if self.fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"timerfd_create: {os.strerror(e)}")
        sec, nsec = int(interval), int(interval % 1 * 1e9)
        spec = _Itimerspec(_Timespec(sec, nsec), _Timespec(sec, nsec))
        if libc.timerfd_settime(self.fd, 0, ctypes.byref(spec), None) < 0:
            e = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(e, f"timerfd_settime: {os.strerror(e)}")

    def fileno(self) -> int:
        return self.fd

    def expirations(self) -> int:
        """How many periods passed since the last call (0 if none)."""
        try:
            return int.from_bytes(os.read(self.fd, 8), sys.byteorder)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- the device -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Poll:
    """One look at the framebuffer: the pages re-read (those Xen reported dirty), and whether a PNG was written."""

    pages_read: int
    wrote_png: bool


class Framebuffer:
    """The register block (an ``IoDevice`` for ports 0x1CE..0x1D0: offset 0 index, else data) and the renderer.

    ``fmem`` maps the framebuffer (restrict it to ``domid``); ``output`` receives each PNG.
    ``polls`` keeps the newest 64 ``Poll`` records; ``pages_read`` counts every page re-read.
    """

    def __init__(
        self, dm: DeviceModel, domid: int, fmem: ForeignMemory, output: Callable[[bytes], None] | None = None
    ) -> None:
        self.dm, self.domid, self.fmem, self.output = dm, domid, fmem, output
        self.index = 0
        self.regs = {REG_XRES: 640, REG_YRES: 480, REG_BPP: BPP, REG_FB_GFN_LO: 0, REG_FB_GFN_HI: 0}
        self.enabled = False
        self.error: str | None = None
        self.width = self.height = self.gfn = self.nr_pages = 0
        self.rgb = bytearray()
        self.png: IncrementalPng | None = None
        self.polls: collections.deque[Poll] = collections.deque(maxlen=64)
        self.pages_read = 0
        self._map: ForeignMapping | None = None
        self._lock = threading.Lock()  # the loop's thread polls; close() may come from another
        self._warn = RateLimitedLog(log)

    # --- IoDevice -------------------------------------------------------------------------

    def read(self, addr: int, size: int) -> int:
        if addr == 0:
            return self.index
        last_read = self.polls[-1].pages_read if self.polls else 0
        fixed = {REG_ID: DISPI_ID, REG_ENABLE: int(self.enabled), REG_LAST_READ: last_read}
        value = fixed.get(self.index, self.regs.get(self.index, 0))
        return value & ((1 << (8 * size)) - 1)

    def write(self, addr: int, size: int, value: int) -> None:
        value &= 0xFFFF
        if addr == 0:
            self.index = value
        elif self.index == REG_ENABLE:
            if value & 1:
                self.enable()
            else:
                self.disable()
        elif self.index == REG_FLUSH:
            self.poll()
        elif self.index in self.regs and not self.enabled:  # frozen while the display is on
            self.regs[self.index] = value

    # --- mode -----------------------------------------------------------------------------

    def _refuse(self, why: str) -> None:
        self.error = why
        # A guest's mistake, not the device model's: told with --verbose (QEMU: -d guest_errors).
        self._warn(logging.INFO, "mode refused", "the guest's mode is refused, display off: %s", why)

    def enable(self) -> bool:
        """Check the programmed mode, map the framebuffer, start tracking; False (and ``error``) if refused."""
        with self._lock:
            if self.enabled:
                return True
            width, height, bpp = self.regs[REG_XRES], self.regs[REG_YRES], self.regs[REG_BPP]
            gfn = self.regs[REG_FB_GFN_HI] << 16 | self.regs[REG_FB_GFN_LO]
            for name, value, low, high in (("xres", width, 1, MAX_XRES), ("yres", height, 1, MAX_YRES)):
                if not low <= value <= high:
                    self._refuse(f"{name}={value}: must be {low}..{high}")
                    return False
            if bpp != BPP:
                self._refuse(f"bpp={bpp}: only {BPP} is supported")
                return False
            nr_pages = -(-width * height * BYTES_PER_PIXEL // PAGE_SIZE)
            try:
                mapping = self.fmem.map(self.domid, range(gfn, gfn + nr_pages))
            except (XenError, ArgumentError) as e:
                self._refuse(f"fb_gfn={gfn:#x}+{nr_pages} pages: {e}")
                return False
            if not mapping.ok:
                bad = next(i for i, err in enumerate(mapping.errors) if err)
                self.fmem.unmap(mapping)
                self._refuse(f"fb_gfn={gfn:#x}: frame {gfn + bad:#x} is not the guest's RAM")
                return False
            self._map, self.enabled, self.error = mapping, True, None
            self.width, self.height, self.gfn, self.nr_pages = width, height, gfn, nr_pages
            self.rgb = bytearray(width * height * 3)
            self.png = IncrementalPng(width, height)
            log.info("%dx%dx%d at gfn %#x (%d pages)", width, height, bpp, gfn, nr_pages)
            return True

    def disable(self) -> None:
        """Display off: stop Xen's dirty tracking and drop the mapping."""
        with self._lock:
            if not self.enabled:
                return
            self.enabled = False
            try:
                self.dm.track_dirty_vram(self.domid, 0, 0)  # nr == 0: stop tracking
            except XenError as e:
                if not dm_program.means_gone(e):  # a domain gone tracks nothing: nothing to say then
                    log.warning("stopping dirty tracking failed: %s", e)
            mapping, self._map = self._map, None
            if mapping is not None:
                self.fmem.unmap(mapping)

    close = disable

    # --- rendering ---------------------------------------------------------------------------

    def poll(self) -> Poll:
        """Ask Xen which framebuffer pages changed, re-read only those, write a PNG if any did."""
        with self._lock:
            if not self.enabled or self._map is None:
                return Poll(0, False)
            try:
                bitmap = self.dm.track_dirty_vram(self.domid, self.gfn, self.nr_pages)
            except XenError as e:
                if dm_program.means_gone(e):
                    raise  # the serve loop asks whether the domain (or the host) is gone, and ends quietly if so
                self._warn(logging.WARNING, "track failed", "track_dirty_vram: %s", e)
                return Poll(0, False)
            dirty = [i for i in range(self.nr_pages) if bitmap[i >> 3] >> (i & 7) & 1]
            for page in dirty:
                self._render_page(page)
            self.pages_read += len(dirty)
            wrote = False
            if dirty and self.output is not None:
                try:
                    assert self.png is not None
                    self.output(self.png.encode(self.rgb))
                    wrote = True
                except OSError as e:  # a full disk or the deprivileged file-size limit: keep serving
                    self._warn(logging.WARNING, "png failed", "writing the snapshot: %s", e)
            result = Poll(len(dirty), wrote)
            self.polls.append(result)
            return result

    def _render_page(self, page: int) -> None:
        """XRGB (bytes B, G, R, X) of one page into the RGB buffer; the last page may be partial."""
        assert self._map is not None
        first = page * PIXELS_PER_PAGE
        last = min(first + PIXELS_PER_PAGE, self.width * self.height)
        src = self._map.view[first * BYTES_PER_PIXEL : last * BYTES_PER_PIXEL]
        out = memoryview(self.rgb)[first * 3 : last * 3]
        out[0::3], out[1::3], out[2::3] = src[2::4], src[1::4], src[0::4]
        if self.png is not None:
            self.png.invalidate_rows(first // self.width, (last - 1) // self.width)


# --- the guest's side, on the mock -------------------------------------------------------------------


@dataclass
class GuestReport:
    """What the simulated guest did, and what each flush cost the device model."""

    detected: bool = False
    #: ENABLE read back after a mode with xres out of range was enabled (0: refused)
    enabled_with_bad_mode: int = -1
    #: pages the device re-read at each flush (its LAST_READ register)
    pages_read: list[int] = field(default_factory=list)
    nr_pages: int = 0
    #: the mock's VRAM tracking range after the display was turned off
    tracking_after_disable: Any = None
    lines: list[str] = field(default_factory=list)


MODE = (320, 200)
FB_GPA = 0x100000  # the guest keeps its framebuffer at 1 MiB
BACKGROUND = (0x20, 0x40, 0x80)
SQUARE, SQUARE_COLOUR = (100, 50, 16, 16), (0xFF, 0xC0, 0x00)
DOT, DOT_COLOUR = (MODE[0] - 1, MODE[1] - 1), (0xFF, 0xFF, 0xFF)
#: bytes per guest store burst (a mock host process takes requests of up to 64 KiB)
STORE_CHUNK = 16 * 1024


def xrgb(colour: tuple[int, int, int]) -> bytes:
    r, g, b = colour
    return bytes((b, g, r, 0))


def guest_script(guest: Any, domain_state: Callable[[], dict[str, Any]]) -> GuestReport:
    """A guest's display driver: detect, set the mode, draw, flush; the device model's cost per flush.

    ``guest``: a ``SimGuest`` (or a ``RemoteGuest`` of a mock host process);
    ``domain_state()``: the mock's snapshot of the domain (its VRAM tracking range).
    """
    r = GuestReport()

    def reg(index: int, value: int | None = None) -> int:
        guest.outw(INDEX_PORT, index)
        if value is None:
            return int(guest.inw(DATA_PORT))
        guest.outw(DATA_PORT, value)
        return value

    def store(gpa: int, data: bytes) -> None:
        for done in range(0, len(data), STORE_CHUNK):  # a CPU's stores, a few pages at a time
            guest.write_ram(gpa + done, data[done : done + STORE_CHUNK])

    def flush(what: str) -> None:
        reg(REG_FLUSH, 1)
        r.pages_read.append(reg(REG_LAST_READ))
        r.lines.append(f"{what}: re-read {r.pages_read[-1]} of {r.nr_pages} pages")

    r.detected = reg(REG_ID) == DISPI_ID
    width, height = MODE
    r.nr_pages = -(-width * height * BYTES_PER_PIXEL // PAGE_SIZE)
    reg(REG_XRES, 5000)  # out of range: the display must stay off
    reg(REG_ENABLE, 1)
    r.enabled_with_bad_mode = reg(REG_ENABLE)
    reg(REG_XRES, width)
    reg(REG_YRES, height)
    reg(REG_BPP, BPP)
    reg(REG_FB_GFN_LO, (FB_GPA >> 12) & 0xFFFF)
    reg(REG_FB_GFN_HI, FB_GPA >> 28)
    reg(REG_ENABLE, 1)
    bad = "wrongly enabled" if r.enabled_with_bad_mode else "refused"
    r.lines.append(
        f"mode {width}x{height}x{BPP} at {FB_GPA:#x}, enabled: {bool(reg(REG_ENABLE))} "
        f"(a bad mode tried first on purpose, xres=5000: {bad})"
    )

    store(FB_GPA, xrgb(BACKGROUND) * (width * height))
    flush("background")
    x0, y0, w, h = SQUARE
    for y in range(y0, y0 + h):
        store(FB_GPA + (y * width + x0) * BYTES_PER_PIXEL, xrgb(SQUARE_COLOUR) * w)
    flush(f"{w}x{h} square")
    flush("nothing drawn")
    store(FB_GPA + (DOT[1] * width + DOT[0]) * BYTES_PER_PIXEL, xrgb(DOT_COLOUR))
    flush("one pixel")
    reg(REG_ENABLE, 0)
    r.tracking_after_disable = domain_state()["vram"]
    return r


def expected_image() -> bytes:
    """The RGB picture the guest script draws, computed independently of the device."""
    width, height = MODE
    rgb = bytearray(bytes(BACKGROUND) * (width * height))
    x0, y0, w, h = SQUARE
    for y in range(y0, y0 + h):
        rgb[(y * width + x0) * 3 : (y * width + x0 + w) * 3] = bytes(SQUARE_COLOUR) * w
    i = (DOT[1] * width + DOT[0]) * 3
    rgb[i : i + 3] = bytes(DOT_COLOUR)
    return bytes(rgb)


def run_on_mock(
    output: Callable[[bytes], None] | None, *, hold: bool = False, out: Callable[[str], None] = print
) -> GuestReport | None:
    """Serve a simulated guest on the mock Xen and run ``guest_script`` against the display.

    The loop runs in this thread (Ctrl-C/SIGTERM reach it when this is the main thread),
    the guest in another; with ``hold`` it keeps serving after the script until a signal.
    Returns None when a signal ended the run first; raises what the script raised, or
    ``RuntimeError`` if an ioreq server is left behind.
    """
    from xendmop.mock.simguest import SimGuest

    with dm_program.open_mock() as mock, mock.foreign_memory() as fmem:
        fmem.restrict(mock.domid)
        fb = Framebuffer(mock.dm, mock.domid, fmem, output)
        server = mock.ioreq_server()
        server.add_port_range(INDEX_PORT, LAST_PORT, fb, "framebuffer")

        def guest() -> GuestReport:
            xen = mock.mock_xen
            return guest_script(SimGuest(xen, mock.domid, timeout=5), xen.domain(mock.domid).snapshot)

        try:
            return dm_program.run_guest_script(
                mock, ServeLoop(server), guest, lines=lambda report: report.lines, hold=hold, out=out
            )
        finally:
            fb.close()


# --- a real dom0 -----------------------------------------------------------------------------------


def serve_domain(connection: dm_program.Connection, png: PngFile, interval: float) -> int:
    """Serve the display until SIGINT/SIGTERM; then destroy the server and stop tracking.

    On a real dom0 or a mock host process (``connection``).  ``interval`` 0: render on FLUSH only."""
    timer = PeriodicTimer(interval) if interval else None
    try:
        with connection.foreign_memory() as fmem:
            fmem.restrict(connection.domid)  # maps the framebuffer only: restricted before any privilege drop
            fb = Framebuffer(connection.dm, connection.domid, fmem, png)
            server = connection.ioreq_server()
            server.add_port_range(INDEX_PORT, LAST_PORT, fb, "framebuffer")
            loop = ServeLoop(server)
            if timer is not None:
                ticking = timer

                def tick() -> None:
                    if ticking.expirations():
                        fb.poll()

                loop.add_reader(timer.fileno(), tick)

            def ready() -> None:  # only once the server is up: a refused domain is never announced
                drop = connection.drop
                dropped = f"; deprivileged to uid {drop.uid} gid {drop.gid}" if drop else ""
                print(
                    f"framebuffer: serving dom{connection.domid}'s display on ports {INDEX_PORT:#x}/{DATA_PORT:#x}"
                    f"{dropped}; Ctrl-C to stop",
                    file=sys.stderr,
                    flush=True,
                )

            try:
                signum = dm_program.serve_until_signal(loop, on_ready=ready)
            finally:
                fb.close()
            print(dm_program.stopped_line("framebuffer", signum), file=sys.stderr)
    finally:
        if timer is not None:
            timer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0], epilog=dm_program.EXIT_STATUS_HELP)
    dm_program.add_arguments(p, hold=True)
    p.add_argument("--output", default="framebuffer.png", help="the PNG snapshot (default: %(default)s)")
    p.add_argument("--interval", type=float, default=0.2, help="with --domid: seconds between polls (0: FLUSH only)")
    args, target = dm_program.parse(p, argv)
    if args.interval != 0 and not 0.001 <= args.interval <= 3600:
        p.error(f"--interval {args.interval}: must be 0 (FLUSH only) or 0.001..3600 seconds")
    try:
        png = PngFile(args.output, in_place=args.depriv is not None)
    except OSError as e:
        p.error(f"--output {args.output!r}: {e.strerror}")
    with contextlib.closing(png):
        if target.where is dm_program.Where.MOCK:
            if run_on_mock(png, hold=args.hold) is not None:
                print(f"snapshot: {args.output}")
            return 0
        # No interrupt DMOPs here: any domain the DMOPs accept may be served.
        return dm_program.run_target(
            target, lambda connection: serve_domain(connection, png, args.interval), name="framebuffer"
        )


if __name__ == "__main__":
    sys.exit(main())
