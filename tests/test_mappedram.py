"""Pure tests of uffdpy.mappedram: writer/reader round trips, runs, validation fuzzing.

No QEMU and no kernel features are needed; see test_mappedram_qemu.py for the
tests against files QEMU itself wrote and loads.
"""
from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest

from uffdpy import mappedram, pagesource
from uffdpy.migstream import configuration
from uffdpy.mappedram import (BlockSpec, DeviceSection, MappedRamError, NotMappedRamError,
                              RamBlock, Snapshot, rewrite_snapshot, write_snapshot)
from uffdpy.harness.synthetic import make_synthetic, synthetic_run_data, synthetic_runs

PAGE = 4096
MiB = 1 << 20


def device_section(sid: int, name: str, instance: int, version: int, body: bytes) -> bytes:
    raw = name.encode()
    return (b"\x04" + struct.pack(">I", sid) + bytes([len(raw)]) + raw
            + struct.pack(">II", instance, version) + body + b"\x7e" + struct.pack(">I", sid))


def fake_device_state(*, with_vmdesc: bool = True) -> bytes:
    """Device sections in QEMU's framing + EOF + vmdesc, like the tail of a -machine none file.

    The globalstate body contains a false footer ("7e 00000003") that a naive
    splitter would stop at.
    """
    timer = device_section(0, "timer", 0, 2, bytes(range(24)))
    glob = device_section(3, "globalstate", 0, 1,
                          b"\x00\x00\x00\x07running\x7e\x00\x00\x00\x03\x04junk" + bytes(20))
    out = timer + glob + b"\x00"
    if with_vmdesc:
        desc = json.dumps({"page_size": PAGE, "devices": [
            {"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2},
            {"name": "globalstate", "instance_id": 0, "vmsd_name": "globalstate",
             "version": 1}]}).encode()
        out += b"\x06" + struct.pack(">I", len(desc)) + desc
    return out


def page_of(seed: int, i: int) -> bytes:
    data = bytearray(random.Random(seed * 7919 + i).randbytes(PAGE))
    data[0] |= 1
    return bytes(data)


def slow_runs(bitmap: bytes, pages: int) -> List[Tuple[int, int, bool]]:
    """Reference: the obvious bit-by-bit loop."""
    runs: List[Tuple[int, int, bool]] = []
    for i in range(pages):
        present = bool(bitmap[i >> 3] >> (i & 7) & 1)
        if runs and runs[-1][2] == present:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, present)
        else:
            runs.append((i, 1, present))
    return runs


@pytest.fixture
def small(tmp_path: Path) -> Tuple[Path, bytes, bytes]:
    """Two blocks (one with mixed pages, one all zero but a page), fake device state."""
    ram = bytearray(64 * PAGE)
    for i in (0, 1, 2, 7, 8, 9, 10, 33, 63):
        ram[i * PAGE:(i + 1) * PAGE] = page_of(1, i)
    rom = bytearray(3 * PAGE)
    rom[PAGE:2 * PAGE] = page_of(2, 1)
    path = tmp_path / "small.img"
    write_snapshot(path, [("ram", ram), ("rom", rom)], device_state=fake_device_state())
    return path, bytes(ram), bytes(rom)


# --- round trips ----------------------------------------------------------------------

