"""Working sets: the file format (pure), and record/replay on the real request-serving guest.

The QEMU tests resume conftest's Linux guest (TCG) into a real QEMU 10 with a
private destination (killed by pid at the end), send the same request as a
warmed-up function would get, and compare what a recording changes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest

from uffdpy.harness import linuxguest
from helpers import LAZY_SERVERS, eventually
from uffdpy.mappedram import Snapshot
from uffdpy.harness.synthetic import make_synthetic
from uffdpy.resume import QemuProcess, Resume
from uffdpy.workingset import WorkingSet, WorkingSetError, jaccard, merge, snapshot_identity

from conftest import LINUX_GUEST_SEED, ROOT  # noqa: E402

pytestmark = pytest.mark.timeout(300)


# ------------------------------------------------------------------ the file (pure)

@pytest.fixture
def synth(tmp_path: Path) -> Tuple[Path, Path]:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_synthetic(a, size=4 << 20, fill=0.5, seed=1)
    make_synthetic(b, size=4 << 20, fill=0.5, seed=2)
    return a, b


def test_round_trip_merge_and_jaccard(synth: Tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = synth
    with Snapshot.open(a) as snap:
        ident = snapshot_identity(snap)
        one = WorkingSet(ident, [("ram", 5, 0.001, True), ("ram", 9, 0.002, False)])
        two = WorkingSet(ident, [("ram", 9, 0.0005, False), ("ram", 7, 0.003, True)])
        one.save(tmp_path / "one.ws")
        back = WorkingSet.load(tmp_path / "one.ws")
        assert back.pages == one.pages and back.snapshot == ident
        back.check(snap)
        assert jaccard(one, two) == pytest.approx(1 / 3)
        both = merge([one, two])
        assert both.keys() == [("ram", 9), ("ram", 5), ("ram", 7)]     # by first demand
        assert both.data_pages == 2
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".ws-")]   # no temporaries


def test_another_snapshot_is_refused(synth: Tuple[Path, Path], tmp_path: Path) -> None:
    a, b = synth
    with Snapshot.open(a) as snap:
        WorkingSet(snapshot_identity(snap), [("ram", 1, 0.0, True)]).save(tmp_path / "a.ws")
    with Snapshot.open(b) as other:
        with pytest.raises(WorkingSetError, match="recorded for another snapshot"):
            WorkingSet.load(tmp_path / "a.ws").check(other, "a.ws")


@pytest.mark.parametrize("content, message", [
    (b"", "bad JSON"),
    (b'{"format": "uffdpy-working-set", "version": 1, "snapshot": {"blocks": [["ram", 8192]], '
     b'"digest": "x"}, "pages": [["ram", 2, 0.0, true]]}', "outside the recorded blocks"),
    (b'{"format": "uffdpy-working-set", "version": 2}', "version 2"),
    (b'{"format": "something else"}', "not a working-set file"),
    (b'{"format": "uffdpy-working-set", "version": 1, "snapshot": {"blocks": [["ram", 8192]], '
     b'"digest": "x"}, "pages": [["ram", 1, 0.0, true], ["ram", 1, 0.1, true]]}', "repeats"),
    (b'{"format": "uffdpy-working-set", "version": 1, "snapshot": {"blocks": [["ram", 8192]], '
     b'"digest": "x"}, "pages": [["ram", "1", 0.0, true]]}', "malformed"),
])
def test_malformed_files_give_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.ws"
    path.write_bytes(content)
    with pytest.raises(WorkingSetError, match=message) as info:
        WorkingSet.load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_truncated_recording_is_refused(synth: Tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = synth
    with Snapshot.open(a) as snap:
        WorkingSet(snapshot_identity(snap), [("ram", i, i / 1e3, True) for i in range(50)]).save(
            tmp_path / "w.ws")
    data = (tmp_path / "w.ws").read_bytes()
    (tmp_path / "cut.ws").write_bytes(data[:len(data) // 2])
    with pytest.raises(WorkingSetError, match="bad JSON"):
        WorkingSet.load(tmp_path / "cut.ws")


# ------------------------------------------------------------------ on the real guest

def _resume_and_ask(guest: Dict[str, Any], tmp: str, *, qemu: str, paused: bool = False,
                    **options: Any) -> Tuple[Dict[str, Any], QemuProcess]:
    """Resume into a fresh QEMU, ask the guest once; returns figures and the live QEMU."""
    req = os.path.join(tmp, "req.sock")
    if os.path.exists(req):
        os.unlink(req)
    proc = QemuProcess([qemu, *linuxguest.destination_args(guest, req)], paused=paused)
    try:
        background = options.pop("background", True)
        with Resume(guest["snapshot"], qmp=proc.qmp_path, background=background,
                    **options) as r:
            out: Dict[str, Any] = {}
            if not paused:
                assert r.running_after(10) is not None
                answer = linuxguest.ask(req, 0, 4, timeout=60)
                assert answer == linuxguest.expected_answer(LINUX_GUEST_SEED, 0, 4)
                out["requests_before_answer"] = r.stats.page_requests
            if not background:
                r.start_background()
            out["stats"] = r.wait(60).as_dict()
        return out, proc
    except BaseException:
        proc.kill()
        raise


@pytest.mark.qemu
def test_record_is_stable_and_replay_cuts_requests(guest: Dict[str, Any], qemu_binary: str,
                                                   short_tmp: str, tmp_path: Path) -> None:
    recordings = []
    for i in range(2):
        path = tmp_path / f"rec{i}.ws"
        _, proc = _resume_and_ask(guest, short_tmp, qemu=qemu_binary, background=False,
                                  fault_around_pages=0, record_ws=path)
        proc.kill()
        recordings.append(WorkingSet.load(path))
    first, second = recordings
    assert len(first.pages) > 100 and first.data_pages > 50
    assert jaccard(first, second) > 0.5
    with Snapshot.open(guest["snapshot"]) as snap:
        first.check(snap)
    plain, proc = _resume_and_ask(guest, short_tmp, qemu=qemu_binary)
    proc.kill()
    replay, proc = _resume_and_ask(guest, short_tmp, qemu=qemu_binary,
                                   working_set=tmp_path / "rec0.ws")
    proc.kill()
    # every recorded page goes first, but one the guest requests before the
    # working-set stream reaches it is sent as a request (each page once)
    sent = replay["stats"]["pages_working_set"]
    assert 0.95 * len(first.pages) <= sent <= len(first.pages), (sent, len(first.pages))
    assert replay["requests_before_answer"] <= 0.2 * plain["requests_before_answer"], (
        replay["requests_before_answer"], plain["requests_before_answer"])


@pytest.mark.qemu
@pytest.mark.parametrize("placement", ["after-run", "before-run"])
def test_replay_keeps_ram_byte_exact(guest: Dict[str, Any], qemu_binary: str, short_tmp: str,
                                     tmp_path: Path, placement: str) -> None:
    """With -S: the working set's pages (precopy, or streamed first) and the rest, each once."""
    from conftest import Destination
    from test_resume import assert_ram_equals
    with Snapshot.open(guest["snapshot"]) as snap:
        block = snap.block("pc.ram")
        pages = [("pc.ram", i, i / 1e4, bool(block.is_present(i)))
                 for i in range(256, 256 + 3000, 3)]
        WorkingSet(snapshot_identity(snap), pages).save(tmp_path / "w.ws")
    req = os.path.join(short_tmp, "req.sock")
    dst = Destination(qemu_binary, linuxguest.destination_args(guest, req), paused=True)
    try:
        with Resume(guest["snapshot"], qmp=dst.uffdpy_sock, working_set=tmp_path / "w.ws",
                    ws_placement=placement) as r:
            stats = r.wait(60)
        assert stats.pages_working_set == len(pages)
        assert stats.data_pages_sent == stats.data_pages
        assert_ram_equals(guest["snapshot"], dst.resave(tmp_path / "again.img"))
    finally:
        dst.close()


