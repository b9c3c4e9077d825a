"""The engine of the postcopy source: which pages go next, the channels, and what goes on them.

:class:`PageSender` owns one resume's pages: a
:class:`~uffdpy.resume.blocks.SourceBlock` per RAM block (which 4 KiB pages
hold data, which host pages are sent or in flight: the *sent map*, one byte a
host page), the working set still to send, and
the records each page becomes.  It claims pages by runs: a request's host
pages, the rest of its window (fault-around), the next batch of the
background stream, a stretch of the working set, or what a recovering
destination says it already has.  A page claimed is never claimed again, so
each goes out exactly once.

:class:`Channel` is one connection's output queue, written with
non-blocking ``sendmsg`` straight from the file's mapping (tables of
buffers, :mod:`uffdpy.resume.iovec`), or, for pieces whose every buffer
never changes (the stream's sections, the pages around a requested one),
spliced from the page cache without a copy; the answer to a request, one
page read from the file, skips the queue when it is empty.  The loop that
reads the return path and decides when to write is
:class:`uffdpy.resume.postcopy.Resume`'s; nothing here polls.  This module
imports ctypes (``Resume`` imports it before the connect; ``uffdpy resume
--map`` never does).
"""
from __future__ import annotations

import collections
import errno
import itertools
import os
import socket
import time
from array import array
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from .. import migstream as ms
from . import iovec
from .blocks import PAGE, SourceBlock, data_runs_in, unsent_runs
from .destination import ResumeError
from .stats import ResumeStats

__all__ = ["Channel", "PageSender"]

_ONES = b"\x01" * 4096
_IOV_MAX = 1024                      # buffers per sendmsg (the kernel's UIO_MAXIOV)
_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


