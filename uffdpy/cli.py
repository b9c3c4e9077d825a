"""The ``uffdpy`` command: inspect, load, dump, benchmark, convert and make images.

Every command that reads an image takes a QEMU mapped-ram snapshot or an ELF
core (QEMU ``dump-guest-memory``, a process core); the format is recognised
from the file's first bytes.

Errors in the input give one line, ``uffdpy: error: FILE: WHAT (offset N)``,
and exit status 2; ``--debug`` (before or after the subcommand) shows the
traceback too.  Bad arguments are argparse's usage error, status 2.  Ctrl-C
ends with 130, SIGTERM with 143, a closed output pipe quietly with 141 (as a
tool killed by SIGPIPE), ``load --verify`` finding a mismatch with 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import sys
import traceback
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from .cli_args import (Progress, chunk_size, cpu, fraction, hot_fraction, human, mib,
                       non_negative_int, open_source, page_size_multiple, parse_size,
                       positive_int, printable, qemu_size, sniff, tabulate)
from .cli_resume import cmd_qemu_args, cmd_resume, qemu_args_arguments, resume_arguments
from .errors import UffdpyError
from .needs import destination_needs
from .outcome import Outcome

if TYPE_CHECKING:
    from .loader.base import _LoaderBase

__all__ = ["main"]

#: ``LazyLoader(server=...)`` values (kept equal to ``uffdpy.loader.SERVERS``
#: by a test; the loader is imported only by the commands that load)
SERVERS = ("thread", "process", "interpreter")


# ------------------------------------------------------------------------ inspect

def _page_counts(region: Any) -> Dict[str, int]:
    """The sizes ``inspect --json`` gives for a region of any format, in its key order."""
    return {"length": region.length, "page_size": region.page_size, "pages": region.pages,
            "present_pages": region.present_pages, "zero_pages": region.zero_pages}


def _inspect_elf_dict(image: Any) -> Dict[str, Any]:
    return {
        "path": image.path,
        "format": image.format,
        "machine": image.machine,
        "address_space": image.address_space,
        "regions": [{"name": r.name, "address": r.address, **_page_counts(r),
                     "file_offset": r.file_offset, "file_bytes": r.file_bytes,
                     "flags": r.flags} for r in image.regions],
        "notes": [{"name": n.name, "type": n.type, "type_name": n.type_name,
                   "offset": n.offset, "size": n.size} for n in image.notes],
    }


def _elf_text(info: Dict[str, Any]) -> str:
    rows = [[printable(r["name"]), human(r["length"]), r["present_pages"], r["zero_pages"],
             f"0x{r['file_offset']:x}", "".join(c if r["flags"] & bit else "-" for c, bit
                                                in (("r", 4), ("w", 2), ("x", 1)))]
            for r in info["regions"]]
    notes = [[printable(n["name"]), printable(n["type_name"]), n["size"], f"0x{n['offset']:x}"]
             for n in info["notes"]]
    return "\n".join([
        f"file:          {printable(info['path'])}",
        f"format:        ELF core ({printable(info['machine'])}), "
        f"{info['address_space']} addresses",
        tabulate(rows, headers=["region", "size", "in file", "zero", "file offset", "flags"]),
        "",
        tabulate(notes, headers=["note", "type", "bytes", "offset"])])


def _inspect_dict(snap: Any) -> Dict[str, Any]:
    return {
        "path": snap.path,
        "format": snap.format,
        "machine": snap.machine,
        "capabilities": list(snap.capabilities),
        "regions": [{"name": b.name, **_page_counts(b), "bitmap_offset": b.bitmap_offset,
                     "pages_offset": b.pages_offset} for b in snap.blocks],
        "devices": [{"name": d.name, "instance": d.instance, "version": d.version}
                    for d in snap.devices],
        "destination": destination_needs(snap),
    }


def _snapshot_text(info: Dict[str, Any]) -> str:
    rows = [[printable(b["name"]), human(b["length"]), b["page_size"], b["present_pages"],
             b["zero_pages"], f"{100 * b['present_pages'] / b['pages']:.1f}" if b["pages"] else "-",
             f"0x{b['pages_offset']:x}"] for b in info["regions"]]
    devices = [[printable(d["name"]), d["instance"], d["version"]] for d in info["devices"]]
    return "\n".join([
        f"file:         {printable(info['path'])}",
        f"machine:      {printable(info['machine'])}",
        f"capabilities: {printable(', '.join(info['capabilities'])) or '-'}",
        tabulate(rows, headers=["block", "size", "page size", "present", "zero",
                                "% present", "pages offset"]),
        "",
        tabulate(devices, headers=["device section", "instance", "version"]),
        "",
        "a destination needs (as far as the snapshot tells):",
        "  " + " ".join(shlex.quote(printable(a)) for a in info["destination"]["args"]),
        *(f"  ({printable(n)})" for n in info["destination"]["notes"]),
        f"  and what it cannot tell: {', '.join(info['destination']['unknown'])}"])


def _inspect_regions_dict(image: Any) -> Dict[str, Any]:
    """What ``inspect`` shows of a format it has no entry for: the ``PageSource`` view."""
    return {"path": image.path, "format": image.format,
            "regions": [{"name": r.name, **_page_counts(r), "file_offset": r.file_offset,
                         "file_bytes": r.file_bytes} for r in image.regions]}


def _regions_text(info: Dict[str, Any]) -> str:
    rows = [[printable(r["name"]), human(r["length"]), r["present_pages"], r["zero_pages"],
             f"0x{r['file_offset']:x}"] for r in info["regions"]]
    return "\n".join([f"file:   {printable(info['path'])}",
                      f"format: {printable(info['format'])}",
                      tabulate(rows, headers=["region", "size", "in file", "zero",
                                              "file offset"])])


#: per format (``PageSource.format``): what ``inspect`` computes, and its text; a
#: format without an entry (a new one in ``pagesource.FORMATS``) shows its regions
_INSPECTORS = {
    "mapped-ram": (_inspect_dict, _snapshot_text),
    "elf-core": (_inspect_elf_dict, _elf_text),
}


def cmd_inspect(args: argparse.Namespace) -> Outcome:
    head, regular = sniff(args)
    if regular and not args.offset and head.startswith(b"{"):     # JSON: a working set
        from .cli_ws import inspect_file
        return inspect_file(args.snapshot, args.against)
    if args.against:
        raise ValueError("--against applies to working-set files (FILE.ws) only")
    with open_source(args, head) as image:
        describe, text = _INSPECTORS.get(image.format, (_inspect_regions_dict, _regions_text))
        info = describe(image)
    return Outcome(text(info), info)


# --------------------------------------------------------------------------- load

def _open_loader(args: argparse.Namespace, snap: Any) -> Any:
    from .loader import EagerLoader, LazyLoader, LoadOptions
    if getattr(args, "mode", "lazy") == "eager":
        return EagerLoader(snap)
    options = LoadOptions.from_cli(args)           # --no-prefetch included
    if options.server == "interpreter":
        # start the subinterpreter (~150-300 ms of imports) before the load is
        # timed, as the benchmark does: ready then means what it does elsewhere
        from .loader import prepare_interpreter_servers
        prepare_interpreter_servers(1)
    return LazyLoader(snap, options=options, record_ws=getattr(args, "record_ws", None),
                      working_set=getattr(args, "working_set", None))


def _wait_with_progress(loader: "_LoaderBase", enabled: bool, label: str = "loading") -> None:
    bar = Progress(label, enabled)
    try:
        while not loader.wait(0.1):
            bar.update(*loader.progress())
    finally:
        bar.finish()


def cmd_load(args: argparse.Namespace) -> Outcome:
    from .workload import PageFenced, latency_summary, parse_access, run_access, verify
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
                _wait_with_progress(loader, not args.json)
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
    return Outcome(tabulate(rows, headers=["stat", "value"]), report,
                   status=1 if args.verify and result.get("mismatched_pages") else 0)


# --------------------------------------------------------------------------- dump

def cmd_dump(args: argparse.Namespace) -> Outcome:
    import ctypes
    from .files import replacing
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


# -------------------------------------------------------------------------- make

def cmd_make(args: argparse.Namespace) -> Outcome:
    from .synthetic import make_synthetic
    from .pagesource import memory_limit, memory_limit_origin
    limit = memory_limit()
    if args.size > limit:
        where = memory_limit_origin() or "this machine's memory"
        raise ValueError(f"--size {args.size}: more than {where} ({human(limit)}), "
                         "which a guest of this size must fit in to load")
    make_synthetic(args.output, size=args.size, fill=args.fill, seed=args.seed)
    return Outcome(f"{args.output}: synthetic snapshot, block 'ram' of {human(args.size)}, "
                   f"~{args.fill:.0%} present; load with qemu-system-x86_64 -machine none "
                   f"-m {qemu_size(args.size)}")


# ----------------------------------------------------------------------- convert

def cmd_convert(args: argparse.Namespace) -> Outcome:
    from .convert import to_mapped_ram
    with open_source(args) as image:
        if image.format != "elf-core":
            raise ValueError(f"{args.snapshot}: convert reads ELF memory images; this is "
                             f"already a {image.format} file")
        blocks = to_mapped_ram(image, args.output, layout=args.layout,
                               ram_size=args.ram_size or 0)
    lines = [f"{args.output}: block {printable(repr(b.name))} of {human(b.length)}, "
             f"{b.data_pages} pages with data" for b in blocks]
    if args.layout == "ram":
        lines.append(f"load it with: qemu-system-x86_64 -machine none "
                     f"-m {qemu_size(blocks[0].length)} -incoming defer, then "
                     f"migrate-incoming file:{args.output} with the mapped-ram capability on")
    return Outcome("\n".join(lines))


# ------------------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> Outcome:
    import shlex
    if args.resume:
        from .bench_resume import run_resume_bench
        if not args.qemu_args:
            raise ValueError("bench --resume needs --qemu-args recreating the saved machine")
        if args.clones:
            from .bench_resume import run_clone_bench
            out = run_clone_bench(args.snapshot, shlex.split(args.qemu_args),
                                  clones=args.clones, rounds=args.rounds,
                                  request=args.request or None)
            return Outcome(out["table"], {"rows": out["rows"], "rounds": out["rounds"]})
        from .bench_resume import CONTENDERS
        contenders = [c for c in (args.contenders or ",".join(CONTENDERS)).split(",") if c]
        unknown = [c for c in contenders if c not in CONTENDERS]
        if unknown:
            raise ValueError(f"--contenders: unknown {', '.join(unknown)}; choose from "
                             f"{', '.join(CONTENDERS)}")
        out = run_resume_bench(args.snapshot, shlex.split(args.qemu_args), rounds=args.rounds,
                               request=args.request or None, contenders=contenders,
                               cold=args.cold)
        return Outcome(out["table"], {"rows": out["rows"], "rounds": out["rounds"]})
    if args.clones or args.cold or args.contenders:
        raise ValueError("--clones, --cold and --contenders apply with --resume only")
    if args.hot is not None:
        from .bench_ws import run_ws_bench
        out = run_ws_bench(args.snapshot, fraction=args.hot, touches=args.touch,
                           rounds=args.rounds)
        return Outcome(out["table"], {"rows": out["rows"], "rounds": out["rounds"],
                                      "recorded_pages": out["recorded_pages"]})
    from .bench import run_bench
    out = run_bench(args.snapshot, rounds=args.rounds, touches=args.touch,
                    qemu=not args.no_qemu,
                    qemu_args=shlex.split(args.qemu_args) if args.qemu_args else None)
    return Outcome(out["table"], out["data"])


# -------------------------------------------------------------------------- demo

#: interleaved eager and lazy loads the demo times
DEMO_ROUNDS = 3


def _read_through(path: str) -> None:
    """Read a file once (into the page cache), in 1 MiB pieces."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while os.read(fd, 1 << 20):
            pass
    finally:
        os.close(fd)


