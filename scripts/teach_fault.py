#!/usr/bin/env python3
"""One userfaultfd page fault, served by hand with the raw ``uffdpy.uffd`` API.

What it shows
-------------
Everything the loader's fault loop does, once, slowly, with a print at each
step:

1. map a few pages of anonymous memory (nothing is in them yet: no page is
   allocated until the first touch);
2. create a userfaultfd and register the range in MISSING mode: from now on a
   touch of a missing page is reported to us instead of being filled with zeros;
3. start a "toucher" thread that reads the second page with ``ctypes.memmove``
   (which releases the GIL, so this thread keeps running while it sleeps);
4. poll the uffd and read the PAGEFAULT message: the faulting address, the
   flags, and the toucher is asleep in the kernel meanwhile;
5. resolve it with one ``UFFDIO_COPY`` of a page we prepared (the ioctl
   installs the page atomically and wakes the toucher);
6. show that the toucher got exactly our bytes, and that touching the page
   again is an ordinary memory access (no second fault).

Use::

    python3 scripts/teach_fault.py [--quick]

``--quick`` is accepted for the script-runner test; the script is quick
anyway.  Needs a working userfaultfd (root, or see README "Permissions").
"""
from __future__ import annotations

import argparse
import ctypes
import select
import sys
import threading
import time
from pathlib import Path
from typing import Dict

# Run from a checkout without installing: the package is next to scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from uffdpy.memory import PAGE_SIZE, Mapping  # noqa: E402
from uffdpy.uffd import PagefaultEvent, RegisterMode, Userfaultfd  # noqa: E402

PAGES = 4
TIMEOUT_S = 10.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="accepted; the script is quick anyway")
    ap.parse_args()

    with Mapping.anonymous(PAGES * PAGE_SIZE) as mem, Userfaultfd() as uffd:
        print(f"1. mapped {PAGES} pages of anonymous memory at {mem.address:#x} "
              f"({PAGE_SIZE} bytes each); no page exists yet.")
        allowed = uffd.register(mem.address, mem.length, mode=RegisterMode.MISSING)
        print(f"2. {uffd!r}\n   registered the range in MISSING mode; "
              f"ioctls allowed there: {allowed!r}")

        target = mem.address + PAGE_SIZE                     # the second page
        seen: Dict[str, object] = {}

        def toucher() -> None:
            buf = ctypes.create_string_buffer(16)
            t0 = time.perf_counter()
            ctypes.memmove(buf, target, 16)                  # faults; sleeps without the GIL
            seen["bytes"] = buf.raw
            seen["waited_ms"] = (time.perf_counter() - t0) * 1e3

        thread = threading.Thread(target=toucher, name="toucher", daemon=True)
        thread.start()
        print(f"3. toucher thread started: ctypes.memmove(buf, {target:#x}, 16) ...")

        poller = select.poll()
        poller.register(uffd.fileno(), select.POLLIN)
        if not poller.poll(int(TIMEOUT_S * 1000)):
            print("   no fault arrived: is the range really registered?")
            return 1
        events = uffd.read_events()
        fault = next((e for e in events if isinstance(e, PagefaultEvent)), None)
        if fault is None:
            print(f"   expected a PAGEFAULT message, read {events!r}")
            return 1
        time.sleep(0.05)                                     # make the wait visible
        print(f"4. read {len(events)} message(s) from the uffd: PAGEFAULT at "
              f"{fault.address:#x}, flags {fault.flags!r}\n"
              f"   the toucher is asleep in the kernel (still running: {thread.is_alive()}); "
              f"page {(fault.address - mem.address) // PAGE_SIZE} of the range, "
              f"{'a write' if fault.flags else 'a read'}.")

        page = ctypes.create_string_buffer(b"hello from the fault handler! ".ljust(PAGE_SIZE, b"."),
                                           PAGE_SIZE)
        page_start = fault.address & ~(PAGE_SIZE - 1)
        done = uffd.copy(page_start, ctypes.addressof(page), PAGE_SIZE)
        print(f"5. UFFDIO_COPY(dst={page_start:#x}, len={PAGE_SIZE}) returned {done}: "
              "the page is installed and the toucher woken.")

        thread.join(TIMEOUT_S)
        if thread.is_alive():
            print("   the toucher is still asleep: the copy did not wake it")
            return 1
        got = seen["bytes"]
        print(f"6. the toucher read {got!r} after waiting {seen['waited_ms']:.1f} ms.")
        again = ctypes.create_string_buffer(16)
        ctypes.memmove(again, target, 16)
        pending = uffd.read_events()
        print(f"   touching it again reads {again.raw!r} with {len(pending)} new fault(s): "
              "it is ordinary memory now.")
        ok = got == page.raw[:16] and again.raw == got and not pending
        print("   (other pages are still missing; closing the uffd unregisters them, and a\n"
              "   later touch would then get a zero page from the kernel.)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
