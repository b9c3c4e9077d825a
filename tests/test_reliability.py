"""No VM left behind: the postcopy resume against deaths, signals, repetition and company.

Every case runs a real QEMU 10 destination of the request-serving Linux guest
(or a firmware-only q35), kills or interrupts something at a chosen moment,
and then asserts that the destination can be finished (completed, or finished
by the command the error names) with the guest answering right or its RAM
byte-exact.  Each wait is bounded; each QEMU is killed by pid.
"""
from __future__ import annotations

import gc
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from uffdpy.harness import linuxguest
from uffdpy.qmp import QmpClient
from uffdpy.resume import Resume
from uffdpy.resume.destination import QemuDestination

from conftest import LINUX_GUEST_SEED  # noqa: E402
from helpers import one_line_error, popen_uffdpy, run_uffdpy, running, server_of  # noqa: E402
from test_resume import assert_ram_equals, guest_args

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(600)]


def answers(req: str, first: int = 0, count: int = 2) -> bool:
    return linuxguest.ask(req, first, count, timeout=60) == linuxguest.expected_answer(
        LINUX_GUEST_SEED, first, count)


def settle(dst: Any, timeout: float = 60) -> str:
    """The destination's status once nothing more is moving (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        st = dst.status()
        if st in ("completed", "failed", "postcopy-paused", "none", "setup") \
                or time.monotonic() > deadline:
            return st
        time.sleep(0.05)


def finish(snapshot: str, dst: Any) -> str:
    """Whatever a user would do next to finish the destination; its final status."""
    st = settle(dst)
    if st in ("none", "setup"):
        proc = run_uffdpy("resume", snapshot, "--qmp", dst.uffdpy_sock)
    elif st == "postcopy-paused":
        proc = run_uffdpy("resume", snapshot, "--qmp", dst.uffdpy_sock, "--recover")
    else:
        return settle(dst)
    # on failure: what the destination said, for a failure seen only under load
    assert proc.returncode == 0, (st, proc.stderr, migration_state(dst), dst.output()[-2000:])
    return settle(dst)


def migration_state(dst: Any) -> Any:
    """``query-migrate`` of ``dst``, or why it could not be asked (QEMU gone, stuck)."""
    try:
        return dst.qmp.call("query-migrate")
    except Exception as e:          # a report, never a second failure over the first
        return f"query-migrate failed: {e!r}"


# ------------------------------------------------------------------ deaths of the source

@pytest.mark.parametrize("after", [0.0, 0.08, 0.2, 0.35])
def test_command_killed_at_any_moment_leaves_a_finishable_destination(
        guest: Dict[str, Any], destination: Any, short_tmp: str, after: float) -> None:
    """SIGKILL of ``uffdpy resume`` (the process a user sees) ``after`` s from its start."""
    args, req = guest_args(guest, short_tmp)
    dst = destination(args)
    source = popen_uffdpy("resume", guest["snapshot"], "--qmp", dst.uffdpy_sock)
    time.sleep(after)
    source.kill()
    source.communicate(timeout=30)
    assert finish(guest["snapshot"], dst) == "completed"
    assert answers(req)


@pytest.mark.parametrize("after_ms", [0, 5, 20, 60])
def test_server_killed_early_is_recovered(guest: Dict[str, Any], destination: Any,
                                          short_tmp: str, after_ms: int) -> None:
    """The stream's server killed 0-60 ms after the guest started running: the early window,
    where the guest's vCPU is often blocked on a missing page under QEMU's big lock and only
    the command's own QMP session can still run migrate-recover."""
    args, req = guest_args(guest, short_tmp)
    dst = destination(args)
    with running(popen_uffdpy("resume", guest["snapshot"], "--qmp", dst.uffdpy_sock,
                              "--json")) as source:
        server = server_of(source)
        dst.qmp.wait_event("RESUME", timeout=30)
        time.sleep(after_ms / 1000)
        os.kill(server, signal.SIGKILL)
        out, err = source.communicate(timeout=120)
    assert source.returncode == 0, err
    assert json.loads(out)["auto_recoveries"] == 1
    assert dst.status() == "completed"
    assert answers(req)


