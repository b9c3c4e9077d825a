"""What the source sends, as iovec tables: ``(address, length)`` words for libc's ``sendmsg``.

A page goes out as two buffers, its 8-byte header and its 4096 bytes in the
file's mapping.  Python's ``socket.sendmsg`` wants a buffer object for each,
so every page cost two objects, their buffer exports and their release:
most of the source's Python time for a 1 GiB restore.  Here a piece of the
stream is an ``array('Q')`` of ``(address, length)`` pairs, the layout of a
C ``struct iovec`` table, handed to ``sendmsg`` through ctypes (which lets go
of the GIL for the call).

The pairs of a run of pages are copied from a :class:`RunTable`, built a
chunk at a time: the pairs point at the chunk's headers (big-endian words in
a mapping of the table's own, written once and never changed, so the kernel
may read them whenever an entry is sent) and at the pages.  Both are
arithmetic progressions, made at C speed by adding one big integer to
another (see :class:`RunTable`); a run then costs one slice, not an object
per page.

Whoever queues a table keeps its buffers alive until it is sent: the entry
holds the ``bytes`` it points into (a request's headers, the section
frames); the mapping and the run tables outlive every entry.

A table whose every buffer never changes (the file's pages, the run tables'
headers, :class:`Stable` bytes) may instead be spliced (:class:`Splicer`):
the socket then holds the pages themselves, not a copy.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import socket
import struct
import sys
from array import array
from typing import Any, Dict, Optional

from ..ioctl import libc
from ..mappedram import TARGET_PAGE_SIZE
from ..migstream import RamFlag

__all__ = ["Sender", "Splicer", "RunTable", "address", "bytes_address", "pairs_of"]

PAGE = TARGET_PAGE_SIZE
_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_NATIVE = sys.byteorder              # an iovec table is in the machine's byte order


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (its layout is part of the stable buffer protocol)."""

    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p),
                ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
                ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def address(obj: Any) -> int:
    """The address of the first byte of ``obj``'s buffer (bytes, a memoryview, an mmap).

    The address stays valid while ``obj`` lives and, for a mapping, while it
    is open: the caller keeps it so.  Raises: TypeError (no buffer),
    ValueError (a closed mapping).
    """
    view = _PyBuffer()
    _get_buffer(obj, ctypes.byref(view), 0)
    try:
        return view.buf or 0
    finally:
        _release_buffer(ctypes.byref(view))


def _bytes_data_offset() -> int:
    """Where a ``bytes`` object's data starts, from its ``id``: fixed in CPython, checked here."""
    probes = [b"uffdpy", bytes(range(40))]
    offsets = {address(p) - id(p) for p in probes}
    if len(offsets) != 1:
        raise RuntimeError("bytes objects keep their data at no fixed place in this Python")
    return offsets.pop()


_BYTES_DATA = _bytes_data_offset()


def bytes_address(data: bytes) -> int:
    """The address of ``data``'s first byte (only ``bytes``: ~50 ns against ~600 for
    :func:`address`; the request path calls it for each header)."""
    return id(data) + _BYTES_DATA


