"""What the ``uffdpy`` commands share: argument types, sizes for people, the progress bar.

Each argument type raises ``argparse.ArgumentTypeError`` with the reason, so
a bad value is argparse's one-line usage error.
"""
from __future__ import annotations

import argparse
import os
import stat
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

from ..argtypes import (bounded, chunk_size, cpu, fraction, hot_fraction, integer,  # noqa: F401
                        non_negative_float, non_negative_int, number, page_size_multiple,
                        parse_size, positive_float, positive_int, ranges)
from ..record import Record
from ..sizes import qemu_size

if TYPE_CHECKING:
    from ..outcome import Outcome

__all__ = ["sniff", "open_source", "tabulate", "parse_size", "bounded", "integer", "number", "positive_int",
           "non_negative_int",
           "non_negative_float", "positive_float", "cpu", "ranges", "hot_fraction", "page_size_multiple",
           "chunk_size", "fraction", "qemu_size", "mib", "human", "Progress", "printable"]


def tabulate(rows: Any, **options: Any) -> str:
    """``tabulate.tabulate``, imported on first use (it and wcwidth cost ~25 ms at start-up)."""
    from tabulate import tabulate as table
    return str(table(rows, **options))


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def human(n: int) -> str:
    """Bytes in the largest binary unit that keeps a number >= 1: 4.0 KiB, 1.5 GiB."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


class Progress:
    """A one-line progress bar on stderr, shown only on a terminal after ~0.5 s."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.monotonic()
        self.shown = False

    def update(self, done: int, total: int) -> None:
        if not self.enabled or time.monotonic() - self.start < 0.5 or total <= 0:
            return
        width = 30
        filled = width * done // total
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{100 * done / total:5.1f}%")
        sys.stderr.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()


def printable(text: object) -> str:
    """``text`` with every non-printable character escaped (``\x1b``, ``\n``, ``\u202e``).

    Names read from a file (blocks, sections, segments, notes) and errors that
    quote its bytes go through this before reaching a terminal: an ESC from a
    crafted file could otherwise reset or rewrite the screen, and a newline
    would split an error line.
    """
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in s)


# ------------------------------------------------------------------ the image named

def sniff(args: argparse.Namespace) -> Tuple[bytes, bool]:
    """The first bytes of the named file at ``--offset`` and whether it is a regular file.

    One open, with the checks every command makes: an image is a regular file
    or a block device, and not an empty one.
    """
    from ..pagesource import FORMATS, ImageError, open_for_reading
    fd = open_for_reading(args.snapshot)
    try:
        st = os.fstat(fd)
        regular = stat.S_ISREG(st.st_mode)
        empty = regular and st.st_size == 0
        head = os.pread(fd, 8, args.offset)
    finally:
        os.close(fd)
    if empty:
        raise ImageError(args.snapshot, None, "the file is empty", hint="an image holds at "
                         "least the headers of " + " or ".join(f.description for f in FORMATS))
    return head, regular


def open_source(args: argparse.Namespace, head: Optional[bytes] = None) -> Any:
    """The image named on the command line, of whichever format its first bytes say."""
    from ..pagesource import FORMATS, ImageError, format_of
    if head is None:
        head, _ = sniff(args)
    fmt = format_of(head)
    if fmt is None:
        raise ImageError(args.snapshot, args.offset, "file magic",
                         " or ".join(f.describe() for f in FORMATS),
                         head[:4].hex(" ") or "end of file")
    if fmt.takes_offset:
        return fmt.cls().open(args.snapshot, offset=args.offset)
    if args.offset:
        raise ValueError(f"{args.snapshot}: --offset applies to mapped-ram streams "
                         f"only, and this is {fmt.description}")
    return fmt.cls().open(args.snapshot)


def snapshot_arg(sp: argparse.ArgumentParser, *, offset: bool = True) -> None:
    """The IMAGE positional (and mapped-ram's ``--offset``, unless ``offset`` is false)."""
    sp.add_argument("snapshot", metavar="IMAGE",
                    help="a mapped-ram snapshot or an ELF core file")
    if offset:
        sp.add_argument("--offset", type=parse_size, default=0,
                        help="mapped-ram: where the stream starts in the file "
                             "(migrate file:PATH,offset=N)")
    else:
        sp.set_defaults(offset=0)


class Command(Record, frozen=True):
    """One ``uffdpy`` command: its name, ``add_parser``'s keywords, its arguments, what runs it."""

    name: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], "Outcome"]
    parser: Dict[str, Any]
    #: checks of the parsed arguments that argparse cannot make (a usage error)
    check: Optional[Callable[[argparse.Namespace, argparse.ArgumentParser], None]] = None
