"""uffdpy.qmp: the QMP client against a real QEMU and against a scripted fake.

The ``qemu`` tests start ``qemu-system-x86_64 -machine none`` with a QMP
socket; the others need no QEMU: a socket that never appears, and a tiny
in-process server that stays silent, hangs up, or answers late.  Every QEMU
process is killed in a ``finally`` block and every wait is bounded.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, BinaryIO, Callable, Dict, Iterator, Tuple

import pytest

from uffdpy.qmp import QmpClient, QmpError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A private directory with a short path (UNIX socket paths are limited to ~107 bytes)."""
    path = tempfile.mkdtemp(prefix="uffdpy-qmp-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _start_qemu(binary: str, directory: str) -> Tuple["subprocess.Popen[bytes]", str]:
    sock = os.path.join(directory, "qmp.sock")
    with open(os.path.join(directory, "qemu.log"), "wb") as log:
        proc = subprocess.Popen([binary, "-machine", "none", "-nodefaults", "-display", "none",
                                 "-qmp", f"unix:{sock},server=on,wait=off"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    return proc, sock


def _kill(proc: "subprocess.Popen[bytes]") -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


@pytest.fixture
def qemu(qemu_binary: str, short_dir: str) -> Iterator[Tuple["subprocess.Popen[bytes]", str]]:
    """A running ``-machine none`` QEMU and its QMP socket path (maybe not there yet)."""
    proc, sock = _start_qemu(qemu_binary, short_dir)
    try:
        yield proc, sock
    finally:
        _kill(proc)


# --------------------------------------------------------------------------
# Against a real QEMU


@pytest.mark.qemu
@pytest.mark.parametrize("session", [True, False], ids=["session", "blocking"])
def test_connect_at_once_and_query_status(qemu: Tuple[Any, str], session: bool) -> None:
    """Connecting right after starting QEMU retries until the socket is there."""
    _, sock = qemu
    with QmpClient(sock, timeout=30, session=session) as qmp:
        assert "version" in qmp.greeting["QMP"]
        status = qmp.call("query-status")
        assert status["status"] == "running" and status["running"] is True
        # arguments whose names are not identifiers go through a dict
        text = qmp.call("human-monitor-command", **{"command-line": "info status"})
        assert "running" in text
    assert qmp.closed


@pytest.mark.qemu
@pytest.mark.parametrize("session", [True, False], ids=["session", "blocking"])
def test_command_error_names_the_command(qemu: Tuple[Any, str], session: bool) -> None:
    _, sock = qemu
    with QmpClient(sock, timeout=30, session=session) as qmp:
        with pytest.raises(QmpError) as info:
            qmp.call("no-such-command")
        assert info.value.command == "no-such-command"
        assert info.value.error_class == "CommandNotFound"
        assert "no-such-command" in str(info.value) and "CommandNotFound" in str(info.value)
        with pytest.raises(QmpError, match="query-status.*GenericError") as info:
            qmp.call("query-status", bogus=1)
        assert "bogus" in info.value.desc
        assert isinstance(info.value, RuntimeError)
        assert qmp.call("query-status")["status"] == "running"     # still in step


@pytest.mark.qemu
@pytest.mark.parametrize("session", [True, False], ids=["session", "blocking"])
def test_events_are_kept(qemu: Tuple[Any, str], session: bool) -> None:
    _, sock = qemu
    with QmpClient(sock, timeout=30, session=session) as qmp:
        assert qmp.call("stop") == {}
        assert qmp.call("query-status")["status"] == "paused"
        stops = [e for e in qmp.events if e["event"] == "STOP"]
        assert len(stops) == 1 and "timestamp" in stops[0]
        qmp.call("cont")
        qmp.call("query-status")
        assert [e["event"] for e in qmp.events] == ["STOP", "RESUME"]


@pytest.mark.qemu
@pytest.mark.parametrize("session", [True, False], ids=["session", "blocking"])
def test_close_twice_and_call_after_close(qemu: Tuple[Any, str], session: bool) -> None:
    proc, sock = qemu
    qmp = QmpClient(sock, timeout=30, session=session)
    qmp.close()
    qmp.close()
    assert qmp.closed and "closed" in repr(qmp)
    with pytest.raises(ConnectionError, match="closed"):
        qmp.call("query-status")
    # QEMU takes a new connection after the first one is gone
    with QmpClient(sock, timeout=30) as again:
        assert again.call("query-status")["status"] == "running"
    assert proc.poll() is None


@pytest.mark.qemu
@pytest.mark.parametrize("session", [True, False], ids=["session", "blocking"])
def test_quit_then_connection_error(qemu: Tuple[Any, str], session: bool) -> None:
    proc, sock = qemu
    with QmpClient(sock, timeout=30, session=session) as qmp:
        assert qmp.call("quit") == {}
        assert proc.wait(timeout=30) == 0
        with pytest.raises(ConnectionError):
            qmp.call("query-status")


# --------------------------------------------------------------------------
# Without QEMU


def test_socket_that_never_appears_times_out(short_dir: str) -> None:
    path = os.path.join(short_dir, "never.sock")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="never.sock"):
        QmpClient(path, timeout=0.5)
    assert 0.5 <= time.monotonic() - t0 < 5


class _FakeQemu:
    """Accepts ``connections`` connections on a UNIX socket, one after the other, and runs
    ``script(conn, reader)`` on each."""

    def __init__(self, path: str, script: Callable[[socket.socket, BinaryIO], None],
                 connections: int = 1) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.listener.settimeout(10)
        self.script = script
        self.connections = connections
        self.accepted = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for _ in range(self.connections):
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.settimeout(10)
                try:
                    self.script(conn, conn.makefile("rb"))
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=15)
        assert not self.thread.is_alive()


def _send(conn: socket.socket, message: Dict[str, Any]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\r\n")


def _recv_json(reader: BinaryIO) -> Any:
    """One JSON object from the client (qemu.qmp ends them with no newline); None at EOF."""
    buf, depth = b"", 0
    while True:
        c = reader.read(1)
        if not c:
            return None
        if not buf and c.isspace():
            continue
        buf += c
        depth += {b"{": 1, b"}": -1}.get(c, 0)
        if depth == 0:
            return json.loads(buf)


def _greet(conn: socket.socket, reader: BinaryIO) -> Dict[str, Any]:
    """Greeting and qmp_capabilities, as QEMU does them; returns the capabilities request."""
    _send(conn, {"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2},
                                     "package": ""}, "capabilities": []}})
    request = _recv_json(reader)
    assert request["execute"] == "qmp_capabilities"
    reply: Dict[str, Any] = {"return": {}}
    if "id" in request:
        reply["id"] = request["id"]
    _send(conn, reply)
    return request


