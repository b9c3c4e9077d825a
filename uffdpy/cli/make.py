"""``uffdpy make``, ``convert`` and ``demo``: snapshots written, and a first look at a lazy load."""
from __future__ import annotations

import argparse
import os
from typing import List, Tuple

from ..outcome import Outcome
from .args import (Command, fraction, human, mib, open_source, page_size_multiple, parse_size,
                   printable, qemu_size, snapshot_arg, tabulate)
from .load import wait_with_progress

__all__ = ["COMMANDS"]


def cmd_make(args: argparse.Namespace) -> Outcome:
    from ..harness.synthetic import make_synthetic
    from ..pagesource import memory_limit, memory_limit_origin
    limit = memory_limit()
    if args.size > limit:
        where = memory_limit_origin() or "this machine's memory"
        raise ValueError(f"--size {args.size}: more than {where} ({human(limit)}), "
                         "which a guest of this size must fit in to load")
    make_synthetic(args.output, size=args.size, fill=args.fill, seed=args.seed)
    return Outcome(f"{args.output}: synthetic snapshot, block 'ram' of {human(args.size)}, "
                   f"~{args.fill:.0%} present; load with qemu-system-x86_64 -machine none "
                   f"-m {qemu_size(args.size)}")


def cmd_convert(args: argparse.Namespace) -> Outcome:
    from ..convert import to_mapped_ram
    with open_source(args) as image:
        if image.format != "elf-core":
            raise ValueError(f"{args.snapshot}: convert reads ELF memory images; this is "
                             f"already a {image.format} file")
        blocks = to_mapped_ram(image, args.output, layout=args.layout,
                               ram_size=args.ram_size or 0)
    lines = [f"{args.output}: block {printable(repr(b.name))} of {human(b.length)}, "
             f"{b.data_pages} pages with data" for b in blocks]
    if args.layout == "ram":
        lines.append(f"load it with: qemu-system-x86_64 -machine none "
                     f"-m {qemu_size(blocks[0].length)} -incoming defer, then "
                     f"migrate-incoming file:{args.output} with the mapped-ram capability on")
    return Outcome("\n".join(lines))


#: interleaved eager and lazy loads the demo times
DEMO_ROUNDS = 3