@pytest.mark.qemu
def test_recording_of_another_snapshot_refused_before_sending(
        guest: Dict[str, Any], qemu_binary: str, short_tmp: str, tmp_path: Path) -> None:
    other = tmp_path / "other.img"
    make_synthetic(other, size=4 << 20, fill=0.5, seed=3)
    with Snapshot.open(other) as snap:
        WorkingSet(snapshot_identity(snap), [("ram", 1, 0.0, True)]).save(tmp_path / "o.ws")
    req = os.path.join(short_tmp, "req.sock")
    proc = QemuProcess([qemu_binary, *linuxguest.destination_args(guest, req)], paused=True)
    try:
        with pytest.raises(WorkingSetError, match="another snapshot"):
            Resume(guest["snapshot"], qmp=proc.qmp_path, working_set=tmp_path / "o.ws")
        from uffdpy.qmp import QmpClient
        with QmpClient(proc.qmp_path, timeout=30) as qmp:
            assert qmp.call("query-migrate").get("status", "none") == "none"
    finally:
        proc.kill()


# ------------------------------------------------------------------ the picture

def _png_size(path: Path) -> Tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.qemu
def test_plot_of_a_real_run(guest: Dict[str, Any], qemu_binary: str, short_tmp: str,
                            tmp_path: Path) -> None:
    import matplotlib  # noqa: F401  (the test extra installs it: no skip)
    from uffdpy.harness.plot import load_run, plot_run
    req = os.path.join(short_tmp, "req.sock")
    proc = QemuProcess([qemu_binary, *linuxguest.destination_args(guest, req)], paused=False)
    try:
        with Resume(guest["snapshot"], qmp=proc.qmp_path, trace=True) as r:
            assert r.running_after(10) is not None
            linuxguest.ask(req, 0, 2, timeout=60)
            r.wait(60)
            report = r.report(answer_s=0.5)
    finally:
        proc.kill()
    kinds = {row[3] for row in report["trace"]["rows"]}
    assert {"request", "stream"} <= kinds
    assert len(report["trace"]["rows"]) >= report["data_pages"]
    (tmp_path / "run.json").write_text(json.dumps(report))
    plot_run(load_run(tmp_path / "run.json"), tmp_path / "run.png", width_px=800, height_px=500)
    assert _png_size(tmp_path / "run.png") == (800, 500)


