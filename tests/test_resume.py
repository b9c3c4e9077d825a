"""uffdpy.resume and ``uffdpy resume``: real guests resumed into a real, unmodified QEMU 10.

The stream's bytes are checked against the reference's verified dump; the
rest runs QEMU.  Snapshots are made by QEMU itself: the request-serving Linux
guest (conftest's ``guest``, TCG) and firmware-only ``pc`` and ``q35``
machines (TCG, so they hold no kvmclock).  Every destination gets two QMP
sockets, one for uffdpy and one for the test, and is killed by pid at the
end; every wait has a timeout.
"""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

from uffdpy.harness import linuxguest
from uffdpy import migstream as ms
from uffdpy.mappedram import Snapshot
from uffdpy.qmp import QmpClient
from uffdpy.resume import Resume

from conftest import LINUX_GUEST_SEED  # noqa: E402
from helpers import (one_line_error, popen_uffdpy, run_uffdpy, server_of,  # noqa: E402
                     uffdpy_cmd)

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ the stream's bytes

def test_stream_prefix_matches_the_verified_pc_vga_dump() -> None:
    """Items 1-9 for the reference's pc-vga guest, byte for byte (postcopy-stream.md §2.6)."""
    blocks = [("pc.ram", 0x4000000), ("0000:00:02.0/vga.vram", 0x1000000),
              ("/rom@etc/acpi/tables", 0x20000), ("pc.bios", 0x40000), ("pc.rom", 0x20000),
              ("0000:00:02.0/vga.rom", 0x10000), ("/rom@etc/table-loader", 0x1000),
              ("/rom@etc/acpi/rsdp", 0x1000)]
    stream = b"".join([
        ms.header(), ms.configuration("pc-i440fx-10.0"), ms.open_return_path(), ms.ping(1),
        ms.postcopy_advise(0x1000, 0x1000), ms.ram_start(1, blocks), ms.switchover_start(),
        ms.postcopy_ram_discard("pc.ram", [(0, 0x1000)]), ms.ping(2)])
    assert len(stream) == 0x14F                                   # 335 bytes
    head = bytes.fromhex("""
        51 45 56 4d 00 00 00 03 07 00 00 00 0e 70 63 2d
        69 34 34 30 66 78 2d 31 30 2e 30 08 00 01 00 00
        08 00 02 00 04 00 00 00 01 08 00 03 00 10 00 00
        00 00 00 00 10 00 00 00 00 00 00 00 10 00 01 00
        00 00 01 03 72 61 6d 00 00 00 00 00 00 00 04 00
        00 00 00 05 09 20 04 06 70 63 2e 72 61 6d 00 00
        00 00 04 00 00 00 15 30 30 30 30 3a 30 30 3a 30""")
    tail = bytes.fromhex("""
        00 00 00 00 10 00 00 00 00 00 00 00 00 10 7e 00
        00 00 01 08 00 0b 00 00 08 00 06 00 19 00 06 70
        63 2e 72 61 6d 00 00 00 00 00 00 00 00 00 00 00
        00 00 00 00 10 00 08 00 02 00 04 00 00 00 02""")
    assert stream[:0x70] == head
    assert stream[0x110:] == tail


def test_records_and_sections() -> None:
    assert ms.page_header(0x5000, "pc.ram") == struct.pack(">Q", 0x5008) + b"\x06pc.ram"
    assert ms.page_header(0x6000, None) == struct.pack(">Q", 0x6028)
    assert ms.zero_record(0x7000, None) == struct.pack(">Q", 0x7022) + b"\x00"
    assert ms.end_section(3) == b"\x03" + struct.pack(">IQ", 3, 0x10) + b"\x7e" + struct.pack(">I", 3)
    blob = ms.postcopy_listen() + ms.postcopy_run()
    assert ms.packaged(blob) == bytes.fromhex("0800070004") + struct.pack(">I", 10) + blob
    with pytest.raises(ValueError):
        ms.ram_start(0, [("pc.ram", 4096)])


