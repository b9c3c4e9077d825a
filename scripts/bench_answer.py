#!/usr/bin/env python3
"""What answering one page request costs on this machine: uffdpy's answer, the least Python, C.

``uffdpy resume`` reports ``request_service_us``: for each page request of
the destination, the time from the source's ``recv`` of it to the return of
the ``sendmsg`` that answers it.  This script measures the same span outside
QEMU, so that the figure can be read against what the machine itself allows.

A forked fake destination asks for distinct data pages of the snapshot's
largest block, one every ``--interval-ms`` (REQ_PAGES_ID, then REQ_PAGES, as
QEMU's fault thread does), on one socket, and a thread of it drains the
answers from another (as QEMU's preempt-channel thread, asleep in ``recv``
when an answer comes: the ``sendmsg`` wakes it).  Three answerers take turns,
each round in another order, each with pages of its own:

* ``uffdpy``: :class:`uffdpy.migstream.ReturnPath` parses the requests,
  :meth:`uffdpy.resume.sender.PageSender.answer` answers them on a
  :class:`~uffdpy.resume.sender.Channel` (what the resume's loop calls;
  no fault-around);
* ``least Python``: ``struct.unpack``, ``os.pread``, ``socket.sendmsg``;
* ``C``: ``benchmarks/answer_floor.c`` (the same three calls), built into
  ``benchmarks/answer_floor.bin`` when a C compiler (``cc``) exists.

Every page the rounds will ask for is read once before them, so that no
answerer pays a first touch of the page cache's memory for another (on this
project's VMs that costs ~150 us a page: ``docs/benchmarks.md``, session 19).

Usage: ``python scripts/bench_answer.py SNAPSHOT [--requests N] [--rounds R]
[--interval-ms MS]``; the defaults take about half a minute.
"""
from __future__ import annotations

import argparse
import mmap
import os
import random
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tabulate import tabulate  # noqa: E402

from uffdpy import migstream as ms  # noqa: E402
from uffdpy.mappedram import Snapshot  # noqa: E402
from uffdpy.resume.blocks import source_blocks  # noqa: E402
from uffdpy.resume.sender import Channel, PageSender  # noqa: E402
from uffdpy.resume.stats import ResumeStats  # noqa: E402

C_SOURCE = ROOT / "benchmarks" / "answer_floor.c"
C_BINARY = ROOT / "benchmarks" / "answer_floor.bin"
PAGE = 4096
_REQ = struct.Struct(">HHQI")
_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_PAGE_CONTINUE = int(ms.RamFlag.PAGE | ms.RamFlag.CONTINUE)   # (an IntFlag's "|" is slow)

#: one answerer's figures: service times (seconds), and its sendmsg's alone if it has them
Timings = Tuple[List[float], List[float]]


def fake_destination(snap: Snapshot, block: Any, pages: List[int],
                     interval: float) -> Tuple[int, socket.socket, socket.socket]:
    """Fork the destination that asks for ``pages`` of ``block``; return its pid and our
    ends of the request and answer sockets.  It checks every answer against the file
    (exit status 1 and a line on stderr if one is wrong) and exits once we close the
    answer socket."""
    req_ours, req_theirs = socket.socketpair()
    ans_ours, ans_theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:                                      # the destination
        code = 1
        try:
            req_ours.close()
            ans_ours.close()
            want = [os.pread(snap.fileno(), PAGE, block.pages_offset + p * PAGE)
                    for p in pages]
            errors: List[str] = []
            check = threading.Thread(target=_check, args=(ans_theirs, block.name, pages,
                                                          want, errors))
            check.start()
            name = block.name.encode()
            for i, page in enumerate(pages):
                time.sleep(interval)
                if i == 0:
                    msg = (_REQ.pack(ms.RpType.REQ_PAGES_ID, 13 + len(name), page * PAGE, PAGE)
                           + bytes([len(name)]) + name)
                else:
                    msg = _REQ.pack(ms.RpType.REQ_PAGES, 12, page * PAGE, PAGE)
                req_theirs.sendall(msg)
            req_theirs.shutdown(socket.SHUT_WR)
            check.join()
            if errors:
                print(f"fake destination: {errors[0]}", file=sys.stderr)
            else:
                code = 0
        finally:
            os._exit(code)
    req_theirs.close()
    ans_theirs.close()
    return pid, req_ours, ans_ours


