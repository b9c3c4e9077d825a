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

   The same three again with the handler in a forked child process (as
   uffdpy's process server), and, on Python 3.13 or newer, in a thread that
   runs in an isolated subinterpreter with its own GIL (as uffdpy's
   interpreter server).  Those two share no GIL with the toucher; the plain
   thread rows do, and the GIL hand-offs are most of what they cost beyond C.
   The C figure for a subinterpreter row is the C thread in that placement.

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
import errno
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
from uffdpy.loader.hosting import HAVE_INTERPRETERS, ForkedChild, Interpreter  # noqa: E402
from uffdpy.memory import PAGE_SIZE, Mapping  # noqa: E402
from uffdpy.uffd import Filler, Userfaultfd  # noqa: E402

C_SOURCE = ROOT / "benchmarks" / "fault_handler.c"
C_BINARY = ROOT / "benchmarks" / "fault_handler.bin"

# (key, label, handler CPU, busy-poll, where the handler runs, the C row to compare with)
PLACEMENTS = [
    ("same", "same CPU, poll", 0, False, "thread", "same"),
    ("poll", "other CPU, poll", 1, False, "thread", "poll"),
    ("busy", "other CPU, busy", 1, True, "thread", "busy"),
    ("proc-same", "process: same CPU, poll", 0, False, "process", "proc-same"),
    ("proc-poll", "process: other CPU, poll", 1, False, "process", "proc-poll"),
    ("proc-busy", "process: other CPU, busy", 1, True, "process", "proc-busy"),
] + ([
    ("interp-same", "subinterpreter: same CPU, poll", 0, False, "interpreter", "same"),
    ("interp-poll", "subinterpreter: other CPU, poll", 1, False, "interpreter", "poll"),
    ("interp-busy", "subinterpreter: other CPU, busy", 1, True, "interpreter", "busy"),
] if HAVE_INTERPRETERS else [])
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


class Handler:
    """The fault loop, as fast as the package makes it: poll, one read, one ioctl per fault.

    :class:`uffdpy.uffd.Filler` reads into its preallocated buffer and fills
    through preallocated structs; the loop polls the uffd and a stop pipe
    (with a zero timeout when busy-polling: an empty poll is cheaper than a
    raised BlockingIOError) and decodes the address from the 64-bit words.
    """

    def __init__(self, uffd: Userfaultfd, op: str, cpu: int, busy: bool, src: int,
                 stop_read: Optional[int] = None) -> None:
        """``stop_read``: an existing stop pipe's read end (the subinterpreter's side,
        whose pipe the host made); by default a new pipe, closed by :meth:`stop`."""
        self.uffd, self.op, self.cpu, self.busy, self.src = uffd, op, cpu, busy, src
        if stop_read is None:
            self.stop_read, self.stop_write = os.pipe()
        else:
            self.stop_read, self.stop_write = stop_read, -1
        self.error: Optional[BaseException] = None
        self.thread: Optional[threading.Thread] = None
        self.child: Optional[ForkedChild] = None
        self.interpreter: Optional[Interpreter] = None
        self.failure: Optional[str] = None

    def run(self) -> None:
        try:
            pin(self.cpu)
            self.loop()
        except BaseException as exc:  # re-raised by stop()
            self.error = exc

    def loop(self) -> None:
        filler = Filler(self.uffd)
        read, buffer, words = filler.read, filler.buffer, filler.words
        copy, zeropage, src = filler.copy, filler.zeropage, self.src
        use_copy = self.op == "copy"
        ufd = self.uffd.fileno()
        poller = select.poll()
        poller.register(ufd, select.POLLIN)
        poller.register(self.stop_read, select.POLLIN)
        poll, timeout = poller.poll, (0 if self.busy else None)
        pagefault, page, eexist = abi.UFFD_EVENT_PAGEFAULT, PAGE_SIZE, -errno.EEXIST
        while True:
            ready = poll(timeout)
            if not ready:
                continue
            if len(ready) > 1 or ready[0][0] != ufd:
                return                          # the stop pipe
            for k in range(read()):
                if buffer[k << 5] != pagefault:
                    continue
                if use_copy:
                    done = copy(words[k * 4 + 2], src, page)
                else:
                    done = zeropage(words[k * 4 + 2], page)
                if done != page and done != eexist:
                    raise RuntimeError(f"fill returned {done}")

    def start(self, where: str) -> None:
        """Run the loop in a thread, a forked child or a subinterpreter's thread.

        The child and the subinterpreter are hosted as uffdpy's process and
        interpreter servers host their workers (``uffdpy.loader.hosting``).
        The uffd covers this process's memory in all three: a child inherits
        it, a subinterpreter shares the fd table and the address space.
        """
        if where == "interpreter":
            interpreter = self.interpreter = Interpreter.take()
            shared = {"ufd": self.uffd.fileno(), "op": self.op, "cpu": self.cpu,
                      "busy": self.busy, "src": self.src, "stop_read": self.stop_read}

            def host() -> None:
                self.failure = interpreter.run("bench_fault:serve_in_interpreter", shared,
                                               paths=[str(ROOT / "scripts")])
            self.thread = threading.Thread(target=host, daemon=True)
            self.thread.start()
        elif where == "process":
            self.child = ForkedChild(self.serve)
        else:
            self.thread = threading.Thread(target=self.run, daemon=True)
            self.thread.start()

    def serve(self) -> Dict[str, object]:
        """The loop until stopped, as a hosted body: its report, or what it raised."""
        self.run()
        if self.error is not None:
            raise self.error
        return {"stopped": True}

    def stop(self) -> None:
        os.write(self.stop_write, b"x")
        try:
            if self.child is not None:
                report = self.child.read_report()
                if self.child.wait_for(10) is None:
                    self.child.kill()
                    self.child.wait()
                    raise RuntimeError("handler process did not stop within 10 s")
                if not report.get("stopped"):
                    raise RuntimeError(f"handler process failed: "
                                       f"{report.get('error', 'it died without a report')}")
                return
            assert self.thread is not None
            self.thread.join(10)
            if self.thread.is_alive():
                raise RuntimeError("handler thread did not stop within 10 s")
            if self.error is not None:
                raise self.error
            if self.failure is not None:
                raise RuntimeError(f"handler subinterpreter failed: {self.failure}")
        finally:
            if self.child is not None:
                self.child.close()
            os.close(self.stop_read)
            os.close(self.stop_write)
            if self.interpreter is not None and not (self.thread and self.thread.is_alive()):
                self.interpreter.destroy()        # before any fork (CPython 3.13)
                self.interpreter = None


def serve_in_interpreter(ufd: int, op: str, cpu: int, busy: bool, src: int,
                         stop_read: int) -> None:
    """The subinterpreter's side: the same loop, over a dup of the uffd, until stopped."""
    with Userfaultfd.from_fd(os.dup(ufd), created_via="interpreter") as uffd:
        handler = Handler(uffd, op, cpu, busy, src, stop_read=stop_read)
        handler.run()
        if handler.error is not None:
            raise handler.error


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


def toucher_floor(pages: int = 256, rounds: int = 20) -> float:
    """p50 (us) of the toucher's own timed access to a page that is present: no fault."""
    samples: List[int] = []
    with Mapping.anonymous(pages * PAGE_SIZE) as region:
        ctypes.memset(region.address, 1, region.length)
        order = list(range(pages)) * rounds
        worker = threading.Thread(target=touch_all, args=(region.address, order, samples))
        worker.start()
        worker.join(60)
    return percentiles(samples)[0]


def python_latency(op: str, cpu: int, busy: bool, where: str, faults: int,
                   src: int) -> Percentiles:
    order = list(range(faults))
    random.Random(1).shuffle(order)
    samples: List[int] = []
    with Mapping.anonymous(faults * PAGE_SIZE) as region, Userfaultfd() as uffd:
        uffd.register(region.address, region.length)
        handler = Handler(uffd, op, cpu, busy, src)
        handler.start(where)                    # fork first: no other thread is running
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
        copy, base = Filler(uffd).copy, region.address
        for _ in range(4):
            start = time.perf_counter_ns()
            for offset in range(0, length, chunk):
                done = copy(base + offset, src + offset % SOURCE_SIZE, chunk)
                if done != chunk:
                    raise RuntimeError(f"bulk copy at +{offset:#x} returned {done}")
            rates.append(length / (time.perf_counter_ns() - start))
            region.madvise(abi.MADV_DONTNEED)
    return statistics.median(rates[1:])  # rates[0] is the warm-up


class Comparator:
    """The C comparator, built on first use when ``cc`` exists, run one row at a time."""

    def __init__(self, enabled: bool) -> None:
        self.note = "C comparator skipped (--no-c)"
        self.binary: Optional[Path] = None
        if enabled:
            self.note = self._build()

    def _build(self) -> str:
        compiler = shutil.which("cc")
        if compiler is None:
            return "no C compiler (cc) found: C columns left empty"
        if (not C_BINARY.exists()
                or C_BINARY.stat().st_mtime < C_SOURCE.stat().st_mtime):
            build = subprocess.run([compiler, "-O2", "-pthread", "-o", str(C_BINARY),
                                    str(C_SOURCE)], capture_output=True, text=True,
                                   timeout=120)
            if build.returncode != 0:
                return f"C comparator did not build: {build.stderr.strip()[:300]}"
        self.binary = C_BINARY
        return f"C comparator: {C_BINARY.relative_to(ROOT)}"

    def _run(self, *args: object) -> Optional[List[str]]:
        if self.binary is None:
            return None
        run = subprocess.run([str(self.binary), *map(str, args)], capture_output=True,
                             text=True, timeout=300)
        if run.returncode != 0:
            raise RuntimeError(f"C comparator {args} failed: {run.stderr.strip()[:300]}")
        return run.stdout.split()

    def latency(self, faults: int, op: str, placement: str,
                region_pages: Optional[int] = None) -> Optional[Percentiles]:
        """One C latency row; with ``region_pages``, ``faults`` distinct pages of that many."""
        extra = [region_pages] if region_pages else []
        fields = self._run(faults, "lat", op, placement, *extra)
        return tuple(int(v) / 1000 for v in fields[3:6]) if fields else None  # type: ignore

    def bulk(self, mib: int, chunk: int) -> Optional[float]:
        fields = self._run(mib, "bulk", chunk)
        return float(fields[2]) if fields else None


def median_of(results: List[Percentiles]) -> Percentiles:
    return tuple(statistics.median(r[i] for r in results) for i in range(3))  # type: ignore


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
    parser.add_argument("--rounds", type=int,
                        help="interleaved Python/C rounds, medians reported (default 3)")
    parser.add_argument("--no-c", action="store_true", help="skip the C comparator")
    args = parser.parse_args(argv)
    faults = args.faults or (1000 if args.quick else 20000)
    mib = args.bulk_mib or (16 if args.quick else 256)
    rounds = args.rounds or (1 if args.quick else 3)
    if len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0):
        print("needs CPUs 0 and 1 (thread placements)", file=sys.stderr)
        return 2

    comparator = Comparator(not args.no_c)
    py_lat: Dict[Tuple[str, str], List[Percentiles]] = {}
    c_lat: Dict[Tuple[str, str], List[Percentiles]] = {}
    py_bulk: Dict[int, List[float]] = {}
    c_bulk: Dict[int, List[float]] = {}
    with Mapping.anonymous(SOURCE_SIZE) as source:
        ctypes.memset(source.address, 0x5A, SOURCE_SIZE)   # pre-touched, as the C one
        for round_ in range(rounds):
            c_first = round_ % 2 == 0           # alternate who goes first in each row
            for op in OPS:
                for key, _, cpu, busy, where, c_key in PLACEMENTS:
                    for which in ((0, 1) if c_first else (1, 0)):
                        if which == 0:
                            c = comparator.latency(faults, op, c_key)
                            if c:
                                c_lat.setdefault((op, key), []).append(c)
                        else:
                            py_lat.setdefault((op, key), []).append(python_latency(
                                op, cpu, busy, where, faults, source.address))
            for chunk in CHUNKS:
                for which in ((0, 1) if c_first else (1, 0)):
                    if which == 0:
                        c_rate = comparator.bulk(mib, chunk)
                        if c_rate:
                            c_bulk.setdefault(chunk, []).append(c_rate)
                    else:
                        py_bulk.setdefault(chunk, []).append(
                            python_bulk(chunk, mib, source.address))
    floor = toucher_floor()

    rows = []
    for op in OPS:
        for key, label, *_ in PLACEMENTS:
            py = median_of(py_lat[(op, key)])
            c = median_of(c_lat[(op, key)]) if (op, key) in c_lat else None
            c_cells = [f"{v:.1f}" for v in c] if c else ["-"] * 3
            rows.append([op.upper(), label, *(f"{v:.1f}" for v in py), *c_cells,
                         ratio(py[0], c[0] if c else None)])
    bulk_rows = []
    for chunk in CHUNKS:
        rate = statistics.median(py_bulk[chunk])
        c_rate = statistics.median(c_bulk[chunk]) if chunk in c_bulk else None
        bulk_rows.append([human_size(chunk), f"{rate:.2f}",
                          f"{c_rate:.2f}" if c_rate else "-", ratio(rate, c_rate)])

    print(f"uffdpy fault benchmark: {faults} faults per row, random order, 1 page per "
          f"fault; bulk region {mib} MiB; median of {rounds} interleaved Python/C "
          f"round(s); Python {sys.version.split()[0]}, kernel {os.uname().release}; "
          f"{comparator.note}")
    print(f"The Python toucher's own timed access without a fault: p50 {floor:.1f} µs "
          "(included in every py figure; the C toucher's is ~0).  \"process\" rows: the "
          "handler is a forked child, as uffdpy's process server; \"subinterpreter\" "
          "rows: a thread of an own-GIL subinterpreter, as the interpreter server "
          "(Python 3.13+), compared with the C thread; neither shares a GIL with the "
          "toucher.")
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
