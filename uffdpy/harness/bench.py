"""``uffdpy bench SNAP``: eager vs lazy vs QEMU's own load of one snapshot, side by side.

All figures come from one run.  The contenders are interleaved round by round
(eager, lazy thread, lazy process, lazy under random access, QEMU, then again,
each round starting one contender later) so that a noisy shared machine hurts
each the same; the first table shows the
median of the rounds and ratios against the eager load and QEMU's load.  The
snapshot file is read through the page cache by everyone (after the first
round it is warm for all); ``--cold`` drops the page cache before every
measurement.

The second table is fault service alone: prefetch off, the toucher (pinned
to CPU 0) reads distinct random pages, so every access is a fault, and the
p50 access latency is split by what served it (``UFFDIO_COPY`` of a data
page, ``UFFDIO_ZEROPAGE`` of a zero page), for each server and placement of
the fault loop.  With a ``reference`` (``scripts/bench_load.py`` passes the
C comparator of ``scripts/bench_fault.py`` when a compiler is present) each
row gets the C handler's p50 in the same placement and the ratio.
"""
from __future__ import annotations

import os
import random
import shutil
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

from tabulate import tabulate

from ..loader import (HAVE_INTERPRETERS, EagerLoader, LazyLoader, prepare_interpreter_servers,
                     release_interpreter_servers)
from ..pagesource import PageSource, open_image
from ..qemu import Qemu, QemuError
from .workload import latency_summary, page_at, run_access, touch_pages

__all__ = ["run_bench", "qemu_load_seconds", "fault_service", "FaultReference",
           "PLACEMENTS"]

#: Fault-service placements: (key, label, server, loop on the other CPU,
#: busy-poll, the C comparator's placement with the same threads where).
PLACEMENTS: List[Tuple[str, str, str, bool, bool, str]] = [
    ("same", "thread server, loop on toucher's CPU", "thread", False, False, "same"),
    ("poll", "thread server, other CPU, poll", "thread", True, False, "poll"),
    ("busy", "thread server, other CPU, busy-poll", "thread", True, True, "busy"),
    ("proc-same", "process server, loop on toucher's CPU", "process", False, False,
     "proc-same"),
    ("proc-poll", "process server, other CPU, poll", "process", True, False, "proc-poll"),
    ("proc-busy", "process server, other CPU, busy-poll", "process", True, True, "proc-busy"),
] + ([
    ("interp-same", "interpreter server, loop on toucher's CPU", "interpreter", False, False,
     "same"),
    ("interp-poll", "interpreter server, other CPU, poll", "interpreter", True, False, "poll"),
    ("interp-busy", "interpreter server, other CPU, busy-poll", "interpreter", True, True,
     "busy"),
] if HAVE_INTERPRETERS else [])


class FaultReference(Protocol):
    """Fault latency of a reference handler (the C comparator): p50 in µs, or None.

    ``faults`` distinct random pages of a region of ``region_pages`` pages
    (the snapshot's size), served with ``op`` ("copy" or "zeropage") in
    ``placement`` (see ``PLACEMENTS``).
    """

    def __call__(self, op: str, placement: str, faults: int,
                 region_pages: int) -> Optional[float]: ...


def _prepare_server(server: str) -> None:
    """Outside the timing: make an interpreter server, or destroy idle ones before a fork.

    Otherwise a process load after an interpreter load would pay, in its
    time to ready, for destroying the idle subinterpreter before it forks.
    """
    if server == "interpreter":
        prepare_interpreter_servers(1)
    elif server == "process":
        release_interpreter_servers()


#: With ``populate_source``, the fault-service toucher starts this long after
#: ready: the populator maps ~10 GB/s of file here, so it is done by then.
POPULATE_SETTLE_S = 1.0


