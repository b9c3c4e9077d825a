"""Access workloads and verification over loaded guest memory.

Every access here is a ``ctypes.memmove`` out of guest memory, which releases
the GIL for the copy: a thread that faults on a page the loader has not placed
yet sleeps in the kernel *without* the GIL, so the in-process fault loop can
run and serve it.  Latencies are timed in the accessing thread.

A page the loader *fenced* (a failed load makes every unplaced page
``PROT_NONE``, see :mod:`uffdpy.loader`) kills a ``memmove`` that touches it
with SIGSEGV, the whole process with it; and a toucher already asleep in a
fault when the load fails is woken into the fence.  ``via="process_vm_readv"``
reads the same 8 bytes with ``process_vm_readv(2)`` on this process instead
(also GIL-free; a missing page faults and waits for the loader the same way,
through the kernel's ``get_user_pages``): a fenced page is then ``EFAULT``,
raised as :class:`PageFenced`, and the toucher ends.  It costs ~2 us a touch
on a placed page (a syscall), the same on a fault.  ``run_access`` can be
stopped: its touchers check a stop event between touches, and its calling
thread waits for them in a loop that runs ``check`` and receives signals.
"""
from __future__ import annotations

import ctypes
import errno
import os
import random
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from ..latency import percentiles
from ..pagesource import PageRegion

__all__ = ["parse_access", "run_access", "page_at", "touch_pages", "verify", "latency_summary",
           "PageFenced", "READERS"]

PATTERNS = ("none", "seq", "random", "hot")

#: how ``touch_pages`` reads a page: ``memmove`` (an ordinary load) or
#: ``process_vm_readv`` (a syscall: a fenced page is EFAULT, not SIGSEGV)
READERS = ("memmove", "process_vm_readv")

#: how long ``run_access`` waits for its touchers to finish their current
#: touch once stopped (each is one fault at most while the loader serves)
STOP_TIMEOUT_S = 30.0


class PageFenced(OSError):
    """A touch found an inaccessible (fenced) page: the load failed under it."""


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_process_vm_readv: Optional[Any] = None


def _vm_readv() -> Any:
    """libc's ``process_vm_readv``, declared on first use."""
    global _process_vm_readv
    if _process_vm_readv is None:
        func = ctypes.CDLL(None, use_errno=True).process_vm_readv
        func.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                         ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong]
        func.restype = ctypes.c_ssize_t
        _process_vm_readv = func
    return _process_vm_readv


def parse_access(spec: str) -> Tuple[str, float]:
    """Parse ``none|seq|random|hot:FRACTION`` into ``(pattern, fraction)``.

    Raises:
        ValueError: an unknown pattern or a fraction outside (0, 1].
    """
    name, _, arg = spec.partition(":")
    if name not in PATTERNS or (arg and name != "hot"):
        raise ValueError(f"unknown access pattern {spec!r}: use none, seq, random or hot:FRACTION")
    if name != "hot":
        return name, 1.0
    try:
        fraction = float(arg)
    except ValueError:
        raise ValueError(f"hot:FRACTION needs a number, not {arg!r}") from None
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"hot fraction must be in (0, 1], not {fraction}")
    return name, fraction


def page_at(blocks: Sequence[Tuple[int, PageRegion]], k: int) -> Tuple[int, PageRegion, int]:
    """Page ``k`` counting across ``(address, region)`` pairs in order.

    Returns its address in memory, its region and its index in the region.

    Raises:
        IndexError: ``k`` is past the last page.
    """
    for base, region in blocks:
        if k < region.pages:
            return base + k * region.page_size, region, k
        k -= region.pages
    raise IndexError(k)