def test_plot_without_matplotlib_says_how_to_install(tmp_path: Path) -> None:
    run = {"stats": {}, "trace": {"blocks": [["ram", 8192]], "rows": [[0.0, "ram", 0, "stream"]]}}
    (tmp_path / "run.json").write_text(json.dumps(run))
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from uffdpy.harness.plot import plot_run, load_run, PlotUnavailable\n"
            f"try:\n    plot_run(load_run({str(tmp_path / 'run.json')!r}), "
            f"{str(tmp_path / 'x.png')!r})\n"
            "except PlotUnavailable as e:\n    print(e)\n")
    import sys
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))
    assert "pip install 'uffdpy[plot]'" in out.stdout, out
    assert not (tmp_path / "x.png").exists()


def test_plot_refuses_a_run_without_trace(tmp_path: Path) -> None:
    from uffdpy.harness.plot import load_run
    (tmp_path / "run.json").write_text(json.dumps({"page_requests": 3}))
    with pytest.raises(ValueError, match="no per-page trace"):
        load_run(tmp_path / "run.json")


# ------------------------------------------------------------------ the command line

@pytest.mark.qemu
def test_cli_record_inspect_plot_and_replay(guest: Dict[str, Any], qemu_binary: str,
                                            short_tmp: str, tmp_path: Path) -> None:
    """resume --record-ws --trace, inspect FILE.ws, plot, resume --working-set: one sitting."""
    from conftest import Destination
    from helpers import popen_uffdpy, run_uffdpy
    from test_resume import data_pages_sent, guest_args
    args, req = guest_args(guest, short_tmp)
    rec, run, png = tmp_path / "rec.ws", tmp_path / "run.json", tmp_path / "run.png"
    dst = Destination(qemu_binary, args, paused=False)
    try:
        # demand paging for the first seconds (REAP's recording), then the stream
        proc = popen_uffdpy("resume", guest["snapshot"], "--qmp", dst.uffdpy_sock, "--json",
                            "--trace", "--fault-around", "0", "--background-delay", "3",
                            "--record-ws", rec)
        try:
            dst.qmp.wait_event("RESUME", timeout=60)   # bytes sent before RUN are lost
            assert linuxguest.ask(req, 0, 4, timeout=60) == linuxguest.expected_answer(
                LINUX_GUEST_SEED, 0, 4)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
    finally:
        dst.close()
    info = json.loads(out)
    assert info["working_set_recorded"] == str(rec)
    assert data_pages_sent(info) == info["data_pages"]
    assert info["trace"]["rows"] and info["trace"]["columns"] == ["t_s", "block", "page", "by"]
    run.write_text(out)

    shown = json.loads(run_uffdpy("inspect", rec, "--against", rec, "--json").stdout)
    recorded = WorkingSet.load(rec)
    assert shown["pages"] == len(recorded.pages) > 100
    assert shown["data_pages"] == recorded.data_pages and shown["jaccard"] == {str(rec): 1.0}
    table = run_uffdpy("inspect", rec)
    assert table.returncode == 0 and "data pages" in table.stdout, table.stderr

    drawn = run_uffdpy("plot", run, "-o", png, "--width", "800", "--height", "500")
    assert drawn.returncode == 0, drawn.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    if os.path.exists(req):
        os.unlink(req)
    dst = Destination(qemu_binary, args, paused=False)   # killed by pid whatever happens
    try:
        replay = run_uffdpy("resume", guest["snapshot"], "--qmp", dst.uffdpy_sock, "--json",
                            "--working-set", rec)
    finally:
        dst.close()
    assert replay.returncode == 0, replay.stderr
    again = json.loads(replay.stdout)
    assert 0.95 * len(recorded.pages) <= again["pages_working_set"] <= len(recorded.pages)
    assert data_pages_sent(again) == again["data_pages"]