def fault_service(snap: PageSource, server: str, server_cpu: int, busy: bool,
                  touches: int, seed: int = 7, populate: bool = False) -> Dict[str, float]:
    """Prefetch off; touch ``touches`` distinct random pages from CPU 0, every one a fault.

    Returns the p50 access latency (µs, timed in the toucher) of data pages
    and of zero pages, and the faults the loader counted.  With ``populate``
    the loader maps the file's data pages first (``populate_source``) and the
    toucher waits ``POPULATE_SETTLE_S`` for it: a data fault's copy then finds
    its source mapped, as a C handler copying from resident memory does.
    """
    _prepare_server(server)
    with LazyLoader(snap, server=server, server_cpu=server_cpu, busy_poll=busy,
                    prefetch=False, populate_source=populate) as ld:
        if populate:
            time.sleep(POPULATE_SETTLE_S)
        spans = [(ld.address(r.name), r) for r in snap.regions]
        total = sum(r.pages for _, r in spans)
        picks = random.Random(seed).sample(range(total), min(touches, total))
        pages = [page_at(spans, k) for k in picks]
        present = [region.is_present(i) for _, region, i in pages]
        lat = touch_pages([address for address, _, _ in pages], cpu=0)
        data = [t for t, p in zip(lat, present) if p]
        zero = [t for t, p in zip(lat, present) if not p]
        ld.close()
        # (a kind of page never touched has no figure: shown as 0)
        return {"data_p50_us": latency_summary(data)["p50"] or 0.0,
                "zero_p50_us": latency_summary(zero)["p50"] or 0.0,
                "data_pages": len(data), "zero_pages": len(zero),
                "faults": ld.stats.faults}


def _drop_caches() -> None:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def qemu_load_seconds(snapshot_path: str, qemu_args: List[str], *,
                      binary: str = "qemu-system-x86_64", timeout: float = 120.0) -> float:
    """Seconds QEMU takes from ``migrate-incoming`` to status ``completed``.

    Raises:
        RuntimeError: QEMU reported a failed migration or a QMP error.
        TimeoutError: QEMU did not finish within ``timeout`` seconds.
    """
    try:
        vm = Qemu([binary, "-nodefaults", "-display", "none", *qemu_args], incoming="defer",
                  timeout=timeout)
    except QemuError as exc:
        raise RuntimeError(f"QEMU ({' '.join(qemu_args)}) could not start: {exc}") from None
    try:
        with vm.connect(timeout=timeout) as qmp:
            qmp.call("migrate-set-capabilities",
                     capabilities=[{"capability": "mapped-ram", "state": True}])
            t0 = time.perf_counter()
            qmp.call("migrate-incoming", uri=f"file:{os.path.abspath(snapshot_path)}")
            qmp.wait_migration(timeout=timeout, poll=0.0005)
            return time.perf_counter() - t0
    except (RuntimeError, ConnectionError) as exc:   # QmpError is a RuntimeError
        time.sleep(0.05)                              # let QEMU finish writing its error
        said = " ".join(vm.output().split())[-400:]
        vm.kill()
        raise RuntimeError(f"QEMU ({' '.join(qemu_args)}) could not load {snapshot_path}: "
                           f"{exc}; QEMU said: {said or 'nothing'}") from exc
    finally:
        vm.kill()


def _qemu_args_for(snap: PageSource) -> Optional[List[str]]:
    """QEMU arguments that recreate the snapshot's machine, when that is known."""
    if snap.format != "mapped-ram":
        return None
    blocks = snap.regions
    if getattr(snap, "machine", None) == "none" and [b.name for b in blocks] == ["ram"]:
        return ["-machine", "none", "-m", f"{blocks[0].length >> 20}M"]
    return None