class Channel:
    """One connection's output queue, written with non-blocking ``sendmsg`` of iovec tables.

    An entry is ``[table, bytes, t_request, keep, stable]``: the ``(address,
    length)`` pairs of one piece of the stream (an ``array('Q')``, see
    :mod:`uffdpy.resume.iovec`), often a whole section of runs of pages; the
    bytes they hold; ``t_request``, set on the entry that ends the answer to
    a request; what the pairs point into (kept alive until sent); and whether
    all of them point at bytes that never change (the file's pages, the run
    tables' headers, :class:`~uffdpy.resume.iovec.Stable` frames and records).
    ``flush`` hands the kernel up to ``_IOV_MAX`` buffers per call, so its
    Python work is per entry, not per page.

    With ``splice`` (both channels, unless told not to), stable entries go
    through a :class:`~uffdpy.resume.iovec.Splicer` instead, and are never
    copied by the source; the others are copied once the pipe has drained,
    so the stream keeps its order.
    """

    def __init__(self, sock: socket.socket, name: str, *, splice: bool = False) -> None:
        self.sock = sock
        self.name = name
        self.pending: Deque[List[Any]] = collections.deque()
        self.last_block: Optional[str] = None                   # for the CONTINUE flag
        self._sender = iovec.Sender(sock)
        self._pipe = iovec.Splicer.open(sock) if splice else None
        #: the bytes that went into the socket through the pipe
        self.spliced = 0

    @property
    def busy(self) -> bool:
        """Whether anything queued has not reached the socket yet."""
        return bool(self.pending) or (self._pipe is not None and self._pipe.held > 0)

    def queue(self, piece: bytes, t_request: Optional[float] = None) -> None:
        """Queue one buffer; ``t_request``: the request it answers (timed when written)."""
        self.pending.append([iovec.pairs_of(piece), len(piece), t_request, piece, False])

    def queue_table(self, table: array, nbytes: int, keep: Any,
                    t_request: Optional[float] = None, *, stable: bool = False) -> None:
        """Queue the pairs of ``table`` (``nbytes`` in all; ``keep``: what they point into;
        ``stable``: they all point at bytes that never change)."""
        self.pending.append([table, nbytes, t_request, keep, stable])

    def write(self, buffers: List[bytes], t_request: float,
              done: Callable[[float], None]) -> int:
        """Write an answer's ``buffers`` now with one ``sendmsg``, or queue them behind
        what is queued; ``done(t_request)`` once all are written.

        An idle channel's answer skips the queue and its tables: on the
        request-serving guest, request service p50 44-47 -> 38 us.  Returns the
        bytes that reached the socket; raises as :meth:`flush`.
        """
        if self.busy:
            self.queue(b"".join(buffers), t_request)
            return self.flush(done)
        try:
            n = self.sock.sendmsg(buffers, (), _FLAGS)
        except (BlockingIOError, InterruptedError):
            n = 0
        if n == sum(map(len, buffers)):
            done(t_request)
        else:                                         # the socket is full: the rest waits
            self.queue(b"".join(buffers)[n:], t_request)
        return n

    def drop(self) -> None:
        """Forget what is queued and close the pipe (the socket is the caller's)."""
        self.pending.clear()
        if self._pipe is not None:
            self._pipe.close()

    def flush(self, done: Callable[[float], None]) -> int:
        """Send what the socket takes now; call ``done(t)`` for each request entry written
        (a stable one: put in the pipe; answers never are).

        Returns the bytes that reached the socket.  Raises: OSError (EPIPE,
        ECONNRESET: the destination went away; EFAULT: the file's mapping
        cannot be read).
        """
        total = 0
        pending, pipe = self.pending, self._pipe
        try:
            while True:
                if pipe is not None and pipe.held:
                    n = pipe.drain()
                    total += n
                    self.spliced += n
                    if pipe.held:                     # the socket is full
                        break
                if not pending:
                    break
                if pipe is not None and pending[0][4]:
                    table, pairs, _ = self._gather(pipe.slots, stable=True)
                    self._advance(pipe.fill(table, pairs), done)
                    continue
                # copied: with a pipe, only the entries up to the next stable one
                table, pairs, size = self._gather(_IOV_MAX, None if pipe is None else False)
                n = self._sender.send(table, pairs)
                total += n
                self._advance(n, done)
                if n < size:                          # the socket is full
                    break
        except (BlockingIOError, InterruptedError):
            pass
        return total

    def _gather(self, limit: int, stable: Optional[bool]) -> Tuple[array, int, int]:
        """The table of the first entries, at most ``limit`` buffers (``stable``: only
        those whose stable flag is this, or any when None), its number of buffers
        and its bytes."""
        pending = self.pending
        table, size = pending[0][0], pending[0][1]
        pairs = len(table) // 2
        if pairs > limit:                             # one entry larger than a call takes
            return table, limit, sum(table[1:2 * limit:2])
        if len(pending) > 1:                          # and the entries behind it that fit
            tables = [table]
            for entry in itertools.islice(pending, 1, None):
                more = len(entry[0]) // 2
                if pairs + more > limit or (stable is not None and entry[4] != stable):
                    break
                tables.append(entry[0])
                pairs += more
                size += entry[1]
            if len(tables) > 1:
                table = array("Q")
                for t in tables:
                    table += t
        return table, pairs, size

    def _advance(self, n: int, done: Callable[[float], None]) -> None:
        """Drop the first ``n`` bytes of the queue (sent, or in the pipe)."""
        pending = self.pending
        while n:
            entry = pending[0]
            if n >= entry[1]:
                n -= entry[1]
                pending.popleft()
                if entry[2] is not None:
                    done(entry[2])
                continue
            # a part of this entry went out: drop its sent pairs, cut the first left
            table, i = entry[0], 1
            entry[1] -= n
            while n >= table[i]:
                n -= table[i]
                i += 2
            del table[:i - 1]
            table[0] += n
            table[1] -= n
            n = 0


