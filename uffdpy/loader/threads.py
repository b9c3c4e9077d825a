"""Worker threads: started once, kept idle between loads, handed the next load's work.

Starting a Python thread costs a context switch and a GIL hand-off before
``Thread.start()`` returns (about 0.17 ms for an empty thread on a 2-CPU VM,
0.3-0.5 ms for one that sets itself up first), and a lazy load needs up to
four (fault loop, two prefetchers, populator): more than everything else
before ready together.  Nothing of that has to be waited for, since the kernel
queues faults from registration on, so a thread that has served one load is
kept, idle, and given the next load's work: handing a function to an idle
thread is one lock release.  Only the first load of a process (or one that
needs more threads than are idle) starts threads, and a thread that cannot
start is still a ``LoaderError`` at once, naming it.

A pooled thread takes the name of the work it runs (``uffdpy-fault-loop``),
and gets back its scheduling priority and CPU affinity after each piece of
work (a prefetcher lowers its priority, a fault loop may be pinned).  At most
``MAX_IDLE`` threads stay idle.  After ``os.fork()`` the child's pool is
empty (the threads were not copied).  Subinterpreters do not use the pool:
their threads cannot be daemons.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, List, Optional

from .errors import LoaderError

__all__ = ["MAX_IDLE", "Task", "run_pooled", "release_thread_pool", "start_thread"]

#: idle worker threads kept for the next loads
MAX_IDLE = 8
_IDLE_NAME = "uffdpy-idle"


def start_thread(thread: threading.Thread) -> None:
    """``thread.start()``; a thread the system cannot start is a LoaderError naming it.

    Raises:
        LoaderError: the thread could not start (``RuntimeError: can't start
            new thread``: a pids limit, RLIMIT_NPROC, no memory for a stack).
    """
    try:
        thread.start()
    except RuntimeError as exc:
        raise LoaderError(f"cannot start the loader's thread {thread.name!r}: {exc} "
                          f"(a pids or RLIMIT_NPROC limit, or no memory for its "
                          f"stack?)") from exc


class Task:
    """A function given to a pooled thread: ``join`` and ``is_alive`` as for a Thread."""

    def __init__(self, name: str, fn: Callable[[], None], worker: "_Worker") -> None:
        self.name = name
        self.fn = fn
        self._worker = worker
        self._done = threading.Event()

    @property
    def ident(self) -> Optional[int]:
        """The running thread's ident (the task runs as soon as it is given)."""
        return self._worker.thread.ident

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait until the function has returned (at once from its own thread)."""
        if threading.get_ident() != self.ident:
            self._done.wait(timeout)

    def is_alive(self) -> bool:
        return not self._done.is_set()


class _Worker:
    """One pooled thread: runs the tasks it is given, one at a time."""

    def __init__(self, pool: "_Pool", name: str) -> None:
        self._pool = pool
        self._cond = threading.Condition(threading.Lock())
        self._task: Optional[Task] = None
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def give(self, task: Task) -> None:
        with self._cond:
            self._task = task
            self._cond.notify()

    def _loop(self) -> None:
        me = threading.current_thread()
        tid = threading.get_native_id()
        while True:
            with self._cond:
                while self._task is None:
                    self._cond.wait()
                task, self._task = self._task, None
            if task.fn is _RETIRE:
                return
            me.name = task.name
            nice = _priority(tid)
            cpus = os.sched_getaffinity(tid)
            try:
                task.fn()
            finally:
                # as it was before the task: a prefetcher lowered its
                # priority, a fault loop may have been pinned to one CPU; a
                # thread that cannot get them back (raising a priority needs
                # CAP_SYS_NICE) is not kept
                kept = _restore(tid, nice, cpus) and self._pool._idle_again(self)
                me.name = _IDLE_NAME
                task._done.set()          # after _idle_again: a joiner finds it idle
            if not kept:
                return


def _RETIRE() -> None:
    """The task that ends a pooled thread."""


def _priority(tid: int) -> Optional[int]:
    try:
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        return None


def _restore(tid: int, nice: Optional[int], cpus: "set[int]") -> bool:
    """Give thread ``tid`` back its priority and CPUs; False if it could not be done."""
    try:
        if nice is not None and os.getpriority(os.PRIO_PROCESS, tid) != nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        if os.sched_getaffinity(tid) != cpus:
            os.sched_setaffinity(tid, cpus)
    except OSError:
        return False
    return True


class _Pool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: List[_Worker] = []
        self._fork_hook = False

    def run(self, name: str, fn: Callable[[], None]) -> Task:
        """Run ``fn`` on an idle thread, or on a new one. Raises: LoaderError (see start_thread)."""
        with self._lock:
            worker = self._idle.pop() if self._idle else None
            if not self._fork_hook:        # once, when the pool first makes a thread
                self._fork_hook = True
                os.register_at_fork(after_in_child=self.forget)
        if worker is None:
            worker = _Worker(self, name)
            start_thread(worker.thread)
        task = Task(name, fn, worker)
        worker.give(task)
        return task

    def _idle_again(self, worker: _Worker) -> bool:
        with self._lock:
            if len(self._idle) >= MAX_IDLE:
                return False
            self._idle.append(worker)
            return True

    def release(self) -> None:
        """End every idle thread (and wait for them, briefly)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.give(Task("retire", _RETIRE, worker))
        for worker in idle:
            worker.thread.join(5.0)

    def forget(self) -> None:
        """In a forked child: the idle threads were not copied."""
        self._lock = threading.Lock()
        self._idle = []


_POOL = _Pool()


def run_pooled(name: str, fn: Callable[[], None]) -> Task:
    """Run ``fn`` on a pooled worker thread named ``name`` (see the module docstring)."""
    return _POOL.run(name, fn)


def release_thread_pool() -> None:
    """End the idle worker threads (the next load starts new ones)."""
    _POOL.release()
