#!/usr/bin/env python3
"""What answering one page request costs on this machine: uffdpy's answer, the least Python, C.

``uffdpy resume`` reports ``request_service_us``: for each page request of
the destination, the time from the source's ``recv`` of it to the return of
the ``sendmsg`` that answers it.  This measures the same span outside QEMU
(``uffdpy.harness.bench_answer`` says how), so that the figure can be read
against what the machine itself allows: a fake destination process asks for
a data page every ``--interval-ms`` and checks each answer against the file,
and three answerers take turns, uffdpy's own answer path, the least Python
(``unpack``, ``pread``, ``sendmsg``), and C.

When a C compiler (``cc``) is present, ``benchmarks/answer_floor.c`` is built
into ``benchmarks/answer_floor.bin`` and run in the same rounds, and each row
gets its p50 against C's.

Usage: ``python scripts/bench_answer.py SNAPSHOT [--requests N] [--rounds R]
[--interval-ms MS]``; the defaults take about half a minute.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from uffdpy.harness.bench_answer import run_answer_bench  # noqa: E402

C_SOURCE = ROOT / "benchmarks" / "answer_floor.c"
C_BINARY = ROOT / "benchmarks" / "answer_floor.bin"


def build_c() -> Tuple[Optional[str], Optional[str]]:
    """The C answerer's binary, built if a compiler exists; or None and why not."""
    cc = shutil.which("cc")
    if cc is None:
        return None, "no C compiler (cc)"
    if not C_BINARY.exists() or C_BINARY.stat().st_mtime < C_SOURCE.stat().st_mtime:
        done = subprocess.run([cc, "-O2", "-Wall", "-o", str(C_BINARY), str(C_SOURCE)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            return None, f"cc failed: {done.stderr.strip()[:200]}"
    return str(C_BINARY), None


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("snapshot", help="a mapped-ram snapshot (the 1 GiB guest of "
                    "scripts/linux_guest.py, say)")
    ap.add_argument("--requests", type=int, default=500, help="page requests per answerer "
                    "and round (default 500)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--interval-ms", type=float, default=2.0,
                    help="between two requests (default 2: a restore's pace)")
    args = ap.parse_args(argv)
    binary, why_no_c = build_c()
    try:
        print(run_answer_bench(args.snapshot, requests=args.requests, rounds=args.rounds,
                               interval=args.interval_ms / 1000, c_binary=binary,
                               why_no_c=why_no_c))
    except (ValueError, RuntimeError, OSError) as e:
        print(f"bench_answer: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
