"""The blocks of a resume as the source sees them: where the pages are, which hold data,
which are sent.

Built before the connect (a 1 GiB block's take milliseconds, and a block
that does not split into its host pages is refused before anything is sent);
:class:`~uffdpy.resume.sender.PageSender` claims their pages after it.
Nothing here imports ctypes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from ..mappedram import TARGET_PAGE_SIZE
from .destination import ResumeError

if TYPE_CHECKING:
    from .iovec import RunTable

__all__ = ["SourceBlock", "source_blocks", "unsent_runs", "data_runs_in", "PAGE"]

PAGE = TARGET_PAGE_SIZE


def source_blocks(snap: Any, page_sizes: Dict[str, int]) -> List["SourceBlock"]:
    """A :class:`SourceBlock` for each block of ``snap``, in its order.

    ``page_sizes``: the host page size of each block (4 KiB when absent).
    Raises: ResumeError (a block that does not split into its host pages).
    """
    out = []
    for b in snap.blocks:
        host = page_sizes.get(b.name, PAGE)
        if host < PAGE or host % PAGE or b.length % host:
            raise ResumeError(f"{snap.path}: block {b.name!r} of {b.length:#x} bytes "
                              f"does not split into host pages of {host} bytes")
        out.append(SourceBlock(b, host))
    return out


class SourceBlock:
    """A RAMBlock as the source sees it: where its pages are, which hold data, which were sent."""

    def __init__(self, block: Any, host_page: int) -> None:
        self.name: str = block.name
        self.length: int = block.length
        self.pages_offset: int = block.pages_offset
        self.host_page = host_page
        self.sub = host_page // PAGE              # target pages per host page
        runs = [(first, count) for first, count, is_data in block.runs() if is_data]
        present = bytearray(block.pages)
        for first, count in runs:
            present[first:first + count] = b"\x01" * count
        self.present = bytes(present)
        units = block.length // host_page
        self.sent = bytearray(units)              # 1 = the host page is sent or in flight
        #: the host pages holding data, for blocks of larger host pages (hugetlb);
        #: 4 KiB blocks stream by ``data_runs`` and need no list (a 1 GiB block's
        #: took 5 ms, on the way to the connect)
        self.data_units: List[int] = [] if self.sub == 1 else [
            u for u in range(units) if any(self.present[u * self.sub:(u + 1) * self.sub])]
        #: the number of 4 KiB pages holding data, and of host pages holding data
        self.data_pages = self.present.count(1)
        self.data_count = self.data_pages if self.sub == 1 else len(self.data_units)
        #: the runs of data pages, ``(first, end)``, and the stream's place in them:
        #: ``data_runs[cursor]``, from page ``run_pos`` (blocks of 4 KiB host pages)
        self.data_runs = [(f, f + n) for f, n in runs]
        self.cursor = 0                           # the background stream's position
        self.run_pos = 0
        #: the address of the block's first page in the file's mapping, and the
        #: pairs of its runs (blocks of 4 KiB host pages): set by the PageSender
        self.pages_at = 0
        self.table: Optional["RunTable"] = None


def _stretches(buf: Any, value: int, start: int, end: int) -> List[Tuple[int, int]]:
    """The stretches ``(a, b)`` of ``buf[start:end]`` whose bytes are all ``value`` (0 or 1)."""
    other = 1 - value
    out: List[Tuple[int, int]] = []
    a = buf.find(value, start, end)
    while a >= 0:
        b = buf.find(other, a, end)
        if b < 0:
            b = end
        out.append((a, b))
        a = buf.find(value, b, end) if b < end else -1
    return out


def unsent_runs(block: SourceBlock, start: int, end: int) -> List[Tuple[int, int]]:
    """The stretches ``(a, b)`` of ``[start, end)`` whose host pages are not sent yet."""
    return _stretches(block.sent, 0, start, end)


def data_runs_in(block: SourceBlock, start: int, end: int) -> List[Tuple[int, int]]:
    """The stretches ``(a, b)`` of ``[start, end)`` whose 4 KiB pages hold data."""
    return _stretches(block.present, 1, start, end)