def _page_addresses(blocks: Sequence[Tuple[int, PageRegion]], pattern: str, fraction: float,
                    touches: int, seed: int) -> Iterator[int]:
    """The addresses one toucher visits, in order, made as they are visited.

    Lazy: the first touch starts at once, and a large ``touches`` costs no
    memory (a list of 10**8 addresses took a minute and gigabytes to build).
    """
    total = sum(b.pages for _, b in blocks)
    if total == 0 or pattern == "none":
        return

    def address(k: int) -> int:
        return page_at(blocks, k)[0]

    rng = random.Random(seed)
    if pattern == "seq":
        for k in range(touches):
            yield address(k % total)
    elif pattern == "random":
        for _ in range(touches):
            yield address(rng.randrange(total))
    else:
        hot = rng.sample(range(total), max(1, int(total * fraction)))
        for _ in range(touches):
            yield address(rng.choice(hot))


def touch_pages(addresses: Iterable[int], *, cpu: Optional[int] = None,
                stop: Optional[threading.Event] = None, via: str = "memmove") -> List[int]:
    """Read 8 bytes at each address in order (GIL released); return each latency in ns.

    Runs in the calling thread, pinned to ``cpu`` if given for the duration
    (threads and processes it starts meanwhile would inherit the pinning).
    Returns early, with the latencies so far, once ``stop`` is set (checked
    between touches).  ``via`` is one of ``READERS`` (see the module essay).

    Raises:
        PageFenced: ``via="process_vm_readv"`` and a page was inaccessible.
        OSError: ``process_vm_readv`` failed otherwise.
        ValueError: an unknown ``via``.
    """
    if via not in READERS:
        raise ValueError(f"via must be one of {', '.join(READERS)}, not {via!r}")
    tid = threading.get_native_id()
    affinity = os.sched_getaffinity(tid)
    if cpu is not None:
        os.sched_setaffinity(tid, {cpu})
    try:
        sink = ctypes.create_string_buffer(8)
        out: List[int] = []
        clock = time.perf_counter_ns
        stopped = stop.is_set if stop is not None else (lambda: False)
        if via == "memmove":
            memmove = ctypes.memmove
            for a in addresses:
                if stopped():
                    break
                t = clock()
                memmove(sink, a, 8)
                out.append(clock() - t)
            return out
        readv, pid = _vm_readv(), os.getpid()
        local = _Iovec(ctypes.addressof(sink), 8)
        remote = _Iovec(0, 8)
        local_p, remote_p = ctypes.byref(local), ctypes.byref(remote)
        for a in addresses:
            if stopped():
                break
            remote.iov_base = a
            t = clock()
            while True:
                n = readv(pid, local_p, 1, remote_p, 1, 0)
                if n == 8:
                    break
                err = ctypes.get_errno() if n < 0 else 0
                if err == errno.EINTR:
                    continue
                if err == errno.EFAULT or n >= 0:
                    raise PageFenced(errno.EFAULT, f"page at 0x{a:x} is inaccessible "
                                     "(the load failed and fenced it)")
                raise OSError(err, f"process_vm_readv(0x{a:x}, 8): {os.strerror(err)}")
            out.append(clock() - t)
        return out
    finally:
        if cpu is not None:
            os.sched_setaffinity(tid, affinity)


