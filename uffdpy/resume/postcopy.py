"""Resume a mapped-ram snapshot into an unmodified QEMU by serving it as a postcopy source.

A QEMU destination started with ``-incoming defer`` and postcopy on does the
userfaultfd work itself: it registers guest RAM, runs the guest, and asks its
migration source for every page the guest touches that has not arrived.
:class:`Resume` plays that source, reading the mapped-ram file QEMU wrote,
so the guest runs a few milliseconds after the connection while its RAM
streams in behind it.  No QEMU patch is needed (QEMU 10.0.2 refuses
mapped-ram together with postcopy in its own loader).

What the source does, in order (``reference/postcopy-stream.md`` has every
byte; :mod:`uffdpy.migstream` makes them):

1. Validate the snapshot (mapped-ram, 4 KiB target pages) before anything is
   sent.  With a QMP socket: set ``postcopy-ram`` on and ``mapped-ram`` off
   (plus ``postcopy-preempt`` unless told not to or on an fd, ``events`` for
   timing), read the blocks' host page sizes (``info ramblock``), and start
   ``migrate-incoming`` on a private address with ``exit-on-error`` off, so
   that a refusal leaves QEMU alive to tell why.
2. Connect and queue everything up to RUN: header, configuration (without
   the capabilities subsection), OPEN_RETURN_PATH, ADVISE, the "ram" block
   list, one DISCARD (mandatory in practice), and the package with LISTEN,
   the snapshot's device sections byte for byte, and RUN.
3. Serve.  One thread runs one ``poll`` loop over the connection (the return
   path is the same socket read the other way) and a wake fd: page requests
   are answered first, each as soon as it is read; in between, a background
   stream sends every data page in file order, one small PART section at a
   time.  :class:`~uffdpy.resume.sender.PageSender` keeps the *sent map*, so
   that each page goes out exactly once (twice sends the destination to
   ``postcopy-paused``).  Zero pages are sent only when requested: a page
   never placed reads as zero, which is what the bitmap says it holds.
4. When every data page is out: END, EOF, and the destination's SHUT.

One thread, no locks: the loop alone owns the sockets and the sent map, so
the GIL never stands between a request and its answer.  Pages go from the
file's mapping (:mod:`.iovec`: spliced, or copied by ``sendmsg``; no copy in
Python), a requested page read with ``pread`` (its first touch in the mapping
would fault on the answer's way); a file truncated under the mapping makes
``sendmsg`` fail with EFAULT, never SIGBUS, and a short read is the same error.

If the source dies after RUN the destination pauses (``postcopy-paused``),
keeping every page it received; ``Resume(..., recover=True)`` reconnects
through the out-of-band ``migrate-recover``, reads back the received-page
bitmaps and sends the rest.  Before RUN nothing can be recovered: QEMU fails
the incoming migration.
"""
from __future__ import annotations

import errno
import mmap
import os
import select
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

from .. import migstream as ms
from ..latency import percentiles
from ..wake import WakeFd
from ..mappedram import TARGET_PAGE_SIZE as PAGE, Snapshot
from ..pagesource import PathLike
from .destination import (DestinationError, QemuDestination, ResumeError, event_time,
                          open_connection)
from .blocks import SourceBlock, source_blocks
from .loopstate import LoopState, Phase, awaited
from .options import ResumeOptions
from .stats import ResumeStats

if TYPE_CHECKING:
    from .sender import Channel, PageSender
    from ..workingset import WorkingSet

__all__ = ["Resume", "ResumeStats"]

_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12)     # Linux's value
_RECV_BYTES = 1 << 16