def cmd_demo(args: argparse.Namespace) -> Outcome:
    from .loader import EagerLoader, LazyLoader
    from .mappedram import Snapshot
    from .synthetic import make_synthetic
    from .workload import latency_summary, run_access, verify
    import statistics
    import tempfile
    import threading
    size = args.size
    with tempfile.TemporaryDirectory(prefix="uffdpy-demo-") as tmp:
        path = os.path.join(tmp, "demo.img")
        print(f"making a synthetic {mib(size)} snapshot (40% of pages hold data) in {tmp} ...")
        make_synthetic(path, size=size, fill=0.4, seed=7)
        with Snapshot.open(path) as snap:
            # As the benchmark measures: the file read once first (both loads
            # then read it from the page cache, as a just-written file would
            # be for one and not the other), then eager and lazy loads
            # interleaved, medians of DEMO_ROUNDS.
            _read_through(path)
            eager_runs, ready_runs, complete_runs = [], [], []
            for _ in range(DEMO_ROUNDS):
                with EagerLoader(snap) as eager:
                    eager_runs.append(eager.stats.time_to_complete_s or 0.0)
                with LazyLoader(snap, server="thread") as lazy:
                    lazy.wait(120)
                    ready_runs.append(lazy.stats.time_to_ready_s)
                    complete_runs.append(lazy.stats.time_to_complete_s or 0.0)
            eager_s, ready_s = statistics.median(eager_runs), statistics.median(ready_runs)
            complete_s = statistics.median(complete_runs)
            with LazyLoader(snap, server="thread") as lazy:
                ready_s = lazy.stats.time_to_ready_s
                blocks = [(lazy.address(b.name), b) for b in snap.blocks]
                accesses: List[int] = []
                done = threading.Event()

                def touch() -> None:
                    accesses.extend(run_access(blocks, pattern="random", touches=2000))
                    done.set()

                toucher = threading.Thread(target=touch, daemon=True)
                toucher.start()
                _wait_with_progress(lazy, True, "prefetching")
                toucher.join()
                stats = lazy.stats
                verified, mismatched = verify(blocks)
    lat = latency_summary(accesses)
    rows = [
        ["eager load (QEMU 10 style): VM waits", f"{eager_s * 1e3:.1f} ms"],
        ["lazy load: ready (VM could start)", f"{ready_s * 1e3:.2f} ms"],
        ["lazy load: all pages in", f"{complete_s * 1e3:.1f} ms"],
        ["lazy load under random access: all pages in", f"{(stats.time_to_complete_s or 0) * 1e3:.1f} ms"],
        ["- random accesses during the load", f"{len(accesses)}"],
        ["- faults served by the fault loop", f"{stats.faults}"],
        ["- access latency p50 / p99", f"{lat['p50']:.1f} / {lat['p99']:.1f} us"],
        ["- pages placed by fault / by prefetch",
         f"{stats.pages_by_fault} / {stats.pages_by_prefetch}"],
        ["- double placements (must be 0)", f"{stats.double_placements}"],
        ["- pages verified / mismatched", f"{verified} / {mismatched}"],
    ]
    text = (tabulate(rows, headers=["fast snapshot load, measured just now", ""]) +
            f"\n(the first three: medians of {DEMO_ROUNDS} interleaved rounds, the file in the "
            "page cache;\n a fault on a page the prefetcher is placing just then waits for it, "
            "so faults can\n outnumber the pages placed by fault)\n"
            f"\nThe guest could have started {eager_s / max(ready_s, 1e-9):.0f}x sooner: every "
            "page was usable at once, a touched page\narrived in one fault, and the "
            "prefetcher brought the rest in behind it.")
    return Outcome(text, status=1 if mismatched or stats.double_placements else 0)