class PageSender:
    """Which pages of one resume are sent, and their records.  Not thread-safe: the loop's.

    ``blocks``: from :func:`~uffdpy.resume.blocks.source_blocks`; ``view``
    is the snapshot file's mapping (only its address is kept: the caller
    keeps it open until :meth:`release`); ``batch`` data pages per background
    section; ``around``: the window (in 4 KiB pages) whose other pages go
    right behind a requested one;
    ``trace`` a list to which each page sent adds ``(seconds since t0, block,
    page, why)``; ``record``: keep the pages demanded (:attr:`recorded`);
    ``fd``: the snapshot file, from which a requested 4 KiB page is read
    (:meth:`_read`) rather than sent from the mapping.
    """

    def __init__(self, blocks: List[SourceBlock], view: memoryview,
                 stats: ResumeStats, *, batch: int, around: int,
                 trace: Optional[List[Tuple[float, str, int, str]]] = None,
                 record: bool = False, fd: Optional[int] = None) -> None:
        self.stats = stats
        self.fd = fd
        self.batch, self.around, self.trace, self.record = batch, around, trace, record
        #: (block, 4 KiB page) -> (seconds since t0 of its first demand, holds data)
        self.recorded: Dict[Tuple[str, int], Tuple[float, bool]] = {}
        self.ws_queue: Deque[Tuple[SourceBlock, int]] = collections.deque()
        self.t0 = time.monotonic()                # the connect: set again by the loop's owner
        self.last_request = 0.0
        self.blocks: Dict[str, SourceBlock] = {b.name: b for b in blocks}
        self.order = list(blocks)
        mapping_at = iovec.address(view)
        for block in self.order:
            block.pages_at = mapping_at + block.pages_offset
            if block.sub == 1:
                block.table = iovec.RunTable(block.pages_at, block.length // PAGE)
        self._frames: Dict[int, Tuple[bytes, array, bytes, array, bool]] = {}
        self._stable = iovec.Stable()             # the frames, for a spliced channel
        #: zero records and the headers that name a block, copied once where they never
        #: change, so that a piece holding them may still be spliced (the pieces around
        #: a requested page hold both: spliced, the 1 GiB guest's source CPU 0.161 ->
        #: 0.151 s and 0.155 -> 0.143 s, alternated); full (29,000 ZERO records), the
        #: pieces are copied.  Apart from the frames', so that records filling it never
        #: leave a section's frame to be copied, and with it every section of the stream
        self._records = iovec.Stable(1 << 18)
        stats.data_pages = sum(b.data_pages for b in self.order)
        #: data host pages not yet claimed, and all of them
        self.remaining = sum(b.data_count for b in self.order)
        self.total_units = self.remaining

    def queue_working_set(self, pages: Any) -> None:
        """Send these ``(block, page, ...)`` first, in this order (zero pages too: each
        saves a request if demanded again)."""
        for name, page, *_ in pages:
            block = self.blocks[name]
            self.ws_queue.append((block, page // block.sub))

    def release(self) -> None:
        """Forget the file's pages and unmap the run tables' headers (before the file's
        mapping closes; nothing queued may point into them any more)."""
        self._frames.clear()
        self._stable.close()
        self._records.close()
        for block in self.order:
            block.present = b""
            if block.table is not None:
                block.table.close()
                block.table = None
            block.pages_at = 0

    def frame(self, sid: int) -> Tuple[bytes, array, bytes, array, bool]:
        """The start and the end of a PART section of section ``sid``, their pairs, and
        whether those point at :class:`~.iovec.Stable` copies (else at the bytes)."""
        frame = self._frames.get(sid)
        if frame is None:
            start, end = ms.part_start(sid), ms.part_end(sid)
            start_at, end_at = self._stable.put(start), self._stable.put(end)
            if start_at is None or end_at is None:
                frame = (start, iovec.pairs_of(start), end, iovec.pairs_of(end), False)
            else:
                frame = (start, start_at, end, end_at, True)
            self._frames[sid] = frame
        return frame

    def answer(self, req: ms.ReqPages, t_read: float, sid: int, ch: Channel, in_part: bool,
               served: Callable[[float], None]) -> Optional[Tuple[SourceBlock, int, Channel]]:
        """Send the requested host pages on ``ch`` now (in a PART section when
        ``in_part``: the main channel); return where fault-around would start, if any."""
        block = self.blocks.get(req.block)
        if block is None:
            raise ResumeError(f"the destination asked for pages of block {req.block!r}, "
                              "which the snapshot does not have")
        if req.start % PAGE or req.start + req.length > block.length or req.length <= 0:
            raise ResumeError(f"the destination asked for {req.length} bytes at "
                              f"{req.start:#x} of {block.name!r} ({block.length:#x} bytes)")
        self.stats.page_requests += 1
        self.last_request = time.monotonic()
        first = req.start // block.host_page
        last = (req.start + req.length - 1) // block.host_page
        if self.record:
            t_demand = time.monotonic() - self.t0
            for page in range(req.start // PAGE, (req.start + req.length - 1) // PAGE + 1):
                if (block.name, page) not in self.recorded:
                    self.recorded[(block.name, page)] = (t_demand, bool(block.present[page]))
        if first == last and block.sent[first]:
            self.stats.duplicate_requests += 1
            return None
        if first == last and block.sub == 1 and self.fd is not None:
            self._answer_page(block, first, ch, sid, in_part, t_read, served)
            return (block, last + 1, ch) if self.around else None
        piece = _Piece(self, sid, in_part)
        for unit in range(first, last + 1):
            if block.sent[unit]:
                self.stats.duplicate_requests += 1
                continue
            self.claim(block, unit, ch, piece, why="request")
        if not piece.pages:
            return None
        piece.queue_on(ch, t_read)
        self.stats.bytes_sent += ch.flush(served)
        return (block, last + 1, ch) if self.around else None

    def _answer_page(self, block: SourceBlock, page: int, ch: Channel, sid: int,
                     in_part: bool, t_read: float, served: Callable[[float], None]) -> None:
        """One requested 4 KiB page, read from the file and written at once
        (:meth:`Channel.write`), as its own PART section when ``in_part``: nearly
        every request of a resume.  Its first touch in the file's mapping would
        be a page fault on the answer's way (real restores, alternated: request
        service p50 43.1 / 43.5 us sent from the mapping, 40.3 / 41.6 us read)."""
        block.sent[page] = 1
        self._trace(block, page, page + 1, "request")
        record, data = self._record(block, page, ch)
        out = [record, self._read(block, page * PAGE)] if data else [record]
        if data:
            self.remaining -= 1
        self.stats.pages_requested += 1
        if in_part:
            start, _, end, _, _ = self.frame(sid)
            out = [start, *out, end]
        self.stats.bytes_sent += ch.write(out, t_read, served)

    def fault_around(self, block: SourceBlock, start: int, ch: Channel, sid: int,
                     in_part: bool) -> None:
        """The rest of a requested page's window: the pages not sent yet of the
        aligned ``around`` pages (4 KiB each) that hold it, those after it first,
        then those before it; data pages as runs, empty ones as ZERO records.

        Both ways, because a guest's reads of its physical memory go both ways:
        Linux hands out free pages from the top of a block down, so a file read
        forward often walks its pages downward (the request-serving guest: one
        step in three between its requests is the page just below).  Empty pages
        too, because what a guest touches next among its free pages is the next
        one its allocator hands out (a ZERO record is a header; the destination
        maps the zero page).  The 1 GiB request-serving guest's page requests
        before its answer (medians of 5 restores): 1,580 with the 32 data pages
        after each request, 410 with the data pages of its 64-page window,
        150 with all of them.  In a block of larger host pages the window is
        as many of them as fit in ``around`` 4 KiB pages (of 2 MiB: none).
        """
        unit = start - 1                              # the last requested host page
        span = max(1, self.around // block.sub)       # the window in host pages
        lo = unit - unit % span
        hi = min(lo + span, len(block.sent))
        piece = _Piece(self, sid, in_part)
        for a, b in (*unsent_runs(block, start, hi), *unsent_runs(block, lo, unit)):
            if block.sub == 1:
                for d, e in data_runs_in(block, a, b):   # empty pages, then a run of data
                    for u in range(a, d):
                        self.claim(block, u, ch, piece, why="around")
                    self.claim_runs(block, [(d, e)], ch, piece, "around")
                    a = e
            for u in range(a, b):                     # the empty pages left, or host pages
                self.claim(block, u, ch, piece, why="around")
        if piece.pages:
            piece.queue_on(ch)

    def claim(self, block: SourceBlock, unit: int, ch: Channel, piece: "_Piece", *,
              why: str) -> None:
        """Mark host page ``unit`` sent and add its records for channel ``ch`` to ``piece``.

        One host page, data or zero: the request path, hugetlb blocks, and the
        zero pages a working set names.  Runs of 4 KiB data pages go through
        :meth:`claim_runs`.
        """
        block.sent[unit] = 1
        has_data = False
        self._trace(block, unit * block.sub, (unit + 1) * block.sub, why)
        for page in range(unit * block.sub, (unit + 1) * block.sub):
            record, data = self._record(block, page, ch)
            if data:
                has_data = True
                piece.add_page(record, block.pages_at + page * PAGE)
                self._count(why, 1)
            else:
                piece.add(record)
                if why in ("request", "around", "ws"):
                    self._count(why, 1)
        piece.pages += 1
        if has_data:
            self.remaining -= 1

    def _record(self, block: SourceBlock, page: int, ch: Channel) -> Tuple[bytes, bool]:
        """4 KiB page ``page``'s record on ``ch``, counted: a PAGE header (its data
        follow) or a whole ZERO record; and whether it holds data."""
        name = None if ch.last_block == block.name else block.name
        ch.last_block = block.name
        if block.present[page]:
            self.stats.data_pages_sent += 1
            return ms.page_header(page * PAGE, name), True
        self.stats.zero_pages_sent += 1
        return ms.zero_record(page * PAGE, name), False

    def _trace(self, block: SourceBlock, a: int, b: int, why: str) -> None:
        """With a trace: 4 KiB pages ``[a, b)`` of ``block`` go out now, for ``why``."""
        if self.trace is not None:
            t_now = time.monotonic() - self.t0
            self.trace.extend((t_now, block.name, page, why) for page in range(a, b))

    def _read(self, block: SourceBlock, offset: int) -> bytes:
        """The 4 KiB page at byte ``offset`` of ``block``, read from the file.  Raises:
        OSError EFAULT past the file's end, as ``sendmsg`` from the mapping does."""
        assert self.fd is not None
        data = os.pread(self.fd, PAGE, block.pages_offset + offset)
        if len(data) != PAGE:                   # truncated under us: never zeros
            raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
        return data

    def claim_runs(self, block: SourceBlock, runs: List[Tuple[int, int]], ch: Channel,
                   piece: "_Piece", why: str) -> None:
        """Mark 4 KiB data pages ``[a, b)`` of each run sent and add their records to ``piece``.

        The pairs of a run are copied from the block's :class:`~.iovec.RunTable`
        (one slice a run, no object a page); a run that follows a change of
        block starts with a named record.  Only for blocks of 4 KiB host pages
        and runs of data pages.
        """
        sent = block.sent
        table = block.table
        assert table is not None
        for a, b in runs:
            n = b - a
            sent[a:b] = _ONES[:n] if n <= len(_ONES) else b"\x01" * n
            first = a
            if ch.last_block != block.name:
                ch.last_block = block.name
                piece.add_page(ms.page_header(a * PAGE, block.name), block.pages_at + a * PAGE)
                first += 1
            if first < b:
                table.add(piece.table, first, b)
                piece.nbytes += (b - first) * (PAGE + 8)
            piece.pages += n
            self.remaining -= n
            self.stats.data_pages_sent += n
            self._count(why, n)
            self._trace(block, a, b, why)

    def _count(self, why: str, n: int) -> None:
        stats = self.stats
        if why == "request":
            stats.pages_requested += n
        elif why == "around":
            stats.pages_around += n
        elif why == "ws":
            stats.pages_working_set += n
        else:
            stats.pages_streamed += n

    def queue_ws_batch(self, main: Channel, sid: int) -> None:
        """Up to a batch of the working set's pages, in recorded order, as runs."""
        piece = _Piece(self, sid, True)
        count = 0
        while self.ws_queue and count < self.batch:
            block, unit = self.ws_queue[0]
            if block.sub == 1 and block.present[unit]:
                # the recorded run of consecutive data pages that starts here
                end = unit + 1
                queue = self.ws_queue
                while len(queue) > end - unit and count + (end - unit) < self.batch:
                    nb, nu = queue[end - unit]
                    if nb is not block or nu != end or not block.present[nu]:
                        break
                    end += 1
                for _ in range(end - unit):
                    queue.popleft()
                self.claim_runs(block, unsent_runs(block, unit, end), main, piece, "ws")
                count += end - unit
                continue
            self.ws_queue.popleft()
            if not block.sent[unit]:
                self.claim(block, unit, main, piece, why="ws")
            count += 1
        if piece.pages:
            piece.queue_on(main)

    def queue_batch(self, main: Channel, sid: int) -> None:
        """The background stream's next batch: unsent data pages in file order, as runs."""
        piece = _Piece(self, sid, True)
        budget = self.batch
        for block in self.order:
            if budget <= 0:
                break
            if block.sub > 1:
                units = block.data_units
                cursor = block.cursor
                while cursor < len(units) and budget > 0:
                    unit = units[cursor]
                    cursor += 1
                    if not block.sent[unit]:
                        self.claim(block, unit, main, piece, why="stream")
                        budget -= 1
                block.cursor = cursor
                continue
            runs = block.data_runs
            while block.cursor < len(runs) and budget > 0:
                first, end = runs[block.cursor]
                a = max(first, block.run_pos)
                stretches = unsent_runs(block, a, min(end, a + budget))
                if stretches:
                    self.claim_runs(block, stretches, main, piece, "stream")
                    budget -= sum(b - x for x, b in stretches)
                    block.run_pos = stretches[-1][1]
                else:
                    block.run_pos = min(end, a + budget)
                if block.run_pos >= end:
                    block.cursor += 1
        if piece.pages:
            piece.queue_on(main)

    def apply_bitmaps(self, bitmaps: Dict[str, ms.RecvBitmap]) -> None:
        received = 0
        for block in self.order:
            got = bitmaps[block.name]
            want = (block.length // PAGE + 63) // 64 * 8
            if len(got.bitmap) < (block.length // PAGE + 7) // 8:
                raise ResumeError(f"the destination's received bitmap of {block.name!r} has "
                                  f"{len(got.bitmap)} bytes, expected {want}")
            for unit in range(len(block.sent)):
                pages = range(unit * block.sub, (unit + 1) * block.sub)
                if all(got.received(p) for p in pages):
                    if not block.sent[unit] and any(block.present[p] for p in pages):
                        self.remaining -= 1
                    block.sent[unit] = 1
                    received += block.sub
        self.stats.recovered = True
        self.stats.pages_already_received = received


class _Piece:
    """A piece of the stream being built: its pairs, what they point into, its bytes.

    ``framed``: the pages go in a PART section of section ``sid`` (the main
    channel; the preempt channel's go bare).  ``pages``: the host pages claimed.
    """

    __slots__ = ("table", "keep", "nbytes", "pages", "stable", "_frame", "_records")

    def __init__(self, sender: PageSender, sid: int, framed: bool) -> None:
        self.table = array("Q")
        self.keep: List[Any] = []
        self.nbytes = 0
        self.pages = 0
        #: every pair points at bytes that never change (no ``bytes`` object's)
        self.stable = True
        self._records = sender._records
        self._frame = sender.frame(sid) if framed else None
        if self._frame is not None:
            start, pairs, _, _, self.stable = self._frame
            self.table += pairs
            self.keep.append(start)
            self.nbytes = len(start)

    def add(self, record: bytes) -> None:
        """A whole record (a ZERO record)."""
        self._add_bytes(record)
        self.nbytes += len(record)

    def add_page(self, header: bytes, page_at: int) -> None:
        """A PAGE record: ``header``, then the page at address ``page_at`` of the mapping."""
        self._add_bytes(header)
        self.table.extend((page_at, PAGE))
        self.nbytes += len(header) + PAGE

    def _add_bytes(self, data: bytes) -> None:
        """``data``'s pair: of a copy in the sender's stable records if they have room,
        else of ``data`` itself, kept alive with the piece (which is then not stable)."""
        pairs = self._records.put(data)
        if pairs is not None:
            self.table += pairs
        else:
            self.table.extend((iovec.bytes_address(data), len(data)))
            self.keep.append(data)
            self.stable = False

    def queue_on(self, ch: Channel, t_request: Optional[float] = None) -> None:
        """Close the section, if any, and queue the piece on ``ch``."""
        if self._frame is not None:
            _, _, end, pairs, _ = self._frame
            self.table += pairs
            self.keep.append(end)
            self.nbytes += len(end)
        ch.queue_table(self.table, self.nbytes, self.keep, t_request, stable=self.stable)
