"""Split virtqueues (virtio 1.x, 2.7) read and written in guest RAM.

The driver (the guest) is untrusted.  Everything read from its rings is checked before
it is used, and each check fails with ``VirtqueueError`` whose ``key`` is a fixed
string (so a log keyed by it stays small whatever the guest does):

====================== =====================================================================
key                    what the driver did
====================== =====================================================================
avail-index-jump       moved the available index by more than the queue size
bad-head               put a descriptor index >= queue size in the available ring
bad-next               chained to a descriptor index >= queue size (or past an indirect table)
chain-too-long         made a chain longer than the queue (a loop ends here too)
indirect-off           used an indirect descriptor without VIRTIO_F_RING_INDIRECT_DESC
indirect-with-next     set INDIRECT and NEXT on one descriptor
nested-indirect        put an indirect descriptor inside an indirect table
bad-indirect-len       gave an indirect table of 0 bytes, not a multiple of 16, or too long
readable-after-write   put a device-readable descriptor after a device-writable one
bad-address            gave a buffer that wraps past 2**64 or ends above guest RAM
guest-memory           gave a ring or buffer address that is not its RAM
no-writable-room       gave a chain with less device-writable room than the request needs
short-request          gave a chain with fewer device-readable bytes than the request needs
====================== =====================================================================

Work per chain is bounded by the queue size (``chain-too-long``) and per notification by
what the driver made available (``avail-index-jump``); buffers are never gathered whole
unless the device asks for at most so many bytes (``Chain.read``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..runtime.dispatch import GuestMemory, GuestMemoryError
from .spec import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_ELEM,
    need_event,
)

__all__ = ["MAX_INDIRECT", "Chain", "Virtqueue", "VirtqueueError"]

#: the most entries an indirect table may hold (Linux's vhost allows UIO_MAXIOV = 1024 too)
MAX_INDIRECT = 1024
#: guest-RAM views per ``preadv``/``pwritev`` (Linux's IOV_MAX is 1024)
IOV_BATCH = 512
#: chains a long batch takes between handing back what it used (``Virtqueue.on_used``): often
#: enough that a driver waiting for room (Linux's TX at 3/4 of what it queued) hears well before
#: the end of a 256-chain batch, seldom enough that the used index and ``used_event`` cost a
#: few guest-RAM accesses per 16 chains
USED_BATCH = 16
#: bytes per piece where data is copied through Python (a memory without ``iter_views``)
CHUNK = 65536
#: ``GuestRam.iter_views``: page-sized writable views of a guest-physical range, mapped as taken
_IterViews = Callable[[int, int], Iterator[memoryview]]
_U64 = 1 << 64


class VirtqueueError(Exception):
    """The driver broke a rule of the split virtqueue: ``key`` says which (fixed strings, see
    the module's table), the message names the queue and the offending values."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {detail}")
        self.key = key


def _mem_error(what: str, e: GuestMemoryError) -> VirtqueueError:
    return VirtqueueError("guest-memory", f"{what}: {e}")


def _pwritev_all(fd: int, views: list[memoryview], pos: int) -> int:
    """Write every byte of ``views`` at ``pos`` (``pwritev`` again after a short write)."""
    total = sum(len(v) for v in views)
    done, i = 0, 0
    while i < len(views):
        n = os.pwritev(fd, views[i:], pos + done)
        if n <= 0:
            raise OSError(errno.EIO, f"pwritev wrote nothing at offset {pos + done}")
        done += n
        i = _consume(views, i, n)
    return total


def _consume(views: list[memoryview], i: int, n: int) -> int:
    """Drop ``n`` transferred bytes from ``views[i:]``; the index of the first view left."""
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    if n:
        views[i] = views[i][n:]
    return i


def _preadv_all(fd: int, views: list[memoryview], pos: int) -> int:
    """Fill ``views`` from ``pos``; what lies past the file's end reads zeroes."""
    total = sum(len(v) for v in views)
    done, i = 0, 0
    while i < len(views):
        n = os.preadv(fd, views[i:], pos + done)
        if n <= 0:  # the end of the file: the rest is zeroes, as a sparse file's holes read
            for view in views[i:]:
                view[:] = bytes(len(view))
            break
        done += n
        i = _consume(views, i, n)
    return total


@dataclass
class Chain:
    """One descriptor chain the driver made available: device-readable segments, then
    device-writable ones, each ``(guest address, length)``.

    ``read``/``write`` move bytes through the guest memory the chain was found in;
    ``written`` is what the device wrote so far (it goes into the used ring)."""

    head: int
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]
    memory: GuestMemory
    written: int = 0
    _read_pos: int = field(default=0, repr=False)

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)

    def read(self, max_bytes: int) -> bytes:
        """The next at most ``max_bytes`` device-readable bytes (fewer at the chain's end)."""
        out = bytearray()
        pos = self._read_pos
        for addr, n in self.readable:
            if pos >= n:
                pos -= n
                continue
            take = min(n - pos, max_bytes - len(out))
            if take <= 0:
                break
            try:
                out += self.memory.read(addr + pos, take)
            except GuestMemoryError as e:
                raise _mem_error(f"buffer {addr:#x}+{n:#x} of chain {self.head}", e) from None
            pos = 0
        self._read_pos += len(out)
        return bytes(out)

    def read_exact(self, n: int, what: str) -> bytes:
        """Exactly ``n`` readable bytes, or ``VirtqueueError('short-request')`` naming ``what``."""
        data = self.read(n)
        if len(data) != n:
            raise VirtqueueError("short-request", f"chain {self.head}: {what} needs {n} bytes, has {len(data)}")
        return data

    def iter_read(self, chunk: int = 65536) -> Iterator[bytes]:
        """The rest of the readable bytes, ``chunk`` at a time (memory stays bounded)."""
        while True:
            data = self.read(chunk)
            if not data:
                return
            yield data

    def write(self, data: bytes) -> int:
        """Append ``data`` to the device-writable segments; ``VirtqueueError('no-writable-room')``
        (nothing written) when it does not fit.  Returns ``len(data)``."""
        room = self.writable_len - self.written
        if len(data) > room:
            raise VirtqueueError(
                "no-writable-room", f"chain {self.head}: {len(data)} bytes to write, {room} device-writable left"
            )
        pos, done = self.written, 0
        for addr, n in self.writable:
            if done == len(data):
                break
            if pos >= n:
                pos -= n
                continue
            take = min(n - pos, len(data) - done)
            try:
                self.memory.write(addr + pos, data[done : done + take])
            except GuestMemoryError as e:
                raise _mem_error(f"buffer {addr:#x}+{n:#x} of chain {self.head}", e) from None
            done += take
            pos = 0
        self.written += done
        return done

    def _views(
        self, iter_views: _IterViews, segments: list[tuple[int, int]], skip: int, nbytes: int
    ) -> Iterator[memoryview]:
        """Views of guest RAM over ``nbytes`` of ``segments``, starting ``skip`` bytes in (the
        memory's ``iter_views``: page-sized at most, mapped as they are taken)."""
        for addr, n in segments:
            if nbytes <= 0:
                return
            if skip >= n:
                skip -= n
                continue
            take = min(n - skip, nbytes)
            try:
                yield from iter_views(addr + skip, take)
            except GuestMemoryError as e:
                raise _mem_error(f"buffer {addr:#x}+{n:#x} of chain {self.head}", e) from None
            nbytes -= take
            skip = 0

    def _batches(self, views: Iterator[memoryview]) -> Iterator[list[memoryview]]:
        """``views`` in lists of at most ``IOV_BATCH`` (one ``preadv``/``pwritev`` each)."""
        batch: list[memoryview] = []
        for view in views:
            batch.append(view)
            if len(batch) == IOV_BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    def write_to_fd(self, fd: int, pos: int) -> int:
        """The rest of the readable bytes to ``fd`` at file offset ``pos``, with ``pwritev``
        straight from guest RAM when the memory offers views (else through ``read``, 64 KiB at
        a time); returns how many.  ``OSError`` from the file, as it comes."""
        iter_views: _IterViews | None = getattr(self.memory, "iter_views", None)
        if iter_views is None:
            done = 0
            for data in self.iter_read():
                os.pwrite(fd, data, pos + done)
                done += len(data)
            return done
        done = 0
        views = self._views(iter_views, self.readable, self._read_pos, self.readable_len - self._read_pos)
        for batch in self._batches(views):
            done += _pwritev_all(fd, batch, pos + done)
        self._read_pos += done
        return done

    def send_to(self, fd: int, skip: int) -> int:
        """The readable bytes past the first ``skip`` to ``fd`` as one packet: one ``writev``
        straight from guest RAM when the memory offers views and they fit ``IOV_BATCH``, else
        one ``write`` of a copy (a tap or a packet socket takes one frame per call).  Returns
        what the call wrote; ``OSError`` from ``fd``, as it comes."""
        nbytes = self.readable_len - skip
        iter_views: _IterViews | None = getattr(self.memory, "iter_views", None)
        if iter_views is not None:
            views = list(self._views(iter_views, self.readable, skip, nbytes))
            if len(views) <= IOV_BATCH:
                return os.writev(fd, views)
        self._read_pos = skip
        return os.write(fd, self.read(nbytes))

    def read_from_fd(self, fd: int, pos: int, nbytes: int) -> int:
        """Fill the next ``nbytes`` of device-writable room from ``fd`` at file offset ``pos``
        (``preadv`` straight into guest RAM when the memory offers views); past the file's end
        the room reads zeroes.  ``VirtqueueError('no-writable-room')`` (nothing read) when the
        chain has less room; ``OSError`` from the file, as it comes.  Returns ``nbytes``."""
        room = self.writable_len - self.written
        if nbytes > room:
            raise VirtqueueError("no-writable-room", f"chain {self.head}: {nbytes} bytes to read in, {room} left")
        iter_views: _IterViews | None = getattr(self.memory, "iter_views", None)
        if iter_views is None:
            done = 0
            while done < nbytes:
                n = min(CHUNK, nbytes - done)
                self.write(os.pread(fd, n, pos + done).ljust(n, b"\0"))
                done += n
            return nbytes
        done = 0
        for batch in self._batches(self._views(iter_views, self.writable, self.written, nbytes)):
            done += _preadv_all(fd, batch, pos + done)
        self.written += done
        return done

    def skip_writable(self, n: int) -> None:
        """Leave ``n`` writable bytes as they are (counted as written: a device's reserved header)."""
        room = self.writable_len - self.written
        if n > room:
            raise VirtqueueError("no-writable-room", f"chain {self.head}: skip {n}, {room} left")
        self.written += n


