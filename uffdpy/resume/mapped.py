"""Resume with guest RAM mapped copy-on-write from the snapshot file: clones in milliseconds.

A mapped-ram file keeps page *i* of each RAMBlock at ``pages_offset + i *
4096``, every ``pages_offset`` 1 MiB-aligned, and pages never written are
holes.  So ``[pages_offset, pages_offset + length)`` *is* the block's memory
image, and QEMU can map it as the block's RAM with a file backend::

    -object memory-backend-file,id=pc.ram,size=LEN,mem-path=SNAP,offset=OFF,
            share=off,readonly=on,rom=off
    -machine memory-backend=pc.ram

``share=off`` maps it private: the guest's first touch of a page is served
from the page cache, its first write makes a private copy, and every clone of
one snapshot shares the pages none of them wrote (QEMU's "VM templating",
Firecracker's default restore).  ``readonly=on`` opens the file O_RDONLY,
so neither the guest nor QEMU can change it.

What uffdpy still sends is a *precopy* stream, a few hundred KB: the header,
the configuration, the early device sections, the "ram" START listing every
block, PART sections with the data pages of the blocks that are not mapped
(ROMs, VGA RAM, firmware tables), ZERO records for *stale* pages of the
mapped ones, END, then the snapshot's device sections, EOF and vmdesc byte
for byte.  QEMU's precopy load checks each listed block's length, loads
whatever pages come and never asks for the rest (``ram_load_precopy``), so a
mapped block needs none of its pages sent.  QEMU then restores the saved run
state (a snapshot saved paused loads paused); uffdpy continues the VM unless
asked to leave it paused.

**Stale pages.** Mapped-ram clears a page's bitmap bit when the page is
found zero, without touching the file.  After a *live* save a clear-bit page
can still hold the bytes of an earlier iteration; a restore from the bitmap
reads it as zero, a mapping would show the old bytes.  So for each mapped
block the clear-bit pages that are not holes in the file (``SEEK_DATA`` /
``SEEK_HOLE``; without them every clear-bit page) are read, and each that
is not all zero gets a ZERO record: QEMU zeroes it in the guest's private
copy.  A save of a stopped VM writes each page once and leaves none.

**Never destroy the snapshot.** The file must stay unchanged for the life of
every VM that maps it: a page the guest has not written is read from the
file as it is *now*, and a truncated file kills QEMU with SIGBUS (QEMU's
own ``migrate file:`` to the same path truncates first).  A new file
*renamed* over the path is harmless (the clones keep the old inode; all of
uffdpy's writers replace files that way).  The postcopy path refuses a
destination whose RAM is a private file mapping (:mod:`.destination`).

**A cold page cache.** With a working set (the recordings the postcopy path
makes), a background thread reads the recorded pages' file ranges into the
page cache, coalesced into runs, in recorded order, from before the device
state is sent (``MADV_POPULATE_READ`` on a read-only mapping of the file:
synchronous, no copy); ``warm="all"`` then reads the rest in file order.
"""
from __future__ import annotations

import errno
import os
import shlex
import socket
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .. import migstream as ms
from ..ioctl import MADV_POPULATE_READ
from ..mappedram import MACHINE_RAM_IDS, RamBlock, Snapshot, TARGET_PAGE_SIZE, backend_blocks
from ..memory import Mapping
from ..pagesource import PathLike
from ..record import Record
from ..workingset import load_for
from .destination import (DestinationError, QemuDestination, ResumeError, event_time,
                          open_connection)

__all__ = ["MapResume", "MapStats", "backend_object", "map_arguments",
           "map_qemu_command", "stale_pages", "WARM_MODES"]

PAGE = TARGET_PAGE_SIZE
ZERO_PAGE = bytes(PAGE)
#: ``warm=`` values: None (no warm-up), "ws" (the working set's pages), "all" (them, then the rest)
WARM_MODES = (None, "ws", "all")
#: bytes per MADV_POPULATE_READ call: small enough that close() stops the warmer soon
_WARM_CHUNK = 2 << 20
#: pages per PART section of a streamed block
_PART_PAGES = 256


# ------------------------------------------------------------------ which blocks, which arguments

