#!/usr/bin/env python3
"""Benchmark resuming a real guest: QEMU's own load against ``uffdpy resume``.

A thin command line over :func:`uffdpy.harness.bench_resume.run_resume_bench` (the
same table as ``uffdpy bench --resume``).  For one snapshot of the
request-serving Linux guest, interleaved round by round, each contender with
a fresh destination QEMU, it measures: time to running (QEMU's RESUME event),
time to the guest's answer to a request sent as soon as it runs, time to the
migration's completion, page requests (all, and before the answer) and the
request service time p50/p99 measured in the source.  Medians of
``--rounds`` rounds after one warm-up round; ratios against QEMU's own load.

Reproducing the README table, on a 2-CPU machine::

    python3 scripts/linux_guest.py guest1g.img --mem 1G --fill-mib 384
    python3 scripts/bench_resume.py guest1g.img --rounds 5 --qemu-args \\
        "-machine pc -accel tcg -cpu max -smp 1 -m 1024M -nodefaults -display none \\
         -no-reboot -serial null"

``--qemu-args`` must recreate the saved machine (the console's serial port
included); the request port (the guest's second serial port) is added by the
benchmark.  ``--no-request`` times a guest that has no request port.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from uffdpy.harness.bench_resume import CONTENDERS, run_resume_bench  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="QEMU's own load vs uffdpy resume, interleaved.")
    ap.add_argument("snapshot", metavar="SNAP", help="a mapped-ram snapshot QEMU wrote")
    ap.add_argument("--qemu-args", required=True, metavar="ARGS",
                    help="QEMU arguments recreating the saved machine, one string")
    ap.add_argument("--qemu", default="qemu-system-x86_64", help="the QEMU binary")
    ap.add_argument("--rounds", type=int, default=5, help="counted rounds (default 5)")
    ap.add_argument("--request", default="GET 0 4",
                    help="what to send on the request port (default 'GET 0 4')")
    ap.add_argument("--no-request", action="store_true", help="the guest has no request port")
    ap.add_argument("--contenders", default=",".join(CONTENDERS),
                    help=f"comma-separated subset of {','.join(CONTENDERS)}")
    ap.add_argument("--json", action="store_true", help="print every round as JSON too")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    contenders = [c for c in args.contenders.split(",") if c]
    bad = [c for c in contenders if c not in CONTENDERS]
    if bad:
        ap.error(f"unknown contenders {bad}; choose from {CONTENDERS}")
    out = run_resume_bench(args.snapshot, shlex.split(args.qemu_args), rounds=args.rounds,
                           qemu=args.qemu, request=None if args.no_request else args.request,
                           contenders=contenders,
                           log=lambda s: print(s, file=sys.stderr, flush=True))
    print(out["table"])
    if args.json:
        print(json.dumps({"rows": out["rows"], "rounds": out["rounds"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