@pytest.mark.parametrize("session", [True, False], ids=["session", "blocking"])
def test_an_event_before_the_greeting_is_kept(short_dir: str, session: bool) -> None:
    """Seen once in CI: a QEMU started without -S sent its RESUME event before the
    greeting to a client that connected as the VM started."""
    def script(conn: socket.socket, reader: BinaryIO) -> None:
        _send(conn, {"event": "RESUME", "data": {},
                     "timestamp": {"seconds": 1, "microseconds": 0}})
        _greet(conn, reader)
        request = _recv_json(reader)
        _send(conn, {"return": {"status": "running"}, "id": request["id"]})
        _recv_json(reader)      # until the client hangs up

    fake = _FakeQemu(os.path.join(short_dir, "q.sock"), script)
    try:
        with QmpClient(os.path.join(short_dir, "q.sock"), timeout=5, session=session) as qmp:
            assert qmp.greeting["QMP"]["version"]["qemu"]["major"] == 10
            assert [e["event"] for e in qmp.events] == ["RESUME"]
            assert qmp.call("query-status") == {"status": "running"}
    finally:
        fake.close()


def test_silent_server_times_out_naming_the_greeting(short_dir: str) -> None:
    done = threading.Event()
    fake = _FakeQemu(os.path.join(short_dir, "q.sock"), lambda conn, reader: done.wait(10))
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="greeting"):
            QmpClient(os.path.join(short_dir, "q.sock"), timeout=0.5)
        assert time.monotonic() - t0 < 5
    finally:
        done.set()
        fake.close()


def test_greeting_without_an_answer_says_qemu_is_stuck(short_dir: str) -> None:
    """A QEMU whose main loop is stuck greets (the monitor I/O thread) but never negotiates."""
    done = threading.Event()

    def script(conn: socket.socket, reader: BinaryIO) -> None:
        _send(conn, {"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2},
                                         "package": ""}, "capabilities": ["oob"]}})
        done.wait(10)
    fake = _FakeQemu(os.path.join(short_dir, "q.sock"), script)
    try:
        with pytest.raises(TimeoutError, match="did not answer qmp_capabilities.*big lock"):
            QmpClient(os.path.join(short_dir, "q.sock"), timeout=0.5)
    finally:
        done.set()
        fake.close()