def run_access(blocks: Sequence[Tuple[int, PageRegion]], *, pattern: str, fraction: float = 1.0,
               touches: int, threads: int = 1, cpu: Optional[int] = None,
               seed: int = 1, via: str = "memmove",
               check: Optional[Callable[[], Any]] = None,
               poll_s: float = 0.02) -> List[int]:
    """Touch guest pages from ``threads`` threads; return every access latency in ns.

    The calling thread waits for the touchers in a loop (``poll_s`` seconds a
    round, so that a signal's ``KeyboardInterrupt`` arrives at once) and calls
    ``check()`` each round: for a loader, ``lambda: loader.wait(0)``, which
    raises once the load failed.  Whatever ends the wait early (``check``
    raising, a toucher failing, ``KeyboardInterrupt``) stops the touchers
    *before* it propagates: no new touch starts, the current ones finish (a
    loader still serving serves them) and are joined; only then is the
    exception re-raised, so the caller may close the loader with no toucher
    left inside guest memory.  After a toucher's failure ``check()`` runs once
    more: the loader's error, which explains a fenced page, wins.

    Args:
        blocks: ``(address, block)`` pairs: where each block's memory is mapped.
        pattern: ``seq``, ``random`` or ``hot`` (see ``parse_access``).
        touches: accesses per thread.
        cpu: pin the accessing threads to this CPU.
        via: how a page is read (``READERS``; see the module essay).

    Raises:
        PageFenced: a toucher found a fenced page and ``check`` raised nothing.
        RuntimeError: a toucher did not stop within ``STOP_TIMEOUT_S``.
        Whatever ``check`` raises; ``KeyboardInterrupt``.
    """
    if via not in READERS:
        raise ValueError(f"via must be one of {', '.join(READERS)}, not {via!r}")
    results: List[List[int]] = [[] for _ in range(threads)]
    errors: List[BaseException] = []
    stop = threading.Event()

    def toucher(index: int) -> None:
        try:
            addresses = _page_addresses(blocks, pattern, fraction, touches, seed + index)
            results[index] = touch_pages(addresses, cpu=cpu, stop=stop, via=via)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
            stop.set()

    workers = [threading.Thread(target=toucher, args=(i,), name=f"uffdpy-toucher-{i}",
                                daemon=True) for i in range(threads)]
    try:
        for t in workers:
            t.start()
        for t in workers:
            while t.is_alive() and not stop.is_set():
                t.join(poll_s)
                if check is not None:
                    check()
            if stop.is_set():
                break
    finally:
        stop.set()
        _join_all(workers)
    if errors:
        if check is not None:
            check()
        raise errors[0]
    return [x for r in results for x in r]


def _join_all(workers: Sequence[threading.Thread]) -> None:
    """Join stopped touchers, up to ``STOP_TIMEOUT_S``; further signals wait for it."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    interrupted: Optional[BaseException] = None
    for t in workers:
        while t.is_alive() and time.monotonic() < deadline:
            try:
                t.join(min(0.1, max(0.0, deadline - time.monotonic())))
            except KeyboardInterrupt as exc:      # a second Ctrl-C: still join first
                interrupted = exc
    stuck = [t.name for t in workers if t.is_alive()]
    if stuck:
        raise RuntimeError(f"{', '.join(stuck)} did not stop within {STOP_TIMEOUT_S:.0f} s "
                           "(stuck in a fault the loader does not serve)")
    if interrupted is not None:
        raise interrupted


def latency_summary(samples_ns: Sequence[int]) -> Dict[str, Optional[float]]:
    """p50/p90/p99/max of ``samples_ns``, in microseconds (:func:`uffdpy.latency.percentiles`)."""
    return percentiles(samples_ns, unit=1e-3)


def verify(regions: Sequence[Tuple[int, PageRegion]],
           chunk_pages: int = 256) -> Tuple[int, int]:
    """Compare every page of loaded memory with its image; return ``(verified, mismatched)``.

    ``regions`` pairs each region's address in memory with the region.  Memory
    is read with ``ctypes.memmove`` (safe while a load is still running), the
    image with the region's own ``read_pages`` (plain ``pread``, independent of
    the loader's file mapping; zero pages read as zeros).
    """
    verified = mismatched = 0
    for base, region in regions:
        ps = region.page_size
        buf = ctypes.create_string_buffer(chunk_pages * ps)
        for lo in range(0, region.pages, chunk_pages):
            n = min(chunk_pages, region.pages - lo)
            size = n * ps
            ctypes.memmove(buf, base + lo * ps, size)
            got = buf.raw[:size]
            want = region.read_pages(lo, n)
            verified += n
            if got != want:
                mismatched += sum(1 for k in range(n)
                                  if got[k * ps:(k + 1) * ps] != want[k * ps:(k + 1) * ps])
    return verified, mismatched
