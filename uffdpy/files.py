"""Files uffdpy writes: whole or not at all.

:func:`replacing` writes a new file under a temporary name next to it and
renames it into place at the end, so that ENOSPC, a bad input found halfway
or Ctrl-C never leave a partial output, and refuses an output that is its
own input.  Every command that writes a file (``make``, ``convert``,
``dump``, ``rewrite_snapshot``, working sets, pictures) goes through it.
"""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from typing import Iterator, Optional, Sequence, Union

__all__ = ["replacing", "pwrite_all", "copy_range"]

PathLike = Union[str, "os.PathLike[str]"]
BytesLike = Union[bytes, bytearray, memoryview]


def pwrite_all(fd: int, data: BytesLike, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (pwrite may write less)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _umask() -> int:
    """This process's umask, read without changing it (os.umask would, for all threads)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    return 0o022


@contextlib.contextmanager
def replacing(path: PathLike, *, keep_prefix: int = 0, mode: int = 0o600,
              not_same_as: Sequence[PathLike] = ()) -> Iterator[int]:
    """Write a new ``path`` atomically: yield the fd of a temporary file next to it.

    The temporary (``.NAME.XXXXXXXX.tmp`` in the same directory) replaces
    ``path`` with one ``rename`` when the block ends normally; on any
    exception (ENOSPC, a bad input found halfway, ``KeyboardInterrupt``) it
    is removed and ``path`` is left as it was: never a partial file.  The
    first ``keep_prefix`` bytes of an existing ``path`` are copied in first
    (``write_snapshot``'s ``offset``); a symlink is written through (its
    target is replaced); an existing file's permission bits are kept, a new
    file gets ``mode`` less the umask (the default ``0o600``: a snapshot holds
    a guest's memory; working sets and pictures, which hold none, pass
    ``0o644``).

    Raises:
        ValueError: ``path`` is one of ``not_same_as`` (the same inode: an
            output that is its own input would destroy it).
        OSError: from the file system.
    """
    target = os.path.realpath(os.fspath(path))
    try:
        old: Optional[os.stat_result] = os.stat(target)
    except FileNotFoundError:
        old = None
    if old is not None:
        for other in not_same_as:
            try:
                same = os.path.samestat(old, os.stat(other))
            except FileNotFoundError:
                same = False
            if same:
                raise ValueError(f"{os.fspath(path)}: the output is the input file "
                                 f"{os.fspath(other)}; write to another name")
        if not stat.S_ISREG(old.st_mode):
            raise ValueError(f"{os.fspath(path)}: not a regular file; refusing to replace it")
    directory, name = os.path.split(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory or ".")
    except OSError as e:                 # say the file asked for, not the temporary's name
        raise OSError(e.errno, f"{os.fspath(path)}: cannot write it here "
                               f"({e.strerror or e})") from None
    try:
        if old is not None:
            os.fchmod(fd, stat.S_IMODE(old.st_mode))
        else:
            os.fchmod(fd, mode & ~_umask())
        if keep_prefix and old is not None:
            with open(target, "rb") as src:
                copy_range(src.fileno(), fd, 0, min(keep_prefix, old.st_size), skip_zero=True)
        yield fd
        os.close(fd)
        fd = -1
        os.replace(tmp, target)
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno:
            # ENOSPC, EDQUOT, EIO from a write: say which file (none is left)
            raise OSError(exc.errno, f"{exc.strerror or os.strerror(exc.errno)} writing "
                                     f"{os.fspath(path)} (nothing was written)") from exc
        raise


def copy_range(src_fd: int, dst_fd: int, start: int, end: int, *, skip_zero: bool) -> None:
    """Copy bytes ``[start, end)`` of ``src_fd`` to the same offsets of ``dst_fd``
    (``skip_zero``: leave all-zero 8 MiB pieces as holes)."""
    step = 8 << 20
    zero = bytes(step)
    while start < end:
        n = min(step, end - start)
        data = os.pread(src_fd, n, start)
        if len(data) != n:
            raise OSError(f"short read at offset {start:#x}")
        if not (skip_zero and data == zero[:n]):
            pwrite_all(dst_fd, data, start)
        start += n
