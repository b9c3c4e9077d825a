"""The resume commands of ``uffdpy``: ``resume`` (the stream or ``--map``) and ``qemu-args``.

The argument functions and the functions that run them live here, side by
side, and :data:`COMMANDS` names them for :mod:`.app`.  A resume into a QEMU that uffdpy starts (the ``--`` form) ends with
that QEMU running and its directory removed when it exits, or, on failure,
with QEMU stopped and its own last error line in the one-line message.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from .args import Command, Progress, human, open_source, sniff, tabulate
from ..needs import needs_line
from ..resume.options import RECORD_IDLE_S, ResumeOptions
from ..outcome import Outcome

__all__ = ["COMMANDS"]


def _resume_table(stats: Dict[str, Any]) -> str:
    lat = stats["request_service_us"]
    rows = [
        ("guest running after", "-" if stats["time_to_running_s"] is None
         else f"{stats['time_to_running_s'] * 1e3:.1f} ms"),
        ("migration completed after", "-" if stats["time_to_complete_s"] is None
         else f"{stats['time_to_complete_s']:.3f} s"),
        ("page requests", stats["page_requests"]),
        ("pages sent on request", stats["pages_requested"]),
        ("pages streamed", stats["pages_streamed"]),
        ("pages sent around requests", stats["pages_around"]),
        ("zero pages sent", stats["zero_pages_sent"]),
        ("duplicate requests", stats["duplicate_requests"]),
        ("bytes sent", stats["bytes_sent"]),
        ("of them spliced", stats["bytes_spliced"]),
        ("request service p50/p99/max", "-" if lat["p50"] is None
         else f"{lat['p50']:.0f} / {lat['p99']:.0f} / {lat['max']:.0f} us"),
        ("source CPU", "-" if stats.get("source_cpu_s") is None
         else f"{stats['source_cpu_s']:.3f} s"),
    ]
    if stats.get("auto_recoveries"):
        rows.append(("automatic recoveries", stats["auto_recoveries"]))
    if stats["recovered"]:
        rows.append(("pages already received", stats["pages_already_received"]))
    return tabulate(rows, tablefmt="plain")


def _check_writable(path: str) -> None:
    """Refuse, before anything starts, an output file that could not be written at the end."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a file to write")
    if not os.path.isdir(directory):
        raise ValueError(f"{path}: no such directory {directory}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot write in {directory} (permission denied)")


def cmd_resume(args: argparse.Namespace) -> Outcome:
    qemu_cmd = list(args.qemu)
    forms = sum(x is not None and x != [] for x in (args.qmp, args.connect, qemu_cmd or None))
    if forms != 1:
        raise ValueError("give one of --qmp SOCK, --connect ADDR, or -- QEMU ARGS...")
    if args.map:
        return _resume_mapped(args, qemu_cmd)
    if args.warm is not None:
        raise ValueError("--warm applies to --map only (it warms the page cache of a mapped file)")
    if args.paused and not qemu_cmd and not args.map:
        raise ValueError("--paused applies to the '-- QEMU ARGS' form; with --qmp the "
                         "destination's own -S decides")
    if args.recover and args.qmp is None:
        raise ValueError("--recover needs --qmp SOCK (migrate-recover is a QMP command)")
    if args.trace and not args.json:
        raise ValueError("--trace keeps a per-page trace in the JSON: give --json too")
    if args.ws_placement != "after-run" and not args.working_set:
        raise ValueError("--ws-placement applies with --working-set FILE only")
    options = ResumeOptions.from_args(args)       # checked before QEMU starts
    # refused before QEMU starts, and kept open: the file checked is the file served
    snap = _open_snapshot(args.snapshot)
    try:
        if args.working_set is not None:           # a working set of another snapshot too
            from ..workingset import load_for
            load_for(args.working_set, snap)
        if args.record_ws:
            _check_writable(args.record_ws)
        return _resume_stream(args, options, qemu_cmd, snap)
    finally:
        snap.close()