class Resume:
    """Serve ``snapshot`` as the postcopy source of a QEMU destination.  A context manager.

    Exactly one of ``qmp`` (the destination's QMP socket: uffdpy sets it up
    and starts ``migrate-incoming`` on a private address of ``transport``
    ``unix``, ``tcp`` or ``fd``) or ``connect`` (an address the destination
    already listens on, ``unix:PATH``, ``tcp:HOST:PORT``, ``fd:N``) is given.
    ``snapshot`` is a path or an open :class:`~uffdpy.mappedram.Snapshot`
    (then its file, the one it validated, is the one served, whatever has
    its name by now; the caller closes it).  How it streams is ``options``
    (a :class:`~.options.ResumeOptions`), or the same names as keywords,
    which override it (``Resume(snap, qmp=sock, preempt=False)``).
    The constructor validates, connects and starts the serving thread; the
    guest runs (unless the destination has ``-S``) a few milliseconds later.
    :meth:`wait` returns the :class:`ResumeStats` when the migration has
    completed.

    :class:`~.options.ResumeOptions` says what each option does;
    ``page_sizes`` maps block names to host page sizes when there is no QMP
    to ask (default 4 KiB).

    Raises: MappedRamError (bad snapshot; nothing sent), ResumeError,
    DestinationError (QEMU's reason when it refused), ValueError for bad
    arguments.
    """

    def __init__(self, snapshot: Union[PathLike, Snapshot], *, qmp: Optional[str] = None,
                 connect: Optional[str] = None, options: Optional[ResumeOptions] = None,
                 page_sizes: Optional[Dict[str, int]] = None, **fields: Any) -> None:
        if (qmp is None) == (connect is None):
            raise ValueError("give exactly one of qmp= (a QMP socket) or connect= (an address)")
        opts = self.options = (options or ResumeOptions()).replace(**fields)
        if opts.preempt and (opts.transport == "fd" or (connect or "").startswith("fd:")):
            raise ValueError("preempt needs a second connection: use a unix or tcp transport")
        timeout = opts.timeout
        working_set, record_ws, trace = opts.working_set, opts.record_ws, opts.trace
        background, background_delay = opts.background, opts.background_delay
        background_idle, recover = opts.background_idle, opts.recover
        # on by default when uffdpy sets the destination up (with connect=, whoever did
        # chose; a recovery asks the destination what it has)
        preempt = opts.preempt_over(opts.transport) if connect is None else bool(opts.preempt)
        fault_around_pages = opts.fault_around_pages
        demand_yield_ms, ws_placement = opts.demand_yield_ms, opts.ws_placement
        stall_timeout, transport = opts.stall_timeout, opts.transport
        self.stats = ResumeStats()
        self._given = snapshot if isinstance(snapshot, Snapshot) else None
        self._snapshot_path = snapshot.path if isinstance(snapshot, Snapshot) \
            else os.fspath(snapshot)
        self._timeout = timeout
        self._around = fault_around_pages
        self._pages: Optional[PageSender] = None
        self._ws_path = working_set
        self._ws_placement = ws_placement
        self._ws: Optional[WorkingSet] = None
        self._record_path = record_ws
        self._record_saved = False
        #: with trace=True: (seconds since the connect, block, 4 KiB page, why) per page sent
        self.trace: Optional[List[Tuple[float, str, int, str]]] = [] if trace else None
        self._identity: Optional[Dict[str, Any]] = None
        self._yield_s = demand_yield_ms / 1000
        self._background = background
        self._background_delay = background_delay
        self._background_idle = background_idle
        self._preempt = preempt
        self._recover = recover
        self._stall_s = stall_timeout if stall_timeout is not None else max(timeout, 1.0)
        self._transport = transport
        self._fd_socket: Optional[socket.socket] = None
        self._snap: Optional[Snapshot] = None
        self._map: Optional[mmap.mmap] = None
        self._view: Optional[memoryview] = None
        self._dest: Optional[QemuDestination] = None
        self._main: Optional[Channel] = None
        self._urgent: Optional[Channel] = None
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._stop = False
        self._aborted = False
        self._wake_fd = WakeFd()
        self._latencies: List[float] = []
        self._done = threading.Event()
        self._connected_wall = 0.0
        self._events_since = 0
        self._order: List[SourceBlock] = []
        try:
            self._open(page_sizes)
            address = self._setup_destination(qmp) if qmp is not None else connect
            assert address is not None
            self.stats.preempt = self._preempt
            # before the connect (the clock runs from it): the blocks and their
            # sent map (a block that does not fit its host pages is refused here,
            # with nothing sent), the engine (it imports ctypes: QEMU may ask for
            # pages while it loads the devices, and must not wait), the opening
            self._order = source_blocks(self._snap, self._page_sizes)
            pages = self._build_sender()
            self._address = address
            opening = self._opening()
            sock = open_connection(address, timeout)
            if self._preempt and sock.family == socket.AF_UNIX:   # (TCP tunes its own)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _MAIN_SNDBUF_PREEMPT)
            self._main = _channel(sock, "main", splice=self.options.splice)
            self._connected_wall = time.time()
            self._connected = pages.t0 = time.monotonic()
            # everything up to RUN (~15 KB) goes into the socket at once: a source
            # that dies from here on has delivered RUN, and its destination can be
            # recovered; between the connect and RUN it could not
            self._main.queue(opening)
            self.stats.bytes_sent += self._main.flush(lambda t: None)
            self._thread = threading.Thread(target=self._serve, name="uffdpy-resume",
                                            daemon=True)
            self._thread.start()
        except BaseException:
            self._release()
            raise

    # -- setup

    def _open(self, page_sizes: Optional[Dict[str, int]]) -> None:
        snap = self._snap = self._given or Snapshot.open(self._snapshot_path)
        if snap.target_page_bits != 12:
            raise ResumeError(f"{snap.path}: target page bits {snap.target_page_bits}; "
                              "only 4 KiB target pages (x86) are supported")
        if snap.early_device_state_range[1] > snap.early_device_state_range[0]:
            self._early = snap.read_range(*snap.early_device_state_range)
        else:
            self._early = b""
        self._devices = snap.read_range(snap.device_state_range[0], snap.eof_offset)
        # the file the snapshot validated, not whatever has its name now
        self._map = mmap.mmap(snap.fileno(), 0, prot=mmap.PROT_READ)
        self._view = memoryview(self._map)
        self._page_sizes = dict(page_sizes or {})
        if self._ws_path is not None or self._record_path is not None:
            from ..workingset import load_for, snapshot_identity   # only a command that needs it
            self._ws = load_for(self._ws_path, snap)  # refused before anything is sent
            if self._record_path is not None:
                self._identity = snapshot_identity(snap)

    def _build_sender(self) -> PageSender:
        from .sender import PageSender
        assert self._view is not None
        pages = self._pages = PageSender(self._order, self._view, self.stats,
                                         batch=self.options.batch_for(self._preempt),
                                         around=self._around,
                                         trace=self.trace,
                                         record=self._record_path is not None,
                                         fd=self._snap.fileno() if self._snap else None)
        if self._ws is not None:
            pages.queue_working_set(self._ws.pages)
        return pages

    def _setup_destination(self, qmp: str) -> str:
        dest = self._dest = QemuDestination(qmp, timeout=self._timeout)
        self._events_since = len(dest.client.events)
        if self._recover:
            # preempt as the paused destination has it (fixed when its migration
            # began: a stream that disagreed would hang the recovery), as the
            # command does; what was asked only if QEMU does not answer.  A guest
            # blocked on a missing page holds QEMU's main loop, and only out-of-band
            # commands are answered: none in band here but this one bounded query
            # (page sizes: 4 KiB unless page_sizes says otherwise; the bitmaps'
            # lengths are checked)
            self._preempt = dest.preempt_capability(self._preempt)
            return dest.recover()
        dest.refuse_private_file_backends()     # before anything can discard its RAM
        dest.prepare(preempt=self._preempt)
        assert self._snap is not None
        # machine and RAM lengths checked first; the blocks' host page sizes come with it
        self._page_sizes = {**dest.check_matches(self._snap), **self._page_sizes}
        address, self._fd_socket = dest.listen_private(self._transport)
        return address

    # -- the serving loop (its own thread; owns the sockets and the sent map)

    def _serve(self) -> None:
        # splice(2) into a socket whose peer is gone raises SIGPIPE (it takes no
        # MSG_NOSIGNAL), which kills a process that left it at its default: blocked in
        # this thread, the only one that splices, the call fails with EPIPE instead
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})
        cpu0 = time.thread_time()
        try:
            self._loop()
        except BaseException as e:                          # re-raised from wait()
            self._error = self._explain(e)
        finally:
            self.stats.source_cpu_s = round(time.thread_time() - cpu0, 4)
            for ch in (self._main, self._urgent):
                if ch is not None:
                    self.stats.bytes_spliced += ch.spliced
            self._done.set()

    def _explain(self, e: BaseException) -> BaseException:
        if isinstance(e, (ResumeError, ms.StreamError)):
            return e
        if isinstance(e, OSError) and e.errno in (errno.EPIPE, errno.ECONNRESET, None) \
                or isinstance(e, _Hangup):
            reason = self._dest.failure_reason() if self._dest is not None else None
            return DestinationError("the destination closed the migration connection "
                                    "(QEMU failed the load or exited)", reason)
        if isinstance(e, OSError) and e.errno == errno.EFAULT:
            return ResumeError(f"{self._snapshot_path}: the snapshot's pages cannot be read "
                               "(the file was truncated or changed during the resume)")
        return e

    def _opening(self) -> bytes:
        """What is sent at the connect: the recovery's bitmap requests, or the preamble and,
        without preempt and a working set before RUN, the package with RUN."""
        if self._recover:
            return b"".join(ms.recv_bitmap(b.name) for b in self._order)
        out = self._preamble()
        if self._ws_placement != "before-run":
            out += ms.ping(2)
            if not self._preempt:
                out += self._package()
        return out

    def _preamble(self) -> bytes:
        """Everything before the package but PING 2: header to the one mandatory DISCARD.

        A working set placed before RUN goes right after it, as precopy pages:
        the destination copies them into RAM at once and marks them received,
        so the guest starts with them.  They must follow the DISCARD, which
        turns transparent huge pages off in guest RAM: before it, one 4 KiB
        write would make a whole 2 MiB page present, and a later page of it
        would be refused (EEXIST).
        """
        assert self._snap is not None
        snap = self._snap
        first = self._order[0]
        summary = 0
        for b in self._order:
            summary |= b.host_page
        return b"".join([
            ms.header(), ms.configuration(snap.machine, uuid=snap.uuid),
            ms.open_return_path(), ms.ping(1), ms.postcopy_advise(summary, PAGE),
            self._early,
            ms.ram_start(snap.ram_section_id, [(b.name, b.length) for b in self._order]),
            ms.switchover_start(),
            ms.postcopy_ram_discard(first.name, [(0, first.host_page)])])

    def _package(self) -> bytes:
        blob = ms.postcopy_listen() + self._devices + ms.ping(3) + ms.postcopy_run()
        return ms.packaged(blob) + ms.ping(4)

    def _loop(self) -> None:
        """Poll the return path and the sockets, flush, and stream, until SHUT.

        The mechanics (what to write, when, how long to wait) are here; what
        each message of the return path does is :meth:`_on_message`, and the
        phase changes that follow from them :meth:`_advance`.
        """
        main, pages = self._main, self._pages
        assert main is not None and pages is not None
        rp = ms.ReturnPath()
        st = LoopState(sid=self._snap.ram_section_id if self._snap else 1)
        sid = st.sid
        if self._recover:
            st.phase = Phase.BITMAPS           # the RECV_BITMAP commands went in the opening
        else:
            if self._ws_placement == "before-run":
                while pages.ws_queue:          # precopy pages, then PING 2 (the preamble's end)
                    pages.queue_ws_batch(main, sid)
                main.queue(ms.ping(2))
                if not self._preempt:
                    main.queue(self._package())
            st.phase = Phase.AWAIT_PONG2 if self._preempt else Phase.PACKAGE
        background_at: Optional[float] = None
        stream_ok_at = 0.0         # when PONG 3 came (the idle clock of background_idle starts)
        poller = select.poll()
        main_fd = main.sock.fileno()
        poller.register(self._wake_fd.fd, select.POLLIN)
        served = self._served
        quickack = main.sock.family in (socket.AF_INET, socket.AF_INET6)
        progress_at = time.monotonic()          # the last byte written or read
        sent_before = self.stats.bytes_sent
        while not st.shut:
            if self._stop:
                raise ResumeError("stopped before the migration completed")
            now = time.monotonic()
            if self.stats.bytes_sent != sent_before:
                sent_before, progress_at = self.stats.bytes_sent, now
            serving = st.phase is Phase.SERVING
            waiting = awaited(st, main, self._urgent)
            if waiting is not None and now - progress_at > self._stall_s:
                raise ResumeError(f"the load made no progress for {self._stall_s:g}s: "
                                  f"waited for {waiting}")
            elif waiting is None:
                progress_at = now
            if st.stream_ok and background_at is None and self._background:
                if self._background_idle is None:
                    background_at = now + self._background_delay  # also after start_background()
                elif now - max(pages.last_request, stream_ok_at) >= self._background_idle:
                    background_at = now                            # the guest went quiet
            if st.stream_ok and stream_ok_at == 0.0:
                stream_ok_at = now
            # 1. write what is queued
            for ch in (self._urgent, main):
                if ch is not None and ch.busy:
                    self.stats.bytes_sent += ch.flush(served)
            # 2. queue one background batch once the main channel has drained
            streaming = (serving and self._background and background_at is not None
                         and now >= background_at and pages.remaining > 0
                         and now - pages.last_request >= self._yield_s)
            if serving and pages.ws_queue and not main.busy:
                pages.queue_ws_batch(main, sid)          # the working set: first, no yield
                self.stats.bytes_sent += main.flush(served)
            elif streaming and not main.busy:
                pages.queue_batch(main, sid)
                self.stats.bytes_sent += main.flush(served)
            if (serving and pages.remaining == 0 and not st.ended
                    and not main.busy and not (self._urgent and self._urgent.busy)):
                main.queue(ms.end_section(sid) + ms.EOF)
                st.ended = True
                self.stats.bytes_sent += main.flush(served)
            # 3. wait for the return path, room to write, or the wake pipe
            events = select.POLLIN | (select.POLLOUT if main.busy else 0)
            poller.register(main_fd, events)
            if self._urgent is not None:
                poller.register(self._urgent.sock.fileno(),
                                select.POLLOUT if self._urgent.busy else 0)
            if (streaming or (serving and pages.ws_queue)) and not main.busy:
                wait_ms = 0
            elif background_at is not None and now < background_at and pages.remaining:
                wait_ms = max(1, int((background_at - now) * 1000))
            elif background_at is None and self._background_idle is not None and st.stream_ok:
                wait_ms = 50                   # look again whether the guest is idle
            elif pages.remaining and background_at is not None and self._yield_s:
                wait_ms = max(1, int(self._yield_s * 1000))
            else:
                wait_ms = 200
            for fd, ev in poller.poll(min(wait_ms, 200)):
                if fd == self._wake_fd.fd:
                    self._wake_fd.drain()
                    continue
                if fd != main_fd:
                    # the preempt channel: the destination closes it when it is done
                    if ev & (select.POLLERR | select.POLLHUP) and not st.ended:
                        raise _Hangup()
                    if st.ended and self._urgent is not None:
                        poller.unregister(fd)
                        self._close_urgent()
                    continue
                if not ev & (select.POLLIN | select.POLLERR | select.POLLHUP):
                    continue
                try:
                    data = main.sock.recv(_RECV_BYTES)
                except (BlockingIOError, InterruptedError):
                    continue
                if not data:
                    raise _Hangup()
                if quickack:
                    # ACK the return path now: with preempt our answers go on the other
                    # socket, so no data carries the ACK, the kernel delays it ~40 ms, and
                    # QEMU's next small write (a page request) waits for it (Nagle)
                    main.sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
                progress_at = time.monotonic()
                t_read = time.perf_counter()
                rp.feed(data)
                for msg in rp.messages():
                    self._on_message(msg, st, t_read)
                # answer first: the requested pages left in _on_message; a second
                # request in the same read did not wait behind the first one's
                # fault-around, which is built only now
                for block, next_unit, ch in st.around:
                    pages.fault_around(block, next_unit, ch, sid, ch is main)
                st.around.clear()
            # 4. phase changes that wait on the return path
            self._advance(st)
        self._flush_stats()

    def _served(self, t_request: float) -> None:
        """A request's answer is written: its service time, from its read."""
        self._latencies.append(time.perf_counter() - t_request)

    def _on_message(self, msg: ms.RpMessage, st: LoopState, t_read: float) -> None:
        """What one message of the return path does (read at ``t_read``)."""
        main, pages = self._main, self._pages
        assert main is not None and pages is not None
        if isinstance(msg, ms.ReqPages):
            ch = self._urgent or main
            after = pages.answer(msg, t_read, st.sid, ch, ch is main, self._served)
            if after is not None:
                st.around.append(after)
        elif isinstance(msg, ms.Pong):
            st.pongs.add(msg.value)
            if msg.value == 3:
                st.stream_ok = True            # the devices are loaded: the stream may start
        elif isinstance(msg, ms.Shut):
            if msg.error:
                raise DestinationError("the destination refused the migration "
                                       f"stream (SHUT {msg.error})",
                                       self._dest.failure_reason() if self._dest else None)
            if not st.ended:
                raise DestinationError("the destination shut the return path "
                                       "before the stream ended")
            st.shut = True
        elif isinstance(msg, ms.RecvBitmap) and st.phase is Phase.BITMAPS:
            st.bitmaps[msg.block] = msg
        elif isinstance(msg, ms.ResumeAck) and st.phase is Phase.AWAIT_ACK:
            st.phase = Phase.SERVING
            st.stream_ok = True
        else:
            raise ResumeError(f"the destination sent an unexpected "
                              f"{type(msg).__name__} in phase {st.phase.name.lower()}")

    def _advance(self, st: LoopState) -> None:
        """The phase changes that wait on the return path."""
        main, pages = self._main, self._pages
        assert main is not None and pages is not None
        if st.phase is Phase.AWAIT_PONG2 and 2 in st.pongs:
            self._urgent = _channel(open_connection(self._address, self._timeout), "preempt",
                                    splice=self.options.splice)
            main.queue(self._package())
            st.phase = Phase.PACKAGE
        if st.phase is Phase.PACKAGE:
            st.phase = Phase.SERVING    # requests may come from now on; streaming waits for PONG 3
        if st.phase is Phase.BITMAPS and len(st.bitmaps) == len(self._order):
            pages.apply_bitmaps(st.bitmaps)
            if self._preempt:
                # QEMU's destination waits for a new preempt channel after RESUME
                # (loadvm_postcopy_handle_resume); its source opens it once the
                # bitmaps are in, before POSTCOPY_RESUME (postcopy_do_resume)
                self._urgent = _channel(open_connection(self._address, self._timeout),
                                        "preempt", splice=self.options.splice)
            main.queue(ms.postcopy_resume())
            st.phase = Phase.AWAIT_ACK

    def _close_urgent(self) -> None:
        """Close the preempt channel (the destination is done with it)."""
        assert self._urgent is not None
        self.stats.bytes_spliced += self._urgent.spliced
        self._urgent.drop()
        self._urgent.sock.close()
        self._urgent = None

    def _flush_stats(self) -> None:
        self.stats.request_service_us = percentiles(self._latencies, unit=1e6)

    # -- the caller's side

    @property
    def connected_at(self) -> float:
        """``time.time()`` of the connect: time zero of the stats (QEMU's events use that clock)."""
        return self._connected_wall

    def progress(self) -> Tuple[int, int]:
        """``(data host pages sent, data host pages in the snapshot)``; racy, for display."""
        pages = self._pages
        return (pages.total_units - pages.remaining, pages.total_units) if pages else (0, 0)

    def start_background(self) -> None:
        """Start the background stream now (after ``background=False``)."""
        self._background = True
        self._background_delay = 0.0
        self._background_idle = None
        self._wake()

    def _wake(self) -> None:
        self._wake_fd.signal()

    def wait(self, timeout: Optional[float] = None) -> ResumeStats:
        """Wait until the migration completed; return the stats.

        Raises: TimeoutError after ``timeout`` seconds (the resume goes on);
        the serving thread's error (DestinationError, ResumeError...).
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"the resume of {self._snapshot_path} is not complete "
                               f"after {timeout:g}s")
        if self._error is not None:
            raise self._error
        self._finish_times()
        if self._record_path is not None and not self._record_saved:
            self.save_working_set(self._record_path)
        return self.stats

    def report(self, **extra: Any) -> Dict[str, Any]:
        """The stats as a dict, with the per-page trace (``trace=True``) as ``uffdpy plot`` reads it.

        ``extra`` (e.g. ``answer_s``, seconds from the connect to a guest's
        answer) is added as is.
        """
        out: Dict[str, Any] = {**self.stats.as_dict(), **extra}
        if self.trace is not None:
            out["trace"] = {"columns": ["t_s", "block", "page", "by"],
                            "blocks": [[b.name, b.length] for b in self._order],
                            "rows": [[round(t, 6), b, p, w] for t, b, p, w in self.trace]}
        return out

    def recorded(self) -> WorkingSet:
        """The pages demanded so far (with ``record_ws``), in order of first demand."""
        assert self._snap is not None or self._identity is not None
        from ..workingset import WorkingSet
        ident = self._identity
        pages = sorted(self._pages.recorded.items() if self._pages else (),
                       key=lambda kv: kv[1][0])
        return WorkingSet(snapshot=dict(ident or {}),
                          pages=[(b, p, t, d) for (b, p), (t, d) in pages])

    def save_working_set(self, path: PathLike) -> None:
        """Write :meth:`recorded` to ``path`` (atomically)."""
        self.recorded().save(path)
        self._record_saved = True

    def _finish_times(self) -> None:
        dest = self._dest
        if dest is None:
            if self.stats.time_to_complete_s is None:
                self.stats.time_to_complete_s = round(time.monotonic() - self._connected, 6)
            return
        try:
            done = dest.client.wait_event(
                "MIGRATION", since=self._events_since, timeout=self._timeout,
                match=lambda e: e.get("data", {}).get("status") == "completed")
        except (TimeoutError, ConnectionError):
            done = None
        if done is not None:
            self.stats.time_to_complete_s = round(event_time(done) - self._connected_wall, 6)
        for event in dest.client.events[self._events_since:]:
            if event.get("event") == "RESUME":
                self.stats.time_to_running_s = round(event_time(event) - self._connected_wall, 6)
                break

    def running_after(self, timeout: float) -> Optional[float]:
        """Seconds from connect to the guest's RESUME event, waiting up to ``timeout``; None if not."""
        if self._dest is None:
            return None
        try:
            event = self._dest.client.wait_event("RESUME", since=self._events_since,
                                                 timeout=timeout)
        except (TimeoutError, ConnectionError):
            return None
        return event_time(event) - self._connected_wall

    def abort(self) -> None:
        """Drop the connection at once, as a crashed source would (the destination pauses)."""
        self._aborted = True
        self.close()

    def close(self) -> None:
        """Stop serving and release everything; safe to call again.

        Closing before completion leaves a destination that ran ``postcopy-paused``.
        """
        if self._thread is not None and self._thread.is_alive():
            self._stop = True
            self._wake()
            self._thread.join(timeout=self._timeout)
        self._release()

    def _release(self) -> None:
        for ch in (self._urgent, self._main):
            if ch is not None:
                ch.drop()
                ch.sock.close()
        self._urgent = self._main = None
        sock = self._fd_socket
        if sock is not None:
            sock.close()
            self._fd_socket = None
        if self._pages is not None:
            self._pages.release()
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            # nothing slices the mapping (the channels hold addresses, cleared above)
            self._map.close()
            self._map = None
        if self._snap is not None and self._snap is not self._given:
            self._snap.close()
        self._snap = None
        if self._dest is not None:
            self._dest.close()
            self._dest = None
        self._wake_fd.close()

    def __enter__(self) -> "Resume":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: with preempt, the main channel's send buffer (the kernel doubles it, up to
#: net.core.wmem_max): the answers take the other channel, so a deeper stream
#: only means fewer wake-ups (the 1 GiB guest: 0.164 -> 0.147 s of CPU)
#: (deeper when spliced, 1 MiB, was tried: no sure gain, and what a source that
#: dies has in the socket is lost, for the recovery to send again)
_MAIN_SNDBUF_PREEMPT = 256 << 10


def _channel(sock: socket.socket, name: str, *, splice: bool = False) -> "Channel":
    from .sender import Channel        # imported before the connect (_build_sender)
    return Channel(sock, name, splice=splice)


class _Hangup(Exception):
    """The destination closed the connection."""
