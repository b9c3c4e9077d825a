"""Fast snapshot load: guest RAM usable at once, filled behind the guest's back.

``LazyLoader`` maps anonymous memory for every region of an image (a
mapped-ram snapshot, an ELF core), registers all of it with one userfaultfd
in MISSING mode, and reports itself ready in milliseconds.  Every access to
a page not there yet traps; workers fill memory in the background, and
serve the faulting pages first.  ``EagerLoader`` is the QEMU 10 way, as a
baseline: read everything, then return.

A load, step by step, and the module that does each step:

1. ``lazy``: ``LazyLoader`` checks its arguments, and asks the chosen server
   (``lazy.SERVER_KINDS[server]``) whether this process can run it, before
   anything is mapped.
2. ``base``: one anonymous (or hugetlbfs) mapping per region; ``memory()``,
   ``address()`` (shared with ``eager.EagerLoader``).
3. ``lazy``: register every mapping with one uffd, map the image file
   read-only, build the regions and the claim map, make the wake fd.
4. ``placement``: ``Region``, a region as the workers see it (addresses,
   unit of placement, page kinds ZERO / DIRECT / BOUNCE), and
   ``Placer.place``, which copies a run of one kind into the registered
   memory with as few ioctls as possible: the one placement path.
5. ``claims``: ``ClaimMap``, one byte per page, decides which worker places
   each page and knows how many are placed.  Its ``place_one`` is the fault
   loop's shortcut for the common fault (one unclaimed 4 KiB page):
   claimed, placed and marked under one hold of its lock, ~2 µs less per
   fault than claim, ``place`` and mark; a run, or a page in any other
   state, takes ``place``.  (One ioctl of one page under the lock is short;
   a prefetch chunk under it would hold every fault behind a 2 MiB copy.)
6. ``workers``: ``Workers``, the fault loop, the prefetcher and the source
   populator (its essay: how they race, and why faults win).
7. ``server`` and ``server_thread`` / ``server_process`` /
   ``server_interpreter``: where the workers run, threads here, a forked
   process, or an own-GIL subinterpreter (its essay: servers and the GIL).
   A server gets a ``Job`` (data: the uffd, the regions, the claim map, the
   wake fd, the image file, the ``options.WorkerOptions``) and hands one
   ``Report`` back; it knows nothing of the loader.  ``hosting`` forks the
   child or runs the subinterpreter (a pool of them) and carries the one
   report line both send back.
8. ``lazy``: acts on the report.  The last page placed, the loader
   unregisters, closes the uffd and the file mapping (``_finish``); a failed
   load fences what nobody placed (``placement.fence``); ``close()``
   follows the numbered shutdown order of the ``lazy`` essay.
9. ``stats``: what a load did (``Stats``), from every worker's tallies.

``errors`` holds ``LoaderError`` and ``ServerDiedError``.  Dependencies go
one way: ``errors``, ``stats``, ``claims``, ``options`` -> ``placement`` ->
``workers`` -> ``server``, ``hosting`` -> ``server_*`` -> ``lazy``; ``base`` ->
``eager``, ``lazy``.  No server module imports ``lazy`` (``tests/test_structure.py``
counts every import, those for annotations too).
"""
from __future__ import annotations

from .._lazy import lazy_exports

#: name -> the module that defines it, imported on first use (so that the command
#: line can read ``options`` without paying for the workers and the servers)
_EXPORTS = {
    "ClaimMap": "claims", "EagerLoader": "eager", "LoaderError": "errors",
    "ServerDiedError": "errors", "SERVERS": "lazy", "LazyLoader": "lazy",
    "LoadOptions": "options", "HAVE_INTERPRETERS": "server_interpreter",
    "prepare_interpreter_servers": "server_interpreter",
    "release_interpreter_servers": "server_interpreter", "Stats": "stats",
    "release_thread_pool": "threads",
}

__all__ = [
    "ClaimMap",
    "EagerLoader",
    "HAVE_INTERPRETERS",
    "LazyLoader",
    "LoadOptions",
    "LoaderError",
    "SERVERS",
    "ServerDiedError",
    "Stats",
    "prepare_interpreter_servers",
    "release_interpreter_servers",
    "release_thread_pool",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
