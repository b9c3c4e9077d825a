#!/usr/bin/env python3
"""Make a real Linux guest snapshot in QEMU's mapped-ram migration format.

The command line of :mod:`uffdpy.harness.linuxguest` (a Debian kernel and a busybox
initramfs booted under TCG, part of its RAM filled with a known pattern, a
request port on its second serial line, saved with ``migrate file:`` and
mapped-ram on); that module's docstring says what the guest does.  Prints a
JSON summary (timings, paths, kernel version)::

    python3 scripts/linux_guest.py OUT.img [--mem 256M] [--fill-mib 64]
        [--seed N] [--pmemsave OUT.pmem] [--cache DIR] [--timeout S]

and on stderr the ``uffdpy resume`` command that runs it (its request port a
socket next to OUT) and the command that asks it a question::

    python3 scripts/linux_guest.py --ask SOCK 'GET 0 4'
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)    # run from a checkout without installing

from uffdpy.harness.linuxguest import (DEFAULT_CACHE, DEFAULT_TIMEOUT, GuestError,  # noqa: E402
                               ask_line, make_linux_guest_snapshot, resume_command)
from uffdpy.sizes import parse_size  # noqa: E402


def _mem_mib(text: str) -> int:
    """QEMU's -m: ``256M``, ``1G``, or a bare number of MiB -> MiB."""
    try:
        size = parse_size(text + "M" if text.strip().isdigit() else text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if size < 1 << 20 or size % (1 << 20):
        raise argparse.ArgumentTypeError(f"{text!r}: guest RAM is a whole number of MiB")
    return size >> 20


def _me() -> str:
    """This script's path as the user would type it: relative to the working directory."""
    here = Path(__file__).resolve()
    try:
        return str(here.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(here)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description="Boot a small Linux guest under QEMU (TCG), fill part of its RAM with a "
                    "known pattern and save a mapped-ram migration snapshot.",
        epilog="Prints a JSON summary on stdout.")
    ap.add_argument("out", nargs="?",
                    help="snapshot file to write (QEMU mapped-ram migration stream)")
    ap.add_argument("--ask", nargs=2, metavar=("SOCK", "REQUEST"),
                    help="instead: send REQUEST (e.g. 'GET 0 4') to a resumed guest's request "
                         "port SOCK and print its answer")
    ap.add_argument("--mem", type=_mem_mib, default=256, metavar="SIZE",
                    help="guest RAM, e.g. 256M or 1G (default 256M)")
    ap.add_argument("--fill-mib", type=int, default=64, help="MiB of pattern to put in guest RAM")
    ap.add_argument("--seed", type=int, default=0, help="pattern seed (default 0)")
    ap.add_argument("--pmemsave", metavar="FILE", help="also dump guest-physical RAM here")
    ap.add_argument("--cache", metavar="DIR", help=f"download cache (default {DEFAULT_CACHE})")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                    help="seconds allowed for the QEMU run (default %(default)s)")
    ap.add_argument("--qemu", help="QEMU binary (default $UFFDPY_QEMU or qemu-system-x86_64)")
    ap.add_argument("--kernel", help="use this bzImage instead of the Debian package")
    ap.add_argument("--busybox", help="use this static busybox instead of the Debian package")
    ap.add_argument("--machine", default="pc", choices=["pc", "q35"], help="QEMU machine type")
    args = ap.parse_args(argv)
    if args.ask:
        try:
            print(ask_line(args.ask[0], args.ask[1], timeout=args.timeout))
        except (OSError, TimeoutError) as e:
            print(f"linux_guest: {args.ask[0]}: {e}", file=sys.stderr)
            return 1
        return 0
    if args.out is None:
        ap.error("give the snapshot file to write (or --ask SOCK REQUEST)")
    try:
        info = make_linux_guest_snapshot(
            args.out, mem_mib=args.mem, fill_mib=args.fill_mib, seed=args.seed,
            pmemsave=args.pmemsave, cache=args.cache, timeout=args.timeout, qemu=args.qemu,
            kernel=args.kernel, busybox=args.busybox, machine=args.machine)
    except (GuestError, ValueError) as e:
        print(f"linux_guest: {e}", file=sys.stderr)
        return 1
    info.pop("console", None)
    request = str(Path(info["snapshot"]).with_suffix("")) + "-req.sock"
    info["request_socket"] = request
    info["resume_command"] = resume_command(info, request)
    info["ask_command"] = f"python3 {_me()} --ask {request} 'GET 0 4'"
    json.dump(info, sys.stdout, indent=2)
    print()
    print(f"resume it with:\n  {info['resume_command']}\nthen ask it:\n  "
          f"{info['ask_command']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
