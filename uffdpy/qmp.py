"""A synchronous, timeout-bounded face on ``qemu.qmp``, QEMU's own QMP library.

QMP, the QEMU Machine Protocol, is QEMU's JSON control channel (``-qmp
unix:PATH,server=on,wait=off``).  ``qemu.qmp`` (from PyPI, maintained in the
QEMU tree) speaks it with asyncio: command ids, events, file-descriptor
passing.  uffdpy's callers are synchronous and must never hang on a QEMU that
stopped answering (a guest blocked on a missing page holds QEMU's big lock,
and with it every in-band command), so :class:`QmpClient` runs one asyncio
loop in a private thread and bounds every wait by :attr:`QmpClient.timeout`:

* :meth:`QmpClient.call` runs a command in band; :meth:`QmpClient.call_oob`
  runs it out of band (``exec-oob``: QEMU's monitor I/O thread answers it even
  while the main loop is stuck, for the commands QAPI marks ``allow-oob``,
  such as ``migrate-recover`` and ``migrate-pause``).
* Events are collected as they arrive, in order, in :attr:`QmpClient.events`
  (plain dicts); :meth:`QmpClient.wait_event` waits for one.
* :meth:`QmpClient.send_fd` passes a descriptor with ``SCM_RIGHTS`` and names
  it with ``getfd``.

The greeting and the capability negotiation (out-of-band on whenever QEMU
offers it) are done here, blocking, and the negotiated socket is then handed
to ``qemu.qmp`` (which can skip both).  A client made with ``session=False``
stays in that blocking mode, one command at a time on the caller's thread,
until :meth:`QmpClient.start_session`: a command line that only needs a few
commands before its real work (``uffdpy resume``) does not import asyncio and
``qemu.qmp`` (about 18 ms here) on its way there.

A reply that comes after its call timed out is recognised by its id and
dropped.  Errors: :class:`QmpError` for QEMU's error answers;
``TimeoutError`` and ``ConnectionError`` (builtins) for the transport.
"""
from __future__ import annotations

import atexit
import itertools
import json
import os
import socket
import stat
import struct
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Dict, List, Optional, TypeVar

from .errors import UffdpyError

if TYPE_CHECKING:
    import asyncio

    from qemu.qmp import EventListener, QMPClient

__all__ = ["QmpClient", "QmpError", "MigrationFailed"]

_T = TypeVar("_T")

#: clients still open, closed at exit (a loop thread killed by the interpreter's
#: exit prints "Task was destroyed but it is pending!")
_OPEN: "weakref.WeakSet[QmpClient]" = weakref.WeakSet()
_exit_hook = threading.Lock()          # held once the hook is registered


def _track(client: "QmpClient") -> None:
    """Close ``client`` at exit if it is still open (the hook comes with the first client)."""
    if _exit_hook.acquire(blocking=False):
        atexit.register(_close_all)
    _OPEN.add(client)


def _close_all() -> None:
    for client in list(_OPEN):
        client.close()


def _quiet_qemu_qmp() -> None:
    """``qemu.qmp`` logs dropped late replies and disconnects as warnings; they are
    reported through our exceptions instead."""
    import logging
    logger = logging.getLogger("qemu.qmp")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
        logger.propagate = False


#: connections a QEMU may close during the QMP negotiation before it is an error
_GREETING_TRIES = 3
#: bytes looked at per read while waiting for a message's end
_PEEK = 1 << 16


def _unreachable(path: str, cause: Optional[BaseException]) -> str:
    """Why nothing answered at ``path``: no such file, not a socket, or nobody listening."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return ("no such socket (start QEMU with -qmp unix:PATH,server=on,wait=off, or "
                "check the path)")
    except OSError as e:
        return f"cannot reach it ({e.strerror})"
    if not stat.S_ISSOCK(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a regular file" \
            if stat.S_ISREG(mode) else "not a socket"
        return f"this is {kind}, not a QMP socket"
    if isinstance(cause, ConnectionRefusedError):
        return "nothing accepts connections on this socket (the QEMU that made it has exited?)"
    return f"did not accept a connection ({cause})"


class _Closed(ConnectionError):
    """QEMU closed the connection while a blocking read waited (retried during the greeting)."""


class MigrationFailed(UffdpyError, RuntimeError):
    """A migration ended ``failed`` or ``cancelled``; ``desc`` is QEMU's ``error-desc``."""

    def __init__(self, status: str, desc: str) -> None:
        super().__init__(f"migration {status}" + (f": {desc}" if desc else ""))
        self.status = status
        self.desc = desc