def _rp(kind: int, payload: bytes) -> bytes:
    return struct.pack(">HH", kind, len(payload)) + payload


def test_return_path_parser_takes_any_split() -> None:
    bitmap = bytes([0b101]) + bytes(7)
    wire = (_rp(2, struct.pack(">I", 3))
            + _rp(3, struct.pack(">QI", 0xC0000, 4096) + b"\x06pc.ram")
            + _rp(4, struct.pack(">QI", 0xC1000, 4096))
            + _rp(5, b"\x06pc.ram") + struct.pack(">Q", 8) + bitmap
            + struct.pack(">Q", ms.RECV_BITMAP_ENDING)
            + _rp(6, struct.pack(">I", 1)) + _rp(1, struct.pack(">I", 0)))
    want = [ms.Pong(3), ms.ReqPages("pc.ram", 0xC0000, 4096), ms.ReqPages("pc.ram", 0xC1000, 4096),
            ms.RecvBitmap("pc.ram", bitmap), ms.ResumeAck(1), ms.Shut(0)]
    for step in (1, 3, 7, len(wire)):
        rp = ms.ReturnPath()
        got: List[ms.RpMessage] = []
        for i in range(0, len(wire), step):
            rp.feed(wire[i:i + step])
            got += rp.messages()
        assert [(type(m), m) for m in got] == [(type(m), m) for m in want], step
    assert want[3].received(0) and not want[3].received(1) and want[3].received(2)


@pytest.mark.parametrize("wire, message", [
    (_rp(4, struct.pack(">QI", 0, 4096)), "before any REQ_PAGES_ID"),
    (_rp(99, b""), "unknown message type 99"),
    (_rp(2, b"\x00\x00"), "PONG of length 2"),
    (_rp(7, b""), "SWITCHOVER_ACK was not asked for"),
    (_rp(5, b"\x02ab") + struct.pack(">Q", 8) + bytes(8) + struct.pack(">Q", 1), "end mark"),
])
def test_return_path_refuses_malformed_messages(wire: bytes, message: str) -> None:
    with pytest.raises(ms.StreamError, match=message):
        ms.ReturnPath().feed(wire)


# ------------------------------------------------------------------ a destination QEMU

def assert_ram_equals(snapshot: str, resaved: Snapshot) -> None:
    """Every page of every RAMBlock of the destination equals the snapshot's."""
    with Snapshot.open(snapshot) as want:
        assert [b.name for b in resaved.blocks] == [b.name for b in want.blocks]
        for a in want.blocks:
            b = resaved.block(a.name)
            assert a.length == b.length, a.name
            step = 1024
            for first in range(0, a.pages, step):
                n = min(step, a.pages - first)
                x, y = a.read_pages(first, n), b.read_pages(first, n)
                if x != y:
                    bad = [first + k for k in range(n) if x[k * 4096:(k + 1) * 4096]
                           != y[k * 4096:(k + 1) * 4096]]
                    raise AssertionError(f"{a.name}: {len(bad)} pages differ, first "
                                         f"{[hex(p * 4096) for p in bad[:5]]}")
    resaved.close()


def guest_args(info: Dict[str, Any], tmp: str) -> Tuple[List[str], str]:
    req = os.path.join(tmp, "req.sock")
    return linuxguest.destination_args(info, req), req


def data_pages_sent(stats: Dict[str, Any]) -> int:
    """Data pages sent; every page sent, data or empty, is counted once by why it went."""
    assert stats["data_pages_sent"] + stats["zero_pages_sent"] == (
        stats["pages_requested"] + stats["pages_around"] + stats["pages_streamed"]
        + stats["pages_working_set"])
    return int(stats["data_pages_sent"])


STAT_KEYS = {"time_to_running_s", "time_to_complete_s", "page_requests", "pages_requested",
             "pages_streamed", "zero_pages_sent", "bytes_sent", "request_service_us",
             "duplicate_requests"}


# ------------------------------------------------------------------ the Linux guest