def pairs_of(piece: bytes) -> array:
    """The one-pair table of ``piece`` (keep ``piece`` alive with it)."""
    return array("Q", (bytes_address(piece), len(piece)))


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.c_void_p), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class Sender:
    """``sendmsg(sock, table, MSG_DONTWAIT | MSG_NOSIGNAL)`` for one socket; one thread's.

    The socket's descriptor is read at each call: once the socket is closed
    that is -1 (EBADF), never a number since given to another file.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._msg = _Msghdr()
        self._ref = ctypes.byref(self._msg)
        self._sendmsg = libc.sendmsg_unchecked

    def send(self, table: array, pairs: int) -> int:
        """Send the first ``pairs`` buffers of ``table``; the bytes the socket took.

        Raises: BlockingIOError (the socket is full), InterruptedError, and
        OSError with the call's errno (EPIPE, ECONNRESET: the peer is gone;
        EFAULT: a buffer cannot be read, such as the mapping of a truncated file).
        """
        msg = self._msg
        msg.msg_iov = table.buffer_info()[0]
        msg.msg_iovlen = pairs
        n: int = self._sendmsg(self.sock.fileno(), self._ref, _FLAGS)
        if n < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise BlockingIOError(err, os.strerror(err))
            if err == errno.EINTR:
                raise InterruptedError(err, os.strerror(err))
            raise OSError(err, os.strerror(err))
        return n


class Splicer:
    """A pipe that moves pages to one socket without copying them: ``vmsplice`` in, ``splice`` out.

    ``vmsplice`` puts references to the pages of a table's buffers in the
    pipe, ``splice`` hands them to the socket, whose buffers then hold the
    pages themselves.  The source never copies the stream's pages, nor
    allocates memory to copy them into: on a VM whose freed memory goes back
    to its host (free page reporting), copying a 1 GiB guest's pages into
    fresh socket memory cost 0.16-0.70 s of system time, splicing them
    0.08-0.10 s (docs/benchmarks.md, session 17).  ``splice`` into a socket
    whose peer is gone raises SIGPIPE: the caller's thread blocks it.

    Only for buffers whose bytes never change once handed over, since the
    peer reads the pages themselves, perhaps after this object and the
    mapping are gone: the file's pages, a :class:`RunTable`'s headers,
    :class:`Stable` bytes; never a Python object's memory, which is reused.
    One buffer takes at least one of the pipe's :attr:`slots`.
    """

    SIZE = 1 << 20                          # the pipe's bytes (fs.pipe-max-size's default)
    _NONBLOCK = 2                           # SPLICE_F_NONBLOCK

    def __init__(self, sock: socket.socket, r: int, w: int) -> None:
        self.sock = sock
        self._r, self._w = r, w
        #: the buffers one :meth:`fill` can take (a pipe's slot holds one page or less)
        self.slots = self.SIZE // mmap.PAGESIZE
        #: the bytes in the pipe, not yet in the socket
        self.held = 0

    @classmethod
    def open(cls, sock: socket.socket) -> Optional["Splicer"]:
        """A splicer for ``sock``, or None when no pipe of :attr:`SIZE` can be had
        (a lower ``fs.pipe-max-size``, the user's pipe memory spent, no descriptors
        left): copy then."""
        try:
            r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            if fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, cls.SIZE) >= cls.SIZE:
                return cls(sock, r, w)
        except OSError:
            pass
        os.close(r)
        os.close(w)
        return None

    def fill(self, table: array, pairs: int) -> int:
        """Put the first ``pairs`` buffers of ``table`` in the pipe; the bytes it took.

        Raises: BlockingIOError (the pipe is full), OSError (EFAULT: a buffer
        cannot be read, such as the mapping of a truncated file).
        """
        n: int = libc.vmsplice(self._w, table.buffer_info()[0], pairs, self._NONBLOCK)
        self.held += n
        return n

    def drain(self) -> int:
        """Move what the socket takes now from the pipe into it; the bytes moved.

        Raises: BlockingIOError (the socket is full), OSError (EPIPE,
        ECONNRESET: the peer is gone).
        """
        n: int = libc.splice(self._r, None, self.sock.fileno(), None, self.held,
                             self._NONBLOCK)
        self.held -= n
        return n

    def close(self) -> None:
        """Close the pipe (what it held is dropped)."""
        if self._r >= 0:
            os.close(self._r)
            os.close(self._w)
            self._r = self._w = -1
            self.held = 0


class Stable:
    """Bytes that never change once written, in a mapping of their own: for :class:`Splicer`.

    :meth:`put` copies a few bytes in, once; they stay until :meth:`close`
    (and, once spliced, as long as the socket holds them).  ``None`` when
    full (the caller keeps its ``bytes`` then, and copies them).
    """

    def __init__(self, size: int = mmap.PAGESIZE) -> None:
        self._map = mmap.mmap(-1, size)
        self._at = address(self._map)
        self._used = 0

    def put(self, data: bytes) -> Optional[array]:
        """The one-pair table of a copy of ``data`` here, or None when it does not fit."""
        n = len(data)
        start = self._used
        if start // mmap.PAGESIZE != (start + n - 1) // mmap.PAGESIZE:
            start = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE     # one buffer, one page
        if start + n > len(self._map):
            return None
        self._map[start:start + n] = data
        self._used = start + n
        return array("Q", (self._at + start, n))

    def close(self) -> None:
        """Unmap the bytes (what was spliced stays, held by the socket)."""
        self._map.close()


class RunTable:
    """The ``(header, page)`` pairs of one block's 4 KiB pages, built ``CHUNK`` pages at a time.

    ``pages_at`` is the address of the block's first page in the file's
    mapping, ``pages`` its number of pages.  Every header here is a CONTINUE
    record's (the caller sends the first page after a change of block with
    its name); the headers live in a mapping of their own, 8 bytes a page,
    written once per chunk and never changed, so the pairs of a chunk can be
    dropped and built again.  The last ``KEEP_CHUNKS`` chunks' pairs are kept
    (a 1 GiB block has 256 chunks of 32 KiB of pairs).  :meth:`close`
    unmaps the headers.

    How a chunk is built: its pairs are four machine words a page (header
    address, 8, page address, 4096).  Read as one integer, adding the integer
    whose words are ``[a, 0, p, 0]`` for every page adds ``a`` to every
    header address and ``p`` to every page address.  So chunk ``k`` is the
    block's chunk 0 plus ``k`` times one such integer: a multiplication by a
    small number and an addition at C speed (about 25 ns a page with its
    headers, against 90 ns for ``array(range(...))`` columns).  Its headers
    likewise: big-endian words, each plus the chunk's first byte offset.
    """

    CHUNK = 1024
    KEEP_CHUNKS = 32

    def __init__(self, pages_at: int, pages: int) -> None:
        t = self._t = _templates(self.CHUNK)
        chunks = -(-pages // self.CHUNK)
        self._headers = mmap.mmap(-1, max(1, chunks) * 8 * self.CHUNK)
        self._built = bytearray(chunks)           # 1: the chunk's headers are written
        self._chunk0 = (t.pairs + address(self._headers) * t.header_words
                        + pages_at * t.page_words)
        self._pairs: Dict[int, memoryview] = {}

    def add(self, table: array, a: int, b: int) -> None:
        """Append the pairs of pages ``[a, b)`` to ``table``."""
        chunk_pages = self.CHUNK
        while a < b:
            k = a // chunk_pages
            pairs = self._pairs.get(k)
            if pairs is None:
                pairs = self._build(k)
            first = k * chunk_pages
            end = min(b, first + chunk_pages)
            table.frombytes(pairs[32 * (a - first):32 * (end - first)])
            a = end

    def close(self) -> None:
        """Drop the pairs and unmap the headers (no entry may point into them any more)."""
        self._pairs.clear()
        self._headers.close()

    def _build(self, k: int) -> memoryview:
        t, n = self._t, self.CHUNK
        if not self._built[k]:
            self._headers[8 * n * k:8 * n * (k + 1)] = \
                (t.headers + k * t.next_headers).to_bytes(8 * n, "big")
            self._built[k] = 1
        chunks = self._pairs
        if len(chunks) >= self.KEEP_CHUNKS:
            del chunks[next(iter(chunks))]            # the oldest built
        pairs = chunks[k] = memoryview((self._chunk0 + k * t.next_pairs).to_bytes(32 * n,
                                                                                 _NATIVE))
        return pairs


class _Templates:
    """The big integers :meth:`RunTable._build` adds (one set, made on first use)."""

    def __init__(self, n: int) -> None:
        flags = int(RamFlag.PAGE | RamFlag.CONTINUE)
        # chunk 0: words (8 i, 8, 4096 i, 4096): offsets from the headers' and pages' starts
        words = array("Q", bytes(32 * n))
        words[0::4] = array("Q", range(0, 8 * n, 8))
        words[1::4] = array("Q", [8]) * n
        words[2::4] = array("Q", range(0, PAGE * n, PAGE))
        words[3::4] = array("Q", [PAGE]) * n
        self.pairs = int.from_bytes(words.tobytes(), _NATIVE)
        self.header_words = int.from_bytes(struct.pack("=4Q", 1, 0, 0, 0) * n, _NATIVE)
        self.page_words = int.from_bytes(struct.pack("=4Q", 0, 0, 1, 0) * n, _NATIVE)
        # the headers of chunk 0, big-endian: page i's is (4096 i | PAGE | CONTINUE)
        self.headers = int.from_bytes(struct.pack(f">{n}Q", *range(flags, PAGE * n, PAGE)),
                                      "big")
        # from one chunk to the next: headers 8 n bytes on, pages and offsets n pages on
        self.next_pairs = int.from_bytes(struct.pack("=4Q", 8 * n, 0, PAGE * n, 0) * n,
                                         _NATIVE)
        self.next_headers = int.from_bytes(struct.pack(">Q", PAGE * n) * n, "big")


_TEMPLATES: Dict[int, _Templates] = {}


def _templates(chunk: int) -> _Templates:
    t = _TEMPLATES.get(chunk)
    if t is None:
        t = _TEMPLATES[chunk] = _Templates(chunk)
    return t