def run_bench(path: str, *, rounds: int = 3, touches: int = 2000, qemu: bool = True,
              cold: bool = False,
              qemu_args: Optional[List[str]] = None,
              reference: Optional[FaultReference] = None,
              reference_name: str = "C") -> Dict[str, Any]:
    """Measure every contender ``rounds`` times, interleaved.

    Returns ``{"data": ..., "table": ...}``: the medians (what ``--json``
    prints) and the two tables as text.
    """
    ncpu = len(os.sched_getaffinity(0))
    other = 1 if ncpu > 1 else 0
    samples: Dict[str, List[Dict[str, float]]] = {}

    def lazy(server: str, access: bool, server_cpu: Optional[int] = None,
             busy: bool = False, lanes: Optional[int] = None) -> Callable[[PageSource], Dict[str, float]]:
        def run(snap: PageSource) -> Dict[str, float]:
            _prepare_server(server)
            with LazyLoader(snap, server=server, server_cpu=server_cpu, busy_poll=busy,
                            prefetch_threads=lanes) as ld:
                out: Dict[str, float] = {}
                if access:
                    blocks = [(ld.address(b.name), b) for b in snap.regions]
                    lat = latency_summary(run_access(blocks, pattern="random", touches=touches,
                                                     cpu=0))
                    out.update(access_p50_us=lat["p50"] or 0.0, access_p99_us=lat["p99"] or 0.0)
                ld.wait()
                st = ld.stats
                out.update(ready_s=st.time_to_ready_s, complete_s=st.time_to_complete_s or 0.0,
                           faults=st.faults)
                return out
        return run

    def eager(snap: PageSource) -> Dict[str, float]:
        with EagerLoader(snap) as ld:
            return {"ready_s": ld.stats.time_to_ready_s,
                    "complete_s": ld.stats.time_to_complete_s or 0.0}

    contenders: List[Tuple[str, Callable[[PageSource], Dict[str, float]]]] = [
        ("eager (QEMU-style pread, THP)", eager),
        ("lazy, thread server, prefetch only", lazy("thread", False)),
        ("lazy, process server, prefetch only", lazy("process", False)),
    ] + ([
        ("lazy, interpreter server, prefetch only", lazy("interpreter", False)),
    ] if HAVE_INTERPRETERS else []) + [
        ("lazy, thread server, prefetch only, 1 prefetch thread", lazy("thread", False, lanes=1)),
        ("lazy, process server, prefetch only, 1 prefetch thread",
         lazy("process", False, lanes=1)),
        ("lazy thread + random access, loop on toucher's CPU", lazy("thread", True, 0)),
        ("lazy thread + random access, loop on other CPU", lazy("thread", True, other)),
        ("lazy process + random access, loop on toucher's CPU", lazy("process", True, 0)),
        ("lazy process + random access, other CPU", lazy("process", True, other)),
    ] + ([
        ("lazy interpreter + random access, loop on toucher's CPU",
         lazy("interpreter", True, 0)),
        ("lazy interpreter + random access, other CPU", lazy("interpreter", True, other)),
    ] if HAVE_INTERPRETERS else [])
    with open_image(path) as snap:
        q_args = qemu_args or _qemu_args_for(snap)
        binary = shutil.which("qemu-system-x86_64")
        qemu_note = ""
        if qemu and binary and q_args:
            contenders.append(("QEMU 10 migrate-incoming (mapped-ram)",
                               lambda s: {"complete_s": qemu_load_seconds(path, q_args or [],
                                                                          binary=binary or "")}))
        elif qemu:
            qemu_note = ("QEMU's own load not measured: " +
                         ("qemu-system-x86_64 not found" if not binary else
                          "QEMU loads mapped-ram files only" if snap.format != "mapped-ram"
                          else f"machine {getattr(snap, 'machine', '?')!r} needs --qemu-args"))
        faults: Dict[str, List[Dict[str, float]]] = {}
        total_pages = sum(r.length // 4096 for r in snap.regions)
        c_p50: Dict[Tuple[str, str], List[float]] = {}
        for round_ in range(rounds):
            # Each round starts one contender later.  On this kind of VM the
            # first big allocation after a big free (QEMU's 1 GiB exiting) is
            # several times slower (freed memory goes back to the host): a
            # fixed order would hand that cost to the same contender every
            # round (measured: eager 840-960 ms after QEMU, 160-300 ms else).
            start = round_ % len(contenders)
            for name, fn in contenders[start:] + contenders[:start]:
                if cold:
                    _drop_caches()
                samples.setdefault(name, []).append(fn(snap))
            for key, _, server, on_other, busy, c_key in PLACEMENTS:
                cpu = other if on_other else 0
                figures = fault_service(snap, server, cpu, busy, touches, seed=7 + round_)
                populated = fault_service(snap, server, cpu, busy, touches, seed=7 + round_,
                                          populate=True)
                figures["data_populated_p50_us"] = populated["data_p50_us"]
                faults.setdefault(key, []).append(figures)
                for op in ("copy", "zeropage"):
                    value = (reference(op, c_key, touches, total_pages)
                             if reference else None)
                    if value is not None:
                        c_p50.setdefault((key, op), []).append(value)
        data_mib = sum(b.present_pages * b.page_size for b in snap.regions) / (1 << 20)
        size_mib = sum(b.length for b in snap.regions) / (1 << 20)

    med: Dict[str, Dict[str, float]] = {
        name: {k: statistics.median(s[k] for s in runs) for k in runs[0]}
        for name, runs in samples.items()}
    eager_total = med[contenders[0][0]]["complete_s"]
    qemu_total = med.get("QEMU 10 migrate-incoming (mapped-ram)", {}).get("complete_s")
    fmed = {key: {k: statistics.median(s[k] for s in runs) for k in runs[0]}
            for key, runs in faults.items()}
    cmed = {f"{key}/{op}": statistics.median(v) for (key, op), v in c_p50.items()}
    data = {"snapshot": path, "rounds": rounds, "size_mib": size_mib, "data_mib": data_mib,
            "results": med, "fault_service": fmed, "reference": cmed,
            "reference_name": reference_name}

    def ms(v: Optional[float]) -> str:
        return "" if v is None else f"{v * 1e3:.2f}"

    rows = []
    for name, _ in contenders:
        m = med[name]
        ready = m.get("ready_s")
        complete = m.get("complete_s")
        rows.append([
            name, ms(ready), ms(complete),
            f"{complete / eager_total:.2f}" if complete else "",
            f"{complete / qemu_total:.2f}" if complete and qemu_total else "",
            f"{qemu_total / ready:.0f}x" if ready and qemu_total else "",
            int(m["faults"]) if "faults" in m else "",
            f"{m['access_p50_us']:.0f} / {m['access_p99_us']:.0f}" if "access_p50_us" in m else "",
        ])
    headers = ["contender", "ready ms", "complete ms", "complete/eager", "complete/QEMU",
               "QEMU/ready", "faults", "access p50/p99 us"]
    if not qemu_total:                 # no QEMU load to compare with: no empty columns
        rows = [row[:4] + row[6:] for row in rows]
        headers = headers[:4] + headers[6:]
    lines = [f"{path}: {size_mib:.0f} MiB of RAM, {data_mib:.0f} MiB of data; median of "
             f"{rounds} interleaved rounds; page cache "
             f"{'dropped before each run' if cold else 'warm'}",
             tabulate(rows, headers=headers)]
    if qemu_note:
        lines.append(qemu_note)

    def ratio(ours: float, theirs: Optional[float]) -> str:
        return f"{ours / theirs:.2f}" if theirs else ""

    frows = []
    for key, label, *_ in PLACEMENTS:
        f = fmed[key]
        c_copy, c_zero = cmed.get(f"{key}/copy"), cmed.get(f"{key}/zeropage")
        frows.append([label, int(f["faults"]),
                      f"{f['data_p50_us']:.1f}", f"{c_copy:.1f}" if c_copy else "",
                      ratio(f["data_p50_us"], c_copy),
                      f"{f['data_populated_p50_us']:.1f}",
                      ratio(f["data_populated_p50_us"], c_copy),
                      f"{f['zero_p50_us']:.1f}", f"{c_zero:.1f}" if c_zero else "",
                      ratio(f["zero_p50_us"], c_zero)])
    r = reference_name
    headers = ["fault loop", "faults", "data p50", f"{r} COPY p50", f"/{r}", "populated",
               f"/{r}", "zero p50", f"{r} ZEROPAGE p50", f"/{r}"]
    if reference:
        against = f"; {r}: the reference handler in the same placement"
    else:                          # no comparator: no empty columns
        keep = [0, 1, 2, 5, 7]
        frows = [[row[i] for i in keep] for row in frows]
        headers = [headers[i] for i in keep]
        against = ("; python3 scripts/bench_load.py adds a C handler's figures (it builds "
                   "benchmarks/fault_handler.c)")
    lines += ["",
              f"fault service, prefetch off: {touches} distinct random pages touched from CPU 0, "
              f"each a fault; access p50 in µs timed in the toucher; 'populated': "
              f"populate_source=True, touched {POPULATE_SETTLE_S:.0f} s after ready" + against,
              tabulate(frows, headers=headers)]
    return {"data": data, "table": "\n".join(lines)}