def test_server_killed_at_its_fork_the_command_still_runs_the_guest(
        guest: Dict[str, Any], qemu_binary: str, short_tmp: str) -> None:
    """Killed at its fork, the server dies before its connect (the command forks another)
    or between its connect and the device state (QEMU fails that load: the -- form starts
    QEMU again and retries); either way the command ends with the guest running."""
    args, req = guest_args(guest, short_tmp)
    with running(popen_uffdpy("resume", guest["snapshot"], "--json", "--", qemu_binary,
                              *args)) as source:
        os.kill(server_of(source, started_qemu=True), signal.SIGKILL)
        out, err = source.communicate(timeout=180)
    assert source.returncode == 0, err
    stats = json.loads(out)
    try:
        assert answers(req)
        with QmpClient(stats["qmp_socket"], timeout=30) as qmp:
            assert qmp.call("query-migrate")["status"] == "completed"
    finally:
        os.kill(stats["qemu_pid"], signal.SIGKILL)


def test_preempt_server_killed_is_recovered_with_its_preempt_channel(
        guest: Dict[str, Any], destination: Any, short_tmp: str) -> None:
    """With --preempt the recovery reopens the preempt channel (QEMU waits for it)."""
    args, req = guest_args(guest, short_tmp)
    dst = destination(args)
    with running(popen_uffdpy("resume", guest["snapshot"], "--qmp", dst.uffdpy_sock, "--json",
                              "--preempt", "--background-delay", "1")) as source:
        dst.qmp.wait_event("RESUME", timeout=30)
        assert answers(req)
        os.kill(server_of(source), signal.SIGKILL)
        out, err = source.communicate(timeout=120)
    assert source.returncode == 0, err
    assert json.loads(out)["auto_recoveries"] == 1
    assert dst.status() == "completed"
    assert answers(req, 8, 4)


def dropped_mid_stream(guest: Dict[str, Any], destination: Any, short_tmp: str, *,
                       preempt: bool) -> Any:
    """A paused destination (-S) whose API source dropped its connections as a crash
    would, 3,000 pages in: left ``postcopy-paused``."""
    args, _ = guest_args(guest, short_tmp)
    dst = destination(args, paused=True)
    r = Resume(guest["snapshot"], qmp=dst.uffdpy_sock, preempt=preempt, batch_pages=8)
    deadline = time.monotonic() + 30
    while r.progress()[0] < 3000:
        assert time.monotonic() < deadline, r.progress()
        time.sleep(0.002)
    r.abort()
    dst.wait_status("postcopy-paused")
    return dst