def test_round_trip_model(small: Tuple[Path, bytes, bytes]) -> None:
    path, ram, rom = small
    with Snapshot.open(path) as snap:
        assert snap.machine == "none"
        assert snap.capabilities == ["mapped-ram"]
        assert [b.name for b in snap.blocks] == ["ram", "rom"]
        assert snap.file_size == path.stat().st_size
        b = snap.block("ram")
        assert (b.length, b.page_size, b.pages) == (64 * PAGE, PAGE, 64)
        assert (b.present_pages, b.zero_pages) == (9, 55)
        assert b.bitmap_offset == b.header_offset + 1 + 3 + 8 + 28
        assert len(b.bitmap) == 8
        assert b.pages_offset % MiB == 0
        assert list(b.runs()) == [(0, 3, True), (3, 4, False), (7, 4, True), (11, 22, False),
                                  (33, 1, True), (34, 29, False), (63, 1, True)]
        for i in range(64):
            assert b.read_page(i) == ram[i * PAGE:(i + 1) * PAGE]
            assert b.is_present(i) == any(ram[i * PAGE:(i + 1) * PAGE])
            assert b.page_offset(i) == b.pages_offset + i * PAGE
        assert b.read_pages(0, 64) == ram
        r = snap.block("rom")
        assert r.read_pages(0, 3) == rom and list(r.runs()) == [(0, 1, False), (1, 1, True),
                                                                (2, 1, False)]
        # next block's record starts exactly where the previous pages region ends
        assert r.header_offset == b.pages_offset + b.length
        assert [(d.name, d.instance, d.version, d.section_id) for d in snap.devices] == [
            ("timer", 0, 2, 0), ("globalstate", 0, 1, 3)]
        start, end = snap.device_state_range
        assert end == snap.file_size
        assert snap.read_range(start, end) == fake_device_state()
        for d in snap.devices:
            raw = snap.read_range(d.offset, d.offset + d.length)
            assert raw[0] == 4 and raw[-5:] == b"\x7e" + struct.pack(">I", d.section_id)
        assert snap.vmdesc is not None and len(snap.vmdesc["devices"]) == 2
        with pytest.raises(KeyError):
            snap.block("nope")
        with pytest.raises(IndexError):
            b.read_page(64)
        with pytest.raises(IndexError):
            b.is_present(-1)
    snap.close()  # idempotent
    assert snap.closed
    with pytest.raises(ValueError):
        b.read_page(0)


def test_file_is_sparse_and_layout_like_qemu(tmp_path: Path) -> None:
    path = tmp_path / "big.img"
    write_snapshot(path, [BlockSpec("ram", 256 * MiB, [(1000, page_of(0, 0))])])
    st = path.stat()
    assert st.st_size > 256 * MiB
    assert st.st_blocks * 512 < 4 * MiB
    with Snapshot.open(path) as snap:
        b = snap.blocks[0]
        assert b.pages_offset == MiB and b.bitmap_offset == 0x81
        assert list(b.runs()) == [(0, 1000, False), (1000, 1, True), (1001, 65536 - 1001, False)]
        # QEMU's worked example: the 64 MiB -machine none file (reference §2.9)
    write_snapshot(tmp_path / "64.img", [("ram", 64 * MiB)])
    raw = (tmp_path / "64.img").read_bytes()
    assert raw[:0x40] == bytes.fromhex(
        "5145564d00000003" "07000000046e6f6e65" "051a") + b"configuration/capabilities" + \
        bytes.fromhex("00000001" "00000001" "0a") + b"mapped-ram"
    assert raw[0x40:0x59] == bytes.fromhex("0100000001036572616d0000000000000004"
                                           "0000000004000004".replace("6572616d", "72616d"))
    assert raw[0x65:0x81] == bytes.fromhex("00000001" "0000000000001000" "0000000000000081"
                                           "0000000000100000")
    assert raw[0x4100000:0x410000d] == bytes.fromhex("0000000000000010" "7e00000001")


def test_write_offset_keeps_prefix(tmp_path: Path) -> None:
    path = tmp_path / "off.img"
    path.write_bytes(b"P" * 5000)
    write_snapshot(path, [("ram", page_of(3, 0) * 2)], offset=1234, device_state=fake_device_state())
    assert path.read_bytes()[:1234] == b"P" * 1234
    with Snapshot.open(path, offset=1234) as snap:
        assert snap.offset == 1234
        assert snap.blocks[0].read_page(1) == page_of(3, 0)
        assert snap.blocks[0].pages_offset == MiB
    with pytest.raises(MappedRamError, match="bad magic"):
        Snapshot.open(path)


