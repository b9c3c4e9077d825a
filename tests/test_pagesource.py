"""The page-source boundary: the loader places any format's pages, aligned or not.

A small source defined here (not a file format anybody writes: a test of the
loader's contract) puts regions at awkward file offsets: not page-aligned,
partly in the file, with holes, so that every placement kind is exercised
against the real kernel: ZEROPAGE, COPY straight from the file mapping, and
COPY through a bounce buffer with the tail of a partial page zeroed.  Real
formats (mapped-ram, ELF cores from QEMU and Linux) are tested in their own
files.

Every access to registered memory while a load runs is a ``ctypes.memmove``
(no GIL held) and every wait has a timeout.
"""
from __future__ import annotations

import ctypes
import os
import random
import threading
from typing import Iterator, List, Tuple

import pytest

from uffdpy.loader import EagerLoader, LazyLoader
from uffdpy.pagesource import PageSource, bitmap_runs, set_bits
from uffdpy.harness.workload import verify

from helpers import LAZY_SERVERS  # noqa: E402  (tests/ is on sys.path)

pytestmark = pytest.mark.timeout(120)

PS = 4096


class _Region:
    def __init__(self, fd: int, name: str, pages: int, file_offset: int, file_bytes: int,
                 holes: Tuple[Tuple[int, int], ...] = ()) -> None:
        self.fd = fd
        self.name = name
        self.page_size = PS
        self.pages = pages
        self.length = pages * PS
        self.file_offset = file_offset
        self.file_bytes = file_bytes
        bits = bytearray((pages + 7) // 8)
        set_bits(bits, 0, min(pages, -(-file_bytes // PS)))
        for first, count in holes:
            for i in range(first, first + count):
                bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF
        self.bits = self.bitmap = bytes(bits)
        self.present_pages = sum(bin(b).count("1") for b in bits)
        self.zero_pages = pages - self.present_pages

    def is_present(self, i: int) -> bool:
        return bool(self.bits[i >> 3] >> (i & 7) & 1)

    def runs(self) -> Iterator[Tuple[int, int, bool]]:
        return bitmap_runs(self.bits, self.pages)

    def read_pages(self, first: int, count: int) -> bytes:
        out = bytearray(count * PS)
        for i in range(first, first + count):
            if self.is_present(i):
                lo = i * PS
                n = max(0, min(PS, self.file_bytes - lo))
                out[(i - first) * PS:(i - first) * PS + n] = os.pread(
                    self.fd, n, self.file_offset + lo)
        return bytes(out)


class _Source:
    format = "test"

    def __init__(self, path: str, regions_spec) -> None:
        self.path = path
        self.file_size = os.path.getsize(path)
        self.fd = os.open(path, os.O_RDONLY)
        self._regions = [_Region(self.fd, *spec) for spec in regions_spec]

    @property
    def regions(self) -> List[_Region]:
        return self._regions

    def region(self, name: str) -> _Region:
        return next(r for r in self._regions if r.name == name)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "_Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def awkward(tmp_path) -> _Source:
    """Three regions: unaligned with a partial last page, aligned with a partial tail, holes."""
    path = str(tmp_path / "awkward.bin")
    data = random.Random(5).randbytes(1 << 20)
    with open(path, "wb") as f:
        f.write(data)
    spec = [
        # name, pages, file_offset, file_bytes, holes
        ("unaligned", 40, 100, 37 * PS + 123, ((3, 2),)),
        ("aligned-partial-tail", 24, 8 * PS * 12, 20 * PS + 77, ()),
        ("aligned-with-holes", 64, 4 * PS * 45, 64 * PS, ((0, 1), (10, 20), (63, 1))),
    ]
    src = _Source(path, spec)
    yield src
    src.close()


def test_the_test_source_satisfies_the_protocol(awkward):
    source: PageSource = awkward          # checked by mypy when it runs over tests
    assert [r.name for r in source.regions] == ["unaligned", "aligned-partial-tail",
                                                "aligned-with-holes"]
    r = awkward.region("unaligned")
    # the partial page reads as file bytes then zeros; past file_bytes: zero pages
    page = r.read_pages(37, 1)
    assert page[123:] == bytes(PS - 123) and page[:123] != bytes(123)
    assert r.read_pages(38, 2) == bytes(2 * PS)


@pytest.mark.kernel
@pytest.mark.parametrize("server", LAZY_SERVERS)
@pytest.mark.parametrize("huge", [False, True], ids=["4k", "hugetlb"])
def test_prefetch_places_every_kind_of_page(awkward, server, huge, hugetlb_pool):
    if huge:
        hugetlb_pool(len(awkward.regions))
    with LazyLoader(awkward, server=server, huge_pages=huge) as loader:
        assert loader.wait(30)
        regions = [(loader.address(r.name), r) for r in awkward.regions]
        assert verify(regions) == (sum(r.pages for r in awkward.regions), 0)
        st = loader.stats
        assert st.double_placements == 0 and st.placed_pages == st.total_pages


@pytest.mark.kernel
@pytest.mark.parametrize("fault_around,huge", [(0, False), (7, False), (0, True)],
                         ids=["4k", "4k-fault-around", "hugetlb"])
def test_faults_on_every_kind_of_page(awkward, fault_around, huge, hugetlb_pool):
    """No prefetcher: four GIL-free touchers fault in every page in random order."""
    if huge:
        hugetlb_pool(len(awkward.regions))
    with LazyLoader(awkward, prefetch=False, fault_around_pages=fault_around,
                    huge_pages=huge) as loader:
        pages = [(loader.address(r.name) + i * PS, r, i)
                 for r in awkward.regions for i in range(r.pages)]
        random.Random(1).shuffle(pages)
        got: dict = {}
        errors: List[BaseException] = []

        def toucher(part) -> None:
            buf = ctypes.create_string_buffer(PS)
            try:
                for address, r, i in part:
                    ctypes.memmove(buf, address, PS)
                    got[(r.name, i)] = buf.raw
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=toucher, args=(pages[k::4],), daemon=True)
                   for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a toucher is still blocked"
        assert not errors
        assert loader.wait(30), "every page was touched: the load must complete"
        for (name, i), data in got.items():
            assert data == awkward.region(name).read_pages(i, 1), f"{name} page {i}"
        st = loader.stats
        assert st.pages_by_prefetch == 0 and st.double_placements == 0
        assert st.placed_pages == st.total_pages


def test_eager_loader_reads_every_kind_of_page(awkward):
    with EagerLoader(awkward) as loader:
        regions = [(loader.address(r.name), r) for r in awkward.regions]
        assert verify(regions) == (sum(r.pages for r in awkward.regions), 0)


def test_the_format_registry_names_each_format_once() -> None:
    """One entry per format: its class opens it and says the same name."""
    from uffdpy.pagesource import FORMATS, format_of
    names = [f.name for f in FORMATS]
    assert sorted(names) == ["elf-core", "mapped-ram"] and len(set(names)) == len(names)
    for fmt in FORMATS:
        assert fmt.cls().format == fmt.name
        assert format_of(fmt.magic + b"rest") is fmt
        assert fmt.magic.hex(" ") in fmt.describe()
    assert format_of(b"\x7fELG") is None
