"""Resume benchmark: QEMU's own load of a snapshot against ``uffdpy resume``, on a real guest.

Every contender gets a fresh destination QEMU (``QEMU ARGS -incoming
defer``), and the contenders are interleaved round by round, each round
starting one contender later, so that a noisy shared machine hurts each the
same.  Per contender and round:

* **QEMU's own load**: ``migrate-incoming file:SNAP`` with mapped-ram, then
  ``cont`` on the ``completed`` event.  Time zero is the ``migrate-incoming``
  call; running is the RESUME event, completed the MIGRATION event.
* **resume** (and **resume without preempt**, every answer on the main
  channel): :class:`uffdpy.resume.Resume`
  against the destination's QMP socket.  Time zero is the call of
  ``Resume()`` (capabilities, ``migrate-incoming`` and the connect
  included); running and completed are QEMU's events, as above.

* **resume, the command**: ``python -m uffdpy resume SNAP --qmp SOCK
  --json`` in a process of its own, time zero its spawn: what a user waits
  for, Python's start, the imports and the fork of the stream's server
  included.

* **map** (and **map + warm-up**): :class:`uffdpy.resume.MapResume`: the
  destination gets ``uffdpy qemu-args SNAP --map`` (guest RAM mapped
  copy-on-write from the snapshot file) and uffdpy sends the device state;
  the warm-up reads the recorded working set into the page cache.

With ``cold`` the snapshot is evicted from the page cache
(``posix_fadvise(DONTNEED)``) before every contender, so each reads it from
the disk.  After each contender's answer and completion, the QEMU process's
memory is read from ``/proc/PID/smaps_rollup``: ``Private_Clean +
Private_Dirty`` (what this guest alone holds; a page-cache page only this
QEMU maps counts too) and ``Anonymous`` (its own copies: for a mapped guest,
the pages it wrote).  :func:`run_clone_bench` starts N guests at once, mapped
or loaded by QEMU, and sums their ``Pss``.

"running ms" is the guest's RESUME event counted from the connect (resume) or
from ``migrate-incoming`` (QEMU), "running from start" from time zero above
(for resume it adds the QMP set-up: capabilities, ``info ramblock``,
``migrate-incoming``), "connect from start" the stream's connect counted from
time zero.

With ``request`` (the request-serving guest of ``scripts/linux_guest.py``)
a request is sent on the guest's second serial port as soon as the guest
runs, and the time from time zero to its answer is measured, along with the
page requests the resume had served by then.  QEMU's event timestamps
(CLOCK_REALTIME) are compared with ``time.time()``.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from tabulate import tabulate

from ..qemu import Qemu
from ..qmp import QmpClient
from ..resume import QemuProcess, Resume
from ..resume.destination import event_time

__all__ = ["run_resume_bench", "run_clone_bench", "CONTENDERS", "evict", "memory"]

CONTENDERS = ("qemu", "resume", "resume-command", "resume-no-preempt", "resume-no-splice",
              "resume-ws", "resume-ws-before", "map", "map-ws")
LABELS = {"qemu": "QEMU's own load (mapped-ram)", "resume": "uffdpy resume",
          "resume-command": "uffdpy resume, the command",
          "resume-no-preempt": "uffdpy resume --no-preempt",
          "resume-no-splice": "uffdpy resume --no-splice",
          "resume-ws": "uffdpy resume --working-set (after RUN)",
          "resume-ws-before": "uffdpy resume --working-set (before RUN)",
          "map": "uffdpy resume --map",
          "map-ws": "uffdpy resume --map --working-set (warm-up)"}
#: the contenders that need a recording (made once, before the rounds, not counted)
WS_CONTENDERS = ("resume-ws", "resume-ws-before", "map-ws")


def evict(path: str) -> None:
    """Drop ``path``'s pages from the page cache (those no process maps)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def memory(pid: int) -> Dict[str, int]:
    """``Private_Clean + Private_Dirty``, ``Anonymous`` and ``Pss`` of ``pid``, in bytes."""
    fields: Dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[-2]) * 1024
    return {"private": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
            "anon": fields.get("Anonymous", 0), "pss": fields.get("Pss", 0)}