@pytest.mark.qemu
def test_guest_runs_and_answers_while_its_ram_streams_in(guest: Dict[str, Any], destination: Any,
                                                         short_tmp: str) -> None:
    """Running while postcopy-active, a correct answer during the load, still running after."""
    args, req = guest_args(guest, short_tmp)
    dst = destination(args)
    expected = linuxguest.expected_answer(LINUX_GUEST_SEED, 0, 4)
    with Resume(guest["snapshot"], qmp=dst.uffdpy_sock, background_delay=3.0) as r:
        running = r.running_after(10)
        assert running is not None and running < 1.0
        assert dst.qmp.call("query-status")["status"] == "running"
        assert dst.status() == "postcopy-active"
        answer = linuxguest.ask(req, 0, 4, timeout=30)
        assert answer == expected
        assert dst.status() == "postcopy-active"          # answered before the stream began
        sent, total = r.progress()
        assert sent < total // 4, (sent, total)
        stats = r.wait(60)
    assert dst.status() == "completed"
    assert stats.page_requests > 100 and stats.pages_streamed > 0
    assert data_pages_sent(stats.as_dict()) == stats.data_pages
    # every data page but the requested ones (read, then sent) was spliced: the stream's
    # on the main channel, and those around each request on the preempt channel
    assert stats.preempt and stats.pages_around > 0
    assert stats.bytes_spliced >= (stats.data_pages_sent - stats.pages_requested) * 4096
    assert stats.time_to_running_s is not None and stats.time_to_complete_s is not None
    assert stats.request_service_us["p50"] is not None
    assert dst.qmp.call("query-status")["status"] == "running"
    assert linuxguest.ask(req, 8, 4, timeout=30) == linuxguest.expected_answer(
        LINUX_GUEST_SEED, 8, 4)


@pytest.mark.qemu
@pytest.mark.parametrize("preempt", [False, True], ids=["main-channel", "preempt"])
def test_guest_ram_byte_exact_after_resume(guest: Dict[str, Any], destination: Any,
                                           short_tmp: str, tmp_path: Path, preempt: bool) -> None:
    args, _ = guest_args(guest, short_tmp)
    dst = destination(args, paused=True)
    with Resume(guest["snapshot"], qmp=dst.uffdpy_sock, preempt=preempt) as r:
        stats = r.wait(60)
    assert stats.time_to_running_s is None                 # -S: the VM stays paused
    assert dst.qmp.call("query-status")["status"] == "paused"
    assert data_pages_sent(stats.as_dict()) == stats.data_pages
    # each data page once: as many page records as data pages, and every byte accounted for
    assert stats.data_pages_sent == stats.data_pages
    assert stats.bytes_sent > stats.data_pages * 4096 + 8 * stats.data_pages
    assert_ram_equals(guest["snapshot"], dst.resave(tmp_path / "again.img"))


# ------------------------------------------------------------------ firmware-only machines


@pytest.mark.qemu
@pytest.mark.parametrize("machine, transport, background, preempt", [
    ("pc", "unix", True, None),
    ("pc", "tcp", True, False),
    ("pc", "fd", True, None),
    ("q35", "unix", True, True),
    ("q35", "tcp", False, None),
], ids=["pc-unix", "pc-tcp-no-preempt", "pc-fd", "q35-preempt", "q35-tcp-no-background"])
def test_firmware_machines_byte_exact(firmware: Dict[str, Any], destination: Any,
                                      tmp_path: Path, machine: str, transport: str,
                                      background: bool, preempt: Optional[bool]) -> None:
    snapshot, args = firmware[machine]
    dst = destination(args, paused=True)
    with Resume(snapshot, qmp=dst.uffdpy_sock, transport=transport, background=background,
                preempt=preempt) as r:
        if not background:
            with pytest.raises(TimeoutError):
                r.wait(1.0)                 # demand only: a paused guest asks for (almost) nothing
            assert dst.status() == "postcopy-active"
            r.start_background()
        stats = r.wait(60)
    assert dst.status() == "completed"
    assert data_pages_sent(stats.as_dict()) == stats.data_pages
    # preempt by default wherever a second connection can be opened, else as given
    expected = preempt if preempt is not None else transport != "fd"
    caps = {c["capability"]: c["state"] for c in dst.qmp.call("query-migrate-capabilities")}
    assert caps["postcopy-preempt"] is expected and stats.preempt is expected
    assert_ram_equals(snapshot, dst.resave(tmp_path / "again.img"))