def _check(sock: socket.socket, block: str, pages: List[int], want: List[bytes],
           errors: List[str]) -> None:
    """Read the answers: one PAGE record a request, in order, with the file's bytes."""
    stream = sock.makefile("rb")
    for page, data in zip(pages, want):
        word = stream.read(8)
        if len(word) < 8:
            errors.append(f"{len(errors)} answers, then the stream ended")
            return
        value = struct.unpack(">Q", word)[0]
        if not value & ms.RamFlag.CONTINUE:
            named = stream.read(stream.read(1)[0]).decode()
            if named != block:
                errors.append(f"an answer for block {named!r}")
        got = stream.read(PAGE)
        if value & ~0xfff != page * PAGE or not value & ms.RamFlag.PAGE or got != data:
            errors.append(f"the answer for page {page} is not that page of the file")
    while stream.read(1 << 16):
        pass


def answer_uffdpy(snap: Snapshot, req: socket.socket, ans: socket.socket) -> Timings:
    """The resume's own answer: ReturnPath, then PageSender.answer on a Channel."""
    mapping = mmap.mmap(snap.fileno(), 0, prot=mmap.PROT_READ)
    view = memoryview(mapping)
    pages = PageSender(source_blocks(snap, {}), view, ResumeStats(), batch=32, around=0,
                       fd=snap.fileno())
    ans.setblocking(False)
    ch = Channel(ans, "preempt")
    rp = ms.ReturnPath()
    times: List[float] = []

    def served(t_read: float) -> None:
        times.append(time.perf_counter() - t_read)
    try:
        while select.select([req], [], [])[0]:
            data = req.recv(1 << 16)
            if not data:
                break
            t_read = time.perf_counter()
            rp.feed(data)
            for msg in rp.messages():
                if isinstance(msg, ms.ReqPages):
                    pages.answer(msg, t_read, 0, ch, False, served)
            while ch.busy:                            # (the destination drains it)
                select.select([], [ans], [], 1)
                ch.flush(served)
    finally:
        pages.release()
        view.release()
        mapping.close()
    return times, []


def answer_python(snap: Snapshot, req: socket.socket, ans: socket.socket) -> Timings:
    """The least a Python source can do: unpack, pread, sendmsg (each whole message read)."""
    fd, offset = snap.fileno(), _largest(snap).pages_offset
    times: List[float] = []
    sends: List[float] = []
    ans.setblocking(False)
    held = b""
    while select.select([req], [], [])[0]:
        data = req.recv(1 << 16)
        if not data:
            break
        t_read = time.perf_counter()
        held += data
        while len(held) >= 4 and len(held) >= 4 + held[3] + (held[2] << 8):
            start = _REQ.unpack_from(held)[2]
            held = held[4 + held[3] + (held[2] << 8):]
            page = os.pread(fd, PAGE, offset + start)
            header = struct.pack(">Q", start | _PAGE_CONTINUE)
            t_send = time.perf_counter()
            ans.sendmsg([header, page], (), _FLAGS)
            t_done = time.perf_counter()
            times.append(t_done - t_read)
            sends.append(t_done - t_send)
    return times, sends


def answer_c(snap: Snapshot, req: socket.socket, ans: socket.socket) -> Timings:
    """``benchmarks/answer_floor.bin``; its quantiles stand for its times."""
    ans.setblocking(True)
    out = subprocess.run(
        [str(C_BINARY), str(req.fileno()), str(ans.fileno()), snap.path,
         str(_largest(snap).pages_offset)],
        pass_fds=(req.fileno(), ans.fileno()), capture_output=True, text=True, check=True)
    words = out.stdout.split()             # service N p50 p90 p99 sendmsg p50 p90 p99
    service = [int(w) / 1e9 for w in words[2:5]]
    sends = [int(w) / 1e9 for w in words[6:9]]
    return service, sends


