"""``uffdpy bench``: eager vs lazy vs QEMU's own load, working sets, and resume against QEMU's load."""
from __future__ import annotations

import argparse
from typing import Tuple

from ..outcome import Outcome
from .args import Command, hot_fraction, non_negative_int, positive_int

__all__ = ["COMMANDS"]


def cmd_bench(args: argparse.Namespace) -> Outcome:
    import shlex
    if args.resume:
        from ..harness.bench_resume import run_resume_bench
        if not args.qemu_args:
            raise ValueError("bench --resume needs --qemu-args recreating the saved machine")
        if args.clones:
            from ..harness.bench_resume import run_clone_bench
            out = run_clone_bench(args.snapshot, shlex.split(args.qemu_args),
                                  clones=args.clones, rounds=args.rounds,
                                  request=args.request or None)
            return Outcome(out["table"], {"rows": out["rows"], "rounds": out["rounds"]})
        from ..harness.bench_resume import CONTENDERS
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
        from ..harness.bench_ws import run_ws_bench
        out = run_ws_bench(args.snapshot, fraction=args.hot, touches=args.touch,
                           rounds=args.rounds)
        return Outcome(out["table"], {"rows": out["rows"], "rounds": out["rounds"],
                                      "recorded_pages": out["recorded_pages"]})
    from ..harness.bench import run_bench
    out = run_bench(args.snapshot, rounds=args.rounds, touches=args.touch,
                    qemu=not args.no_qemu,
                    qemu_args=shlex.split(args.qemu_args) if args.qemu_args else None)
    return Outcome(out["table"], out["data"])


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
                         "resume-command (the command in a process of its own), "
                         "resume-no-preempt, resume-no-splice, resume-ws, resume-ws-before, "
                         "map, map-ws "
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


#: this module's commands, in ``uffdpy --help`` order
COMMANDS: Tuple[Command, ...] = (
    Command("bench", _bench_arguments, cmd_bench, dict(
        help="eager vs lazy vs QEMU's own load, side by side")),
)
