"""A small synchronous QMP client over a UNIX socket (standard library only).

QMP, the QEMU Machine Protocol, is QEMU's JSON control channel (``-qmp
unix:PATH,server=on,wait=off``).  On connect QEMU sends a greeting
(``{"QMP": {...}}``); the client must send ``qmp_capabilities`` before any
other command.  Each command is one JSON object, ``{"execute": NAME,
"arguments": {...}, "id": ...}``; QEMU answers with ``{"return": ...}`` or
``{"error": {"class": ..., "desc": ...}}`` carrying the same ``id``.  At any
moment QEMU may also send asynchronous events (``{"event": "STOP", ...}``).

:class:`QmpClient` connects (retrying until QEMU has created the socket),
reads the greeting, negotiates capabilities, then runs one command at a time:
:meth:`QmpClient.call` returns the ``return`` value or raises
:class:`QmpError`.  Events that arrive while it waits for a reply are kept, in
order, in :attr:`QmpClient.events`.  Every wait (connect, greeting, reply) is
bounded by :attr:`QmpClient.timeout`; a reply that comes after its call timed
out is recognised by its ``id`` and dropped.

What it does not do: out-of-band commands (``exec-oob``), passing file
descriptors (``getfd``/``SCM_RIGHTS``), TCP sockets, or concurrent use from
several threads.  It needs no kernel feature beyond a UNIX socket and imports
nothing else of uffdpy.
"""
from __future__ import annotations

import json
import socket
import time
from typing import Any, Dict, List, Optional

__all__ = ["QmpClient", "QmpError"]


class QmpError(RuntimeError):
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
    not exist or refuses connections, for at most ``timeout`` seconds, then
    reads the greeting (kept in :attr:`greeting`) and sends
    ``qmp_capabilities``.  ``timeout`` (an attribute; change it at will)
    bounds each later wait for a reply.

    Raises:
        TimeoutError: the socket never accepted a connection, or QEMU did not
            send what was awaited, within ``timeout`` (the message names the
            path and what was awaited).
        ConnectionError: QEMU closed the connection.
    """

    def __init__(self, path: str, *, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self.events: List[Dict[str, Any]] = []
        self.greeting: Dict[str, Any] = {}
        self._buffer = bytearray()
        self._next_id = 0
        self._sock: Optional[socket.socket] = self._connect()
        try:
            self.greeting = self._read_message("the QMP greeting", time.monotonic() + timeout)
            self.call("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + self.timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock.connect(self.path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError, socket.timeout) as e:
                sock.close()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"QMP socket {self.path} did not accept a connection "
                                       f"within {self.timeout:g}s ({e})") from None
                time.sleep(min(0.02, left))
            except BaseException:
                sock.close()
                raise

    @property
    def closed(self) -> bool:
        return self._sock is None

    def call(self, command: str, **arguments: Any) -> Any:
        """Run ``command`` with ``arguments``; return QEMU's ``return`` value.

        Arguments whose QMP names are not identifiers go in a dict:
        ``call("human-monitor-command", **{"command-line": "info mtree"})``.

        Raises:
            QmpError: QEMU answered with an error.
            TimeoutError: no reply within ``timeout`` seconds.
            ConnectionError: QEMU closed the connection (or this client is closed).
        """
        sock = self._sock
        if sock is None:
            raise ConnectionError(f"QMP {self.path}: the client is closed")
        self._next_id += 1
        ident = self._next_id
        request: Dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            request["arguments"] = arguments
        data = json.dumps(request).encode() + b"\n"
        deadline = time.monotonic() + self.timeout
        what = f"the reply to {command}"
        try:
            sock.settimeout(max(0.001, self.timeout))
            sock.sendall(data)
        except socket.timeout:
            raise TimeoutError(f"QMP {self.path}: could not send {command} "
                               f"within {self.timeout:g}s") from None
        while True:
            reply = self._read_message(what, deadline)
            if reply.get("id") != ident:
                continue          # the late reply to a call that timed out
            if "error" in reply:
                error = reply["error"]
                raise QmpError(command, str(error.get("class", "?")),
                               str(error.get("desc", error)))
            if "return" in reply:
                return reply["return"]

    def _read_message(self, what: str, deadline: float) -> Dict[str, Any]:
        """The next message that is not an event (events go to ``events``)."""
        while True:
            message = self._read_line(what, deadline)
            if "event" in message:
                self.events.append(message)
            else:
                return message

    def _read_line(self, what: str, deadline: float) -> Dict[str, Any]:
        sock = self._sock
        if sock is None:
            raise ConnectionError(f"QMP {self.path}: the client is closed")
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[:end + 1]
                if not line.strip():
                    continue
                try:
                    message = json.loads(line)
                except ValueError:
                    raise ConnectionError(f"QMP {self.path}: not JSON while waiting for "
                                          f"{what}: {line[:200]!r}") from None
                if not isinstance(message, dict):
                    raise ConnectionError(f"QMP {self.path}: not a JSON object while waiting "
                                          f"for {what}: {line[:200]!r}")
                return message
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise socket.timeout()
                sock.settimeout(left)
                chunk = sock.recv(65536)
            except socket.timeout:
                raise TimeoutError(f"QMP {self.path}: waited {self.timeout:g}s for {what}") from None
            if not chunk:
                raise ConnectionError(f"QMP {self.path}: QEMU closed the connection "
                                      f"while we waited for {what}")
            self._buffer += chunk

    def close(self) -> None:
        """Close the connection (QEMU keeps running); safe to call again."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> "QmpClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else "open"
        return f"<QmpClient {self.path} {state}>"
