"""``server="thread"``: the workers as threads of this process (no GIL held on guest memory)."""
from __future__ import annotations

import threading
from typing import Callable, List, Optional, Tuple

from .server import STOP_TIMEOUT, Job, Report, Server
from .stats import Stats

__all__ = ["ThreadServer"]


class ThreadServer(Server):
    """The fault loop and the prefetcher run here; the loader reads their counters directly."""

    name = "thread"
    claims_shared = False

    def __init__(self) -> None:
        super().__init__()
        #: set once ``on_end`` has returned
        self.reported = threading.Event()
        self._on_end: Optional[Callable[[Report], None]] = None

    def start(self, job: Job, on_end: Callable[[Report], None]) -> None:
        self.job = job
        self._on_end = on_end
        workers = self.workers = job.workers()
        workers.start(on_end=self._ended)

    def _ended(self) -> None:
        """Runs in the fault-loop thread once both workers have ended."""
        assert self.workers is not None and self._on_end is not None
        try:
            self._on_end(Report.of_workers(self.workers))
        finally:
            self.reported.set()

    def ready(self) -> None:
        if self.workers is not None:
            self.workers.go.set()

    def placed(self) -> int:
        """The thread server's own count, kept as it places."""
        assert self.job is not None
        return self.job.claims.placed_pages

    def stats_into(self, stats: Stats) -> None:
        if self.workers is not None:
            self.workers.merged_stats(stats)

    def demanded(self) -> Optional[List[Tuple[int, int]]]:
        return None if self.workers is None else self.workers.demanded

    def finished(self) -> None:
        if self.workers is not None:
            self.workers.close_buffers()

    def stop(self) -> bool:
        workers = self.workers
        if workers is not None:
            if not workers.ended.is_set():
                workers.stop()
            if workers.running:            # else nothing will ever report
                self.reported.wait(STOP_TIMEOUT)
            # join: a thread never joined keeps its stack mapped until its
            # handle is collected (Python 3.13)
            for t in workers.threads:
                if t is not threading.current_thread() and t.ident is not None:
                    t.join(STOP_TIMEOUT)
        return True

    def close(self) -> None:
        if self.workers is not None:
            self.workers.close_buffers()
