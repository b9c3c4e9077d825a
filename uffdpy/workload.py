"""Access workloads and verification over loaded guest memory.

Every access here is a ``ctypes.memmove`` out of guest memory, which releases
the GIL for the copy: a thread that faults on a page the loader has not placed
yet sleeps in the kernel *without* the GIL, so the in-process fault loop can
run and serve it.  Latencies are timed in the accessing thread.
"""
from __future__ import annotations

import ctypes
import os
import random
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

from .pagesource import PageRegion

__all__ = ["parse_access", "run_access", "page_at", "touch_pages", "verify", "latency_summary"]

PATTERNS = ("none", "seq", "random", "hot")


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
                    touches: int, seed: int) -> List[int]:
    """The addresses one toucher visits, in order."""
    total = sum(b.pages for _, b in blocks)
    if total == 0 or pattern == "none":
        return []

    def address(k: int) -> int:
        return page_at(blocks, k)[0]

    rng = random.Random(seed)
    if pattern == "seq":
        return [address(k % total) for k in range(touches)]
    if pattern == "random":
        return [address(rng.randrange(total)) for _ in range(touches)]
    hot = rng.sample(range(total), max(1, int(total * fraction)))
    return [address(rng.choice(hot)) for _ in range(touches)]


def touch_pages(addresses: Sequence[int], *, cpu: Optional[int] = None) -> List[int]:
    """Read 8 bytes at each address in order (GIL released); return each latency in ns.

    Runs in the calling thread, pinned to ``cpu`` if given for the duration
    (threads and processes it starts meanwhile would inherit the pinning).
    """
    tid = threading.get_native_id()
    affinity = os.sched_getaffinity(tid)
    if cpu is not None:
        os.sched_setaffinity(tid, {cpu})
    try:
        sink = ctypes.create_string_buffer(8)
        out: List[int] = []
        clock = time.perf_counter_ns
        memmove = ctypes.memmove
        for a in addresses:
            t = clock()
            memmove(sink, a, 8)
            out.append(clock() - t)
        return out
    finally:
        if cpu is not None:
            os.sched_setaffinity(tid, affinity)


def run_access(blocks: Sequence[Tuple[int, PageRegion]], *, pattern: str, fraction: float = 1.0,
               touches: int, threads: int = 1, cpu: Optional[int] = None,
               seed: int = 1) -> List[int]:
    """Touch guest pages from ``threads`` threads; return every access latency in ns.

    Args:
        blocks: ``(address, block)`` pairs: where each block's memory is mapped.
        pattern: ``seq``, ``random`` or ``hot`` (see ``parse_access``).
        touches: accesses per thread.
        cpu: pin the accessing threads to this CPU.
    """
    results: List[List[int]] = [[] for _ in range(threads)]
    errors: List[BaseException] = []

    def toucher(index: int) -> None:
        try:
            addresses = _page_addresses(blocks, pattern, fraction, touches, seed + index)
            results[index] = touch_pages(addresses, cpu=cpu)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    workers = [threading.Thread(target=toucher, args=(i,), name=f"uffdpy-toucher-{i}",
                                daemon=True) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if errors:
        raise errors[0]
    return [x for r in results for x in r]


def latency_summary(samples_ns: Sequence[int]) -> Dict[str, float]:
    """p50/p90/p99/max of ``samples_ns``, in microseconds."""
    if not samples_ns:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    s = sorted(samples_ns)
    n = len(s)
    return {"p50": s[n // 2] / 1e3, "p90": s[min(n - 1, int(0.9 * n))] / 1e3,
            "p99": s[min(n - 1, int(0.99 * n))] / 1e3, "max": s[-1] / 1e3}


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