def _read_through(path: str) -> None:
    """Read a file once (into the page cache), in 1 MiB pieces."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while os.read(fd, 1 << 20):
            pass
    finally:
        os.close(fd)


def cmd_demo(args: argparse.Namespace) -> Outcome:
    from ..loader import EagerLoader, LazyLoader
    from ..mappedram import Snapshot
    from ..harness.synthetic import make_synthetic
    from ..harness.workload import latency_summary, run_access, verify
    import statistics
    import tempfile
    import threading
    size = args.size
    with tempfile.TemporaryDirectory(prefix="uffdpy-demo-") as tmp:
        path = os.path.join(tmp, "demo.img")
        print(f"making a synthetic {mib(size)} snapshot (40% of pages hold data) in {tmp} ...")
        make_synthetic(path, size=size, fill=0.4, seed=7)
        with Snapshot.open(path) as snap:
            # As the benchmark measures: the file read once first (both loads
            # then read it from the page cache, as a just-written file would
            # be for one and not the other), then eager and lazy loads
            # interleaved, medians of DEMO_ROUNDS.
            _read_through(path)
            eager_runs, ready_runs, complete_runs = [], [], []
            for _ in range(DEMO_ROUNDS):
                with EagerLoader(snap) as eager:
                    eager_runs.append(eager.stats.time_to_complete_s or 0.0)
                with LazyLoader(snap, server="thread") as lazy:
                    lazy.wait(120)
                    ready_runs.append(lazy.stats.time_to_ready_s)
                    complete_runs.append(lazy.stats.time_to_complete_s or 0.0)
            eager_s, ready_s = statistics.median(eager_runs), statistics.median(ready_runs)
            complete_s = statistics.median(complete_runs)
            with LazyLoader(snap, server="thread") as lazy:
                ready_s = lazy.stats.time_to_ready_s
                blocks = [(lazy.address(b.name), b) for b in snap.blocks]
                accesses: List[int] = []
                done = threading.Event()

                def touch() -> None:
                    accesses.extend(run_access(blocks, pattern="random", touches=2000))
                    done.set()

                toucher = threading.Thread(target=touch, daemon=True)
                toucher.start()
                wait_with_progress(lazy, True, "prefetching")
                toucher.join()
                stats = lazy.stats
                verified, mismatched = verify(blocks)
    lat = latency_summary(accesses)
    rows = [
        ["eager load (QEMU 10 style): VM waits", f"{eager_s * 1e3:.1f} ms"],
        ["lazy load: ready (VM could start)", f"{ready_s * 1e3:.2f} ms"],
        ["lazy load: all pages in", f"{complete_s * 1e3:.1f} ms"],
        ["lazy load under random access: all pages in", f"{(stats.time_to_complete_s or 0) * 1e3:.1f} ms"],
        ["- random accesses during the load", f"{len(accesses)}"],
        ["- faults served by the fault loop", f"{stats.faults}"],
        ["- access latency p50 / p99", f"{lat['p50']:.1f} / {lat['p99']:.1f} us"],
        ["- pages placed by fault / by prefetch",
         f"{stats.pages_by_fault} / {stats.pages_by_prefetch}"],
        ["- double placements (must be 0)", f"{stats.double_placements}"],
        ["- pages verified / mismatched", f"{verified} / {mismatched}"],
    ]
    text = (tabulate(rows, headers=["fast snapshot load, measured just now", ""]) +
            f"\n(the first three: medians of {DEMO_ROUNDS} interleaved rounds, the file in the "
            "page cache;\n a fault on a page the prefetcher is placing just then waits for it, "
            "so faults can\n outnumber the pages placed by fault)\n"
            f"\nThe guest could have started {eager_s / max(ready_s, 1e-9):.0f}x sooner: every "
            "page was usable at once, a touched page\narrived in one fault, and the "
            "prefetcher brought the rest in behind it.")
    return Outcome(text, status=1 if mismatched or stats.double_placements else 0)


def _convert_arguments(sp: argparse.ArgumentParser) -> None:
    snapshot_arg(sp, offset=False)
    sp.add_argument("-o", "--output", required=True, metavar="SNAP",
                    help="the mapped-ram snapshot to write (under a temporary name)")
    sp.add_argument("--layout", choices=("ram", "regions"), default="ram",
                    help="ram: one 'ram' block by guest-physical address, as QEMU "
                         "-machine none has (default); regions: one block per segment")
    sp.add_argument("--ram-size", type=parse_size, default=None,
                    help="length of the 'ram' block (default: end of the last segment, "
                         "rounded up to a MiB)")


def _make_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("output", metavar="OUT", help="the snapshot file to write")
    sp.add_argument("--size", type=page_size_multiple, default=256 << 20, metavar="SIZE",
                    help="RAM size, a multiple of 4 KiB (default 256M)")
    sp.add_argument("--fill", type=fraction, default=0.4, metavar="F",
                    help="fraction of pages that hold data, 0 to 1 (default 0.4)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the contents (default 0)")


def _demo_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--size", type=page_size_multiple, default=256 << 20, metavar="SIZE",
                    help="the synthetic guest's RAM (default 256M)")


#: this module's commands, in ``uffdpy --help`` order
COMMANDS: Tuple[Command, ...] = (
    Command("convert", _convert_arguments, cmd_convert, dict(
        help="write an ELF memory dump as a mapped-ram snapshot")),
    Command("make", _make_arguments, cmd_make, dict(
        help="write a synthetic snapshot for -machine none")),
    Command("demo", _demo_arguments, cmd_demo, dict(
        help="make, load lazily under random access, explain")),
)
