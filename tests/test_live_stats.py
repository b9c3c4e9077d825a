"""``loader.stats`` means the same on every server at every moment (hardening item 15).

The process and interpreter servers run the workers outside this
interpreter; they publish their counters in the claim map's header while
they load, so mid-load ``stats`` (faults, pages, total_pages...) is live
there as it is with the thread server, not zero until the final report.
"""
from __future__ import annotations

import ctypes
import threading
from typing import List

import pytest

from uffdpy.loader import LazyLoader
from uffdpy.mappedram import Snapshot
from uffdpy.harness.synthetic import make_synthetic
from uffdpy.memory import PAGE_SIZE

from helpers import LAZY_SERVERS, eventually  # noqa: E402  (tests/ is on sys.path)

pytestmark = pytest.mark.kernel

TOUCHED = 40


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("live") / "syn8.img")
    make_synthetic(path, size=8 << 20, fill=0.5, seed=15)
    return path


def touch_pages(base: int, pages: List[int]) -> None:
    """Touch each page without the GIL (works with every server), from a thread with a timeout."""
    buf = ctypes.create_string_buffer(PAGE_SIZE)

    def run() -> None:
        for i in pages:
            ctypes.memmove(buf, base + i * PAGE_SIZE, PAGE_SIZE)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "a touched page was not served"


@pytest.mark.parametrize("server", LAZY_SERVERS)
def test_mid_load_stats_are_live_on_every_server(image, server):
    with Snapshot.open(image) as snap:
        block = snap.blocks[0]
        pages = list(range(0, block.pages, block.pages // TOUCHED))[:TOUCHED]
        with LazyLoader(snap, server=server, prefetch=False) as loader:
            touch_pages(loader.address("ram"), pages)
            assert eventually(lambda: loader.stats.placed_pages == len(pages)), loader.stats
            assert eventually(lambda: loader.stats.pages_by_fault == len(pages)), loader.stats
            st = loader.stats
            assert st.total_pages == block.pages
            assert st.faults == len(pages)
            assert st.pages_by_prefetch == 0
            assert st.bytes_copied + st.zero_pages * PAGE_SIZE == len(pages) * PAGE_SIZE
            assert loader.progress() == (st.placed_pages, st.total_pages)
            assert not loader.complete and not loader.wait(0.1)


@pytest.mark.parametrize("server", LAZY_SERVERS)
def test_complete_means_every_page_placed(image, server):
    with LazyLoader(image, server=server) as loader:
        assert loader.wait(60)
        st = loader.stats
        assert loader.complete
        assert st.placed_pages == st.total_pages > 0
        assert st.pages_by_fault + st.pages_by_prefetch == st.total_pages
