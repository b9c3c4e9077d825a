"""Make real Linux process core files holding known bytes at a known address.

What it does
------------
Starts a small Python child that maps an anonymous private buffer, fills it
with deterministic random bytes (``random.Random(seed).randbytes(size)``),
prints the buffer's virtual address and waits.  Then either

* ``gcore``: gdb's ``gcore -o PREFIX PID`` dumps the live child (the child is
  killed afterwards), or
* ``kernel``: the child raises ``RLIMIT_CORE`` to its hard limit and kills
  itself with SIGABRT in a fresh working directory, so the kernel writes the
  core there (``core_pattern`` must be a plain file name such as ``core``;
  ``core_uses_pid`` may add ``.PID``).  A piped ``core_pattern``
  (``|/usr/lib/systemd/systemd-coredump ...``) or one with a directory
  cannot be collected this way: :class:`CoreUnavailable` says so.

Each returns ``(core_path, address, data)``: the buffer's bytes ``data`` are
at virtual address ``address`` of the dumped process.  Every wait has a
timeout and the child is always killed and reaped.

Use
---
Command line (``scripts/process_core.py``; prints a JSON summary; ``--verify``
opens the core with ``uffdpy.elfcore`` and checks the buffer)::

    python3 scripts/process_core.py gcore OUTDIR [--size 65536] [--seed 1] [--verify]
    python3 scripts/process_core.py kernel OUTDIR [--size 65536] [--seed 1] [--verify]

From Python::

    from uffdpy.harness.processcore import gcore_core, kernel_core
    path, address, data = gcore_core("/tmp/dir", size=0x10000, seed=1)
"""
from __future__ import annotations

import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import List, Tuple

from ..errors import UffdpyError

DEFAULT_TIMEOUT = 60.0

#: The child: map, fill, report the address, then wait (gcore) or abort (kernel).
CHILD = r"""
import ctypes, mmap, os, random, resource, signal, sys, time
size, seed, mode, wait = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf[:] = random.Random(seed).randbytes(size)
address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
if mode == "kernel":
    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    print(f"{address:#x} {hard}", flush=True)
    sys.stdin.readline()          # the parent says go
    os.kill(os.getpid(), signal.SIGABRT)
print(f"{address:#x}", flush=True)
time.sleep(wait)
"""


class CoreError(UffdpyError, RuntimeError):
    """The child or the dumper failed or timed out."""


class CoreUnavailable(CoreError):
    """This machine cannot produce this kind of core (the message says why)."""


def expected_data(size: int, seed: int) -> bytes:
    """The bytes the child puts in its buffer."""
    return random.Random(seed).randbytes(size)


def _start_child(mode: str, size: int, seed: int, cwd: str, timeout: float
                 ) -> Tuple["subprocess.Popen[str]", List[str]]:
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", CHILD, str(size), str(seed), mode,
                             str(timeout)], cwd=cwd, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        _stop(proc)
        err = proc.stderr.read() if proc.stderr else ""
        raise CoreError(f"child did not report its buffer within {timeout}s: {err.strip()}")
    return proc, line.split()


def _stop(proc: "subprocess.Popen[str]") -> None:
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=10)
    finally:
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


def gcore_core(directory: str, *, size: int = 0x10000, seed: int = 1,
               timeout: float = DEFAULT_TIMEOUT) -> Tuple[str, int, bytes]:
    """Dump a live child with gdb's ``gcore``; returns (core_path, address, data).

    Raises: CoreUnavailable without gcore; CoreError if gcore fails.
    """
    gcore = shutil.which("gcore")
    if gcore is None:
        raise CoreUnavailable("gcore (gdb) is not installed")
    proc, words = _start_child("gcore", size, seed, directory, timeout)
    try:
        address = int(words[0], 16)
        prefix = os.path.join(os.path.abspath(directory), "gcore")
        try:
            run = subprocess.run([gcore, "-o", prefix, str(proc.pid)], capture_output=True,
                                 text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise CoreError(f"gcore did not finish within {timeout}s") from None
        path = f"{prefix}.{proc.pid}"
        if run.returncode != 0 or not os.path.exists(path):
            raise CoreError(f"gcore exited {run.returncode} without {path}: "
                            f"{(run.stderr or run.stdout).strip()[-500:]}")
    finally:
        _stop(proc)
    return path, address, expected_data(size, seed)


def _core_pattern() -> str:
    try:
        with open("/proc/sys/kernel/core_pattern") as f:
            return f.read().strip()
    except OSError as e:
        raise CoreUnavailable(f"cannot read /proc/sys/kernel/core_pattern: {e}") from None


def kernel_core(directory: str, *, size: int = 0x10000, seed: int = 1,
                timeout: float = DEFAULT_TIMEOUT) -> Tuple[str, int, bytes]:
    """Let the kernel dump a child that aborts itself; returns (core_path, address, data).

    The core is written to a fresh subdirectory of ``directory`` (the child's
    working directory).  Raises: CoreUnavailable when core_pattern pipes to
    a handler or names a directory, or RLIMIT_CORE's hard limit is 0;
    CoreError if no core appears.
    """
    pattern = _core_pattern()
    if pattern.startswith("|") or "/" in pattern:
        raise CoreUnavailable(f"core_pattern is {pattern!r}: cores do not land in the working "
                              "directory (set it to 'core' to collect kernel cores here)")
    cwd = tempfile.mkdtemp(prefix="kernel-core-", dir=directory)
    proc, words = _start_child("kernel", size, seed, cwd, timeout)
    try:
        address, hard = int(words[0], 16), int(words[1])
        if hard == 0:
            raise CoreUnavailable("RLIMIT_CORE hard limit is 0: the kernel writes no core")
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CoreError(f"child did not die within {timeout}s") from None
        if status != -signal.SIGABRT:
            raise CoreError(f"child exited with {status}, expected death by SIGABRT")
    finally:
        _stop(proc)
    cores = sorted(name for name in os.listdir(cwd) if name.startswith("core"))
    if len(cores) != 1:
        raise CoreError(f"expected one core file in {cwd} (core_pattern {pattern!r}), "
                        f"found {cores or 'none'}")
    return os.path.join(cwd, cores[0]), address, expected_data(size, seed)


def verify(path: str, address: int, data: bytes) -> str:
    """Check with uffdpy.elfcore that ``data`` is at ``address``; returns the region name."""
    from ..elfcore import ElfImage
    with ElfImage.open(path) as image:
        region = image.region_at(address)
        first = (address - region.address) // region.page_size
        count = -(-(address - region.address + len(data)) // region.page_size) - first
        got = region.read_pages(first, count)
        start = address - region.address - first * region.page_size
        if got[start:start + len(data)] != data:
            raise CoreError(f"{path}: the buffer at {address:#x} differs from the expected bytes")
        return region.name
