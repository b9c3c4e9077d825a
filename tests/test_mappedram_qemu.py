"""uffdpy.mappedram against files written and loaded by a real QEMU 10.

Snapshots are made by uffdpy.qemu, under TCG with no guest OS, with known
random bytes at known guest-physical addresses; the reader's pages are
compared with those bytes and with QEMU's own pmemsave of guest memory.
Writer round trips are loaded back into QEMU and compared the same way.
Snapshots are made once per module and shared between tests.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from uffdpy.mappedram import (BlockSpec, MappedRamError, NotMappedRamError, RamBlock, Snapshot,
                              rewrite_snapshot, write_snapshot)
from uffdpy.harness.synthetic import make_synthetic

from uffdpy.harness import vm  # noqa: E402  (the snapshot-making library: VmConfig, save_snapshot, ...)
VmConfig = vm.VmConfig

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(120)]

PAGE = 4096
MiB = 1 << 20
# x86 legacy VGA window and option ROM / BIOS shadow: guest-physical reads there
# do not come from the RAM block
LEGACY_HOLE = range(0xA0000 // PAGE, 0x100000 // PAGE)

Q35_NUMA_ARGS = ("-object", "memory-backend-ram,id=m0,size=64M",
                 "-object", "memory-backend-ram,id=m1,size=64M",
                 "-numa", "node,memdev=m0", "-numa", "node,memdev=m1")


class Made:
    """One QEMU-made snapshot: config, image, pmemsave dump and the known regions."""

    def __init__(self, config: "VmConfig", image: Path, pmem: Path, regions: list,
                 offset: int = 0) -> None:
        self.config = config
        self.image = image
        self.pmem = pmem
        self.regions = regions
        self.offset = offset

    def memory(self) -> bytes:
        return self.pmem.read_bytes()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qemu-mappedram")


@pytest.fixture(scope="module")
def make(qemu_binary: str, workdir: Path):  # type: ignore[no-untyped-def]
    cache: Dict[str, Made] = {}

    def _make(name: str, config: "VmConfig", regions: List[Tuple[int, int, int]], *,
              offset: int = 0, prefix: bytes = b"", **kwargs: object) -> Made:
        if name not in cache:
            config = dataclasses.replace(config, qemu=qemu_binary)
            regs = [vm.random_region(str(workdir), addr=a, size=s, seed=seed)
                    for a, s, seed in regions]
            image, pmem = workdir / f"{name}.img", workdir / f"{name}.pmem"
            if prefix:
                image.write_bytes(prefix)
            vm.save_snapshot(config, str(image), regions=regs, offset=offset,
                                        pmemsave=str(pmem), run_seconds=0.2, timeout=60,
                                        **kwargs)
            cache[name] = Made(config, image, pmem, regs, offset)
        return cache[name]
    return _make


def none64(make):  # type: ignore[no-untyped-def]
    return make("none64", VmConfig(machine="none", mem="64M"),
                [(0x100000, 0x10000, 1), (0x2345000, 0x3000, 2), (0x3FFF000, 0x1000, 3)])


def assert_block_equals_memory(block: RamBlock, memory: bytes, gpa: int, *,
                               skip: range = range(0)) -> None:
    """Every page of ``block`` equals guest memory at ``gpa`` (page-granular, with a skip list)."""
    data = block.read_pages(0, block.pages)
    assert len(memory) >= gpa + block.length
    for first, count, present in block.runs():
        lo, hi = first * PAGE, (first + count) * PAGE
        if data[lo:hi] == memory[gpa + lo:gpa + hi]:
            continue
        bad = [i for i in range(first, first + count)
               if i not in skip and data[i * PAGE:(i + 1) * PAGE]
               != memory[gpa + i * PAGE:gpa + (i + 1) * PAGE]]
        assert not bad, f"{block.name}: pages {bad[:10]} differ from pmemsave"


def assert_regions(snap: Snapshot, made: Made, block_at: List[Tuple[str, int]]) -> None:
    """The known random bytes are where they were loaded, read through the reader."""
    for region in made.regions:
        data = region.data()
        for name, gpa in block_at:
            blk = snap.block(name)
            lo = max(region.addr, gpa)
            hi = min(region.addr + region.size, gpa + blk.length)
            if lo >= hi:
                continue
            first, last = (lo - gpa) // PAGE, (hi - gpa - 1) // PAGE
            got = blk.read_pages(first, last - first + 1)
            start = lo - gpa - first * PAGE
            assert got[start:start + hi - lo] == data[lo - region.addr:hi - region.addr]
            for i in range(first, last + 1):
                assert blk.is_present(i)


# --- reading what QEMU wrote --------------------------------------------------------------

def test_machine_none_64m(make) -> None:  # type: ignore[no-untyped-def]
    made = none64(make)
    with Snapshot.open(made.image) as snap:
        assert snap.machine == "none" and snap.capabilities == ["mapped-ram"]
        assert [b.name for b in snap.blocks] == ["ram"]
        blk = snap.block("ram")
        assert (blk.length, blk.page_size, blk.pages_offset) == (64 * MiB, PAGE, MiB)
        assert blk.present_pages == 16 + 3 + 1
        assert [d.name for d in snap.devices] == ["timer", "globalstate"]
        assert snap.vmdesc is not None and snap.device_state_range[1] == snap.file_size
        assert_regions(snap, made, [("ram", 0)])
        assert_block_equals_memory(blk, made.memory(), 0)
    # sparse, as QEMU writes it
    assert made.image.stat().st_blocks * 512 < 4 * MiB


def test_pc_with_vga_has_many_blocks(make) -> None:  # type: ignore[no-untyped-def]
    made = make("pc", VmConfig(machine="pc", mem="128M", args=("-device", "VGA")),
                [(0x2000000, 0x100000, 4), (0x4000000, 0x8000, 5)])  # SeaBIOS uses the top of RAM
    with Snapshot.open(made.image) as snap:
        assert snap.machine.startswith("pc-i440fx-")
        names = [b.name for b in snap.blocks]
        for expected in ("pc.ram", "0000:00:02.0/vga.vram", "pc.bios", "pc.rom",
                         "0000:00:02.0/vga.rom", "/rom@etc/acpi/tables"):
            assert expected in names
        assert names[0] == "pc.ram"
        assert snap.block("pc.ram").length == 128 * MiB
        assert snap.block("0000:00:02.0/vga.vram").length == 16 * MiB
        # each block's record follows the previous pages region; pages 1 MiB aligned
        for a, b in zip(snap.blocks, snap.blocks[1:]):
            assert b.header_offset == a.pages_offset + a.length
        assert all(b.pages_offset % MiB == 0 for b in snap.blocks)
        assert snap.block("pc.bios").present_pages > 0  # firmware is in the file
        assert {"cpu", "apic", "fw_cfg", "0000:00:02.0/vga", "globalstate"} <= {
            d.name for d in snap.devices}
        assert_regions(snap, made, [("pc.ram", 0)])
        assert_block_equals_memory(snap.block("pc.ram"), made.memory(), 0, skip=LEGACY_HOLE)


def test_q35_two_numa_backends(make) -> None:  # type: ignore[no-untyped-def]
    made = make("q35", VmConfig(machine="q35", mem="128M", args=Q35_NUMA_ARGS),
                [(0x3FF0000, 0x20000, 6), (0x5000000, 0x4000, 7)])  # first crosses m0 -> m1
    with Snapshot.open(made.image) as snap:
        assert snap.machine.startswith("pc-q35-")
        assert [b.name for b in snap.blocks][:2] == ["m0", "m1"]
        assert snap.block("m0").length == snap.block("m1").length == 64 * MiB
        memory = made.memory()
        assert_regions(snap, made, [("m0", 0), ("m1", 64 * MiB)])
        assert_block_equals_memory(snap.block("m0"), memory, 0, skip=LEGACY_HOLE)
        assert_block_equals_memory(snap.block("m1"), memory, 64 * MiB)


def test_multifd_four_channels_same_layout(make) -> None:  # type: ignore[no-untyped-def]
    plain = none64(make)
    made = make("multifd", VmConfig(machine="none", mem="64M"),
                [(0x100000, 0x10000, 1), (0x2345000, 0x3000, 2), (0x3FFF000, 0x1000, 3)],
                multifd_channels=4)
    with Snapshot.open(made.image) as snap, Snapshot.open(plain.image) as ref:
        a, b = snap.block("ram"), ref.block("ram")
        assert (a.bitmap_offset, a.pages_offset, a.bitmap) == (b.bitmap_offset, b.pages_offset,
                                                                b.bitmap)
        assert list(a.runs()) == list(b.runs())
        assert_regions(snap, made, [("ram", 0)])
        assert_block_equals_memory(a, made.memory(), 0)


def test_file_uri_with_offset(make) -> None:  # type: ignore[no-untyped-def]
    offset = 0x12345
    prefix = bytes(range(256)) * 400  # longer than the offset: QEMU must not touch [0, offset)
    made = make("offset", VmConfig(machine="none", mem="64M"), [(0x200000, 0x8000, 8)],
                offset=offset, prefix=prefix)
    assert made.image.read_bytes()[:offset] == prefix[:offset]
    with pytest.raises(MappedRamError, match="bad magic"):
        Snapshot.open(made.image)
    with Snapshot.open(made.image, offset=offset) as snap:
        blk = snap.block("ram")
        assert blk.pages_offset % MiB == 0 and blk.bitmap_offset > offset  # absolute offsets
        assert_regions(snap, made, [("ram", 0)])
        assert_block_equals_memory(blk, made.memory(), 0)


def test_stream_without_mapped_ram(make) -> None:  # type: ignore[no-untyped-def]
    made = make("plain", VmConfig(machine="none", mem="64M"), [(0x100000, 0x1000, 9)],
                mapped_ram=False)
    with pytest.raises(NotMappedRamError) as info:
        Snapshot.open(made.image)
    text = str(info.value)
    assert str(made.image) in text and "mapped-ram" in text and "migrate-set-capabilities" in text


def test_qemu_loads_its_own_snapshot(make, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    made = none64(make)
    out = workdir / "none64-loaded.pmem"
    info = vm.load_snapshot(made.config, str(made.image), pmemsave=str(out),
                                       timeout=60)
    assert info["status"] == "paused" and info["seconds"] < 30
    assert out.read_bytes() == made.memory()


# --- writing what QEMU loads -------------------------------------------------------------

def test_synthetic_snapshot_loads_into_qemu(qemu_binary: str, workdir: Path) -> None:
    image, pmem = workdir / "synthetic.img", workdir / "synthetic.pmem"
    make_synthetic(image, size=64 * MiB, fill=0.3, seed=11)
    config = VmConfig(machine="none", mem="64M", qemu=qemu_binary)
    info = vm.load_snapshot(config, str(image), pmemsave=str(pmem), timeout=60)
    assert info["query-migrate"]["status"] == "completed"
    with Snapshot.open(image) as snap:
        blk = snap.block("ram")
        assert 0.15 < blk.present_pages / blk.pages < 0.45
        assert blk.read_pages(0, blk.pages) == pmem.read_bytes()


def test_explicit_contents_load_into_qemu(qemu_binary: str, workdir: Path) -> None:
    contents = bytearray(16 * MiB)
    contents[5 * PAGE:9 * PAGE] = os.urandom(4 * PAGE)
    contents[-1] = 0x5A
    image, pmem = workdir / "explicit.img", workdir / "explicit.pmem"
    write_snapshot(image, [("ram", contents)])
    config = VmConfig(machine="none", mem="16M", qemu=qemu_binary)
    vm.load_snapshot(config, str(image), pmemsave=str(pmem), timeout=60)
    assert pmem.read_bytes() == bytes(contents)


def _rewrite_through_writer(src: Snapshot, dst: Path) -> None:
    """Re-emit a QEMU snapshot with write_snapshot: every present run streamed, device state copied."""
    def chunks(blk: RamBlock) -> Iterator[Tuple[int, bytes]]:
        for first, count, present in blk.runs():
            if present:
                for lo in range(first, first + count, 256):
                    n = min(256, first + count - lo)
                    yield (lo, blk.read_pages(lo, n))
    specs = [BlockSpec(b.name, b.length, chunks(b)) for b in src.blocks]
    write_snapshot(dst, specs, machine=src.machine, capabilities=src.capabilities,
                   device_state=src.read_range(*src.device_state_range),
                   ram_section_id=src.ram_section_id)


def test_pc_snapshot_rewritten_by_the_writer_loads(make, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    made = make("pc", VmConfig(machine="pc", mem="128M", args=("-device", "VGA")),
                [(0x2000000, 0x100000, 4), (0x4000000, 0x8000, 5)])  # SeaBIOS uses the top of RAM
    dst, pmem = workdir / "pc-rewritten.img", workdir / "pc-rewritten.pmem"
    with Snapshot.open(made.image) as src:
        _rewrite_through_writer(src, dst)
        with Snapshot.open(dst) as copy:
            for a, b in zip(src.blocks, copy.blocks):
                assert (a.name, a.length, a.bitmap_offset, a.pages_offset, a.bitmap) == (
                    b.name, b.length, b.bitmap_offset, b.pages_offset, b.bitmap)
            shift = copy.device_state_range[0] - src.device_state_range[0]
            assert copy.devices == [d.replace(offset=d.offset + shift)
                                    for d in src.devices]
    info = vm.load_snapshot(made.config, str(dst), pmemsave=str(pmem), timeout=60)
    assert info["status"] == "paused"
    assert pmem.read_bytes() == made.memory()


def test_q35_snapshot_with_patched_pages_loads(make, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    made = make("q35", VmConfig(machine="q35", mem="128M", args=Q35_NUMA_ARGS),
                [(0x3FF0000, 0x20000, 6), (0x5000000, 0x4000, 7)])
    patch = bytes(range(256)) * (PAGE // 256)
    zero_gpa = 0x3FF0000                           # a page of the known region, zeroed
    patches = {("m1", 0x123): patch,               # a zero page in m1 gets data
               ("m1", (0x5000000 - 64 * MiB) // PAGE): patch,  # a data page replaced
               ("m0", zero_gpa // PAGE): bytes(PAGE)}
    dst, pmem = workdir / "q35-patched.img", workdir / "q35-patched.pmem"
    rewrite_snapshot(made.image, dst, patches)
    with Snapshot.open(made.image) as src, Snapshot.open(dst) as copy:
        assert src.read_range(*src.device_state_range) == copy.read_range(*copy.device_state_range)
        assert copy.block("m0").is_present(zero_gpa // PAGE) is False
    info = vm.load_snapshot(made.config, str(dst), pmemsave=str(pmem), timeout=60)
    assert info["status"] == "paused"
    before, after = made.memory(), pmem.read_bytes()
    assert len(before) == len(after) == 128 * MiB
    changed = {i for i in range(len(before) // PAGE)
               if before[i * PAGE:(i + 1) * PAGE] != after[i * PAGE:(i + 1) * PAGE]}
    expected = {64 * MiB // PAGE + 0x123, 0x5000000 // PAGE, zero_gpa // PAGE}
    assert changed == expected
    assert after[0x5000000:0x5000000 + PAGE] == patch
    assert after[64 * MiB + 0x123 * PAGE:64 * MiB + 0x124 * PAGE] == patch
    assert after[zero_gpa:zero_gpa + PAGE] == bytes(PAGE)