def _opt(value: str) -> str:
    """A QemuOpts value: commas are doubled."""
    return value.replace(",", ",,")


def backend_object(snap: Snapshot, block: RamBlock, *, extra: Sequence[str] = ()) -> str:
    """The ``-object`` value that maps ``block`` of ``snap`` private and read-only."""
    path = os.path.abspath(snap.path)
    props = [f"memory-backend-file,id={_opt(block.name)}", f"size={block.length}",
             f"mem-path={_opt(path)}", f"offset={block.pages_offset}",
             "share=off", "readonly=on", "rom=off", *extra]
    return ",".join(props)


def map_arguments(snap: Snapshot) -> List[str]:
    """What a destination of ``snap`` needs besides the VM's own arguments (a list of words).

    ``-object`` for every mappable block and ``-machine memory-backend=ID``
    for the machine's RAM (QEMU merges several ``-machine`` options).  A NUMA
    guest's ``-numa node,memdev=ID`` names these objects instead of its own.
    Raises: ResumeError when the snapshot has no block that can be mapped.
    """
    blocks = backend_blocks(snap)
    if not blocks:
        raise ResumeError(f"{snap.path}: no RAMBlock a memory backend can map "
                          f"(blocks: {', '.join(b.name for b in snap.blocks)})")
    words: List[str] = []
    for b in blocks:
        words += ["-object", backend_object(snap, b)]
    for b in blocks:
        if b.name in MACHINE_RAM_IDS:
            words += ["-machine", f"memory-backend={_opt(b.name)}"]
            break
    return words


#: properties every memory backend has, kept when a user's backend becomes a file one
_BACKEND_COMMON = ("merge", "dump", "prealloc", "prealloc-threads", "prealloc-context",
                   "host-nodes", "policy", "reserve", "x-use-canonical-path-for-ramblock-id")


def _split_opts(value: str) -> List[str]:
    """Split a QemuOpts string on single commas (``,,`` is a literal comma)."""
    parts, cur, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += value[i]
        i += 1
    parts.append(cur)
    return parts


def map_qemu_command(argv: Sequence[str], snap: Snapshot) -> List[str]:
    """A user's QEMU command (binary first) made to map ``snap``: the ``--`` form of ``--map``.

    A ``-object memory-backend-ram|memfd|file,id=X,...`` whose id names a
    mappable block becomes the file-backed one (its common properties such
    as ``policy`` kept); the other mappable blocks get their ``-object``,
    and the machine's RAM its ``-machine memory-backend=`` unless the
    command names one already.
    """
    blocks = {b.name: b for b in backend_blocks(snap)}
    out: List[str] = []
    replaced = set()
    machine_backend = False
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        value = words[i + 1] if i + 1 < len(words) else None
        if word in ("-object", "--object") and value is not None and not value.startswith("{"):
            opts = _split_opts(value)
            kv = dict(o.split("=", 1) for o in opts[1:] if "=" in o)
            if opts[0].startswith("memory-backend-") and kv.get("id") in blocks:
                name = kv["id"]
                keep = [f"{k}={_opt(v)}" for k, v in kv.items() if k in _BACKEND_COMMON]
                out += [word, backend_object(snap, blocks[name], extra=keep)]
                replaced.add(name)
                i += 2
                continue
        if word in ("-machine", "--machine", "-M") and value is not None \
                and "memory-backend=" in value:
            machine_backend = True
        out.append(word)
        i += 1
    extra: List[str] = []
    for name, block in blocks.items():
        if name not in replaced and name in MACHINE_RAM_IDS:
            extra += ["-object", backend_object(snap, block)]
            if not machine_backend:
                extra += ["-machine", f"memory-backend={_opt(name)}"]
                machine_backend = True
    return out[:1] + extra + out[1:] if out else extra


def _same_file(path: str, st: os.stat_result) -> bool:
    try:
        other = os.stat(path)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


