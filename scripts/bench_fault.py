#!/usr/bin/env python3
"""What a userfaultfd fault costs when Python serves it, next to C, on this machine.

Prints two tables:

1. Per-fault latency (p50/p90/p99, microseconds) as seen by a toucher thread
   that reads one byte of each page of a registered region in random order
   with ``ctypes.memmove`` (which releases the GIL), timed around the access
   with ``time.perf_counter_ns``.  A Python handler thread serves every fault
   with one single-page ``UFFDIO_COPY`` or ``UFFDIO_ZEROPAGE``.  Thread
   placement dominates fault latency, so three are measured, the toucher
   always pinned to CPU 0:

   * ``same CPU, poll``: the handler also on CPU 0, sleeping in ``poll``;
   * ``other CPU, poll``: the handler on CPU 1, sleeping in ``poll``;
   * ``other CPU, busy``: the handler on CPU 1, spinning on non-blocking reads.

2. Bulk ``UFFDIO_COPY`` throughput (GB/s) for 4 KiB, 64 KiB and 2 MiB per
   call over a whole registered region: no faults, only the kernel copy and
   the per-call overhead (median of 3 runs after a warm-up).

When a C compiler (``cc``) is present, ``benchmarks/fault_handler.c`` is built
into ``benchmarks/fault_handler.bin`` and run in the same invocation with the
same parameters, and each row gets the C figure and the Python/C ratio.

Usage: ``python scripts/bench_fault.py [--quick] [--faults N] [--bulk-mib M]``.
``--quick`` finishes in a few seconds; the default run takes well under a minute.
Needs a working userfaultfd (root, or see ``uffdpy.uffd.UffdPermissionError``)
and two CPUs for the other-CPU placements.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import random
import select
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tabulate import tabulate  # noqa: E402

from uffdpy import ioctl as abi  # noqa: E402
from uffdpy.memory import PAGE_SIZE, Mapping  # noqa: E402
from uffdpy.uffd import Userfaultfd  # noqa: E402

C_SOURCE = ROOT / "benchmarks" / "fault_handler.c"
C_BINARY = ROOT / "benchmarks" / "fault_handler.bin"

# (key, label, handler CPU, busy-poll)
PLACEMENTS = [
    ("same", "same CPU, poll", 0, False),
    ("poll", "other CPU, poll", 1, False),
    ("busy", "other CPU, busy", 1, True),
]
OPS = ["copy", "zeropage"]
CHUNKS = [4096, 64 * 1024, 2 * 1024 * 1024]
SOURCE_SIZE = 2 * 1024 * 1024

Percentiles = Tuple[float, float, float]


def pin(cpu: int) -> None:
    """Pin the calling thread to ``cpu``."""
    os.sched_setaffinity(threading.get_native_id(), {cpu})


def percentiles(samples_ns: List[int]) -> Percentiles:
    """p50, p90, p99 in microseconds."""
    ordered = sorted(samples_ns)
    count = len(ordered)
    return tuple(ordered[int(count * q)] / 1000 for q in (0.5, 0.9, 0.99))  # type: ignore


class Handler(threading.Thread):
    """The fault loop: read messages into the preallocated buffer, one ioctl per fault."""

    def __init__(self, uffd: Userfaultfd, op: str, cpu: int, busy: bool, src: int) -> None:
        super().__init__(daemon=True)
        self.uffd, self.op, self.cpu, self.busy, self.src = uffd, op, cpu, busy, src
        self.stop_read, self.stop_write = os.pipe()
        self.stopping = False
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            pin(self.cpu)
            self.busy_loop() if self.busy else self.poll_loop()
        except BaseException as exc:  # re-raised by stop()
            self.error = exc

    def serve(self, messages: "ctypes.Array[abi.uffd_msg]") -> None:
        src = self.src
        if self.op == "copy":
            copy = self.uffd.copy
            for message in messages:
                copy(message.arg.pagefault.address, src, PAGE_SIZE)
        else:
            zeropage = self.uffd.zeropage
            for message in messages:
                zeropage(message.arg.pagefault.address, PAGE_SIZE)

    def poll_loop(self) -> None:
        poller = select.poll()
        poller.register(self.uffd.fileno(), select.POLLIN)
        poller.register(self.stop_read, select.POLLIN)
        read_raw, serve, stop_read = self.uffd.read_raw, self.serve, self.stop_read
        while True:
            ready = poller.poll()
            if any(fd == stop_read for fd, _ in ready):
                return
            serve(read_raw())

    def busy_loop(self) -> None:
        # poll(0) rather than reading until EAGAIN: an empty poll is cheaper
        # than a raised BlockingIOError, and the GIL is held for less time.
        poller = select.poll()
        poller.register(self.uffd.fileno(), select.POLLIN)
        poll, read_raw, serve = poller.poll, self.uffd.read_raw, self.serve
        while not self.stopping:
            if poll(0):
                serve(read_raw())

    def stop(self) -> None:
        self.stopping = True
        os.write(self.stop_write, b"x")
        self.join(10)
        os.close(self.stop_read)
        os.close(self.stop_write)
        if self.is_alive():
            raise RuntimeError("handler thread did not stop within 10 s")
        if self.error is not None:
            raise self.error


def touch_all(base: int, order: Sequence[int], samples: List[int]) -> None:
    """The toucher: one GIL-releasing 1-byte read per page, timed around the access."""
    pin(0)
    sink = ctypes.create_string_buffer(1)
    memmove, clock = ctypes.memmove, time.perf_counter_ns
    for page in order:
        address = base + page * PAGE_SIZE
        start = clock()
        memmove(sink, address, 1)
        samples.append(clock() - start)


def python_latency(op: str, cpu: int, busy: bool, faults: int, src: int) -> Percentiles:
    order = list(range(faults))
    random.Random(1).shuffle(order)
    samples: List[int] = []
    with Mapping.anonymous(faults * PAGE_SIZE) as region, Userfaultfd() as uffd:
        uffd.register(region.address, region.length)
        handler = Handler(uffd, op, cpu, busy, src)
        handler.start()
        toucher = threading.Thread(target=touch_all, args=(region.address, order, samples),
                                   daemon=True)
        toucher.start()
        toucher.join(120)
        handler.stop()
        if toucher.is_alive() or len(samples) != faults:
            raise RuntimeError(f"toucher finished {len(samples)} of {faults} faults")
    return percentiles(samples)


def python_bulk(chunk: int, mib: int, src: int) -> float:
    length = mib << 20
    rates = []
    with Mapping.anonymous(length) as region, Userfaultfd() as uffd:
        uffd.register(region.address, length)
        copy, base = uffd.copy, region.address
        for _ in range(4):
            start = time.perf_counter_ns()
            for offset in range(0, length, chunk):
                done = copy(base + offset, src + offset % SOURCE_SIZE, chunk)
                if done != chunk:
                    raise RuntimeError(f"bulk copy at +{offset:#x} returned {done}")
            rates.append(length / (time.perf_counter_ns() - start))
            region.madvise(abi.MADV_DONTNEED)
    return statistics.median(rates[1:])  # rates[0] is the warm-up


def c_results(faults: int, mib: int) -> Tuple[Dict[Tuple[str, str], Percentiles],
                                              Dict[int, float], str]:
    """Build (if needed) and run the C comparator; empty results and a note without cc."""
    compiler = shutil.which("cc")
    if compiler is None:
        return {}, {}, "no C compiler (cc) found: C columns left empty"
    if (not C_BINARY.exists()
            or C_BINARY.stat().st_mtime < C_SOURCE.stat().st_mtime):
        build = subprocess.run([compiler, "-O2", "-pthread", "-o", str(C_BINARY),
                                str(C_SOURCE)], capture_output=True, text=True, timeout=120)
        if build.returncode != 0:
            return {}, {}, f"C comparator did not build: {build.stderr.strip()[:300]}"
    run = subprocess.run([str(C_BINARY), str(faults), str(mib)], capture_output=True,
                         text=True, timeout=300)
    if run.returncode != 0:
        return {}, {}, f"C comparator failed: {run.stderr.strip()[:300]}"
    latency: Dict[Tuple[str, str], Percentiles] = {}
    bulk: Dict[int, float] = {}
    for line in run.stdout.splitlines():
        fields = line.split()
        if fields[0] == "lat":
            latency[(fields[1], fields[2])] = tuple(  # type: ignore[assignment]
                int(value) / 1000 for value in fields[3:6])
        elif fields[0] == "bulk":
            bulk[int(fields[1])] = float(fields[2])
    return latency, bulk, f"C comparator: {C_BINARY.relative_to(ROOT)}"


def ratio(python: float, c: Optional[float]) -> str:
    return f"{python / c:.2f}" if c else "-"


def human_size(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="few faults and a small region: a few seconds")
    parser.add_argument("--faults", type=int, help="faults per latency row (default 20000)")
    parser.add_argument("--bulk-mib", type=int, help="bulk COPY region in MiB (default 256)")
    parser.add_argument("--no-c", action="store_true", help="skip the C comparator")
    args = parser.parse_args(argv)
    faults = args.faults or (1000 if args.quick else 20000)
    mib = args.bulk_mib or (16 if args.quick else 256)
    if len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0):
        print("needs CPUs 0 and 1 (thread placements)", file=sys.stderr)
        return 2

    c_latency: Dict[Tuple[str, str], Percentiles] = {}
    c_bulk: Dict[int, float] = {}
    note = "C comparator skipped (--no-c)"
    if not args.no_c:
        c_latency, c_bulk, note = c_results(faults, mib)

    with Mapping.anonymous(SOURCE_SIZE) as source:
        ctypes.memset(source.address, 0x5A, SOURCE_SIZE)
        rows = []
        for op in OPS:
            for key, label, cpu, busy in PLACEMENTS:
                py = python_latency(op, cpu, busy, faults, source.address)
                c = c_latency.get((op, key))
                c_cells = [f"{v:.1f}" for v in c] if c else ["-"] * 3
                rows.append([op.upper(), label, *(f"{v:.1f}" for v in py), *c_cells,
                             ratio(py[0], c[0] if c else None)])
        bulk_rows = []
        for chunk in CHUNKS:
            rate = python_bulk(chunk, mib, source.address)
            c_rate = c_bulk.get(chunk)
            bulk_rows.append([human_size(chunk), f"{rate:.2f}",
                              f"{c_rate:.2f}" if c_rate else "-", ratio(rate, c_rate)])

    print(f"uffdpy fault benchmark: {faults} faults per row, random order, 1 page per "
          f"fault; bulk region {mib} MiB; Python {sys.version.split()[0]}, "
          f"kernel {os.uname().release}; {note}")
    print()
    print(tabulate(rows, headers=["ioctl", "handler placement", "py p50 µs", "py p90",
                                  "py p99", "C p50 µs", "C p90", "C p99", "py/C p50"],
                   tablefmt="github"))
    print()
    print(tabulate(bulk_rows, headers=["bulk COPY per call", "py GB/s", "C GB/s", "py/C"],
                   tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