@pytest.mark.parametrize("kind", ["missing", "regular-file", "directory", "dead-socket"])
def test_unreachable_socket_says_why(short_dir: str, kind: str) -> None:
    path = os.path.join(short_dir, "q.sock")
    if kind == "regular-file":
        open(path, "w").close()
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "dead-socket":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.close()                                 # the file stays, nobody listens
    want = {"missing": "no such socket", "regular-file": "a regular file, not a QMP socket",
            "directory": "a directory, not a QMP socket",
            "dead-socket": "nothing accepts connections"}[kind]
    with pytest.raises(TimeoutError) as info:
        QmpClient(path, timeout=0.3)
    assert want in str(info.value) and "greeting" not in str(info.value)


def test_server_that_hangs_up_gives_connection_error(short_dir: str) -> None:
    """A QEMU that closes every session during the negotiation: tried 3 times, then one error."""
    fake = _FakeQemu(os.path.join(short_dir, "q.sock"), lambda conn, reader: None,
                     connections=3)
    try:
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match="closed the connection"):
            QmpClient(os.path.join(short_dir, "q.sock"), timeout=5)
        assert time.monotonic() - t0 < 4 and fake.accepted == 3
    finally:
        fake.close()


def test_one_hang_up_during_the_greeting_is_tried_again(short_dir: str) -> None:
    """Seen once in CI from a fresh QEMU: a closed first session, then a good one."""
    sessions = []

    def script(conn: socket.socket, reader: BinaryIO) -> None:
        sessions.append(conn)
        if len(sessions) == 1:
            return                                   # hang up at once
        _greet(conn, reader)
        reader.readline()                            # hold the session until the client goes
    fake = _FakeQemu(os.path.join(short_dir, "q.sock"), script, connections=2)
    try:
        with QmpClient(os.path.join(short_dir, "q.sock"), timeout=5) as qmp:
            assert "version" in qmp.greeting["QMP"]
        assert fake.accepted == 2
    finally:
        fake.close()


