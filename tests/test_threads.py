"""The loader's worker-thread pool: reuse, what a thread gets back between loads, fork."""
from __future__ import annotations

import os
import threading

import pytest

from uffdpy.loader import LazyLoader, release_thread_pool
from uffdpy.loader.threads import run_pooled
from uffdpy.harness.synthetic import make_synthetic

pytestmark = pytest.mark.timeout(120)


def test_an_idle_thread_runs_the_next_task() -> None:
    release_thread_pool()
    seen = []
    first = run_pooled("uffdpy-test-a", lambda: seen.append((threading.get_ident(),
                                                             threading.current_thread().name)))
    first.join(10)
    second = run_pooled("uffdpy-test-b", lambda: seen.append((threading.get_ident(),
                                                              threading.current_thread().name)))
    second.join(10)
    assert not first.is_alive() and not second.is_alive()
    assert seen[0][0] == seen[1][0]                       # the same thread
    assert [name for _, name in seen] == ["uffdpy-test-a", "uffdpy-test-b"]


def test_priority_and_cpus_come_back_after_a_task() -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs to pin to one")
    release_thread_pool()
    before = {}
    after = {}

    def lower_and_pin() -> None:
        tid = threading.get_native_id()
        before["nice"] = os.getpriority(os.PRIO_PROCESS, tid)
        before["cpus"] = os.sched_getaffinity(tid)
        before["ident"] = threading.get_native_id()    # a TID: not soon reused
        os.setpriority(os.PRIO_PROCESS, tid, before["nice"] + 5)    # as a prefetcher does
        os.sched_setaffinity(tid, {min(before["cpus"])})             # as server_cpu does

    def look() -> None:
        tid = threading.get_native_id()
        after["nice"] = os.getpriority(os.PRIO_PROCESS, tid)
        after["cpus"] = os.sched_getaffinity(tid)
        after["ident"] = threading.get_native_id()
    run_pooled("uffdpy-test-pin", lower_and_pin).join(10)
    task = run_pooled("uffdpy-test-look", look)
    task.join(10)
    # whether the thread can be given its priority back (CAP_SYS_NICE, or RLIMIT_NICE):
    # if not (an unprivileged user), the pool drops it and a new thread runs the next task
    may_restore = []

    def probe() -> None:
        tid = threading.get_native_id()
        nice = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, nice + 5)
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
            may_restore.append(True)
        except PermissionError:
            may_restore.append(False)
    t = threading.Thread(target=probe)
    t.start()
    t.join(10)
    assert (after["ident"] == before["ident"]) == may_restore[0]   # reused only if restored
    assert after["nice"] == before["nice"] and after["cpus"] == before["cpus"]


@pytest.mark.kernel
def test_a_second_load_starts_no_thread(tmp_path, monkeypatch) -> None:
    path = tmp_path / "s.img"
    make_synthetic(path, size=4 << 20, fill=0.5, seed=3)
    with LazyLoader(path, server="thread", populate_source=True) as loader:
        assert loader.wait(60)
    started = []
    real = threading.Thread.start

    def counting(self: threading.Thread) -> None:
        started.append(self.name)
        real(self)
    monkeypatch.setattr(threading.Thread, "start", counting)
    with LazyLoader(path, server="thread", populate_source=True) as loader:
        assert loader.wait(60)
        assert loader.stats.placed_pages == loader.stats.total_pages
    assert started == []


# forking with the pool's idle thread alive is the point (CPython 3.12+ warns about it)
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_starts_its_own_threads() -> None:
    run_pooled("uffdpy-test-warm", lambda: None).join(10)     # an idle thread in the parent
    pid = os.fork()
    if pid == 0:                                               # the child: no such thread
        code = 1
        try:
            done = []
            task = run_pooled("uffdpy-test-child", lambda: done.append(True))
            task.join(10)
            code = 0 if done == [True] else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