# ------------------------------------------------------------------ failure and recovery

@pytest.mark.qemu
def test_source_dies_mid_load_then_recover_is_byte_exact(guest: Dict[str, Any],
                                                         destination: Any, short_tmp: str,
                                                         tmp_path: Path) -> None:
    args, _ = guest_args(guest, short_tmp)
    dst = destination(args, paused=True)
    r = Resume(guest["snapshot"], qmp=dst.uffdpy_sock, batch_pages=8)
    deadline = time.monotonic() + 30
    while r.progress()[0] < 5000:
        assert time.monotonic() < deadline, r.progress()
        time.sleep(0.002)
    r.abort()                                   # as a crash: no END, no EOF
    dst.wait_status("postcopy-paused")
    proc = run_uffdpy("resume", guest["snapshot"], "--qmp", dst.uffdpy_sock, "--recover", "--json")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["recovered"] and stats["pages_already_received"] >= 5000
    assert dst.status() == "completed"
    assert_ram_equals(guest["snapshot"], dst.resave(tmp_path / "again.img"))


@pytest.mark.qemu
def test_killed_command_leaves_its_server_to_finish(guest: Dict[str, Any], destination: Any,
                                                    short_tmp: str) -> None:
    """SIGKILL of ``uffdpy resume`` (the process a user sees) after RUN: the load completes."""
    args, req = guest_args(guest, short_tmp)
    dst = destination(args)
    source = popen_uffdpy("resume", guest["snapshot"], "--qmp", dst.uffdpy_sock,
                          "--background-delay", "2")
    try:
        dst.qmp.wait_event("RESUME", timeout=30)
        server = server_of(source)
        source.kill()
        source.communicate(timeout=30)
        dst.wait_status("completed", timeout=60)       # the server served on
        assert linuxguest.ask(req, 4, 4, timeout=30) == linuxguest.expected_answer(
            LINUX_GUEST_SEED, 4, 4)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{server}") and \
                open(f"/proc/{server}/stat").read().split()[2] != "Z":
            assert time.monotonic() < deadline, "the server did not exit after the load"
            time.sleep(0.02)
    finally:
        if source.poll() is None:
            source.kill()
            source.communicate(timeout=30)


@pytest.mark.qemu
def test_killed_server_is_recovered_at_once(guest: Dict[str, Any], destination: Any,
                                            short_tmp: str) -> None:
    """SIGKILL of the stream's server after RUN: the command recovers with a new one itself."""
    args, req = guest_args(guest, short_tmp)
    dst = destination(args)
    source = popen_uffdpy("resume", guest["snapshot"], "--qmp", dst.uffdpy_sock, "--json",
                          "--background-delay", "60")
    try:
        dst.qmp.wait_event("RESUME", timeout=30)
        assert linuxguest.ask(req, 0, 2, timeout=30) == linuxguest.expected_answer(
            LINUX_GUEST_SEED, 0, 2)
        mark = len(dst.qmp.events)
        os.kill(server_of(source), signal.SIGKILL)
        dst.wait_status("postcopy-paused", since=mark)
        dst.wait_status("postcopy-active", timeout=30, since=mark)   # recovered
        assert linuxguest.ask(req, 4, 4, timeout=30) == linuxguest.expected_answer(
            LINUX_GUEST_SEED, 4, 4)
        out, err = source.communicate(timeout=120)
    finally:
        if source.poll() is None:
            source.kill()
            source.communicate(timeout=30)
    assert source.returncode == 0, err
    stats = json.loads(out)
    assert stats["auto_recoveries"] == 1 and stats["recovered"], stats
    assert dst.status() == "completed"
    assert linuxguest.ask(req, 8, 4, timeout=30) == linuxguest.expected_answer(
        LINUX_GUEST_SEED, 8, 4)