@pytest.mark.parametrize("session", [True, False], ids=["session", "blocking"])
def test_late_reply_is_dropped_and_events_kept(short_dir: str, session: bool) -> None:
    """A reply that arrives after its call timed out is not taken for the next one's."""
    replied_late = threading.Event()

    def script(conn: socket.socket, reader: BinaryIO) -> None:
        _greet(conn, reader)
        slow = _recv_json(reader)
        assert slow["execute"] == "slow"
        fast = _recv_json(reader)          # sent after "slow" timed out
        _send(conn, {"return": "for slow", "id": slow["id"]})
        replied_late.set()
        _send(conn, {"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 0}})
        _send(conn, {"return": {"fast": fast["arguments"]}, "id": fast["id"]})
        _recv_json(reader)      # until the client hangs up

    fake = _FakeQemu(os.path.join(short_dir, "q.sock"), script)
    try:
        with QmpClient(os.path.join(short_dir, "q.sock"), timeout=5, session=session) as qmp:
            qmp.timeout = 0.3
            t0 = time.monotonic()
            with pytest.raises(TimeoutError, match="reply to slow"):
                qmp.call("slow")
            assert time.monotonic() - t0 < 3
            qmp.timeout = 5
            assert qmp.call("fast", x=1) == {"fast": {"x": 1}}
            assert replied_late.is_set()
            assert [e["event"] for e in qmp.events] == ["STOP"]
    finally:
        fake.close()


@pytest.mark.qemu
@pytest.mark.parametrize("session", [True, False], ids=["session", "blocking"])
def test_out_of_band_and_wait_event(qemu: Tuple[Any, str], session: bool) -> None:
    """exec-oob is negotiated (QEMU offers it) and answered; wait_event sees live events."""
    _, sock = qemu
    with QmpClient(sock, timeout=30, session=session) as qmp:
        assert "oob" in qmp.greeting["QMP"]["capabilities"]
        # migrate-recover is allow-oob; out of band it is refused for its state, not its form
        with pytest.raises(QmpError, match="migrate-recover"):
            qmp.call_oob("migrate-recover", uri="unix:/nonexistent/x.sock")
        since = len(qmp.events)
        qmp.call("stop")
        assert qmp.wait_event("STOP", since=since, timeout=10)["event"] == "STOP"
        with pytest.raises(TimeoutError, match="RESUME"):
            qmp.wait_event("RESUME", since=since, timeout=0.2)


# --------------------------------------------------------------------------
# Blocking until the session: what ``uffdpy resume`` does before its connect


def test_a_blocking_client_imports_neither_asyncio_nor_qemu_qmp(short_dir: str) -> None:
    """The point of ``session=False``: the commands before the connect without asyncio."""
    def script(conn: socket.socket, reader: BinaryIO) -> None:
        _greet(conn, reader)
        request = _recv_json(reader)
        _send(conn, {"return": {"status": "running"}, "id": request["id"]})
        _recv_json(reader)
    path = os.path.join(short_dir, "q.sock")
    fake = _FakeQemu(path, script)
    try:
        code = ("import sys; from uffdpy.qmp import QmpClient\n"
                f"c = QmpClient({path!r}, timeout=10, session=False)\n"
                "assert c.call('query-status') == {'status': 'running'}\n"
                "print(sorted(m for m in ('asyncio', 'qemu.qmp') if m in sys.modules))\n"
                "c.close()")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "[]"
    finally:
        fake.close()


def test_a_descriptor_passed_while_blocking_reaches_getfd(short_dir: str) -> None:
    got: Dict[str, Any] = {}

    def script(conn: socket.socket, reader: BinaryIO) -> None:
        _greet(conn, reader)
        data, fds, _, _ = socket.recv_fds(conn, 64, 1)
        got["fds"], got["blank"] = fds, data
        request = json.loads(data[1:]) if len(data) > 1 else _recv_json(reader)
        got["request"] = request
        os.write(fds[0], b"from QEMU")
        _send(conn, {"return": {}, "id": request["id"]})
        _recv_json(reader)
    path = os.path.join(short_dir, "q.sock")
    fake = _FakeQemu(path, script)
    r, w = os.pipe()
    try:
        with QmpClient(path, timeout=10, session=False) as qmp:
            qmp.send_fd(w, "mine")
        assert got["blank"].startswith(b" ") and len(got["fds"]) == 1
        assert got["request"]["execute"] == "getfd"
        assert got["request"]["arguments"] == {"fdname": "mine"}
        assert os.read(r, 100) == b"from QEMU"
    finally:
        os.close(r)
        os.close(w)
        for fd in got.get("fds", []):
            os.close(fd)
        fake.close()


@pytest.mark.qemu
def test_the_session_takes_over_the_negotiated_connection(qemu: Tuple[Any, str]) -> None:
    """Blocking calls, then the session on the same socket: nothing negotiated again,
    no event lost, out-of-band still on."""
    proc, sock = qemu
    with QmpClient(sock, timeout=30, session=False) as qmp:
        assert "open, blocking" in repr(qmp)
        assert qmp.call("stop") == {}                      # STOP comes before the reply
        assert [e["event"] for e in qmp.events] == ["STOP"]
        qmp.call("cont")         # RESUME: kept here, or left in the socket for the session
        qmp.start_session()
        qmp.start_session()                                 # once is enough
        assert "open, blocking" not in repr(qmp) and not qmp.closed
        assert qmp.wait_event("RESUME", timeout=10)["event"] == "RESUME"
        assert [e["event"] for e in qmp.events] == ["STOP", "RESUME"]
        assert qmp.call("query-status")["status"] == "running"
        with pytest.raises(QmpError, match="migrate-recover"):
            qmp.call_oob("migrate-recover", uri="unix:/nonexistent/x.sock")
        qmp.call("stop")
        assert qmp.wait_event("STOP", since=2, timeout=10)["event"] == "STOP"
    assert proc.poll() is None


def test_a_message_cut_by_a_timeout_is_read_whole_before_the_session(short_dir: str) -> None:
    """A blocking read that timed out halfway through a message: the session starts after it."""
    timed_out = threading.Event()

    def script(conn: socket.socket, reader: BinaryIO) -> None:
        _greet(conn, reader)
        first = _recv_json(reader)
        event = json.dumps({"event": "STOP", "data": {},
                            "timestamp": {"seconds": 1, "microseconds": 0}}).encode()
        conn.sendall(event[:10])                    # half an event, then silence
        timed_out.wait(10)
        conn.sendall(event[10:] + b"\r\n")
        _send(conn, {"return": "late", "id": first["id"]})
        second = _recv_json(reader)                 # through qemu.qmp now
        _send(conn, {"return": {"second": True}, "id": second["id"]})
        _recv_json(reader)

    path = os.path.join(short_dir, "q.sock")
    fake = _FakeQemu(path, script)
    try:
        with QmpClient(path, timeout=5, session=False) as qmp:
            with pytest.raises(TimeoutError, match="reply to first"):
                qmp.execute("first", timeout=0.3)
            timed_out.set()
            qmp.start_session()
            assert qmp.call("second") == {"second": True}
            assert [e["event"] for e in qmp.events] == ["STOP"]
    finally:
        timed_out.set()
        fake.close()
