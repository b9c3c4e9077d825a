"""``LoadOptions``: how a lazy load runs, validated once, as data.

One frozen value carries every knob of a lazy load: ``LazyLoader`` takes
it (or the same names as keywords), the command line builds it from its
flags (:meth:`LoadOptions.from_cli`) and can print it back as flags
(:meth:`LoadOptions.cli_args`), and the workers get their share of it as a
second frozen value (:meth:`LoadOptions.worker_options`: a ``WorkerOptions``,
whose dict form, :meth:`WorkerOptions.as_dict`, goes through JSON to a
subinterpreter and comes back with :meth:`WorkerOptions.from_dict`).  A bad
value is a ``ValueError`` when the value is made, before anything is mapped;
neither value changes after that.
"""
from __future__ import annotations

import argparse
import dataclasses
import mmap
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..argtypes import chunk_size, cpu, positive_int

__all__ = ["LoadOptions", "WorkerOptions", "SERVER_NAMES", "DEFAULT_CHUNK_BYTES"]

#: the server kinds (``LazyLoader``'s registry has the classes)
SERVER_NAMES = ("thread", "process", "interpreter")
DEFAULT_CHUNK_BYTES = 2 << 20
#: the smallest prefetch chunk: one page (``memory.PAGE_SIZE``, without importing ctypes)
PAGE_SIZE = mmap.PAGESIZE


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """What the workers of one load (``workers.Workers``) are told: their share of a
    ``LoadOptions``, with the machine's defaults resolved.

    Made by ``LoadOptions.worker_options`` (whose checks the values passed) or
    back from its dict form, never changed.
    """

    prefetch: bool = True
    #: the most bytes the prefetcher places per ioctl
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    fault_around_pages: int = 0
    server_cpu: Optional[int] = None
    busy_poll: bool = False
    prefetch_threads: int = 1
    populate_source: bool = False

    def as_dict(self) -> Dict[str, Any]:
        """The options as JSON-ready data (what an interpreter server is sent)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "WorkerOptions":
        """The options back from :meth:`as_dict`.

        Raises:
            ValueError: a key that is no option.
        """
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"not worker options: {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """How a lazy load runs (``LazyLoader``'s docstring says what each does)."""

    server: str = "thread"
    prefetch: bool = True
    prefetch_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    fault_around_pages: int = 0
    server_cpu: Optional[int] = None
    busy_poll: bool = False
    #: None: 2 when this process may run on 2 or more CPUs, else 1
    prefetch_threads: Optional[int] = None
    huge_pages: bool = False
    populate_source: bool = False

    def __post_init__(self) -> None:
        if self.server not in SERVER_NAMES:
            raise ValueError(f"server must be one of {', '.join(map(repr, SERVER_NAMES))}, "
                             f"not {self.server!r}")
        if self.prefetch_chunk_bytes < PAGE_SIZE:
            raise ValueError(f"prefetch_chunk_bytes must be at least {PAGE_SIZE}")
        if self.fault_around_pages < 0:
            raise ValueError("fault_around_pages must be >= 0")
        if self.prefetch_threads is not None and self.prefetch_threads < 1:
            raise ValueError("prefetch_threads must be >= 1")
        if self.server_cpu is not None and self.server_cpu < 0:
            raise ValueError("server_cpu must be a CPU number (>= 0)")

    def resolved(self) -> "LoadOptions":
        """The same, with the defaults that depend on this machine filled in."""
        if self.prefetch_threads is not None:
            return self
        return dataclasses.replace(self, prefetch_threads=min(2, len(os.sched_getaffinity(0))))

    def worker_options(self) -> WorkerOptions:
        """The workers' share of these options (``prefetch_threads`` resolved)."""
        opts = self.resolved()
        assert opts.prefetch_threads is not None           # resolved() fills it in
        return WorkerOptions(prefetch=opts.prefetch, chunk_bytes=opts.prefetch_chunk_bytes,
                             fault_around_pages=opts.fault_around_pages,
                             server_cpu=opts.server_cpu, busy_poll=opts.busy_poll,
                             prefetch_threads=opts.prefetch_threads,
                             populate_source=opts.populate_source)

    def cli_args(self) -> List[str]:
        """The ``uffdpy load`` flags that make these options (defaults left out)."""
        out: List[str] = []
        default = LoadOptions()
        if self.server != default.server:
            out += ["--server", self.server]
        if not self.prefetch:
            out.append("--no-prefetch")
        if self.prefetch_chunk_bytes != default.prefetch_chunk_bytes:
            out += ["--prefetch-chunk", str(self.prefetch_chunk_bytes)]
        if self.server_cpu is not None:
            out += ["--server-cpu", str(self.server_cpu)]
        if self.busy_poll:
            out.append("--busy-poll")
        if self.prefetch_threads is not None:
            out += ["--prefetch-threads", str(self.prefetch_threads)]
        if self.huge_pages:
            out.append("--huge-pages")
        if self.populate_source:
            out.append("--populate-source")
        if self.fault_around_pages:
            raise ValueError("fault_around_pages has no uffdpy load flag")
        return out

    @classmethod
    def from_cli(cls, args: Any) -> "LoadOptions":
        """From the parsed flags of ``uffdpy load``/``dump`` (absent ones: the defaults)."""
        return cls(server=getattr(args, "server", None) or "thread",
                   prefetch=not getattr(args, "no_prefetch", False),
                   prefetch_chunk_bytes=getattr(args, "prefetch_chunk", None)
                   or DEFAULT_CHUNK_BYTES,
                   server_cpu=getattr(args, "server_cpu", None),
                   busy_poll=getattr(args, "busy_poll", False),
                   prefetch_threads=getattr(args, "prefetch_threads", None),
                   huge_pages=getattr(args, "huge_pages", False),
                   populate_source=getattr(args, "populate_source", False))

    @staticmethod
    def add_argument(parser: argparse.ArgumentParser, flag: str, **overrides: Any) -> None:
        """Add one of the lazy load's flags (:data:`FLAGS`) to ``parser`` (``overrides``:
        other argparse keywords, such as a shorter help)."""
        _, kwargs = FLAGS[flag]
        parser.add_argument(flag, **{**kwargs, **overrides})

    @staticmethod
    def given_flags(args: argparse.Namespace) -> Tuple[str, ...]:
        """The lazy load's flags given a value (for ``--mode eager``, which has none of them)."""
        return tuple(flag for flag, (dest, kwargs) in FLAGS.items()
                     if getattr(args, dest, None) not in (kwargs.get("default"), None, False))


#: the lazy load's flags: flag -> (dest, argparse keywords); absent or None: the default
FLAGS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "--server": ("server", dict(
        choices=SERVER_NAMES, default=None,
        help="where the fault loop runs: thread (default), process, or interpreter (an "
             "own-GIL subinterpreter, Python 3.13+); lazy only")),
    "--no-prefetch": ("no_prefetch", dict(
        action="store_true",
        help="no background prefetch: pages arrive only when touched (the load then "
             "completes only if the workload touches every page)")),
    "--server-cpu": ("server_cpu", dict(
        type=cpu, default=None, metavar="CPU", help="pin the fault loop")),
    "--busy-poll": ("busy_poll", dict(action="store_true", help="spin instead of poll()")),
    "--populate-source": ("populate_source", dict(
        action="store_true",
        help="map the file's data pages ahead of the copies (reads the whole file's data "
             "even with --no-prefetch)")),
    "--prefetch-threads": ("prefetch_threads", dict(
        type=positive_int, default=None, metavar="N",
        help="parallel prefetch threads (default: 2 on 2+ CPUs)")),
    "--prefetch-chunk": ("prefetch_chunk", dict(
        type=chunk_size, default=None, metavar="SIZE",
        help="bytes per prefetch ioctl (default 2M; smaller: a fault on a page being "
             "prefetched waits less, the load takes longer)")),
    "--huge-pages": ("huge_pages", dict(
        action="store_true",
        help="hugetlbfs guest memory, whole 2 MiB pages per fault (needs "
             "/proc/sys/vm/nr_hugepages)")),
}