class Virtqueue:
    """One split virtqueue: what the driver programmed through the transport, and the
    device's indices.  ``index``: its number; ``max_size``: the largest size offered."""

    def __init__(self, index: int, max_size: int) -> None:
        self.index = index
        self.max_size = max_size
        self.ram_limit: int | None = None  # when known, buffers must end below it
        #: what ``chains`` calls when chains it gave out were used: after every ``USED_BATCH``
        #: of them, and once the queue is drained, before it writes ``avail_event``; the
        #: transport publishes the used index and sends the interrupt the driver asked for
        self.on_used: Callable[[GuestMemory], None] | None = None
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.msix_vector = 0xFFFF
        self.enabled = False
        self.desc = self.avail = self.used = 0
        self.indirect = False
        self.event_idx = False
        self.last_avail = 0  # the next available-ring entry to take
        self._avail_shadow = 0  # the driver's available index as last read
        self.used_idx = 0
        self._published = 0  # used index as last written to the ring
        self.signalled = 0  # used index at the last notification (VIRTIO_F_EVENT_IDX)
        self.more = False  # chains() stopped at its limit with chains left: serve the queue again

    # --- reading the driver's rings ------------------------------------------------------------

    def _u16(self, memory: GuestMemory, gpa: int, what: str) -> int:
        try:
            return int.from_bytes(memory.read(gpa, 2), "little")
        except GuestMemoryError as e:
            raise _mem_error(f"queue {self.index} {what} at {gpa:#x}", e) from None

    def pending(self, memory: GuestMemory) -> int:
        """How many chains the driver has made available and the device not yet taken."""
        if self.last_avail == self._avail_shadow:
            idx = self._u16(memory, self.avail + 2, "avail idx")
            n = (idx - self.last_avail) & 0xFFFF
            if n > self.size:
                raise VirtqueueError(
                    "avail-index-jump",
                    f"queue {self.index}: avail idx {idx} is {n} past {self.last_avail} (size {self.size})",
                )
            self._avail_shadow = idx
        return (self._avail_shadow - self.last_avail) & 0xFFFF

    def pop(self, memory: GuestMemory) -> Chain | None:
        """The next available chain, walked and checked, or None when there is none."""
        if not self.pending(memory):
            return None
        slot = self.avail + 4 + 2 * (self.last_avail % self.size)
        head = self._u16(memory, slot, "avail ring")
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if head >= self.size:
            raise VirtqueueError("bad-head", f"queue {self.index}: head {head} >= size {self.size}")
        return self._walk(memory, head)

    def chains(self, memory: GuestMemory, limit: int | None = None) -> Iterator[Chain]:
        """Every available chain, in order, or at most ``limit`` of them; then, with
        VIRTIO_F_EVENT_IDX, ``avail_event`` set to ask for a notification at the next one.
        Stopped by ``limit`` with chains left, it sets ``more`` and asks for nothing: the
        device comes back for them (a driver that keeps adding cannot hold it for ever)."""
        taken = 0
        while True:
            while limit is None or taken < limit:
                chain = self.pop(memory)
                if chain is None:
                    break
                taken += 1
                yield chain  # back here once the caller has pushed it
                if taken % USED_BATCH == 0 and self.on_used is not None:
                    # A long batch returns its chains as it goes, and interrupts when the driver's
                    # used_event asks (Linux's TX asks at 3/4 of what it has queued): the driver
                    # frees and refills while the device works on the rest, as QEMU's per-packet
                    # push and notify let it, instead of waiting for the whole batch.
                    self.on_used(memory)
            if limit is not None and taken >= limit and self.pending(memory):
                self.more = True
                return
            # The driver hears about what was used before the device asks to be notified again:
            # a notification that comes meanwhile finds the device idle, not in the middle of
            # sending the interrupt (a hypercall), and the driver keeps adding without one
            # until then.  A chain made available after the last look but before avail_event
            # was written got no notification: look once more after writing it (as vhost does).
            if self.on_used is not None:
                self.on_used(memory)
            if not self.arm(memory):
                return

    def arm(self, memory: GuestMemory) -> bool:
        """With VIRTIO_F_EVENT_IDX, ask the driver to notify when it makes the next chain
        available (``avail_event``); a device that stops taking chains early calls it too.
        True when chains became available meanwhile (the driver will not notify for them)."""
        if not self.event_idx:
            return False
        self._put(memory, self.used + 4 + 8 * self.size, self.last_avail.to_bytes(2, "little"), "avail_event")
        return bool(self.pending(memory))

    def _desc(self, memory: GuestMemory, gpa: int) -> tuple[int, int, int, int]:
        try:
            raw = memory.read(gpa, VIRTQ_DESC.size)
        except GuestMemoryError as e:
            raise _mem_error(f"queue {self.index} descriptor at {gpa:#x}", e) from None
        addr, length, flags, nxt = VIRTQ_DESC.unpack(raw)
        return addr, length, flags, nxt

    def _walk(self, memory: GuestMemory, head: int) -> Chain:
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        table, limit = self.desc, self.size  # the descriptor table being walked and its length
        indirect: bytes | None = None  # an indirect table, read whole (one access, not one per entry)
        i, count = head, 0
        budget = self.size  # direct descriptors; an indirect table brings its own (<= MAX_INDIRECT)
        q = self.index
        while True:
            count += 1
            if count > budget:
                raise VirtqueueError("chain-too-long", f"queue {q}: chain at head {head} exceeds {budget} descriptors")
            if indirect is None:
                addr, length, flags, nxt = self._desc(memory, table + 16 * i)
            else:
                addr, length, flags, nxt = VIRTQ_DESC.unpack_from(indirect, 16 * i)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect is not None:
                    raise VirtqueueError("nested-indirect", f"queue {q}: indirect descriptor in an indirect table")
                if not self.indirect:
                    raise VirtqueueError("indirect-off", f"queue {q}: indirect descriptor {i} not negotiated")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError("indirect-with-next", f"queue {q}: descriptor {i} has INDIRECT and NEXT")
                n = length // 16
                if length == 0 or length % 16 or n > MAX_INDIRECT:
                    raise VirtqueueError("bad-indirect-len", f"queue {q}: indirect table of {length} bytes")
                self._check_range(addr, length, head)
                try:
                    indirect = memory.read(addr, length)  # at most 16 KiB (MAX_INDIRECT entries)
                except GuestMemoryError as e:
                    raise _mem_error(f"queue {q} indirect table at {addr:#x}", e) from None
                table, limit, i, count, budget = addr, n, 0, 0, n
                continue
            self._check_range(addr, length, head)
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append((addr, length))
            elif writable:
                raise VirtqueueError("readable-after-write", f"queue {q}: chain at head {head}, descriptor {i}")
            else:
                readable.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(head, readable, writable, memory)
            if nxt >= limit:
                raise VirtqueueError("bad-next", f"queue {q}: descriptor {i} chains to {nxt} (table of {limit})")
            i = nxt

    def _check_range(self, addr: int, length: int, head: int) -> None:
        end = addr + length
        if end > _U64 or (self.ram_limit is not None and end > self.ram_limit):
            raise VirtqueueError(
                "bad-address", f"queue {self.index}: chain at head {head}: buffer {addr:#x}+{length:#x}"
            )

    # --- the used ring -------------------------------------------------------------------------------

    def _put(self, memory: GuestMemory, gpa: int, data: bytes, what: str) -> None:
        try:
            memory.write(gpa, data)
        except GuestMemoryError as e:
            raise _mem_error(f"queue {self.index} {what} at {gpa:#x}", e) from None

    def push(self, memory: GuestMemory, head: int, written: int, *, publish: bool = True) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes written.  ``publish=False``
        leaves the used index for ``publish_used`` (a batch moves it once, as vhost's
        ``vhost_add_used_n``): the driver sees none of the batch before its last element is written."""
        slot = self.used + 4 + 8 * (self.used_idx % self.size)
        self._put(memory, slot, VIRTQ_USED_ELEM.pack(head, written & 0xFFFFFFFF), "used ring")
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        if publish:
            self.publish_used(memory)

    def publish_used(self, memory: GuestMemory) -> None:
        """Write the used index (after the elements it covers: x86 keeps stores in order)."""
        if self.used_idx != self._published:
            self._put(memory, self.used + 2, self.used_idx.to_bytes(2, "little"), "used idx")
            self._published = self.used_idx

    def needs_interrupt(self, memory: GuestMemory) -> bool:
        """Whether the driver wants to hear about the chains used since the last notification."""
        old, new = self.signalled, self._published
        if old == new:
            return False
        self.signalled = new
        if self.event_idx:
            used_event = self._u16(memory, self.avail + 4 + 2 * self.size, "used_event")
            return need_event(used_event, new, old)
        return not self._u16(memory, self.avail, "avail flags") & VIRTQ_AVAIL_F_NO_INTERRUPT

    def process(self, memory: GuestMemory, handle: Callable[[Chain], int]) -> int:
        """Run ``handle(chain)`` on each available chain, at most a queue's worth (``chains``'
        ``limit``: see ``more``), and push it with what it returns (bytes written); the used
        index moves once, after the last; returns how many chains were used."""
        n = 0
        try:
            for chain in self.chains(memory, self.size):
                self.push(memory, chain.head, handle(chain), publish=False)
                n += 1
        finally:
            self.publish_used(memory)  # what was used before a broken chain is the driver's too
        return n
