#!/usr/bin/env python3
"""Make and load real QEMU mapped-ram snapshots over QMP, for tests and experiments.

What it does
------------
Starts ``qemu-system-x86_64`` with no guest OS (the machine sits in firmware,
or does nothing at all with ``-machine none``), optionally puts known bytes at
known guest-physical addresses with ``-device loader,file=F,addr=A,force-raw=on``,
then over QMP: ``stop``, ``migrate-set-capabilities`` (mapped-ram, multifd),
``migrate`` to ``file:PATH[,offset=N]``, polls ``query-migrate`` until
completed, and optionally ``pmemsave``-s guest memory so a reader can be
checked against QEMU's own view.  ``dump`` writes an ELF core of guest memory
with ``dump-guest-memory`` instead (the format :mod:`uffdpy.elfcore` reads).  It can also load a snapshot back into a
fresh QEMU (``-incoming defer``, ``migrate-incoming``), time it and
``pmemsave`` the result.

TCG is the default accelerator (``accel=tcg``): nested KVM is unreliable on CI
machines and firmware-only guests need no speed.  Every QEMU process is
killed in a ``finally`` block, every wait has a timeout, and sockets live in a
private temporary directory.

Use
---
Command line::

    python3 scripts/qemu_snapshot.py save OUT.img [--machine pc] [--mem 128M]
        [--arg=-device --arg=VGA] [--random ADDR:SIZE[:SEED]]... [--multifd N]
        [--offset N] [--no-mapped-ram] [--pmemsave OUT.pmem] [--qemu PATH]
    python3 scripts/qemu_snapshot.py load IMG [--machine pc] [--mem 128M]
        [--arg ...] [--offset N] [--multifd N] [--pmemsave OUT.pmem]
    python3 scripts/qemu_snapshot.py dump OUT.elf --machine pc [--mem 128M]
        [--random ADDR:SIZE[:SEED]]... [--pmemsave OUT.pmem] [--paging]

Both print a JSON summary (timings in seconds, paths, regions).  From Python::

    from uffdpy.harness.vm import VmConfig, save_snapshot, load_snapshot, random_region
    cfg = VmConfig(machine="none", mem="64M")
    region = random_region(tmpdir, addr=0x100000, size=0x10000, seed=1)
    info = save_snapshot(cfg, "vm.img", regions=[region], pmemsave="vm.pmem")
    info = load_snapshot(cfg, "vm.img", pmemsave="loaded.pmem")
    info = dump_guest_memory(VmConfig(machine="pc", mem="128M"), "vm.elf", regions=[region])

The functions live in :mod:`uffdpy.harness.vm`; this script is their command line
(run from a checkout, it finds ``uffdpy`` next to it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)    # run from a checkout without installing

from uffdpy.harness.vm import (DEFAULT_QEMU, DEFAULT_TIMEOUT, Region, VmConfig,  # noqa: E402
                         dump_guest_memory, load_snapshot, parse_size, random_region,
                         save_snapshot)

def _region_arg(text: str, directory: str) -> Region:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"--random wants ADDR:SIZE[:SEED], not {text!r}")
    seed = int(parts[2], 0) if len(parts) == 3 else 0
    return random_region(directory, addr=parse_size(parts[0]), size=parse_size(parts[1]), seed=seed)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("save", "load", "dump"):
        p = sub.add_parser(name)
        p.add_argument("image")
        p.add_argument("--machine", default="none")
        p.add_argument("--mem", default="64M")
        p.add_argument("--accel", default="tcg")
        p.add_argument("--arg", action="append", default=[], metavar="ARG",
                       help="extra QEMU argument (repeat; use --arg=-device --arg=VGA)")
        p.add_argument("--qemu", default=DEFAULT_QEMU)
        if name != "dump":
            p.add_argument("--offset", type=lambda s: int(s, 0), default=0)
            p.add_argument("--multifd", type=int, default=None, metavar="CHANNELS")
        p.add_argument("--pmemsave")
        p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
        if name in ("save", "dump"):
            p.add_argument("--random", action="append", default=[], metavar="ADDR:SIZE[:SEED]",
                           help="put random bytes at a guest-physical address")
            p.add_argument("--data-dir", help="where to keep --random files (default: next to IMAGE)")
            p.add_argument("--run-seconds", type=float, default=0.0)
        if name == "save":
            p.add_argument("--no-mapped-ram", action="store_true")
        if name == "dump":
            p.add_argument("--paging", action="store_true",
                           help="dump-guest-memory paging: true (virtual addresses)")
    args = parser.parse_args(argv)
    config = VmConfig(machine=args.machine, mem=args.mem, accel=args.accel, args=args.arg,
                      qemu=args.qemu)
    if args.command == "save":
        directory = args.data_dir or os.path.dirname(os.path.abspath(args.image))
        regions = [_region_arg(r, directory) for r in args.random]
        result = save_snapshot(config, args.image, regions=regions,
                               mapped_ram=not args.no_mapped_ram, multifd_channels=args.multifd,
                               offset=args.offset, pmemsave=args.pmemsave,
                               run_seconds=args.run_seconds, timeout=args.timeout)
    elif args.command == "dump":
        directory = args.data_dir or os.path.dirname(os.path.abspath(args.image))
        regions = [_region_arg(r, directory) for r in args.random]
        result = dump_guest_memory(config, args.image, regions=regions, pmemsave=args.pmemsave,
                                   run_seconds=args.run_seconds, paging=args.paging,
                                   timeout=args.timeout)
    else:
        result = load_snapshot(config, args.image, offset=args.offset,
                               multifd_channels=args.multifd, pmemsave=args.pmemsave,
                               timeout=args.timeout)
    json.dump(result, sys.stdout, indent=2, default=str)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
