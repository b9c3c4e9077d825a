#!/usr/bin/env python3
"""Why the in-thread fault server must never be faulted on while holding the GIL.

What it shows
-------------
With ``LazyLoader(..., server="thread")`` the fault loop is a Python thread of
*this* process.  When another thread touches a guest page that is not loaded
yet, the kernel puts that thread to sleep until somebody places the page.  If
the sleeping thread holds the GIL (``bytes(mem[0:16])`` copies with
``memcpy`` under the GIL, and so do ``struct.unpack_from``, ``mem.tobytes()``,
numpy...), the fault loop can never run its Python code to place the page:
the interpreter deadlocks.  Nothing times out and nothing raises; only
SIGKILL ends it.

The script runs three experiments (four on Python 3.13+), each in a child
process with a timeout so that the demonstration itself never hangs
(prefetch is off in all, so the page is placed only by the fault loop):

1. thread server, plain Python read ``bytes(mem[a:a+16])``: the child hangs,
   is killed after the timeout, and the script reports "deadlocked as expected".
2. thread server, ``ctypes.memmove(buf, address, 16)``: ctypes releases the GIL
   around the copy, the fault loop runs, the read returns the snapshot's bytes.
3. process server, the same plain Python read: the fault loop runs in a forked
   server process with its own GIL, so the read just works.
4. (Python 3.13+) interpreter server, the same plain Python read: the fault
   loop runs in a subinterpreter of this process that has its own GIL, so the
   read just works here too, without a second process.

Use::

    python3 scripts/gil_deadlock.py [--quick] [--timeout S] [--size 64M]

``--quick`` uses a 16 MiB snapshot and a 2 s deadlock timeout (the whole run
takes a few seconds).  Needs a working userfaultfd (root, or see README).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Tuple

# Run from a checkout without installing: the package is next to scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from uffdpy.loader import HAVE_INTERPRETERS, LazyLoader  # noqa: E402
from uffdpy.mappedram import Snapshot
from uffdpy.harness.synthetic import make_synthetic  # noqa: E402

EXPERIMENTS = {
    "plain-thread": ("thread", "plain"),
    "memmove-thread": ("thread", "memmove"),
    "plain-process": ("process", "plain"),
    "plain-interpreter": ("interpreter", "plain"),
}


def first_present_page(snap: Snapshot) -> Tuple[str, int]:
    """Block name and byte offset of the first page that holds data."""
    for block in snap.blocks:
        for first, _count, present in block.runs():
            if present:
                return block.name, first * block.page_size
    raise ValueError(f"{snap.path}: no page holds data")


def child(snapshot: str, experiment: str) -> int:
    """One experiment; prints what it read.  May deadlock on purpose."""
    server, access = EXPERIMENTS[experiment]
    with Snapshot.open(snapshot) as snap:
        name, offset = first_present_page(snap)
        want = snap.block(name).read_page(offset // snap.block(name).page_size)[:16]
        with LazyLoader(snap, server=server, prefetch=False) as loader:
            print(f"  [child] loader ready ({server} server, no prefetch); reading 16 bytes "
                  f"of {name!r} at offset {offset:#x} with "
                  f"{'bytes(mem[a:b])' if access == 'plain' else 'ctypes.memmove'} ...",
                  flush=True)
            if access == "plain":
                mem = loader.memory(name)
                got = bytes(mem[offset:offset + 16])        # holds the GIL while it faults
            else:
                buf = ctypes.create_string_buffer(16)
                ctypes.memmove(buf, loader.address(name) + offset, 16)   # releases the GIL
                got = buf.raw
            print(f"  [child] read {got.hex()} ({'matches' if got == want else 'DIFFERS FROM'} "
                  "the snapshot)", flush=True)
            return 0 if got == want else 1


def run(snapshot: str, experiment: str, timeout: float) -> Tuple[str, float]:
    """Run one experiment in a child; return ``(outcome, seconds)``."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, __file__, "--child", experiment, snapshot],
                            stdin=subprocess.DEVNULL)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()                 # a thread parked in a userfault still dies of SIGKILL
        proc.wait(10)
        return "deadlocked", time.monotonic() - t0
    return ("ok" if code == 0 else f"failed (exit status {code})"), time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small snapshot, short timeout")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds before the deadlocked child is killed (default 5, quick 2)")
    ap.add_argument("--size", type=int, default=None, metavar="MIB",
                    help="snapshot size in MiB (default 64, quick 16)")
    ap.add_argument("--child", nargs=2, metavar=("EXPERIMENT", "SNAP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[1], args.child[0])

    timeout = args.timeout or (2.0 if args.quick else 5.0)
    size_mib = args.size or (16 if args.quick else 64)
    # A working experiment finishes in well under a second; give it room anyway.
    ok_timeout = max(30.0, 4 * timeout)
    with tempfile.TemporaryDirectory(prefix="uffdpy-gil-") as tmp:
        snap = os.path.join(tmp, "snap.img")
        make_synthetic(snap, size=size_mib << 20, fill=0.5, seed=1)
        print(f"synthetic {size_mib} MiB snapshot in {snap}\n")

        print("1. thread server, plain Python read (holds the GIL while it faults):")
        outcome, secs = run(snap, "plain-thread", timeout)
        if outcome == "deadlocked":
            print(f"   -> deadlocked as expected: killed after {secs:.1f} s.\n")
        else:
            print(f"   -> unexpectedly {outcome}: the deadlock did not happen.\n")

        print("2. thread server, ctypes.memmove (releases the GIL around the copy):")
        outcome2, secs = run(snap, "memmove-thread", ok_timeout)
        print(f"   -> {outcome2} in {secs:.2f} s.\n")

        print("3. process server, the same plain Python read:")
        outcome3, secs = run(snap, "plain-process", ok_timeout)
        print(f"   -> {outcome3} in {secs:.2f} s.\n")

        outcome4 = "ok"
        if HAVE_INTERPRETERS:
            print("4. interpreter server (an own-GIL subinterpreter), the same plain read:")
            outcome4, secs = run(snap, "plain-interpreter", ok_timeout)
            print(f"   -> {outcome4} in {secs:.2f} s.\n")
        else:
            print("4. interpreter server: skipped, it needs Python 3.13 or newer "
                  f"(this is {sys.version.split()[0]}).\n")

    print("Why: a thread that faults on a missing page sleeps in the kernel until the page\n"
          "is placed.  With server='thread' the page is placed by a Python thread of the\n"
          "same process, which needs the GIL; if the sleeper holds it, nobody can ever\n"
          "place the page.  So with the thread server touch guest memory only without\n"
          "the GIL (ctypes.memmove/memset, a KVM vCPU, another process), or use\n"
          "server='process', whose fault loop runs under another process's GIL, or\n"
          "server='interpreter' (3.13+), whose runs under a subinterpreter's own GIL.")
    good = outcome == "deadlocked" and outcome2 == "ok" and outcome3 == "ok" and outcome4 == "ok"
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
