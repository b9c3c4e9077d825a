"""``uffdpy resume --map``: guest RAM mapped copy-on-write from the snapshot, on a real QEMU 10.

Snapshots are QEMU's own (the request-serving Linux guest, firmware-only pc
with VGA and q35, a two-node NUMA q35).  Each destination is killed by pid at
the end; every wait has a timeout.  The snapshot's sha256 is checked wherever
a destination could have written into it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import pytest

from uffdpy.harness import linuxguest
from uffdpy.mappedram import Snapshot
from uffdpy.qmp import QmpClient
from uffdpy.resume.mapped import (MapResume, backend_object, map_arguments, map_qemu_command,
                                  stale_pages)

from conftest import LINUX_GUEST_SEED  # noqa: E402
from helpers import one_line_error, run_uffdpy  # noqa: E402
from test_resume import assert_ram_equals, guest_args

pytestmark = pytest.mark.timeout(300)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def mapped_args(snapshot: str) -> List[str]:
    """``uffdpy qemu-args SNAP --map``, as a user's shell would split it."""
    proc = run_uffdpy("qemu-args", snapshot, "--map")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1
    return shlex.split(proc.stdout)


def map_dirs() -> List[str]:
    tmp = tempfile.gettempdir()
    return [p for p in os.listdir(tmp) if p.startswith("uffdpy-migration-")]


def kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------ pure: arguments

def test_map_qemu_command_rewrites_user_backends(tmp_path: Path) -> None:
    """A NUMA guest's memory-backend-ram objects become file-backed; other words stay."""
    from uffdpy.harness.synthetic import make_synthetic
    snap_path = tmp_path / "s,1.img"                 # a comma in the path: doubled for QEMU
    make_synthetic(snap_path, size=1 << 20, fill=0.5, seed=1)
    with Snapshot.open(snap_path) as snap:
        block = snap.blocks[0]
        assert block.name == "ram"
        out = map_qemu_command(["qemu", "-machine", "none", "-m", "1M"], snap)
        assert out[0] == "qemu" and out[-4:] == ["-machine", "none", "-m", "1M"]
        assert out[1:5] == ["-object", backend_object(snap, block), "-machine",
                            "memory-backend=ram"]
        assert f"mem-path={str(snap_path).replace(',', ',,')}," in out[2]
        assert f"offset={block.pages_offset}," in out[2]
        user = ["qemu", "-object", "memory-backend-ram,id=ram,size=1M,policy=bind,host-nodes=0",
                "-machine", "none,memory-backend=ram", "-object", "memory-backend-ram,id=x,size=1M"]
        out = map_qemu_command(user, snap)
        assert out[2].startswith("memory-backend-file,id=ram,") and "share=off" in out[2]
        assert out[2].endswith(",policy=bind,host-nodes=0")
        assert out[3:] == user[3:]                   # no second -machine memory-backend
        assert map_arguments(snap) == ["-object", backend_object(snap, block),
                                       "-machine", "memory-backend=ram"]


# ------------------------------------------------------------------ the Linux guest

@pytest.mark.qemu
def test_cli_map_guest_answers(guest: Dict[str, Any], qemu_binary: str, short_tmp: str) -> None:
    """The ``--`` form: the guest runs, answers right, and only the firmware's pages were sent."""
    args, req = guest_args(guest, short_tmp)
    before = sha256(guest["snapshot"])
    dirs_before = set(map_dirs())
    proc = run_uffdpy("resume", guest["snapshot"], "--map", "--json", "--", qemu_binary, *args)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    try:
        assert stats["blocks_mapped"] == ["pc.ram"] and stats["mode"] == "map"
        assert stats["time_to_running_s"] is not None and stats["time_to_complete_s"] is not None
        assert 0 < stats["pages_sent"] < 200               # ROMs and tables, not pc.ram
        assert stats["bytes_sent"] < 2 << 20
        assert stats["stale_zero_pages"] == 0                # a stopped-VM save has none
        assert linuxguest.ask(req, 0, 4, timeout=30) == linuxguest.expected_answer(
            LINUX_GUEST_SEED, 0, 4)
        with QmpClient(stats["qmp_socket"], timeout=30) as qmp:
            assert qmp.call("query-status")["status"] == "running"
            assert qmp.call("query-migrate")["status"] == "completed"
    finally:
        kill(stats["qemu_pid"])
    assert not set(map_dirs()) - dirs_before               # the private directory is gone
    assert sha256(guest["snapshot"]) == before


