"""uffdpy.elfcore against ELF cores from real producers, and against broken files.

Real producers: QEMU's ``dump-guest-memory`` of a ``-machine pc`` guest with
known random bytes at known guest-physical addresses (compared with QEMU's
own ``pmemsave`` and ``info mtree -f``), and Linux process cores from ``gcore``
and from the kernel, of a child holding a known buffer at a known virtual
address (uffdpy.harness.processcore).  Broken files are made by patching those
cores' headers, or by a small hand-built core for fast fuzzing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import pytest

from uffdpy.elfcore import ElfImage, ElfImageError, ElfNote, ElfRegion
from uffdpy.pagesource import ImageError, open_image

from uffdpy.harness import vm  # noqa: E402  (the snapshot-making library: VmConfig, save_snapshot, ...)
from uffdpy.harness import processcore
from helpers import LAZY_SERVERS, assert_loaders_refuse_without_leaks, open_fds, write_files  # noqa: E402  (tests/ is on sys.path)

pytestmark = pytest.mark.timeout(180)

PAGE = 4096
ROOT = Path(__file__).resolve().parent.parent
PHDR = struct.Struct("<IIQQQQQQ")   # p_type p_flags p_offset p_vaddr p_paddr p_filesz p_memsz p_align
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PT_LOAD, PT_NOTE = 1, 4

#: known random bytes in the pc guest: (guest-physical address, size, seed)
PC_RANDOM = [(0x100000, 0x10000, 1), (0x2345000, 0x3000, 2), (0x7FFF000, 0x1000, 3)]


# --------------------------------------------------------------------------- helpers

def assert_one_line(e: ImageError, path: Path) -> None:
    text = str(e)
    assert "\n" not in text and text.startswith(str(path)), text


def read_at(image: ElfImage, address: int, size: int) -> bytes:
    """``size`` bytes at ``address`` of the image's address space, via read_pages."""
    region = image.region_at(address)
    assert address + size <= region.end
    first = (address - region.address) // PAGE
    count = -(-(address - region.address + size) // PAGE) - first
    data = region.read_pages(first, count)
    start = address - region.address - first * PAGE
    return data[start:start + size]


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def phdr(path: Path, offset: int) -> List[int]:
    with open(path, "rb") as f:
        f.seek(offset)
        return list(PHDR.unpack(f.read(PHDR.size)))


def set_phdr(path: Path, offset: int, **fields: int) -> None:
    names = ["p_type", "p_flags", "p_offset", "p_vaddr", "p_paddr", "p_filesz", "p_memsz",
             "p_align"]
    values = phdr(path, offset)
    for k, v in fields.items():
        values[names.index(k)] = v
    patch(path, offset, PHDR.pack(*values))


def note(name: bytes, n_type: int, desc: bytes) -> bytes:
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name) + 1, len(desc), n_type) + pad(name + b"\0") + pad(desc)