def test_preempt_source_died_then_recover_command(guest: Dict[str, Any], destination: Any,
                                                  short_tmp: str, tmp_path: Path) -> None:
    """An API resume with preempt dropped as a crash would; ``--recover`` finishes it."""
    dst = dropped_mid_stream(guest, destination, short_tmp, preempt=True)
    proc = run_uffdpy("resume", guest["snapshot"], "--qmp", dst.uffdpy_sock, "--recover",
                      "--json", timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["recovered"]
    assert dst.status() == "completed"
    assert_ram_equals(guest["snapshot"], dst.resave(tmp_path / "again.img"))


def test_api_recovery_takes_preempt_as_the_destination_has_it(
        guest: Dict[str, Any], destination: Any, short_tmp: str, tmp_path: Path) -> None:
    """``Resume(recover=True, preempt=True)`` into a destination without preempt: the
    destination's capability decides (a stream that disagreed would hang the recovery)."""
    dst = dropped_mid_stream(guest, destination, short_tmp, preempt=False)
    with Resume(guest["snapshot"], qmp=dst.uffdpy_sock, recover=True, preempt=True,
                timeout=60) as again:
        stats = again.wait(120)
    assert stats.recovered and not stats.preempt
    assert dst.status() == "completed"
    assert_ram_equals(guest["snapshot"], dst.resave(tmp_path / "again.img"))


def test_destination_left_listening_is_resumed_through_its_address(
        guest: Dict[str, Any], destination: Any, short_tmp: str) -> None:
    """A source killed between migrate-incoming and its connect: a new resume connects there."""
    args, req = guest_args(guest, short_tmp)
    dst = destination(args)
    setup = QemuDestination(dst.uffdpy_sock, timeout=30)
    try:
        setup.prepare(preempt=False)
        # where a killed source's listening socket stays (no cleanup ran)
        setup.listen(f"unix:{os.path.join(short_tmp, 'migration.sock')}")
    finally:
        setup.close()
    assert dst.status() == "setup"
    proc = run_uffdpy("resume", guest["snapshot"], "--qmp", dst.uffdpy_sock)
    assert proc.returncode == 0, proc.stderr
    assert dst.status() == "completed"
    assert answers(req)


# ------------------------------------------------------------------ signals

@pytest.mark.parametrize("sig, code, flags", [(signal.SIGINT, 130, ()),
                                              (signal.SIGTERM, 143, ()),
                                              (signal.SIGINT, 130, ("--no-preempt",))],
                         ids=["SIGINT", "SIGTERM", "SIGINT-no-preempt"])
def test_interrupt_names_the_recover_command(guest: Dict[str, Any], destination: Any,
                                             short_tmp: str, sig: int, code: int,
                                             flags: Tuple[str, ...]) -> None:
    """The command to finish the load, with what the paused destination was set up with."""
    args, req = guest_args(guest, short_tmp)
    dst = destination(args)
    with running(popen_uffdpy("resume", guest["snapshot"], "--qmp", dst.uffdpy_sock,
                              "--background-delay", "60", *flags)) as source:
        dst.qmp.wait_event("RESUME", timeout=30)
        assert answers(req)
        source.send_signal(sig)
        _, err = source.communicate(timeout=60)
    assert source.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "postcopy-paused" in lines[0], err
    command = lines[0].split("finish it with: ", 1)[1].split()
    assert command[:2] == ["uffdpy", "resume"] and command[-1] == "--recover", command
    assert ("--no-preempt" in command) == ("--no-preempt" in flags), command
    assert settle(dst) == "postcopy-paused"
    proc = run_uffdpy(*command[1:])
    assert proc.returncode == 0, proc.stderr
    assert dst.status() == "completed"
    assert answers(req, 4, 4)


# ------------------------------------------------------------------ the destination's death

def test_api_close_after_the_destination_died_never_raises(guest: Dict[str, Any],
                                                           destination: Any,
                                                           short_tmp: str) -> None:
    """Five times: QEMU killed mid-load; wait() raises one error, close() nothing; no leak."""
    from uffdpy.resume import DestinationError
    fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
    for _ in range(5):
        args, _ = guest_args(guest, short_tmp)
        dst = destination(args)
        r = Resume(guest["snapshot"], qmp=dst.uffdpy_sock, batch_pages=4)
        while r.progress()[0] < 500:
            time.sleep(0.001)
        os.killpg(dst.proc.pid, signal.SIGKILL)
        with pytest.raises(DestinationError):
            r.wait(60)
        r.close()
        r.close()
        dst.close()
        if os.path.exists(os.path.join(short_tmp, "req.sock")):
            os.unlink(os.path.join(short_tmp, "req.sock"))
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= fds + 1
    assert threading.active_count() <= threads


# ------------------------------------------------------------------ repetition and company

def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_twenty_sequential_api_restores_leak_nothing(firmware: Dict[str, Any],
                                                     destination: Any, tmp_path: Path) -> None:
    snapshot, args = firmware["q35"]
    samples: List[Tuple[int, int, int]] = []
    for i in range(20):
        dst = destination(args, paused=True)
        with Resume(snapshot, qmp=dst.uffdpy_sock) as r:
            r.wait(60)
        assert dst.status() == "completed"
        if i == 19:
            assert_ram_equals(snapshot, dst.resave(tmp_path / "last.img"))
        dst.close()
        gc.collect()
        samples.append((len(os.listdir("/proc/self/fd")), threading.active_count(),
                        _rss_kib()))
    first, last = samples[2], samples[-1]              # after the first rounds' imports
    assert last[0] <= first[0] and last[1] <= first[1], samples
    assert last[2] - first[2] < 20 * 1024, samples     # KiB: no per-restore growth


def test_three_concurrent_restores_are_byte_exact(firmware: Dict[str, Any], destination: Any,
                                                  tmp_path: Path) -> None:
    snapshot, args = firmware["q35"]
    dsts = [destination(args, paused=True) for _ in range(3)]
    procs = [popen_uffdpy("resume", snapshot, "--qmp", d.uffdpy_sock, "--json") for d in dsts]
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    for i, d in enumerate(dsts):
        assert d.status() == "completed"
        assert_ram_equals(snapshot, d.resave(tmp_path / f"again{i}.img"))


# ------------------------------------------------------------------ checked before anything starts

def test_unwritable_record_path_refused_before_anything(firmware: Dict[str, Any],
                                                        destination: Any,
                                                        tmp_path: Path) -> None:
    snapshot, args = firmware["q35"]
    dst = destination(args, paused=True)
    for bad, why in ((tmp_path / "no" / "such" / "x.ws", "no such directory"),
                     (tmp_path, "is a directory")):
        line = one_line_error(run_uffdpy("resume", snapshot, "--qmp", dst.uffdpy_sock,
                                         "--record-ws", bad))
        assert why in line and str(bad) in line, line
    assert dst.status() == "none"