# ---------------------------------------------------------------------- plumbing

def _snapshot_arg(sp: argparse.ArgumentParser, *, offset: bool = True) -> None:
    sp.add_argument("snapshot", metavar="IMAGE",
                    help="a mapped-ram snapshot or an ELF core file")
    if offset:
        sp.add_argument("--offset", type=parse_size, default=0,
                        help="mapped-ram: where the stream starts in the file "
                             "(migrate file:PATH,offset=N)")
    else:
        sp.set_defaults(offset=0)


def _inspect_arguments(sp: argparse.ArgumentParser) -> None:
    _snapshot_arg(sp)
    sp.add_argument("--json", action="store_true", help="print everything as JSON")
    sp.add_argument("--against", action="append", default=[], metavar="OTHER.ws",
                    help="for a working set (FILE.ws): its Jaccard index with this "
                         "recording (repeatable)")


def _load_arguments(sp: argparse.ArgumentParser) -> None:
    _snapshot_arg(sp)
    sp.add_argument("--mode", choices=("lazy", "eager"), default="lazy",
                    help="lazy: userfaultfd, ready at once (default); eager: read every "
                         "page first, as QEMU 10 does")
    sp.add_argument("--server", choices=SERVERS, default=None,
                    help="where the fault loop runs: thread (default), process, or "
                         "interpreter (an own-GIL subinterpreter, Python 3.13+); lazy only")
    sp.add_argument("--no-prefetch", action="store_true",
                    help="no background prefetch: pages arrive only when touched (the "
                         "load then completes only if the workload touches every page)")
    sp.add_argument("--access", default="none",
                    help="the workload during the load: none (default), seq, random or "
                         "hot:FRACTION (random within that fraction of the pages)")
    sp.add_argument("--touch", type=non_negative_int, default=0, metavar="N",
                    help="accesses per thread (default: every page for seq, 10000 otherwise)")
    sp.add_argument("--threads", type=positive_int, default=1, metavar="N",
                    help="accessing threads (default 1)")
    sp.add_argument("--server-cpu", type=cpu, default=None, metavar="CPU",
                    help="pin the fault loop")
    sp.add_argument("--access-cpu", type=cpu, default=None, metavar="CPU",
                    help="pin the accessing threads")
    sp.add_argument("--busy-poll", action="store_true", help="spin instead of poll()")
    sp.add_argument("--populate-source", action="store_true",
                    help="map the file's data pages ahead of the copies (reads the whole "
                         "file's data even with --no-prefetch)")
    sp.add_argument("--prefetch-threads", type=positive_int, default=None, metavar="N",
                    help="parallel prefetch threads (default: 2 on 2+ CPUs)")
    sp.add_argument("--prefetch-chunk", type=chunk_size, default=None, metavar="SIZE",
                    help="bytes per prefetch ioctl (default 2M; smaller: a fault on a page "
                         "being prefetched waits less, the load takes longer)")
    sp.add_argument("--huge-pages", action="store_true",
                    help="hugetlbfs guest memory, whole 2 MiB pages per fault "
                         "(needs /proc/sys/vm/nr_hugepages)")
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
    _snapshot_arg(sp)
    sp.add_argument("block", metavar="REGION", help="a RAMBlock or ELF segment name (see inspect)")
    sp.add_argument("-o", "--output", required=True, metavar="FILE",
                    help="the region's bytes (sparse; written under a temporary name)")
    sp.add_argument("--mode", choices=("lazy", "eager"), default="lazy",
                    help="lazy: userfaultfd (default); eager: read every page first")
    sp.add_argument("--server", choices=SERVERS, default=None,
                    help="where the fault loop runs: thread (default), process, or "
                         "interpreter (an own-GIL subinterpreter, Python 3.13+); lazy only")
    sp.add_argument("--huge-pages", action="store_true", help="hugetlbfs guest memory")