@pytest.mark.qemu
def test_destination_killed_mid_load_ends_the_source_in_one_line(
        guest: Dict[str, Any], destination: Any, short_tmp: str) -> None:
    args, _ = guest_args(guest, short_tmp)
    dst = destination(args)
    source = popen_uffdpy("resume", guest["snapshot"], "--qmp", dst.uffdpy_sock,
                          "--background-delay", "60")
    try:
        dst.qmp.wait_event("RESUME", timeout=30)
        os.killpg(dst.proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        _, err = source.communicate(timeout=30)
        assert time.monotonic() - t0 < 10
    finally:
        if source.poll() is None:
            source.kill()
            source.communicate(timeout=30)
    assert source.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "destination closed the migration connection" in lines[0], err


# ------------------------------------------------------------------ the command

@pytest.mark.qemu
def test_cli_starts_qemu_and_leaves_the_guest_running(guest: Dict[str, Any], qemu_binary: str,
                                                      short_tmp: str) -> None:
    args, req = guest_args(guest, short_tmp)
    proc = run_uffdpy("resume", guest["snapshot"], "--json", "--", qemu_binary, *args,
                      env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == 0, proc.stderr
    # its QMP is blocking: asyncio and qemu.qmp are never imported (~18 ms at start);
    # its records are not dataclasses (with inspect, 16 ms)
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "uffdpy.resume.supervise" in imported
    assert not {"asyncio", "qemu.qmp", "dataclasses", "inspect"} & imported
    stats = json.loads(proc.stdout)
    assert STAT_KEYS <= set(stats)
    pid = stats["qemu_pid"]
    try:
        assert stats["time_to_running_s"] is not None and stats["time_to_running_s"] < 1.0
        assert data_pages_sent(stats) == stats["data_pages"]
        assert linuxguest.ask(req, 2, 2, timeout=30) == linuxguest.expected_answer(
            LINUX_GUEST_SEED, 2, 2)
        with QmpClient(stats["qmp_socket"], timeout=30) as qmp:
            assert qmp.call("query-status")["status"] == "running"
            assert qmp.call("query-migrate")["status"] == "completed"
    finally:
        os.kill(pid, signal.SIGKILL)


@pytest.mark.qemu
def test_cli_paused_keeps_the_vm_paused(firmware: Dict[str, Any], qemu_binary: str) -> None:
    snapshot, args = firmware["pc"]
    proc = run_uffdpy("resume", snapshot, "--paused", "--", qemu_binary, *args)
    assert proc.returncode == 0, proc.stderr
    assert "the VM is paused" in proc.stdout
    socket_path = proc.stdout.rsplit("QMP socket ", 1)[1].strip()
    pid = int(proc.stdout.split("QEMU pid ", 1)[1].split(",", 1)[0])
    try:
        with QmpClient(socket_path, timeout=30) as qmp:
            assert qmp.call("query-status")["status"] == "paused"
    finally:
        os.kill(pid, signal.SIGKILL)


@pytest.mark.qemu
@pytest.mark.parametrize("change", ["memory", "missing-device"])
def test_machine_mismatch_exits_2_with_qemus_reason(guest: Dict[str, Any], qemu_binary: str,
                                                    short_tmp: str, change: str) -> None:
    args, _ = guest_args(guest, short_tmp)
    if change == "memory":
        args[args.index("-m") + 1] = "512M"
    else:
        cut = args.index("-chardev")
        args = args[:cut] + args[cut + 4:]           # no second serial port
    proc = run_uffdpy("resume", guest["snapshot"], "--", qemu_binary, *args)
    line = one_line_error(proc)
    assert "destination" in line, line
    # QEMU's own words: the RAM block length, or the section it could not find
    assert ("Length mismatch" in line or "pc.ram" in line or "serial" in line
            or "Unknown" in line or "section" in line), line
    if change == "missing-device":          # QEMU names the section; we add what is needed
        assert "Unknown savevm section" in line and "the snapshot needs: " in line, line
        assert line.count("-serial null") == 2, line


@pytest.mark.qemu
def test_bad_snapshot_refused_before_anything_is_sent(guest: Dict[str, Any], destination: Any,
                                                      short_tmp: str, tmp_path: Path) -> None:
    bad = tmp_path / "truncated.img"
    with open(guest["snapshot"], "rb") as f:
        bad.write_bytes(f.read(200_000))
    args, _ = guest_args(guest, short_tmp)
    dst = destination(args)
    line = one_line_error(run_uffdpy("resume", bad, "--qmp", dst.uffdpy_sock))
    assert str(bad) in line
    assert dst.status() == "none"                 # nothing was set up or sent
    with pytest.raises(ValueError, match="exactly one"):
        Resume(guest["snapshot"])


def test_cli_argument_errors(tmp_path: Path) -> None:
    from uffdpy.harness.synthetic import make_synthetic
    snap = tmp_path / "s.img"
    make_synthetic(snap, size=1 << 20, fill=0.5, seed=1)
    assert "one of --qmp" in one_line_error(run_uffdpy("resume", snap))
    assert "--paused applies" in one_line_error(run_uffdpy("resume", snap, "--paused",
                                                           "--qmp", "/nonexistent"))
    proc = run_uffdpy("resume", snap, "--qmp", "x", "--batch-pages", "0")
    assert proc.returncode == 2 and "must be at least 1" in proc.stderr
    assert "needs --qemu-args" in one_line_error(run_uffdpy("bench", snap, "--resume"))


@pytest.mark.qemu
def test_cli_bench_resume_one_round(qemu_binary: str, tmp_path: Path) -> None:
    from uffdpy.harness.synthetic import make_synthetic
    snap = tmp_path / "s.img"
    make_synthetic(snap, size=16 << 20, fill=0.3, seed=4)
    proc = run_uffdpy("bench", snap, "--resume", "--rounds", "1", "--request", "", "--json",
                      "--qemu-args", "-machine none -m 16M -nodefaults -display none")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["rows"]
    assert set(rows) == {"qemu", "resume", "resume-command", "resume-no-preempt",
                         "resume-no-splice", "map"}
    assert all(r["completed"] and r["completed"] > 0 for r in rows.values())
    # the command is timed from its spawn: its connect comes after Python's start
    assert rows["resume-command"]["connect"] > rows["resume"]["connect"] > 0
    assert rows["qemu"]["connect"] is None


@pytest.mark.qemu
def test_connect_to_a_destination_that_already_listens(firmware: Dict[str, Any],
                                                       qemu_binary: str, tmp_path: Path,
                                                       short_tmp: str) -> None:
    """--connect: QEMU listens with -incoming unix:PATH and postcopy on from its command line."""
    snapshot, args = firmware["q35"]
    listen = os.path.join(short_tmp, "in.sock")
    qmp_path = os.path.join(short_tmp, "qmp.sock")
    with open(tmp_path / "qemu.log", "wb") as log:
        qemu = subprocess.Popen([qemu_binary, *args, "-S", "-incoming", f"unix:{listen}",
                                 "-global", "migration.x-postcopy-ram=on",
                                 "-qmp", f"unix:{qmp_path},server=on,wait=off"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (os.path.exists(listen) and os.path.exists(qmp_path)):
            assert qemu.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc = run_uffdpy("resume", snapshot, "--connect", f"unix:{listen}", "--json")
        assert proc.returncode == 0, proc.stderr
        stats = json.loads(proc.stdout)
        assert data_pages_sent(stats) == stats["data_pages"]
        assert stats["time_to_running_s"] is None        # no QMP: no RESUME event to read
        with QmpClient(qmp_path, timeout=30) as qmp:
            assert qmp.call("query-migrate")["status"] == "completed"
    finally:
        qemu.kill()
        qemu.wait(timeout=30)


@pytest.mark.qemu
@pytest.mark.parametrize("change", ["machine", "memory"])
@pytest.mark.parametrize("mode", ["stream", "map"])
def test_qmp_form_names_what_differs(firmware: Dict[str, Any], destination: Any,
                                     change: str, mode: str) -> None:
    """--qmp: a destination unlike the saved machine is refused before anything is sent,
    naming both sides (QEMU's own load says only "Invalid argument")."""
    snapshot, args = firmware["q35"]
    args = list(args)
    if change == "machine":
        args[args.index("q35,accel=tcg")] = "pc,accel=tcg"
    else:
        args[args.index("-m") + 1] = "128M"
    dst = destination(args, paused=True)
    extra = ["--map"] if mode == "map" else []
    line = one_line_error(run_uffdpy("resume", snapshot, *extra, "--qmp", dst.uffdpy_sock))
    if change == "machine":
        assert "pc-i440fx-10.0" in line and "pc-q35-10.0" in line, line
    else:
        assert "'pc.ram'" in line and str(128 << 20) in line and str(64 << 20) in line, line
    assert dst.status() == "none"


@pytest.mark.qemu
@pytest.mark.parametrize("mode", ["stream", "map"])
def test_qemu_that_exits_at_start_up_fails_fast_with_its_reason(guest: Dict[str, Any],
                                                                qemu_binary: str,
                                                                short_tmp: str,
                                                                mode: str) -> None:
    """QEMU dies after making its QMP socket (no display here): seen at once, its words shown."""
    args, _ = guest_args(guest, short_tmp)
    args[args.index("-display") + 1] = "gtk"           # no display on this machine: QEMU exits
    tmp = os.path.join(short_tmp, "tmp")
    os.mkdir(tmp)
    t0 = time.monotonic()
    extra = ["--map"] if mode == "map" else []
    proc = subprocess.run(uffdpy_cmd("resume", guest["snapshot"], *extra, "--", qemu_binary,
                                     *args), capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=tmp),
                          stdin=subprocess.DEVNULL)
    line = one_line_error(proc)
    assert time.monotonic() - t0 < 15, line            # not the 30 s QMP timeout
    assert "QEMU exited" in line or "gtk" in line.lower() or "display" in line.lower(), line
    assert os.listdir(tmp) == []                        # nothing left behind


@pytest.mark.qemu
def test_qemu_left_running_takes_its_directory_when_it_exits(guest: Dict[str, Any],
                                                             qemu_binary: str,
                                                             short_tmp: str) -> None:
    args, _ = guest_args(guest, short_tmp)
    proc = run_uffdpy("resume", guest["snapshot"], "--json", "--", qemu_binary, *args)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    directory = os.path.dirname(stats["qmp_socket"])
    assert os.path.isdir(directory)                     # QEMU runs: its socket is there
    os.kill(stats["qemu_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(directory):
        assert time.monotonic() < deadline, os.listdir(directory)
        time.sleep(0.02)


@pytest.mark.qemu
@pytest.mark.parametrize("which", ["guest", "pc-vga", "q35"])
def test_what_inspect_says_a_destination_needs_is_enough(guest: Dict[str, Any],
                                                        firmware: Dict[str, Any],
                                                        destination: Any, tmp_path: Path,
                                                        which: str) -> None:
    """``inspect``'s arguments (plus the display, which no snapshot tells) resume it byte-exact;
    a refused stream names them."""
    snapshot = guest["snapshot"] if which == "guest" else firmware[which.split("-")[0]][0]
    proc = run_uffdpy("inspect", snapshot, "--json")
    assert proc.returncode == 0, proc.stderr
    needs = json.loads(proc.stdout)["destination"]
    assert "the CPU model (-cpu)" in needs["unknown"]
    dst = destination(needs["args"] + ["-display", "none", "-accel", "tcg"], paused=True)
    with Resume(snapshot, qmp=dst.uffdpy_sock) as r:
        r.wait(60)
    assert_ram_equals(snapshot, dst.resave(tmp_path / "again.img"))
