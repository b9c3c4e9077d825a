"""One page request's service outside QEMU: uffdpy's answer, the least Python, and C.

``uffdpy resume`` reports ``request_service_us``: for each page request of
the destination, the time from the source's ``recv`` of it to the return of
the ``sendmsg`` that answers it.  :func:`run_answer_bench` measures the same
span against a fake destination process, so that the figure can be read
against what the machine itself allows.

The destination (a process of its own) asks for distinct data pages of the snapshot's largest
block, one every ``interval`` seconds (REQ_PAGES_ID, then REQ_PAGES, as
QEMU's fault thread does), on one socket, and a thread of it reads the
answers from another (as QEMU's preempt-channel thread, asleep in ``recv``
when an answer comes: the ``sendmsg`` wakes it), checking each against the
file.  The answerers take turns, each round in another order, each with
pages of its own:

* ``uffdpy``: :class:`uffdpy.migstream.ReturnPath` parses the requests,
  :meth:`uffdpy.resume.sender.PageSender.answer` answers them on a
  :class:`~uffdpy.resume.sender.Channel` (what the resume's loop calls;
  no fault-around);
* ``least Python``: ``struct.unpack``, ``os.pread``, ``socket.sendmsg``;
* ``C``: a binary built from ``benchmarks/answer_floor.c`` (the same three
  calls), when the caller has one (``scripts/bench_answer.py`` builds it).

Every page the rounds will ask for is read once before them, so that no
answerer pays a first touch of the page cache's memory for another.
"""
from __future__ import annotations

import json
import mmap
import os
import random
import select
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from tabulate import tabulate

from .. import migstream as ms
from ..latency import percentiles
from ..mappedram import Snapshot
from ..resume.blocks import source_blocks
from ..resume.sender import Channel, PageSender
from ..resume.stats import ResumeStats

__all__ = ["run_answer_bench", "FakeDestination", "c_answerer"]

PAGE = 4096
_REQ = struct.Struct(">HHQI")
_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_PAGE_CONTINUE = int(ms.RamFlag.PAGE | ms.RamFlag.CONTINUE)   # (an IntFlag's "|" is slow)

#: one answerer's figures: its service's percentiles (``uffdpy.latency.percentiles``, in
#: microseconds), and its sendmsg's alone if it has them
Timings = Tuple[Dict[str, Optional[float]], Optional[Dict[str, Optional[float]]]]
Answerer = Callable[[Snapshot, socket.socket, socket.socket], Timings]


class FakeDestination:
    """The destination that asks for ``pages`` of ``block``, in a process of its own.

    :attr:`requests` and :attr:`answers` are our ends of its two sockets.  It
    checks every answer against the file and exits once we close
    :attr:`answers`; :meth:`wait` says whether every answer was right (if not,
    it said which on stderr).  A process started anew, not forked: the
    caller may have threads.
    """

    def __init__(self, snap: Snapshot, block: Any, pages: List[int], interval: float) -> None:
        self.requests, req_theirs = socket.socketpair()
        self.answers, ans_theirs = socket.socketpair()
        order = {"path": snap.path, "block": block.name, "offset": block.pages_offset,
                 "pages": pages, "interval": interval,
                 "fds": [req_theirs.fileno(), ans_theirs.fileno()]}
        package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [package, *filter(None, [os.environ.get("PYTHONPATH")])]))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "from uffdpy.harness.bench_answer import _destination;"
                 " raise SystemExit(_destination())"],
                stdin=subprocess.PIPE, pass_fds=order["fds"], env=env)
        except BaseException:
            self.close()
            raise
        finally:
            req_theirs.close()
            ans_theirs.close()
        assert self._proc.stdin is not None
        with self._proc.stdin as stdin:
            stdin.write(json.dumps(order).encode())

    def close(self) -> None:
        """Close our ends (the destination then finishes)."""
        self.requests.close()
        self.answers.close()

    def wait(self, timeout: float = 60.0) -> bool:
        """Close our ends, wait for the destination; whether every answer was right."""
        self.close()
        try:
            return self._proc.wait(timeout) == 0
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            return False


def _destination() -> int:
    """The fake destination's process: its order (JSON) on stdin."""
    order = json.load(sys.stdin)
    req = socket.socket(fileno=order["fds"][0])
    ans = socket.socket(fileno=order["fds"][1])
    pages: List[int] = order["pages"]
    fd = os.open(order["path"], os.O_RDONLY)
    try:
        want = [os.pread(fd, PAGE, order["offset"] + p * PAGE) for p in pages]
    finally:
        os.close(fd)
    errors: List[str] = []
    check = threading.Thread(target=_check, args=(ans, order["block"], pages, want, errors))
    check.start()
    name = order["block"].encode()
    try:
        for i, page in enumerate(pages):
            time.sleep(order["interval"])
            if i == 0:
                msg = (_REQ.pack(ms.RpType.REQ_PAGES_ID, 13 + len(name), page * PAGE, PAGE)
                       + bytes([len(name)]) + name)
            else:
                msg = _REQ.pack(ms.RpType.REQ_PAGES, 12, page * PAGE, PAGE)
            req.sendall(msg)
        req.shutdown(socket.SHUT_WR)
    except OSError as e:
        errors.append(f"the source went away: {e}")
    check.join()
    if errors:
        print(f"fake destination: {errors[0]}", file=sys.stderr)
    return 1 if errors else 0