@pytest.mark.qemu
def test_qmp_form_with_qemu_args(guest: Dict[str, Any], destination: Any, short_tmp: str) -> None:
    """``qemu ... $(uffdpy qemu-args SNAP --map) -incoming defer``, then ``resume --map --qmp``."""
    args, req = guest_args(guest, short_tmp)
    dst = destination(args + mapped_args(guest["snapshot"]))
    proc = run_uffdpy("resume", guest["snapshot"], "--map", "--qmp", dst.uffdpy_sock, "--json")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["blocks_mapped"] == ["pc.ram"]
    assert dst.qmp.call("query-status")["status"] == "running"
    for first in (0, 20, 60):
        assert linuxguest.ask(req, first, 4, timeout=30) == linuxguest.expected_answer(
            LINUX_GUEST_SEED, first, 4)


@pytest.mark.qemu
def test_four_clones_share_the_file_and_keep_their_writes(guest: Dict[str, Any],
                                                          destination: Any,
                                                          short_tmp: str) -> None:
    """Four clones at once all answer; a write in one is not seen by another; file unchanged."""
    before = sha256(guest["snapshot"])
    clones = []
    for i in range(4):
        sub = os.path.join(short_tmp, f"c{i}")
        os.mkdir(sub)
        args, req = guest_args(guest, sub)
        clones.append((destination(args + mapped_args(guest["snapshot"])), req))
    for dst, _ in clones:
        with MapResume(guest["snapshot"], qmp=dst.uffdpy_sock) as r:
            assert r.stats.time_to_running_s is not None
    want = linuxguest.expected_answer(LINUX_GUEST_SEED, 0, 2)
    for dst, req in clones:
        assert linuxguest.ask(req, 0, 2, timeout=60) == want
    # clone 0 overwrites MiB 0-1 of its tmpfs file: guest RAM that maps the snapshot
    assert linuxguest.ask(clones[0][1], 0, 2, timeout=60, verb="ZAP") == "ZAPPED 0 2"
    assert linuxguest.ask(clones[0][1], 0, 2, timeout=60) == linuxguest.zeroed_answer(0, 2)
    for _, req in clones[1:]:
        assert linuxguest.ask(req, 0, 2, timeout=60) == want
    for dst, _ in clones:
        dst.close()
    assert sha256(guest["snapshot"]) == before


@pytest.mark.qemu
def test_clones_survive_the_snapshot_replaced_by_uffdpy(guest: Dict[str, Any], destination: Any,
                                                        short_tmp: str, tmp_path: Path) -> None:
    """uffdpy's writers rename a new file over the path: running clones keep the old inode."""
    from uffdpy.mappedram import rewrite_snapshot
    copy = str(tmp_path / "guest.img")
    shutil.copyfile(guest["snapshot"], copy)
    args, req = guest_args(guest, short_tmp)
    dst = destination(args + mapped_args(copy))
    MapResume(copy, qmp=dst.uffdpy_sock).close()
    assert linuxguest.ask(req, 0, 1, timeout=60) == linuxguest.expected_answer(
        LINUX_GUEST_SEED, 0, 1)
    proc = run_uffdpy("make", copy, "--size", "1M")           # a different snapshot, same path
    assert proc.returncode == 0, proc.stderr
    with Snapshot.open(guest["snapshot"]) as snap:            # and rewritten by the library
        rewrite_snapshot(snap, copy + ".new", {})
    os.replace(copy + ".new", copy)
    for first in (8, 30, 50):                                 # pages the guest had not read
        assert linuxguest.ask(req, first, 4, timeout=60) == linuxguest.expected_answer(
            LINUX_GUEST_SEED, first, 4)
    assert dst.qemu.alive()


# ------------------------------------------------------------------ byte-exact machines

@pytest.mark.qemu
@pytest.mark.parametrize("machine, transport", [("pc", "unix"), ("q35", "tcp"), ("q35", "fd")],
                         ids=["pc-vga-unix", "q35-tcp", "q35-fd"])
