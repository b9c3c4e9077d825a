"""LazyLoader and EagerLoader against the real kernel, on real QEMU and synthetic snapshots.

Every access to registered memory while a load runs is made without the GIL
(``ctypes.memmove`` in a thread) or from another process, and every wait has
a timeout: a thread that faults while holding the GIL would deadlock the
in-process fault loop, and with it the test run.
"""
from __future__ import annotations

import ctypes
import errno
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import List, Tuple

import pytest

from uffdpy.loader import (EagerLoader, LazyLoader, LoaderError, ServerDiedError,
                           prepare_interpreter_servers, release_interpreter_servers,
                           release_thread_pool)
from uffdpy.mappedram import MappedRamError, Snapshot
from uffdpy.harness.synthetic import make_synthetic
from uffdpy.memory import HUGE_PAGE_SIZE, PAGE_SIZE
from uffdpy import ioctl

from helpers import (HAVE_INTERPRETERS, LAZY_SERVERS,  # noqa: E402
                     assert_loaders_refuse_without_leaks, eventually, resources, uffd_fds,
                     write_files)  # noqa: E402  (tests/ is on sys.path)

pytestmark = [pytest.mark.timeout(300), pytest.mark.kernel]

ROOT = Path(__file__).resolve().parent.parent
SERVERS = LAZY_SERVERS
#: the servers that let plain Python (holding the GIL) read memory while it loads
GIL_FREE_SERVERS = ["process"] + (["interpreter"] if HAVE_INTERPRETERS else [])
needs_interpreters = pytest.mark.skipif(
    not HAVE_INTERPRETERS, reason="server='interpreter' needs Python 3.13+ (own-GIL "
    "subinterpreters that can import ctypes); .ci/run runs these tests with a 3.13 venv")


# ----------------------------------------------------------------------- helpers

def memory_equals_snapshot(loader, snap: Snapshot) -> None:
    """Every page of every block equals ``read_page`` (the reader's independent path)."""
    for block in snap.blocks:
        mem = loader.memory(block.name)          # load complete: plain memory now
        step = 256
        for first in range(0, block.pages, step):
            n = min(step, block.pages - first)
            want = block.read_pages(first, n)
            got = bytes(mem[first * block.page_size:(first + n) * block.page_size])
            if got != want:
                for k in range(n):
                    a, b = k * block.page_size, (k + 1) * block.page_size
                    assert got[a:b] == want[a:b], f"{block.name} page {first + k} differs"


def touch(address: int, length: int = 8) -> bytes:
    """Read guest memory without the GIL."""
    buf = ctypes.create_string_buffer(length)
    ctypes.memmove(buf, address, length)
    return buf.raw


def touch_in_thread(address: int, length: int = 8) -> Tuple[threading.Thread, List[bytes]]:
    out: List[bytes] = []
    t = threading.Thread(target=lambda: out.append(touch(address, length)), daemon=True)
    t.start()
    return t, out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("lazy") / "syn64.img")
    make_synthetic(path, size=64 << 20, fill=0.4, seed=3)
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("lazy") / "syn4.img")
    make_synthetic(path, size=4 << 20, fill=0.5, seed=4)
    return path


@pytest.fixture(scope="module")
def qemu_pc(qemu_binary, tmp_path_factory) -> str:
    """A real QEMU snapshot with several RAMBlocks (pc.ram, vga.vram, ROMs) and known data."""
    from uffdpy.harness.vm import VmConfig, random_region, save_snapshot
    d = tmp_path_factory.mktemp("qemu-pc")
    cfg = VmConfig(machine="pc", mem="64M", args=("-device", "VGA"), qemu=qemu_binary)
    regions = [random_region(str(d), addr=0x200000, size=0x40000, seed=11),
               random_region(str(d), addr=0x3000000, size=0x123000, seed=12)]
    path = str(d / "pc.img")
    save_snapshot(cfg, path, regions=regions)
    return path


@pytest.fixture(scope="module")
def big_synthetic(tmp_path_factory) -> str:
    """A multi-GiB snapshot from the writer (sparse on disk: 5% of pages hold data)."""
    path = str(tmp_path_factory.mktemp("big") / "syn3g.img")
    make_synthetic(path, size=3 << 30, fill=0.05, seed=9)
    return path


# ------------------------------------------------------------------------- tests