def _check(sock: socket.socket, block: str, pages: List[int], want: List[bytes],
           errors: List[str]) -> None:
    """Read the answers: one PAGE record a request, in order, with the file's bytes."""
    stream = sock.makefile("rb")
    for n, (page, data) in enumerate(zip(pages, want)):
        word = stream.read(8)
        if len(word) < 8:
            errors.append(f"{n} answers of {len(pages)}, then the stream ended")
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
    return percentiles(times, unit=1e6), None


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
    return percentiles(times, unit=1e6), percentiles(sends, unit=1e6)


def c_answerer(binary: str) -> Answerer:
    """The C answerer built from ``benchmarks/answer_floor.c`` (its percentiles are
    taken as ``percentiles`` takes them: the sorted samples' ``int(q * n)``-th)."""
    def answer_c(snap: Snapshot, req: socket.socket, ans: socket.socket) -> Timings:
        ans.setblocking(True)
        out = subprocess.run(
            [binary, str(req.fileno()), str(ans.fileno()), snap.path,
             str(_largest(snap).pages_offset)],
            pass_fds=(req.fileno(), ans.fileno()), capture_output=True, text=True, check=True)
        words = out.stdout.split()         # service N p50 p90 p99 sendmsg p50 p90 p99

        def us(ns: List[str]) -> Dict[str, Optional[float]]:
            return dict(zip(("p50", "p90", "p99"), (round(int(w) / 1e3, 1) for w in ns)))
        return us(words[2:5]), us(words[6:9])
    return answer_c


def _largest(snap: Snapshot) -> Any:
    return max(snap.blocks, key=lambda b: b.length)


def run_answer_bench(path: str, *, requests: int = 500, rounds: int = 3,
                     interval: float = 0.002, c_binary: Optional[str] = None,
                     why_no_c: Optional[str] = None) -> str:
    """The interleaved rounds; the table (``c_binary``: the C answerer's, if any;
    ``why_no_c``: said under the table when there is none).

    Raises: ValueError (no requests or rounds, or the snapshot has too few data pages
    for them),
    RuntimeError (an answerer's answers were wrong: the destination said which).
    """
    if requests < 1 or rounds < 1:
        raise ValueError(f"{requests} requests and {rounds} rounds: at least one of each")
    answerers: Dict[str, Answerer] = {"uffdpy": answer_uffdpy, "least Python": answer_python}
    if c_binary is not None:
        answerers["C"] = c_answerer(c_binary)
    rng = random.Random(19)
    rows: Dict[str, List[Dict[str, Optional[float]]]] = {name: [] for name in answerers}
    sends: Dict[str, List[Dict[str, Optional[float]]]] = {name: [] for name in answerers}
    with Snapshot.open(path) as snap:
        block = _largest(snap)
        data = [first + k for first, count, present in block.runs() if present
                for k in range(count)]
        want = requests * rounds * len(answerers)
        if len(data) < want:
            raise ValueError(f"{path}: {len(data)} data pages in {block.name!r}, fewer than "
                             f"the {want} the rounds ask for")
        chosen = rng.sample(data, want)
        for page in chosen:                     # first touches, for no answerer to pay
            os.pread(snap.fileno(), PAGE, block.pages_offset + page * PAGE)
        names = list(answerers)
        for rnd in range(rounds):
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                pages, chosen = chosen[:requests], chosen[requests:]
                dest = FakeDestination(snap, block, pages, interval)
                try:
                    times, send_times = answerers[name](snap, dest.requests, dest.answers)
                finally:
                    right = dest.wait()
                if not right:
                    raise RuntimeError(f"{name}: its answers were wrong (the fake "
                                       "destination said why, on stderr)")
                rows[name].append(times)
                if send_times is not None:
                    sends[name].append(send_times)
    med = {name: [statistics.median(x for r in rs if (x := r[q]) is not None)
                  for q in ("p50", "p90", "p99")] for name, rs in rows.items()}
    c50 = med["C"][0] if "C" in med else None
    table = [[name, *(f"{v:.1f}" for v in q),
              "-" if c50 is None else f"{q[0] / c50:.2f}x",
              f"{statistics.median(x for s in sends[name] if (x := s['p50']) is not None):.1f}"
              if sends[name] else "-"]
             for name, q in med.items()]
    out = (f"one page request's service (recv returned -> sendmsg returned), us; "
           f"{requests} requests every {interval * 1e3:g} ms, medians of {rounds} "
           f"interleaved rounds\n"
           + tabulate(table, headers=["answerer", "p50", "p90", "p99", "p50 vs C",
                                      "of which sendmsg, p50"]))
    if c_binary is None and why_no_c:
        out += f"\n(no C row: {why_no_c})"
    return out
