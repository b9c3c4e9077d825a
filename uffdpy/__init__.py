"""uffdpy: lazy loading of QEMU mapped-ram VM snapshots with Linux userfaultfd.

Pure Python (ctypes only).  Importing the package touches no kernel and works
on any OS; the first call that needs userfaultfd fails with a message instead.

Modules:
    ioctl      the kernel ABI: structs, constants, ioctl numbers, libc calls
    uffd       ``Userfaultfd``: an owning, typed wrapper over every ioctl
    memory     ``Mapping``: owned mmap regions with a memoryview
    pagesource what a loader needs from any image: ``PageSource``, ``open_image``, ``ImageError``
    mappedram  the QEMU mapped-ram file format: ``Snapshot``, writer (no kernel calls)
    elfcore    ELF core files (QEMU dump-guest-memory, process cores): ``ElfImage`` (no kernel calls)
    convert    an ELF guest memory dump as a mapped-ram snapshot (no kernel calls)
    loader     ``LazyLoader`` (fault loop + prefetcher + claim map), ``LoadOptions``, ``EagerLoader``
    workingset the pages a load or a resume demanded first: record, check, merge, replay
    resume     ``Resume``: a snapshot served as the postcopy source of a real QEMU;
               ``MapResume``: guest RAM mapped copy-on-write from the snapshot file
    qmp        ``QmpClient``: a synchronous face on qemu.qmp, QEMU's QMP library
    qemu       ``Qemu``, the one QEMU launcher, and real snapshots and dumps made with it
    linuxguest a real Linux guest snapshot that answers requests on a serial port
    processcore Linux process cores holding a known buffer (gdb's gcore, the kernel)
    sizes      ``parse_size``: the one reader of sizes (``64M``, ``0x1000``)
    cli        the ``uffdpy`` command (each command returns an ``outcome.Outcome``)
"""
from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "Userfaultfd": "uffd",
    "Filler": "uffd",
    "UffdError": "uffd",
    "UffdPermissionError": "uffd",
    "Feature": "uffd",
    "RegisterMode": "uffd",
    "probe_features": "uffd",
    "Mapping": "memory",
    "Snapshot": "mappedram",
    "RamBlock": "mappedram",
    "MappedRamError": "mappedram",
    "NotMappedRamError": "mappedram",
    "write_snapshot": "mappedram",
    "rewrite_snapshot": "mappedram",
    "make_synthetic": "harness.synthetic",
    "open_image": "pagesource",
    "ImageError": "pagesource",
    "PageSource": "pagesource",
    "to_mapped_ram": "convert",
    "ElfImage": "elfcore",
    "ElfImageError": "elfcore",
    "LazyLoader": "loader",
    "LoadOptions": "loader",
    "WorkingSet": "workingset",
    "RegionNotFound": "pagesource",
    "UffdpyError": "errors",
    "EagerLoader": "loader",
    "LoaderError": "loader",
    "ServerDiedError": "loader",
    "Stats": "loader",
    "prepare_interpreter_servers": "loader",
    "release_interpreter_servers": "loader",
    "release_thread_pool": "loader",
    "Resume": "resume",
    "ResumeStats": "resume",
    "ResumeError": "resume",
    "DestinationError": "resume",
    "MapResume": "resume",
    "MapStats": "resume",
    "QmpClient": "qmp",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
