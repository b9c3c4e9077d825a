"""The command's postcopy resume: the stream in a child process, the QMP session kept here.

Why two processes.  If the source of a postcopy load dies, the destination
pauses (``postcopy-paused``) and can be finished by a new source after an
out-of-band ``migrate-recover``.  But a source that dies in the first tens of
milliseconds often leaves the guest's vCPU blocked on a missing page *while
holding QEMU's big lock*: from then on in-band QMP never answers, not even the
``qmp_capabilities`` that opens a new session, so nobody can run
``migrate-recover`` any more, except through a session negotiated *before*
(its out-of-band commands are answered by the monitor's own thread).  So the
process a user sees (the *supervisor*) negotiates the QMP session, sets the
destination up, and forks a *server* that connects and serves the stream
(:class:`.postcopy.Resume`).  The first server is forked before the session
opens: it imports the stream's engine while the supervisor sets the
destination up (the two overlap: about 3 ms sooner to the connect), then
waits on a pipe for its orders (the address, preempt, the page sizes).  The
session is a blocking one (``QmpClient(session=False)``): the supervisor
does one thing at a time, the events wait in the socket until it looks for
them, no asyncio thread is there to be forked, and none is imported on the
way to the connect.  The session stays open here until the load has completed:

* the server dies (a crash, SIGKILL, an OOM kill): the supervisor sees the
  ``postcopy-paused`` event, runs ``migrate-recover`` out of band and forks a
  new server in recovery mode, at once (``auto_recoveries`` in the stats);
* the supervisor dies: the server, in a session of its own, serves on until
  the load completes;
* the load fails before RUN (nothing can be recovered), or the destination
  refuses the stream or goes away: the server reports the one-line error and
  the supervisor raises it with QEMU's reason.

The server closes every inherited descriptor but the ones it needs (it keeps
the numbers, pointing at ``/dev/null``, so the parent's Python objects it
also inherited never close a descriptor of its own), so the QMP session ends
when the supervisor does, and it ends with ``os._exit``.  Its report (the
stats) and its progress come back on a pipe, one JSON line each.
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import time
from importlib import import_module
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from ..mappedram import Snapshot
from ..qmp import QmpError
from .destination import DestinationError, QemuDestination, ResumeError, event_time
from .options import ResumeOptions
from .stats import ResumeStats

__all__ = ["SupervisedResume", "BeforeRun"]

class BeforeRun(DestinationError):
    """The stream's server died before the guest ran: QEMU failed the load; start it again."""


#: recoveries after server deaths before the supervisor gives up
DEFAULT_MAX_RECOVERIES = 3
#: how long to wait for the destination to pause after its server died
_PAUSE_WAIT_S = 10.0


