"""A synchronous, timeout-bounded face on ``qemu.qmp``, QEMU's own QMP library.

QMP, the QEMU Machine Protocol, is QEMU's JSON control channel (``-qmp
unix:PATH,server=on,wait=off``).  ``qemu.qmp`` (from PyPI, maintained in the
QEMU tree) speaks it with asyncio: greeting, capability negotiation
(out-of-band execution is enabled whenever QEMU offers it), command ids,
events, file-descriptor passing.  uffdpy's callers are synchronous and must
never hang on a QEMU that stopped answering (a guest blocked on a missing
page holds QEMU's big lock, and with it every in-band command), so
:class:`QmpClient` runs one asyncio loop in a private thread and bounds every
wait by :attr:`QmpClient.timeout`:

* :meth:`QmpClient.call` runs a command in band; :meth:`QmpClient.call_oob`
  runs it out of band (``exec-oob``: QEMU's monitor I/O thread answers it even
  while the main loop is stuck, for the commands QAPI marks ``allow-oob``,
  such as ``migrate-recover`` and ``migrate-pause``).
* Events are collected as they arrive, in order, in :attr:`QmpClient.events`
  (plain dicts); :meth:`QmpClient.wait_event` waits for one.
* :meth:`QmpClient.send_fd` passes a descriptor with ``SCM_RIGHTS`` and names
  it with ``getfd``.

A reply that comes after its call timed out is recognised by its id and
dropped (``qemu.qmp`` does that).  Errors: :class:`QmpError` for QEMU's
error answers; ``TimeoutError`` and ``ConnectionError`` (builtins) for the
transport.
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import stat
import threading
import time
import weakref
from typing import Any, Callable, Coroutine, Dict, List, Optional, TypeVar

from qemu.qmp import ConnectError, EventListener, ExecInterruptedError, ExecuteError, QMPClient

from .errors import UffdpyError

__all__ = ["QmpClient", "QmpError", "MigrationFailed"]

# qemu.qmp logs dropped late replies and disconnects as warnings; they are
# reported through our exceptions instead.
logging.getLogger("qemu.qmp").addHandler(logging.NullHandler())
logging.getLogger("qemu.qmp").propagate = False

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


#: connections a QEMU may close during the QMP negotiation before it is an error
_GREETING_TRIES = 3


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

    Raises:
        TimeoutError: the socket never accepted a connection, or QEMU sent no
            greeting, within ``timeout`` (the message names the path and what
            was awaited).
        ConnectionError: QEMU closed the connection.
    """

    def __init__(self, path: str, *, timeout: float = 30.0,
                 alive: Optional[Callable[[], bool]] = None) -> None:
        self.path = path
        self.timeout = timeout
        self._alive = alive
        self.events: List[Dict[str, Any]] = []
        self.greeting: Dict[str, Any] = {}
        self._events_changed = threading.Condition()
        self._client: Optional[QMPClient] = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="uffdpy-qmp",
                                        daemon=True)
        self._thread.start()
        _track(self)
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    # -- the private loop

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float, what: str) -> _T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout=max(0.001, timeout))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"QMP {self.path}: waited {timeout:g}s for {what}") from None

    def _connect(self) -> None:
        deadline = time.monotonic() + self.timeout
        last: Optional[BaseException] = None
        closed = 0
        while True:
            client = QMPClient("uffdpy")
            left = deadline - time.monotonic()
            try:
                self._run(asyncio.wait_for(client.connect(self.path), left),
                          left + 1.0, "the QMP greeting")
            except (asyncio.TimeoutError, TimeoutError):
                greeted = getattr(client, "_greeting", None) is not None
                self._discard(client)
                if last is not None and not greeted:      # refused until the time ran out
                    raise TimeoutError(f"QMP {self.path}: {_unreachable(self.path, last)} "
                                       f"(waited {self.timeout:g}s)") from None
                if greeted:
                    raise TimeoutError(
                        f"QMP {self.path}: QEMU sent its greeting but did not answer "
                        f"qmp_capabilities within {self.timeout:g}s: its main loop is stuck "
                        "(a guest blocked on a missing page holds QEMU's big lock); only a "
                        "QMP session negotiated before can still act (out of band), or "
                        "kill QEMU") from None
                raise TimeoutError(f"QMP {self.path}: accepted the connection but sent no "
                                   f"QMP greeting within {self.timeout:g}s (another client "
                                   "holds this monitor, or it is not QEMU's)") from None
            except ConnectError as e:
                self._discard(client)
                cause = e.exc
                if not isinstance(cause, (FileNotFoundError, ConnectionRefusedError)):
                    # Seen once in CI: a fresh QEMU closed the session during
                    # the negotiation ("Negotiation failed: ") and was fine
                    # after. Try again a few times; a QEMU that keeps closing
                    # (or has exited) is reported.
                    closed += 1
                    if closed >= _GREETING_TRIES or deadline - time.monotonic() <= 0:
                        raise ConnectionError(f"QMP {self.path}: QEMU closed the connection "
                                              f"during the greeting ({e})") from None
                    time.sleep(0.05)
                    continue
                last = cause
                if self._alive is not None and not self._alive():
                    raise ConnectionError(f"QMP {self.path}: the QEMU that made this socket "
                                          "has exited") from None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"QMP {self.path}: {_unreachable(self.path, last)} "
                                       f"(waited {self.timeout:g}s)") from None
                time.sleep(min(0.02, left))
                continue
            except BaseException:
                self._discard(client)
                raise
            self._client = client
            greeting = client.greeting
            # the greeting model keeps the message it was built from
            self.greeting = dict(getattr(greeting, "_raw", None) or {})
            asyncio.run_coroutine_threadsafe(self._collect(client.events), self._loop)
            return

    def _discard(self, client: QMPClient) -> None:
        try:
            self._run(client.disconnect(), 5.0, "disconnect")
        except Exception:       # a failed connect leaves nothing worth reporting
            pass

    async def _collect(self, listener: EventListener) -> None:
        while True:
            message = await listener.get()
            with self._events_changed:
                self.events.append(dict(message))
                self._events_changed.notify_all()

    # -- commands

    @property
    def closed(self) -> bool:
        return self._client is None

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
        client = self._client
        if client is None:
            raise ConnectionError(f"QMP {self.path}: the client is closed")
        wait = self.timeout if timeout is None else timeout
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
        client = self._client
        if client is None:
            raise ConnectionError(f"QMP {self.path}: the client is closed")

        async def send() -> None:
            client.send_fd_scm(fd)
        self._run(send(), self.timeout, "passing a file descriptor")
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
        with self._events_changed:
            while True:
                for event in self.events[since:]:
                    if event.get("event") == name and (match is None or match(event)):
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"QMP {self.path}: no {name} event within {wait:g}s")
                self._events_changed.wait(left)

    # -- ownership

    def close(self) -> None:
        """Close the connection (QEMU keeps running) and stop the loop; safe to call again."""
        _OPEN.discard(self)
        client, self._client = self._client, None
        if client is not None:
            self._discard(client)
        if self._thread.is_alive():
            async def stop() -> None:
                for task in asyncio.all_tasks():
                    if task is not asyncio.current_task():
                        task.cancel()
            try:
                self._run(stop(), 5.0, "stopping")
            except Exception:
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> "QmpClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._client is None else "open"
        return f"<QmpClient {self.path} {state}>"