def test_firmware_machines_mapped_byte_exact(firmware: Dict[str, Any], destination: Any,
                                             tmp_path: Path, machine: str,
                                             transport: str) -> None:
    snapshot, args = firmware[machine]
    dst = destination(args + mapped_args(snapshot), paused=True)
    with MapResume(snapshot, qmp=dst.uffdpy_sock, paused=True, transport=transport) as r:
        stats = r.wait()
    assert stats.time_to_running_s is None and stats.blocks_mapped == ["pc.ram"]
    assert dst.qmp.call("query-status")["status"] == "paused"
    assert dst.status() == "completed"
    assert_ram_equals(snapshot, dst.resave(tmp_path / "again.img"))


@pytest.fixture(scope="module")
def numa(qemu_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A two-node q35 (memory-backend-ram m0, m1) that QEMU saved, with known bytes in each node."""
    from uffdpy.harness.vm import VmConfig, random_region, save_snapshot
    d = tmp_path_factory.mktemp("numa")
    user = ["-object", "memory-backend-ram,id=m0,size=64M",
            "-object", "memory-backend-ram,id=m1,size=64M",
            "-numa", "node,nodeid=0,memdev=m0", "-numa", "node,nodeid=1,memdev=m1"]
    cfg = VmConfig(machine="q35", mem="128M", args=user, qemu=qemu_binary)
    regions = [random_region(str(d), addr=0x200000, size=0x40000, seed=5),
               random_region(str(d), addr=0x5000000, size=0x40000, seed=6)]
    path = d / "numa.img"
    save_snapshot(cfg, str(path), regions=regions, run_seconds=0.3, timeout=60)
    return str(path), cfg.argv()[1:] + [w for r in regions for w in r.args()]


@pytest.mark.qemu
def test_numa_guest_mapped_byte_exact(numa: Any, destination: Any, qemu_binary: str,
                                      tmp_path: Path) -> None:
    """The ``--`` form's rewrite: the user's memory-backend-ram m0, m1 map the file instead."""
    snapshot, args = numa
    with Snapshot.open(snapshot) as snap:
        assert {b.name for b in snap.blocks} >= {"m0", "m1"}
        argv = map_qemu_command([qemu_binary, *args], snap)
    assert sum("memory-backend-file" in w for w in argv) == 2
    dst = destination(argv[1:], paused=True)
    with MapResume(snapshot, qmp=dst.uffdpy_sock, paused=True) as r:
        assert sorted(r.stats.blocks_mapped) == ["m0", "m1"]
    assert_ram_equals(snapshot, dst.resave(tmp_path / "again.img"))


# ------------------------------------------------------------------ stale pages

@pytest.mark.qemu
def test_stale_page_reads_as_zero(firmware: Dict[str, Any], destination: Any,
                                  tmp_path: Path) -> None:
    """A data page's bit cleared in a copy (as a live save leaves it): the guest sees zeros."""
    snapshot, args = firmware["q35"]
    copy = str(tmp_path / "stale.img")
    shutil.copyfile(snapshot, copy)
    page = 0x200000 // 4096 + 3                    # inside the known random bytes
    with Snapshot.open(copy) as snap:
        block = snap.block("pc.ram")
        assert block.is_present(page) and block.is_present(page + 1)
        want_next = block.read_pages(page + 1, 1)
        at = block.bitmap_offset + page // 8
    with open(copy, "r+b") as f:                   # clear the bit; the bytes stay in the file
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte & ~(1 << (page % 8))]))
    with Snapshot.open(copy) as snap:
        assert stale_pages(snap, snap.block("pc.ram")) == [page]
    before = sha256(copy)
    dst = destination(args + mapped_args(copy), paused=True)
    with MapResume(copy, qmp=dst.uffdpy_sock, paused=True) as r:
        assert r.stats.stale_zero_pages == 1
    out = tmp_path / "pages.bin"
    dst.qmp.call("pmemsave", val=page * 4096, size=2 * 4096, filename=str(out))
    data = out.read_bytes()
    assert data[:4096] == bytes(4096)
    assert data[4096:] == want_next
    assert sha256(copy) == before


# ------------------------------------------------------------------ refusals