def test_cli_working_set_errors(synth: Tuple[Path, Path], tmp_path: Path) -> None:
    from helpers import one_line_error, run_uffdpy
    a, b = synth
    with Snapshot.open(a) as snap:
        WorkingSet(snapshot_identity(snap), [("ram", 1, 0.0, True)]).save(tmp_path / "a.ws")
    # another snapshot's recording: refused before any QEMU starts or anything is sent
    line = one_line_error(run_uffdpy("resume", b, "--working-set", tmp_path / "a.ws",
                                     "--connect", "unix:/nonexistent/x.sock"))
    assert "another snapshot" in line, line
    cut = tmp_path / "cut.ws"
    cut.write_bytes((tmp_path / "a.ws").read_bytes()[:40])
    assert "bad JSON" in one_line_error(run_uffdpy("inspect", cut))
    assert "bad JSON" in one_line_error(run_uffdpy("resume", a, "--working-set", cut,
                                                   "--connect", "unix:/nonexistent/x.sock"))
    assert "--trace" in one_line_error(run_uffdpy("resume", a, "--trace",
                                                  "--connect", "unix:/x"))
    assert "--working-set" in one_line_error(run_uffdpy("resume", a, "--ws-placement",
                                                        "before-run", "--connect", "unix:/x"))
    assert "applies to working-set files" in one_line_error(
        run_uffdpy("inspect", a, "--against", tmp_path / "a.ws"))
    merged = run_uffdpy("ws", "merge", tmp_path / "a.ws", tmp_path / "a.ws", "-o",
                        tmp_path / "m.ws")
    assert merged.returncode == 0, merged.stderr
    assert WorkingSet.load(tmp_path / "m.ws").keys() == [("ram", 1)]


# ------------------------------------------------------------------ the loader's

def _load_json(*args: object) -> Dict[str, Any]:
    from helpers import run_uffdpy
    proc = run_uffdpy("load", *args, "--json", timeout=240)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.kernel
