"""One way to start a QEMU and end it: :class:`Qemu`, used by resume, the harness, scripts and tests.

A QEMU under test can hang (a guest blocked on a missing page holds QEMU's
big lock, and then SIGTERM is not acted on), so a :class:`Qemu` runs in a
session of its own (``start_new_session``), its output goes to a log file in
a private directory, and :meth:`Qemu.kill` sends SIGKILL to exactly the
process group it started and removes the directory.  Every wait is bounded.

``Qemu(argv, incoming="defer", paused=True, qmp_sockets=2)`` adds
``-incoming defer``, ``-S`` and two QMP monitors (``qmp_paths[0]``,
``qmp_paths[1]``: one for uffdpy, one for a test, since a QMP socket serves
one client at a time) to ``argv``, starts it and waits until the sockets
exist.  :meth:`Qemu.errors` is what QEMU said on its stderr (its
``error_report`` lines), the most precise reason it gives for refusing a
migration stream.

The snapshots QEMU makes for the tests and experiments (:class:`VmConfig`,
:class:`QemuVM`, :func:`save_snapshot`...) are in :mod:`uffdpy.harness.vm`.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Optional, Sequence

from .errors import UffdpyError
from .qmp import QmpClient

__all__ = ["Qemu", "QemuError"]


class QemuError(UffdpyError, RuntimeError):
    """QEMU could not start, exited, refused a command, or a migration failed or timed out.

    ``reason`` is QEMU's own words, when it gave any.
    """

    def __init__(self, message: str, reason: Optional[str] = None) -> None:
        super().__init__(message if not reason else f"{message}: {reason}")
        self.message = message
        self.reason = reason


class Qemu:
    """A QEMU process of our own.  A context manager: :meth:`kill` on exit.

    ``argv`` is the command (binary first) with the VM's arguments;
    ``incoming`` adds ``-incoming VALUE`` (``"defer"`` for a destination
    that QMP starts), ``paused`` adds ``-S``, ``qmp_sockets`` QMP monitors on
    UNIX sockets in a private directory.  ``timeout`` bounds the start.

    Raises: QemuError (QEMU missing, exited at start with its reason, or no
    QMP socket in time).
    """

    def __init__(self, argv: Sequence[str], *, incoming: Optional[str] = None,
                 paused: bool = False, qmp_sockets: int = 1, timeout: float = 30.0,
                 extra: Sequence[str] = ()) -> None:
        if not argv:
            raise ValueError("no QEMU command given")
        self.dir = tempfile.mkdtemp(prefix="uffdpy-qemu-")
        self.qmp_paths = [os.path.join(self.dir, "qmp.sock" if i == 0 else f"qmp{i}.sock")
                          for i in range(qmp_sockets)]
        self.log_path = os.path.join(self.dir, "qemu.log")
        cmd = list(argv)
        if incoming is not None:
            cmd += ["-incoming", incoming]
        for path in self.qmp_paths:
            cmd += ["-qmp", f"unix:{path},server=on,wait=off"]
        if paused:
            cmd.append("-S")
        cmd += list(extra)
        self.argv = cmd
        self.proc: Optional["subprocess.Popen[bytes]"] = None
        with open(self.log_path, "wb") as log:
            try:
                self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise QemuError(f"cannot start {argv[0]}", e.strerror) from None
        deadline = time.monotonic() + timeout
        while not all(os.path.exists(p) for p in self.qmp_paths):
            if self.proc.poll() is not None:
                reason = self.errors()
                code = self.proc.returncode
                self.kill()
                raise QemuError(f"{argv[0]} exited with {code} at start", reason)
            if time.monotonic() > deadline:
                self.kill()
                raise QemuError(f"{argv[0]} created no QMP socket within {timeout:g}s")
            time.sleep(0.01)

    @property
    def qmp_path(self) -> str:
        """The first QMP socket."""
        return self.qmp_paths[0]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def connect(self, index: int = 0, *, timeout: float = 30.0) -> QmpClient:
        """A QMP client on socket ``index``."""
        return QmpClient(self.qmp_paths[index], timeout=timeout)

    def output(self) -> str:
        """Everything QEMU printed (its log), or "" once it is gone."""
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def errors(self) -> Optional[str]:
        """QEMU's own error lines (``error_report`` output), joined, program name dropped."""
        lines = [line.strip() for line in self.output().splitlines() if line.strip()]
        prog = os.path.basename(self.argv[0])
        said = [line.split(":", 1)[1].strip() for line in lines
                if ":" in line and os.path.basename(line.split(":", 1)[0]) == prog]
        said = [e for e in said if not e.startswith("warning:")] or lines[-1:]
        return "; ".join(dict.fromkeys(said))[:500] if said else None

    # kept under the name resume used first
    last_error = errors

    def kill(self) -> None:
        """SIGKILL exactly the process group started here, reap it, remove the directory."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    close = kill

    def __enter__(self) -> "Qemu":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def __repr__(self) -> str:
        state = "running" if self.alive() else "gone"
        return f"<Qemu pid {self.proc.pid if self.proc else '?'} {state}>"