def test_chunks_and_writer_argument_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.img"
    chunks = [(2, page_of(4, 2) + bytes(PAGE) + page_of(4, 4)), (9, page_of(4, 9))]
    write_snapshot(path, [BlockSpec("ram", 16 * PAGE, iter(chunks))])
    with Snapshot.open(path) as snap:
        assert list(snap.blocks[0].runs()) == [(0, 2, False), (2, 1, True), (3, 1, False),
                                               (4, 1, True), (5, 4, False), (9, 1, True),
                                               (10, 6, False)]
    bad = [
        dict(blocks=[("ram", 100)]),
        dict(blocks=[("ram", PAGE), ("ram", PAGE)]),
        dict(blocks=[BlockSpec("ram", 4 * PAGE, [(3, bytes(2 * PAGE))])]),
        dict(blocks=[BlockSpec("ram", 4 * PAGE, [(2, page_of(0, 0)), (1, page_of(0, 0))])]),
        dict(blocks=[BlockSpec("ram", 4 * PAGE, [(0, b"x")])]),
        dict(blocks=[BlockSpec("ram", 2 * PAGE, bytes(PAGE))]),
        dict(blocks=[("ram", PAGE)], page_size=1000),
        dict(blocks=[("ram", PAGE)], capabilities=()),
        dict(blocks=[("", PAGE)]),
        dict(blocks=[("ram", 0)]),
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            write_snapshot(tmp_path / "bad.img", **kwargs)  # type: ignore[arg-type]


def test_rewrite_carries_everything_but_the_patches(small: Tuple[Path, bytes, bytes],
                                                    tmp_path: Path) -> None:
    path, ram, rom = small
    dst = tmp_path / "patched.img"
    new = page_of(9, 9)
    rewrite_snapshot(path, dst, {("ram", 5): new, ("ram", 0): bytes(PAGE), ("rom", 1): new})
    a, b = path.read_bytes(), dst.read_bytes()
    assert len(a) == len(b)
    with Snapshot.open(path) as s1, Snapshot.open(dst) as s2:
        changed = set()
        for blk in ("ram", "rom"):
            x, y = s1.block(blk), s2.block(blk)
            changed |= {x.page_offset(i) // PAGE for i in range(x.pages)
                        if x.read_page(i) != y.read_page(i)}
            assert s1.read_range(x.bitmap_offset, x.bitmap_offset + len(x.bitmap)) != \
                s2.read_range(y.bitmap_offset, y.bitmap_offset + len(y.bitmap)) or blk == "rom"
        assert s2.block("ram").read_page(5) == new and s2.block("ram").read_page(0) == bytes(PAGE)
        assert s2.block("rom").read_page(1) == new
        assert s2.block("ram").read_pages(6, 58) == ram[6 * PAGE:]
        assert s1.read_range(*s1.device_state_range) == s2.read_range(*s2.device_state_range)
        # outside pages regions and bitmaps, every byte is the same
        skip = [(blk.bitmap_offset, blk.bitmap_offset + len(blk.bitmap)) for blk in s1.blocks]
        skip += [(blk.pages_offset, blk.pages_offset + blk.length) for blk in s1.blocks]
    keep = bytearray(a)
    other = bytearray(b)
    for lo, hi in skip:
        keep[lo:hi] = other[lo:hi] = bytes(hi - lo)
    assert keep == other
    with pytest.raises(ValueError):
        rewrite_snapshot(path, path, {})
    with pytest.raises(ValueError):
        rewrite_snapshot(path, dst, {("ram", 1): b"short"})
    with pytest.raises(IndexError):
        rewrite_snapshot(path, dst, {("ram", 64): new})
    with pytest.raises(KeyError):
        rewrite_snapshot(path, dst, {("nope", 0): new})


def test_make_synthetic_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_synthetic(a, size=8 * MiB, fill=0.5, seed=42)
    make_synthetic(b, size=8 * MiB, fill=0.5, seed=42)
    assert a.read_bytes() == b.read_bytes()
    runs = synthetic_runs(2048, 0.5, 42)
    assert sum(c for _, c, _ in runs) == 2048
    assert 0.3 < sum(c for _, c, p in runs if p) / 2048 < 0.7
    assert len({c for _, c, _ in runs}) > 10  # run lengths vary
    with Snapshot.open(a) as snap:
        blk = snap.block("ram")
        assert (snap.machine, blk.length) == ("none", 8 * MiB)
        assert list(blk.runs()) == runs
        for first, count, present in runs[:40]:
            expected = synthetic_run_data(42, first, count) if present else bytes(count * PAGE)
            assert blk.read_pages(first, count) == expected
    assert synthetic_run_data(42, 10, 3)[PAGE:2 * PAGE] == synthetic_run_data(42, 11, 1)
    make_synthetic(a, size=MiB, fill=0.0, seed=1)
    with Snapshot.open(a) as snap:
        assert snap.blocks[0].present_pages == 0
    make_synthetic(a, size=MiB, fill=1.0, seed=1)
    with Snapshot.open(a) as snap:
        assert list(snap.blocks[0].runs()) == [(0, 256, True)]
    for kwargs in (dict(size=1000, fill=0.5), dict(size=MiB, fill=1.5), dict(size=0, fill=0.1)):
        with pytest.raises(ValueError):
            make_synthetic(a, seed=0, **kwargs)  # type: ignore[arg-type]


# --- runs -----------------------------------------------------------------------------

@pytest.mark.parametrize("pages", [1, 7, 8, 9, 63, 64, 65, 1000, 4097])
def test_runs_match_reference(pages: int) -> None:
    rng = random.Random(pages)
    for trial in range(30):
        bits = bytearray(mappedram.model._bitmap_size(pages))
        style = trial % 3
        if style == 0:        # random bits
            for i in range(pages):
                if rng.random() < 0.5:
                    bits[i >> 3] |= 1 << (i & 7)
        elif style == 1:      # random runs
            i = 0
            while i < pages:
                n = rng.randint(1, 40)
                if rng.random() < 0.5:
                    pagesource.set_bits(bits, i, min(n, pages - i))
                i += n
        else:                 # all ones, plus junk in the padding bits
            pagesource.set_bits(bits, 0, len(bits) * 8)
        assert list(pagesource.bitmap_runs(bytes(bits), pages)) == slow_runs(bytes(bits), pages)
        if style == 2:
            assert list(pagesource.bitmap_runs(bytes(bits), pages)) == [(0, pages, True)]


@pytest.mark.timeout(60)
def test_runs_of_a_1gib_block(tmp_path: Path) -> None:
    """A 1 GiB block (262144 pages): runs and counts from the bitmap alone."""
    pages = (1 << 30) // PAGE
    rng = random.Random(5)
    expected: List[Tuple[int, int, bool]] = []
    i = 0
    while i < pages:
        n = min(pages - i, rng.choice([1, 2, 3, 17, 64, 100, 1000, 5000]))
        present = bool(len(expected) % 2) if expected else rng.random() < 0.5
        expected.append((i, n, present))
        i += n
    chunks = [(f, b"\x01" * (c * PAGE)) for f, c, p in expected if p and c <= 3]
    # long present runs: write each chunk lazily so memory stays small
    def gen() -> Iterator[Tuple[int, bytes]]:
        small = dict(chunks)
        for f, c, p in expected:
            if p:
                for lo in range(f, f + c, 512):
                    n = min(512, f + c - lo)
                    yield (lo, small.get(lo, b"\x01" * (n * PAGE)))
    path = tmp_path / "1g.img"
    write_snapshot(path, [BlockSpec("ram", 1 << 30, gen())])
    with Snapshot.open(path) as snap:
        blk = snap.blocks[0]
        assert blk.pages == pages
        assert list(blk.runs()) == expected
        assert blk.present_pages == sum(c for _, c, p in expected if p)
        assert blk.read_page(expected[1][0])[:1] == (b"\x01" if expected[1][2] else b"\x00")


def test_open_never_reads_the_pages_region(small: Tuple[Path, bytes, bytes],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path, _, _ = small
    reads: List[Tuple[int, int]] = []
    real = mappedram.model._Source.read_exact

    def spy(self: mappedram.model._Source, offset: int, count: int, what: str) -> bytes:
        reads.append((offset, count))
        return real(self, offset, count, what)

    monkeypatch.setattr(mappedram.model._Source, "read_exact", spy)
    with Snapshot.open(path) as snap:
        regions = [(b.pages_offset, b.pages_offset + b.length) for b in snap.blocks]
        opened = list(reads)
        list(snap.blocks[0].runs())
        assert len(reads) == len(opened)
    for off, n in opened:
        for lo, hi in regions:
            assert off + n <= lo or off >= hi, (off, n, lo, hi)


# --- validation -----------------------------------------------------------------------

def test_error_message_shape(small: Tuple[Path, bytes, bytes], tmp_path: Path) -> None:
    path, _, _ = small
    data = bytearray(path.read_bytes())
    with Snapshot.open(path) as snap:
        hdr = snap.blocks[0].bitmap_offset - 28
    data[hdr:hdr + 4] = struct.pack(">I", 7)
    bad = tmp_path / "vm.img"
    bad.write_bytes(bytes(data))
    with pytest.raises(MappedRamError) as info:
        Snapshot.open(bad)
    e = info.value
    assert isinstance(e, ValueError)
    assert (e.offset, e.expected, e.actual) == (hdr, "<= 1", 7)
    assert str(e) == f"{bad}: bad RAMBlock header version at offset {hdr:#x}: expected <= 1, got 7"


def test_not_mapped_ram(tmp_path: Path) -> None:
    # the start of a stream QEMU writes without mapped-ram: no capabilities subsection
    path = tmp_path / "plain.img"
    path.write_bytes(bytes.fromhex("5145564d00000003" "07000000046e6f6e65"
                                   "0100000001036572616d0000000000000004" "0000000004000004")
                     + bytes(100))
    with pytest.raises(NotMappedRamError) as info:
        Snapshot.open(path)
    assert "mapped-ram" in str(info.value) and "migrate-set-capabilities" in str(info.value)
    assert isinstance(info.value, MappedRamError)
    # capabilities listed, but not mapped-ram
    cfg = configuration("none", capabilities=["x-ignore-shared"])
    path.write_bytes(bytes.fromhex("5145564d00000003") + cfg + bytes(100))
    with pytest.raises(NotMappedRamError, match="x-ignore-shared"):
        Snapshot.open(path)


def test_empty_and_tiny_files(tmp_path: Path) -> None:
    path = tmp_path / "e.img"
    for content in (b"", b"Q", b"QEVM", b"QEVM\x00\x00\x00\x03", b"QEVM\x00\x00\x00\x02\x07"):
        path.write_bytes(content)
        with pytest.raises(MappedRamError):
            Snapshot.open(path)
    path.write_bytes(b"QEVM\x00\x00\x00\x03")
    with pytest.raises(MappedRamError):
        Snapshot.open(path, offset=-1)
    with pytest.raises(MappedRamError):
        Snapshot.open(path, offset=100)


def _open_outcome(path: Path, offset: int = 0) -> Optional[MappedRamError]:
    """Open; on success walk everything. Only MappedRamError may escape as an outcome."""
    try:
        with Snapshot.open(path, offset=offset) as snap:
            for blk in snap.blocks:
                assert sum(c for _, c, _ in blk.runs()) == blk.pages
                if blk.pages:
                    blk.read_page(blk.pages - 1)
            snap.read_range(*snap.device_state_range)
        return None
    except MappedRamError as e:
        assert e.path == str(path)
        assert e.offset is None or 0 <= e.offset <= path.stat().st_size + 8
        return e


@pytest.fixture
def fuzz_base(tmp_path: Path) -> Tuple[Path, bytes, Snapshot]:
    """A 3-block snapshot with device state, and its important offsets."""
    ram = bytearray(40 * PAGE)
    for i in (0, 5, 6, 39):
        ram[i * PAGE:(i + 1) * PAGE] = page_of(5, i)
    path = tmp_path / "base.img"
    write_snapshot(path, [("pc.ram", ram), ("vga", 2 * PAGE), ("/rom@etc/x", page_of(6, 0))],
                   machine="pc-q35-10.0", device_state=fake_device_state())
    snap = Snapshot.open(path)
    snap.close()
    return path, path.read_bytes(), snap


def _boundaries(snap: Snapshot) -> List[int]:
    points = {0, 8, 0x40, snap.ram_section_offset, snap.file_size}
    for b in snap.blocks:
        points |= {b.header_offset, b.bitmap_offset - 28, b.bitmap_offset,
                   b.bitmap_offset + len(b.bitmap), b.pages_offset, b.pages_offset + b.length}
    for d in snap.devices:
        points |= {d.offset, d.offset + d.length}
    points |= set(range(snap.device_state_range[0] - 40, snap.file_size))
    return sorted(p for p in points if 0 <= p <= snap.file_size)


@pytest.mark.timeout(120)
def test_fuzz_truncation(fuzz_base: Tuple[Path, bytes, Snapshot], tmp_path: Path) -> None:
    path, data, snap = fuzz_base
    header_region = range(0, snap.blocks[0].bitmap_offset + len(snap.blocks[0].bitmap) + 1)
    cut = tmp_path / "cut.img"
    for n in sorted(set(header_region) | set(_boundaries(snap))):
        if n in (len(data), snap.vmdesc_offset):
            continue  # the whole file, or the file minus its vmdesc trailer: both valid
        with open(cut, "wb") as f:
            f.write(data[:n])
        assert _open_outcome(cut) is not None, f"truncated at {n:#x} parsed"


@pytest.mark.timeout(180)
def test_fuzz_single_byte_corruption(tmp_path: Path) -> None:
    """Every byte of the first 64 KiB and of the tail, corrupted one at a time.

    The base file uses 4 KiB-aligned pages regions (QEMU 10 loads those too),
    so its first 64 KiB hold several block records, bitmaps and page data.
    Structural bytes get three different corruptions; page data and padding,
    which the reader never looks at when opening, one.
    """
    blocks = [(f"blk{i}", page_of(i, 0) + bytes(PAGE) * (i % 2) + page_of(i, 1)) for i in range(4)]
    work = tmp_path / "corrupt.img"
    write_snapshot(work, blocks, device_state=fake_device_state(), pages_alignment=PAGE)
    data = work.read_bytes()
    with Snapshot.open(work) as snap:
        last = snap.blocks[-1]
        tail_start = last.pages_offset + last.length
        structural = set(range(0, snap.blocks[0].header_offset)) | set(range(tail_start, len(data)))
        for blk in snap.blocks:
            structural |= set(range(blk.header_offset, blk.bitmap_offset + len(blk.bitmap)))
    assert tail_start < 64 * 1024
    offsets = sorted(set(range(0, min(64 * 1024, len(data)))) | set(range(tail_start, len(data))))
    rng = random.Random(0)
    outcomes = {"error": 0, "ok": 0}
    with open(work, "r+b") as f:
        for off in offsets:
            values = [data[off] ^ 0xFF]
            if off in structural:
                values += [data[off] ^ 0x01, rng.randrange(256)]
            for value in values:
                if value == data[off]:
                    continue
                f.seek(off)
                f.write(bytes([value]))
                f.flush()
                outcomes["error" if _open_outcome(work) else "ok"] += 1
                f.seek(off)
                f.write(data[off:off + 1])
        f.flush()
    assert outcomes["error"] > 500 and outcomes["ok"] > 500  # both kinds happen


def _patched(data: bytes, at: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def test_crafted_bad_headers(fuzz_base: Tuple[Path, bytes, Snapshot], tmp_path: Path) -> None:
    path, data, snap = fuzz_base
    b0, b1, b2 = snap.blocks
    h0, h1 = b0.bitmap_offset - 28, b1.bitmap_offset - 28
    size_word = snap.ram_section_offset + 1 + 4 + 4 + 4 + 4
    cases = {
        "bitmap past the end": _patched(data, h1 + 12, ">Q", len(data) - 4),
        "bitmap far past the end": _patched(data, h1 + 12, ">Q", 1 << 62),
        "pages past the end": _patched(data, h1 + 20, ">Q", len(data) // MiB * MiB + MiB),
        "pages unaligned": _patched(data, h1 + 20, ">Q", b1.pages_offset + 8),
        "pages overlap previous block": _patched(data, h1 + 20, ">Q", b0.pages_offset),
        "bitmap overlaps pages": _patched(data, h1 + 12, ">Q", b0.pages_offset + 16),
        "bitmap overlaps own header": _patched(data, h0 + 12, ">Q", h0),
        "bitmap before stream": _patched(data, h0 + 12, ">Q", 0),
        "page size not power of two": _patched(data, h0 + 4, ">Q", 6000),
        "page size small": _patched(data, h0 + 4, ">Q", 2048),
        "page size absurd": _patched(data, h0 + 4, ">Q", 1 << 63),
        "header version": _patched(data, h0, ">I", 2),
        "used length absurd": _patched(data, h0 - 8, ">Q", 1 << 62),
        "used length not multiple": _patched(data, h0 - 8, ">Q", b0.length + 100),
        "mem size total too big": _patched(data, size_word, ">Q", (1 << 40) | 4),
        "mem size total too small": _patched(data, size_word, ">Q", PAGE | 4),
        "mem size flags page": _patched(data, size_word, ">Q", b0.length | 4 | 8),
        "zero flag in EOS": _patched(data, b2.pages_offset + b2.length, ">Q", 0x12),
        "footer id": _patched(data, b2.pages_offset + b2.length + 9, ">I", 9),
        "machine length absurd": _patched(data, 9, ">I", 0xFFFFFFFF),
        "ram version": _patched(data, snap.ram_section_offset + 13, ">I", 3),
        "vmdesc length": _patched(data, snap.file_size - len(json.dumps(snap.vmdesc)) - 4, ">I",
                                  0x7FFFFFFF),
    }
    for label, content in cases.items():
        p = tmp_path / "case.img"
        p.write_bytes(content)
        err = _open_outcome(p)
        assert err is not None, label


def test_duplicate_names_and_overlapping_pages(tmp_path: Path) -> None:
    p = tmp_path / "x.img"
    write_snapshot(p, [("aaa", 2 * PAGE), ("bbb", PAGE)])
    data = p.read_bytes()
    p.write_bytes(data.replace(b"\x03bbb", b"\x03aaa"))
    err = _open_outcome(p)
    assert err is not None and "unique" in str(err)
    with Snapshot.open(_rewritten(tmp_path, data)) as snap:
        a, b = snap.blocks
    # b's pages region moved onto a's: the regions overlap
    over = _patched(data, b.bitmap_offset - 28 + 20, ">Q", a.pages_offset)
    p.write_bytes(over)
    assert _open_outcome(p) is not None


def _rewritten(tmp_path: Path, data: bytes) -> Path:
    q = tmp_path / "orig.img"
    q.write_bytes(data)
    return q


@pytest.mark.timeout(60)
def test_fuzz_random_bytes(tmp_path: Path) -> None:
    rng = random.Random(1234)
    p = tmp_path / "r.img"
    prefix = bytes.fromhex("5145564d00000003") + configuration(
        "none", capabilities=["mapped-ram"]) + bytes.fromhex("0100000001036572616d0000000000000004")
    for trial in range(600):
        n = rng.choice([1, 10, 100, 1000, 10000, 100000])
        body = rng.randbytes(n)
        if trial % 3 == 1:
            body = prefix[:rng.randrange(len(prefix) + 1)] + body
        elif trial % 3 == 2:
            body = prefix + struct.pack(">Q", rng.randrange(1 << 20) << 12 | 4) + body
        p.write_bytes(body)
        assert _open_outcome(p) is not None


def test_parse_without_vmdesc(tmp_path: Path) -> None:
    path = tmp_path / "nodesc.img"
    write_snapshot(path, [("ram", page_of(1, 1))], device_state=fake_device_state(with_vmdesc=False))
    with Snapshot.open(path) as snap:
        assert snap.vmdesc is None
        assert [d.name for d in snap.devices] == ["timer", "globalstate"]
        assert snap.device_state_range[1] == snap.file_size


def test_public_names() -> None:
    assert issubclass(NotMappedRamError, MappedRamError)
    assert issubclass(MappedRamError, ValueError)
    d = DeviceSection(name="x", instance=0, version=1, section_id=2, offset=3, length=4)
    with pytest.raises(Exception):
        d.name = "y"  # type: ignore[misc]
    assert RamBlock.runs.__doc__ and Snapshot.open.__doc__


def test_early_device_sections(tmp_path: Path) -> None:
    """early_setup device sections sit between the configuration and the RAM START section."""
    early = device_section(5, "virtio-mem-early", 0, 1, b"\x7e\x00\x00\x00\x05\x01xx" + bytes(9))
    desc = json.dumps({"devices": [
        {"name": "virtio-mem-early", "instance_id": 0},
        {"name": "timer", "instance_id": 0}, {"name": "globalstate", "instance_id": 0}]}).encode()
    tail = fake_device_state(with_vmdesc=False) + b"\x06" + struct.pack(">I", len(desc)) + desc
    path = tmp_path / "early.img"
    write_snapshot(path, [("ram", page_of(1, 2))], early_device_state=early, device_state=tail)
    with Snapshot.open(path) as snap:
        assert [d.name for d in snap.devices] == ["virtio-mem-early", "timer", "globalstate"]
        assert snap.read_range(*snap.early_device_state_range) == early
        assert snap.read_range(*snap.device_state_range) == tail
        assert snap.blocks[0].read_page(0) == page_of(1, 2)
