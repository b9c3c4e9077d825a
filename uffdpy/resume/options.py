"""``ResumeOptions``: how a postcopy resume streams, validated once, as data.

One frozen value carries every knob of the stream: :class:`~.postcopy.Resume`
takes it (or the same names as keywords), :class:`~.supervise.SupervisedResume`
hands it to each server it forks, and the command line registers its flags
from here (:meth:`ResumeOptions.add_argument`, in the order its ``--help``
shows them) and reads them back once (:meth:`ResumeOptions.from_args`).  A
bad value is a ``ValueError`` when the value is made, before anything is
connected; each flag, default and check is written here alone.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, Optional, Tuple

from ..argtypes import non_negative_float, non_negative_int, positive_float, positive_int
from ..record import Record

__all__ = ["ResumeOptions", "DEFAULT_BATCH_PAGES", "PREEMPT_BATCH_PAGES", "DEFAULT_FAULT_AROUND",
           "DEFAULT_DEMAND_YIELD_MS", "RECORD_IDLE_S"]

#: data pages per background PART section: small, so a request waits behind little
DEFAULT_BATCH_PAGES = 32
#: the same with preempt, where no answer waits behind a batch: fewer turns of the
#: loop (the 1 GiB guest: the serving thread's user time 0.056 -> 0.027 s); 127 so
#: that a section (a header and a page each, and its two frames: 256 buffers) fills
#: the spliced main channel's pipe of 1 MiB in one call (128 took two: 0.16 s of
#: source CPU for the 1 GiB guest against 0.12 s)
PREEMPT_BATCH_PAGES = 127
#: the aligned window (4 KiB pages, 256 KiB) whose other pages go right behind a
#: requested one, after it first, then before it: the guest's next reads, either way
DEFAULT_FAULT_AROUND = 64
#: the background stream pauses this long after each request, so that on few
#: CPUs the guest's demand (its vCPU, QEMU's placing thread, our answers) is not
#: slowed by streaming (measured on 2 CPUs: the answer to a request 0.45 -> 0.29 s)
DEFAULT_DEMAND_YIELD_MS = 2.0
#: with --record-ws alone the stream starts once the guest asked for nothing this long
RECORD_IDLE_S = 1.0


class ResumeOptions(Record, frozen=True):
    """How the postcopy stream runs; validated when made.

    ``transport`` (``unix``, ``tcp``, ``fd``): how uffdpy's private
    ``migrate-incoming`` address is reached, with ``qmp``.  ``background``
    off serves requests only (the load then never completes unless
    ``Resume.start_background`` is called); ``background_delay`` seconds of
    pure demand paging come first; ``background_idle``: the stream starts
    once no page has been requested for that many seconds (for recording a
    guest's whole demand); ``preempt`` sends requested pages, and the pages
    around them, on QEMU's postcopy-preempt channel, a second connection,
    so that an answer never waits behind the stream (``None``, the default:
    on when uffdpy sets the destination up itself, over ``qmp`` and not on
    an fd; see :meth:`preempt_over`); ``recover`` resumes a destination left
    ``postcopy-paused`` by a dead source (needs ``qmp``; preempt is then as
    the destination has it, ``preempt`` only if it does not answer); ``batch_pages``
    data pages per background section (default :meth:`batch_for`);
    ``fault_around_pages``: the
    aligned window of that many 4 KiB pages around a requested one, whose
    other pages go with it (those after it first, data and empty);
    ``demand_yield_ms``:
    the background stream pauses that long after each request;
    ``working_set`` (a file of :mod:`uffdpy.workingset`) is sent first,
    after RUN (``ws_placement="after-run"``) or as precopy pages before it
    (``"before-run"``); ``record_ws`` writes the pages demanded, in order, at
    completion; ``trace`` keeps, in ``Resume.trace``, when each page was
    sent and why; ``timeout`` bounds each wait on QMP and the connect;
    ``stall_timeout`` (default: ``timeout``, at least 1 s) the time the load
    may make no progress; ``splice``: the background stream's pages, and those
    around a requested one, go from the file's page cache into the socket by
    ``vmsplice``/``splice``, never copied by uffdpy (off: copied by
    ``sendmsg``, as a requested page always is).
    """

    transport: str = "unix"
    background: bool = True
    background_delay: float = 0.0
    background_idle: Optional[float] = None
    preempt: Optional[bool] = None
    recover: bool = False
    batch_pages: Optional[int] = None
    fault_around_pages: int = DEFAULT_FAULT_AROUND
    demand_yield_ms: float = DEFAULT_DEMAND_YIELD_MS
    working_set: Optional[str] = None
    ws_placement: str = "after-run"
    record_ws: Optional[str] = None
    trace: bool = False
    timeout: float = 30.0
    stall_timeout: Optional[float] = None
    splice: bool = True

    def _check(self) -> None:
        for name in ("background", "recover", "trace", "splice"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, not {getattr(self, name)!r}")
        if self.preempt is not None and not isinstance(self.preempt, bool):
            raise ValueError(f"preempt must be True, False or None (the default), "
                             f"not {self.preempt!r}")
        if self.transport not in ("unix", "tcp", "fd"):
            raise ValueError(f"transport must be unix, tcp or fd, not {self.transport!r}")
        if self.demand_yield_ms < 0:
            raise ValueError(f"demand_yield_ms must be >= 0, not {self.demand_yield_ms}")
        if self.fault_around_pages < 0:
            raise ValueError(f"fault_around_pages must be >= 0, not {self.fault_around_pages}")
        if self.ws_placement not in ("after-run", "before-run"):
            raise ValueError("ws_placement must be after-run or before-run, "
                             f"not {self.ws_placement!r}")
        if self.working_set is not None and self.recover:
            raise ValueError("a working set applies to a fresh resume, not to --recover")
        if self.batch_pages is not None and self.batch_pages < 1:
            raise ValueError(f"batch_pages must be >= 1, not {self.batch_pages}")
        if self.background_delay < 0:
            raise ValueError(f"background_delay must be >= 0, not {self.background_delay}")
        if self.background_idle is not None and (self.background_idle < 0
                                                 or self.background_delay):
            raise ValueError("background_idle is >= 0 seconds, and not with background_delay")
        if self.stall_timeout is not None and self.stall_timeout <= 0:
            raise ValueError(f"stall_timeout must be > 0, not {self.stall_timeout}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0, not {self.timeout}")

    def preempt_over(self, transport: str) -> bool:
        """Whether a stream to a destination uffdpy sets up itself, on
        ``transport``, uses postcopy-preempt: as asked, else on unless the
        transport is an fd (one connection, no second to open).

        Measured on the 1 GiB guest: request service p99 71 us with it, 174
        us without (an answer on the main channel waits behind the stream);
        see ``docs/benchmarks.md``.
        """
        if self.preempt is not None:
            return self.preempt
        return transport != "fd"

    def batch_for(self, preempt: bool) -> int:
        """Data pages per background section: as asked, else
        :data:`DEFAULT_BATCH_PAGES`, or :data:`PREEMPT_BATCH_PAGES` with preempt."""
        if self.batch_pages is not None:
            return self.batch_pages
        return PREEMPT_BATCH_PAGES if preempt else DEFAULT_BATCH_PAGES

    def for_recovery(self) -> "ResumeOptions":
        """The same for a server that finishes a paused load: what shaped the first
        moments (the working set, the delays) is past."""
        return self.replace(recover=True, working_set=None, ws_placement="after-run",
                            background_delay=0.0, background_idle=None)

    # -- the command line

    @staticmethod
    def add_argument(parser: argparse.ArgumentParser, flag: str) -> None:
        """Add one of the stream's flags (:data:`FLAGS`) to ``parser``."""
        _, default, kwargs = FLAGS[flag]
        parser.add_argument(flag, default=default, **kwargs)

    @classmethod
    def given_flags(cls, args: argparse.Namespace) -> Tuple[str, ...]:
        """The stream's flags given a value other than their default (for
        the forms of ``resume`` that have no stream)."""
        given = []
        for flag, (dest, default, _) in FLAGS.items():
            value = getattr(args, dest, default)
            if flag in _SHARED_WITH_MAP or value in (default, None):
                continue
            given.append(f"--no-{flag[2:]}" if value is False else flag)
        return tuple(given)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ResumeOptions":
        """From the parsed flags of ``uffdpy resume``.

        ``--record-ws`` alone records the guest's whole demand: no
        fault-around, and the stream held back until the guest has been idle
        :data:`RECORD_IDLE_S` (:meth:`records_whole_demand` says so).
        """
        fault_around = (DEFAULT_FAULT_AROUND if args.fault_around is None
                        else args.fault_around)
        background_idle = None
        if cls.records_whole_demand(args):
            fault_around, background_idle = 0, RECORD_IDLE_S
        return cls(transport=args.transport, background=not args.no_background,
                   background_delay=args.background_delay or 0.0,
                   background_idle=background_idle, preempt=args.preempt,
                   recover=args.recover, batch_pages=args.batch_pages,
                   fault_around_pages=fault_around, demand_yield_ms=args.demand_yield_ms,
                   working_set=args.working_set, ws_placement=args.ws_placement,
                   record_ws=args.record_ws, trace=args.trace, timeout=args.timeout,
                   splice=not args.no_splice)

    @staticmethod
    def records_whole_demand(args: argparse.Namespace) -> bool:
        """``--record-ws`` without a flag that sends pages ahead of the guest."""
        return bool(args.record_ws and args.fault_around is None
                    and args.background_delay is None and not args.no_background)


#: the stream's flags: flag -> (dest, default, argparse keywords); the defaults
#: that depend on other flags (--fault-around, --background-delay) are None here
FLAGS: Dict[str, Tuple[str, Any, Dict[str, Any]]] = {
    "--no-background": ("no_background", False, dict(
        action="store_true",
        help="serve page requests only, never stream (the load completes only when the "
             "guest has asked for every data page; Ctrl-C leaves the destination "
             "postcopy-paused, for --recover)")),
    "--background-delay": ("background_delay", None, dict(
        type=non_negative_float, metavar="S",
        help="serve requests only for the first S seconds, then stream (default 0; with "
             f"--record-ws alone: until the guest has been idle {RECORD_IDLE_S:g} s)")),
    "--preempt": ("preempt", None, dict(
        action=argparse.BooleanOptionalAction,
        help="send requested pages on QEMU's postcopy-preempt channel, a second connection, "
             "so that an answer never waits behind the stream (default: on, except with "
             "--transport fd or --connect)")),
    "--recover": ("recover", False, dict(
        action="store_true",
        help="with --qmp: finish a load whose source died (postcopy-paused)")),
    "--batch-pages": ("batch_pages", None, dict(
        type=positive_int, metavar="N",
        help=f"data pages per background section (default {DEFAULT_BATCH_PAGES}; "
             f"{PREEMPT_BATCH_PAGES} with preempt, where no answer waits behind one)")),
    "--no-splice": ("no_splice", False, dict(
        action="store_true",
        help="copy the background stream's pages, and those around a requested one, "
             "into the socket instead of splicing them from the page cache (more of "
             "uffdpy's CPU; for comparison)")),
    "--fault-around": ("fault_around", None, dict(
        type=non_negative_int, metavar="N",
        help=f"the other pages of the aligned window of N pages around each "
             f"requested page go right behind it, data and empty (default "
             f"{DEFAULT_FAULT_AROUND}, 256 KiB; 0 with --record-ws alone)")),
    "--demand-yield-ms": ("demand_yield_ms", DEFAULT_DEMAND_YIELD_MS, dict(
        type=non_negative_float, metavar="MS",
        help=f"the background stream pauses this long after each request (default "
             f"{DEFAULT_DEMAND_YIELD_MS:g}; 0: never)")),
    "--timeout": ("timeout", 30.0, dict(
        type=positive_float, metavar="S",
        help="bound on each QMP call and connection (default 30)")),
    "--record-ws": ("record_ws", None, dict(
        metavar="FILE.ws",
        help="write the pages the guest requested, in order of first request; alone, it "
             "records the guest's whole demand: no fault-around, and the stream held back "
             f"until the guest has been idle {RECORD_IDLE_S:g} s (it says so on stderr)")),
    "--working-set": ("working_set", None, dict(
        metavar="FILE.ws",
        help="send these recorded pages first, then the rest in file order (with --map: "
             "read them into the page cache first)")),
    "--ws-placement": ("ws_placement", "after-run", dict(
        choices=("after-run", "before-run"),
        help="send the working set right after RUN (default) or as precopy pages before it")),
    "--trace": ("trace", False, dict(
        action="store_true",
        help="with --json: keep when each page was sent and why (for uffdpy plot)")),
}

#: flags that --map reads too
_SHARED_WITH_MAP = ("--working-set", "--timeout")