def _map_argv(snapshot: str, argv: List[str]) -> List[str]:
    from ..mappedram import Snapshot
    from ..resume.mapped import map_qemu_command
    with Snapshot.open(snapshot) as snap:
        return map_qemu_command(argv, snap)


def _request_args(path: str) -> List[str]:
    from .linuxguest import request_port_args
    return request_port_args(path)


def _ask(path: str, request: str, timeout: float) -> str:
    """The guest's answer to ``request`` on its request port (says what it waited for)."""
    from .linuxguest import ask_line
    return ask_line(path, request, timeout=timeout)


def _qemu_own(snapshot: str, argv: List[str], req: Optional[str], request: str,
              timeout: float) -> Dict[str, Any]:
    proc = QemuProcess(argv, paused=False, timeout=timeout)
    try:
        with QmpClient(proc.qmp_path, timeout=timeout) as qmp:
            qmp.call("migrate-set-capabilities", capabilities=[
                {"capability": "mapped-ram", "state": True},
                {"capability": "events", "state": True}])
            t0 = time.time()
            qmp.call("migrate-incoming", uri=f"file:{os.path.abspath(snapshot)}")
            done = qmp.wait_event("MIGRATION", timeout=timeout,
                                  match=lambda e: e["data"]["status"] in ("completed", "failed"))
            if done["data"]["status"] != "completed":
                raise RuntimeError(f"QEMU's own load failed: {proc.last_error()}")
            since = len(qmp.events)
            if qmp.call("query-status")["status"] != "running":     # saved paused: cont
                qmp.call("cont")
                since_ = since
            else:                        # a snapshot without globalstate runs at once
                since_ = 0
            running = event_time(qmp.wait_event("RESUME", since=since_, timeout=timeout)) - t0
            out: Dict[str, Any] = {"running": running, "time_to_running_s": running,
                                   "completed": event_time(done) - t0}
            if req is not None:
                answer = _ask(req, request, timeout)
                out["answer"] = time.time() - t0
                out["answer_text"] = answer
            out.update(memory(proc.pid))
            return out
    finally:
        proc.kill()


def _map(snapshot: str, argv: List[str], req: Optional[str], request: str, timeout: float,
         working_set: Optional[str] = None) -> Dict[str, Any]:
    from ..resume.mapped import MapResume
    proc = QemuProcess(_map_argv(snapshot, argv), paused=True, timeout=timeout)
    try:
        t0 = time.time()
        with MapResume(snapshot, qmp=proc.qmp_path, working_set=working_set,
                       timeout=timeout) as r:
            out: Dict[str, Any] = {}
            if req is not None:
                answer = _ask(req, request, timeout)
                out["answer"] = time.time() - t0
                out["answer_text"] = answer
            r.wait_warm(timeout * 4)
            stats = r.wait()
        out.update({
            "connect": r.connected_at - t0,
            "running": (stats.time_to_running_s or 0) + (r.connected_at - t0),
            "time_to_running_s": stats.time_to_running_s,
            "completed": (stats.time_to_complete_s or 0) + (r.connected_at - t0),
            "bytes_sent": stats.bytes_sent,
        })
        out.update(memory(proc.pid))
        return out
    finally:
        proc.kill()


def _stream_figures(stats: Dict[str, Any], connect: float) -> Dict[str, Any]:
    """A stream contender's figures from its stats (``ResumeStats.as_dict()``, or the
    command's JSON), the connect ``connect`` seconds after time zero."""
    return {"connect": connect, "time_to_running_s": stats["time_to_running_s"],
            "page_requests": stats["page_requests"],
            "p50_us": stats["request_service_us"]["p50"],
            "p99_us": stats["request_service_us"]["p99"],
            "source_cpu_s": stats["source_cpu_s"]}