class QmpError(UffdpyError, RuntimeError):
    """QEMU answered a command with an error.

    ``command`` is the command name, ``error_class`` and ``desc`` are QEMU's
    ``error.class`` and ``error.desc`` (e.g. ``CommandNotFound``,
    ``"The command foo has not been found"``).
    """

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QmpClient:
    """One QMP connection to the UNIX socket ``path``.  A context manager.

    ``QmpClient(path, timeout=30.0)`` connects, retrying while the socket does
    not exist or refuses connections, for at most ``timeout`` seconds (or
    until ``alive()``, if given, says the QEMU behind it is gone), and
    negotiates capabilities (out-of-band on when QEMU offers it).
    ``timeout`` (an attribute; change it at will) bounds each later wait.
    ``session=False``: blocking commands on the caller's thread until
    :meth:`start_session` (see the module's docstring); events are then
    read only while a command's reply or :meth:`wait_event` is awaited, and
    the client is for one thread at a time.

    Raises:
        TimeoutError: the socket never accepted a connection, or QEMU sent no
            greeting, within ``timeout`` (the message names the path and what
            was awaited).
        ConnectionError: QEMU closed the connection.
    """

    def __init__(self, path: str, *, timeout: float = 30.0,
                 alive: Optional[Callable[[], bool]] = None, session: bool = True) -> None:
        self.path = path
        self.timeout = timeout
        self._alive = alive
        self.events: List[Dict[str, Any]] = []
        self.greeting: Dict[str, Any] = {}
        self._events_changed = threading.Condition()
        self._ids = itertools.count(1)
        #: the socket while the client is blocking; qemu.qmp's client once the session runs
        self._sock: Optional[socket.socket] = None
        self._partial = b""
        self._client: Optional["QMPClient"] = None
        self._loop: Optional["asyncio.AbstractEventLoop"] = None
        self._thread: Optional[threading.Thread] = None
        _track(self)
        try:
            self._sock = self._handshake()
            if session:
                self.start_session()
        except BaseException:
            self.close()
            raise

    # -- the greeting and the negotiation, blocking

    def _handshake(self) -> socket.socket:
        deadline = time.monotonic() + self.timeout
        last: Optional[BaseException] = None
        closed = 0
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                last = e
                if self._alive is not None and not self._alive():
                    raise ConnectionError(f"QMP {self.path}: the QEMU that made this socket "
                                          "has exited") from None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"QMP {self.path}: {_unreachable(self.path, last)} "
                                       f"(waited {self.timeout:g}s)") from None
                time.sleep(min(0.02, left))
                continue
            except OSError as e:
                sock.close()
                raise ConnectionError(f"QMP {self.path}: {_unreachable(self.path, e)}") from None
            try:
                self._greet(sock, deadline)
                return sock
            except _Closed as e:
                # Seen once in CI: a fresh QEMU closed the session during the
                # negotiation and was fine after.  Try again a few times; a
                # QEMU that keeps closing (or has exited) is reported.
                sock.close()
                closed += 1
                if closed >= _GREETING_TRIES or deadline - time.monotonic() <= 0:
                    raise ConnectionError(f"QMP {self.path}: QEMU closed the connection "
                                          f"during the greeting ({e})") from None
                time.sleep(0.05)
            except BaseException:
                sock.close()
                raise

    def _greet(self, sock: socket.socket, deadline: float) -> None:
        """Read the greeting on ``sock`` and negotiate (out-of-band on when offered)."""
        self._partial = b""
        try:
            greeting = self._read(sock, deadline, "the QMP greeting")
            # Seen once in CI (QEMU 10.0.2, a guest started without -S): the RESUME
            # event came before the greeting, the client connected as the VM started.
            # An event is kept; the greeting is what follows it.
            while isinstance(greeting, dict) and "QMP" not in greeting and self._kept(greeting):
                greeting = self._read(sock, deadline, "the QMP greeting")
        except TimeoutError:
            raise TimeoutError(f"QMP {self.path}: accepted the connection but sent no "
                               f"QMP greeting within {self.timeout:g}s (another client "
                               "holds this monitor, or it is not QEMU's)") from None
        offered = greeting.get("QMP", {}).get("capabilities") if isinstance(greeting, dict) \
            else None
        if not isinstance(offered, list):
            raise ConnectionError(f"QMP {self.path}: the first message is no QMP greeting: "
                                  f"{json.dumps(greeting)[:200]}")
        self.greeting = greeting
        arguments = {"enable": ["oob"]} if "oob" in offered else None
        try:
            self._exchange(sock, "qmp_capabilities", arguments, False, deadline)
        except TimeoutError:
            raise TimeoutError(
                f"QMP {self.path}: QEMU sent its greeting but did not answer "
                f"qmp_capabilities within {self.timeout:g}s: its main loop is stuck "
                "(a guest blocked on a missing page holds QEMU's big lock); only a "
                "QMP session negotiated before can still act (out of band), or "
                "kill QEMU") from None
        except QmpError as e:
            raise ConnectionError(f"QMP {self.path}: QEMU refused the capability "
                                  f"negotiation ({e.desc})") from None

    def _read(self, sock: socket.socket, deadline: float, what: str) -> Any:
        """The next message on ``sock`` by ``deadline``, read through its newline and no
        further (what follows stays in the socket for ``qemu.qmp``)."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"QMP {self.path}: timed out waiting for {what}")
            sock.settimeout(left)
            try:
                data = sock.recv(_PEEK, socket.MSG_PEEK)
            except socket.timeout:
                continue
            except OSError as e:
                raise _Closed(f"QMP {self.path}: the connection failed while we waited for "
                              f"{what} ({e.strerror or e})") from None
            if not data:
                raise _Closed(f"QMP {self.path}: QEMU closed the connection while we "
                              f"waited for {what}")
            end = data.find(b"\n")
            if end < 0:                        # not whole yet: keep it, wait for the rest
                self._partial += sock.recv(len(data))
                continue
            line, self._partial = self._partial + sock.recv(end + 1), b""
            if line.strip():
                try:
                    return json.loads(line)
                except ValueError:
                    raise ConnectionError(f"QMP {self.path}: not a QMP message: "
                                          f"{line[:200]!r}") from None

    def _exchange(self, sock: socket.socket, command: str, arguments: Optional[Dict[str, Any]],
                  oob: bool, deadline: float) -> Any:
        """Send one command on ``sock`` and read until its reply; events met are kept."""
        ident = f"uffdpy-{next(self._ids)}"
        message: Dict[str, Any] = {"exec-oob" if oob else "execute": command, "id": ident}
        if arguments:
            message["arguments"] = arguments
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            sock.sendall(json.dumps(message).encode())
        except socket.timeout:
            raise TimeoutError(f"QMP {self.path}: timed out sending {command}") from None
        except OSError as e:
            raise _Closed(f"QMP {self.path}: QEMU closed the connection ({e.strerror or e})") \
                from None
        while True:
            reply = self._read(sock, deadline, f"the reply to {command}")
            if not isinstance(reply, dict) or self._kept(reply):
                continue
            if reply.get("id") != ident:
                continue                       # a late reply to a call that timed out
            if "error" in reply:
                error = reply["error"] if isinstance(reply["error"], dict) else {}
                raise QmpError(command, str(error.get("class", "")), str(error.get("desc", "")))
            return reply.get("return")

    def _kept(self, message: Dict[str, Any]) -> bool:
        """Keep ``message`` in :attr:`events` if it is one; whether it was."""
        if "event" not in message:
            return False
        with self._events_changed:
            self.events.append(message)
            self._events_changed.notify_all()
        return True

    # -- the session: qemu.qmp's, on a private loop

    def start_session(self) -> None:
        """Hand the connection to ``qemu.qmp`` (a private asyncio loop and thread): events
        are then collected as they come, and in-band and out-of-band calls may overlap.
        Nothing if it runs already.  Raises: ConnectionError (closed), TimeoutError."""
        if self._client is not None:
            return
        sock = self._sock
        if sock is None:
            raise ConnectionError(f"QMP {self.path}: the client is closed")
        if self._partial:           # a read cut short by a timeout: its message, whole, first
            try:
                message = self._read(sock, time.monotonic() + self.timeout, "a message's end")
            except _Closed as e:
                raise ConnectionError(str(e)) from None
            if isinstance(message, dict):
                self._kept(message)
        import asyncio

        from qemu.qmp import QMPClient
        _quiet_qemu_qmp()
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="uffdpy-qmp",
                                            daemon=True)
            self._thread.start()
        client = QMPClient("uffdpy")
        client.await_greeting = False          # both were done on this socket already
        client.negotiate = False
        sock.settimeout(None)
        self._run(client.connect(sock), self.timeout, "the QMP session")
        self._client, self._sock = client, None
        asyncio.run_coroutine_threadsafe(self._collect(client.events), self._loop)

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float, what: str) -> _T:
        import asyncio
        import concurrent.futures
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout=max(0.001, timeout))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"QMP {self.path}: waited {timeout:g}s for {what}") from None

    async def _collect(self, listener: "EventListener") -> None:
        while True:
            message = await listener.get()
            with self._events_changed:
                self.events.append(dict(message))
                self._events_changed.notify_all()

    # -- commands

    @property
    def closed(self) -> bool:
        return self._client is None and self._sock is None

    def call(self, command: str, **arguments: Any) -> Any:
        """Run ``command`` in band with ``arguments``; return QEMU's ``return`` value.

        Arguments whose QMP names are not identifiers go in a dict:
        ``call("human-monitor-command", **{"command-line": "info mtree"})``.

        Raises:
            QmpError: QEMU answered with an error.
            TimeoutError: no reply within ``timeout`` seconds.
            ConnectionError: QEMU closed the connection (or this client is closed).
        """
        return self.execute(command, arguments)

    def call_oob(self, command: str, **arguments: Any) -> Any:
        """As :meth:`call`, out of band (``exec-oob``); for ``allow-oob`` commands only."""
        return self.execute(command, arguments, oob=True)

    def execute(self, command: str, arguments: Optional[Dict[str, Any]] = None, *,
                oob: bool = False, timeout: Optional[float] = None) -> Any:
        """Run ``command``; ``timeout`` overrides :attr:`timeout` for this call. Raises: as :meth:`call`."""
        wait = self.timeout if timeout is None else timeout
        client = self._client
        if client is None:
            if self._sock is None:
                raise ConnectionError(f"QMP {self.path}: the client is closed")
            try:
                return self._exchange(self._sock, command, arguments, oob,
                                      time.monotonic() + wait)
            except TimeoutError:
                raise TimeoutError(f"QMP {self.path}: waited {wait:g}s for the reply to "
                                   f"{command}") from None
            except _Closed as e:
                raise ConnectionError(str(e)) from None
        from qemu.qmp import ExecInterruptedError, ExecuteError
        try:
            return self._run(client.execute(command, arguments or None, oob=oob), wait,
                             f"the reply to {command}")
        except ExecuteError as e:
            raise QmpError(command, e.error_class, str(e)) from None
        except (ExecInterruptedError, EOFError, ConnectionError) as e:
            raise ConnectionError(f"QMP {self.path}: QEMU closed the connection while we "
                                  f"waited for the reply to {command} ({e})") from None
        except Exception as e:     # qemu.qmp's StateError after a disconnect, and kin
            if client.runstate.name != "RUNNING":
                raise ConnectionError(f"QMP {self.path}: the connection is gone "
                                      f"({type(e).__name__}: {e})") from None
            raise

    def wait_migration(self, *, timeout: Optional[float] = None,
                       poll: float = 0.01) -> Dict[str, Any]:
        """Poll ``query-migrate`` until the migration (out or in) has completed; its info.

        Raises: MigrationFailed (status ``failed`` or ``cancelled``, with QEMU's
        ``error-desc``); TimeoutError after ``timeout`` (default :attr:`timeout`)
        seconds, naming the last status; as :meth:`call`.
        """
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            info = dict(self.call("query-migrate"))
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise MigrationFailed(str(status), str(info.get("error-desc") or ""))
            if time.monotonic() > deadline:
                raise TimeoutError(f"QMP {self.path}: the migration did not complete within "
                                   f"{wait:g}s (status {status})")
            time.sleep(poll)

    def send_fd(self, fd: int, name: str) -> None:
        """Pass ``fd`` to QEMU (``SCM_RIGHTS``) and name it ``name`` with ``getfd``.

        Raises: as :meth:`call`.
        """
        client, sock = self._client, self._sock
        if client is not None:
            async def send() -> None:
                client.send_fd_scm(fd)
            self._run(send(), self.timeout, "passing a file descriptor")
        elif sock is not None:
            # one blank (JSON whitespace to QEMU) carries the descriptor, as qemu.qmp sends it
            sock.settimeout(self.timeout)
            try:
                sock.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       struct.pack("@i", fd))])
            except OSError as e:
                raise ConnectionError(f"QMP {self.path}: passing a file descriptor failed "
                                      f"({e.strerror or e})") from None
        else:
            raise ConnectionError(f"QMP {self.path}: the client is closed")
        self.call("getfd", fdname=name)

    # -- events

    def wait_event(self, name: str, *, timeout: Optional[float] = None, since: int = 0,
                   match: Optional[Callable[[Dict[str, Any]], bool]] = None) -> Dict[str, Any]:
        """The first event ``name`` at index ``since`` or later of :attr:`events` (and ``match``).

        Raises: TimeoutError if none arrived within ``timeout`` (default
        :attr:`timeout`) seconds.
        """
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        sock = self._sock
        if self._client is None and sock is not None:       # blocking: read until it comes
            while True:
                found = self._find_event(name, since, match)
                if found is not None:
                    return found
                try:
                    message = self._read(sock, deadline, f"a {name} event")
                except TimeoutError:
                    raise TimeoutError(f"QMP {self.path}: no {name} event within "
                                       f"{wait:g}s") from None
                except _Closed as e:
                    raise ConnectionError(str(e)) from None
                if isinstance(message, dict):
                    self._kept(message)        # anything else: a late reply, dropped
        with self._events_changed:
            while True:
                found = self._find_event(name, since, match)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"QMP {self.path}: no {name} event within {wait:g}s")
                self._events_changed.wait(left)

    def _find_event(self, name: str, since: int,
                    match: Optional[Callable[[Dict[str, Any]], bool]]) -> Optional[Dict[str, Any]]:
        for event in self.events[since:]:
            if event.get("event") == name and (match is None or match(event)):
                return event
        return None

    # -- ownership

    def close(self) -> None:
        """Close the connection (QEMU keeps running) and stop the loop; safe to call again."""
        _OPEN.discard(self)
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        client, self._client = self._client, None
        if client is not None:
            try:
                self._run(client.disconnect(), 5.0, "disconnect")
            except Exception:       # a connection already gone leaves nothing to report
                pass
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            import asyncio

            async def stop() -> None:
                for task in asyncio.all_tasks():
                    if task is not asyncio.current_task():
                        task.cancel()
            try:
                self._run(stop(), 5.0, "stopping")
            except Exception:
                pass
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
        if not thread.is_alive() and not loop.is_closed():
            loop.close()

    def __enter__(self) -> "QmpClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open" if self._client else "open, blocking"
        return f"<QmpClient {self.path} {state}>"
