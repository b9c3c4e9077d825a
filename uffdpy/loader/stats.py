"""What a load did: the public ``Stats``, and the tallies each worker keeps for it."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

from ..latency import EMPTY

__all__ = ["Stats"]

#: The ``Stats`` counters a server outside this interpreter (process,
#: interpreter) publishes while it loads, in this order, as u64s at the start
#: of the claim map's header (``ClaimMap.publish``), for the loader to read.
LIVE_FIELDS = ("faults", "pages_by_fault", "pages_by_prefetch", "zero_pages", "bytes_copied",
               "eexist", "eagain", "double_placements", "placed_pages", "pages_by_working_set")


@dataclasses.dataclass
class Stats:
    """What a load did.  Times in seconds, latencies in microseconds, sizes in bytes."""

    time_to_ready_s: float = 0.0
    time_to_complete_s: Optional[float] = None
    faults: int = 0
    fault_service_us: Dict[str, Optional[float]] = dataclasses.field(
        default_factory=lambda: dict(EMPTY))
    pages_by_fault: int = 0
    pages_by_prefetch: int = 0
    #: of ``pages_by_prefetch``: placed first, as a replayed working set's
    pages_by_working_set: int = 0
    zero_pages: int = 0
    bytes_copied: int = 0
    eexist: int = 0
    eagain: int = 0
    double_placements: int = 0
    total_pages: int = 0
    placed_pages: int = 0

    def as_dict(self) -> Dict[str, Any]:
        """The stats as a JSON-ready dict."""
        return dataclasses.asdict(self)


class WorkerCounters:
    """Per-worker tallies; each worker owns one, so no locking is needed."""

    __slots__ = ("faults", "service_ns", "pages", "zero_pages", "bytes_copied",
                 "eexist", "eagain", "working_set")

    def __init__(self) -> None:
        self.faults = 0
        self.service_ns: List[int] = []
        self.pages = 0
        self.zero_pages = 0
        self.bytes_copied = 0
        self.eexist = 0
        self.eagain = 0
        self.working_set = 0