def _resume(snapshot: str, argv: List[str], req: Optional[str], request: str, timeout: float,
            preempt: Optional[bool] = None, **options: Any) -> Dict[str, Any]:
    proc = QemuProcess(argv, paused=False, timeout=timeout)
    try:
        t0 = time.time()
        background = options.pop("background", True)
        with Resume(snapshot, qmp=proc.qmp_path, preempt=preempt, timeout=timeout,
                    background=background, **options) as r:
            running = r.running_after(timeout)
            out: Dict[str, Any] = {}
            if req is not None:
                answer = _ask(req, request, timeout)
                out["answer"] = time.time() - t0
                out["answer_text"] = answer
                out["requests_before_answer"] = r.stats.page_requests
            if not background:
                r.start_background()
            stats = r.wait(timeout * 4)
        out.update(memory(proc.pid))
        out.update(_stream_figures(stats.as_dict(), r.connected_at - t0))
        out.update({
            "running": None if running is None else running + (r.connected_at - t0),
            "completed": (stats.time_to_complete_s or 0) + (r.connected_at - t0),
        })
        return out
    finally:
        proc.kill()


def _resume_command(snapshot: str, argv: List[str], req: Optional[str], request: str,
                    timeout: float) -> Dict[str, Any]:
    # a second monitor, ours, to see the guest run: a request sent to a guest that does
    # not run yet loses its first bytes in the serial port
    proc = Qemu(argv, incoming="defer", qmp_sockets=2, timeout=timeout)
    watch = QmpClient(proc.qmp_paths[1], timeout=timeout, session=False)
    try:
        t0 = time.time()
        command = subprocess.Popen(
            [sys.executable, "-m", "uffdpy", "resume", os.path.abspath(snapshot), "--qmp",
             proc.qmp_path, "--json", "--timeout", f"{timeout:g}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out: Dict[str, Any] = {}
            if req is not None:
                watch.wait_event("RESUME", timeout=timeout)
                answer = _ask(req, request, timeout)
                out["answer"] = time.time() - t0
                out["answer_text"] = answer
            stdout, stderr = command.communicate(timeout=timeout * 4)
        finally:
            if command.poll() is None:
                command.kill()
                command.communicate()
        if command.returncode != 0:
            raise RuntimeError(f"uffdpy resume exited with {command.returncode}: "
                               f"{stderr.strip()}")
        stats = json.loads(stdout)
        connect = stats["connected_at"] - t0
        out.update(memory(proc.pid))
        out.update(_stream_figures(stats, connect))
        out.update({
            "running": stats["time_to_running_s"] + connect,
            "completed": stats["time_to_complete_s"] + connect,
        })
        return out
    finally:
        watch.close()
        proc.kill()


def run_resume_bench(snapshot: str, qemu_args: Sequence[str], *, rounds: int = 5,
                     qemu: str = "qemu-system-x86_64", request: Optional[str] = "GET 0 4",
                     contenders: Sequence[str] = CONTENDERS, timeout: float = 60.0,
                     cold: bool = False,
                     log: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """Run the interleaved rounds; return ``{"rows": {...}, "table": str, "rounds": [...]}``.

    ``qemu_args`` recreate the saved machine (serial backends included); with
    ``request`` the request port is added as the next serial port and the
    request is sent as soon as the guest runs.  ``cold``: the snapshot is
    evicted from the page cache before every contender.
    """
    if not request:          # a working set is recorded from the guest's answer to a request
        contenders = [c for c in contenders if c not in WS_CONTENDERS]
    tmp = tempfile.mkdtemp(prefix="uffdpy-bench-resume-")
    req = os.path.join(tmp, "req.sock") if request else None
    argv = [qemu, *qemu_args] + (_request_args(req) if req else [])
    results: Dict[str, List[Dict[str, Any]]] = {c: [] for c in contenders}
    answers = set()
    ws_path = os.path.join(tmp, "recorded.ws")
    try:
        if any(c in WS_CONTENDERS for c in contenders):
            # the recording: pure demand (no stream, no fault-around), as REAP records
            if req and os.path.exists(req):
                os.unlink(req)
            rec = _resume(snapshot, argv, req, request or "", timeout, background=False,
                          fault_around_pages=0, record_ws=ws_path)
            log(f"recorded a working set: {rec.get('page_requests')} page requests")
        for rnd in range(rounds + 1):                       # round 0 warms up, not counted
            order = list(contenders[rnd % len(contenders):]) + list(
                contenders[:rnd % len(contenders)])
            for name in order:
                if req and os.path.exists(req):
                    os.unlink(req)
                if cold:
                    evict(snapshot)
                if name == "qemu":
                    res = _qemu_own(snapshot, argv, req, request or "", timeout)
                elif name == "map":
                    res = _map(snapshot, argv, req, request or "", timeout)
                elif name == "map-ws":
                    res = _map(snapshot, argv, req, request or "", timeout, working_set=ws_path)
                elif name == "resume-command":
                    res = _resume_command(snapshot, argv, req, request or "", timeout)
                elif name in WS_CONTENDERS:
                    res = _resume(snapshot, argv, req, request or "", timeout,
                                  working_set=ws_path,
                                  ws_placement="before-run" if name.endswith("before")
                                  else "after-run")
                else:
                    res = _resume(snapshot, argv, req, request or "", timeout,
                                  preempt=False if name == "resume-no-preempt" else None,
                                  splice=name != "resume-no-splice")
                if "answer_text" in res:
                    answers.add(res["answer_text"])
                log(f"round {rnd} {name}: " + ", ".join(
                    f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in res.items() if k != "answer_text"))
                if rnd:
                    results[name].append(res)
    finally:
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)
    if len(answers) > 1:
        raise RuntimeError(f"the guest's answers differ between contenders: {sorted(answers)}")

    def med(name: str, key: str) -> Optional[float]:
        xs = [r[key] for r in results[name] if r.get(key) is not None]
        return statistics.median(xs) if xs else None

    rows = {name: {key: med(name, key) for key in
                   ("connect", "running", "answer", "completed", "page_requests",
                    "requests_before_answer", "p50_us", "p99_us", "time_to_running_s",
                    "private", "anon", "source_cpu_s")}
            for name in contenders}
    base = rows.get("qemu", {})

    def ms_(v: Optional[float]) -> str:
        return "-" if v is None else f"{v * 1e3:.1f}"

    def mb(v: Optional[float]) -> str:
        return "-" if v is None else f"{v / 1e6:.0f}"

    def ratio(v: Optional[float], key: str) -> str:
        b = base.get(key)
        return "-" if v is None or not b else f"{v / b:.2f}x"

    table = tabulate(
        [[LABELS[n], ms_(r["time_to_running_s"]), ratio(r["time_to_running_s"], "running"),
          ms_(r["connect"]), ms_(r["running"]),
          ms_(r["answer"]), ratio(r["answer"], "answer"),
          ms_(None if r["answer"] is None or r["running"] is None
              else r["answer"] - r["running"]),
          ms_(r["completed"]), ratio(r["completed"], "completed"),
          "-" if r["page_requests"] is None else f"{r['page_requests']:.0f}",
          "-" if r["requests_before_answer"] is None else f"{r['requests_before_answer']:.0f}",
          "-" if r["p50_us"] is None else f"{r['p50_us']:.0f}",
          "-" if r["p99_us"] is None else f"{r['p99_us']:.0f}",
          mb(r["private"]), mb(r["anon"]),
          "-" if r["source_cpu_s"] is None else f"{r['source_cpu_s']:.3f}"]
         for n, r in rows.items()],
        headers=["contender", "running ms", "vs QEMU", "connect from start ms",
                 "running from start ms", "answer ms",
                 "vs QEMU", "answer after running ms", "completed ms", "vs QEMU", "page requests",
                 "requests before answer", "service p50 us", "service p99 us",
                 "private MB", "anon MB", "source CPU s"])
    if cold:
        table += "\n(cold: the snapshot evicted from the page cache before every contender)"
    return {"rows": rows, "table": table, "rounds": results, "answers": sorted(answers)}


def _start_clones(snapshot: str, mode: str, qemu: str, qemu_args: Sequence[str], n: int,
                  tmp: str, request: Optional[str], timeout: float
                  ) -> Tuple[List[QemuProcess], List[Optional[str]]]:
    procs: List[QemuProcess] = []
    reqs: List[Optional[str]] = []
    for i in range(n):
        req = os.path.join(tmp, f"req{i}.sock") if request else None
        argv = [qemu, *qemu_args] + (_request_args(req) if req else [])
        if mode == "map":
            argv = _map_argv(snapshot, argv)
        procs.append(QemuProcess(argv, paused=True, timeout=timeout))
        reqs.append(req)
    return procs, reqs


def _clone_round(snapshot: str, mode: str, qemu: str, qemu_args: Sequence[str], n: int,
                 request: Optional[str], timeout: float) -> Dict[str, Any]:
    """N guests of one snapshot, started at once; when all answered; their Pss summed."""
    from ..resume.mapped import MapResume
    tmp = tempfile.mkdtemp(prefix="uffdpy-clones-")
    procs: List[QemuProcess] = []
    try:
        procs, reqs = _start_clones(snapshot, mode, qemu, qemu_args, n, tmp, request, timeout)
        answers: List[Optional[str]] = [None] * n
        errors: List[BaseException] = []

        def one(i: int) -> None:
            try:
                if mode == "map":
                    MapResume(snapshot, qmp=procs[i].qmp_path, timeout=timeout).close()
                else:
                    with QmpClient(procs[i].qmp_path, timeout=timeout) as qmp:
                        qmp.call("migrate-set-capabilities", capabilities=[
                            {"capability": "mapped-ram", "state": True},
                            {"capability": "events", "state": True}])
                        qmp.call("migrate-incoming", uri=f"file:{os.path.abspath(snapshot)}")
                        qmp.wait_event("MIGRATION", timeout=timeout,
                                       match=lambda e: e["data"]["status"] == "completed")
                        if qmp.call("query-status")["status"] != "running":
                            qmp.call("cont")
                req = reqs[i]
                if req is not None and request:
                    answers[i] = _ask(req, request, timeout)
            except BaseException as e:          # re-raised below, after every thread ended
                errors.append(e)

        t0 = time.monotonic()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout * 4)
        all_answered = time.monotonic() - t0
        if errors:
            raise errors[0]
        mem = [memory(p.pid) for p in procs]
        return {"all_answered": all_answered, "answers": answers,
                "pss": sum(m["pss"] for m in mem), "anon": sum(m["anon"] for m in mem)}
    finally:
        for p in procs:
            p.kill()
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)