def _bench_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("snapshot", metavar="SNAP", help="a mapped-ram snapshot or an ELF core")
    sp.add_argument("--rounds", type=positive_int, default=3, metavar="N",
                    help="rounds of each load, interleaved; medians are shown (default 3)")
    sp.add_argument("--touch", type=non_negative_int, default=2000, metavar="N",
                    help="random accesses during each lazy load (default 2000)")
    sp.add_argument("--no-qemu", action="store_true",
                    help="leave out QEMU's own load (no qemu-system-x86_64 needed)")
    sp.add_argument("--qemu-args", default=None, metavar="ARGS",
                    help="QEMU arguments recreating the saved machine, one string "
                         "(e.g. \"-machine pc -m 1G -cpu max\"); -machine none snapshots "
                         "need none")
    sp.add_argument("--resume", action="store_true",
                    help="instead: QEMU's own load vs uffdpy resume of a real guest, each with "
                         "a fresh QEMU (needs --qemu-args; see scripts/bench_resume.py)")
    sp.add_argument("--request", default="GET 0 4", metavar="TEXT",
                    help="with --resume: the request sent on the guest's second serial port "
                         "as soon as it runs ('' for none; default 'GET 0 4'). The bench adds "
                         "that port itself (-chardev socket + -serial, after your "
                         "--qemu-args): give the console's -serial only")
    sp.add_argument("--contenders", default=None, metavar="LIST",
                    help="with --resume: a comma-separated subset of qemu, resume, "
                         "resume-preempt, resume-ws, resume-ws-before, map, map-ws "
                         "(default all)")
    sp.add_argument("--cold", action="store_true",
                    help="with --resume: evict the snapshot from the page cache before "
                         "every contender (posix_fadvise DONTNEED)")
    sp.add_argument("--clones", type=positive_int, default=None, metavar="N",
                    help="with --resume: instead, N guests started at once from the snapshot, "
                         "mapped (--map) against loaded by QEMU: time until all answered, "
                         "their summed Pss")
    sp.add_argument("--hot", type=hot_fraction, default=None, metavar="F",
                    help="instead: the working-set benchmark: --touch accesses within a "
                         "fraction F of the pages, eager vs lazy vs lazy replaying a "
                         "recording of the same workload")
    sp.add_argument("--json", action="store_true", help="print the results as JSON")


