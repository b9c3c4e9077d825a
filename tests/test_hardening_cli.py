"""Hardening of the ``uffdpy`` command: signals, failures, odd files and arguments.

Each test runs the command as a subprocess, the way a user does, under a
timeout, and checks the exit status and that stderr is either empty or
exactly one ``uffdpy: error:`` line (never a traceback, never a signal's
death).  The load tests need a working userfaultfd.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

from helpers import LAZY_SERVERS  # noqa: E402  (tests/ is on sys.path)

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 120.0
MiB = 1 << 20
#: the synthetic guest: small enough that a fence of its unplaced runs stays far
#: below vm.max_map_count, large enough that a random workload never finishes
GUEST_SIZE = 256 * MiB


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def uffdpy(*args: object, timeout: float = RUN_TIMEOUT, **kw: object) -> subprocess.CompletedProcess:
    """Run ``python -m uffdpy ARGS`` from this checkout; never hangs the test run."""
    return subprocess.run([sys.executable, "-m", "uffdpy", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=_env(),
                          stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]


def start(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "uffdpy", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), stdin=subprocess.DEVNULL)


def finish(proc: subprocess.Popen, timeout: float = 60.0) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"uffdpy did not end within {timeout} s\nstderr:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit status 2, exactly one ``uffdpy: error:`` line on stderr, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("uffdpy: error: "), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synth") / "s.img"
    proc = uffdpy("make", path, "--size", GUEST_SIZE, "--fill", "0.5", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    return path


# ------------------------------------------------------- A: signals and failures mid-workload

def _guest_rss(pid: int) -> int:
    """Bytes resident in the guest's memory: the private anonymous mapping of its size."""
    rss, in_guest = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:              # a mapping's first line
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                in_guest = (hi - lo == GUEST_SIZE and head[1] == "rw-p" and head[4] == "0"
                            and len(head) == 5)
            elif in_guest and head[0] == "Rss:":
                rss += int(head[1]) * 1024
    return rss


def _children(pid: int) -> List[int]:
    out: List[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except FileNotFoundError:
            continue
    return out


def start_touching(image: Path, server: str) -> subprocess.Popen:
    """``load --access random --no-prefetch`` with far more touches than it can finish,
    returned once its toucher has faulted in a few thousand data pages (and still runs)."""
    proc = start("load", image, "--server", server, "--access", "random", "--no-prefetch",
                 "--touch", 3_000_000)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, finish(proc).stderr
        if _guest_rss(proc.pid) >= 8 * MiB:
            break
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail("the load never started touching")
    assert proc.poll() is None, finish(proc).stderr
    return proc


@pytest.mark.parametrize("server", LAZY_SERVERS)
@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_access_workload_exits_cleanly(synth: Path, server: str, signum: int,
                                                     status: int) -> None:
    proc = start_touching(synth, server)
    proc.send_signal(signum)
    done = finish(proc)
    assert done.returncode == status, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr


def test_server_killed_during_access_workload_is_one_error(synth: Path) -> None:
    proc = start_touching(synth, "process")
    children = _children(proc.pid)
    assert len(children) == 1, children
    os.kill(children[0], signal.SIGKILL)
    one_error_line(finish(proc), "server", "SIGKILL")


@pytest.mark.parametrize("server", LAZY_SERVERS)
def test_file_truncated_during_access_workload_is_one_error(synth: Path, tmp_path: Path,
                                                            server: str) -> None:
    image = tmp_path / "t.img"
    image.write_bytes(synth.read_bytes())
    proc = start_touching(image, server)
    os.truncate(image, 0)
    one_error_line(finish(proc))


# ------------------------------------------------------- C: only regular files are images

def test_inspect_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    line = one_error_line(uffdpy("inspect", fifo, timeout=30), str(fifo), "FIFO")
    assert "regular file" in line, line


@pytest.mark.parametrize("command", ["inspect", "load"])
def test_directory_is_refused_as_an_image(tmp_path: Path, command: str) -> None:
    one_error_line(uffdpy(command, tmp_path, timeout=30), str(tmp_path), "directory")