def run_clone_bench(snapshot: str, qemu_args: Sequence[str], *, clones: int, rounds: int = 3,
                    qemu: str = "qemu-system-x86_64", request: Optional[str] = "GET 0 4",
                    timeout: float = 120.0,
                    log: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """``clones`` guests at once, mapped (``map``) against loaded by QEMU (``qemu``), interleaved.

    Returns ``{"rows": {...}, "table": str, "rounds": [...]}``: per mode the
    median time until every guest answered, the summed Pss and Anonymous
    bytes, and the Pss against one guest loaded by QEMU.
    """
    modes = ("map", "qemu")
    results: Dict[str, List[Dict[str, Any]]] = {m: [] for m in modes}
    answers: Set[str] = set()
    for rnd in range(rounds):
        for mode in (modes if rnd % 2 == 0 else modes[::-1]):
            res = _clone_round(snapshot, mode, qemu, qemu_args, clones, request, timeout)
            answers.update(a for a in res["answers"] if a is not None)
            log(f"round {rnd} {mode} x{clones}: all answered {res['all_answered']:.3f}s, "
                f"Pss {res['pss'] / 1e6:.0f} MB, anon {res['anon'] / 1e6:.0f} MB")
            results[mode].append(res)
    if len(answers) > 1:
        raise RuntimeError(f"the guests' answers differ: {sorted(answers)}")

    def med(mode: str, key: str) -> float:
        return float(statistics.median(r[key] for r in results[mode]))

    rows = {m: {"all_answered": med(m, "all_answered"), "pss": med(m, "pss"),
                "anon": med(m, "anon")} for m in modes}
    one_qemu = rows["qemu"]["pss"] / clones
    labels = {"map": f"{clones} x uffdpy resume --map", "qemu": f"{clones} x QEMU's own load"}
    table = tabulate(
        [[labels[m], f"{r['all_answered'] * 1e3:.0f}", f"{r['pss'] / 1e6:.0f}",
          f"{r['pss'] / clones / 1e6:.0f}", f"{r['anon'] / 1e6:.0f}",
          f"{r['pss'] / one_qemu:.2f}x"] for m, r in rows.items()],
        headers=["guests started at once", "all answered ms", "total Pss MB",
                 "Pss per guest MB", "total anon MB", "vs one guest QEMU loaded"])
    return {"rows": rows, "table": table, "rounds": results, "answers": sorted(answers)}