def make_core(path: Path, loads: Sequence[Tuple[int, bytes, int]], *,
              notes: bytes = note(b"CORE", 1, bytes(336)), paddr: bool = False,
              align: int = PAGE, e_type: int = 4) -> Path:
    """A small hand-built ELF64 core: one PT_NOTE, then PT_LOADs (vaddr, data, memsz)."""
    phnum = 1 + len(loads)
    off = 64 + phnum * PHDR.size
    headers = [PHDR.pack(PT_NOTE, 0, off, 0, 0, len(notes), 0, 4)]
    body = bytearray(notes)
    off += len(notes)
    for vaddr, data, memsz in loads:
        off = -(-off // align) * align
        pos = off - 64 - phnum * PHDR.size
        body += bytes(pos - len(body)) + data
        headers.append(PHDR.pack(PT_LOAD, 6, off, vaddr, vaddr if paddr else 0, len(data),
                                 memsz, align))
        off += len(data)
    ident = b"\x7fELF\x02\x01\x01" + bytes(9)
    ehdr = EHDR.pack(ident, e_type, 62, 1, 0, 64, 0, 0, 64, PHDR.size, phnum, 0, 0, 0)
    path.write_bytes(ehdr + b"".join(headers) + body)
    return path


def rnd(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("elfcore")


# ---------------------------------------------------------------- a QEMU guest dump

@dataclasses.dataclass
class QemuDump:
    path: Path
    ram_ranges: List[Tuple[int, int, str]]
    pmem: Dict[int, Path]            # range start -> pmemsave of that range
    regions: list                    # vm.Region with the known bytes


@pytest.fixture(scope="module")
def pc_dump(qemu_binary: str, workdir: Path) -> QemuDump:
    """``-machine pc -m 128M`` (TCG, firmware only) with random bytes, dumped and pmemsaved."""
    regions = [vm.random_region(str(workdir), addr=a, size=s, seed=seed)
               for a, s, seed in PC_RANDOM]
    cfg = vm.VmConfig(machine="pc", mem="128M", qemu=qemu_binary)
    extra: List[str] = []
    for r in regions:
        extra += r.args()
    path = workdir / "pc.elf"
    pmem: Dict[int, Path] = {}
    # paused from the start: the memory layout is the reset one, not wherever the firmware got to
    with vm.QemuVM(cfg, extra=extra, timeout=60, paused=True) as machine:
        ranges = machine.ram_ranges()
        for start, end, _ in ranges:
            pmem[start] = workdir / f"pc-{start:#x}.pmem"
            machine.pmemsave(str(pmem[start]), addr=start, size=end - start)
        info = machine.dump_guest_memory(str(path))
    assert info["status"] == "completed"
    return QemuDump(path, ranges, pmem, regions)


@pytest.mark.qemu
def test_qemu_dump_regions_are_guest_ram(pc_dump: QemuDump) -> None:
    with ElfImage.open(pc_dump.path) as image:
        assert image.format == "elf-core"
        assert image.address_space == "guest-physical"
        # firmware runs in real mode: QEMU says EM_386 (ELF64 because the BIOS ends at 4 GiB)
        assert image.machine in ("EM_386", "EM_X86_64")
        got = [(r.address, r.end) for r in image.regions]
        assert got == [(s, e) for s, e, _ in pc_dump.ram_ranges]
        # reset layout: RAM, option ROM, BIOS alias, RAM from 1 MiB, BIOS below 4 GiB
        assert got == [(0, 0xC0000), (0xC0000, 0xE0000), (0xE0000, 0x100000),
                       (0x100000, 128 << 20), (0xFFFC0000, 1 << 32)]
        assert [n for _, _, n in pc_dump.ram_ranges] == ["pc.ram", "pc.rom", "pc.bios", "pc.ram",
                                                         "pc.bios"]
        assert image.regions[3].name == "0x0000000000100000-0x0000000007ffffff"
        for r in image.regions:
            assert isinstance(r, ElfRegion)
            assert r.paddr == r.vaddr == r.address          # paging: false
            assert r.file_bytes == r.memsz == r.length and r.zero_pages == 0
            assert list(r.runs()) == [(0, r.pages, True)]
            assert image.region(r.name) is r


@pytest.mark.qemu
def test_qemu_dump_file_offsets_are_not_page_aligned(pc_dump: QemuDump) -> None:
    """What the loader must know: QEMU packs segments right after the notes."""
    with ElfImage.open(pc_dump.path) as image:
        regions = image.regions
        assert all(r.file_offset % PAGE for r in regions)
        for a, b in zip(regions, regions[1:]):
            assert b.file_offset == a.file_offset + a.file_bytes   # back to back in the file
        # after the last segment QEMU writes only its .shstrtab section (11 bytes)
        assert 0 < image.file_size - (regions[-1].file_offset + regions[-1].file_bytes) < PAGE
        r = regions[0]
        assert r.page_offset(3) == r.file_offset + 3 * PAGE
        assert image.read_range(r.page_offset(3), r.page_offset(4)) == r.read_page(3)


@pytest.mark.qemu
def test_qemu_dump_known_bytes(pc_dump: QemuDump) -> None:
    with ElfImage.open(pc_dump.path) as image:
        for region in pc_dump.regions:
            assert read_at(image, region.addr, region.size) == region.data()
            owner = image.region_at(region.addr)
            first = (region.addr - owner.address) // PAGE
            assert all(owner.is_present(i) for i in range(first, first + region.size // PAGE))


@pytest.mark.qemu
def test_qemu_dump_equals_pmemsave(pc_dump: QemuDump) -> None:
    with ElfImage.open(pc_dump.path) as image:
        for r in image.regions:
            expected = pc_dump.pmem[r.address].read_bytes()
            assert len(expected) == r.length
            assert r.read_pages(0, r.pages) == expected, f"{r.name} differs from pmemsave"


@pytest.mark.qemu
def test_qemu_dump_notes(pc_dump: QemuDump) -> None:
    with ElfImage.open(pc_dump.path) as image:
        names = [(n.name, n.type_name) for n in image.notes]
        assert names == [("CORE", "NT_PRSTATUS"), ("QEMU", "QEMU_CPU_STATE")]   # one CPU
        prstatus, qemu_cpu = image.notes
        assert isinstance(prstatus, ElfNote) and prstatus.type == 1 and prstatus.size > 0
        assert qemu_cpu.type == 0 and qemu_cpu.size > 0
        assert prstatus.offset < qemu_cpu.offset < image.regions[0].file_offset
        # QEMUCPUState starts with its version (1) and size (== descsz)
        desc = image.read_range(qemu_cpu.desc_offset, qemu_cpu.desc_offset + 8)
        assert struct.unpack("<II", desc) == (1, qemu_cpu.size)
        with pytest.raises(dataclasses.FrozenInstanceError):
            prstatus.size = 0  # type: ignore[misc]


@pytest.mark.qemu
def test_qemu_dump_opens_through_open_image(pc_dump: QemuDump) -> None:
    image = open_image(pc_dump.path)
    try:
        assert isinstance(image, ElfImage)
        assert image.format == "elf-core" and len(image.regions) == 5
    finally:
        image.close()


@pytest.mark.qemu
def test_qemu_machine_none_dump_is_elf32_and_refused(qemu_binary: str, workdir: Path) -> None:
    """-machine none has no CPU: QEMU writes an ELF32/EM_386 dump, which is refused clearly."""
    path = workdir / "none.elf"
    cfg = vm.VmConfig(machine="none", mem="16M", qemu=qemu_binary)
    vm.dump_guest_memory(cfg, str(path), timeout=60)
    with pytest.raises(ElfImageError) as exc:
        ElfImage.open(path)
    assert exc.value.offset == 4 and "ELFCLASS32" in str(exc.value)
    assert "-machine pc" in str(exc.value)
    assert_one_line(exc.value, path)


@pytest.mark.qemu
def test_qemu_snapshot_dump_cli(qemu_binary: str, workdir: Path) -> None:
    """scripts/qemu_snapshot.py dump (the dump_guest_memory function) end to end."""
    out, pmem = workdir / "cli.elf", workdir / "cli.pmem"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "qemu_snapshot.py"), "dump", str(out),
         "--machine", "pc", "--mem", "64M", "--qemu", qemu_binary, "--random", "0x300000:0x2000:5",
         "--pmemsave", str(pmem), "--data-dir", str(workdir)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["query-dump"]["status"] == "completed"
    with ElfImage.open(out) as image:
        assert [[r.address, r.end] for r in image.regions] == [
            [s, e] for s, e, _ in summary["ram_ranges"]]
        assert read_at(image, 0x300000, 0x2000) == rnd(0x2000, 5)
        memory = pmem.read_bytes()
        assert len(memory) == 64 << 20
        below = [r for r in image.regions if r.end <= len(memory)]
        assert sum(r.length for r in below) == len(memory)
        for r in below:
            assert r.read_pages(0, r.pages) == memory[r.address:r.end], r.name


# ------------------------------------------------------------------- process cores

@dataclasses.dataclass
class ProcessCore:
    path: Path
    address: int
    data: bytes


@pytest.fixture(scope="module")
def gcore(workdir: Path) -> ProcessCore:
    d = workdir / "gcore"
    d.mkdir()
    try:
        path, address, data = processcore.gcore_core(str(d), size=0x23456, seed=7, timeout=60)
    except processcore.CoreUnavailable as e:
        pytest.fail(f"gcore must work here: {e}")
    return ProcessCore(Path(path), address, data)


@pytest.fixture(scope="module")
def kernel_core(workdir: Path) -> ProcessCore:
    d = workdir / "kernel"
    d.mkdir()
    try:
        path, address, data = processcore.kernel_core(str(d), size=0x23456, seed=8, timeout=60)
    except processcore.CoreUnavailable as e:
        pytest.skip(f"the kernel cannot write a core here: {e}")
    return ProcessCore(Path(path), address, data)


def check_process_core(core: ProcessCore) -> ElfImage:
    image = ElfImage.open(core.path)
    try:
        assert image.address_space == "virtual"
        assert image.machine == "EM_X86_64"
        assert len(image.regions) > 10
        assert all(r.paddr == 0 and r.address == r.vaddr for r in image.regions)
        assert len({r.name for r in image.regions}) == len(image.regions)
        assert read_at(image, core.address, len(core.data)) == core.data
        region = image.region_at(core.address)
        assert region.perms == "rw-"
        assert any(n.name == "CORE" and n.type_name == "NT_PRSTATUS" and n.type == 1
                   for n in image.notes)
        assert any(n.type_name == "NT_FILE" for n in image.notes)
        ordered = sorted(image.regions, key=lambda r: r.address)
        assert all(a.end <= b.address for a, b in zip(ordered, ordered[1:]))
    except BaseException:
        image.close()
        raise
    return image


def test_gcore_core(gcore: ProcessCore) -> None:
    with check_process_core(gcore) as image:
        # gdb: every segment fully in the file, offsets not page-aligned
        assert all(r.file_bytes == r.memsz for r in image.regions)
        assert any(r.file_offset % PAGE for r in image.regions)
        assert any(n.name == "GDB" for n in image.notes)


def test_kernel_core(kernel_core: ProcessCore) -> None:
    with check_process_core(kernel_core) as image:
        # the kernel: page-aligned offsets, text mappings not dumped (p_filesz < p_memsz)
        assert all(r.file_offset % PAGE == 0 for r in image.regions)
        partial = [r for r in image.regions if r.file_bytes < r.memsz]
        assert partial
        for r in partial[:5]:
            assert r.zero_pages == r.pages - r.present_pages > 0
            last = r.pages - 1
            assert not r.is_present(last) and r.read_page(last) == bytes(PAGE)
            assert list(r.runs())[-1] == (r.present_pages, r.zero_pages, False)
        assert any(n.type_name == "NT_SIGINFO" for n in image.notes)
        # the XSAVE area (x86, by owner LINUX), named although pyelftools does not know it
        if any(n.name == "LINUX" and n.type == 0x202 for n in image.notes):
            assert any(n.type_name == "NT_X86_XSTATE" for n in image.notes)


def test_kernel_core_bitmap_and_runs(kernel_core: ProcessCore) -> None:
    with ElfImage.open(kernel_core.path) as image:
        for r in image.regions:
            bits = [r.bitmap[i >> 3] >> (i & 7) & 1 for i in range(r.pages)]
            assert bits == [1] * r.present_pages + [0] * r.zero_pages
            assert [r.is_present(i) for i in range(r.pages)] == [bool(b) for b in bits]
            assert sum(c for _, c, _ in r.runs()) == r.pages


def test_process_core_cli_verify(workdir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "process_core.py"), "gcore",
         str(workdir / "cli-gcore"), "--size", "0x5000", "--seed", "3", "--verify"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["verified"] is True and summary["region"].startswith("0x")
    os.unlink(summary["core"])


# --------------------------------------------------------- region semantics (pure)

def test_partial_last_page_reads_zeros(workdir: Path) -> None:
    data = rnd(2 * PAGE + 100, 11)
    path = make_core(workdir / "partial.core", [(0x10000, data, 5 * PAGE - 7),
                                                (0x40000, b"", PAGE)])
    with ElfImage.open(path) as image:
        assert image.address_space == "virtual" and image.machine == "EM_X86_64"
        a, b = image.regions
        assert (a.length, a.pages, a.present_pages, a.zero_pages) == (5 * PAGE, 5, 3, 2)
        assert a.file_bytes == len(data) and a.memsz == 5 * PAGE - 7
        assert a.bitmap == bytes([0b00111])
        assert list(a.runs()) == [(0, 3, True), (3, 2, False)]
        assert a.read_pages(0, 5) == data + bytes(5 * PAGE - len(data))
        assert a.read_page(2) == data[2 * PAGE:] + bytes(PAGE - 100)
        assert a.read_pages(3, 0) == b""
        assert (b.present_pages, list(b.runs()), b.read_page(0)) == (0, [(0, 1, False)],
                                                                     bytes(PAGE))
        for bad in ((-1, 1), (4, 2), (0, 6)):
            with pytest.raises(IndexError):
                a.read_pages(*bad)
        with pytest.raises(IndexError):
            a.is_present(5)
        with pytest.raises(KeyError, match="0x0000000000010000-0x0000000000014fff"):
            image.region("pc.ram")
        assert a.segment_index == 1 and a.flags == 6 and a.perms == "rw-"
        assert "ElfImage(" in repr(image) and "ElfRegion(" in repr(a)


def test_paddr_means_guest_physical(workdir: Path) -> None:
    path = make_core(workdir / "phys.core", [(0x100000, rnd(PAGE, 1), PAGE)], paddr=True,
                     notes=note(b"CORE", 1, bytes(8)))
    with ElfImage.open(path) as image:
        assert image.address_space == "guest-physical"
    path = make_core(workdir / "qemunote.core", [(0, rnd(PAGE, 1), PAGE)],
                     notes=note(b"QEMU", 0, bytes(8)))
    with ElfImage.open(path) as image:
        assert image.address_space == "guest-physical"
        assert [(n.name, n.type, n.type_name) for n in image.notes] == [("QEMU", 0, "QEMU_CPU_STATE")]


def test_close_is_idempotent_and_fds_do_not_leak(workdir: Path) -> None:
    path = make_core(workdir / "close.core", [(0x10000, rnd(PAGE, 1), PAGE)])
    before = open_fds()
    image = ElfImage.open(path)
    assert image.fileno() >= 0 and not image.closed
    image.close()
    image.close()
    assert image.closed and open_fds() == before
    with pytest.raises(ValueError):
        image.fileno()
    with pytest.raises(ValueError):
        image.read_range(0, 4)
    with pytest.raises(ValueError):
        image.regions[0].read_page(0)
    with ElfImage.open(path) as image:
        assert image.read_range(0, 4) == b"\x7fELF"
    assert image.closed and open_fds() == before
    with pytest.raises(ElfImageError):
        ElfImage.open(Path("/bin/true") if Path("/bin/true").exists() else __file__)
    assert open_fds() == before


def test_package_exports() -> None:
    import uffdpy
    assert uffdpy.ElfImage is ElfImage and uffdpy.ElfImageError is ElfImageError
    assert issubclass(ElfImageError, ImageError)


# ------------------------------------------------------------------------ bad files

def error_of(path: Path) -> ElfImageError:
    with pytest.raises(ElfImageError) as exc:
        ElfImage.open(path).close()
    assert_one_line(exc.value, path)
    return exc.value


@pytest.fixture
def mini(tmp_path: Path) -> Path:
    return make_core(tmp_path / "mini.core", [(0x10000, rnd(2 * PAGE, 1), 2 * PAGE),
                                              (0x20000, rnd(PAGE, 2), 4 * PAGE)])


def test_not_elf(tmp_path: Path) -> None:
    for name, content in (("empty", b""), ("short", b"\x7fEL"), ("text", b"hello world\n" * 10),
                          ("qevm", b"QEVM\0\0\0\3" + bytes(100))):
        p = tmp_path / name
        p.write_bytes(content)
        assert "not an ELF file" in str(error_of(p))


def test_truncated_header(mini: Path) -> None:
    mini.write_bytes(mini.read_bytes()[:40])
    e = error_of(mini)
    assert "truncated ELF header" in str(e) and e.offset == 0


def test_elf32_and_big_endian(mini: Path, tmp_path: Path) -> None:
    p32 = tmp_path / "32.core"
    shutil.copy(mini, p32)
    patch(p32, 4, b"\x01")
    e = error_of(p32)
    assert e.offset == 4 and "ELFCLASS32" in str(e) and "only 64-bit" in str(e)
    patch(mini, 5, b"\x02")
    e = error_of(mini)
    assert e.offset == 5 and "big-endian" in str(e)
    patch(mini, 5, b"\x07")
    e = error_of(mini)
    assert e.offset == 5 and "invalid ELF EI_DATA" in str(e)


def test_not_a_core(mini: Path) -> None:
    patch(mini, 16, struct.pack("<H", 2))
    e = error_of(mini)
    assert "not a core file: e_type is ET_EXEC" in str(e) and e.offset == 16
    true = Path("/bin/true")
    if true.exists():
        assert "not a core file: e_type is ET_" in str(error_of(true))


def test_no_program_headers_and_no_loads(mini: Path, tmp_path: Path) -> None:
    p = tmp_path / "nophdr.core"
    shutil.copy(mini, p)
    patch(p, 56, struct.pack("<H", 0))
    assert "no program headers" in str(error_of(p))
    for i in (1, 2):
        set_phdr(mini, 64 + i * PHDR.size, p_type=0)
    e = error_of(mini)
    assert "no PT_LOAD segments" in str(e) and e.offset == 64


def test_program_header_table_past_eof(mini: Path, tmp_path: Path) -> None:
    p = tmp_path / "phoff.core"
    shutil.copy(mini, p)
    patch(p, 32, struct.pack("<Q", p.stat().st_size - 10))
    assert "program header table outside the file" in str(error_of(p))
    patch(mini, 56, struct.pack("<H", 0xFFF0))
    assert "program header table outside the file" in str(error_of(mini))


def test_segment_past_eof(mini: Path) -> None:
    at = 64 + 2 * PHDR.size
    size = mini.stat().st_size
    set_phdr(mini, at, p_offset=size - 100)
    e = error_of(mini)
    assert "segment 2 runs past the end of the file" in str(e) and e.offset == at


def test_filesz_larger_than_memsz(mini: Path) -> None:
    at = 64 + PHDR.size
    set_phdr(mini, at, p_memsz=PAGE)
    e = error_of(mini)
    assert "p_filesz larger than p_memsz" in str(e) and e.offset == at


def test_overlapping_segments(mini: Path) -> None:
    at = 64 + 2 * PHDR.size
    set_phdr(mini, at, p_vaddr=0x11000)
    e = error_of(mini)
    assert "overlaps segment 1 in the virtual address space" in str(e) and e.offset == at


def test_absurd_and_unaligned_segments(mini: Path, tmp_path: Path) -> None:
    at = 64 + 2 * PHDR.size
    p = tmp_path / "huge.core"
    shutil.copy(mini, p)
    set_phdr(p, at, p_memsz=1 << 50)
    assert "absurd size of PT_LOAD segment 2" in str(error_of(p))
    shutil.copy(mini, p)
    set_phdr(p, at, p_vaddr=(1 << 64) - PAGE)
    assert "wraps around" in str(error_of(p))
    set_phdr(mini, at, p_vaddr=0x20010)
    assert "not page-aligned" in str(error_of(mini))


def test_malformed_notes(mini: Path, tmp_path: Path) -> None:
    note_at = 64 + 3 * PHDR.size
    p = tmp_path / "desc.core"
    shutil.copy(mini, p)
    patch(p, note_at + 4, struct.pack("<I", 0x7FFFFFFF))           # n_descsz
    e = error_of(p)
    assert "note runs past the end of its PT_NOTE segment" in str(e) and e.offset == note_at
    shutil.copy(mini, p)
    patch(p, note_at, struct.pack("<I", 0xFFFFFFF0))                # n_namesz
    assert error_of(p).offset == note_at
    set_phdr(mini, 64, p_filesz=64 << 20 | 1)
    assert "PT_NOTE" in str(error_of(mini))


def test_truncated_real_core(gcore: ProcessCore, tmp_path: Path) -> None:
    with ElfImage.open(gcore.path) as image:
        # gcore puts the notes after the memory and section headers after them
        last = max([r.file_offset + r.file_bytes for r in image.regions]
                   + [n.desc_offset + n.size for n in image.notes])
        cuts = [10, 63, 64 + 56 * 3, image.regions[0].file_offset + 1, last // 2, last - 1]
    for cut in cuts:
        p = tmp_path / f"cut-{cut}"
        with open(gcore.path, "rb") as src, open(p, "wb") as dst:
            dst.write(src.read(cut))
        e = error_of(p)
        assert ("truncated" in str(e) or "past the end of the file" in str(e)
                or "outside the file" in str(e)), str(e)
        p.unlink()


def test_patched_real_kernel_core(kernel_core: ProcessCore, tmp_path: Path) -> None:
    p = tmp_path / "patched.core"
    shutil.copy(kernel_core.path, p)
    with ElfImage.open(p) as image:
        a, b = image.regions[0], image.regions[1]
    set_phdr(p, b.header_offset, p_vaddr=a.address)
    e = error_of(p)
    assert "overlaps" in str(e) and e.offset == b.header_offset
    set_phdr(p, b.header_offset, p_vaddr=b.address, p_offset=p.stat().st_size,
             p_filesz=PAGE, p_memsz=max(PAGE, b.memsz))
    assert "runs past the end of the file" in str(error_of(p))


# --------------------------------------------------------------------------- fuzzing

def fuzz_outcome(path: Path) -> str:
    try:
        with ElfImage.open(path) as image:
            for r in image.regions[:4]:
                r.read_pages(0, min(r.pages, 2))
            return "ok"
    except ElfImageError as e:
        assert_one_line(e, path)
        return "error"


def test_fuzz_mini_core(tmp_path: Path) -> None:
    rng = random.Random(1234)
    base = make_core(tmp_path / "base.core", [(0x10000, rnd(PAGE, 1), 2 * PAGE),
                                              (0x20000, rnd(PAGE + 5, 2), 3 * PAGE)],
                     notes=note(b"CORE", 1, bytes(40)) + note(b"CORE", 0x46494C45, bytes(64))
                     + note(b"LINUX", 0x202, bytes(16)))
    raw = base.read_bytes()
    header_end = 64 + 3 * PHDR.size + 200
    before = open_fds()
    outcomes: Dict[str, int] = {}
    p = tmp_path / "fuzz.core"
    for cut in range(0, len(raw), 7):
        p.write_bytes(raw[:cut])
        o = fuzz_outcome(p)
        outcomes[o] = outcomes.get(o, 0) + 1
    for _ in range(1500):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(header_end)
            data[i] = rng.randrange(256) if rng.random() < 0.7 else data[i] ^ (1 << rng.randrange(8))
        p.write_bytes(bytes(data))
        o = fuzz_outcome(p)
        outcomes[o] = outcomes.get(o, 0) + 1
    assert outcomes.get("error") and outcomes.get("ok")
    assert open_fds() == before


def test_fuzz_real_core_headers(kernel_core: ProcessCore, tmp_path: Path) -> None:
    """Byte flips in a real core's headers and notes, patched in place and restored."""
    p = tmp_path / "fuzz-real.core"
    shutil.copy(kernel_core.path, p)
    with ElfImage.open(p) as image:
        spans = [(0, 64 + image.segments * PHDR.size)]
        spans += [(n.offset, n.desc_offset + min(n.size, 64)) for n in image.notes]
    rng = random.Random(99)
    before = open_fds()
    with open(p, "r+b") as f:
        for _ in range(300):
            lo, hi = rng.choice(spans)
            i = rng.randrange(lo, hi)
            f.seek(i)
            old = f.read(1)
            f.seek(i)
            f.write(bytes([rng.randrange(256)]))
            f.flush()
            fuzz_outcome(p)
            f.seek(i)
            f.write(old)
            f.flush()
    assert open_fds() == before
    assert fuzz_outcome(p) == "ok"


# ------------------------------------------- lazy loading, the command line, convert
#
# Memory under a running load is read with ctypes.memmove only (no GIL held),
# and every wait has a timeout.

def _uffdpy(*args: object, timeout: float = 120.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "uffdpy", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def _ok(*args: object) -> str:
    proc = _uffdpy(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _memmove_read(address: int, size: int) -> bytes:
    import ctypes
    buf = ctypes.create_string_buffer(size)
    ctypes.memmove(buf, address, size)
    return buf.raw


@pytest.mark.kernel
@pytest.mark.qemu
@pytest.mark.parametrize("server", LAZY_SERVERS)
def test_lazy_load_of_qemu_dump_equals_pmemsave(pc_dump: QemuDump, server: str) -> None:
    from uffdpy.loader import LazyLoader
    from uffdpy.harness.workload import verify
    with ElfImage.open(pc_dump.path) as image, LazyLoader(image, server=server) as loader:
        # the known bytes, read while the load runs: served by faults or the prefetcher
        for r in pc_dump.regions:
            region = image.region_at(r.addr)
            got = _memmove_read(loader.address(region.name) + r.addr - region.address, r.size)
            assert got == r.data(), f"known bytes at {r.addr:#x}"
        assert loader.wait(60)
        assert loader.stats.double_placements == 0
        for start, end, _ in pc_dump.ram_ranges:
            region = image.region_at(start)
            want = pc_dump.pmem[start].read_bytes()
            mem = loader.memory(region.name)
            assert bytes(mem[start - region.address:end - region.address]) == want
        regions = [(loader.address(r.name), r) for r in image.regions]
        assert verify(regions) == (sum(r.pages for r in image.regions), 0)


@pytest.mark.kernel
@pytest.mark.qemu
def test_cli_inspect_and_dump_of_qemu_dump(pc_dump: QemuDump, tmp_path: Path) -> None:
    info = json.loads(_ok("inspect", pc_dump.path, "--json"))
    assert info["format"] == "elf-core" and info["address_space"] == "guest-physical"
    assert [(r["address"], r["address"] + r["length"]) for r in info["regions"]] == \
        [(s, e) for s, e, _ in pc_dump.ram_ranges]
    assert any(n["type_name"] == "NT_PRSTATUS" for n in info["notes"])
    text = _ok("inspect", pc_dump.path)
    assert "guest-physical" in text and info["regions"][0]["name"] in text
    big = max(info["regions"], key=lambda r: r["length"])
    out = tmp_path / "region.raw"
    for mode in ("lazy", "eager"):
        _ok("dump", pc_dump.path, big["name"], "-o", out, "--mode", mode)
        assert out.read_bytes() == pc_dump.pmem[big["address"]].read_bytes()
    report = json.loads(_ok("load", pc_dump.path, "--access", "random", "--touch", "300",
                            "--verify", "--json"))
    assert report["mismatched_pages"] == 0 and report["double_placements"] == 0


@pytest.mark.qemu
def test_convert_qemu_dump_loads_in_qemu(pc_dump: QemuDump, qemu_binary: str,
                                         tmp_path: Path) -> None:
    """``uffdpy convert`` output, loaded by a real QEMU -machine none, has the data in place."""
    from uffdpy.mappedram import Snapshot
    snap_path = tmp_path / "converted.img"
    out = _ok("convert", pc_dump.path, "-o", snap_path)
    end = max(e for _, e, _ in pc_dump.ram_ranges)
    mem = -(-end // (1 << 20))
    assert f"-machine none -m {mem}M" in out
    with Snapshot.open(snap_path) as snap:
        assert [b.name for b in snap.blocks] == ["ram"]
        block = snap.blocks[0]
        assert block.length == mem << 20
        for start, e, _ in pc_dump.ram_ranges:       # the reader sees the dump's bytes
            first, count = start // PAGE, (e - start) // PAGE
            assert block.read_pages(first, count) == pc_dump.pmem[start].read_bytes()
    cfg = vm.VmConfig(machine="none", mem=f"{mem}M", qemu=qemu_binary)
    with vm.QemuVM(cfg, incoming=True, timeout=120) as machine:
        machine.load(str(snap_path))
        for r in pc_dump.regions:
            got = tmp_path / f"qemu-{r.addr:#x}.pmem"
            machine.pmemsave(str(got), addr=r.addr, size=r.size)
            assert got.read_bytes() == r.data(), f"QEMU sees other bytes at {r.addr:#x}"
        for start, e, _ in pc_dump.ram_ranges:
            got = tmp_path / f"qemu-range-{start:#x}.pmem"
            machine.pmemsave(str(got), addr=start, size=e - start)
            assert got.read_bytes() == pc_dump.pmem[start].read_bytes()


@pytest.mark.kernel
@pytest.mark.parametrize("which", ["gcore", "kernel_core"])
@pytest.mark.parametrize("server", LAZY_SERVERS)
def test_lazy_load_of_process_core(which: str, server: str,
                                   request: pytest.FixtureRequest) -> None:
    """Faults only (no prefetcher): the known buffer arrives through the fault loop."""
    from uffdpy.loader import LazyLoader
    from uffdpy.harness.workload import verify
    core: ProcessCore = request.getfixturevalue(which)
    with ElfImage.open(core.path) as image:
        region = image.region_at(core.address)
        with LazyLoader(image, server=server, prefetch=False) as loader:
            base = loader.address(region.name) + core.address - region.address
            assert _memmove_read(base, len(core.data)) == core.data
            if server == "thread":
                assert loader.stats.faults >= 1 and loader.stats.pages_by_prefetch == 0
            regions = [(loader.address(r.name), r) for r in image.regions]
            assert verify(regions) == (sum(r.pages for r in image.regions), 0)
            assert loader.wait(30), "every page was touched by verify: load complete"


@pytest.mark.kernel
def test_cli_on_a_process_core(gcore: ProcessCore, tmp_path: Path) -> None:
    info = json.loads(_ok("inspect", gcore.path, "--json"))
    assert info["address_space"] == "virtual"
    region = next(r for r in info["regions"]
                  if r["address"] <= gcore.address < r["address"] + r["length"])
    out = tmp_path / "seg.raw"
    _ok("dump", gcore.path, region["name"], "-o", out)
    lo = gcore.address - region["address"]
    assert out.read_bytes()[lo:lo + len(gcore.data)] == gcore.data
    # a process core has virtual addresses: no single 'ram' block, one block per segment
    snap_path = tmp_path / "core.img"
    proc = _uffdpy("convert", gcore.path, "-o", snap_path)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert "--layout regions" in proc.stderr and str(gcore.path) in proc.stderr
    _ok("convert", gcore.path, "-o", snap_path, "--layout", "regions")
    snap_info = json.loads(_ok("inspect", snap_path, "--json"))
    assert [b["name"] for b in snap_info["regions"]] == [r["name"] for r in info["regions"]]
    out2 = tmp_path / "seg2.raw"
    _ok("dump", snap_path, region["name"], "-o", out2)
    assert out2.read_bytes() == out.read_bytes()


def test_inspect_shows_a_format_it_has_no_table_for(gcore: ProcessCore, monkeypatch: Any,
                                                    capsys: Any) -> None:
    """A format registered in pagesource.FORMATS alone is shown by ``inspect``
    through the PageSource view (here: ELF with its own table taken away)."""
    from uffdpy import cli
    monkeypatch.delitem(cli.inspect._INSPECTORS, "elf-core")
    assert cli.main(["inspect", str(gcore.path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    with ElfImage.open(gcore.path) as image:
        expected = [(r.name, r.length, r.present_pages, r.file_offset) for r in image.regions]
    assert info["format"] == "elf-core" and "notes" not in info
    assert [(r["name"], r["length"], r["present_pages"], r["file_offset"])
            for r in info["regions"]] == expected
    assert cli.main(["inspect", str(gcore.path)]) == 0
    text = capsys.readouterr().out
    assert "format: elf-core" in text
    assert all(name in text for name, *_ in expected)


@pytest.mark.kernel
def test_bench_on_a_process_core(gcore: ProcessCore) -> None:
    report = json.loads(_ok("bench", gcore.path, "--rounds", "1", "--touch", "50", "--json"))
    results = report["results"]
    assert "eager (QEMU-style pread, THP)" in results
    assert all(r["complete_s"] > 0 for r in results.values())
    assert not any(name.startswith("QEMU") for name in results)  # QEMU loads mapped-ram only


def test_bad_elf_fails_before_anything_is_registered(gcore: ProcessCore,
                                                     tmp_path: Path) -> None:
    """Truncated and corrupted real cores: the loaders refuse them with nothing mapped,
    registered or left open, and the command line says so in one line."""
    data = gcore.path.read_bytes()
    with ElfImage.open(gcore.path) as image:
        phdr_at = image.regions[1].header_offset
    bad = {"truncated-header": data[:40], "truncated-memory": data[:len(data) // 2]}
    past = bytearray(data)                       # a segment's p_offset far past the end
    struct.pack_into("<Q", past, phdr_at + 8, len(data) * 4)
    bad["segment-past-end"] = bytes(past)
    paths = write_files(tmp_path, bad, ".core")
    assert_loaders_refuse_without_leaks(paths, ElfImageError)
    for p in paths:
        proc = _uffdpy("load", p)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1 and str(p) in proc.stderr, proc.stderr


def test_too_many_notes_is_refused_quickly(tmp_path: Path) -> None:
    """349k empty notes took 14-40 s and 418 MB to open; now one error, in well under that."""
    from uffdpy.elfcore import MAX_NOTES
    many = note(b"CORE", 1, b"") * (MAX_NOTES + 10)
    path = make_core(tmp_path / "notes.core", [(0x400000, rnd(PAGE, 1), PAGE)], notes=many)
    t0 = time.monotonic()
    with pytest.raises(ElfImageError, match="too many notes.*UFFDPY_MAX_NOTES"):
        ElfImage.open(path)
    assert time.monotonic() - t0 < 60
    ok = make_core(tmp_path / "ok.core", [(0x400000, rnd(PAGE, 1), PAGE)],
                   notes=note(b"CORE", 1, b"") * 1000)
    with ElfImage.open(ok) as img:
        assert len(img.notes) == 1000
