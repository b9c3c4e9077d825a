"""Mapping and memfd_create against the running kernel (no userfaultfd needed)."""
from __future__ import annotations

import ctypes
import os

import pytest

from uffdpy import ioctl as abi
from uffdpy.memory import HUGE_PAGE_SIZE, PAGE_SIZE, Mapping, memfd_create

pytestmark = pytest.mark.timeout(60)


def _mapped(address: int) -> bool:
    """Whether ``address`` lies in a mapping of this process (per /proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return True
    return False


def test_page_sizes() -> None:
    assert PAGE_SIZE == os.sysconf("SC_PAGE_SIZE")
    assert HUGE_PAGE_SIZE == 2 * 1024 * 1024


def test_anonymous_read_write_and_close_twice() -> None:
    mapping = Mapping.anonymous(4 * PAGE_SIZE)
    assert mapping.address % PAGE_SIZE == 0 and mapping.length == 4 * PAGE_SIZE
    view = mapping.view()
    assert view.format == "B" and view.ndim == 1 and len(view) == 4 * PAGE_SIZE
    assert not view.readonly
    assert bytes(view[:4]) == b"\0\0\0\0"
    view[PAGE_SIZE:PAGE_SIZE + 5] = b"hello"
    assert ctypes.string_at(mapping.address + PAGE_SIZE, 5) == b"hello"
    del view
    address = mapping.address
    mapping.close()
    assert mapping.closed and not _mapped(address)
    mapping.close()
    with pytest.raises(ValueError):
        mapping.view()


@pytest.mark.parametrize("align", [HUGE_PAGE_SIZE, 4 * HUGE_PAGE_SIZE])
def test_anonymous_alignment_trims_the_excess(align: int) -> None:
    with Mapping.anonymous(3 * PAGE_SIZE, align=align) as mapping:
        assert mapping.address % align == 0
        assert _mapped(mapping.address) and _mapped(mapping.address + 3 * PAGE_SIZE - 1)
        assert not _mapped(mapping.address - 1) or not _mapped(mapping.address + 3 * PAGE_SIZE)
        ctypes.memset(mapping.address, 1, mapping.length)


def test_anonymous_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Mapping.anonymous(100)
    with pytest.raises(ValueError):
        Mapping.anonymous(0)
    with pytest.raises(ValueError):
        Mapping.anonymous(PAGE_SIZE, align=3 * PAGE_SIZE)
    with pytest.raises(ValueError):
        Mapping.anonymous(PAGE_SIZE, huge_pages=True)


def test_anonymous_huge_pages(hugetlb_pool) -> None:
    hugetlb_pool(1)
    with Mapping.anonymous(HUGE_PAGE_SIZE, huge_pages=True) as mapping:
        assert mapping.address % HUGE_PAGE_SIZE == 0
        ctypes.memset(mapping.address, 7, HUGE_PAGE_SIZE)


def test_populate_and_madvise() -> None:
    with Mapping.anonymous(4 * PAGE_SIZE, populate=True) as mapping:
        view = mapping.view()
        view[0] = 9
        view[3 * PAGE_SIZE] = 9
        mapping.madvise(abi.MADV_DONTNEED, PAGE_SIZE * 3)
        assert view[0] == 9 and view[3 * PAGE_SIZE] == 0
        mapping.madvise(abi.MADV_DONTNEED)
        assert view[0] == 0
        with pytest.raises(ValueError):
            mapping.madvise(abi.MADV_DONTNEED, 0, 5 * PAGE_SIZE)
        with pytest.raises(OSError) as info:
            mapping.madvise(12345)
        assert info.value.errno == 22
        del view


def test_memfd_shared_and_private_file_mappings() -> None:
    fd = memfd_create("uffdpy-test")
    try:
        assert not os.get_inheritable(fd)
        os.ftruncate(fd, 2 * PAGE_SIZE)
        os.pwrite(fd, b"file", PAGE_SIZE)
        with Mapping.of_file(fd, 2 * PAGE_SIZE, writable=True) as shared:
            view = shared.view()
            assert bytes(view[PAGE_SIZE:PAGE_SIZE + 4]) == b"file"
            view[0:3] = b"abc"
            assert os.pread(fd, 3, 0) == b"abc"
            del view
        with Mapping.of_file(fd, PAGE_SIZE, offset=PAGE_SIZE) as readonly:
            view = readonly.view()
            assert view.readonly and bytes(view[:4]) == b"file"
            del view
        with Mapping.of_file(fd, PAGE_SIZE, writable=True, shared=False) as private:
            ctypes.memmove(private.address, b"zzz", 3)
            assert os.pread(fd, 3, 0) == b"abc"
    finally:
        os.close(fd)


def test_file_mapping_errors_carry_errno() -> None:
    with pytest.raises(ValueError):
        Mapping.of_file(0, PAGE_SIZE, offset=1)
    fd = os.open("/proc/self/cmdline", os.O_RDONLY)  # not mmap-able writable
    try:
        with pytest.raises(OSError) as info:
            Mapping.of_file(fd, PAGE_SIZE, writable=True)
        assert info.value.errno in (13, 19)  # EACCES, ENODEV
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info2:
        memfd_create("x" * 300)
    assert info2.value.errno == 22


def test_mremap_via_abi() -> None:
    address = abi.libc.mmap(None, PAGE_SIZE, abi.PROT_READ | abi.PROT_WRITE,
                            abi.MAP_PRIVATE | abi.MAP_ANONYMOUS, -1, 0)
    ctypes.memset(address, 5, PAGE_SIZE)
    new = abi.libc.mremap(address, PAGE_SIZE, 2 * PAGE_SIZE, abi.MREMAP_MAYMOVE, None)
    with Mapping(new, 2 * PAGE_SIZE, writable=True) as moved:
        assert ctypes.string_at(moved.address, 1) == b"\x05"
        assert ctypes.string_at(moved.address + PAGE_SIZE, 1) == b"\x00"
