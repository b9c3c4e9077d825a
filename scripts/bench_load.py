#!/usr/bin/env python3
"""Benchmark loading one mapped-ram snapshot: eager vs lazy vs QEMU's own load.

What it measures
----------------
A thin wrapper over :func:`uffdpy.harness.bench.run_bench` (the same table as
``uffdpy bench``).  For one snapshot file, interleaved round by round so that
a noisy machine hurts every contender the same, it times:

* the eager load (QEMU 10 style: ``pread`` of every present run into memory
  mapped with transparent huge pages allowed): time until the VM could start;
* the lazy load, thread and process servers: time to ready (the VM could start)
  and time until the prefetcher has placed every page (prefetch only; with one
  and with two prefetch threads);
* the lazy load under a random-access workload (``--touch`` accesses from one
  thread): faults served, and access latency p50/p99 timed in the toucher,
  with the fault loop on the toucher's CPU, on the other CPU, and busy-polling;
* QEMU's own ``migrate-incoming`` of the same file (timed to ``completed``),
  when ``qemu-system-x86_64`` is installed and the machine is known: synthetic
  snapshots (``-machine none``) are recognised, anything else needs
  ``--qemu-args`` recreating the saved machine exactly (same ``-machine``,
  ``-m``, devices; for a Linux guest also ``-cpu``, ``-smp``, ``-serial`` and
  ``-kernel``/``-initrd``, whose option ROM is a RAMBlock).

The table shows the median of ``--rounds`` rounds and the ratios against the
eager load and QEMU's load.  The page cache is warm after the first round;
``--cold`` drops it (root) before every measurement.

Reproducing the README numbers
------------------------------
The README's tables come from, on a 2-CPU machine::

    # a 1 GiB Linux guest holding 384 MiB of data (see scripts/linux_guest.py)
    python3 scripts/linux_guest.py guest.img --mem 1G --fill-mib 384
    python3 scripts/bench_load.py guest.img --rounds 5 --qemu-args "-machine pc ..."

    # a synthetic snapshot of the same shape, no guest needed
    python3 scripts/bench_load.py synth.img --make-synthetic 1G --fill 0.375 --rounds 5

``--make-synthetic SIZE`` writes SNAP first when it does not exist (one
RAMBlock ``ram`` of SIZE, about ``--fill`` of its pages holding data, loadable
by ``qemu-system-x86_64 -machine none -m SIZE``).  ``--quick`` is one round of
few accesses on a 16 MiB synthetic snapshot in a temporary directory when no
SNAP is given; it exists so the test suite can run this script in a second.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

# Run from a checkout without installing: the package is next to scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))      # bench_fault's C comparator

from bench_fault import Comparator  # noqa: E402
from uffdpy.harness.bench import run_bench  # noqa: E402
from uffdpy.cli.args import parse_size  # noqa: E402
from uffdpy.harness.synthetic import make_synthetic  # noqa: E402

QUICK_SIZE = 16 << 20


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("snapshot", metavar="SNAP", nargs="?",
                    help="mapped-ram snapshot (optional with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    ap.add_argument("--touch", type=int, default=None,
                    help="random accesses per workload run (default 2000)")
    ap.add_argument("--no-qemu", action="store_true", help="skip QEMU's own load")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--cold", action="store_true",
                    help="drop the page cache before every measurement (root)")
    ap.add_argument("--qemu-args", default=None, metavar="ARGS",
                    help="QEMU arguments recreating the saved machine, one string "
                         "(e.g. \"-machine pc -m 1G -device VGA\")")
    ap.add_argument("--make-synthetic", type=parse_size, default=None, metavar="SIZE",
                    help="write a synthetic SNAP of SIZE (e.g. 256M) first if it does not exist")
    ap.add_argument("--fill", type=float, default=0.4,
                    help="with --make-synthetic: fraction of pages holding data")
    ap.add_argument("--seed", type=int, default=0, help="with --make-synthetic: data seed")
    ap.add_argument("--no-c", action="store_true",
                    help="skip the C fault handler reference (benchmarks/fault_handler.c)")
    ap.add_argument("--quick", action="store_true",
                    help="one round, 200 accesses, a 16 MiB synthetic snapshot if no SNAP")
    args = ap.parse_args(argv)

    rounds = args.rounds or (1 if args.quick else 3)
    touches = args.touch or (200 if args.quick else 2000)
    qemu_args = shlex.split(args.qemu_args) if args.qemu_args else None
    if rounds < 1 or touches < 1:
        ap.error("--rounds and --touch must be at least 1")
    if args.snapshot is None and not args.quick:
        ap.error("SNAP is required (or use --quick)")

    with tempfile.TemporaryDirectory(prefix="uffdpy-bench-") as tmp:
        path = args.snapshot or os.path.join(tmp, "quick.img")
        if not os.path.exists(path):
            size = args.make_synthetic or (QUICK_SIZE if args.quick else None)
            if size is None:
                ap.error(f"{path} does not exist (add --make-synthetic SIZE to create it)")
            print(f"writing a synthetic {size >> 20} MiB snapshot to {path} "
                  f"(fill {args.fill:.0%}, seed {args.seed})", file=sys.stderr)
            make_synthetic(path, size=size, fill=args.fill, seed=args.seed)
        comparator = Comparator(not args.no_c)
        if comparator.binary is None:
            print(comparator.note, file=sys.stderr)

        def reference(op: str, placement: str, faults: int,
                      region_pages: int) -> Optional[float]:
            figures = comparator.latency(faults, op, placement, region_pages)
            return figures[0] if figures else None

        out = run_bench(path, rounds=rounds, touches=touches, qemu=not args.no_qemu,
                        cold=args.cold, qemu_args=qemu_args,
                        reference=reference if comparator.binary else None)
        print(json.dumps(out["data"], indent=2) if args.json else out["table"])
        return 0


if __name__ == "__main__":
    sys.exit(main())