def _convert_arguments(sp: argparse.ArgumentParser) -> None:
    _snapshot_arg(sp, offset=False)
    sp.add_argument("-o", "--output", required=True, metavar="SNAP",
                    help="the mapped-ram snapshot to write (under a temporary name)")
    sp.add_argument("--layout", choices=("ram", "regions"), default="ram",
                    help="ram: one 'ram' block by guest-physical address, as QEMU "
                         "-machine none has (default); regions: one block per segment")
    sp.add_argument("--ram-size", type=parse_size, default=None,
                    help="length of the 'ram' block (default: end of the last segment, "
                         "rounded up to a MiB)")


def _make_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("output", metavar="OUT", help="the snapshot file to write")
    sp.add_argument("--size", type=page_size_multiple, default=256 << 20, metavar="SIZE",
                    help="RAM size, a multiple of 4 KiB (default 256M)")
    sp.add_argument("--fill", type=fraction, default=0.4, metavar="F",
                    help="fraction of pages that hold data, 0 to 1 (default 0.4)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the contents (default 0)")


def _demo_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--size", type=page_size_multiple, default=256 << 20, metavar="SIZE",
                    help="the synthetic guest's RAM (default 256M)")


@dataclasses.dataclass(frozen=True)
class Command:
    """One ``uffdpy`` command: its name, ``add_parser``'s keywords, its arguments, what runs it."""

    name: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Outcome]
    parser: Dict[str, Any]


