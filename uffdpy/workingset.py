"""Working sets: the pages a guest demanded first, recorded on one restore, brought first on the next.

The idea is REAP's (Ustiugov et al., ASPLOS 2021): a function restored from
a snapshot touches much the same few pages each time, so record which ones on
one restore and prefetch them, in that order, before anything else on the
next.  uffdpy records *demand* only: the pages the destination asked for (a
page request during ``uffdpy resume``), not what the background stream or the
fault-around sent on its own.  With the background stream on, a page the
stream delivered in time is never demanded, so a recording made that way
misses part of the working set: record with the stream held back
(``--background-delay S``, or ``background=False`` and
:meth:`uffdpy.resume.Resume.start_background` later) and without fault-around
(``--fault-around 0``), as REAP records.

The file is JSON, small (a few tens of KiB for a thousand pages)::

    {"format": "uffdpy-working-set", "version": 1,
     "snapshot": {"blocks": [["pc.ram", 1073741824], ...],
                  "digest": "<sha256 of the block list and the bitmaps>"},
     "pages": [["pc.ram", 4208, 0.001234, true], ...]}

``pages`` are ``[block, page index (4 KiB), seconds since the connect when
first demanded, holds data]`` in order of first demand.  ``digest`` ties the
file to one snapshot: a recording of another snapshot is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import UffdpyError
from .files import pwrite_all, replacing
from .pagesource import PathLike

__all__ = ["WorkingSet", "WorkingSetError", "snapshot_identity", "jaccard", "merge"]

FORMAT = "uffdpy-working-set"
VERSION = 1
_MAX_FILE_BYTES = 256 << 20


class WorkingSetError(UffdpyError, ValueError):
    """A working-set file that cannot be used: malformed, or of another snapshot."""


def snapshot_identity(snap: Any) -> Dict[str, Any]:
    """``{"blocks": [[name, length], ...], "digest": hex}`` of an open mapped-ram snapshot."""
    h = hashlib.sha256()
    blocks = []
    for b in snap.blocks:
        blocks.append([b.name, b.length])
        h.update(b.name.encode() + b"\0" + b.length.to_bytes(8, "little"))
        h.update(bytes(b.bitmap))
    return {"blocks": blocks, "digest": h.hexdigest()}


@dataclass
class WorkingSet:
    """Pages in order of first demand: ``(block, page, seconds, holds_data)``."""
    snapshot: Dict[str, Any]
    pages: List[Tuple[str, int, float, bool]] = field(default_factory=list)

    def keys(self) -> List[Tuple[str, int]]:
        return [(b, p) for b, p, _, _ in self.pages]

    @property
    def data_pages(self) -> int:
        return sum(1 for _, _, _, data in self.pages if data)

    def check(self, snap: Any, path: str = "working set") -> None:
        """Raise WorkingSetError unless this recording belongs to the open snapshot ``snap``."""
        ident = snapshot_identity(snap)
        if ident["digest"] != self.snapshot.get("digest"):
            raise WorkingSetError(
                f"{path}: recorded for another snapshot (its blocks "
                f"{_blocks_text(self.snapshot.get('blocks', []))}, digest "
                f"{str(self.snapshot.get('digest'))[:12]}; {snap.path} has "
                f"{_blocks_text(ident['blocks'])}, digest {ident['digest'][:12]})")

    def save(self, path: PathLike) -> None:
        """Write atomically: a temporary file in the same folder, renamed on success."""
        target = os.fspath(path)
        doc = {"format": FORMAT, "version": VERSION, "snapshot": self.snapshot,
               "pages": [[b, p, round(t, 6), d] for b, p, t, d in self.pages]}
        data = (json.dumps(doc, separators=(",", ":")) + "\n").encode()
        with replacing(target, mode=0o644) as fd:        # no guest memory in it
            pwrite_all(fd, data, 0)

    @classmethod
    def load(cls, path: PathLike) -> "WorkingSet":
        """Read and validate a working-set file. Raises: WorkingSetError (one line), OSError."""
        name = os.fspath(path)
        with open(name, "rb") as f:
            raw = f.read(_MAX_FILE_BYTES + 1)
        if len(raw) > _MAX_FILE_BYTES:
            raise WorkingSetError(f"{name}: larger than {_MAX_FILE_BYTES >> 20} MiB: "
                                  "not a working set")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise WorkingSetError(f"{name}: not a working-set file (bad JSON: "
                                  f"{str(e).splitlines()[0]})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise WorkingSetError(f"{name}: not a working-set file (no \"format\": "
                                  f"\"{FORMAT}\")")
        if doc.get("version") != VERSION:
            raise WorkingSetError(f"{name}: working-set version {doc.get('version')!r}, "
                                  f"expected {VERSION}")
        snapshot = doc.get("snapshot")
        if (not isinstance(snapshot, dict) or not isinstance(snapshot.get("digest"), str)
                or not isinstance(snapshot.get("blocks"), list)):
            raise WorkingSetError(f"{name}: no snapshot identity (blocks and digest)")
        lengths = {}
        for item in snapshot["blocks"]:
            if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                    or not isinstance(item[1], int) or item[1] <= 0):
                raise WorkingSetError(f"{name}: bad block entry {item!r}")
            lengths[item[0]] = item[1]
        pages = []
        seen = set()
        entries = doc.get("pages")
        if not isinstance(entries, list):
            raise WorkingSetError(f"{name}: no page list")
        for i, item in enumerate(entries):
            if (not isinstance(item, list) or len(item) != 4 or not isinstance(item[0], str)
                    or not isinstance(item[1], int) or isinstance(item[1], bool)
                    or not isinstance(item[2], (int, float)) or not isinstance(item[3], bool)):
                raise WorkingSetError(f"{name}: page entry {i} is malformed: {item!r:.80}")
            block, page = item[0], item[1]
            if block not in lengths or not 0 <= page < lengths[block] // 4096:
                raise WorkingSetError(f"{name}: page entry {i} ({block!r}, {page}) is outside "
                                      "the recorded blocks")
            if (block, page) in seen:
                raise WorkingSetError(f"{name}: page entry {i} ({block!r}, {page}) repeats")
            seen.add((block, page))
            pages.append((block, page, float(item[2]), item[3]))
        return cls(snapshot=snapshot, pages=pages)


def _blocks_text(blocks: Sequence[Any]) -> str:
    shown = ", ".join(f"{b[0]}:{b[1] >> 20}M" for b in list(blocks)[:3])
    return shown + (", ..." if len(blocks) > 3 else "")


def jaccard(a: WorkingSet, b: WorkingSet) -> float:
    """|A ∩ B| / |A ∪ B| of the two recordings' page sets (1.0 for two empty sets)."""
    x, y = set(a.keys()), set(b.keys())
    return len(x & y) / len(x | y) if x | y else 1.0


def merge(recordings: Iterable[WorkingSet]) -> WorkingSet:
    """The union, in order of first demand across the recordings (each page at its earliest time).

    Raises: WorkingSetError if they are of different snapshots, or none is given.
    """
    items = list(recordings)
    if not items:
        raise WorkingSetError("nothing to merge")
    digest = items[0].snapshot.get("digest")
    first: Dict[Tuple[str, int], Tuple[float, bool]] = {}
    for ws in items:
        if ws.snapshot.get("digest") != digest:
            raise WorkingSetError("the working sets were recorded for different snapshots")
        for block, page, t, data in ws.pages:
            old = first.get((block, page))
            if old is None or t < old[0]:
                first[(block, page)] = (t, data)
    ordered = sorted(first.items(), key=lambda kv: (kv[1][0], kv[0]))
    return WorkingSet(snapshot=dict(items[0].snapshot),
                      pages=[(b, p, t, d) for (b, p), (t, d) in ordered])


def load_for(path: Optional[PathLike], snap: Any) -> Optional[WorkingSet]:
    """Load ``path`` (if given) and check it against the open snapshot ``snap``."""
    if path is None:
        return None
    ws = WorkingSet.load(path)
    ws.check(snap, os.fspath(path))
    return ws
