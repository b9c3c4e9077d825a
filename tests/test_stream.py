"""The postcopy source against a fake destination (tests/fakedest.py): no QEMU, no kernel.

Byte-for-byte checks of what :class:`uffdpy.resume.Resume` sends over a
``socketpair``: every data page exactly once with the file's bytes, zero
pages only when asked for, CONTINUE records, requests answered before their
fault-around, batches and runs of every size, the working set's order,
recovery bitmaps, and a truncated file giving an error, never zeros.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from array import array
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import pytest

from uffdpy import migstream as ms
from uffdpy.mappedram import Snapshot
from uffdpy.harness.synthetic import make_synthetic
from uffdpy.resume import Resume, ResumeError, iovec
from uffdpy.resume.sender import Channel
from uffdpy.workingset import WorkingSet, snapshot_identity

from fakedest import FakeDestination

pytestmark = pytest.mark.timeout(120)

PAGE = 4096


@pytest.fixture(scope="module")
def snap(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("stream") / "s.img"
    make_synthetic(path, size=8 << 20, fill=0.4, seed=11)
    return str(path)


def data_pages(path: str) -> Dict[Tuple[str, int], bytes]:
    out: Dict[Tuple[str, int], bytes] = {}
    with Snapshot.open(path) as s:
        for b in s.blocks:
            for first, count, present in b.runs():
                if present:
                    data = b.read_pages(first, count)
                    for k in range(count):
                        out[(b.name, first + k)] = data[k * PAGE:(k + 1) * PAGE]
    return out


def zero_page(path: str) -> int:
    with Snapshot.open(path) as s:
        return next(f for f, n, present in s.block("ram").runs() if not present)


@contextlib.contextmanager
def serve(path: str, fake_options: Dict = {}, sndbuf: int = 0,
          **options) -> Iterator[Tuple[Resume, FakeDestination]]:
    ours, theirs = socket.socketpair()
    if sndbuf:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    fake = FakeDestination(theirs, **fake_options)
    try:
        r = Resume(path, connect=f"fd:{ours.fileno()}", timeout=10, **options)
    finally:
        ours.close()
    try:
        yield r, fake
    finally:
        r.close()
        theirs.close()


def wait_for_package(fake: FakeDestination) -> float:
    """Until the package (LISTEN, devices, RUN) has arrived; the 10 s deadline, for what follows."""
    deadline = time.monotonic() + 10
    while ms.MigCmd.PACKAGED not in fake.commands:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    return deadline


def run(path: str, fake_options: Dict = {}, sndbuf: int = 0,
        **options) -> Tuple[Dict, FakeDestination]:
    with serve(path, fake_options, sndbuf, **options) as (r, fake):
        stats = r.wait(30).as_dict()
        fake.join()
        return stats, fake


# ------------------------------------------------------------------ the bytes

def test_run_tables_point_at_each_page_and_its_continue_header() -> None:
    # chunks of 4 pages, 2 kept: runs across chunk boundaries and chunks built
    # again after they were dropped give the same pairs, and every header
    # they point at is the single record's
    class Small(iovec.RunTable):
        CHUNK, KEEP_CHUNKS = 4, 2

    pages_at = 0x7F00_0000_0000
    table = Small(pages_at, 17)
    for a, b in ((0, 1), (3, 9), (13, 14), (1, 4), (5, 17), (0, 17)):
        pairs = array("Q")
        table.add(pairs, a, b)
        assert len(pairs) == 4 * (b - a)
        for k, page in enumerate(range(a, b)):
            header_at, header_len, at, length = pairs[4 * k:4 * k + 4]
            assert (header_len, at, length) == (8, pages_at + page * PAGE, PAGE)
            assert ctypes.string_at(header_at, 8) == ms.page_header(page * PAGE, None)
        assert len(table._pairs) <= 2
    table.close()


def _mixed_queue(path: str, ch: Channel) -> Tuple[bytes, int, tuple]:
    """Queue on ``ch``, in turn, stable pieces (framed runs of the file's pages, as the
    background stream makes them) and ``bytes`` records; return the bytes expected, the
    stable pieces' bytes, and what must stay open until they are sent."""
    f = open(path, "rb")
    mapping = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    with Snapshot.open(path) as s:
        ram = s.block("ram")
        runs = [(a, a + n) for a, n, present in ram.runs() if present]
        offset = ram.pages_offset
    table = iovec.RunTable(iovec.address(mapping) + offset, len(mapping) // PAGE)
    stable = iovec.Stable()
    start, end = ms.part_start(3), ms.part_end(3)
    start_at, end_at = stable.put(start), stable.put(end)
    want, stable_bytes = bytearray(), 0
    for k, (a, b) in enumerate(runs[:40]):
        piece = array("Q", start_at)
        table.add(piece, a, b)
        piece += end_at
        body = b"".join(ms.page_header(p * PAGE, None) + mapping[offset + p * PAGE:
                                                                 offset + (p + 1) * PAGE]
                        for p in range(a, b))
        n = len(start) + len(body) + len(end)
        ch.queue_table(piece, n, None, stable=True)
        want += start + body + end
        stable_bytes += n
        record = ms.zero_record(k * PAGE, "ram" if k % 3 == 0 else None)
        ch.queue(record)                      # copied, in its place between the pieces
        want += record
    return bytes(want), stable_bytes, (f, mapping, table, stable)


def _drain(sock: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(1 << 16)
        assert chunk, len(got)
        got += chunk
    return bytes(got)


def _flush_while_read(ch: Channel, ours: socket.socket, theirs: socket.socket, n: int,
                      done: Callable[[float], None] = lambda t: None) -> Tuple[int, bytes]:
    """Flush ``ch`` until it is idle while a thread reads ``n`` bytes from ``theirs``;
    the bytes the flushes wrote, and those read."""
    got: list = []
    reader = threading.Thread(target=lambda: got.append(_drain(theirs, n)))
    reader.start()
    sent, deadline = 0, time.monotonic() + 30
    while ch.busy:
        assert time.monotonic() < deadline
        sent += ch.flush(done)
        select.select([], [ours], [], 1)
    reader.join(30)
    return sent, (got[0] if got else b"")


def _close(ch: Channel, socks: Tuple[socket.socket, ...], keep: tuple) -> None:
    ch.drop()
    for sock in socks:
        sock.close()
    for thing in keep[::-1]:
        thing.close()


def test_a_spliced_channel_keeps_the_order_through_partial_writes(snap: str) -> None:
    """Stable pieces go by the pipe, records by sendmsg once the pipe has drained: the
    stream is byte for byte the queue, however little the socket takes at a time."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.setblocking(False)
    ch = Channel(ours, "main", splice=True)
    want, stable_bytes, keep = _mixed_queue(snap, ch)
    sent, read = _flush_while_read(ch, ours, theirs, len(want))
    assert sent == len(want) and read == want
    assert ch.spliced == stable_bytes                  # every stable piece, and only they
    _close(ch, (ours, theirs), keep)


def test_spliced_pages_outlive_the_mapping_and_the_headers(snap: str) -> None:
    """What the socket holds was spliced from pages, not copied: unmapping the file, the
    run tables' headers and the frames before the peer reads changes none of it."""
    from uffdpy.resume.sender import Channel
    ours, theirs = socket.socketpair()
    for sock, opt in ((ours, socket.SO_SNDBUF), (theirs, socket.SO_RCVBUF)):
        sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
    ours.setblocking(False)
    ch = Channel(ours, "main", splice=True)
    want, stable_bytes, keep = _mixed_queue(snap, ch)
    assert ch.flush(lambda t: None) == len(want) and not ch.busy
    ch.drop()
    ours.close()
    for thing in keep[::-1]:
        thing.close()                                  # the table, the frames, the file
    assert _drain(theirs, len(want)) == want and ch.spliced == stable_bytes
    theirs.close()


@pytest.mark.parametrize("why", ["size", "descriptors"])
def test_without_a_pipe_of_a_mebibyte_the_stream_is_copied(snap: str, why: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # a pipe of that size refused (here: larger than the kernel allows anyone),
    # or no pipe at all (no descriptors left)
    if why == "size":
        monkeypatch.setattr(iovec.Splicer, "SIZE", 1 << 32)
    else:
        def no_pipe(flags: int) -> Tuple[int, int]:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        monkeypatch.setattr(iovec.os, "pipe2", no_pipe)
    with socket.socket(socket.AF_UNIX) as sock:
        assert iovec.Splicer.open(sock) is None
    stats, fake = run(snap, batch_pages=16)
    assert fake.pages == data_pages(snap) and stats["bytes_spliced"] == 0


@pytest.mark.parametrize("splice", [True, False])
def test_an_answer_is_written_at_once_or_queued_in_its_place(snap: str, splice: bool) -> None:
    """``Channel.write``: on an idle channel the answer goes out in one call; behind a
    queue, or into a socket that takes only part of it, the rest waits its turn, and
    the request is done only when its last byte is written."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.setblocking(False)
    ch = Channel(ours, "main", splice=splice)
    done: List[float] = []
    answer = [b"head", os.urandom(PAGE), b"tail"]
    assert ch.write(answer, 1.0, done.append) == PAGE + 8 and done == [1.0]
    assert _drain(theirs, PAGE + 8) == b"".join(answer) and not ch.busy
    # a socket that takes part of it: the rest is queued, the request not done yet
    big = [os.urandom(3 * PAGE), os.urandom(5 * PAGE)]
    n = ch.write(big, 2.0, done.append)
    assert 0 < n < 8 * PAGE and ch.busy and done == [1.0]
    # behind a queue: in its place, after what was queued
    want, _, keep = _mixed_queue(snap, ch)
    ch.write(answer, 3.0, done.append)
    want = b"".join(big) + want + b"".join(answer)
    _, read = _flush_while_read(ch, ours, theirs, len(want), done.append)
    assert read == want and done == [1.0, 2.0, 3.0]
    _close(ch, (ours, theirs), keep)


def test_records_are_kept_where_they_never_change_while_there_is_room(snap: str) -> None:
    """A piece's ZERO records and named headers are copied to the sender's stable
    records, so the piece may be spliced; once those are full, a piece that holds one
    is copied (not stable), its record kept alive with it, and the bytes are the same."""
    from uffdpy.resume.blocks import source_blocks
    from uffdpy.resume.sender import PageSender, _Piece
    from uffdpy.resume.stats import ResumeStats
    with Snapshot.open(snap) as s, open(snap, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        view = memoryview(mapping)
        sender = PageSender(source_blocks(s, {}), view, ResumeStats(), batch=8, around=0)
        try:
            zero, header = ms.zero_record(5 * PAGE, "ram"), ms.page_header(9 * PAGE, "ram")
            for room in (True, False):
                if not room:                             # fill them up
                    while sender._records.put(zero) is not None:
                        pass
                piece = _Piece(sender, 3, framed=False)
                piece.add(zero)
                piece.add_page(header, iovec.address(view) + 4 * PAGE)
                assert piece.stable == room
                assert (zero in piece.keep and header in piece.keep) != room
                t = piece.table
                got = b"".join(ctypes.string_at(t[i], t[i + 1]) for i in range(0, len(t), 2))
                assert got == zero + header + mapping[4 * PAGE:5 * PAGE]
                assert piece.nbytes == len(got)
        finally:
            sender.release()
            view.release()
            mapping.close()


def test_addresses_of_bytes_and_buffers() -> None:
    data = bytes(range(256)) * 3
    assert ctypes.string_at(iovec.bytes_address(data), len(data)) == data
    assert iovec.address(data) == iovec.bytes_address(data)
    pairs = iovec.pairs_of(data)
    assert ctypes.string_at(pairs[0], pairs[1]) == data


@pytest.mark.parametrize("splice", [True, False])
def test_a_table_larger_than_one_call_and_partial_sends(snap: str, splice: bool) -> None:
    # a batch of 1000 pages is ~2000 buffers, more than one sendmsg (1024)
    # takes, one of 200 more than one fill of the pipe (256), and a small
    # socket buffer cuts sends inside headers and pages
    stats, fake = run(snap, sndbuf=4096, batch_pages=200 if splice else 1000,
                      fault_around_pages=0, splice=splice)
    want = data_pages(snap)
    assert fake.pages == want and stats["data_pages_sent"] == len(want)
    # the stream's sections went by the pipe (all but those that name a block)
    spliced = stats["bytes_spliced"]
    assert (spliced > stats["bytes_sent"] // 2) if splice else spliced == 0, stats


@pytest.mark.parametrize("batch", [1, 7, 32, 500])
@pytest.mark.parametrize("around", [0, 3])
def test_every_data_page_once_with_its_bytes(snap: str, batch: int, around: int) -> None:
    stats, fake = run(snap, batch_pages=batch, fault_around_pages=around)
    want = data_pages(snap)
    assert {k: v for k, v in fake.pages.items()} == want     # no zero page, nothing twice
    assert stats["data_pages_sent"] == stats["data_pages"] == len(want)
    assert stats["pages_streamed"] == len(want) and stats["zero_pages_sent"] == 0
    assert fake.commands.count(ms.MigCmd.PACKAGED) == 1



@pytest.mark.parametrize("host_page", [64 << 10, 2 << 20])
def test_blocks_of_larger_host_pages_go_whole(snap: str, host_page: int) -> None:
    # a hugetlb block is placed by whole host pages: each host page holding
    # data goes out whole (its empty 4 KiB pages as ZERO records), one without
    # data not at all, and the stream still ends
    want = data_pages(snap)
    stats, fake = run(snap, page_sizes={"ram": host_page}, batch_pages=3)
    sub = host_page // PAGE
    with_data = {p // sub for _, p in want}
    assert {k: v for k, v in fake.pages.items() if v is not None} == want
    zeros = {p for (_, p), v in fake.pages.items() if v is None}
    assert zeros == {p for u in with_data for p in range(u * sub, (u + 1) * sub)} - {
        p for _, p in want}
    assert stats["data_pages_sent"] == len(want) and stats["zero_pages_sent"] == len(zeros)
    assert not fake.duplicates


def window_of(page: int, size: int) -> list:
    """The other pages of ``page``'s aligned window of ``size`` pages, in the order
    fault-around sends them: after it, then before it."""
    lo = page - page % size
    return [*range(page + 1, lo + size), *range(lo, page)]


def test_requests_are_answered_first_then_their_fault_around(snap: str) -> None:
    want = data_pages(snap)
    pages = sorted(p for _, p in want)
    data = set(pages)

    def mixed(p: int) -> bool:        # data after it and before it, and an empty page
        lo = p - p % 8
        return (any(q in data for q in range(p + 1, lo + 8))
                and any(q in data for q in range(lo, p))
                and any(q not in data for q in range(lo, lo + 8)))
    p1 = next(p for p in pages[10:] if mixed(p))
    p2 = next(p for p in pages if p >= p1 + 100 and mixed(p))
    with Snapshot.open(snap) as s:
        zeros = [f + k for f, n, present in s.block("ram").runs() if not present
                 for k in range(n)]
    zero = next(z for z in zeros if z // 8 not in (p1 // 8, p2 // 8))
    with serve(snap, background=False, fault_around_pages=8) as (r, fake):
        deadline = wait_for_package(fake)
        # two requests in one write: the source reads both in one recv
        raw = b"ram"
        wire = (struct.pack(">HHQI", 3, 12 + 1 + len(raw), p1 * PAGE, PAGE) + bytes([len(raw)])
                + raw + struct.pack(">HHQI", 4, 12, p2 * PAGE, PAGE))
        fake.sock.sendall(wire)
        while len(fake.order) < 2:
            assert time.monotonic() < deadline, fake.order
            time.sleep(0.001)
        order = [p for _, p in fake.order]
        assert order[:2] == [p1, p2], order          # both answers before any fault-around
        # then each one's window of 8 pages, data and empty: after it, then before it
        around = [q for p in (p1, p2) for q in window_of(p, 8)]
        while len(fake.order) < 2 + len(around):
            assert time.monotonic() < deadline, fake.order
            time.sleep(0.001)
        order = [p for _, p in fake.order]
        assert order[2:2 + len(around)] == around, order
        fake.request("ram", zero)                    # a zero page: a ZERO record
        fake.request("ram", p1)                      # already sent: dropped, counted
        while ("ram", zero) not in fake.pages:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        r.start_background()
        stats = r.wait(30).as_dict()
        fake.join()
    # the zero page's request brought its own window too
    sent_around = around + window_of(zero, 8)
    empty = [q for q in sent_around if q not in data] + [zero]
    assert all(fake.pages[("ram", q)] is None for q in empty)     # ZERO records, once each
    assert stats["zero_pages_sent"] == len(empty) and stats["duplicate_requests"] >= 1
    assert stats["pages_requested"] == 3
    assert stats["pages_around"] == len(sent_around)
    assert stats["data_pages_sent"] + stats["zero_pages_sent"] == (
        stats["pages_requested"] + stats["pages_around"] + stats["pages_streamed"])
    assert {k: v for k, v in fake.pages.items() if v is not None} == want
    assert not fake.duplicates


def test_working_set_first_in_recorded_order(snap: str, tmp_path: Path) -> None:
    want = data_pages(snap)
    pages = sorted(p for _, p in want)
    chosen = pages[50:60] + pages[5:8] + [zero_page(snap)] + pages[300:301]
    with Snapshot.open(snap) as s:
        ws = WorkingSet(snapshot=snapshot_identity(s),
                        pages=[("ram", p, 0.0, ("ram", p) in want) for p in chosen])
    ws.save(tmp_path / "w.ws")
    stats, fake = run(snap, working_set=str(tmp_path / "w.ws"), batch_pages=4)
    assert [p for _, p in fake.order[:len(chosen)]] == chosen
    assert stats["pages_working_set"] == len(chosen) and stats["zero_pages_sent"] == 1


def test_recovery_sends_only_what_the_destination_lacks(snap: str) -> None:
    want = data_pages(snap)
    pages = sorted(p for _, p in want)
    held = set(pages[::2])
    with Snapshot.open(snap) as s:
        blocks = {b.name: b.length for b in s.blocks}
    stats, fake = run(snap, fake_options={"received": {"ram": held}, "blocks": blocks},
                      recover=True)
    assert set(p for _, p in fake.pages) == set(pages) - held
    assert stats["recovered"] and stats["pages_already_received"] == len(held)
    assert ms.MigCmd.RECV_BITMAP in fake.commands and ms.MigCmd.POSTCOPY_RESUME in fake.commands



def test_a_message_out_of_its_phase_is_an_error_that_names_both(snap: str) -> None:
    # RESUME_ACK belongs to a recovery; while serving it is a destination gone astray
    with serve(snap, background=False) as (r, fake):
        wait_for_package(fake)
        fake._send(ms.RpType.RESUME_ACK, struct.pack(">I", 1))
        with pytest.raises(ResumeError, match="unexpected ResumeAck in phase (package|serving)"):
            r.wait(10)

def test_truncated_file_is_an_error_never_zeros(snap: str, tmp_path: Path) -> None:
    copy = tmp_path / "t.img"
    shutil.copyfile(snap, copy)
    with serve(str(copy), background=False) as (r, fake):
        wait_for_package(fake)
        with Snapshot.open(copy) as s:
            cut = s.block("ram").pages_offset + (1 << 20)
        os.truncate(copy, cut)
        r.start_background()
        with pytest.raises(ResumeError, match="cannot be read"):
            r.wait(30)
    with Snapshot.open(snap) as s:
        first = s.block("ram").pages_offset
    beyond = {p: v for (_, p), v in fake.pages.items() if first + p * PAGE >= cut}
    assert not beyond, sorted(beyond)[:5]            # nothing past the cut was sent as data


def test_a_requested_page_is_read_from_the_file_and_a_short_read_is_an_error(
        snap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A requested page is read from the file (its first touch in the mapping would
    be a page fault on the answer's way): its bytes as they are; past a truncation,
    the same error as the mapping's EFAULT, never zeros."""
    copy = tmp_path / "t.img"
    shutil.copyfile(snap, copy)
    want = data_pages(snap)
    pages = sorted(p for _, p in want)
    with Snapshot.open(copy) as s:
        first = s.block("ram").pages_offset
    reads: List[int] = []
    pread = os.pread

    def counted(fd: int, n: int, offset: int) -> bytes:
        reads.append(offset)
        return pread(fd, n, offset)
    monkeypatch.setattr(os, "pread", counted)
    asked, cut = pages[len(pages) // 3], pages[2 * len(pages) // 3]
    with serve(str(copy), background=False, fault_around_pages=0) as (r, fake):
        deadline = wait_for_package(fake)
        reads.clear()                                   # the file's parse, before
        fake.request("ram", asked)
        while ("ram", asked) not in fake.pages:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert fake.pages[("ram", asked)] == want[("ram", asked)]
        assert reads == [first + asked * PAGE]
        os.truncate(copy, first + cut * PAGE + 100)            # that page cut in two
        fake.request("ram", cut)
        with pytest.raises(ResumeError, match="cannot be read"):
            r.wait(30)
    assert ("ram", cut) not in fake.pages


def test_a_destination_gone_mid_stream_is_an_error_not_sigpipe(snap: str) -> None:
    """splice(2) raises SIGPIPE when the peer is gone (it has no MSG_NOSIGNAL): in a
    process that left SIGPIPE at its default, the resume still ends with an error.
    (The destination goes right before a splice: the loop would see it hang up first.)"""
    script = """if True:
        import signal, socket, sys
        sys.path.insert(0, sys.argv[2])
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        from fakedest import FakeDestination
        from uffdpy.resume import Resume, iovec
        ours, theirs = socket.socketpair()
        fake = FakeDestination(theirs)
        drain, drains = iovec.Splicer.drain, []
        def drain_after_the_peer_went(self):
            drains.append(1)
            if len(drains) == 3:
                theirs.shutdown(socket.SHUT_RDWR)
            return drain(self)
        iovec.Splicer.drain = drain_after_the_peer_went
        r = Resume(sys.argv[1], connect=f"fd:{ours.fileno()}", timeout=10, batch_pages=8)
        ours.close()
        try:
            r.wait(10)
            print("completed?")
        except Exception as e:
            print("error:", type(e).__name__, e, len(drains))
        r.close()
    """
    proc = subprocess.run([sys.executable, "-c", script, snap, str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "error: DestinationError the destination closed the migration connection" \
        in proc.stdout, proc.stdout


def test_a_file_renamed_over_the_snapshot_is_never_served(snap: str, tmp_path: Path) -> None:
    """Resume(Snapshot) serves the file that was validated, not what has its name now."""
    path = tmp_path / "v.img"
    shutil.copyfile(snap, path)
    other = tmp_path / "other.img"
    make_synthetic(other, size=8 << 20, fill=0.6, seed=99)     # same shape, other bytes
    with Snapshot.open(path) as checked:
        os.replace(other, path)
        with serve(checked) as (r, fake):
            r.wait(30)
            fake.join()
    assert fake.pages == data_pages(snap)


# ---------------------------------------------------------------------- typed options

def test_options_are_checked_once_when_made() -> None:
    from uffdpy.resume.options import ResumeOptions
    for bad, words in [(dict(batch_pages=0), "batch_pages must be >= 1"),
                       (dict(preempt=1), "preempt must be True, False or None"),
                       (dict(transport="udp"), "transport must be unix, tcp or fd"),
                       (dict(working_set="x.ws", recover=True), "not to --recover"),
                       (dict(background_idle=1.0, background_delay=2.0), "not with background"),
                       (dict(stall_timeout=0.0), "stall_timeout must be > 0")]:
        with pytest.raises(ValueError, match=words):
            ResumeOptions(**bad)
    opts = ResumeOptions(working_set="x.ws", ws_placement="before-run", background_delay=3.0)
    again = opts.for_recovery()
    assert (again.recover, again.working_set, again.ws_placement, again.background_delay) == \
        (True, None, "after-run", 0.0)


def test_options_and_keywords_make_one_resume(snap: str) -> None:
    """Keywords override the options value; an unknown keyword is a TypeError, not ignored."""
    from uffdpy.resume.options import ResumeOptions
    base = ResumeOptions(batch_pages=7, fault_around_pages=0)
    with serve(snap, options=base, batch_pages=3) as (r, fake):
        assert (r.options.batch_pages, r.options.fault_around_pages) == (3, 0)
        r.wait(30)
        fake.join()
    with pytest.raises(TypeError):
        Resume(snap, connect="fd:0", batch_page=3)


def test_the_command_line_reads_the_options_back_once() -> None:
    """Each stream flag is registered from ResumeOptions and read back into one value;
    --record-ws alone records the whole demand."""
    from uffdpy.cli import build_parser
    from uffdpy.resume.options import RECORD_IDLE_S, ResumeOptions
    parse = build_parser().parse_args
    default = ResumeOptions.from_args(parse(["resume", "s.img", "--qmp", "q"]))
    assert default == ResumeOptions()
    args = parse(["resume", "s.img", "--qmp", "q", "--batch-pages", "5", "--preempt",
                  "--demand-yield-ms", "0", "--timeout", "9"])
    assert ResumeOptions.from_args(args) == ResumeOptions(batch_pages=5, preempt=True,
                                                          demand_yield_ms=0.0, timeout=9.0)
    assert ResumeOptions.given_flags(args) == ("--preempt", "--batch-pages",
                                               "--demand-yield-ms")
    # preempt: on by default where a second connection can be opened, or as given
    assert default.preempt is None
    assert (default.preempt_over("unix"), default.preempt_over("fd")) == (True, False)
    # batches: larger with preempt, where no answer waits behind one; or as given
    assert (default.batch_for(True), default.batch_for(False)) == (127, 32)
    assert ResumeOptions.from_args(args).batch_for(True) == 5
    # the stream is spliced unless --no-splice
    copied = parse(["resume", "s.img", "--qmp", "q", "--no-splice"])
    assert (default.splice, ResumeOptions.from_args(copied).splice) == (True, False)
    assert ResumeOptions.given_flags(copied) == ("--no-splice",)
    off = parse(["resume", "s.img", "--qmp", "q", "--no-preempt"])
    assert ResumeOptions.from_args(off).preempt_over("unix") is False
    assert ResumeOptions.given_flags(off) == ("--no-preempt",)
    alone = ResumeOptions.from_args(parse(["resume", "s.img", "--qmp", "q",
                                           "--record-ws", "w.ws"]))
    assert (alone.fault_around_pages, alone.background_idle) == (0, RECORD_IDLE_S)
    chosen = ResumeOptions.from_args(parse(["resume", "s.img", "--qmp", "q", "--record-ws",
                                            "w.ws", "--fault-around", "4"]))
    assert (chosen.fault_around_pages, chosen.background_idle) == (4, None)


def test_the_private_directory_of_the_sockets(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Under $TMPDIR, a new name each time, mode 0700; removed with its sockets."""
    from uffdpy.resume.destination import _private_directory, _remove_sockets_directory
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    first, second = _private_directory("m-"), _private_directory("m-")
    assert first != second and os.path.dirname(first) == str(tmp_path)
    assert os.stat(first).st_mode & 0o777 == 0o700
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(os.path.join(first, "migration.sock"))
    listener.close()
    _remove_sockets_directory(first)
    _remove_sockets_directory(first)                # gone already: quietly nothing
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(second)]


def test_the_server_forked_ahead_is_reaped_when_the_set_up_fails(snap: str,
                                                                  tmp_path: Path) -> None:
    """The command's first server forks before the QMP session opens; a set-up that
    fails (here: no QEMU at the socket) dismisses it, and it is reaped, not left.
    (In a process of its own, single-threaded as the command is: pytest's is not.)"""
    script = """if True:
        import os, sys
        from uffdpy.resume.supervise import SupervisedResume
        supervisor = SupervisedResume(sys.argv[1], qmp=sys.argv[2], timeout=0.5)
        forked = []
        fork = supervisor._fork_server
        def fork_and_note():
            server = fork()
            forked.append(server.pid)
            return server
        supervisor._fork_server = fork_and_note
        try:
            supervisor.run()
        except TimeoutError as e:
            print("refused:", e)
        try:
            os.kill(forked[0], 0)
            print("left:", forked, supervisor.server_pid)
        except ProcessLookupError:
            print("reaped:", len(forked), supervisor.server_pid)
    """
    proc = subprocess.run([sys.executable, "-c", script, snap, str(tmp_path / "no-qemu.sock")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "refused:" in proc.stdout and "no such socket" in proc.stdout
    assert "reaped: 1 None" in proc.stdout, proc.stdout
