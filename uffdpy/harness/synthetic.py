"""Synthetic mapped-ram snapshots: deterministic contents for tests, demos and benchmarks.

``make_synthetic`` writes a one-block snapshot (block ``ram``, as ``-machine
none -m SIZE`` has it) whose pages hold data in runs of varying length; the
same seed always gives the same bytes (:func:`synthetic_runs`,
:func:`synthetic_run_data`), so a load can be verified page by page.
"""
from __future__ import annotations

import hashlib
import random
import struct
from typing import Iterator, List, Tuple

from ..mappedram import BlockSpec, write_snapshot
from ..pagesource import PathLike

__all__ = ["make_synthetic", "synthetic_runs", "synthetic_run_data"]


def synthetic_runs(pages: int, fill: float, seed: int) -> List[Tuple[int, int, bool]]:
    """The deterministic (first_page, page_count, present) runs of a synthetic block.

    Run lengths vary from 1 to 512 pages; a run is present with probability
    ``fill``.  Adjacent runs of the same kind are merged.
    """
    if not 0.0 <= fill <= 1.0:
        raise ValueError(f"fill must be in [0, 1], not {fill}")
    rng = random.Random(seed)
    runs: List[Tuple[int, int, bool]] = []
    first = 0
    while first < pages:
        count = min(pages - first, rng.randint(1, 1 << rng.randint(0, 9)))
        present = rng.random() < fill
        if runs and runs[-1][2] == present:
            runs[-1] = (runs[-1][0], runs[-1][1] + count, present)
        else:
            runs.append((first, count, present))
        first += count
    return runs


def _synthetic_base(seed: int, page_size: int) -> int:
    return int.from_bytes(random.Random(seed).randbytes(page_size), "little")


def synthetic_run_data(seed: int, first: int, count: int, page_size: int = 4096) -> bytes:
    """Deterministic pseudo-random bytes for pages [first, first+count) of a synthetic block.

    Page *i* is a random page fixed by ``seed`` XOR a 64-byte BLAKE2b digest
    of ``(seed, i)`` repeated over the page: every page differs from every
    other, none is all zero, any sub-range can be recomputed, and it is fast
    (a few microseconds per page).
    """
    base = _synthetic_base(seed, page_size)
    out = bytearray()
    for i in range(first, first + count):
        digest = hashlib.blake2b(struct.pack("<qq", seed, i), digest_size=64).digest()
        page = (base ^ int.from_bytes(digest * (page_size // 64), "little")).to_bytes(
            page_size, "little")
        out += page if page[0] else b"\x01" + page[1:]
    return bytes(out)


def make_synthetic(path: PathLike, *, size: int, fill: float, seed: int,
                   machine: str = "none", page_size: int = 4096) -> None:
    """Write a one-block snapshot (block ``ram`` of ``size`` bytes) for ``-machine none -m SIZE``.

    About ``fill`` of the pages hold random data in runs of varying length
    (see :func:`synthetic_runs`, :func:`synthetic_run_data`), the rest are
    zero.  Memory use stays bounded for any ``size``.

    Raises: ValueError if ``size`` is not a positive multiple of ``page_size``
    or ``fill`` is outside [0, 1]; OSError.
    """
    if size <= 0 or size % page_size:
        raise ValueError(f"size must be a positive multiple of {page_size}, not {size}")
    runs = synthetic_runs(size // page_size, fill, seed)

    def chunks() -> Iterator[Tuple[int, bytes]]:
        for first, count, present in runs:
            if not present:
                continue
            for lo in range(first, first + count, 256):
                n = min(256, first + count - lo)
                yield (lo, synthetic_run_data(seed, lo, n, page_size))

    write_snapshot(path, [BlockSpec("ram", size, chunks())], machine=machine,
                   page_size=page_size)