def _backend(snapshot: str, **change: str) -> List[str]:
    """The mapping arguments with some properties changed."""
    words = mapped_args(snapshot)
    opts = words[1].split(",")
    for key, value in change.items():
        key = key.replace("_", "-")
        opts = [f"{key}={value}" if o.startswith(key + "=") else o for o in opts]
    return [words[0], ",".join(opts), *words[2:]]


@pytest.mark.qemu
@pytest.mark.parametrize("case", ["not-mapped", "other-file", "offset", "shared", "writable"])
def test_wrong_destination_refused_before_anything_is_sent(firmware: Dict[str, Any],
                                                           destination: Any, tmp_path: Path,
                                                           case: str) -> None:
    """Each case resumes a copy of the snapshot (a shared or writable mapping of it is risky)."""
    original, args = firmware["q35"]
    snapshot = str(tmp_path / "copy.img")
    shutil.copyfile(original, snapshot)
    with Snapshot.open(snapshot) as snap:
        offset = snap.block("pc.ram").pages_offset
    extra = {"not-mapped": [],
             "other-file": _backend(snapshot, mem_path=original),
             "offset": _backend(snapshot, offset=str(offset + (1 << 20)), size=str(64 << 20)),
             "shared": _backend(snapshot, share="on", readonly="off"),
             "writable": _backend(snapshot, readonly="off")}[case]
    before = sha256(snapshot), sha256(original)
    dst = destination(args + extra, paused=True)
    line = one_line_error(run_uffdpy("resume", snapshot, "--map", "--qmp", dst.uffdpy_sock))
    want = {"not-mapped": "memory-backend-ram", "other-file": "another file",
            "offset": "offset", "shared": "share=on", "writable": "readonly=off"}[case]
    assert want in line, line
    assert "memory-backend-file,id=pc.ram" in line            # the arguments to use
    assert dst.status() == "none"                             # nothing set up or sent
    assert (sha256(snapshot), sha256(original)) == before


def test_map_argument_errors(tmp_path: Path) -> None:
    from uffdpy.harness.synthetic import make_synthetic
    snap = tmp_path / "s.img"
    make_synthetic(snap, size=1 << 20, fill=0.5, seed=1)
    assert "--map needs --qmp" in one_line_error(
        run_uffdpy("resume", snap, "--map", "--connect", "unix:/nonexistent"))
    assert "--preempt applies to the postcopy stream" in one_line_error(
        run_uffdpy("resume", snap, "--map", "--preempt", "--qmp", "/nonexistent"))
    assert "--no-preempt applies to the postcopy stream" in one_line_error(
        run_uffdpy("resume", snap, "--map", "--no-preempt", "--qmp", "/nonexistent"))
    assert "--warm applies to --map only" in one_line_error(
        run_uffdpy("resume", snap, "--warm", "all", "--qmp", "/nonexistent"))
    assert "--warm ws needs --working-set" in one_line_error(
        run_uffdpy("resume", snap, "--map", "--warm", "ws", "--qmp", "/nonexistent"))
    bad = tmp_path / "bad.img"
    bad.write_bytes(b"QEVM" + bytes(100))
    assert str(bad) in one_line_error(run_uffdpy("qemu-args", bad, "--map"))
    assert str(bad) in one_line_error(run_uffdpy("resume", bad, "--map", "--", "qemu"))


# ------------------------------------------------------------------ postcopy never punches holes

@pytest.mark.qemu
def test_postcopy_refuses_a_private_file_backed_destination(firmware: Dict[str, Any],
                                                            destination: Any) -> None:
    """A snapshot copy on tmpfs, mapped private and writable: postcopy would punch holes in it."""
    snapshot, args = firmware["q35"]
    shm = f"/dev/shm/uffdpy-test-{os.getpid()}.img"
    shutil.copyfile(snapshot, shm)
    try:
        before = sha256(shm)
        dst = destination(args + _backend(shm, readonly="off"), paused=True)
        line = one_line_error(run_uffdpy("resume", snapshot, "--qmp", dst.uffdpy_sock))
        assert "private (share=off) mapping" in line and "--map" in line, line
        assert dst.status() == "none"
        assert sha256(shm) == before
    finally:
        os.unlink(shm)


