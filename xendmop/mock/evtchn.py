"""The mock ``/dev/xen/evtchn``: Linux ``drivers/xen/evtchn.c`` over the mock's event channels.

Each open is one ``struct per_user_data``: the ports it bound, a ring of pending
ports, an optional domid restriction.  ``fileno()`` is a real eventfd that is
readable while the ring is non-empty, so ``select``/``poll``/asyncio work on it.
A delivered port stays masked (``enabled = False``) until user space writes it
back, as Linux does with its lateeoi handling.  The ring holds ``ring_size`` ports
(64, doubled whenever more ports are bound than it holds: ``evtchn_resize_ring``);
a port arriving at a full ring is lost and the ring is marked overflowed: ``read``
fails with EFBIG (and ``poll`` reports POLLERR) until ``IOCTL_EVTCHN_RESET``.

For a client in another process (``xendmop.mock.remote``) ``share_ring()`` moves the
ring into a sealed memfd (``SharedPortRing``) that the client maps and reads by itself,
as Linux's ``evtchn_read`` copies out of the per-fd ring with no call into anything
else; the host stays the only producer and never trusts what it reads back.  The same
memfd carries the client's NOTIFYs the other way while a vCPU of the host waits for one (the
doorbell: ``SharedPortRing.take_doorbell``, ``Doorbell``), applied by that vCPU's thread with
the rules of ``ioctl``'s NOTIFY.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import mmap
import os
import select
import struct
import threading
import weakref
from typing import TYPE_CHECKING, Any

from ..abi.evtchn import (
    EVTCHN_PATH,
    IOCTL_EVTCHN_BIND_INTERDOMAIN,
    IOCTL_EVTCHN_BIND_UNBOUND_PORT,
    IOCTL_EVTCHN_BIND_VIRQ,
    IOCTL_EVTCHN_NOTIFY,
    IOCTL_EVTCHN_RESET,
    IOCTL_EVTCHN_RESTRICT_DOMID,
    IOCTL_EVTCHN_UNBIND,
    ioctl_evtchn_bind_interdomain,
    ioctl_evtchn_bind_unbound_port,
    ioctl_evtchn_bind_virq,
    ioctl_evtchn_notify,
    ioctl_evtchn_restrict_domid,
    ioctl_evtchn_unbind,
)
from ..abi.xen import DOMID_FIRST_RESERVED, DOMID_SELF
from .privcmd import raise_errno, read_arg
from .state import NR_EVTCHN_PORTS, EvtchnPort, WakeAfterUnlock, defer_wakes, write_deferred_wakes
from .usermem import PAGE_SIZE

if TYPE_CHECKING:
    from . import MockXen

log = logging.getLogger("xendmop.mock.evtchn")

#: ``NR_VIRQS`` (xen/include/public/xen.h)
NR_VIRQS = 24
UNRESTRICTED_DOMID = DOMID_FIRST_RESERVED
#: ``evtchn_resize_ring``: the first ring holds 64 ports
FIRST_RING_SIZE = 64
_EAGAIN_TEXT = os.strerror(errno.EAGAIN)
#: one pending port as ``read`` returns it (the common read: one port)
_ONE_PORT = struct.Struct("<I")

# --- the pending-port ring shared with a client process ------------------------------------------
#
# Layout of the memfd, in native uint32 words (``memoryview.cast("I")``): a header page,
# then the entries.  Each index is in a cache line of its own, as its writer differs.
#: ``ring_prod``: written by the host (the producer) only
RING_PROD = 0
#: ``ring_cons``: written by the client (the consumer); by the host only inside the client's
#: RESET, UNBIND or BIND ioctl, while the client holds its consumer lock (``ring_cons_mutex``)
RING_CONS = 16
#: ``ring_size``: entries in use, a power of two (grows at bind: ``evtchn_resize_ring``)
RING_SIZE = 32
#: ``ring_overflow``: 1 from a lost port (or a ring the host found corrupt) until RESET
RING_OVERFLOW = 33
#: features the host offers: ``RING_FEATURE_MASKS`` when the port mask words below are in use
RING_FEATURES = 34
RING_FEATURE_MASKS = 1
#: the first entry's word index: the entries start on the second page
RING_ENTRIES = PAGE_SIZE // 4
#: the most entries a ring can need: one per port of dom0, a power of two
RING_CAPACITY = NR_EVTCHN_PORTS
#: the first port mask word's index: one word per port, after the entries
RING_MASKS = RING_ENTRIES + RING_CAPACITY
#: a port's mask word: masked since its last delivery (set by the host, cleared by the client's unmask)
PORT_MASKED = 1
#: a port's mask word: fired while masked (set by the host; the client's unmask then asks for it)
PORT_FIRED = 2
#: features the host offers: the NOTIFY doorbell below is in use (``Doorbell``)
RING_FEATURE_DOORBELL = 2
# The NOTIFY doorbell: a second ring, the client produces and the host consumes (a header page,
# then the entries, then one "a vCPU waits" word per port).
#: the doorbell's header page
DOORBELL_BASE = RING_MASKS + NR_EVTCHN_PORTS
#: ``db_prod``: written by the client (the producer) only
DOORBELL_PROD = DOORBELL_BASE
#: ``db_cons``: written by the host (the consumer) only, from its own count
DOORBELL_CONS = DOORBELL_BASE + 16
#: 1 once the host found the doorbell corrupt: the client's NOTIFYs then go by message for good
DOORBELL_BROKEN = DOORBELL_BASE + 32
#: how many posted messages of this connection the host has handled (the client's NOTIFY may
#: ring the doorbell only once every posted message sent before it was handled: it cannot overtake one)
DOORBELL_POSTED_DONE = DOORBELL_BASE + 48
#: the first doorbell entry's word index
DOORBELL_ENTRIES = DOORBELL_BASE + PAGE_SIZE // 4
#: doorbell entries: a power of two; a NOTIFY finding the doorbell full goes by message
DOORBELL_CAPACITY = 256
#: one word per port, set by the host while a vCPU waits for that port's NOTIFY in this process
DOORBELL_WANTED = DOORBELL_ENTRIES + DOORBELL_CAPACITY
#: the memfd's length: header page, entries, mask words, the doorbell's header, entries and wanted words
RING_BYTES = 4 * (DOORBELL_WANTED + NR_EVTCHN_PORTS)
_U32 = 0xFFFFFFFF
#: compare-and-swap attempts on a mask word the client keeps changing, before the event is held
_CAS_ATTEMPTS = 8
_ATOMIC_SEQ_CST = 5
_libatomic_lib: Any = None


def _libatomic() -> Any:
    """libatomic, loaded once per process (``find_library`` runs ldconfig); None without it."""
    global _libatomic_lib
    if _libatomic_lib is None:
        name = ctypes.util.find_library("atomic")
        _libatomic_lib = ctypes.CDLL(name) if name else False
    return _libatomic_lib or None


class PortMaskWords:
    """The port mask words of a mapped ring, changed with libatomic's ``__atomic_exchange_4`` and
    ``__atomic_compare_exchange_4`` through ctypes (``xchg`` and ``lock cmpxchg`` on x86).

    Why atomics: the host's delivery stores "fired while masked" then needs the client's
    unmask; the client's unmask stores "unmasked" then needs the host's "fired".  A store
    followed by a load of another word may be reordered even on x86 (the store buffer), and
    both sides could miss the event.  A read-modify-write of one word is a full barrier and
    totally ordered: either the host's swap sees the unmask and delivers, or the client's
    exchange sees ``PORT_FIRED`` and asks for the event.  Raises OSError without libatomic.
    """

    def __init__(self, mapping: mmap.mmap) -> None:
        lib = _libatomic()
        if lib is None:
            raise OSError(errno.ENOENT, "libatomic not found: evtchn unmasks go through the host")
        self._xchg = lib["__atomic_exchange_4"]
        self._xchg.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int]
        self._xchg.restype = ctypes.c_uint32
        self._cas = lib["__atomic_compare_exchange_4"]
        self._cas.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_int]
        self._cas.restype = ctypes.c_bool
        self._cells: Any = (ctypes.c_uint32 * (RING_BYTES // 4)).from_buffer(mapping)  # an export: release()
        self._base = ctypes.addressof(self._cells) + 4 * RING_MASKS
        self._expected = ctypes.c_uint32()

    def exchange(self, port: int, value: int) -> int:
        """Store ``value`` into ``port``'s word; its old value.  EBADF once released (the
        address would point into an unmapped page)."""
        if self._cells is None:
            raise OSError(errno.EBADF, "evtchn mask words already released")
        return int(self._xchg(self._base + 4 * port, value, _ATOMIC_SEQ_CST))

    def compare_exchange(self, port: int, expected: int, desired: int) -> bool:
        if self._cells is None:
            raise OSError(errno.EBADF, "evtchn mask words already released")
        self._expected.value = expected
        return bool(
            self._cas(self._base + 4 * port, ctypes.byref(self._expected), desired, _ATOMIC_SEQ_CST, _ATOMIC_SEQ_CST)
        )

    def release(self) -> None:
        """Give the mapping back (it cannot be closed while this holds it)."""
        self._cells = None


class SharedPortRing:
    """The producer (host) side of one evtchn fd's pending-port ring in a memfd.

    Linux ``drivers/xen/evtchn.c`` keeps per fd ``ring``, ``ring_size``, free-running
    ``ring_prod``/``ring_cons`` (entry ``i`` at ``i & (ring_size - 1)``) and
    ``ring_overflow``: ``evtchn_interrupt`` stores the port, ``smp_wmb()``, then bumps
    ``ring_prod``; ``evtchn_read`` reads ``ring_prod``, ``smp_rmb()``, copies the entries
    out, then advances ``ring_cons``.  Here the same ring lives in a memfd that the client
    maps read-write, so its ``read`` needs no request to the host.

    Memory ordering (the host and the client are two processes on two CPUs):

    * A store to one element of a ``memoryview`` cast to ``"I"`` is one aligned 4-byte
      ``memcpy``, a single ``mov`` on x86, so an index is never seen half-written.
    * CPython executes the stores in program order: each is a separate C call, which
      the compiler cannot move across another.
    * x86 is TSO: stores become visible in program order and loads are not reordered
      with older loads.  So "entry, then ``ring_prod``" (the producer) and "``ring_prod``,
      then the entries, then ``ring_cons``" (the consumer) need no fence, exactly as
      ``smp_wmb``/``smp_rmb`` are compiler barriers only on x86.
    * Weakly ordered CPUs (arm64) would need a release store of ``ring_prod`` and of
      ``ring_cons`` and an acquire load of each (``__atomic_store_n``/``__atomic_load_n``
      through ctypes, as ``runtime/dispatch.py`` uses libatomic): pure Python cannot emit
      a ``dmb``.  Like the ioreq page, this ring is trusted on x86 only.
    * The wake-up is the eventfd: the producer writes it after publishing ``ring_prod``,
      the consumer drains it before reading ``ring_prod``; both are syscalls, full
      barriers, so a port published before a drain is always seen by the read after it.

    The client is untrusted: it can write any word of the memfd.  The host therefore
    keeps ``ring_prod``, ``ring_size`` and a shadow of every entry in its own memory and
    reads back ``ring_cons`` alone, accepted only while ``0 <= prod - cons <= size``.
    A ring found outside that is treated as overflowed (the port is lost, EFBIG until
    RESET, which rewrites every index): a scribbling client hurts only itself.  The memfd
    is sealed against shrinking and growing, so the host's mapping cannot fault.

    With libatomic, the fd's port masks live in the memfd too, one word per port
    (``PortMaskWords``): the host masks a port at delivery, or marks it fired while masked
    and holds the event in Xen; the client's unmask clears the word and asks the host for
    the event only if it was marked.  The host reads these words too, but only as bits of
    its own ports: a client that scribbles them delays or repeats its own events.
    """

    def __init__(self) -> None:
        fd = os.memfd_create("xendmop-evtchn-ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, RING_BYTES)
            # a client holding the fd must not be able to truncate the pages under our mapping (SIGBUS)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self._map = mmap.mmap(fd, RING_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self._words = memoryview(self._map).cast("I")
        self.size = 0  # host's own ring_size
        self._prod = 0  # host's own ring_prod
        self._shadow = [0] * RING_CAPACITY  # what the host stored at each entry
        #: the mask words, when libatomic is there: the client unmasks without a message
        self.masks: PortMaskWords | None = None
        try:
            self.masks = PortMaskWords(self._map)
        except OSError:
            pass  # unmasks are then written to the host (WRITE), as before
        else:
            self._words[RING_FEATURES] = RING_FEATURE_MASKS
        self._words[RING_FEATURES] |= RING_FEATURE_DOORBELL
        self._db_cons = 0  # host's own db_cons
        #: the host's own verdict: a doorbell found corrupt is never read again (the client can
        #: clear the shared ``DOORBELL_BROKEN`` word, not this)
        self.doorbell_broken = False

    def doorbell_queued(self) -> bool:
        """The client's ``db_prod`` moved since the host last took entries (one word read, no check)."""
        return self._words[DOORBELL_PROD] != self._db_cons and not self.doorbell_broken

    def take_doorbell(self) -> list[int]:
        """The ports the client queued since the last take, oldest first; [] when none, or for a
        doorbell the client corrupted (``db_prod`` more than ``DOORBELL_CAPACITY`` ahead of the
        host's own ``db_cons``): its entries are dropped and the doorbell is broken for good.
        The host reads back ``db_prod`` and the entries alone, and each port read is only a
        number a NOTIFY checks as any other (``MockEvtchnDevice._notify_port``)."""
        if self.doorbell_broken:
            return []
        words = self._words
        prod, cons = words[DOORBELL_PROD], self._db_cons
        queued = (prod - cons) & _U32
        if not queued:
            return []
        if queued > DOORBELL_CAPACITY:
            self.doorbell_broken = True
            words[DOORBELL_BROKEN] = 1
            log.warning("evtchn doorbell corrupt: db_prod=%d db_cons=%d; its NOTIFYs go by message", prod, cons)
            return []
        mask = DOORBELL_CAPACITY - 1
        ports = [words[DOORBELL_ENTRIES + ((cons + i) & mask)] for i in range(queued)]
        self._db_cons = prod
        words[DOORBELL_CONS] = prod  # after the entries are read: the client may reuse them
        return ports

    def want_doorbell(self, port: int, wanted: bool) -> None:
        """Tell the client whether a vCPU of this process waits for ``port``'s NOTIFY (ring the doorbell)."""
        self._words[DOORBELL_WANTED + port] = int(wanted)

    def posted_done(self, count: int) -> None:
        """Publish how many posted messages of the connection were handled."""
        self._words[DOORBELL_POSTED_DONE] = count & _U32

    def unmask_at_bind(self, port: int) -> None:
        """A port bound by this fd starts unmasked (whatever a previous binding left in its word)."""
        if self.masks is not None:
            self.masks.exchange(port, 0)

    def take_for_delivery(self, port: int) -> bool:
        """``evtchn_interrupt`` on a port with a mask word: mask it and deliver (True), or, if the
        client has not unmasked it since the last delivery, mark it fired and hold it (False).
        A word the client keeps changing under the swap is held after a few attempts."""
        masks = self.masks
        assert masks is not None
        words = self._words
        for _ in range(_CAS_ATTEMPTS):
            old = words[RING_MASKS + port]
            held = bool(old & PORT_MASKED)
            if masks.compare_exchange(port, old, old | (PORT_FIRED if held else PORT_MASKED)):
                return not held
        return False

    def unmask(self, port: int) -> None:
        """The host's unmask (a client's WRITE): clear the word; the caller re-delivers if pending."""
        if self.masks is not None:
            self.masks.exchange(port, 0)

    def used(self) -> int | None:
        """Entries queued (``prod - cons``), or None when the client's ``ring_cons`` is out of bounds."""
        used = (self._prod - self._words[RING_CONS]) & _U32
        return used if used <= self.size else None

    def push(self, port: int) -> bool:
        """``evtchn_interrupt``: queue ``port`` if there is room; False if it is lost (full or corrupt)."""
        used = self.used()
        if used is None or used >= self.size:
            self._words[RING_OVERFLOW] = 1
            return False
        prod = self._prod
        slot = prod & (self.size - 1)
        self._shadow[slot] = port
        words = self._words
        words[RING_ENTRIES + slot] = port  # the entry before the index that publishes it
        self._prod = prod = (prod + 1) & _U32
        words[RING_PROD] = prod
        return True

    def queued(self) -> list[int]:
        """The unread ports, from the host's shadow (never the client's copy); [] for a corrupt ring."""
        used = self.used()
        if not used:
            return []
        mask, cons = self.size - 1, self._prod - used
        return [self._shadow[(cons + i) & mask] for i in range(used)]

    def rewrite(self, ports: list[int], size: int, overflow: bool) -> None:
        """Lay the ring out afresh: ``ports`` from entry 0, ``ring_cons`` 0, every header word
        written.  Only while the client is inside an ioctl that holds its consumer lock (a
        BIND's ``evtchn_resize_ring``, an UNBIND, a RESET), as Linux takes ``ring_cons_mutex``."""
        if size > RING_CAPACITY or size & (size - 1) or len(ports) > size:
            raise OSError(errno.ENOMEM, f"evtchn ring of {size} entries for {len(ports)} ports")
        words = self._words
        for i, port in enumerate(ports):
            self._shadow[i] = port
            words[RING_ENTRIES + i] = port
        self.size = size
        self._prod = len(ports)
        words[RING_SIZE] = size
        words[RING_OVERFLOW] = int(overflow)
        words[RING_CONS] = 0
        words[RING_PROD] = len(ports)

    def close(self) -> None:
        if self.masks is not None:
            self.masks.release()
        self._words.release()
        self._map.close()
        os.close(self.fd)