def _resume_stream(args: argparse.Namespace, options: ResumeOptions, qemu_cmd: List[str],
                   snap: Any) -> Outcome:
    """``resume`` without ``--map``: the postcopy stream, supervised unless ``--connect``."""
    from ..resume.destination import DestinationError
    from ..resume.supervise import BeforeRun, SupervisedResume
    if ResumeOptions.records_whole_demand(args):
        print(f"uffdpy: recording the guest's whole demand: no fault-around, and the stream "
              f"waits until the guest asked for nothing for {RECORD_IDLE_S:g} s (give "
              "--fault-around or --background-delay to choose otherwise)", file=sys.stderr)
    proc: Optional[Any] = None
    if qemu_cmd:
        from ..resume.process import QemuProcess
        proc = QemuProcess(qemu_cmd, paused=args.paused, timeout=args.timeout)
    qmp = proc.qmp_path if proc is not None else args.qmp
    finished = False
    progress = Progress("resuming", not args.json)
    try:
        if proc is not None:
            try:
                info = SupervisedResume(snap, qmp=qmp, options=options,
                                        progress=progress.update, alive=proc.alive).run()
            except BeforeRun:
                # its server died before the guest ran: QEMU takes one incoming
                # migration, and ours is the only one; start it again, once
                proc.kill()
                proc = QemuProcess(qemu_cmd, paused=args.paused, timeout=args.timeout)
                info = SupervisedResume(snap, qmp=proc.qmp_path, options=options,
                                        progress=progress.update, alive=proc.alive).run()
        elif args.connect is not None:           # no QMP: nothing to recover with, one process
            from ..resume.postcopy import Resume
            with Resume(snap, connect=args.connect, options=options) as resume:
                while True:
                    try:
                        resume.wait(0.1)
                        break
                    except TimeoutError:
                        progress.update(*resume.progress())
                info = resume.report()
        else:
            info = SupervisedResume(snap, qmp=qmp, options=options,
                                    progress=progress.update).run()
        progress.finish()
        finished = True
    except (DestinationError, ConnectionError, TimeoutError) as e:
        failed, proc = proc, None
        raise _resume_error(failed, e, snap) from None
    except KeyboardInterrupt as e:
        if proc is not None:
            if e.args and isinstance(e.args[0], str):         # the guest ran: it can be saved
                e.args = (f"{e.args[0]}; the destination QEMU (pid {proc.pid}) runs on: "
                          f"to end it instead, kill -9 {proc.pid}",)
                proc.leave_running()
            else:                                             # nothing was sent: stop it
                proc.kill()
                e.args = ("interrupted before the stream began; the destination QEMU "
                          "was stopped",)
            proc = None
        raise
    finally:
        if proc is not None and not finished:
            _left_as_it_is(proc)
    if proc is not None:
        proc.leave_running()
    if args.record_ws:
        info["working_set_recorded"] = args.record_ws
    return _resumed(_resume_table, info, proc, "paused (-S)" if args.paused else "running")


#: QEMU's words for a destination made unlike the saved machine
_MISMATCH = re.compile(r"Unknown savevm section|[Ll]ength mismatch|[Ss]ize mismatch|"
                       r"Machine type received|Unknown ramblock|doesn't match")


def _with_needs(error: BaseException, snap: Any) -> BaseException:
    """A refusal that says the destination differs gets what the snapshot needs added."""
    from ..resume.destination import DestinationError
    if isinstance(error, DestinationError) and _MISMATCH.search(str(error)):
        return DestinationError(error.message, f"{error.reason}; the snapshot needs: "
                                f"{needs_line(snap)} (uffdpy inspect shows what it cannot "
                                "tell)" if error.reason else None)
    return error


def _resumed(table: Callable[[Dict[str, Any]], str], info: Dict[str, Any], proc: Any,
             state: str) -> Outcome:
    """A resume's outcome: its table, and where the QEMU uffdpy started runs."""
    if proc is not None:
        info["qemu_pid"] = proc.pid
        info["qmp_socket"] = proc.qmp_path

    def text() -> str:                  # built only when shown (not with --json)
        out = table(info)
        if proc is not None:
            out += f"\nthe VM is {state}: QEMU pid {proc.pid}, QMP socket {proc.qmp_path}"
        return out
    return Outcome(text, info)