@pytest.mark.parametrize("server", LAZY_SERVERS)
def test_load_record_and_replay_cut_faults(tmp_path: Path, server: str) -> None:
    """A hot-set workload recorded with pure demand paging; replayed, the same workload
    (same seed) finds its pages already placed by the prefetcher's first phase."""
    from uffdpy.loader import LazyLoader
    from uffdpy.harness.workload import run_access
    image, ws = tmp_path / "hot.img", tmp_path / "hot.ws"
    make_synthetic(image, size=128 << 20, fill=0.5, seed=2)
    access = ["--access", "hot:0.02", "--touch", "2000", "--seed", "5", "--server", server]
    recorded = _load_json(image, "--no-prefetch", *access, "--record-ws", ws)
    rec = WorkingSet.load(ws)
    with Snapshot.open(image) as snap:
        rec.check(snap)
        assert all(snap.block(b).is_present(p) == data for b, p, _, data in rec.pages)
        assert len(rec.pages) == recorded["placed_pages"] == recorded["faults"] > 200
        assert [t for _, _, t, _ in rec.pages] == sorted(t for _, _, t, _ in rec.pages)
        # replayed with one prefetch lane: the recording's pages come first, all of them
        with LazyLoader(snap, server=server, working_set=ws, prefetch_threads=1) as loader:
            eventually(lambda: loader.stats.pages_by_working_set >= len(rec.pages), 60)
            assert loader.stats.pages_by_working_set == len(rec.pages)
            blocks = [(loader.address(r.name), r) for r in snap.regions]
            run_access(blocks, pattern="hot", fraction=0.02, touches=2000, seed=5)
            assert loader.wait(60)
            assert loader.stats.faults <= 0.05 * len(rec.pages), loader.stats.faults
    # and from the command line, racing the workload: the pages still go first, once
    replay = _load_json(image, *access, "--working-set", ws, "--verify")
    assert replay["mismatched_pages"] == 0 and replay["double_placements"] == 0
    assert 0 < replay["pages_by_working_set"] <= len(rec.pages)
    assert replay["placed_pages"] == replay["total_pages"]


@pytest.mark.kernel
def test_load_refuses_another_images_working_set(synth: Tuple[Path, Path], tmp_path: Path) -> None:
    from helpers import resources
    from uffdpy.loader import LazyLoader
    a, b = synth
    with Snapshot.open(a) as snap:
        WorkingSet(snapshot_identity(snap), [("ram", 1, 0.0, True)]).save(tmp_path / "a.ws")
    before = resources()
    with pytest.raises(WorkingSetError, match="another snapshot"):
        LazyLoader(str(b), working_set=tmp_path / "a.ws")
    assert resources()[0] == before[0]
    with pytest.raises(ValueError, match="record_ws"):
        with LazyLoader(str(a), prefetch=False) as loader:
            loader.recorded()


@pytest.mark.qemu
def test_record_ws_alone_records_the_whole_demand(guest: Dict[str, Any], qemu_binary: str,
                                                  short_tmp: str, tmp_path: Path) -> None:
    """``resume --record-ws FILE`` with no other flag: a replay leaves <= 10% of the requests."""
    from conftest import Destination
    rec = tmp_path / "rec.ws"
    req = os.path.join(short_tmp, "req.sock")
    dst = Destination(qemu_binary, linuxguest.destination_args(guest, req), paused=False)
    try:
        source = subprocess.Popen(
            [sys.executable, "-m", "uffdpy", "resume", guest["snapshot"], "--qmp",
             dst.uffdpy_sock, "--record-ws", str(rec), "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin=subprocess.DEVNULL)
        dst.qmp.wait_event("RESUME", timeout=30)
        assert linuxguest.ask(req, 0, 4, timeout=60) == linuxguest.expected_answer(
            LINUX_GUEST_SEED, 0, 4)
        out, err = source.communicate(timeout=120)       # completes: the stream came when idle
        assert source.returncode == 0, err
        assert "recording the guest's whole demand" in err
        assert json.loads(out)["pages_around"] == 0
    finally:
        dst.close()
    os.unlink(req)
    plain, proc = _resume_and_ask(guest, short_tmp, qemu=qemu_binary)
    proc.kill()
    os.unlink(req)
    replay, proc = _resume_and_ask(guest, short_tmp, qemu=qemu_binary, working_set=rec)
    proc.kill()
    assert plain["requests_before_answer"] > 50, plain
    assert replay["requests_before_answer"] <= 0.1 * plain["requests_before_answer"], (
        plain["requests_before_answer"], replay["requests_before_answer"])
