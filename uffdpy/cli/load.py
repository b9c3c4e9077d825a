"""``uffdpy load`` and ``uffdpy dump``: a snapshot loaded in this process, lazily or eagerly."""
from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any, Dict, Tuple

from ..outcome import Outcome
from .args import (Command, Progress, cpu, non_negative_int, open_source, positive_int,
                   snapshot_arg, tabulate)

if TYPE_CHECKING:
    from ..loader.base import _LoaderBase

__all__ = ["COMMANDS"]


def _open_loader(args: argparse.Namespace, snap: Any) -> Any:
    from ..loader import EagerLoader, LazyLoader, LoadOptions
    if getattr(args, "mode", "lazy") == "eager":
        return EagerLoader(snap)
    options = LoadOptions.from_cli(args)           # --no-prefetch included
    if options.server == "interpreter":
        # start the subinterpreter (~150-300 ms of imports) before the load is
        # timed, as the benchmark does: ready then means what it does elsewhere
        from ..loader import prepare_interpreter_servers
        prepare_interpreter_servers(1)
    return LazyLoader(snap, options=options, record_ws=getattr(args, "record_ws", None),
                      working_set=getattr(args, "working_set", None))


def wait_with_progress(loader: "_LoaderBase", enabled: bool, label: str = "loading") -> None:
    bar = Progress(label, enabled)
    try:
        while not loader.wait(0.1):
            bar.update(*loader.progress())
    finally:
        bar.finish()


def cmd_load(args: argparse.Namespace) -> Outcome:
    from ..harness.workload import PageFenced, latency_summary, parse_access, run_access, verify
    pattern, fraction = parse_access(args.access)
    with open_source(args) as snap:
        with _open_loader(args, snap) as loader:
            blocks = [(loader.address(b.name), b) for b in snap.regions]
            result: Dict[str, Any] = {}
            if pattern != "none":
                touches = args.touch or (sum(b.pages for b in snap.regions)
                                         if pattern == "seq" else 10000)
                # Stoppable, and stopped before the loader closes: on Ctrl-C, SIGTERM
                # or a failed load no toucher is left inside guest memory when the
                # loader fences it; process_vm_readv makes a page fenced under a
                # toucher an error instead of SIGSEGV.
                try:
                    samples = run_access(blocks, pattern=pattern, fraction=fraction,
                                         touches=touches, threads=args.threads,
                                         seed=args.seed,
                                         cpu=args.access_cpu, via="process_vm_readv",
                                         check=lambda: loader.wait(0))
                except PageFenced:
                    loader.wait(5.0)     # the fence comes first: the loader's own error
                    raise
                result["access_us"] = latency_summary(samples)
                result["accesses"] = len(samples)
            if args.no_prefetch and args.mode == "lazy" and not loader.wait(1.0):
                result["complete"] = False
            else:
                wait_with_progress(loader, not args.json)
                result["complete"] = True
            if args.verify:
                verified, mismatched = verify(blocks)
                result["verified_pages"] = verified
                result["mismatched_pages"] = mismatched
                if not result["complete"]:
                    # reading every page has placed every page: the load completes
                    result["complete"] = bool(loader.wait(10.0))
            stats = loader.stats.as_dict()
    report = {"mode": args.mode, "server": args.server if args.mode == "lazy" else None,
              **stats, **result}
    rows = []
    for key, value in report.items():
        if isinstance(value, dict):
            value = "  ".join(f"{k} {'-' if v is None else f'{v:.1f}'}"
                              for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.6f}"
        rows.append([key, value])
    return Outcome(lambda: tabulate(rows, headers=["stat", "value"]), report,
                   status=1 if args.verify and result.get("mismatched_pages") else 0)


