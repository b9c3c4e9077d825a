"""The destination's side of a resume: addresses, QMP set-up, errors, a QEMU of our own.

Both ways to resume (the postcopy stream of :mod:`.postcopy` and the mapped
restore of :mod:`.mapped`) reach a QEMU started with ``-incoming defer``
through :class:`QemuDestination` (every QMP call bounded by a timeout) and
send their stream over a connection from :func:`connect`.
"""
from __future__ import annotations

import os
import re
import socket
import time
from typing import Any, Callable, Dict, Optional, Tuple

from ..errors import UffdpyError
from ..mappedram import MACHINE_RAM_IDS
from ..qmp import QmpClient, QmpError

__all__ = ["ResumeError", "DestinationError", "QemuDestination",
           "parse_address", "open_connection", "event_time"]

class ResumeError(UffdpyError, RuntimeError):
    """The resume could not be done; the message says what and where, in one line."""


class DestinationError(ResumeError):
    """The destination refused the stream or went away; ``reason`` is QEMU's own, if known."""

    def __init__(self, message: str, reason: Optional[str] = None) -> None:
        super().__init__(message if not reason else f"{message}: {reason}")
        self.message = message
        self.reason = reason




def parse_address(address: str) -> Tuple[str, Any]:
    """``unix:PATH``, ``tcp:HOST:PORT`` or ``fd:N`` -> ``(kind, value)``.

    Raises: ValueError naming the address for any other form.
    """
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        return kind, rest
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit():
            return kind, (host.strip("[]"), int(port))
    if kind == "fd" and rest.isdigit():
        return kind, int(rest)
    raise ValueError(f"bad migration address {address!r}: use unix:PATH, tcp:HOST:PORT or fd:N")


def open_connection(address: str, timeout: float) -> socket.socket:
    kind, value = parse_address(address)
    if kind == "fd":
        sock = socket.socket(fileno=os.dup(value))
    else:
        family = socket.AF_UNIX if kind == "unix" else socket.AF_INET6 if ":" in value[0] \
            else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(value)
        except OSError as e:
            sock.close()
            raise DestinationError(f"cannot connect to the destination at {address}",
                                   os.strerror(e.errno) if e.errno else str(e)) from None
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


# ------------------------------------------------------------------ the destination's side

#: a row of HMP ``info ramblock``: name, page size, offset, used and total length
_RAMBLOCK_ROW = re.compile(r"^\s*(\S+)\s+(\d+)\s*(KiB|MiB|GiB)\s+0x([0-9a-f]+)"
                           r"\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)", re.M)