#: The commands, in ``uffdpy --help`` order (``ws`` and ``plot`` come from ``cli_ws``).
COMMANDS: Tuple[Command, ...] = (
    Command("inspect", _inspect_arguments, cmd_inspect, dict(
        help="show RAMBlocks and device sections, ELF segments and notes, or a working set")),
    Command("load", _load_arguments, cmd_load, dict(
        help="load a snapshot, run an access workload, print stats")),
    Command("dump", _dump_arguments, cmd_dump, dict(
        help="write one region's memory, read through the loader")),
    Command("resume", resume_arguments, cmd_resume, dict(
        help="run a real guest at once: serve a snapshot as a postcopy source to QEMU",
        usage="uffdpy resume SNAP (--qmp SOCK | --connect ADDR | -- QEMU ARGS...) [options]",
        description="Resume a mapped-ram snapshot into an unmodified QEMU 10, one of two "
                    "ways. The stream (default): uffdpy plays the source of a postcopy "
                    "migration, the guest runs at once and its RAM streams in behind it; "
                    "afterwards the VM owns all its RAM and no longer needs the file (use it "
                    "when the snapshot lives on another host or may change). --map: QEMU "
                    "maps the snapshot file itself as guest RAM, copy-on-write, and uffdpy "
                    "sends only the device state: the guest runs at full speed in "
                    "milliseconds and clones of one snapshot share every page none of them "
                    "wrote (use it for a local file and many clones; the file must stay "
                    "unchanged while any of them runs). Give --qmp (a destination you "
                    "started with -incoming defer; with --map also with the arguments of "
                    "'uffdpy qemu-args SNAP --map'), --connect (one that already listens; "
                    "the stream only), or the QEMU command after -- (uffdpy starts it, adds "
                    "what --map needs, and leaves it running).",
        epilog="examples: uffdpy resume vm.img -- qemu-system-x86_64 -machine pc -m 1G "
               "-accel tcg -nodefaults -display none -serial null; the same with "
               "'resume vm.img --map --' maps the file instead")),
    Command("qemu-args", qemu_args_arguments, cmd_qemu_args, dict(
        help="print the QEMU arguments a destination of SNAP needs (--map: its RAM mapped)",
        description="Print, shell-quoted on one line, what a destination for SNAP needs "
                    "besides the VM's own arguments. With --map: a memory-backend-file "
                    "object mapping each RAM block of the snapshot private and read-only, "
                    "and -machine memory-backend= for the machine's RAM, so that "
                    "'qemu-system-x86_64 ... $(uffdpy qemu-args vm.img --map) -incoming "
                    "defer -qmp unix:q.sock,server=on,wait=off' then 'uffdpy resume vm.img "
                    "--map --qmp q.sock' works. A NUMA guest's -numa node,memdev=ID names "
                    "these objects in place of its own memory-backend-ram ones.")),
    Command("bench", _bench_arguments, cmd_bench, dict(
        help="eager vs lazy vs QEMU's own load, side by side")),
    Command("convert", _convert_arguments, cmd_convert, dict(
        help="write an ELF memory dump as a mapped-ram snapshot")),
    Command("make", _make_arguments, cmd_make, dict(
        help="write a synthetic snapshot for -machine none")),
    Command("demo", _demo_arguments, cmd_demo, dict(
        help="make, load lazily under random access, explain")),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uffdpy", description=(
        "Lazy loading of QEMU mapped-ram snapshots and ELF memory images with userfaultfd."))
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    # --debug after the subcommand too; SUPPRESS keeps a top-level --debug
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_parser = sub.add_parser

    commands: Dict[str, argparse.ArgumentParser] = {}

    def add_command(name: str, **kw: Any) -> argparse.ArgumentParser:
        commands[name] = add_parser(name, parents=[common], **kw)
        return commands[name]

    sub.add_parser = add_command  # type: ignore[method-assign]
    for command in COMMANDS:
        sp = sub.add_parser(command.name, **command.parser)
        command.arguments(sp)
        sp.set_defaults(func=command.run)

    from .cli_ws import add_parsers
    add_parsers(sub)                    # ws inspect, ws merge, plot
    p.set_defaults(_commands=commands)  # each command's own parser, for its usage errors
    return p