def _largest(snap: Snapshot) -> Any:
    return max(snap.blocks, key=lambda b: b.length)


def build_c() -> Optional[str]:
    """Build the C answerer if a compiler exists; the reason it is left out, or None."""
    cc = shutil.which("cc")
    if cc is None:
        return "no C compiler (cc)"
    if C_BINARY.exists() and C_BINARY.stat().st_mtime >= C_SOURCE.stat().st_mtime:
        return None
    done = subprocess.run([cc, "-O2", "-Wall", "-o", str(C_BINARY), str(C_SOURCE)],
                          capture_output=True, text=True)
    return None if done.returncode == 0 else f"cc failed: {done.stderr.strip()[:200]}"


def quantiles(times: List[float], exact: bool) -> List[float]:
    """p50, p90, p99 in microseconds (``exact``: ``times`` already are those three)."""
    if exact:
        return [t * 1e6 for t in times]
    q = statistics.quantiles(times, n=100)
    return [q[49] * 1e6, q[89] * 1e6, q[98] * 1e6]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("snapshot", help="a mapped-ram snapshot (the 1 GiB guest of "
                    "scripts/linux_guest.py, say)")
    ap.add_argument("--requests", type=int, default=500, help="page requests per answerer "
                    "and round (default 500)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--interval-ms", type=float, default=2.0,
                    help="between two requests (default 2: a restore's pace)")
    args = ap.parse_args(argv)
    answerers: Dict[str, Callable[[Snapshot, socket.socket, socket.socket], Timings]] = {
        "uffdpy": answer_uffdpy, "least Python": answer_python}
    why_no_c = build_c()
    if why_no_c is None:
        answerers["C"] = answer_c
    rng = random.Random(19)
    with Snapshot.open(args.snapshot) as snap:
        block = _largest(snap)
        data = [first + k for first, count, present in block.runs() if present
                for k in range(count)]
        want = args.requests * args.rounds * len(answerers)
        if len(data) < want:
            print(f"{args.snapshot}: {len(data)} data pages in {block.name!r}, fewer than "
                  f"the {want} asked for", file=sys.stderr)
            return 2
        chosen = rng.sample(data, want)
        for page in chosen:                     # first touches, for no answerer to pay
            os.pread(snap.fileno(), PAGE, block.pages_offset + page * PAGE)
        rows: Dict[str, List[List[float]]] = {name: [] for name in answerers}
        sends: Dict[str, List[List[float]]] = {name: [] for name in answerers}
        names = list(answerers)
        for rnd in range(args.rounds):
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                pages, chosen = chosen[:args.requests], chosen[args.requests:]
                pid, req, ans = fake_destination(snap, block, pages, args.interval_ms / 1000)
                try:
                    times, send_times = answerers[name](snap, req, ans)
                finally:
                    req.close()
                    ans.close()
                    _, status = os.waitpid(pid, 0)
                if status != 0:
                    print(f"{name}: its answers were wrong (above)", file=sys.stderr)
                    return 1
                rows[name].append(quantiles(times, name == "C"))
                if send_times:
                    sends[name].append(quantiles(send_times, name == "C"))
    med = {name: [statistics.median(r[i] for r in rs) for i in range(3)]
           for name, rs in rows.items()}
    c50 = med.get("C", [None])[0]
    table = [[name, *(f"{v:.1f}" for v in q),
              "-" if c50 is None else f"{q[0] / c50:.2f}x",
              f"{statistics.median(s[0] for s in sends[name]):.1f}" if sends[name] else "-"]
             for name, q in med.items()]
    print(f"one page request's service (recv returned -> sendmsg returned), us; "
          f"{args.requests} requests every {args.interval_ms:g} ms, medians of "
          f"{args.rounds} interleaved rounds")
    print(tabulate(table, headers=["answerer", "p50", "p90", "p99", "p50 vs C",
                                   "of which sendmsg, p50"]))
    if why_no_c is not None:
        print(f"(no C row: {why_no_c})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