@pytest.mark.qemu
def test_postcopy_into_a_shared_tmpfs_backend_still_works(firmware: Dict[str, Any],
                                                          destination: Any,
                                                          tmp_path: Path) -> None:
    """share=on tmpfs RAM is what postcopy supports: not refused, byte-exact."""
    from uffdpy.resume import Resume
    snapshot, args = firmware["q35"]
    shm = f"/dev/shm/uffdpy-test-shared-{os.getpid()}.ram"
    try:
        backend = ["-object", f"memory-backend-file,id=pc.ram,size=64M,mem-path={shm},share=on",
                   "-machine", "memory-backend=pc.ram"]
        dst = destination(args + backend, paused=True)
        with Resume(snapshot, qmp=dst.uffdpy_sock) as r:
            r.wait(60)
        assert dst.status() == "completed"
        assert_ram_equals(snapshot, dst.resave(tmp_path / "again.img"))
    finally:
        if os.path.exists(shm):
            os.unlink(shm)


# ------------------------------------------------------------------ warming a cold page cache

def resident_pages(path: str, offset: int, length: int) -> int:
    """How many of the file's pages in ``[offset, offset+length)`` are in the page cache (mincore)."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)
    try:
        vec = ctypes.create_string_buffer(length // 4096)
        assert libc.mincore(addr, length, vec) == 0, os.strerror(ctypes.get_errno())
        return sum(b & 1 for b in vec.raw[:length // 4096])
    finally:
        libc.munmap(addr, length)


@pytest.mark.qemu
@pytest.mark.parametrize("warm", ["ws", "all"])
def test_warm_up_reads_the_working_set_into_a_cold_page_cache(firmware: Dict[str, Any],
                                                              destination: Any, tmp_path: Path,
                                                              warm: str) -> None:
    from uffdpy.harness.bench_resume import evict
    from uffdpy.workingset import WorkingSet, snapshot_identity
    original, args = firmware["q35"]
    snapshot = str(tmp_path / "cold.img")              # a file of its own: evictable
    shutil.copyfile(original, snapshot)
    with Snapshot.open(snapshot) as snap:
        block = snap.block("pc.ram")
        data = [i for f, n, present in block.runs() if present for i in range(f, f + n)]
        chosen = data[100:140] + data[10:20]            # two runs, recorded out of file order
        ws = WorkingSet(snapshot=snapshot_identity(snap),
                        pages=[("pc.ram", p, 0.001 * k, True) for k, p in enumerate(chosen)]
                        + [("pc.ram", 0x3f00, 0.5, False)])         # a zero page: not read
        offset, length = block.pages_offset, block.length
    ws_path = str(tmp_path / "rec.ws")
    ws.save(ws_path)
    evict(snapshot)
    assert resident_pages(snapshot, offset, length) < len(chosen)
    dst = destination(args + mapped_args(snapshot), paused=True)
    with MapResume(snapshot, qmp=dst.uffdpy_sock, paused=True, working_set=ws_path,
                   warm=warm) as r:
        assert r.wait_warm(60)
        stats = r.wait()
    want = len(chosen) + (length // 4096 if warm == "all" else 0)
    assert stats.warm_pages == want and stats.warm_error is None
    resident = resident_pages(snapshot, offset, length)
    assert resident >= (length // 4096 if warm == "all" else len(chosen)) * 0.9, resident


@pytest.mark.qemu
def test_cli_bench_clones_one_round(qemu_binary: str, tmp_path: Path) -> None:
    """``bench --resume --clones 2``: both kinds of guest started, their Pss summed."""
    from uffdpy.harness.synthetic import make_synthetic
    snap = tmp_path / "s.img"
    make_synthetic(snap, size=16 << 20, fill=0.5, seed=4)
    proc = run_uffdpy("bench", snap, "--resume", "--clones", "2", "--rounds", "1", "--request",
                      "", "--json", "--qemu-args", "-machine none -m 16M -nodefaults -display none")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["rows"]
    assert set(rows) == {"map", "qemu"}
    # QEMU's own load copies the 8 MiB of data into each guest; a mapped guest holds none
    assert rows["qemu"]["anon"] - rows["map"]["anon"] > 2 * (6 << 20), rows
    assert all(r["pss"] > 0 and r["all_answered"] > 0 for r in rows.values())