def _resume_error(proc: Optional[Any], error: BaseException, snap: Any) -> BaseException:
    """A failed resume's one-line error: QEMU's words when uffdpy started it (it is then
    stopped), and what the snapshot needs when the destination differs."""
    return _with_needs(_own_qemu_failed(proc, error) if proc is not None else error, snap)


def _own_qemu_failed(proc: Any, error: BaseException) -> BaseException:
    """The one-line error for a resume into a QEMU uffdpy started; that QEMU is stopped.

    QEMU's own last error line is the most precise reason there is: after a
    refused stream, or when QEMU exited during start-up (a missing
    ``-display none``, a bad option) and nothing answered on its QMP socket.
    """
    from ..resume.destination import DestinationError
    time.sleep(0.05)                               # let QEMU finish writing its error
    exited = not proc.alive()
    said = proc.last_error()
    proc.kill()                                    # and its directory goes with it
    if exited and not isinstance(error, DestinationError):
        return DestinationError(f"the destination QEMU exited ({proc.proc.returncode})",
                                said or "it said nothing")
    message = error.message if isinstance(error, DestinationError) else str(error)
    if said:
        return DestinationError(message, said)
    return error


def _left_as_it_is(proc: Any) -> None:
    """After a failure: a live QEMU is left (its directory goes when it exits), a dead one
    is cleaned up."""
    if proc.alive():
        print(f"uffdpy: the destination QEMU (pid {proc.pid}) is left as it is; "
              f"QMP socket {proc.qmp_path}", file=sys.stderr)
        proc.leave_running()
    else:
        proc.kill()


def _map_table(stats: Dict[str, Any]) -> str:
    rows = [
        ("guest running after", "-" if stats["time_to_running_s"] is None
         else f"{stats['time_to_running_s'] * 1e3:.1f} ms"),
        ("device state loaded after", "-" if stats["time_to_complete_s"] is None
         else f"{stats['time_to_complete_s'] * 1e3:.1f} ms"),
        ("set-up before the connect", f"{stats['prepare_s'] * 1e3:.1f} ms"),
        ("blocks mapped", f"{', '.join(stats['blocks_mapped'])} "
                          f"({human(stats['mapped_bytes'])}, copy-on-write)"),
        ("blocks streamed", len(stats["blocks_streamed"])),
        ("pages sent", stats["pages_sent"]),
        ("stale pages zeroed", stats["stale_zero_pages"]),
        ("bytes sent", stats["bytes_sent"]),
    ]
    if stats.get("warm_pages") or stats.get("warm_error"):
        rows.append(("pages warmed", stats["warm_pages"]))
    if stats.get("warm_error"):
        rows.append(("warm-up stopped", stats["warm_error"]))
    return tabulate(rows, tablefmt="plain")


def _resume_mapped(args: argparse.Namespace, qemu_cmd: List[str]) -> Outcome:
    """``resume --map``: QEMU maps the snapshot as guest RAM; uffdpy sends the device state."""
    if args.connect is not None:
        raise ValueError("--map needs --qmp SOCK or -- QEMU ARGS: through --connect uffdpy "
                         "cannot see whether the destination's RAM maps this snapshot")
    given = ResumeOptions.given_flags(args)
    if given:
        raise ValueError(f"{', '.join(given)} applies to the postcopy stream, not to --map")
    if args.warm == "ws" and not args.working_set:
        raise ValueError("--warm ws needs --working-set FILE.ws")
    from ..resume.destination import DestinationError
    from ..resume.mapped import MapResume, map_qemu_command
    from ..resume.process import QemuProcess
    from ..workingset import load_for
    with _open_snapshot(args.snapshot) as snap:      # refused before QEMU starts
        load_for(args.working_set, snap)             # a working set of another snapshot too
        proc: Optional[Any] = None
        if qemu_cmd:
            proc = QemuProcess(map_qemu_command(qemu_cmd, snap), paused=True,
                               timeout=args.timeout)
        qmp = proc.qmp_path if proc is not None else args.qmp
        finished = False
        resume: Optional[Any] = None
        try:
            resume = MapResume(snap, qmp=qmp, paused=args.paused, transport=args.transport,
                               working_set=args.working_set, warm=args.warm,
                               timeout=args.timeout,
                               alive=proc.alive if proc is not None else None)
            progress = Progress("warming", not args.json)
            while not resume.wait_warm(0.1):
                progress.update(*resume.progress())
            progress.finish()
            finished = True
        except (DestinationError, ConnectionError, TimeoutError) as e:
            failed, proc = proc, None
            raise _resume_error(failed, e, snap) from None
        finally:
            if resume is not None:
                resume.close()
            if proc is not None and not finished:
                proc.kill()                          # a mapped VM half set up is of no use
        info = resume.report()
        if proc is not None:
            proc.leave_running()
    return _resumed(_map_table, info, proc, "paused" if args.paused else "running")