@pytest.mark.qemu
@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("huge", [False, True], ids=["4k", "hugetlb"])
def test_lazy_load_of_real_qemu_snapshot_equals_reader(qemu_pc, server, huge, hugetlb_pool):
    with Snapshot.open(qemu_pc) as snap:
        assert len(snap.blocks) >= 3
        units = [-(-b.length // HUGE_PAGE_SIZE) if huge else b.pages for b in snap.blocks]
        if huge:
            hugetlb_pool(sum(units))
        with LazyLoader(snap, server=server, huge_pages=huge) as loader:
            assert loader.wait(60)
            st = loader.stats
            assert st.placed_pages == st.total_pages == sum(units)
            assert st.double_placements == 0
            assert st.pages_by_prefetch + st.pages_by_fault == st.total_pages
            memory_equals_snapshot(loader, snap)


@pytest.mark.qemu
@pytest.mark.parametrize("server", SERVERS)
def test_faults_in_every_block_of_a_real_snapshot(qemu_pc, server):
    """Without prefetch every page comes by fault: one touch in each block, in both orders."""
    with Snapshot.open(qemu_pc) as snap:
        with LazyLoader(snap, server=server, prefetch=False) as loader:
            for block in list(snap.blocks) + list(reversed(snap.blocks)):
                i = block.pages // 2
                t, out = touch_in_thread(loader.address(block.name) + i * block.page_size,
                                         block.page_size)
                t.join(10)
                assert out == [block.read_page(i)], f"block {block.name} not served"


@pytest.mark.qemu
def test_lazy_load_data_matches_what_qemu_was_given(qemu_pc):
    """The known random data put into the guest is in pc.ram at its address."""
    import random as _random
    with LazyLoader(qemu_pc, server="thread") as loader:
        assert loader.wait(60)
        mem = loader.memory("pc.ram")
        for addr, size, seed in ((0x200000, 0x40000, 11), (0x3000000, 0x123000, 12)):
            assert bytes(mem[addr:addr + size]) == _random.Random(seed).randbytes(size)


@pytest.mark.parametrize("server", SERVERS)
def test_lazy_load_of_multi_gib_snapshot(big_synthetic, server):
    with Snapshot.open(big_synthetic) as snap:
        with LazyLoader(snap, server=server, prefetch_chunk_bytes=8 << 20) as loader:
            assert loader.stats.time_to_ready_s < 1.0
            assert loader.wait(240)
            assert loader.stats.double_placements == 0
            block = snap.blocks[0]
            mem = loader.memory("ram")
            # every present run checked, and a sample of zero pages
            for first, count, present in block.runs():
                a, b = first * PAGE_SIZE, (first + count) * PAGE_SIZE
                if present:
                    assert bytes(mem[a:b]) == block.read_pages(first, count)
                else:
                    assert bytes(mem[a:a + PAGE_SIZE]) == bytes(PAGE_SIZE)
                    assert bytes(mem[b - PAGE_SIZE:b]) == bytes(PAGE_SIZE)


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("huge", [False, True], ids=["4k", "hugetlb"])
def test_four_touchers_and_prefetcher(synthetic, server, huge, hugetlb_pool):
    with Snapshot.open(synthetic) as snap:
        block = snap.blocks[0]
        if huge:
            hugetlb_pool(block.length // HUGE_PAGE_SIZE)
        chunk = (4 << 20) if huge else (256 << 10)
        with LazyLoader(snap, server=server, prefetch_chunk_bytes=chunk,
                        huge_pages=huge) as loader:
            base = loader.address("ram")
            errors: List[str] = []

            def toucher(seed: int) -> None:
                rng = random.Random(seed)
                buf = ctypes.create_string_buffer(PAGE_SIZE)
                for _ in range(400):
                    i = rng.randrange(block.pages)
                    ctypes.memmove(buf, base + i * PAGE_SIZE, PAGE_SIZE)
                    if buf.raw != block.read_page(i):
                        errors.append(f"page {i}")

            threads = [threading.Thread(target=toucher, args=(s,), daemon=True) for s in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads), "a toucher was never served"
            assert not errors
            assert loader.wait(60)
            st = loader.stats
            assert st.double_placements == 0
            assert st.pages_by_fault + st.pages_by_prefetch == st.total_pages
            memory_equals_snapshot(loader, snap)


@pytest.mark.parametrize("server", SERVERS)
def test_fault_around(small, server):
    with Snapshot.open(small) as snap:
        with LazyLoader(snap, server=server, prefetch=False, fault_around_pages=15) as loader:
            base = loader.address("ram")
            block = snap.blocks[0]
            # a present page near the start: its neighbours come in the same ioctl
            i = next(f for f, c, p in block.runs() if p and c >= 16)
            assert touch(base + i * PAGE_SIZE, PAGE_SIZE) == block.read_page(i)
            assert eventually(lambda: loader.progress()[0] == 16)
            if server == "thread":
                assert loader.stats.pages_by_fault == 16 and loader.stats.faults == 1


def test_prefetch_off_places_only_touched_pages(small):
    with Snapshot.open(small) as snap:
        block = snap.blocks[0]
        with LazyLoader(snap, server="thread", prefetch=False) as loader:
            base = loader.address("ram")
            touched = sorted(random.Random(1).sample(range(block.pages), 50))
            for i in touched:
                t, out = touch_in_thread(base + i * PAGE_SIZE, PAGE_SIZE)
                t.join(10)
                assert out == [block.read_page(i)]
            assert eventually(lambda: loader.stats.placed_pages == 50)
            st = loader.stats
            assert st.placed_pages == 50 and st.pages_by_fault == 50
            assert st.pages_by_prefetch == 0
            assert not loader.wait(0.2)          # not complete: untouched pages remain
            # touch the rest, one GIL-free sweep: completion and unregistration follow
            t, out = touch_in_thread(base, block.length)
            t.join(60)
            assert out and out[0] == block.read_pages(0, block.pages)
            assert loader.wait(30)
            assert loader.complete                  # every page placed, the uffd closed
            # plain memory now: a dropped page reads back as zero without any handler
            ioctl.libc.madvise(loader.address("ram"), PAGE_SIZE, ioctl.MADV_DONTNEED)
            t, out = touch_in_thread(base, PAGE_SIZE)
            t.join(10)
            assert out == [bytes(PAGE_SIZE)]


@pytest.mark.parametrize("server", GIL_FREE_SERVERS)
def test_gil_free_server_allows_plain_python_reads(synthetic, server):
    with Snapshot.open(synthetic) as snap:
        block = snap.blocks[0]
        with LazyLoader(snap, server=server, prefetch=False) as loader:
            mem = loader.memory("ram")
            rng = random.Random(5)
            for _ in range(200):                 # plain Python: holds the GIL while faulting
                i = rng.randrange(block.pages)
                assert bytes(mem[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) == block.read_page(i)
            assert bytes(mem[0:8]) == block.read_page(0)[:8]       # a page it had not read
            assert eventually(lambda: loader.progress()[0] > 0)   # published every 20 ms
            placed, total = loader.progress()
            assert 0 < placed <= 201 and total == block.pages


_KILL_SCRIPT = textwrap.dedent("""
    import ctypes, os, signal, sys, threading, time
    from uffdpy.loader import LazyLoader, ServerDiedError
    from uffdpy.mappedram import Snapshot
    snap = Snapshot.open(sys.argv[1])
    block = snap.blocks[0]
    loader = LazyLoader(snap, server="process", prefetch=False)
    base = loader.address("ram")
    buf = ctypes.create_string_buffer(4096)
    ctypes.memmove(buf, base, 4096)                    # served: the server is alive
    i = next(f for f, c, p in block.runs() if p and f > 8)
    out = []
    if sys.argv[2] == "waiter":
        os.kill(loader.server_pid, signal.SIGSTOP)     # nobody serves the next fault...
        dst = ctypes.create_string_buffer(8)
        # memmove releases the GIL; ctypes.string_at would not (it is a PYFUNCTYPE)
        t = threading.Thread(target=lambda: out.append(ctypes.memmove(dst, base + i * 4096, 8)),
                             daemon=True)
        t.start()
        time.sleep(0.5)
        print("BLOCKED" if t.is_alive() else "READ " + repr(dst.raw), flush=True)
    os.kill(loader.server_pid, signal.SIGKILL)         # ...and then the server dies
    try:
        loader.wait(10)
    except ServerDiedError as exc:
        print("DIED:", exc, flush=True)
    if sys.argv[2] == "waiter":
        time.sleep(5)
        print("WAITER RETURNED " + repr(out), flush=True)  # must not be reached
    else:
        print("PLACED PAGE INTACT", buf.raw == block.read_page(0), flush=True)
        target = base + i * 4096
        with open("/proc/self/maps") as f:
            for line in f:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                if lo <= target < hi:
                    print("UNPLACED PAGE MAPPED", line.split()[1], flush=True)
        loader.close(_raise=False)
    os._exit(0)
""")


def test_killed_server_gives_clear_error_and_never_zeros(small):
    """A waiter of a dead server gets SIGSEGV at once: neither zeros nor a wait forever."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, small, "waiter"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert "BLOCKED" in r.stdout, r.stdout + r.stderr
    assert "WAITER RETURNED" not in r.stdout       # it never returned with data
    assert r.returncode == -11, r.stdout + r.stderr  # SIGSEGV: loud, instead of zeros


def test_killed_server_keeps_placed_pages_and_fences_the_rest(small):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, small, "nowaiter"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "DIED:" in r.stdout and "killed by signal 9 (SIGKILL)" in r.stdout
    assert "never zero-filled" in r.stdout
    assert "PLACED PAGE INTACT True" in r.stdout
    assert "UNPLACED PAGE MAPPED ---p" in r.stdout


_FAULT_LOOP_FAILS_SCRIPT = textwrap.dedent("""
    # The fault loop fails for real: the image is truncated after it was
    # opened, so UFFDIO_COPY from the file mapping gets EFAULT.
    import ctypes, os, sys, threading, time
    import uffdpy.loader as L
    from uffdpy.mappedram import Snapshot
    snap = Snapshot.open(sys.argv[1])
    page = next(f for f, c, p in snap.blocks[0].runs() if p)   # a data page
    os.truncate(sys.argv[1], 0)
    loader = L.LazyLoader(snap, server="thread", prefetch=False)
    dst = ctypes.create_string_buffer(8)
    t = threading.Thread(target=lambda: ctypes.memmove(
        dst, loader.address("ram") + page * 4096, 8), daemon=True)
    t.start()
    try:
        loader.wait(10)
    except L.LoaderError as exc:
        print("FAILED:", exc, flush=True)
    time.sleep(5)
    print("WAITER ALIVE" if t.is_alive() else "WAITER RETURNED " + repr(dst.raw), flush=True)
""")


def test_fault_loop_failure_does_not_leave_the_faulting_thread_blocked(small, tmp_path):
    image = tmp_path / "cut.img"
    image.write_bytes(Path(small).read_bytes())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", _FAULT_LOOP_FAILS_SCRIPT, str(image)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert "WAITER" not in r.stdout, r.stdout   # neither blocked nor served zeros
    assert r.returncode == -11, r.stdout + r.stderr


def test_killed_server_without_waiters_closes_cleanly(small):
    before_uffd = uffd_fds()
    loader = LazyLoader(small, server="process", prefetch=False)
    os.kill(loader.server_pid, 9)
    with pytest.raises(ServerDiedError) as info:
        loader.wait(10)
    assert info.value.signal_number == 9
    loader.close()                                 # already reported by wait(): no raise
    assert uffd_fds() == before_uffd


@pytest.mark.parametrize("server", SERVERS)
def test_close_mid_load_from_another_thread(synthetic, server):
    before = resources()
    loader = LazyLoader(synthetic, server=server, prefetch_chunk_bytes=PAGE_SIZE * 4)
    closer = threading.Thread(target=loader.close, daemon=True)
    closer.start()
    closer.join(30)
    assert not closer.is_alive()
    loader.close()                                 # idempotent
    with pytest.raises(ValueError):
        loader.memory("ram")
    assert resources()[0] == before[0]


def cycle_loads(snap: Snapshot, servers: List[str], cycles: int) -> None:
    """``cycles`` loads, alternating ``servers``; some complete, some close mid-load."""
    for k in range(cycles):
        prefetch = k % 3 != 0
        loader = LazyLoader(snap, server=servers[k % len(servers)], prefetch=prefetch)
        if prefetch and k % 4 == 1:
            assert loader.wait(30)
        loader.close()


#: mapping lines the C library may keep (see assert_no_leaks): a malloc arena
#: (1-2 lines) and the cached stacks of exited threads (2 lines each, a few)
ARENA_SLACK = 8


def assert_no_leaks(before: Tuple[int, int, int]) -> None:
    """Nothing more than ``before`` (taken after ``release_thread_pool()``): the idle
    pooled worker threads, at most ``MAX_IDLE`` and kept on purpose, are ended first."""
    release_thread_pool()
    deadline = time.monotonic() + 10
    while resources() != before and time.monotonic() < deadline:
        time.sleep(0.05)                           # thread objects finish exiting
    fds, nthreads, maps = resources()
    assert fds == before[0], "fd leaked"
    assert nthreads == before[1], [t.name for t in threading.enumerate()]
    # a glibc malloc arena made for a new thread, and the stacks glibc keeps
    # of exited threads for reuse, stay mapped (the C library's state, not
    # ours); a mapping leaked per load would show as hundreds after 200 loads
    assert maps <= before[2] + ARENA_SLACK, f"mapping leaked: {before[2]} -> {maps}"


def test_load_close_cycles_leak_nothing(small):
    with Snapshot.open(small) as snap:
        LazyLoader(snap).close()                   # warm up lazily created objects
        release_thread_pool()
        before = resources()
        cycle_loads(snap, ["thread", "process"], 200)
        assert_no_leaks(before)


@needs_interpreters
def test_interpreter_load_close_cycles_leak_nothing(small):
    """The pooled interpreter is reused: 200 loads leave no fd, thread or mapping behind.

    Run apart from the process server: every fork destroys idle interpreters
    (CPython cannot fork with them alive), and making new ones grows the
    allocator's arenas, which is not a leak of ours.
    """
    with Snapshot.open(small) as snap:
        prepare_interpreter_servers(1)
        cycle_loads(snap, ["interpreter", "thread"], 4)      # warm up both
        release_thread_pool()
        before = resources()
        cycle_loads(snap, ["interpreter", "thread"], 200)
        assert_no_leaks(before)


def test_corrupt_snapshot_fails_before_anything_is_registered(small, tmp_path):
    data = Path(small).read_bytes()
    cases = {"truncated": data[:0x60], "empty": b"", "garbage": os.urandom(4096)}
    bad = bytearray(data)
    bad[0:4] = b"XXXX"
    cases["bad magic"] = bytes(bad)
    assert_loaders_refuse_without_leaks(write_files(tmp_path, cases, ".img"), MappedRamError)


def test_worker_error_is_reraised_from_wait_and_close(small, tmp_path):
    """The prefetcher fails for real (the image truncated after it was opened):
    wait() raises the LoaderError with the kernel's error as its cause; a
    failure nobody has seen yet is raised by close()."""
    def cut_snapshot(name):
        image = tmp_path / name
        image.write_bytes(Path(small).read_bytes())
        snap = Snapshot.open(image)
        os.truncate(image, 0)
        return snap, str(image)
    snap, image = cut_snapshot("a.img")
    loader = LazyLoader(snap, server="thread")
    with pytest.raises(LoaderError) as info:
        loader.wait(10)
    assert image in str(info.value) and "truncated" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.EFAULT
    loader.close()                                 # reported by wait() already: no raise
    snap.close()
    snap, image = cut_snapshot("b.img")
    loader = LazyLoader(snap, server="thread")
    assert eventually(lambda: loader.finished)
    with pytest.raises(LoaderError, match="truncated"):   # not reported yet: close() raises it
        loader.close()
    snap.close()


@pytest.mark.parametrize("server", SERVERS)
def test_eager_and_lazy_agree(synthetic, server):
    with Snapshot.open(synthetic) as snap:
        with EagerLoader(snap) as eager, LazyLoader(snap, server=server) as lazy:
            assert lazy.wait(60)
            assert bytes(eager.memory("ram")) == bytes(lazy.memory("ram"))
            assert eager.stats.bytes_copied == lazy.stats.bytes_copied


@pytest.mark.skipif(HAVE_INTERPRETERS, reason="this Python has own-GIL subinterpreters")
def test_interpreter_server_refused_before_3_13_with_the_alternative(small):
    before = resources()
    with pytest.raises(LoaderError, match=r"needs Python 3\.13 or newer.*server='process'"):
        LazyLoader(small, server="interpreter")
    assert resources() == before


_INTERPRETER_FAILS_SCRIPT = textwrap.dedent("""
    import os, sys
    from uffdpy.loader import LazyLoader, LoaderError
    from uffdpy.mappedram import Snapshot
    snap = Snapshot.open(sys.argv[1])
    block = snap.blocks[0]
    cut = next(f for f, c, p in block.runs() if p and f > 8)   # a present page...
    want0 = block.read_page(0)
    # ...whose bytes the file no longer has: the server's COPY gets EFAULT
    os.truncate(sys.argv[1], block.file_offset + cut * 4096)
    loader = LazyLoader(snap, server="interpreter", prefetch=False)
    mem = loader.memory("ram")
    print("PAGE 0 SERVED", bytes(mem[0:4096]) == want0, flush=True)  # GIL held: fine
    print("READING", flush=True)
    data = bytes(mem[cut * 4096:(cut + 1) * 4096])        # GIL held while it faults
    print("READ RETURNED", data[:8], flush=True)          # must not be reached
""")


@needs_interpreters
def test_interpreter_server_failure_fences_pages_even_while_the_gil_is_held(small, tmp_path):
    """The server fails on a page while a GIL-holding read waits for it: SIGSEGV, not a hang.

    The loading interpreter cannot act (its GIL is held by the sleeping
    reader), so the subinterpreter fences the unplaced pages itself.
    """
    path = tmp_path / "snap.img"
    path.write_bytes(Path(small).read_bytes())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", _INTERPRETER_FAILS_SCRIPT, str(path)],
                       env=env, capture_output=True, text=True, timeout=60)
    assert "PAGE 0 SERVED True" in r.stdout, r.stdout + r.stderr
    assert "READING" in r.stdout and "READ RETURNED" not in r.stdout, r.stdout
    assert r.returncode == -11, r.stdout + r.stderr   # SIGSEGV: loud, instead of zeros or a hang


@needs_interpreters
def test_interpreter_server_failure_is_reported_and_placed_pages_stay(small, tmp_path):
    path = tmp_path / "snap.img"
    path.write_bytes(Path(small).read_bytes())
    with Snapshot.open(path) as snap:
        block = snap.blocks[0]
        cut = next(f for f, c, p in block.runs() if p and f > 8)
        want0 = block.read_page(0)
        os.truncate(path, block.file_offset + cut * PAGE_SIZE)
        before = resources()
        loader = LazyLoader(snap, server="interpreter", prefetch=True)
        with pytest.raises(LoaderError, match=r"fault server failed: .*(EFAULT|Bad address)"):
            loader.wait(30)
        base = loader.address("ram")
        assert loader.memory("ram")[0:PAGE_SIZE] == want0        # placed: still readable
        with open("/proc/self/maps") as f:                        # unplaced: fenced
            spans = [line.split() for line in f]
        target = base + cut * PAGE_SIZE
        perms = [s[1] for s in spans
                 if int(s[0].split("-")[0], 16) <= target < int(s[0].split("-")[1], 16)]
        assert perms == ["---p"]
        loader.close()                             # reported by wait(): no raise
        assert resources()[0] == before[0]


@needs_interpreters
def test_interpreter_servers_are_pooled_released_and_gone_before_a_fork(small):
    import _interpreters
    release_interpreter_servers()
    base = len(_interpreters.list_all())
    prepare_interpreter_servers(2)
    assert len(_interpreters.list_all()) == base + 2
    with LazyLoader(small, server="interpreter") as loader:     # takes one from the pool
        assert len(_interpreters.list_all()) == base + 2
        assert loader.wait(30)
    assert len(_interpreters.list_all()) == base + 2           # given back
    pid = os.fork()                 # CPython 3.13 aborts a child forked with them alive
    if pid == 0:
        os._exit(7)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 7
    assert len(_interpreters.list_all()) == base                # destroyed before the fork
    prepare_interpreter_servers(1)
    release_interpreter_servers()
    assert len(_interpreters.list_all()) == base


def file_mapping_rss(address: int) -> int:
    """Resident bytes of the mapping that starts at ``address`` (from /proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            if "-" in line.split()[0] and not line.split()[0].endswith(":"):
                inside = int(line.split("-")[0], 16) == address
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping at {address:#x}")


@pytest.mark.parametrize("server", [s for s in SERVERS if s != "process"])
@pytest.mark.parametrize("populate", [False, True], ids=["plain", "populate"])
def test_populate_source_maps_the_data_pages_ahead_of_any_fault(synthetic, server, populate):
    """The populator maps every data page of the file mapping; without it nothing is mapped."""
    with Snapshot.open(synthetic) as snap:
        block = snap.blocks[0]
        data = block.present_pages * PAGE_SIZE
        with LazyLoader(snap, server=server, prefetch=False, populate_source=populate) as loader:
            base = loader.file_mapping_address   # the mapping the copies read from
            if populate:
                assert eventually(lambda: file_mapping_rss(base) >= data, 30)
            else:
                time.sleep(0.3)
                assert file_mapping_rss(base) < data // 100
            t, out = touch_in_thread(loader.address("ram"), PAGE_SIZE)   # still served
            t.join(10)
            assert out == [block.read_page(0)]
            # placed nothing but the touched page (counted just after the copy wakes it)
            assert eventually(lambda: loader.progress()[0] == 1)
            time.sleep(0.1)
            assert loader.progress()[0] == 1


@pytest.mark.parametrize("server", SERVERS)
def test_exit_without_close_does_not_hang(small, server):
    """A script that forgets close() still exits (the interpreter server is stopped at exit)."""
    code = textwrap.dedent(f"""
        import ctypes, sys
        from uffdpy import LazyLoader
        loader = LazyLoader(sys.argv[1], server={server!r}, prefetch=False)
        buf = ctypes.create_string_buffer(8)
        ctypes.memmove(buf, loader.address("ram"), 8)       # served: the server runs
        print("LEAVING", flush=True)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code, small], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "LEAVING" in r.stdout, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr


def test_importing_registers_no_exit_hook():
    """Importing uffdpy (every module) registers nothing at exit or at fork: the hooks
    come with the first interpreter server, pooled thread or QMP client."""
    code = textwrap.dedent("""
        import atexit, importlib, os, pkgutil
        ours = []
        for hook in ("atexit", "fork"):
            real = atexit.register if hook == "atexit" else os.register_at_fork
            def spy(*a, _real=real, _hook=hook, **k):
                fn = (a or list(k.values()))[0]
                if getattr(fn, "__module__", "").startswith("uffdpy"):
                    ours.append((_hook, fn.__qualname__))
                return _real(*a, **k)
            if hook == "atexit":
                atexit.register = spy
            else:
                os.register_at_fork = spy
        import uffdpy
        for m in pkgutil.walk_packages(uffdpy.__path__, "uffdpy."):
            if not m.name.endswith("__main__"):          # that one runs the command
                importlib.import_module(m.name)
        print(ours)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@needs_interpreters
def test_two_interpreter_servers_at_once(small, synthetic):
    """Each load gets its own subinterpreter; both complete and equal their snapshots."""
    with Snapshot.open(small) as a, Snapshot.open(synthetic) as b:
        with LazyLoader(a, server="interpreter") as la, LazyLoader(b, server="interpreter") as lb:
            assert la.wait(60) and lb.wait(60)
            memory_equals_snapshot(la, a)
            memory_equals_snapshot(lb, b)
            assert la.stats.double_placements == lb.stats.double_placements == 0


def test_cli_offers_every_server():
    from uffdpy import loader
    from uffdpy.cli import build_parser
    args = build_parser().parse_args(["load", "x.img", "--server", loader.SERVERS[-1]])
    assert args.server == loader.SERVERS[-1]
    assert loader.options.FLAGS["--server"][1]["choices"] == loader.SERVERS


@needs_interpreters
def test_process_server_refused_while_an_interpreter_server_runs(small):
    with LazyLoader(small, server="interpreter", prefetch=False):
        with pytest.raises(LoaderError, match="CPython aborts a child forked"):
            LazyLoader(small, server="process")


def test_bad_arguments():
    with pytest.raises(ValueError, match="'thread', 'process', 'interpreter'"):
        LazyLoader("/nonexistent", server="fiber")
    with pytest.raises(FileNotFoundError):
        LazyLoader("/nonexistent/snapshot.img")


def test_huge_pages_pool_too_small_says_how_many_to_reserve(small, monkeypatch):
    """ENOMEM from MAP_HUGETLB becomes a message with the number of pages to reserve."""
    import errno as _errno
    from uffdpy.memory import Mapping
    real = Mapping.anonymous

    def anonymous(length, **kw):
        if kw.get("huge_pages"):
            raise OSError(_errno.ENOMEM, "Cannot allocate memory")
        return real(length, **kw)
    monkeypatch.setattr(Mapping, "anonymous", staticmethod(anonymous))
    before = resources()
    with pytest.raises(OSError) as info:
        LazyLoader(small, huge_pages=True)
    assert info.value.errno == _errno.ENOMEM
    assert "echo 2 > /proc/sys/vm/nr_hugepages" in str(info.value)    # 4 MiB: two 2 MiB pages
    assert resources() == before


def test_fault_on_a_page_in_a_prefetch_chunk_in_flight_is_served_at_once(small):
    """A page claimed by the prefetcher but not placed yet: the fault loop copies it
    itself (no wait for the whole chunk); the prefetcher's later copy gets EEXIST,
    skips it, and nothing is counted twice."""
    from uffdpy.loader import claims as loader_module, stats as stats_module
    with Snapshot.open(small) as snap:
        block = snap.blocks[0]
        with LazyLoader(snap, server="thread", prefetch=False) as loader:
            workers = loader.workers
            claims = workers.claims
            i = next(f for f, c, p in block.runs() if p and c >= 4) + 1
            assert claims.claim_range(0, i - 1, i + 3) == [(i - 1, i + 3)]   # "in flight"
            t, out = touch_in_thread(loader.address("ram") + i * PAGE_SIZE, PAGE_SIZE)
            t.join(10)
            assert not t.is_alive(), "the fault on a claimed page was not served"
            assert out == [block.read_page(i)]
            assert eventually(lambda: claims.state(0, i) == loader_module.PLACED)
            # now the "prefetcher" places its chunk: page i is EEXIST, the rest install
            counters = stats_module.WorkerCounters()
            region = workers.regions[0]
            placed = workers.place(region, i - 1, i + 3, region.kind(i - 1), counters, None,
                                    workers.uffd)
            assert placed == 3 and counters.eexist == 1
            assert [claims.state(0, j) for j in range(i - 1, i + 3)] == [loader_module.PLACED] * 4
            st = loader.stats
            assert st.double_placements == 0 and st.pages_by_fault == 1
            assert st.placed_pages == 4


def test_page_size_other_than_4096_is_refused_everywhere(tmp_path: Path) -> None:
    """A MappedRamHeader page size of 8 KiB..1 GiB is refused, never loaded as zeros.

    QEMU writes only its target page size (4096 on x86); 10.0.2 does not check
    the field and misplaces every page, and later QEMU refuses it.  Before this
    was refused, the lazy servers accepted it and placed zeros everywhere.
    """
    good = tmp_path / "good.img"
    make_synthetic(good, size=4 * 1024 * 1024, fill=0.5, seed=3)
    with Snapshot.open(good) as snap:
        header_at = snap.blocks[0].bitmap_offset - 28
    data = bytearray(good.read_bytes())
    paths = []
    for size in (8192, 2 * 1024 * 1024, 1 << 30):
        data[header_at + 4:header_at + 12] = size.to_bytes(8, "big")
        path = tmp_path / f"page{size}.img"
        path.write_bytes(data)
        paths.append(path)
        with pytest.raises(MappedRamError, match="page size") as info:
            Snapshot.open(path)
        assert "4096" in str(info.value) and str(size) in str(info.value)
    assert_loaders_refuse_without_leaks(paths, MappedRamError)
    with pytest.raises(ValueError, match="target page size"):
        make_synthetic(tmp_path / "w.img", size=1 << 20, fill=0.5, seed=1, page_size=8192)


def test_load_options_validate_round_trip_and_agree_with_the_servers():
    """LoadOptions: one value, validated when made, the CLI's flags and back; the
    workers' share of it typed, frozen, and through JSON and back."""
    import dataclasses
    import json
    from uffdpy import cli
    from uffdpy.loader import SERVERS, LoadOptions
    from uffdpy.loader.options import SERVER_NAMES, WorkerOptions
    assert SERVER_NAMES == SERVERS
    for bad in ({"server": "fiber"}, {"prefetch_chunk_bytes": 100}, {"prefetch_threads": 0},
                {"fault_around_pages": -1}, {"server_cpu": -2}):
        with pytest.raises(ValueError):
            LoadOptions(**bad)
    opts = LoadOptions(server="process", prefetch=False, prefetch_chunk_bytes=1 << 16,
                       server_cpu=0, busy_poll=True, prefetch_threads=1, populate_source=True)
    args = cli.build_parser().parse_args(["load", "x.img", *opts.cli_args()])
    assert LoadOptions.from_cli(args) == opts
    assert LoadOptions.from_cli(cli.build_parser().parse_args(["load", "x.img"])) == LoadOptions()
    workers = opts.worker_options()
    assert WorkerOptions.from_dict(json.loads(json.dumps(workers.as_dict()))) == workers
    assert (workers.prefetch, workers.chunk_bytes, workers.prefetch_threads) == (False, 1 << 16, 1)
    with pytest.raises(ValueError, match="not worker options: huge_pages"):
        WorkerOptions.from_dict({**workers.as_dict(), "huge_pages": True})
    with pytest.raises(dataclasses.FrozenInstanceError):
        workers.prefetch = True  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.server = "thread"  # type: ignore[misc]
    assert LoadOptions().resolved().prefetch_threads in (1, 2)


def test_lazy_loader_takes_options_or_keywords_not_both(small):
    from uffdpy.loader import LoadOptions
    with LazyLoader(small, options=LoadOptions(prefetch=False)) as loader:
        assert loader.options.prefetch is False and loader.options.prefetch_threads >= 1
    with pytest.raises(ValueError, match="not both"):
        LazyLoader(small, options=LoadOptions(), server="process")
    with pytest.raises(ValueError, match="server must be one of"):
        LazyLoader(small, server="fiber")


@pytest.mark.parametrize("server", SERVERS)
def test_a_load_never_completes_before_it_is_ready(tmp_path, server):
    """A server outside this interpreter may place a small image's every page before
    the constructor returns (seen: 5 of 40 interpreter loads of 1 MiB): complete is
    then ready, never earlier."""
    path = tmp_path / "tiny.img"
    make_synthetic(str(path), size=1 << 20, fill=0.5, seed=1)
    if server == "interpreter":
        prepare_interpreter_servers(1)
    with Snapshot.open(str(path)) as snap:
        for _ in range(40):
            with LazyLoader(snap, server=server) as loader:
                assert loader.wait(30)
                s = loader.stats
                assert s.time_to_complete_s >= s.time_to_ready_s > 0