class Doorbell:
    """The host's eventfd a client writes after queueing a NOTIFY in its doorbell ring.

    Watched by the vCPU thread waiting for that NOTIFY (``IoreqServerState.wait_dm_notify``), which
    then applies the queued NOTIFYs itself (``MockEvtchnDevice.answer_doorbell``): the connection
    thread is off the path.  The fd is closed when the last reference goes, not at the
    device's close: a vCPU may still be polling it then.

    The host never reads the eventfd: it is watched edge-triggered (each write is one wake-up),
    and what is queued is in the ring, not the counter.  Its open file is shared with the
    client, which can clear O_NONBLOCK on it and drain it itself: a read by the host, after a
    poll another waiter or the client had made stale, would then block that vCPU thread for
    as long as the client likes, instead of letting its access time out."""

    def __init__(self, device: MockEvtchnDevice) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        #: None once the device is closed (its NOTIFYs were applied at the close)
        self.device: MockEvtchnDevice | None = device
        weakref.finalize(self, os.close, self.fd)

    def answer(self) -> None:
        """Apply every queued NOTIFY (a forged write alone applies nothing); the eventfd is left as is."""
        device = self.device
        if device is not None:
            device.answer_doorbell()


def _writable(fd: int) -> bool:
    """An eventfd write of 1 would not block (its counter is below 0xfffffffffffffffe)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(0))


def _domid(value: int, caller: int) -> int:
    """An ioctl's ``unsigned int`` domain as Xen gets it: truncated to ``domid_t`` by the
    assignment in evtchn.c, then ``DOMID_SELF`` read as the caller (xen/common/event_channel.c
    ``evtchn_alloc_unbound`` / ``evtchn_bind_interdomain``)."""
    domid = value & 0xFFFF
    return caller if domid == DOMID_SELF else domid


class MockEvtchnDevice:
    """One open of ``/dev/xen/evtchn`` in dom0 (``evtchn_open``)."""

    path = EVTCHN_PATH

    def __init__(self, host: MockXen, memory: Any = None) -> None:
        self._host = host
        #: the opener's memory, for an ioctl argument given as a user address
        self.memory = host.memory if memory is None else memory
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ring: list[int] = []
        self.ring_size = 0  # u->ring_size: no ring until the first bind
        self.ring_overflow = False  # u->ring_overflow
        self._ports: dict[int, bool] = {}  # bound port -> enabled (unmasked)
        self.restrict_domid = UNRESTRICTED_DOMID
        self.nonblocking = False
        self._cond = threading.Condition(host.lock)
        self._sleepers = 0  # blocking reads waiting on _cond: only they need a notify_all
        self._closed = False
        #: the ring in a memfd read by a client process (``share_ring``); None: ``_ring`` in-process
        self._shared: SharedPortRing | None = None
        #: the NOTIFY doorbell of a shared ring (``share_ring``)
        self.doorbell: Doorbell | None = None
        #: doorbell NOTIFYs that failed: the first is logged, the rest counted and logged at the
        #: close (a client queueing bad ports must not be able to flood the host's log)
        self._doorbell_failed = 0

    # --- the fd ---------------------------------------------------------------------

    def fileno(self) -> int:
        if self._closed:
            raise_errno(errno.EBADF)
        return self._efd

    @property
    def bound_ports(self) -> tuple[int, ...]:
        return tuple(sorted(self._ports))

    def share_ring(self) -> int:
        """Move the pending-port ring into a memfd for a client in another process; returns the
        memfd (owned by this device).  The client becomes the ring's only reader: ``read``
        here is refused, and the host writes the eventfd but never drains it (the client
        does, before it reads the ring).  Only on a fresh fd, before any bind."""
        with self._host.lock:
            if self._closed:
                raise_errno(errno.EBADF)
            if self._ports or self._shared is not None:
                raise OSError(errno.EBUSY, "share_ring: the fd already has ports or a shared ring")
            self._shared = SharedPortRing()
            self._host.shared_evtchn_rings += 1  # until the close
            self.doorbell = Doorbell(self)
            return self._shared.fd

    def answer_doorbell(self) -> None:
        """Apply the NOTIFYs the client queued in its doorbell, in order, each as ``ioctl`` applies
        a NOTIFY: ``_notify_port``'s rule (ENOTCONN for a port this fd did not bind, logged here as
        the client does not wait for it, as a posted NOTIFY's failure is), then the same log entry.
        Called by a waiting vCPU (``Doorbell.answer``), by the connection's thread before each
        message of its client (so no later request overtakes them), and at the close.

        Departs from Linux, where ``evtchn_ioctl`` (drivers/xen/evtchn.c) has sent the event when
        the NOTIFY returns: here it is sent when one of those takes it, which is before anything
        it affects can be seen (the vCPU it releases applies it itself; the client's next request
        and its close come after it)."""
        shared = self._shared
        try:
            if shared is None or not shared.doorbell_queued():
                return
        except ValueError:  # closed meanwhile (its mapping released): the close applied them
            return
        host = self._host
        wakes = defer_wakes()  # the vCPUs' wake-ups after the unlock (WakeAfterUnlock)
        try:
            with host.lock:
                if not self._closed:
                    self._answer_doorbell_locked(shared)
        finally:
            write_deferred_wakes(wakes)

    def _answer_doorbell_locked(self, shared: SharedPortRing) -> None:
        events = self._host.events
        for port in shared.take_doorbell():
            rc = self._notify_port(port)
            events.notified(port, rc)
            if rc < 0:
                self._doorbell_failed += 1
                if self._doorbell_failed == 1:
                    log.warning(
                        "evtchn doorbell NOTIFY of port %d failed: %s (further failures are counted)",
                        port,
                        os.strerror(-rc),
                    )

    def want_doorbell(self, port: int, wanted: bool) -> Doorbell | None:
        """A vCPU starts (``wanted``) or stops waiting for the NOTIFY of ``port``, a port this fd
        bound: with a shared ring, the client is told to ring the doorbell for it; the doorbell
        to watch, or None (the NOTIFY then comes by message).  Under the host lock."""
        shared = self._shared
        if shared is None or self._closed:
            return None
        if shared.doorbell_broken or port not in self._ports:
            wanted = False  # and a word left set by an earlier wait is cleared
        shared.want_doorbell(port, wanted)
        return self.doorbell if wanted else None

    def posted_done(self, count: int) -> None:
        """The connection handled ``count`` posted messages (``DOORBELL_POSTED_DONE``)."""
        if self._shared is not None:
            self._shared.posted_done(count)

    def port_pending(self, port: int) -> None:
        """``evtchn_interrupt``: a bound port fired; queue it once and mask it until written back."""
        shared = self._shared
        if shared is None or shared.masks is None:
            if not self._ports.get(port, False):
                return  # masked: stays pending in Xen until unmasked
            self._ports[port] = False
        elif port not in self._ports or not shared.take_for_delivery(port):
            return  # masked (the mask is the client's word): stays pending until its unmask asks for it
        self._host.dom0.ports[port].pending = False
        if shared is not None:
            if not shared.push(port):  # full, or a ring the client corrupted: lost, EFBIG until RESET
                self.ring_overflow = True
            # Also after an overflow: a full ring's fd is readable already, a corrupt one's now.
            # The eventfd's open file is shared with the client, which can clear O_NONBLOCK and
            # push the counter to its limit: then a write would block this host thread.  Only
            # a writable eventfd is written (a full one is readable anyway, nothing is lost).
            if _writable(self._efd):
                try:
                    os.eventfd_write(self._efd, 1)
                except BlockingIOError:
                    pass  # filled between the poll and the write, with O_NONBLOCK still set
            return
        if len(self._ring) >= self.ring_size:  # the event is consumed and lost
            self.ring_overflow = True
            return
        self._ring.append(port)
        os.eventfd_write(self._efd, 1)
        if self._sleepers:
            self._cond.notify_all()

    def read(self, nbytes: int) -> bytes:
        """``evtchn_read``: pending ports as native uint32s (count rounded down to 4, at most a page)."""
        nbytes = min(nbytes & ~3, PAGE_SIZE)
        if nbytes == 0:
            return b""
        if self._shared is not None:
            raise OSError(errno.EINVAL, "evtchn read: the ports of a shared ring are read by its client")
        if self.nonblocking and not self._ring and not self.ring_overflow:
            # The dispatch loop's common "anything more?" read: EAGAIN without taking the host
            # lock.  A port queued meanwhile is not lost: the eventfd stays readable for it.
            raise BlockingIOError(errno.EAGAIN, _EAGAIN_TEXT)
        # The condition's own lock, taken directly (Condition.__enter__ is one Python call more).
        with self._host.lock:
            while True:
                if self.ring_overflow:  # checked before the ring, every round
                    raise_errno(errno.EFBIG)
                ring = self._ring
                if ring:
                    break
                if self.nonblocking:
                    raise_errno(errno.EAGAIN)
                self._sleepers += 1
                try:
                    self._cond.wait()
                finally:
                    self._sleepers -= 1
            room = nbytes >> 2
            if len(ring) <= room:  # the usual case: the read takes the whole ring
                self._ring = []
                try:  # the ring is empty: the fd is not readable any more
                    os.eventfd_read(self._efd)
                except BlockingIOError:
                    pass
                if len(ring) == 1:
                    return _ONE_PORT.pack(ring[0])
                return struct.pack(f"<{len(ring)}I", *ring)  # one pack, not a bytes object per port
            self._ring = ring[room:]
            return struct.pack(f"<{room}I", *ring[:room])

    def write(self, data: bytes) -> int:
        """``evtchn_write``: unmask each written port that this fd bound; re-deliver if pending."""
        nbytes = min(len(data) & ~3, PAGE_SIZE)
        shared = self._shared
        ports = self._ports
        with self._host.lock:
            if nbytes == 4 and shared is None:  # the device model's unmask after each event
                port = int.from_bytes(data[:4], "little")
                if ports.get(port) is False:  # bound and masked; any other port is ignored
                    ports[port] = True
                    chn = self._host.dom0.ports.get(port)
                    if chn is not None and chn.pending:  # _redeliver: fires again (xen_irq_lateeoi)
                        self.port_pending(port)
                return 4
            for i in range(0, nbytes, 4):
                port = int.from_bytes(data[i : i + 4], "little")
                if shared is not None and shared.masks is not None:
                    if port in ports:
                        shared.unmask(port)
                        self._redeliver(port)
                elif ports.get(port) is False:
                    ports[port] = True
                    self._redeliver(port)
        return nbytes

    def kick(self, data: bytes) -> int:
        """A remote client's unmask of ports that fired while masked: it cleared their mask words
        itself (``PortMaskWords``) and asks for the held events; each is delivered if still
        pending and unmasked (the swap in ``port_pending`` decides).  Returns the bytes taken."""
        nbytes = min(len(data) & ~3, PAGE_SIZE)
        with self._host.lock:
            for i in range(0, nbytes, 4):
                port = int.from_bytes(data[i : i + 4], "little")
                if port in self._ports:
                    self._redeliver(port)
        return nbytes

    def _redeliver(self, port: int) -> None:
        chn = self._host.dom0.ports.get(port)
        if chn is not None and chn.pending:  # xen_irq_lateeoi: fires again
            self.port_pending(port)

    def _drain_efd(self) -> None:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass

    def readable(self) -> bool:
        poller = select.poll()  # not select.select: it refuses an fd past FD_SETSIZE (1024)
        poller.register(self._efd, select.POLLIN)
        return bool(poller.poll(0))

    def poll(self) -> int:
        """``evtchn_poll``: POLLOUT always, POLLIN while ports are queued, only POLLERR after an overflow."""
        if self.ring_overflow:
            return select.POLLERR
        mask = select.POLLOUT | select.POLLWRNORM
        queued = len(self._ring) if self._shared is None else self._shared.used()
        if queued:
            mask |= select.POLLIN | select.POLLRDNORM
        return mask

    # --- ioctl ------------------------------------------------------------------------

    def ioctl(self, request: int, arg: Any = 0) -> int:
        if self._closed:
            raise_errno(errno.EBADF)
        if request == IOCTL_EVTCHN_NOTIFY and arg.__class__ is ioctl_evtchn_notify:
            # A device model's notify after each access: its one field is read as is (the
            # struct is already the kernel's copy), then the same rule (_notify_port), and
            # the same log entry as any NOTIFY, recorded as its port (``EventLog.notified``).
            port = arg.port
            host = self._host
            wakes = defer_wakes()  # the vCPU's wake-up after the unlock (WakeAfterUnlock)
            try:
                with host.lock:
                    rc = self._notify_port(port)
                    host.events.notified(port, rc)
            finally:
                write_deferred_wakes(wakes)
        else:
            with WakeAfterUnlock(), self._host.lock:
                rc = self._ioctl(request, arg)
                self._host.log("evtchn", request, {"arg": _show(arg)}, rc)
        if rc < 0:
            raise_errno(-rc)
        return rc

    def _ioctl(self, request: int, arg: Any) -> int:
        """``evtchn_ioctl``."""
        handler = _IOCTLS.get(request)
        if handler is None:
            return -errno.ENOSYS
        struct, fn = handler
        if struct is None:
            return int(fn(self, None))
        try:
            data = read_arg(arg, struct, self.memory)
        except OSError:
            return -errno.EFAULT
        return int(fn(self, data))

    def _bind(self, port: int) -> None:
        """``evtchn_bind_to_user``: ``evtchn_resize_ring`` first, so the ring holds every bound port."""
        if len(self._ports) + 1 > self.ring_size:
            self.ring_size = self.ring_size * 2 if self.ring_size else FIRST_RING_SIZE
            if self._shared is not None:  # evtchn_resize_ring: the queued ports move to the new ring
                self._relayout_shared()
        self._ports[port] = True
        if self._shared is not None:
            self._shared.unmask_at_bind(port)
            self._shared.want_doorbell(port, False)  # nobody waits for a new port's NOTIFY yet
        self._host.dom0.ports[port].user = self
        if self._host.dom0.ports[port].pending:
            self.port_pending(port)

    def _bind_virq(self, data: Any) -> int:
        if self.restrict_domid != UNRESTRICTED_DOMID:
            return -errno.EACCES
        if data.virq >= NR_VIRQS:  # evtchn_bind_virq
            return -errno.EINVAL
        hv, dom0 = self._host.hypervisor, self._host.dom0
        port = hv.get_free_port(dom0)
        if port < 0:
            return port
        dom0.ports[port] = EvtchnPort(port, "virq")
        self._bind(port)
        return port

    def _bind_interdomain(self, data: Any) -> int:
        # evtchn.c evtchn_ioctl IOCTL_EVTCHN_BIND_INTERDOMAIN: the restriction compares the whole
        # unsigned int; then ``bind_interdomain.remote_dom = bind.remote_domain`` truncates it to
        # domid_t, so 0x10000|D binds to D (measured on Linux 6.1 / Xen 4.17.7: "evtchn truncation"
        # scenarios, integration/scenarios.py)
        if self.restrict_domid != UNRESTRICTED_DOMID and data.remote_domain != self.restrict_domid:
            return -errno.EACCES
        remote = _domid(data.remote_domain, self._host.dom0.domid)
        port = self._host.hypervisor.bind_interdomain(self._host.dom0, remote, data.remote_port)
        if port > 0:
            self._bind(port)
        return port

    def _bind_unbound(self, data: Any) -> int:
        if self.restrict_domid != UNRESTRICTED_DOMID:
            return -errno.EACCES
        # evtchn.c: ``alloc_unbound.remote_dom = bind.remote_domain`` truncates to domid_t; Xen's
        # evtchn_alloc_unbound (xen/common/event_channel.c) then records remote_dom without looking
        # it up (a missing domain is no error; DOMID_SELF is the caller), as the lab measured
        remote = _domid(data.remote_domain, self._host.dom0.domid)
        port = self._host.hypervisor.alloc_unbound(self._host.dom0, remote)
        if port > 0:
            self._bind(port)
        return port

    def _unbind(self, data: Any) -> int:
        if data.port >= NR_EVTCHN_PORTS:
            return -errno.EINVAL
        if data.port not in self._ports:
            return -errno.ENOTCONN
        self._unbind_port(data.port)
        return 0

    def _unbind_port(self, port: int) -> None:
        # evtchn_unbind_from_user (drivers/xen/evtchn.c) unbinds the irq handler and forgets
        # the port; entries already in the ring stay, so a read may still return it (a
        # write to unmask it is then ignored: find_evtchn finds nothing).
        del self._ports[port]
        if self._shared is not None:
            # A vCPU waiting for this port's NOTIFY can no longer get it from this fd, and the
            # vCPU cannot find this fd again to say it stopped (its port is unbound now): the
            # word is cleared here, or a later binding of the same number would ring a doorbell
            # nobody waits on, its NOTIFY applied only at the client's next request.
            self._shared.want_doorbell(port, False)
        self._host.hypervisor.close_port(self._host.dom0, port)

    def _relayout_shared(self) -> None:
        """The shared ring rewritten at ``ring_size`` with its queued ports (``evtchn_resize_ring``
        copies them into the new ring).  A ring whose ``ring_cons`` the client corrupted keeps
        nothing and stays overflowed until RESET."""
        shared = self._shared
        assert shared is not None
        if shared.used() is None:
            self.ring_overflow = True
        shared.rewrite(list(shared.queued()), self.ring_size, self.ring_overflow)

    def _notify(self, data: Any) -> int:
        return self._notify_port(data.port)

    def _notify_port(self, port: int) -> int:
        """``evtchn_ioctl`` IOCTL_EVTCHN_NOTIFY: only a port this fd bound, then ``notify_remote_via_evtchn``."""
        if port >= NR_EVTCHN_PORTS or port not in self._ports:
            return -errno.ENOTCONN
        return self._host.hypervisor.evtchn_send(self._host.dom0, port)

    def _reset(self, _: Any) -> int:
        """``IOCTL_EVTCHN_RESET``: empty the ring and clear the overflow (queued ports stay masked)."""
        self._ring = []
        self.ring_overflow = False
        if self._shared is not None:
            # The client drains the eventfd itself (it may have cleared O_NONBLOCK on it: a read
            # here could block the host); it is at worst readable once with an empty ring.
            self._shared.rewrite([], self.ring_size, False)  # every index rewritten: a corrupt ring is repaired
        else:
            self._drain_efd()
        return 0

    def _restrict(self, data: Any) -> int:
        if self.restrict_domid != UNRESTRICTED_DOMID:
            return -errno.EACCES
        if data.domid == 0 or data.domid >= DOMID_FIRST_RESERVED:
            return -errno.EINVAL
        self.restrict_domid = int(data.domid)
        return 0

    def mmap(self, length: int, offset: int = 0) -> Any:
        raise_errno(errno.ENODEV)

    def close(self) -> None:
        """``evtchn_release``: unbind every port, free the fd."""
        if self._closed:
            return
        # The NOTIFYs the client queued returned to it before it closed: they happen first.
        self.answer_doorbell()
        with self._host.lock:
            self._closed = True
            if self.doorbell is not None:
                self.doorbell.device = None
            for port in list(self._ports):
                self._unbind_port(port)
            self._cond.notify_all()
            self._host._forget(self)
            shared, self._shared = self._shared, None
            if shared is not None:
                self._host.shared_evtchn_rings -= 1
        if self._doorbell_failed > 1:
            log.warning("%d more evtchn doorbell NOTIFYs failed", self._doorbell_failed - 1)
        if shared is not None:
            shared.close()
        os.close(self._efd)


def _show(arg: Any) -> Any:
    if isinstance(arg, ctypes.Structure):
        return {name: getattr(arg, name) for name, *_ in arg._fields_}
    return arg


_IOCTLS: dict[int, tuple[type[ctypes.Structure] | None, Any]] = {
    IOCTL_EVTCHN_BIND_VIRQ: (ioctl_evtchn_bind_virq, MockEvtchnDevice._bind_virq),
    IOCTL_EVTCHN_BIND_INTERDOMAIN: (ioctl_evtchn_bind_interdomain, MockEvtchnDevice._bind_interdomain),
    IOCTL_EVTCHN_BIND_UNBOUND_PORT: (ioctl_evtchn_bind_unbound_port, MockEvtchnDevice._bind_unbound),
    IOCTL_EVTCHN_UNBIND: (ioctl_evtchn_unbind, MockEvtchnDevice._unbind),
    IOCTL_EVTCHN_NOTIFY: (ioctl_evtchn_notify, MockEvtchnDevice._notify),
    IOCTL_EVTCHN_RESET: (None, MockEvtchnDevice._reset),
    IOCTL_EVTCHN_RESTRICT_DOMID: (ioctl_evtchn_restrict_domid, MockEvtchnDevice._restrict),
}
