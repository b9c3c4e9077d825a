"""``uffdpy bench SNAP``: eager vs lazy vs QEMU's own load of one snapshot, side by side.

All figures come from one run.  The contenders are interleaved round by round
(eager, lazy thread, lazy process, lazy under random access, QEMU, then again)
so that a noisy shared machine hurts each the same; the table shows the median
of the rounds and ratios against the eager load and QEMU's load.  The snapshot
file is read through the page cache by everyone (after the first round it is
warm for all); ``--cold`` drops the page cache before every measurement.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

from tabulate import tabulate

from .loader import EagerLoader, LazyLoader
from .pagesource import PageSource, open_image
from .qmp import QmpClient
from .workload import latency_summary, run_access

__all__ = ["run_bench", "qemu_load_seconds"]


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
    tmp = tempfile.mkdtemp(prefix="uffdpy-qemu-")
    sock = os.path.join(tmp, "qmp.sock")
    log_path = os.path.join(tmp, "qemu.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([binary, "-nodefaults", "-display", "none", *qemu_args,
                                 "-incoming", "defer", "-qmp", f"unix:{sock},server=on,wait=off"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        with QmpClient(sock, timeout=timeout) as qmp:
            qmp.call("migrate-set-capabilities",
                     capabilities=[{"capability": "mapped-ram", "state": True}])
            t0 = time.perf_counter()
            qmp.call("migrate-incoming", uri=f"file:{os.path.abspath(snapshot_path)}")
            deadline = time.monotonic() + timeout
            while True:
                status = qmp.call("query-migrate").get("status")
                if status == "completed":
                    return time.perf_counter() - t0
                if status == "failed":
                    raise RuntimeError("migration status 'failed'")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"QEMU's migrate-incoming of {snapshot_path} did not "
                                       f"complete within {timeout:g}s")
                time.sleep(0.0005)
    except (RuntimeError, ConnectionError) as exc:   # QmpError is a RuntimeError
        proc.kill()
        proc.wait(10)
        with open(log_path, "rb") as f:
            said = " ".join(f.read().decode(errors="replace").split())[-400:]
        raise RuntimeError(f"QEMU ({' '.join(qemu_args)}) could not load {snapshot_path}: "
                           f"{exc}; QEMU said: {said or 'nothing'}") from exc
    finally:
        proc.kill()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def _qemu_args_for(snap: PageSource) -> Optional[List[str]]:
    """QEMU arguments that recreate the snapshot's machine, when that is known."""
    if snap.format != "mapped-ram":
        return None
    blocks = snap.regions
    if getattr(snap, "machine", None) == "none" and [b.name for b in blocks] == ["ram"]:
        return ["-machine", "none", "-m", f"{blocks[0].length >> 20}M"]
    return None


def run_bench(path: str, *, rounds: int = 3, touches: int = 2000, qemu: bool = True,
              as_json: bool = False, cold: bool = False,
              qemu_args: Optional[List[str]] = None) -> int:
    """Measure every contender ``rounds`` times, interleaved; print one table."""
    ncpu = len(os.sched_getaffinity(0))
    other = 1 if ncpu > 1 else 0
    samples: Dict[str, List[Dict[str, float]]] = {}

    def lazy(server: str, access: bool, server_cpu: Optional[int] = None,
             busy: bool = False, lanes: Optional[int] = None) -> Callable[[PageSource], Dict[str, float]]:
        def run(snap: PageSource) -> Dict[str, float]:
            with LazyLoader(snap, server=server, server_cpu=server_cpu, busy_poll=busy,
                            prefetch_threads=lanes) as ld:
                out: Dict[str, float] = {}
                if access:
                    blocks = [(ld.address(b.name), b) for b in snap.regions]
                    lat = latency_summary(run_access(blocks, pattern="random", touches=touches,
                                                     cpu=0))
                    out.update(access_p50_us=lat["p50"], access_p99_us=lat["p99"])
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
        ("lazy, thread server, prefetch only, 1 prefetch thread", lazy("thread", False, lanes=1)),
        ("lazy, process server, prefetch only, 1 prefetch thread",
         lazy("process", False, lanes=1)),
        ("lazy thread + random access, loop on toucher's CPU", lazy("thread", True, 0)),
        ("lazy thread + random access, loop on other CPU", lazy("thread", True, other)),
        ("lazy thread + random access, other CPU, busy-poll", lazy("thread", True, other, True)),
        ("lazy process + random access, loop on toucher's CPU", lazy("process", True, 0)),
        ("lazy process + random access, other CPU", lazy("process", True, other)),
    ]
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
        for _ in range(rounds):
            for name, fn in contenders:
                if cold:
                    _drop_caches()
                samples.setdefault(name, []).append(fn(snap))
        data_mib = sum(b.present_pages * b.page_size for b in snap.regions) / (1 << 20)
        size_mib = sum(b.length for b in snap.regions) / (1 << 20)

    med: Dict[str, Dict[str, float]] = {
        name: {k: statistics.median(s[k] for s in runs) for k in runs[0]}
        for name, runs in samples.items()}
    eager_total = med[contenders[0][0]]["complete_s"]
    qemu_total = med.get("QEMU 10 migrate-incoming (mapped-ram)", {}).get("complete_s")
    if as_json:
        print(json.dumps({"snapshot": path, "rounds": rounds, "size_mib": size_mib,
                          "data_mib": data_mib, "results": med}, indent=2))
        return 0

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
    print(f"{path}: {size_mib:.0f} MiB of RAM, {data_mib:.0f} MiB of data; median of {rounds} "
          f"interleaved rounds; page cache {'dropped before each run' if cold else 'warm'}")
    print(tabulate(rows, headers=["contender", "ready ms", "complete ms", "complete/eager",
                                  "complete/QEMU", "QEMU/ready", "faults",
                                  "access p50/p99 us"]))
    if qemu_note:
        print(qemu_note)
    return 0