class SupervisedResume:
    """Resume ``snapshot`` into the destination at QMP socket ``qmp``, the stream in a child.

    ``options`` (a :class:`~.options.ResumeOptions`, or the same names as
    keywords, which override it) say how each server streams, how it reaches
    the destination (``transport``) and the bound on each wait
    (``timeout``); with ``recover`` the first server finishes a destination
    left ``postcopy-paused`` by a source that died.  :meth:`run` returns the last
    server's report (the stats) with ``auto_recoveries`` and the times read
    from QEMU's events.  ``progress(sent, total)`` is called while it runs.

    Raises (from :meth:`run`): DestinationError, ResumeError; KeyboardInterrupt
    (the server is stopped first; once it had connected, the exception's
    message says how to finish the load).
    """

    def __init__(self, snapshot: Union[str, Snapshot], *, qmp: str,
                 options: Optional[ResumeOptions] = None,
                 max_recoveries: int = DEFAULT_MAX_RECOVERIES,
                 progress: Optional[Callable[[int, int], None]] = None,
                 alive: Optional[Callable[[], bool]] = None, **fields: Any) -> None:
        self.snapshot = snapshot                # the server, forked, serves this very file
        self.path = snapshot.path if isinstance(snapshot, Snapshot) else snapshot
        self.qmp = qmp
        self.options = (options or ResumeOptions()).replace(**fields)
        self.transport = self.options.transport
        self.recover = self.options.recover
        self.timeout = self.options.timeout
        self.max_recoveries = max_recoveries
        self.progress = progress or (lambda sent, total: None)
        self.alive = alive                     # the destination QEMU we started, if any
        self.auto_recoveries = 0
        self.server_pid: Optional[int] = None
        self._dest: Optional[QemuDestination] = None
        self._keep: List[socket.socket] = []
        self._connected = False                # a server has connected (the guest may run)
        self._early: Optional[_Server] = None   # a server forked ahead, not yet ordered
        #: whether the stream uses postcopy-preempt: as asked or by default, then as
        #: the destination turns out to have it (recovery, an address left listening)
        self._preempt = self.options.preempt_over(self.transport)

    # -- the supervisor

    def run(self) -> Dict[str, Any]:
        try:
            return self._run()
        finally:
            self._release()

    def _run(self) -> Dict[str, Any]:
        # the first server forks before the session opens: it readies itself (its
        # imports, ctypes among them) while this process sets the destination up, and
        # waits for its orders (an fd transport's socket does not exist yet: not then)
        if self.transport != "fd":
            self._early = self._fork_server()
        # blocking QMP: one thread, one command or event wait at a time, out of band
        # still on; no asyncio to import (~18 ms) on the way to the connect
        dest = self._dest = QemuDestination(self.qmp, timeout=self.timeout, alive=self.alive,
                                            session=False)
        since = len(dest.client.events)
        page_sizes: Dict[str, int] = {}
        if self.recover:                        # as the paused destination has it
            self._preempt = dest.preempt_capability(self._preempt)
            address = self._dest.recover()
        else:
            dest.refuse_private_file_backends()         # before anything can discard RAM
            if isinstance(self.snapshot, Snapshot):
                page_sizes = dest.check_matches(self.snapshot)
            else:
                with Snapshot.open(self.snapshot) as snap:
                    page_sizes = dest.check_matches(snap)
            listening = self._listening_address(dest)
            if listening is not None:
                address, self._preempt = listening
            else:
                dest.prepare(preempt=self._preempt)
                address, ours = dest.listen_private(self.transport)
                if ours is not None:
                    self._keep.append(ours)
        recovering = self.recover
        first_connect: Optional[float] = None
        while True:
            mark = len(dest.client.events)
            server, self._early = self._early or self._fork_server(), None
            pid, report_r = server.pid, server.report_r
            server.order(address, recovering, self._preempt, page_sizes)
            try:
                report = self._watch(pid, report_r)
            except KeyboardInterrupt as e:
                self._stop_server(pid)
                if self._connected or recovering:
                    e.args = (self._interrupted_message(),)
                raise
            finally:
                os.close(report_r)
            if first_connect is None:
                first_connect = report.get("connected_at")
            if "stats" in report:
                return self._finish(report["stats"], since, first_connect)
            if "error" in report:
                if report.get("kind") == "destination":
                    raise DestinationError(report["error"], dest.failure_reason(wait=0.5))
                raise ResumeError(report["error"])
            # the server died without a word: recover if the destination paused
            why = report.get("died", "the server died")
            status = "setup" if not recovering and self._still_listening(dest) \
                else self._await_end(mark)
            if status == "completed":            # it died after the last byte: done
                return self._finish({"recovered": recovering}, since, first_connect)
            if status == "setup":
                # it died before its connect: the destination still listens; again
                if self.auto_recoveries >= self.max_recoveries:
                    raise ResumeError(f"{why} before it connected, "
                                      f"{self.auto_recoveries + 1} times")
                self.auto_recoveries += 1
                continue
            if status == "failed" and not recovering:
                raise BeforeRun(f"{why} before the guest ran, so QEMU failed the load; a "
                                "destination takes one incoming migration: restart it",
                                dest.failure_reason(wait=0.5))
            if status != "postcopy-paused":
                raise DestinationError(f"{why} and the destination is {status}, not "
                                       "postcopy-paused: nothing to recover",
                                       dest.failure_reason(wait=0.5))
            if self.auto_recoveries >= self.max_recoveries:
                raise ResumeError(f"{why} again after {self.auto_recoveries} recoveries; "
                                  "the destination is postcopy-paused: "
                                  + self._recover_hint())
            self.auto_recoveries += 1
            address = self._dest.recover()
            recovering = True

    def _listening_address(self, dest: QemuDestination) -> Optional[Tuple[str, bool]]:
        """The address of an incoming migration an earlier resume started, if
        any, and whether it has postcopy-preempt on.

        A source killed between ``migrate-incoming`` and its connect leaves the
        destination in ``setup``, listening; a new ``migrate-incoming`` is then
        refused.  Connect to what it listens on, if postcopy is on there (and
        preempt as asked, when it was).
        """
        info = dest.status()
        if info.get("status") != "setup":
            return None
        addresses = [a for a in info.get("socket-address", [])
                     if a.get("type") in ("unix", "inet")]
        if not addresses:
            raise DestinationError(f"QMP {dest.path}: the destination already waits for an "
                                   "incoming migration, on an address uffdpy cannot reach "
                                   "(an fd); restart it")
        caps = {c["capability"]: c["state"]
                for c in dest.client.call("query-migrate-capabilities")}
        has_preempt = bool(caps.get("postcopy-preempt"))
        asked = self.options.preempt
        if not caps.get("postcopy-ram") or (asked is not None and has_preempt != asked):
            raise DestinationError(
                f"QMP {dest.path}: the destination already waits for an incoming migration "
                f"with postcopy-ram {caps.get('postcopy-ram')} and postcopy-preempt "
                f"{caps.get('postcopy-preempt')}; resume it with those, or restart it")
        a = addresses[0]
        if a["type"] == "unix":
            return f"unix:{a['path']}", has_preempt
        return f"tcp:{a['host']}:{a['port']}", has_preempt

    @staticmethod
    def _still_listening(dest: QemuDestination) -> bool:
        try:            # in band, briefly: a destination stuck under its big lock is no "setup"
            return dest.client.execute("query-migrate", timeout=0.5).get("status") == "setup"
        except (TimeoutError, QmpError, ConnectionError):
            return False

    def _await_end(self, mark: int) -> str:
        """The destination's state after its server died, from the events after ``mark``.

        Events come from the monitor's own thread, so they arrive even when the
        guest holds QEMU's big lock and in-band QMP is stuck.
        """
        assert self._dest is not None
        ends = ("postcopy-paused", "failed", "completed", "cancelled")
        try:
            event = self._dest.client.wait_event(
                "MIGRATION", since=mark, timeout=_PAUSE_WAIT_S,
                match=lambda e: e.get("data", {}).get("status") in ends)
        except TimeoutError:
            return "not paused"
        return str(event["data"]["status"])

    def _watch(self, pid: int, report_r: int) -> Dict[str, Any]:
        """Read the server's lines until it exits; its last report, or how it died."""
        buf = b""
        report: Dict[str, Any] = {}
        while True:
            ready, _, _ = select.select([report_r], [], [], 0.2)
            if ready:
                chunk = os.read(report_r, 1 << 16)
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    msg = json.loads(line)
                    if "progress" in msg:
                        self.progress(*msg["progress"])
                    else:
                        self._connected = self._connected or "connected_at" in msg
                        report.update(msg)
                if chunk:
                    continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done and ready:                 # the pipe closed, the exit comes next
                time.sleep(0.005)
            if done:
                self.server_pid = None
                if "stats" not in report and "error" not in report:
                    how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                           else f"exited with {os.WEXITSTATUS(status)}")
                    report["died"] = f"the stream's server (pid {pid}) was {how}"
                return report

    def _stop_server(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        self.server_pid = None

    def _recover_hint(self) -> str:
        return (f"finish it with: uffdpy resume {self.path} --qmp {self.qmp}"
                + ("" if self._preempt else " --no-preempt") + " --recover")

    def _interrupted_message(self) -> str:
        return ("interrupted: the stream is stopped and the destination is left postcopy-paused "
                f"(its guest waits for its missing pages); {self._recover_hint()}")

    def _finish(self, stats: Dict[str, Any], since: int,
                connected_at: Optional[float]) -> Dict[str, Any]:
        out: Dict[str, Any] = {**ResumeStats().as_dict(), **stats}
        out["auto_recoveries"] = self.auto_recoveries
        out["connected_at"] = connected_at
        assert self._dest is not None
        client = self._dest.client
        if connected_at is not None:
            try:
                done = client.wait_event(
                    "MIGRATION", since=since, timeout=self.timeout,
                    match=lambda e: e.get("data", {}).get("status") == "completed")
                out["time_to_complete_s"] = round(event_time(done) - connected_at, 6)
            except (TimeoutError, ConnectionError):
                pass
            for event in client.events[since:]:
                if event.get("event") == "RESUME":
                    out["time_to_running_s"] = round(event_time(event) - connected_at, 6)
                    break
        return out

    def _release(self) -> None:
        if self._early is not None:           # never ordered: it ends when its orders close
            self._early.dismiss()
            self._early = self.server_pid = None
        for sock in self._keep:
            sock.close()
        self._keep = []
        if self._dest is not None:
            self._dest.close()
            self._dest = None

    # -- the server (the forked child)

    def _fork_server(self) -> _Server:
        """Fork a server: it readies itself, then waits for :meth:`_Server.order`."""
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        orders_r, orders_w = os.pipe2(os.O_CLOEXEC)
        keep = [report_w, orders_r] + [s.fileno() for s in self._keep]
        if isinstance(self.snapshot, Snapshot):
            keep.append(self.snapshot.fileno())              # the server reads this file
        pid = os.fork()
        if pid == 0:                                          # the server
            code = 70
            try:
                _detach(keep)
                code = self._serve(report_w, orders_r)
            finally:
                os._exit(code)
        os.close(report_w)
        os.close(orders_r)
        self.server_pid = pid
        return _Server(pid, report_r, orders_w)

    def _serve(self, report_w: int, orders_r: int) -> int:
        def send(msg: Dict[str, Any]) -> None:
            try:
                os.write(report_w, json.dumps(msg).encode() + b"\n")
            except OSError:               # the supervisor is gone: serve on regardless
                pass

        # ready before the orders come: the stream and its engine (ctypes) imported
        from .postcopy import Resume
        import_module(".sender", __package__)
        orders = _read_orders(orders_r)
        if orders is None:                # dismissed (the set-up failed): nothing to do
            return 0
        options = self.options.replace(preempt=orders["preempt"], recover=False)
        if orders["recover"]:            # what shaped the first moments is past
            options = options.for_recovery()
        try:
            with Resume(self.snapshot, connect=orders["address"], options=options,
                        page_sizes=orders["page_sizes"] or None) as r:
                send({"connected_at": r.connected_at})
                while True:
                    try:
                        r.wait(0.1)
                        break
                    except TimeoutError:
                        send({"progress": list(r.progress())})
                send({"stats": r.report()})
            return 0
        except DestinationError as e:
            send({"error": e.message, "kind": "destination"})
            return 2
        except Exception as e:          # one line back to the supervisor, never a traceback
            send({"error": str(e) or type(e).__name__, "kind": "resume"})
            return 2


class _Server:
    """A forked server, as the supervisor holds it: its pid, the pipe of its reports,
    and the pipe of its orders until they are given (or it is dismissed)."""

    def __init__(self, pid: int, report_r: int, orders_w: int) -> None:
        self.pid = pid
        self.report_r = report_r
        self._orders_w: Optional[int] = orders_w

    def order(self, address: str, recover: bool, preempt: bool,
              page_sizes: Dict[str, int]) -> None:
        """Where to connect and how: one line (atomic in a pipe); the pipe closes after it."""
        assert self._orders_w is not None
        line = json.dumps({"address": address, "recover": recover, "preempt": preempt,
                           "page_sizes": page_sizes}).encode() + b"\n"
        try:
            os.write(self._orders_w, line)
        except BrokenPipeError:          # it died already: the supervisor's watch says how
            pass
        finally:
            os.close(self._orders_w)
            self._orders_w = None

    def dismiss(self) -> None:
        """End a server never ordered: its orders close, it exits, it is reaped."""
        if self._orders_w is not None:
            os.close(self._orders_w)
            self._orders_w = None
        os.close(self.report_r)
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _read_orders(fd: int) -> Optional[Dict[str, Any]]:
    """The server's orders: one JSON line, or None when the pipe closes without one."""
    with open(fd, "rb") as pipe:
        line = pipe.readline()
    return dict(json.loads(line)) if line.endswith(b"\n") else None


def _detach(keep: List[int]) -> None:
    """In the forked server: a session of its own, default signals, only ``keep`` fds open.

    Every other inherited descriptor (the QMP session, the terminal's
    stdin...) is pointed at /dev/null instead of closed: the numbers stay
    taken, so no inherited Python object can close one of ours.
    """
    os.setsid()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDWR)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep and fd != devnull:
            try:
                os.dup2(devnull, fd, inheritable=False)
            except OSError:
                pass
    os.dup2(devnull, 0)
