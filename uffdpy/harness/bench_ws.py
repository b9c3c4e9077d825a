"""The working-set benchmark of the loader: a hot-set workload with and without a recording.

``uffdpy bench IMAGE --hot F`` (and ``run_ws_bench``): the workload is
``--touch N`` random accesses within a fraction F of the pages (the same
addresses every time: one seed), run from one thread as soon as the load is
ready.  Contenders, interleaved round by round:

* **eager**: every page read first (QEMU 10's way), then the workload;
* **lazy**: the thread server with its prefetcher, no recording;
* **lazy + working set**: the same, replaying a recording made once, before
  the rounds, by the same workload under pure demand paging (prefetch off:
  REAP's recording).

For each: time to ready, time until the workload has finished (what a
function restored from a snapshot would call its answer), faults taken by
the workload, and time until every page is in.  Medians of the rounds.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any, Callable, Dict, List, Tuple

from tabulate import tabulate

from ..loader import EagerLoader, LazyLoader
from ..pagesource import open_image
from ..workingset import WorkingSet
from .workload import run_access

__all__ = ["run_ws_bench"]


def run_ws_bench(path: str, *, fraction: float, touches: int, rounds: int,
                 seed: int = 5) -> Dict[str, Any]:
    """Measure the three contenders ``rounds`` times, interleaved; returns rows and a table."""
    with open_image(path) as snap, tempfile.TemporaryDirectory(prefix="uffdpy-ws-") as tmp:
        ws = os.path.join(tmp, "hot.ws")

        def workload(loader: Any) -> float:
            blocks = [(loader.address(r.name), r) for r in snap.regions]
            run_access(blocks, pattern="hot", fraction=fraction, touches=touches, seed=seed)
            return time.perf_counter()

        with LazyLoader(snap, prefetch=False, record_ws=ws) as rec:   # the recording
            workload(rec)

        # loaded and checked once, as a harness restoring again and again would
        recording = WorkingSet.load(ws)

        def lazy(replay: bool) -> Callable[[], Dict[str, float]]:
            def run() -> Dict[str, float]:
                t0 = time.perf_counter()
                with LazyLoader(snap, working_set=recording if replay else None) as ld:
                    done = workload(ld)
                    faults = ld.stats.faults
                    ld.wait(600)
                    st = ld.stats
                    return {"ready_s": st.time_to_ready_s, "answer_s": done - t0,
                            "faults": faults, "complete_s": st.time_to_complete_s or 0.0}
            return run

        def eager() -> Dict[str, float]:
            t0 = time.perf_counter()
            with EagerLoader(snap) as ld:
                done = workload(ld)
                return {"ready_s": ld.stats.time_to_ready_s, "answer_s": done - t0,
                        "faults": 0, "complete_s": ld.stats.time_to_complete_s or 0.0}

        contenders: List[Tuple[str, Callable[[], Dict[str, float]]]] = [
            ("eager: read every page, then the workload", eager),
            ("lazy (thread server, prefetch)", lazy(False)),
            ("lazy + working set (recorded once, replayed)", lazy(True)),
        ]
        samples: Dict[str, List[Dict[str, float]]] = {name: [] for name, _ in contenders}
        for _ in range(rounds):
            for name, run in contenders:
                samples[name].append(run())
    medians: List[Dict[str, float]] = []
    for name, _ in contenders:
        medians.append({k: statistics.median(s[k] for s in samples[name])
                        for k in samples[name][0]})
    base = medians[1]

    def ms(v: float) -> str:
        return f"{v * 1e3:.1f} ms"
    table = tabulate(
        [[name, f"{m['ready_s'] * 1e3:.2f} ms", ms(m["answer_s"]),
          f"{m['answer_s'] / base['answer_s']:.2f}x", int(m["faults"]), ms(m["complete_s"])]
         for (name, _), m in zip(contenders, medians)],
        headers=["", "ready", "workload done", "vs lazy", "faults", "all pages in"])
    note = (f"{touches} accesses within {fraction:g} of the pages (seed {seed}), "
            f"medians of {rounds} interleaved rounds; the recording holds {len(recording.pages)} pages")
    rows = [{"contender": name, **m} for (name, _), m in zip(contenders, medians)]
    return {"rows": rows, "table": table + "\n" + note, "recorded_pages": len(recording.pages),
            "rounds": rounds}
