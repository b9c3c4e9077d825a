"""Hardening of the ``uffdpy`` command: signals, failures, odd files and arguments.

Each test runs the command as a subprocess, the way a user does, under a
timeout, and checks the exit status and that stderr is either empty or
exactly one ``uffdpy: error:`` line (never a traceback, never a signal's
death).  The load tests need a working userfaultfd.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, List

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


@pytest.mark.kernel
@pytest.mark.parametrize("server", LAZY_SERVERS)
@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_access_workload_exits_cleanly(synth: Path, server: str, signum: int,
                                                     status: int) -> None:
    proc = start_touching(synth, server)
    proc.send_signal(signum)
    done = finish(proc)
    assert done.returncode == status, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.kernel
def test_server_killed_during_access_workload_is_one_error(synth: Path) -> None:
    proc = start_touching(synth, "process")
    children = _children(proc.pid)
    assert len(children) == 1, children
    os.kill(children[0], signal.SIGKILL)
    one_error_line(finish(proc), "server", "SIGKILL")


@pytest.mark.kernel
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


# ------------------------------------------- B, D: outputs are never the input, never partial

def test_dump_to_its_own_input_is_refused(synth: Path, tmp_path: Path) -> None:
    image = tmp_path / "same.img"
    image.write_bytes(synth.read_bytes())
    size = image.stat().st_size
    one_error_line(uffdpy("dump", image, "ram", "-o", image), str(image), "input")
    assert image.stat().st_size == size
    link = tmp_path / "link.img"
    link.symlink_to(image)
    one_error_line(uffdpy("dump", image, "ram", "-o", link), "input")
    assert image.stat().st_size == size


def test_convert_to_its_own_input_is_refused(tmp_path: Path) -> None:
    from test_elfcore import make_core, note, rnd
    core = make_core(tmp_path / "g.core", [(0x100000, rnd(4096, 1), 4096)], paddr=True,
                     notes=note(b"QEMU", 0, bytes(8)))
    before = core.read_bytes()
    one_error_line(uffdpy("convert", core, "-o", core), str(core), "input")
    assert core.read_bytes() == before


def test_convert_of_a_huge_physical_address_is_refused_before_writing(tmp_path: Path) -> None:
    from test_elfcore import make_core, note, rnd
    core = make_core(tmp_path / "far.core", [(1 << 50, rnd(4096, 1), 4096)], paddr=True,
                     notes=note(b"QEMU", 0, bytes(8)))
    out = tmp_path / "out" / "far.img"
    out.parent.mkdir()
    line = one_error_line(uffdpy("convert", core, "-o", out, timeout=60), str(core))
    assert "machine's memory" in line and "--layout regions" in line, line
    assert list(out.parent.iterdir()) == []
    near = make_core(tmp_path / "near.core", [(0x100000, rnd(4096, 1), 4096)], paddr=True,
                     notes=note(b"QEMU", 0, bytes(8)))
    line = one_error_line(uffdpy("convert", near, "-o", out, "--ram-size", "64T", timeout=60))
    assert "machine's memory" in line and "smaller --ram-size" in line, line
    assert list(out.parent.iterdir()) == []


def test_make_larger_than_the_machine_is_refused(tmp_path: Path) -> None:
    line = one_error_line(uffdpy("make", tmp_path / "x.img", "--size", "64T", timeout=60))
    assert "machine's memory" in line, line
    assert list(tmp_path.iterdir()) == []


def test_make_and_convert_keep_the_loaders_memory_limit(tmp_path: Path, monkeypatch: Any) -> None:
    """$UFFDPY_MAX_MEMORY bounds what make and convert write as it bounds what loads."""
    from test_elfcore import make_core, note, rnd
    monkeypatch.setenv("UFFDPY_MAX_MEMORY", "1M")
    line = one_error_line(uffdpy("make", tmp_path / "x.img", "--size", "4M", timeout=60))
    assert "$UFFDPY_MAX_MEMORY" in line, line
    core = make_core(tmp_path / "c.core", [(0x100000, rnd(4096, 1), 4096)], paddr=True,
                     notes=note(b"QEMU", 0, bytes(8)))
    line = one_error_line(uffdpy("convert", core, "-o", tmp_path / "c.img", "--ram-size", "4M",
                                 timeout=60), str(core))
    assert "$UFFDPY_MAX_MEMORY" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.core"]
    monkeypatch.setenv("UFFDPY_MAX_MEMORY", "8M")
    assert uffdpy("make", tmp_path / "x.img", "--size", "4M", timeout=60).returncode == 0


@pytest.fixture
def small_fs(tmp_path: Path) -> Path:
    """A 1 MiB tmpfs, unmounted afterwards (needs root)."""
    where = tmp_path / "small"
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True, timeout=30)


@pytest.mark.kernel
@pytest.mark.parametrize("command", ["make", "dump", "convert", "rewrite"])
def test_enospc_leaves_no_partial_output(small_fs: Path, synth: Path, tmp_path: Path,
                                         command: str) -> None:
    out = small_fs / "out.img"
    if command == "make":
        one_error_line(uffdpy("make", out, "--size", "8M", "--fill", "1"), "space")
    elif command == "dump":
        one_error_line(uffdpy("dump", synth, "ram", "-o", out), "space")
    elif command == "convert":
        from test_elfcore import make_core, note, rnd
        core = make_core(tmp_path / "big.core", [(0, rnd(4 * MiB, 2), 4 * MiB)], paddr=True,
                         notes=note(b"QEMU", 0, bytes(8)))
        one_error_line(uffdpy("convert", core, "-o", out), "space")
    else:
        from uffdpy.mappedram import rewrite_snapshot
        with pytest.raises(OSError) as info:
            rewrite_snapshot(synth, out, {})
        assert info.value.errno == 28
    assert list(small_fs.iterdir()) == []


# ---------------------------------------------------------------- E: a closed output pipe

@pytest.mark.parametrize("json_flag", [["--json"], []])
def test_closed_pipe_exits_quietly(tmp_path: Path, json_flag: List[str]) -> None:
    """``uffdpy inspect X | head -c 10``: status 141 (as SIGPIPE), nothing on stderr."""
    from uffdpy.mappedram import write_snapshot
    many = tmp_path / "many.img"          # ~1 MB of output: far more than a pipe holds
    write_snapshot(many, [(f"block{i}", 4096) for i in range(4000)])
    proc = subprocess.Popen([sys.executable, "-m", "uffdpy", "inspect", *json_flag, many],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(10)
    proc.stdout.close()                   # the reader is gone before most of the output
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141, err
    assert err == b"", err


# ------------------------------------------------------------- F, H: arguments checked early

@pytest.mark.parametrize("words,complaint", [
    (["--threads", "0"], "--threads"),
    (["--touch", "-5"], "--touch"),
    (["--prefetch-chunk", "0"], "--prefetch-chunk"),
    (["--prefetch-threads", "0"], "--prefetch-threads"),
    (["--mode", "eager", "--server", "process"], "--server"),
    (["--mode", "eager", "--no-prefetch"], "--no-prefetch"),
    (["--server-cpu", "99999"], "CPU 99999 does not exist"),
    (["--access-cpu", "99999"], "CPU 99999 does not exist"),
])
def test_bad_load_arguments_are_usage_errors(synth: Path, words: List[str],
                                             complaint: str) -> None:
    proc = uffdpy("load", synth, *words, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.startswith("usage: "), proc.stderr
    assert complaint in proc.stderr.splitlines()[-1], proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("words", [["make", "x.img", "--fill", "1.5"],
                                   ["make", "x.img", "--size", "1000"],
                                   ["bench", "x.img", "--rounds", "0"]])
def test_bad_make_and_bench_arguments_are_usage_errors(tmp_path: Path, words: List[str]) -> None:
    proc = uffdpy(*words, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: "), proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path: Path) -> None:
    proc = uffdpy("inspect", tmp_path / "missing.img", "--debug", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("uffdpy: error: "), proc.stderr


# ------------------------------------------------- G, H: what reaches the terminal, and how

def test_control_characters_in_names_are_escaped(tmp_path: Path) -> None:
    from uffdpy.mappedram import write_snapshot
    image = tmp_path / "esc.img"
    write_snapshot(image, [("ram\x1b[2J\x1bc", 4096), ("two\nlines", 8192)])
    proc = uffdpy("inspect", image, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout, proc.stdout
    assert "ram\\x1b[2J\\x1bc" in proc.stdout and "two\\nlines" in proc.stdout, proc.stdout
    assert "4.0 KiB" in proc.stdout and "8.0 KiB" in proc.stdout, proc.stdout


def test_an_error_is_always_one_line(tmp_path: Path) -> None:
    odd = tmp_path / "two\nlines\x1b[2J.img"
    line = one_error_line(uffdpy("inspect", odd, timeout=60), "No such file")
    assert "\x1b" not in line and "two\\nlines\\x1b[2J.img" in line, line


def test_empty_file_says_so(tmp_path: Path) -> None:
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    one_error_line(uffdpy("inspect", empty, timeout=60), str(empty), "the file is empty")


def test_unknown_magic_names_both_formats(tmp_path: Path) -> None:
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"\x7fELG" + bytes(60))
    line = one_error_line(uffdpy("inspect", bad, timeout=60), str(bad))
    assert "ELF" in line and "QEMU migration stream" in line and "7f 45 4c 47" in line, line


# --------------------------------------------- uffdpy's errors are one line; its bugs are not

def test_an_unknown_region_is_one_named_line(synth: Path, tmp_path: Path) -> None:
    from uffdpy.mappedram import Snapshot
    from uffdpy.pagesource import RegionNotFound
    line = one_error_line(uffdpy("dump", synth, "nosuch", "-o", tmp_path / "x.raw"),
                          "no RAMBlock named 'nosuch'", "blocks: ram")
    assert not line.startswith('uffdpy: error: "'), line     # the message, not a KeyError repr
    assert list(tmp_path.iterdir()) == []
    with Snapshot.open(synth) as snap, pytest.raises(KeyError) as info:
        snap.block("nosuch")                                  # still a KeyError for callers
    assert isinstance(info.value, RegionNotFound)


def test_a_bug_in_uffdpy_shows_its_traceback(synth: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only uffdpy's own errors, bad values and OSErrors become one line."""
    from uffdpy import cli
    from uffdpy.cli import app as cli_main

    def broken(args: object) -> int:
        raise TypeError("a bug")
    monkeypatch.setattr(cli_main, "COMMANDS", tuple(
        c.replace(run=broken) if c.name == "inspect" else c
        for c in cli.COMMANDS))
    with pytest.raises(TypeError, match="a bug"):
        cli.main(["inspect", str(synth)])


@pytest.mark.kernel
@pytest.mark.parametrize("server", ["thread", "process"])
def test_verify_completes_a_load_without_prefetch(synth: Path, server: str) -> None:
    """--no-prefetch --verify: reading every page placed every page, so the load is complete."""
    proc = uffdpy("load", synth, "--no-prefetch", "--verify", "--server", server, "--json",
                  timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["mismatched_pages"] == 0
    assert report["placed_pages"] == report["total_pages"] > 0
    assert report["complete"] is True


def test_every_option_has_help_text() -> None:
    """`uffdpy COMMAND --help` explains every argument of every command."""
    import argparse
    from uffdpy import cli
    missing = []

    def walk(parser: argparse.ArgumentParser, where: List[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, where + [name])
            elif action.help is None:
                missing.append(f"{' '.join(where)} {action.option_strings or action.dest}")
    walk(cli.build_parser(), ["uffdpy"])
    assert missing == [], missing
