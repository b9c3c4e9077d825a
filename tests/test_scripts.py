"""Every script in ``scripts/`` runs in its quickest mode, so none rots.

Each runs as a subprocess under a timeout; exit status 0 and the key lines of
its output are checked.  Scripts that need QEMU are marked ``qemu``.  A new
script must be added here: ``test_every_script_is_run`` fails until it is.
"""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Sequence

import pytest

from helpers import HAVE_INTERPRETERS  # noqa: E402  (tests/ is on sys.path)

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"

#: Every script and the test(s) below that run it.
COVERED = {
    "gil_deadlock.py", "bench_load.py", "teach_fault.py", "bench_fault.py",
    "qemu_snapshot.py", "linux_guest.py", "bench_resume.py", "picture_resume.py",
    "process_core.py",          # its CLI (--verify) runs in tests/test_elfcore.py
    "bench_answer.py",
}


def run_script(name: str, args: Sequence[object] = (), *, timeout: float = 120.0,
               cwd: Path = ROOT) -> str:
    """Run ``scripts/NAME ARGS``; insist on exit status 0; return stdout."""
    proc = subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, (
        f"{name} {' '.join(map(str, args))} exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc.stdout


def test_every_script_is_run() -> None:
    present = {p.name for p in SCRIPTS.glob("*.py")}
    assert present - COVERED == set(), "add a quick run of these scripts to tests/test_scripts.py"


@pytest.mark.parametrize("name", sorted(COVERED))
def test_script_has_docstring(name: str) -> None:
    path = SCRIPTS / name
    if not path.exists():
        pytest.fail(f"scripts/{name} is missing")
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and len(doc.splitlines()) >= 3, f"scripts/{name} needs a docstring saying what it shows"


@pytest.mark.kernel
def test_gil_deadlock_quick() -> None:
    out = run_script("gil_deadlock.py", ["--quick"], timeout=90)
    assert "deadlocked as expected" in out
    # memmove/thread, plain/process, and on 3.13+ plain/interpreter
    assert out.count("matches the snapshot") == (3 if HAVE_INTERPRETERS else 2)
    assert "-> ok in" in out and "unexpectedly" not in out


@pytest.mark.kernel
def test_teach_fault_quick() -> None:
    out = run_script("teach_fault.py", ["--quick"], timeout=60)
    assert "registered the range in MISSING mode" in out
    assert "PAGEFAULT at 0x" in out
    assert "UFFDIO_COPY(" in out and "returned 4096" in out
    assert "the toucher read b'hello from the f'" in out
    assert "with 0 new fault(s)" in out


@pytest.mark.kernel
def test_bench_load_quick_no_qemu() -> None:
    out = run_script("bench_load.py", ["--quick", "--no-qemu"], timeout=120)
    assert "eager (QEMU-style pread, THP)" in out
    assert "lazy, thread server, prefetch only" in out
    assert "lazy, process server, prefetch only" in out
    assert "QEMU 10 migrate-incoming" not in out
    assert "fault service, prefetch off" in out
    from uffdpy.harness.bench import PLACEMENTS
    for _, label, server, *_ in PLACEMENTS:
        row = next(line for line in out.splitlines() if line.startswith(label))
        faults = int(row[len(label):].split()[0])
        assert faults == 200, row                  # every distinct page touched was a fault
    assert ("interpreter server, other CPU, busy-poll" in out) == HAVE_INTERPRETERS


@pytest.mark.kernel
def test_bench_load_make_synthetic_json(tmp_path: Path) -> None:
    snap = tmp_path / "made.img"
    out = run_script("bench_load.py", [snap, "--make-synthetic", "16M", "--fill", "0.25",
                                       "--rounds", "1", "--touch", "100", "--no-qemu", "--json"],
                     timeout=120)
    assert snap.exists()
    report = json.loads(out)
    assert report["size_mib"] == 16 and report["rounds"] == 1
    assert report["results"]["eager (QEMU-style pread, THP)"]["complete_s"] > 0
    service = report["fault_service"]
    assert set(service) >= {"same", "poll", "busy", "proc-same", "proc-poll", "proc-busy"}
    for key, figures in service.items():
        assert figures["faults"] == figures["data_pages"] + figures["zero_pages"] == 100, key
        assert figures["data_p50_us"] > 0 and figures["zero_p50_us"] > 0, key
    if shutil.which("cc"):                         # the C reference ran beside every row
        assert set(report["reference"]) == {f"{k}/{op}" for k in service
                                            for op in ("copy", "zeropage")}


@pytest.mark.kernel
@pytest.mark.qemu
def test_bench_load_quick_with_qemu(qemu_binary: str) -> None:
    out = run_script("bench_load.py", ["--quick"], timeout=120)
    assert "QEMU 10 migrate-incoming (mapped-ram)" in out
    assert "not measured" not in out


@pytest.mark.kernel
def test_bench_fault_quick() -> None:
    if not (SCRIPTS / "bench_fault.py").exists():
        pytest.fail("scripts/bench_fault.py is missing")
    out = run_script("bench_fault.py", ["--quick"], timeout=180)
    for row in ("COPY", "ZEROPAGE", "same CPU, poll", "other CPU, poll", "bulk COPY per call"):
        assert row in out, row
    assert ("subinterpreter: other CPU, busy" in out) == HAVE_INTERPRETERS


def test_bench_answer_quick(tmp_path: Path) -> None:
    from uffdpy.harness.synthetic import make_synthetic
    snap = tmp_path / "s.img"
    make_synthetic(snap, size=16 << 20, fill=0.5, seed=3)
    out = run_script("bench_answer.py", [snap, "--requests", "40", "--rounds", "1",
                                         "--interval-ms", "0.5"], timeout=120)
    rows = {line.split()[0] for line in out.splitlines()[2:] if line.strip()}
    assert {"uffdpy", "least"} <= rows, out
    assert ("C" in rows) if shutil.which("cc") else "(no C row: no C compiler" in out, out


def test_bench_answer_destination_refuses_a_wrong_answer(tmp_path: Path) -> None:
    """The benchmark's destination checks each answer against the file: one page
    off, and it fails (so a figure never comes from answers that are wrong)."""
    import os
    import struct
    from uffdpy.harness.bench_answer import FakeDestination
    from uffdpy.harness.synthetic import make_synthetic
    from uffdpy.mappedram import Snapshot
    path = tmp_path / "s.img"
    make_synthetic(path, size=8 << 20, fill=0.5, seed=4)
    with Snapshot.open(str(path)) as snap:
        block = max(snap.blocks, key=lambda b: b.length)
        data = [f + k for f, n, present in block.runs() if present for k in range(n)]
        for wrong in (False, True):
            pages = data[:3]
            dest = FakeDestination(snap, block, pages, 0.001)
            try:
                for page in pages:
                    dest.requests.recv(1 << 16)
                    sent = page + 1 if wrong and page == pages[-1] else page
                    dest.answers.sendall(struct.pack(">Q", page * 4096 | 0x28) + os.pread(
                        snap.fileno(), 4096, block.pages_offset + sent * 4096))
            finally:
                right = dest.wait()
            assert right != wrong


def test_qemu_snapshot_help() -> None:
    out = run_script("qemu_snapshot.py", ["--help"], timeout=60)
    assert "save" in out and "load" in out


@pytest.mark.qemu
def test_qemu_snapshot_save_and_load(qemu_binary: str, tmp_path: Path) -> None:
    """The script's quickest real use: save a tiny -machine none VM, load it back."""
    img, pmem, loaded = tmp_path / "vm.img", tmp_path / "vm.pmem", tmp_path / "loaded.pmem"
    common = ["--machine", "none", "--mem", "16M", "--qemu", qemu_binary, "--timeout", "60"]
    saved = json.loads(run_script("qemu_snapshot.py",
                                  ["save", img, *common, "--random", "0x1000:0x2000:3",
                                   "--pmemsave", pmem], timeout=120, cwd=tmp_path))
    assert saved["query-migrate"]["status"] == "completed"
    back = json.loads(run_script("qemu_snapshot.py", ["load", img, *common, "--pmemsave", loaded],
                                 timeout=120, cwd=tmp_path))
    assert back["query-migrate"]["status"] == "completed"
    assert loaded.read_bytes() == pmem.read_bytes()
    assert pmem.read_bytes()[0x1000:0x3000] != bytes(0x2000)


def test_linux_guest_help() -> None:
    out = run_script("linux_guest.py", ["--help"], timeout=60)
    assert "--fill-mib" in out and "--pmemsave" in out


@pytest.mark.qemu
def test_bench_resume_one_round_synthetic(qemu_binary: str, tmp_path: Path) -> None:
    """One round of every contender on a -machine none snapshot (no guest, no request port)."""
    from uffdpy.harness.synthetic import make_synthetic
    snap = tmp_path / "s.img"
    make_synthetic(snap, size=16 << 20, fill=0.3, seed=4)
    out = run_script("bench_resume.py", [snap, "--rounds", "1", "--no-request", "--qemu",
                                         qemu_binary, "--qemu-args",
                                         "-machine none -m 16M -nodefaults -display none"],
                     timeout=240)
    assert "QEMU's own load" in out and "uffdpy resume --no-preempt" in out


@pytest.mark.qemu
def test_picture_resume_of_the_guest(guest: Dict[str, Any], qemu_binary: str,
                                     tmp_path: Path) -> None:
    """The README's picture, made from a real resume of the request-serving guest."""
    import json
    import shlex
    png, run = tmp_path / "resume.png", tmp_path / "run.json"
    out = run_script("picture_resume.py", [
        guest["snapshot"], "-o", png, "--json", run, "--qemu", qemu_binary,
        "--qemu-args", shlex.join([*guest["qemu_args"], "-serial", "null"])], timeout=240)
    assert "answered 'OK 0 4 " in out, out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(run.read_text())
    assert report["answer"].startswith("OK 0 4 ") and report["answer_s"] > 0
    assert report["trace"]["rows"]