def cmd_qemu_args(args: argparse.Namespace) -> Outcome:
    import shlex
    from ..resume.mapped import map_arguments
    with _open_snapshot(args.snapshot) as snap:
        words = map_arguments(snap)
    return Outcome(" ".join(shlex.quote(w) for w in words), {"args": words})


def _open_snapshot(path: str) -> Any:
    """A mapped-ram snapshot for ``resume`` and ``qemu-args``, refused in the words
    ``inspect`` uses (a file of no known format, or an ELF core, named as such)."""
    from ..mappedram import Snapshot
    from ..pagesource import FORMATS, ImageError
    args = argparse.Namespace(snapshot=path, offset=0)
    head, _ = sniff(args)
    image = open_source(args, head)            # parsed once: the Snapshot itself
    if not isinstance(image, Snapshot):
        description = next((f.description for f in FORMATS if f.name == image.format),
                           image.format)
        image.close()
        raise ImageError(path, 0, f"this is {description}, not a QEMU mapped-ram snapshot",
                         hint="uffdpy convert writes one from a guest memory dump")
    return image


def resume_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("snapshot", metavar="SNAP", help="a QEMU mapped-ram snapshot")
    sp.set_defaults(qemu=[])     # filled by main() from the words after "--"
    sp.add_argument("--qmp", metavar="SOCK",
                    help="QMP socket of a destination started with -incoming defer")
    sp.add_argument("--connect", metavar="ADDR",
                    help="an address the destination already listens on: unix:PATH, "
                         "tcp:HOST:PORT or fd:N (its postcopy-ram capability must be on)")
    sp.add_argument("--transport", choices=("unix", "tcp", "fd"), default="unix",
                    help="with --qmp or --: how to reach the destination (default unix)")
    sp.add_argument("--map", action="store_true",
                    help="QEMU maps the snapshot file itself as guest RAM, copy-on-write, and "
                         "uffdpy sends only the device state and the firmware's pages: the "
                         "guest runs at full speed in milliseconds and clones share every page "
                         "none of them wrote (a local file that stays unchanged while any "
                         "clone runs; with --: the mapping arguments are added)")
    sp.add_argument("--warm", choices=("ws", "all"), default=None,
                    help="with --map: read the --working-set's pages (ws, the default with "
                         "--working-set) or them and then the whole file (all) into the page "
                         "cache, in the background, while the guest runs")
    sp.add_argument("--paused", action="store_true",
                    help="with --: start QEMU with -S, so the VM stays paused after resume; "
                         "with --map (any form): leave the VM paused after the load")
    for flag in ("--no-background", "--background-delay", "--preempt", "--recover",
                 "--batch-pages", "--no-splice", "--fault-around", "--demand-yield-ms",
                 "--timeout", "--record-ws", "--working-set", "--ws-placement", "--trace"):
        ResumeOptions.add_argument(sp, flag)
    sp.add_argument("--json", action="store_true", help="print the stats as JSON")


def qemu_args_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("snapshot", metavar="SNAP", help="a QEMU mapped-ram snapshot")
    sp.add_argument("--map", action="store_true", required=True,
                    help="the arguments that map the snapshot's RAM copy-on-write (required: "
                         "the only kind there is today)")
    sp.add_argument("--json", action="store_true", help="print the arguments as a JSON list")


#: this module's commands, in ``uffdpy --help`` order
COMMANDS: Tuple[Command, ...] = (
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
)
