"""What a postcopy resume did: :class:`ResumeStats`."""
from __future__ import annotations

from typing import Dict, Optional

from ..latency import EMPTY
from ..record import Record

__all__ = ["ResumeStats"]


class ResumeStats(Record):
    """What a resume did.  Times in seconds from the connect; None when unknown.

    ``time_to_running_s`` is the destination's RESUME event (None with ``-S``
    or without QMP); ``time_to_complete_s`` its MIGRATION ``completed`` event
    (without QMP: the SHUT message).  ``page_requests`` counts request
    messages, ``pages_requested`` the 4 KiB pages they asked for that were
    sent in answer, ``duplicate_requests`` the pages asked for that were
    already sent or in flight.  ``pages_streamed`` are data pages the
    background stream sent, ``pages_around`` pages sent right behind a
    requested one (its window, data and empty: fault-around),
    ``pages_working_set`` pages sent because a working set named them,
    ``zero_pages_sent`` zero pages sent (never by the background stream).
    Each page sent is counted once by why it went: ``data_pages_sent +
    zero_pages_sent`` equals ``pages_requested + pages_around +
    pages_streamed + pages_working_set``.  ``data_pages_sent`` equals
    ``data_pages`` (the snapshot's) once the migration completed.
    ``request_service_us`` summarises, in microseconds, the time from reading
    a request to writing the last byte of its page; ``preempt``: those pages
    went on the postcopy-preempt channel.  ``bytes_spliced``: the part of
    ``bytes_sent`` that went from the page cache into the socket by
    ``splice``, never copied by uffdpy.  ``source_cpu_s``: CPU seconds (user
    + system) the serving thread used.
    """
    time_to_running_s: Optional[float] = None
    time_to_complete_s: Optional[float] = None
    page_requests: int = 0
    pages_requested: int = 0
    pages_streamed: int = 0
    pages_around: int = 0
    pages_working_set: int = 0
    zero_pages_sent: int = 0
    bytes_sent: int = 0
    bytes_spliced: int = 0
    duplicate_requests: int = 0
    data_pages: int = 0
    data_pages_sent: int = 0
    request_service_us: Dict[str, Optional[float]] = EMPTY     # copied for each
    preempt: bool = False
    recovered: bool = False
    pages_already_received: int = 0
    source_cpu_s: Optional[float] = None