def cmd_dump(args: argparse.Namespace) -> Outcome:
    import ctypes
    from ..files import replacing
    with open_source(args) as snap:
        block = snap.region(args.block)
        ps = block.page_size
        buf = ctypes.create_string_buffer(256 * ps)
        bar = Progress(f"dumping {block.name}", True)
        # A temporary renamed once the load and the copy both ended well: never a
        # partial output, and never the input (refused before anything loads).
        try:
            with replacing(args.output, not_same_as=[args.snapshot]) as fd, \
                    _open_loader(args, snap) as loader:
                base = loader.address(block.name)
                for first, count, present in block.runs():
                    if not present:
                        continue                   # zero pages stay holes
                    for lo in range(first, first + count, 256):
                        n = min(256, first + count - lo) * ps
                        ctypes.memmove(buf, base + lo * ps, n)   # faults served without the GIL
                        os.pwrite(fd, buf.raw[:n], lo * ps)
                        bar.update(lo + n // ps, block.pages)
                os.ftruncate(fd, block.length)
        finally:
            bar.finish()
    return Outcome(f"{args.output}: {block.length} bytes of region {block.name!r}")


def _load_arguments(sp: argparse.ArgumentParser) -> None:
    from ..loader.options import LoadOptions
    snapshot_arg(sp)
    sp.add_argument("--mode", choices=("lazy", "eager"), default="lazy",
                    help="lazy: userfaultfd, ready at once (default); eager: read every "
                         "page first, as QEMU 10 does")
    LoadOptions.add_argument(sp, "--server")
    LoadOptions.add_argument(sp, "--no-prefetch")
    sp.add_argument("--access", default="none",
                    help="the workload during the load: none (default), seq, random or "
                         "hot:FRACTION (random within that fraction of the pages)")
    sp.add_argument("--touch", type=non_negative_int, default=0, metavar="N",
                    help="accesses per thread (default: every page for seq, 10000 otherwise)")
    sp.add_argument("--threads", type=positive_int, default=1, metavar="N",
                    help="accessing threads (default 1)")
    LoadOptions.add_argument(sp, "--server-cpu")
    sp.add_argument("--access-cpu", type=cpu, default=None, metavar="CPU",
                    help="pin the accessing threads")
    LoadOptions.add_argument(sp, "--busy-poll")
    LoadOptions.add_argument(sp, "--populate-source")
    LoadOptions.add_argument(sp, "--prefetch-threads")
    LoadOptions.add_argument(sp, "--prefetch-chunk")
    LoadOptions.add_argument(sp, "--huge-pages")
    sp.add_argument("--seed", type=int, default=1,
                    help="seed of the access workload's addresses (default 1)")
    sp.add_argument("--record-ws", metavar="FILE.ws", default=None,
                    help="write the pages the workload faulted on, in order of first fault "
                         "(record with --no-prefetch to see the whole working set)")
    sp.add_argument("--working-set", metavar="FILE.ws", default=None,
                    help="prefetch these recorded pages first, then the rest in file order")
    sp.add_argument("--verify", action="store_true",
                    help="compare every page with the file (exit status 1 on a mismatch)")
    sp.add_argument("--json", action="store_true", help="print the stats as JSON")


def _dump_arguments(sp: argparse.ArgumentParser) -> None:
    from ..loader.options import LoadOptions
    snapshot_arg(sp)
    sp.add_argument("block", metavar="REGION", help="a RAMBlock or ELF segment name (see inspect)")
    sp.add_argument("-o", "--output", required=True, metavar="FILE",
                    help="the region's bytes (sparse; written under a temporary name)")
    sp.add_argument("--mode", choices=("lazy", "eager"), default="lazy",
                    help="lazy: userfaultfd (default); eager: read every page first")
    LoadOptions.add_argument(sp, "--server")
    LoadOptions.add_argument(sp, "--huge-pages", help="hugetlbfs guest memory")


def check_lazy_only(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse a lazy-only option with ``--mode eager``; the server defaults to a thread."""
    from ..loader.options import LoadOptions
    if args.mode == "eager":
        given = [*LoadOptions.given_flags(args),
                 *(flag for flag, dest in (("--record-ws", "record_ws"),
                                           ("--working-set", "working_set"))
                   if getattr(args, dest, None) is not None)]
        if given:
            parser.error(f"{', '.join(given)} applies to --mode lazy only")
    if args.server is None:
        args.server = "thread"


#: this module's commands, in ``uffdpy --help`` order
COMMANDS: Tuple[Command, ...] = (
    Command("load", _load_arguments, cmd_load, dict(
        help="load a snapshot, run an access workload, print stats"), check=check_lazy_only),
    Command("dump", _dump_arguments, cmd_dump, dict(
        help="write one region's memory, read through the loader"), check=check_lazy_only),
)
