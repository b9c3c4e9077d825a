"""The mapped-ram writer: :func:`write_snapshot`, :func:`rewrite_snapshot`."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import (Any, Dict, Iterable, Iterator, List,
                    Mapping, Optional, Sequence, Tuple, Union)

from ..files import copy_range as _copy_range, pwrite_all as _pwrite_all, replacing
from ..migstream import (QEMU_VM_EOF, QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION,
                         QEMU_VM_SECTION_END, QEMU_VM_SECTION_FOOTER, QEMU_VM_SECTION_START,
                         QEMU_VM_VMDESCRIPTION, RAM_SAVE_FLAG_EOS, RAM_SAVE_FLAG_MEM_SIZE,
                         RAM_SECTION_VERSION, configuration, counted)
from ..pagesource import PathLike, set_bits
from ..sizes import round_up
from .model import (MAPPED_RAM_FILE_OFFSET_ALIGNMENT, MAPPED_RAM_HDR_VERSION,
                    MAPPED_RAM_HEADER_SIZE, RAM_SECTION_IDSTR, TARGET_PAGE_SIZE, _BE32, _BE64,
                    _HEADER, _bitmap_size, _clear_bit)
from .snapshot import Snapshot

BytesLike = Union[bytes, bytearray, memoryview]
Chunks = Iterable[Tuple[int, BytesLike]]


@dataclass(frozen=True)
class BlockSpec:
    """A RAMBlock for :func:`write_snapshot`.

    ``name`` is the RAMBlock idstr QEMU knows it by (``ram`` for ``-machine
    none``, ``pc.ram``, a memory-backend id, ...), ``length`` its used length
    in bytes.  ``data`` is either the whole contents (a bytes-like object of
    ``length`` bytes), or an iterable of ``(first_page, chunk)`` pairs in
    increasing, non-overlapping page order, each chunk a whole number of pages
    (so multi-GiB blocks can be streamed), or None for an all-zero block.
    Pages not covered, and pages whose bytes are all zero, are left out of the
    file (bit clear), as QEMU does.
    """

    name: str
    length: int
    data: Union[BytesLike, Chunks, None] = None


BlockArg = Union[BlockSpec, Tuple[str, Union[BytesLike, int]]]


def _as_spec(arg: BlockArg) -> BlockSpec:
    if isinstance(arg, BlockSpec):
        return arg
    name, contents = arg
    if isinstance(contents, int):
        return BlockSpec(name, contents, None)
    return BlockSpec(name, memoryview(contents).nbytes, contents)


def _iter_chunks(spec: BlockSpec, page_size: int) -> Iterator[Tuple[int, memoryview]]:
    if spec.data is None:
        return
    data: Any = spec.data
    try:
        view = memoryview(data)         # bytes, bytearray, mmap, array...
    except TypeError:                   # an iterable of (first_page, chunk)
        for first, chunk in data:
            yield (first, memoryview(chunk).cast("B"))
        return
    view = view.cast("B")
    if view.nbytes != spec.length:
        raise ValueError(f"block {spec.name!r}: data is {view.nbytes} bytes, length is "
                         f"{spec.length}")
    yield (0, view)


def _nonzero_runs(view: memoryview, page_size: int) -> Iterator[Tuple[int, int]]:
    """(first, count) runs of pages of ``view`` that are not all zero."""
    zero = bytes(page_size)
    pages = view.nbytes // page_size
    start = -1
    for j in range(pages):
        if view[j * page_size:(j + 1) * page_size] == zero:
            if start >= 0:
                yield (start, j - start)
                start = -1
        elif start < 0:
            start = j
    if start >= 0:
        yield (start, pages - start)


def write_snapshot(path: PathLike, blocks: Sequence[BlockArg], *, machine: str = "none",
                   page_size: int = 4096, capabilities: Sequence[str] = ("mapped-ram",),
                   device_state: Optional[BytesLike] = None, early_device_state: BytesLike = b"",
                   offset: int = 0, ram_section_id: int = 1,
                   pages_alignment: int = MAPPED_RAM_FILE_OFFSET_ALIGNMENT) -> None:
    """Write a mapped-ram snapshot that QEMU 10 loads with ``migrate-incoming``.

    The layout is the one QEMU writes: header, configuration, optional early
    device sections (``early_device_state``, verbatim), the RAM START section
    with every block's record, MappedRamHeader, bitmap right after it and pages
    region on the next 1 MiB boundary, EOS and footer, an END section, then
    ``device_state`` verbatim.  ``device_state`` must be everything QEMU writes
    after the RAM sections (device sections, EOF byte, vmdesc trailer), e.g.
    ``Snapshot.read_range(*snap.device_state_range)``; with None the file gets
    no device sections (QEMU then starts the VM with reset device state), an
    EOF byte and a minimal vmdesc.  ``blocks`` are :class:`BlockSpec` or
    ``(name, contents_or_length_in_bytes)`` pairs, written in the order given.
    Zero pages are never written, so the file is sparse.  Bytes of ``path``
    before ``offset`` are kept (as with ``file:PATH,offset=N``).

    ``pages_alignment`` (bytes) is where each pages region starts: QEMU
    uses 1 MiB; QEMU 10 also loads 4096.

    ``machine`` must be the exact machine type of the destination (``none``,
    ``pc-q35-10.0``...); ``page_size`` is bytes per bitmap bit and must be 4096,
    x86 QEMU's target page size (the reader refuses any other).

    Raises: ValueError for inconsistent arguments (lengths not a multiple of
    ``page_size``, chunks out of order or out of range, duplicate names);
    OSError from the file system.
    """
    if page_size != TARGET_PAGE_SIZE:
        raise ValueError(f"page_size must be the target page size {TARGET_PAGE_SIZE}, "
                         f"not {page_size}: QEMU loads no other correctly")
    if "mapped-ram" not in capabilities:
        raise ValueError("capabilities must include 'mapped-ram'")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, not {offset}")
    if pages_alignment < 4096 or pages_alignment % 4096:
        raise ValueError(f"pages_alignment must be a multiple of 4096, not {pages_alignment}")
    specs = [_as_spec(b) for b in blocks]
    seen = set()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"duplicate block name {spec.name!r}")
        seen.add(spec.name)
        if spec.length <= 0 or spec.length % page_size:
            # a zero-length block cannot be told apart from the end of the block list
            raise ValueError(f"block {spec.name!r}: length {spec.length} is not a positive "
                             f"multiple of the page size {page_size}")
    total = sum(s.length for s in specs)
    if total & (page_size - 1) or total >= 1 << 64:
        raise ValueError(f"total RAM size {total} cannot be encoded")

    head = bytearray(_BE32.pack(QEMU_VM_FILE_MAGIC) + _BE32.pack(QEMU_VM_FILE_VERSION))
    head += configuration(machine, capabilities=capabilities)
    head += bytes(early_device_state)
    head += bytes([QEMU_VM_SECTION_START]) + _BE32.pack(ram_section_id) + counted(
        RAM_SECTION_IDSTR) + _BE32.pack(0) + _BE32.pack(RAM_SECTION_VERSION)
    head += _BE64.pack(total | RAM_SAVE_FLAG_MEM_SIZE)
    pos = offset + len(head)

    with replacing(path, keep_prefix=offset) as fd:
        os.ftruncate(fd, offset)
        _pwrite_all(fd, head, offset)
        for spec in specs:
            pages = spec.length // page_size
            record = counted(spec.name) + _BE64.pack(spec.length)
            hdr_at = pos + len(record)
            bitmap_offset = hdr_at + MAPPED_RAM_HEADER_SIZE
            bitmap = bytearray(_bitmap_size(pages))
            pages_offset = round_up(bitmap_offset + len(bitmap), pages_alignment)
            next_page = 0
            for first, view in _iter_chunks(spec, page_size):
                count, rest = divmod(view.nbytes, page_size)
                if rest or first < next_page or first + count > pages:
                    raise ValueError(
                        f"block {spec.name!r}: chunk at page {first} of {view.nbytes} bytes is not "
                        f"whole pages in increasing order inside the block ({pages} pages)")
                for run_first, run_count in _nonzero_runs(view, page_size):
                    set_bits(bitmap, first + run_first, run_count)
                    _pwrite_all(fd, view[run_first * page_size:(run_first + run_count) * page_size],
                                pages_offset + (first + run_first) * page_size)
                next_page = first + count
            header = _HEADER.pack(MAPPED_RAM_HDR_VERSION, page_size, bitmap_offset, pages_offset)
            _pwrite_all(fd, record + header + bytes(bitmap), pos)
            pos = pages_offset + spec.length
        tail = bytearray(_BE64.pack(RAM_SAVE_FLAG_EOS))
        tail += bytes([QEMU_VM_SECTION_FOOTER]) + _BE32.pack(ram_section_id)
        tail += bytes([QEMU_VM_SECTION_END]) + _BE32.pack(ram_section_id)
        tail += _BE64.pack(RAM_SAVE_FLAG_EOS)
        tail += bytes([QEMU_VM_SECTION_FOOTER]) + _BE32.pack(ram_section_id)
        if device_state is None:
            desc = json.dumps({"page_size": page_size, "devices": []}).encode()
            tail += bytes([QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION]) + _BE32.pack(len(desc)) + desc
        else:
            tail += bytes(device_state)
        _pwrite_all(fd, tail, pos)
        os.ftruncate(fd, pos + len(tail))


def rewrite_snapshot(src: Union[Snapshot, PathLike], dst: PathLike,
                     patches: Mapping[Tuple[str, int], BytesLike], *, offset: int = 0) -> None:
    """Copy snapshot ``src`` to ``dst`` with some pages replaced.

    ``patches`` maps ``(block name, page index)`` to the page's new bytes
    (exactly ``page_size`` bytes; an all-zero page clears the page's bit).
    Every byte outside the patched pages and their bitmaps is carried over
    unchanged (headers, device state, vmdesc, bytes before the stream offset),
    and zero pages stay holes.  ``offset`` is used only when ``src`` is a path.

    Raises: MappedRamError if ``src`` is not a valid snapshot; KeyError for an
    unknown block; IndexError for a page index out of range; ValueError for a
    patch of the wrong size or ``dst`` being the source file; OSError.
    """
    snap = src if isinstance(src, Snapshot) else Snapshot.open(src, offset=offset)
    try:
        checked: Dict[str, List[Tuple[int, bytes]]] = {}
        for (name, index), page in patches.items():
            block = snap.block(name)
            block.page_offset(index)
            data = bytes(page)
            if len(data) != block.page_size:
                raise ValueError(f"patch for page {index} of {name!r} is {len(data)} bytes, "
                                 f"expected {block.page_size}")
            checked.setdefault(name, []).append((index, data))
        dst_path = os.fspath(dst)
        if os.path.exists(dst_path) and os.path.samefile(dst_path, snap.path):
            raise ValueError(f"{dst_path}: destination is the source snapshot")
        src_fd = snap.fileno()
        with replacing(dst_path, not_same_as=[snap.path]) as fd:
            os.ftruncate(fd, snap.file_size)
            cursor = 0
            for block in sorted(snap.blocks, key=lambda b: b.pages_offset):
                _copy_range(src_fd, fd, cursor, block.pages_offset, skip_zero=True)
                for first, count, present in block.runs():
                    if present:
                        start = block.pages_offset + first * block.page_size
                        _copy_range(src_fd, fd, start, start + count * block.page_size,
                                    skip_zero=False)
                cursor = block.pages_offset + block.length
            _copy_range(src_fd, fd, cursor, snap.file_size, skip_zero=True)
            zero_page: Optional[bytes] = None
            for block in snap.blocks:
                if block.name not in checked:
                    continue
                bitmap = bytearray(block.bitmap)
                for index, data in checked[block.name]:
                    if zero_page is None or len(zero_page) != block.page_size:
                        zero_page = bytes(block.page_size)
                    if data == zero_page:
                        _clear_bit(bitmap, index)
                    else:
                        set_bits(bitmap, index, 1)
                        _pwrite_all(fd, data, block.page_offset(index))
                _pwrite_all(fd, bitmap, block.bitmap_offset)
    finally:
        if snap is not src:
            snap.close()
