"""A real Linux guest, snapshotted by QEMU with mapped-ram, read back by uffdpy.

uffdpy.harness.linuxguest (scripts/linux_guest.py) boots a Debian kernel + busybox initramfs under TCG,
fills a tmpfs file with a seeded pattern, and saves the stopped guest with
``migrate file:...`` and the mapped-ram capability, plus a ``pmemsave`` dump
of guest RAM.  These tests check that ``uffdpy.mappedram`` returns, page for
page, what the guest held, and that the pattern the guest wrote is there.

The kernel and busybox come from Debian packages (``apt-get download``,
cached in ``$UFFDPY_LINUX_GUEST_CACHE`` or ``~/.cache/uffdpy/linux-guest``).
"""
from __future__ import annotations

import mmap
import os
import platform
import subprocess

import pytest

from uffdpy.harness import linuxguest

pytestmark = pytest.mark.qemu

from conftest import LINUX_GUEST_FILL_MIB as FILL_MIB  # noqa: E402  (the shared guest)
from conftest import LINUX_GUEST_MEM_MIB as MEM_MIB  # noqa: E402
from conftest import LINUX_GUEST_SEED as SEED  # noqa: E402
PAGE = 4096
# pc.ram is guest-physical 0 .. MEM; the legacy VGA/ROM window between
# 640 KiB and 1 MiB is not ordinary RAM in a pmemsave dump.
ORDINARY_RAM = ((0, 0xA0000), (0x100000, MEM_MIB << 20))


@pytest.fixture(scope="session")
def pmem(guest):
    with open(guest["pmemsave"], "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    yield m
    m.close()


@pytest.fixture(scope="session")
def pattern():
    """Map each 4 KiB page of the fill pattern to its index."""
    return {p: i for i, p in enumerate(linuxguest.fill_pattern_pages(SEED, FILL_MIB))}


@pytest.fixture(scope="session")
def pc_ram(guest):
    mappedram = pytest.importorskip("uffdpy.mappedram")
    snap = mappedram.Snapshot.open(guest["snapshot"])
    block = snap.block("pc.ram")
    yield block
    close = getattr(snap, "close", None)
    if close is not None:
        close()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or os.name != "posix",
                    reason="runs the guest's x86-64 Linux fill program on the host")
def test_fill_program_matches_python_pattern(tmp_path):
    """The hand-assembled /bin/uffdpy-fill writes exactly fill_pattern_pages()."""
    exe = tmp_path / "uffdpy-fill"
    exe.write_bytes(linuxguest.fill_program(seed=7, fill_mib=1))
    exe.chmod(0o755)
    out = subprocess.run([str(exe)], stdout=subprocess.PIPE, timeout=30, check=True).stdout
    assert out == b"".join(linuxguest.fill_pattern_pages(seed=7, fill_mib=1))
    assert len(set(linuxguest.fill_pattern_pages(seed=7, fill_mib=1))) == 256


def test_guest_booted_and_saved(guest):
    assert linuxguest.READY_MARKER in guest["guest_ready_line"]
    assert f"bytes={FILL_MIB << 20}" in guest["guest_ready_line"]
    assert guest["pmemsave_bytes"] == MEM_MIB << 20
    # mapped-ram gives each RAM block a fixed region at least its size.
    assert guest["snapshot_bytes"] >= MEM_MIB << 20


def test_pattern_in_pmemsave(guest, pmem, pattern):
    """The guest really held the pattern (checks the guest side, independent of uffdpy)."""
    found = set()
    for off in range(0, len(pmem), PAGE):
        i = pattern.get(pmem[off:off + PAGE])
        if i is not None:
            found.add(i)
    assert len(found) >= 0.95 * len(pattern), (len(found), len(pattern))


def test_snapshot_has_pc_ram(guest, pc_ram):
    assert pc_ram.name == "pc.ram"
    assert pc_ram.length == MEM_MIB << 20
    assert pc_ram.page_size == PAGE
    assert pc_ram.pages == (MEM_MIB << 20) // PAGE


def test_pc_ram_equals_pmemsave(guest, pc_ram, pmem):
    """Every page of ordinary guest RAM reads back as the guest had it."""
    mismatches = []
    present = 0
    for start, end in ORDINARY_RAM:
        for i in range(start // PAGE, end // PAGE):
            gpa = i * PAGE
            page = pc_ram.read_page(i)
            present += bool(pc_ram.is_present(i))
            if page != pmem[gpa:gpa + PAGE]:
                mismatches.append(hex(gpa))
    assert not mismatches, f"{len(mismatches)} pages differ, first at {mismatches[:10]}"
    # The guest's fill alone makes FILL_MIB of non-zero pages present.
    assert present >= (FILL_MIB << 20) // PAGE


def test_pattern_pages_in_snapshot(guest, pc_ram, pattern):
    """Most of the pattern's pages occur, intact, as pages of pc.ram in the snapshot."""
    found = set()
    for i in range(pc_ram.pages):
        if not pc_ram.is_present(i):
            continue
        j = pattern.get(pc_ram.read_page(i))
        if j is not None:
            found.add(j)
    assert len(found) >= 0.95 * len(pattern), (len(found), len(pattern))