def _one_line(exc: BaseException) -> str:
    from .pagesource import ImageError
    if isinstance(exc, ImageError):
        what = exc.what
        if exc.expected is not None or exc.actual is not None:
            what += f": expected {exc.expected}, got {exc.actual}"
        if exc.hint:
            what += f"; {exc.hint}"
        where = f" (offset {exc.offset})" if exc.offset is not None else ""
        return f"{exc.path}: {what}{where}"
    if isinstance(exc, OSError) and exc.filename and not str(exc).startswith(str(exc.filename)):
        return f"{exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, OSError) and exc.strerror and str(exc).startswith("[Errno"):
        return exc.strerror                   # the message, without Python's errno prefix
    return str(exc) or type(exc).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    # everything after the first "--" is a QEMU command line (resume), never options of ours
    qemu_cmd: List[str] = []
    if "--" in words:
        cut = words.index("--")
        words, qemu_cmd = words[:cut], words[cut + 1:]
    args, extra = parser.parse_known_args(words)
    own = args._commands.get(args.command, parser)     # errors with the command's own usage
    if extra and args.command == "resume":
        own.error(f"unexpected arguments {' '.join(extra)!r}: a QEMU command goes after --, "
                  "as in: uffdpy resume SNAP -- qemu-system-x86_64 ARGS...")
    if extra:
        own.error(f"unrecognized arguments: {' '.join(extra)}")
    if hasattr(args, "qemu"):
        args.qemu = qemu_cmd
    elif qemu_cmd:
        own.error("unexpected arguments after -- (only resume takes a QEMU command)")
    if getattr(args, "mode", None) == "eager":
        given = [opt for opt, dest, default in _LAZY_ONLY
                 if getattr(args, dest, default) not in (default, None)]
        if given:
            own.error(f"{', '.join(given)} applies to --mode lazy only")
    if hasattr(args, "server") and args.server is None:
        args.server = "thread"
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        outcome = args.func(args)
        print(outcome.render(getattr(args, "json", False)))
        sys.stdout.flush()                  # a closed pipe shows here, not at exit
        return outcome.status
    except BrokenPipeError:
        # The reader went away (``uffdpy inspect X | head``): stop quietly, as
        # a tool killed by SIGPIPE would, and keep the interpreter's final
        # flush of stdout from complaining (Python's documented pattern).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt as exc:      # Ctrl-C, and SIGTERM as _Terminated
        if exc.args and isinstance(exc.args[0], str):
            print(f"uffdpy: {printable(exc.args[0])}", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(exc, _Terminated) else 130
    except MemoryError:
        if args.debug:
            traceback.print_exc()
        print(f"uffdpy: error: out of memory in {args.command}", file=sys.stderr)
        return 2
    except (UffdpyError, ValueError, OSError) as exc:
        # uffdpy's own errors, bad values and the system's: one line.  Anything
        # else (a TypeError, a KeyError, a RuntimeError) is a bug in uffdpy and
        # shows its traceback.
        if args.debug:
            traceback.print_exc()
        msg = _one_line(exc)
        print(f"uffdpy: error: {printable(msg)}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


#: options of ``load``/``dump`` that only a lazy load has: (option, dest, default)
_LAZY_ONLY = (("--server", "server", None), ("--no-prefetch", "no_prefetch", False),
              ("--server-cpu", "server_cpu", None), ("--busy-poll", "busy_poll", False),
              ("--populate-source", "populate_source", False),
              ("--prefetch-threads", "prefetch_threads", None),
              ("--prefetch-chunk", "prefetch_chunk", None), ("--huge-pages", "huge_pages", False),
              ("--record-ws", "record_ws", None), ("--working-set", "working_set", None))


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every ``finally`` cleans up."""


def _terminated(signum: int, frame: Any) -> None:
    raise _Terminated()