class QemuDestination:
    """The QMP side of a destination: capabilities, ``migrate-incoming``, events, reasons.

    ``qmp`` is the path of the destination's QMP socket.  Every call is
    bounded by ``timeout`` seconds.  ``session=False``: the QMP client blocks
    until ``client.start_session()`` (:class:`uffdpy.qmp.QmpClient`).
    Raises: DestinationError (with QEMU's message) for a refusal;
    TimeoutError, ConnectionError from QMP.
    """

    def __init__(self, qmp: str, *, timeout: float = 30.0,
                 alive: Optional[Callable[[], bool]] = None, session: bool = True) -> None:
        self.path = qmp
        self.client = QmpClient(qmp, timeout=timeout, alive=alive, session=session)
        self._directory: Optional[str] = None
        self._recoveries = 0

    def close(self) -> None:
        """End the QMP session and remove the private directory (its sockets)."""
        self.client.close()
        if self._directory is not None:
            _remove_sockets_directory(self._directory)
            self._directory = None

    @property
    def directory(self) -> str:
        """A private directory for the migration's UNIX sockets, made on first use."""
        if self._directory is None:
            self._directory = _private_directory("uffdpy-migration-")
        return self._directory

    def recover(self) -> str:
        """``migrate-recover`` (out of band) on a new private socket; its address.

        For a destination left ``postcopy-paused``: out of band, because a
        guest blocked on a missing page holds QEMU's main loop.
        Raises: DestinationError (not paused, or QEMU refused).
        """
        self._recoveries += 1
        path = os.path.join(self.directory, f"recover{self._recoveries}.sock")
        try:
            self.client.call_oob("migrate-recover", uri=f"unix:{path}")
        except QmpError as e:
            raise DestinationError(f"QMP {self.path}: migrate-recover refused "
                                   "(is the destination postcopy-paused?)", e.desc) from None
        return f"unix:{path}"

    def preempt_capability(self, default: bool) -> bool:
        """Whether postcopy-preempt is on here; ``default`` if QEMU does not answer
        within 2 s (in band: a guest blocked on a missing page may hold its main loop)."""
        try:
            caps = self.client.execute("query-migrate-capabilities", timeout=2.0)
        except (TimeoutError, QmpError, ConnectionError):
            return default
        return any(c["capability"] == "postcopy-preempt" and c["state"] for c in caps)

    def status(self) -> Dict[str, Any]:
        return dict(self.client.call("query-migrate"))

    def ram_blocks(self) -> Dict[str, Tuple[int, int, int]]:
        """Each RAMBlock's ``(host page size, used length, max length)`` in bytes (HMP
        ``info ramblock``; a block whose used length is below its maximum is resizable)."""
        text = self.client.call("human-monitor-command", **{"command-line": "info ramblock"})
        unit = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
        return {m.group(1): (int(m.group(2)) * unit[m.group(3)], int(m.group(5), 16),
                             int(m.group(6), 16))
                for m in _RAMBLOCK_ROW.finditer(str(text))}

    def host_page_sizes(self) -> Dict[str, int]:
        """Each RAMBlock's host page size in bytes, from HMP ``info ramblock``."""
        return {name: page for name, (page, _, _) in self.ram_blocks().items()}

    def check_matches(self, snap: Any) -> Dict[str, int]:
        """Refuse, before anything is sent, a destination made unlike the snapshot's machine.

        The machine type and every RAMBlock's length are compared with what
        the snapshot holds (QEMU itself would fail the load with only
        "Invalid argument" in ``query-migrate``).  Returns each block's host
        page size (what :meth:`host_page_sizes` gives).  Raises: DestinationError
        naming both sides and the option to change.
        """
        kind = str(self.client.call("qom-get", path="/machine", property="type"))
        kind = kind[:-len("-machine")] if kind.endswith("-machine") else kind
        if snap.machine and kind != snap.machine:
            raise DestinationError(f"QMP {self.path}: the destination's machine is {kind}, "
                                   f"the snapshot's {snap.machine}: start it with "
                                   f"-machine {snap.machine}")
        have = self.ram_blocks()
        for block in snap.blocks:
            if block.name not in have:
                raise DestinationError(
                    f"QMP {self.path}: the destination has no RAM block {block.name!r} "
                    f"({block.length} bytes in the snapshot): a device or memory backend "
                    "the saved VM had is missing from its arguments")
            _, used, total = have[block.name]
            fits = block.length == used or (used < total and block.length <= total)
            if not fits:
                hint = (f" (-m {block.length >> 20}M)" if block.name in MACHINE_RAM_IDS
                        and block.length % (1 << 20) == 0 else "")
                raise DestinationError(
                    f"QMP {self.path}: RAM block {block.name!r} is {used} bytes at the "
                    f"destination and {block.length} in the snapshot: start the destination "
                    f"with the saved VM's size{hint}")
        return {name: page for name, (page, _, _) in have.items()}


    def prepare(self, *, preempt: bool) -> None:
        """Capabilities for a postcopy destination; ``mapped-ram`` off (10.0.2 refuses both)."""
        self.set_capabilities({"mapped-ram": False, "postcopy-ram": True, "events": True,
                               "postcopy-preempt": preempt}, "refuses postcopy")

    def set_capabilities(self, caps: Dict[str, bool], refusal: str) -> None:
        """``migrate-set-capabilities``; Raises: DestinationError "the destination REFUSAL"."""
        try:
            self.client.call("migrate-set-capabilities", capabilities=[
                {"capability": name, "state": state} for name, state in caps.items()])
        except QmpError as e:
            raise DestinationError(f"QMP {self.path}: the destination {refusal}",
                                   e.desc) from None

    def listen(self, uri: str) -> None:
        try:
            self.client.call("migrate-incoming", uri=uri, **{"exit-on-error": False})
        except QmpError as e:
            raise DestinationError(f"QMP {self.path}: migrate-incoming {uri} refused",
                                   e.desc) from None

    def listen_private(self, transport: str) -> Tuple[str, Optional[socket.socket]]:
        """Start ``migrate-incoming`` on a private address; return ``(address, our_socket)``.

        ``transport`` ``unix`` listens on a socket in :attr:`directory`, ``tcp``
        on 127.0.0.1 with a free port, ``fd`` on one end of a socketpair
        passed with ``getfd`` (its other end, ours, is returned: keep it
        open until the connect).
        """
        if transport == "tcp":
            self.listen("tcp:127.0.0.1:0")
            return f"tcp:127.0.0.1:{self.tcp_port()}", None
        if transport == "fd":
            ours, theirs = socket.socketpair()
            try:
                self.client.send_fd(theirs.fileno(), "uffdpy-migration")
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            try:
                self.listen("fd:uffdpy-migration")
            except BaseException:
                ours.close()
                raise
            return f"fd:{ours.fileno()}", ours
        path = os.path.join(self.directory, "migration.sock")
        self.listen(f"unix:{path}")
        return f"unix:{path}", None

    def memory_backends(self) -> Dict[str, Dict[str, Any]]:
        """Every memory backend under ``/objects``: ``{id: {"type": ..., property: value}}``.

        A file backend has ``mem-path``, ``offset``, ``share`` and
        ``readonly``; every other kind ``share``.  (QMP ``qom-list`` and
        ``qom-get``: a backend's id is also its RAMBlock's name.)
        """
        out: Dict[str, Dict[str, Any]] = {}
        for child in self.client.call("qom-list", path="/objects"):
            kind = str(child.get("type", ""))
            if not (kind.startswith("child<memory-backend-") and kind.endswith(">")):
                continue
            name = str(child["name"])
            info: Dict[str, Any] = {"type": kind[len("child<"):-1]}
            props = ("mem-path", "offset", "share", "readonly") \
                if info["type"] == "memory-backend-file" else ("share",)
            for prop in props:
                info[prop] = self.client.call("qom-get", path=f"/objects/{name}", property=prop)
            out[name] = info
        return out

    def refuse_private_file_backends(self) -> None:
        """Refuse a postcopy destination whose RAM is a private mapping of a file.

        On POSTCOPY_ADVISE QEMU discards every RAMBlock; with a private
        mapping of a file opened writable that *punches holes in the file*
        (QEMU only warns), so a snapshot mapped this way would be destroyed.
        QEMU itself refuses postcopy for a file on a disk file system, but
        accepts it on tmpfs.  Raises: DestinationError naming the backend.
        """
        for name, info in self.memory_backends().items():
            if info["type"] == "memory-backend-file" and not info.get("share"):
                raise DestinationError(
                    f"QMP {self.path}: the destination's RAM {name!r} is a private (share=off) "
                    f"mapping of {info.get('mem-path')}; a postcopy stream would make QEMU "
                    "discard it and punch holes in that file: resume it with --map, or back "
                    "the RAM with memory-backend-ram")

    def tcp_port(self) -> int:
        for address in self.status().get("socket-address", []):
            if address.get("type") in ("inet", "tcp") and address.get("port"):
                return int(address["port"])
        raise DestinationError(f"QMP {self.path}: query-migrate names no listening TCP port")

    def failure_reason(self, *, wait: float = 0.0) -> Optional[str]:
        """QEMU's ``error-desc`` for a failed incoming migration, if it can still tell.

        ``wait``: seconds to keep asking (QEMU marks the load failed a moment
        after it closed the connection).
        """
        deadline = time.monotonic() + wait
        while True:
            try:
                info = self.client.execute("query-migrate", timeout=2.0)
            except (QmpError, OSError):
                return None
            if info.get("status") == "failed":
                return str(info.get("error-desc") or "migration failed")
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)



def event_time(event: Dict[str, Any]) -> float:
    ts = event.get("timestamp", {})
    return float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6


def _private_directory(prefix: str) -> str:
    """A new directory only its owner can enter, under ``$TMPDIR`` or ``/tmp``.

    What ``tempfile.mkdtemp`` does (a random name, ``mkdir`` with mode 0700,
    another name if it exists); tempfile and the shutil it imports cost about
    3 ms, on the command's way to the connect.
    """
    base = os.environ.get("TMPDIR") or "/tmp"
    for _ in range(100):
        path = os.path.join(base, prefix + os.urandom(6).hex())
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{base}: no free name for a directory {prefix}*")


def _remove_sockets_directory(path: str) -> None:
    """Remove a directory of :func:`_private_directory` and the sockets in it, quietly."""
    try:
        names = os.listdir(path)
    except OSError:
        return
    for name in names:
        try:
            os.unlink(os.path.join(path, name))
        except OSError:
            pass
    try:
        os.rmdir(path)
    except OSError:
        pass