def _check_backends(snap: Snapshot, backends: Dict[str, Dict[str, Any]], where: str
                    ) -> Tuple[List[RamBlock], List[RamBlock]]:
    """``(mapped, streamed)`` blocks; refuses a backend that does not map this very file right.

    Every block the destination backs with a memory backend must be a
    private, read-only mapping of this file (same device and inode) at the
    block's ``pages_offset``.  Raises: DestinationError naming the block,
    what is wrong, and the arguments to use.
    """
    st = os.fstat(snap.fileno())
    mapped: List[RamBlock] = []
    streamed: List[RamBlock] = []
    for block in snap.blocks:
        info = backends.get(block.name)
        if info is None:
            streamed.append(block)
            continue
        wrong: Optional[str] = None
        if info["type"] != "memory-backend-file":
            wrong = f"a {info['type']}"
        elif not _same_file(str(info.get("mem-path")), st):
            wrong = f"a mapping of {info.get('mem-path')}, another file"
        elif int(info.get("offset") or 0) != block.pages_offset:
            wrong = (f"mapped at offset {info.get('offset')}, not at the block's "
                     f"{block.pages_offset}")
        elif info.get("share"):
            wrong = "a shared mapping (share=on): the guest would write into the snapshot"
        elif not info.get("readonly"):
            wrong = "a writable mapping (readonly=off)"
        if wrong is not None:
            raise DestinationError(
                f"{where}: the destination's RAM {block.name!r} is {wrong}; map it from "
                f"this snapshot with: -object {backend_object(snap, block)}"
                + (f" -machine memory-backend={block.name}"
                   if block.name in MACHINE_RAM_IDS else "")
                + f" (see: uffdpy qemu-args {shlex.quote(snap.path)} --map)")
        mapped.append(block)
    if not mapped:
        args = " ".join(shlex.quote(w) for w in map_arguments(snap))
        raise DestinationError(f"{where}: no RAM of the destination is mapped from "
                               f"{snap.path}; start it with: {args}")
    return mapped, streamed


# ------------------------------------------------------------------ stale pages

def _data_extents(fd: int, start: int, end: int) -> Iterator[Tuple[int, int]]:
    """Byte ranges of ``[start, end)`` that hold data (``SEEK_DATA``/``SEEK_HOLE``).

    A file system without them yields the whole range: every byte is read.
    """
    pos = start
    while pos < end:
        try:
            a = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:           # no data after pos
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, end
                return
            raise
        if a >= end:
            return
        b = min(os.lseek(fd, a, os.SEEK_HOLE), end)
        yield a, b
        pos = b


