"""``server="thread"``: the workers as threads of this process (no GIL held on guest memory)."""
from __future__ import annotations

import threading
from typing import Any, Dict

from .claims import ClaimMap
from .server import Server
from .stats import Stats

__all__ = ["ThreadServer"]


class ThreadServer(Server):
    """The fault loop and the prefetcher run here; the loader reads their counters directly."""

    name = "thread"
    claims_shared = False

    def start(self, unit: int, options: Dict[str, Any]) -> None:
        server = self.loader._workers = self._workers(options)
        server.start(on_end=self._ended)

    def _ended(self) -> None:
        """Runs in the fault-loop thread once both workers have ended."""
        loader = self.loader
        server = loader._workers
        assert server is not None
        if server.error is not None:
            loader._fail(server.error)
            loader._fence_unplaced()
        elif server.claims.complete.is_set():
            loader._finish()
        loader._done.set()

    def placed(self, claims: ClaimMap) -> int:
        """The thread server's own count, kept as it places."""
        return claims.placed_pages

    def stats_into(self, stats: Stats) -> None:
        server = self.loader._workers
        if server is not None:
            server.merged_stats(stats)

    def stop(self) -> bool:
        loader = self.loader
        server = loader._workers
        if server is not None:
            if not server.ended.is_set():
                server.stop()
            if server.running:            # else nothing will ever set _done
                loader._done.wait(30.0)
            # join: a thread never joined keeps its stack mapped until its
            # handle is collected (Python 3.13)
            for t in server.threads:
                if t is not threading.current_thread() and t.ident is not None:
                    t.join(30.0)
            server.merged_stats(loader._stats)
        return True
