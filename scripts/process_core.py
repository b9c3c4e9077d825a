#!/usr/bin/env python3
"""Make real Linux process core files holding known bytes at a known address.

The command line of :mod:`uffdpy.harness.processcore` (whose docstring says how: a
child with a known buffer, dumped by gdb's ``gcore`` or by the kernel)::

    python3 scripts/process_core.py gcore OUTDIR [--size 65536] [--seed 1] [--verify]
    python3 scripts/process_core.py kernel OUTDIR [--size 65536] [--seed 1] [--verify]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)    # run from a checkout without installing

from uffdpy.harness.processcore import (DEFAULT_TIMEOUT, CoreUnavailable, gcore_core,  # noqa: E402
                                kernel_core, verify)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("producer", choices=("gcore", "kernel"))
    parser.add_argument("directory")
    parser.add_argument("--size", type=lambda s: int(s, 0), default=0x10000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    parser.add_argument("--verify", action="store_true",
                        help="read the buffer back with uffdpy.elfcore")
    args = parser.parse_args(argv)
    os.makedirs(args.directory, exist_ok=True)
    make = gcore_core if args.producer == "gcore" else kernel_core
    t0 = time.monotonic()
    try:
        path, address, data = make(args.directory, size=args.size, seed=args.seed,
                                   timeout=args.timeout)
    except CoreUnavailable as e:
        print(f"process_core: {args.producer} core unavailable: {e}", file=sys.stderr)
        return 2
    result = {"producer": args.producer, "core": path, "address": address, "size": args.size,
              "seed": args.seed, "sha256": hashlib.sha256(data).hexdigest(),
              "seconds": time.monotonic() - t0}
    if args.verify:
        result["region"] = verify(path, address, data)
        result["verified"] = True
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