def stale_pages(snap: Snapshot, block: RamBlock) -> List[int]:
    """Pages of ``block`` whose bitmap bit is clear but whose bytes in the file are not zero.

    Only the clear-bit pages that are not holes are read.  Raises: OSError.
    """
    fd = snap.fileno()
    base = block.pages_offset
    clear = [(f, f + n) for f, n, present in block.runs() if not present]
    if not clear:
        return []
    extents = [((a - base) // PAGE, (b - base + PAGE - 1) // PAGE)
               for a, b in _data_extents(fd, base, base + block.length)]
    out: List[int] = []
    i = j = 0
    while i < len(clear) and j < len(extents):      # the two sorted lists, walked together
        lo = max(clear[i][0], extents[j][0])
        hi = min(clear[i][1], extents[j][1])
        page = lo
        while page < hi:
            n = min(hi - page, 256)
            data = os.pread(fd, n * PAGE, base + page * PAGE)
            for k in range(n):
                if data[k * PAGE:(k + 1) * PAGE] != ZERO_PAGE:
                    out.append(page + k)
            page += n
        if clear[i][1] <= extents[j][1]:
            i += 1
        else:
            j += 1
    return out


# ------------------------------------------------------------------ warming the page cache

class _Warmer:
    """A thread that reads file ranges into the page cache, in the order given.

    ``MADV_POPULATE_READ`` on a read-only shared mapping of the file faults
    each range in (synchronously, no copy); where the kernel lacks it, a
    ``pread`` into a scratch buffer does the same.  :meth:`stop` ends it
    within one 2 MiB chunk.
    """

    def __init__(self, fd: int, runs: List[Tuple[int, int]]) -> None:
        self.pages = 0
        self.error: Optional[BaseException] = None
        self._runs = runs
        self._stop = False
        self._fd = os.dup(fd)
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="uffdpy-warm", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            size = os.fstat(self._fd).st_size
            # ctypes releases the GIL for the call: a cold read never stalls the caller
            with Mapping.of_file(self._fd, size) as m:
                populate = True
                for start, length in self._runs:
                    pos, end = start, min(start + length, size)
                    while pos < end and not self._stop:
                        n = min(end - pos, _WARM_CHUNK)
                        if populate:
                            try:
                                m.madvise(MADV_POPULATE_READ, pos, n)
                            except OSError as e:
                                if e.errno != errno.EINVAL:      # before Linux 5.14
                                    raise
                                populate = False
                        if not populate:
                            os.pread(self._fd, n, pos)
                        self.pages += n // PAGE
                        pos += n
                    if self._stop:
                        break
        except BaseException as e:              # shown in the stats, never fatal to the VM
            self.error = e
        finally:
            os.close(self._fd)
            self.done.set()

    def stop(self) -> None:
        self._stop = True
        self._thread.join(timeout=30)


# ------------------------------------------------------------------ the resume

class MapStats(Record):
    """What a mapped resume did.  Times in seconds from the connect; None when unknown.

    ``time_to_running_s``: the destination's RESUME event (None when the VM
    stays paused); ``time_to_complete_s``: its MIGRATION ``completed`` event
    (the device state is loaded); ``prepare_s``: the set-up before the
    connect (QMP checks, stale pages).  ``pages_sent``: data pages of the
    streamed blocks; ``stale_zero_pages``: ZERO records for stale pages;
    ``blocks_mapped``/``blocks_streamed``: block names; ``warm_pages``: pages
    read into the page cache so far (``warm_error``: why warming stopped).
    """
    time_to_running_s: Optional[float] = None
    time_to_complete_s: Optional[float] = None
    prepare_s: Optional[float] = None
    bytes_sent: int = 0
    pages_sent: int = 0
    stale_zero_pages: int = 0
    blocks_mapped: List[str] = []
    blocks_streamed: List[str] = []
    mapped_bytes: int = 0
    warm_pages: int = 0
    warm_error: Optional[str] = None
    mode: str = "map"


class MapResume:
    """Resume ``snapshot`` into a destination whose RAM maps the snapshot file.  A context manager.

    ``qmp`` is the QMP socket of a destination started with ``-incoming
    defer`` and :func:`map_arguments` (``uffdpy qemu-args SNAP --map``).
    The constructor checks the destination's memory backends (each must be a
    private, read-only mapping of this very file at its block's offset),
    finds the stale pages, starts ``migrate-incoming`` on a private address
    (``transport`` ``unix``, ``tcp`` or ``fd``), connects, sends the stream
    and waits for the load; unless ``paused``, the VM runs when it returns.
    ``working_set`` (a recording of the postcopy path) with ``warm="ws"``
    (the default when a working set is given) reads its pages into the page
    cache in a background thread started before the device state is sent;
    ``warm="all"`` reads the whole mapped region after them.  ``snapshot``
    is a path or an open :class:`Snapshot` (the file it validated is the
    one checked against the backends).

    Raises: MappedRamError (bad snapshot; nothing sent), DestinationError
    (a backend that does not map this file, or QEMU's reason for refusing
    the stream), ResumeError, ValueError for bad arguments.
    """

    def __init__(self, snapshot: Union[PathLike, Snapshot], *, qmp: str,
                 paused: bool = False, transport: str = "unix",
                 working_set: Optional[PathLike] = None, warm: Optional[str] = None,
                 timeout: float = 30.0, alive: Optional[Callable[[], bool]] = None) -> None:
        if transport not in ("unix", "tcp", "fd"):
            raise ValueError(f"transport must be unix, tcp or fd, not {transport!r}")
        if warm is None and working_set is not None:
            warm = "ws"
        if warm not in WARM_MODES:
            raise ValueError(f"warm must be ws or all, not {warm!r}")
        if warm == "ws" and working_set is None:
            raise ValueError("warm='ws' needs a working set")
        self.stats = MapStats()
        self._timeout = timeout
        self._paused = paused
        self._own_snap = not isinstance(snapshot, Snapshot)
        self._snap: Optional[Snapshot] = None
        self._dest: Optional[QemuDestination] = None
        self._fd_socket: Optional[socket.socket] = None
        self._warmer: Optional[_Warmer] = None
        self._connected_wall = 0.0
        try:
            t0 = time.monotonic()
            snap = self._snap = snapshot if isinstance(snapshot, Snapshot) \
                else Snapshot.open(snapshot)
            if snap.target_page_bits != 12:
                raise ResumeError(f"{snap.path}: target page bits {snap.target_page_bits}; "
                                  "only 4 KiB target pages (x86) are supported")
            ws = load_for(working_set, snap)            # refused before anything is sent
            # blocking QMP (one thread, a few commands and events): no asyncio to import
            dest = self._dest = QemuDestination(qmp, timeout=timeout, alive=alive,
                                                session=False)
            self._events_since = len(dest.client.events)
            dest.check_matches(snap)
            mapped, streamed = _check_backends(snap, dest.memory_backends(), f"QMP {qmp}")
            self.stats.blocks_mapped = [b.name for b in mapped]
            self.stats.blocks_streamed = [b.name for b in streamed]
            self.stats.mapped_bytes = sum(b.length for b in mapped)
            stale = {b.name: stale_pages(snap, b) for b in mapped}
            if warm is not None:
                self._warmer = _Warmer(snap.fileno(), self._warm_runs(mapped, ws, warm))
            stream = self._stream(streamed, stale)
            self._prepare(dest)
            address, self._fd_socket = dest.listen_private(transport)
            self.stats.prepare_s = round(time.monotonic() - t0, 6)
            self._send(address, stream)
            self._finish(dest)
        except BaseException:
            self.close()
            raise

    # -- set-up

    def _warm_runs(self, mapped: List[RamBlock], ws: Any, warm: str) -> List[Tuple[int, int]]:
        """File ``(offset, length)`` ranges to read: the working set's, then (``all``) the rest.

        The recorded data pages of mapped blocks, in recorded order, with
        consecutive pages of one block coalesced into one range.
        """
        blocks = {b.name: b for b in mapped}
        runs: List[Tuple[int, int]] = []
        if ws is not None:
            last: Optional[Tuple[str, int]] = None
            for name, page, _, data in ws.pages:
                if not data or name not in blocks:
                    continue
                if last == (name, page - 1):
                    start, length = runs[-1]
                    runs[-1] = (start, length + PAGE)
                else:
                    runs.append((blocks[name].pages_offset + page * PAGE, PAGE))
                last = (name, page)
        if warm == "all":
            runs += [(b.pages_offset, b.length) for b in mapped]
        return runs

    def _stream(self, streamed: List[RamBlock], stale: Dict[str, List[int]]) -> List[bytes]:
        """The whole precopy stream, as pieces, built before the connect."""
        snap = self._snap
        assert snap is not None
        sid = snap.ram_section_id
        early = snap.read_range(*snap.early_device_state_range) \
            if snap.early_device_state_range[1] > snap.early_device_state_range[0] else b""
        out = [ms.header(), ms.configuration(snap.machine, uuid=snap.uuid), early,
               ms.ram_start(sid, [(b.name, b.length) for b in snap.blocks])]
        records: List[bytes] = []
        for block in streamed:
            name: Optional[str] = block.name
            for first, count, present in block.runs():
                if not present:
                    continue
                data = block.read_pages(first, count)
                for k in range(count):
                    records.append(ms.page_header((first + k) * PAGE, name))
                    records.append(data[k * PAGE:(k + 1) * PAGE])
                    name = None
                    self.stats.pages_sent += 1
        for block_name, pages in stale.items():
            name = block_name
            for page in pages:
                records.append(ms.zero_record(page * PAGE, name))
                name = None
                self.stats.stale_zero_pages += 1
        for i in range(0, len(records), 2 * _PART_PAGES):
            out += [ms.part_start(sid), *records[i:i + 2 * _PART_PAGES], ms.part_end(sid)]
        out.append(ms.end_section(sid))
        out.append(snap.read_range(snap.device_state_range[0], snap.device_state_range[1]))
        return out

    @staticmethod
    def _prepare(dest: QemuDestination) -> None:
        """Capabilities for a plain precopy load: no mapped-ram, no postcopy."""
        dest.set_capabilities({"mapped-ram": False, "postcopy-ram": False,
                               "postcopy-preempt": False, "events": True},
                              "refuses the capabilities of a precopy load")

    def _send(self, address: str, stream: List[bytes]) -> None:
        sock = open_connection(address, self._timeout)
        self._connected_wall = time.time()
        try:
            sock.setblocking(True)
            sock.settimeout(self._timeout)
            try:
                for piece in stream:
                    sock.sendall(piece)
                    self.stats.bytes_sent += len(piece)
            except OSError as e:
                raise DestinationError("the destination closed the migration connection "
                                       "(QEMU refused the stream)", self._reason()
                                       or (os.strerror(e.errno) if e.errno else str(e))
                                       ) from None
        finally:
            sock.close()
            if self._fd_socket is not None:
                self._fd_socket.close()
                self._fd_socket = None

    def _reason(self) -> Optional[str]:
        # QEMU marks the load failed a moment after it closed the connection
        return self._dest.failure_reason(wait=0.2) if self._dest is not None else None

    def _finish(self, dest: QemuDestination) -> None:
        """Wait for the load; continue the VM unless paused; fill the times."""
        try:
            done = dest.client.wait_event(
                "MIGRATION", since=self._events_since, timeout=self._timeout,
                match=lambda e: e.get("data", {}).get("status") in ("completed", "failed"))
        except TimeoutError:
            raise ResumeError(f"QMP {dest.path}: the destination did not finish loading "
                              f"the device state within {self._timeout:g}s") from None
        if done["data"]["status"] == "failed":
            raise DestinationError("the destination refused the migration stream",
                                   self._reason() or "load failed")
        self.stats.time_to_complete_s = round(event_time(done) - self._connected_wall, 6)
        since = len(dest.client.events)
        status = dest.client.call("query-status").get("status")
        if status != "running" and not self._paused:
            dest.client.call("cont")
        elif status == "running" and self._paused:
            dest.client.call("stop")
        if self._paused:
            return
        try:
            event = next((e for e in dest.client.events[self._events_since:]
                          if e.get("event") == "RESUME"), None)
            if event is None:
                event = dest.client.wait_event("RESUME", since=since, timeout=self._timeout)
        except TimeoutError:
            raise ResumeError(f"QMP {dest.path}: the VM did not run within "
                              f"{self._timeout:g}s of cont") from None
        self.stats.time_to_running_s = round(event_time(event) - self._connected_wall, 6)

    # -- the caller's side

    @property
    def connected_at(self) -> float:
        """``time.time()`` of the connect: time zero of the stats."""
        return self._connected_wall

    def progress(self) -> Tuple[int, int]:
        """``(pages warmed, pages to warm)``; (0, 0) without a warm-up."""
        if self._warmer is None:
            return 0, 0
        return self._warmer.pages, sum(n for _, n in self._warmer._runs) // PAGE

    def wait_warm(self, timeout: Optional[float] = None) -> bool:
        """Wait until the warm-up has read everything; True if it has (or there was none)."""
        return self._warmer is None or self._warmer.done.wait(timeout)

    def wait(self, timeout: Optional[float] = None) -> MapStats:
        """The stats (the resume is complete when the constructor returns)."""
        self._update_warm()
        return self.stats

    def running_after(self, timeout: float) -> Optional[float]:
        return self.stats.time_to_running_s

    def report(self, **extra: Any) -> Dict[str, Any]:
        self._update_warm()
        return {**self.stats.as_dict(), **extra}

    def _update_warm(self) -> None:
        if self._warmer is not None:
            self.stats.warm_pages = self._warmer.pages
            if self._warmer.error is not None:
                self.stats.warm_error = str(self._warmer.error)

    def close(self) -> None:
        """Stop warming and release everything; the VM runs on.  Safe to call again."""
        if self._warmer is not None:
            self._warmer.stop()
            self._update_warm()
            self._warmer = None
        if self._fd_socket is not None:
            self._fd_socket.close()
            self._fd_socket = None
        if self._dest is not None:
            self._dest.close()
            self._dest = None
        if self._snap is not None and self._own_snap:
            self._snap.close()
        self._snap = None

    def __enter__(self) -> "MapResume":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
