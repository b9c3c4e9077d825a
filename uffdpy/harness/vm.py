"""Snapshots, loads and dumps made by a real QEMU, for the tests, the benchmarks and the scripts.

:class:`VmConfig` (how to start a firmware-only or ``-machine none`` VM),
:class:`QemuVM` (one driven over QMP), :func:`save_snapshot`,
:func:`load_snapshot`, :func:`dump_guest_memory` and :func:`random_region`
(known bytes at a known guest-physical address via ``-device loader``): the
library of ``scripts/qemu_snapshot.py``.  Each QEMU is a :class:`uffdpy.qemu.Qemu`.
"""
from __future__ import annotations

import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..qemu import Qemu, QemuError
from ..qmp import MigrationFailed, QmpClient, QmpError
from ..sizes import parse_size

__all__ = ["VmConfig", "QemuVM", "Region", "random_region", "save_snapshot", "load_snapshot",
           "dump_guest_memory", "DEFAULT_QEMU", "DEFAULT_TIMEOUT"]


DEFAULT_QEMU = os.environ.get("UFFDPY_QEMU", "qemu-system-x86_64")
DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class Region:
    """Known bytes put at guest-physical ``addr`` by ``-device loader``."""

    addr: int
    path: str
    size: int
    seed: Optional[int] = None

    def data(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def args(self) -> List[str]:
        return ["-device", f"loader,file={self.path},addr={self.addr:#x},force-raw=on"]


def random_region(directory: str, *, addr: int, size: int, seed: int) -> Region:
    """Write ``size`` deterministic random bytes (from ``seed``) to a file in ``directory``."""
    path = os.path.join(directory, f"region-{addr:#x}-{size:#x}-{seed}.bin")
    with open(path, "wb") as f:
        f.write(random.Random(seed).randbytes(size))
    return Region(addr=addr, path=path, size=size, seed=seed)


@dataclass(frozen=True)
class VmConfig:
    """How to start QEMU; the same config must be used to save and to load.

    ``machine`` is the -machine type (``none``, ``pc``, ``q35``...), ``mem``
    the -m value, ``args`` extra command-line arguments (devices, memory
    backends, NUMA nodes).  ``accel`` defaults to ``tcg``.
    """

    machine: str = "none"
    mem: str = "64M"
    accel: str = "tcg"
    args: Sequence[str] = ()
    qemu: str = DEFAULT_QEMU

    @property
    def mem_bytes(self) -> int:
        # like QEMU's -m, a bare number is MiB
        return parse_size(self.mem + "M" if self.mem.strip().isdigit() else self.mem)

    def argv(self, *, extra: Sequence[str] = ()) -> List[str]:
        """The command line (binary first), without a QMP monitor."""
        return [self.qemu, "-nodefaults", "-no-user-config", "-display", "none",
                "-machine", f"{self.machine},accel={self.accel}", "-m", self.mem,
                *self.args, *extra]


class QemuVM:
    """One QEMU process driven over QMP.  A context manager: QEMU is killed on exit.

    ``incoming=True`` starts it with ``-incoming defer`` for :meth:`load`.
    Every QMP command and wait is bounded by ``timeout`` seconds.
    """

    def __init__(self, config: VmConfig, *, extra: Sequence[str] = (), incoming: bool = False,
                 paused: bool = False, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.config = config
        self.timeout = timeout
        self._extra = list(extra)
        self._incoming = incoming
        self._paused = paused
        self.argv = config.argv(extra=self._extra)
        self.vm: Optional[Qemu] = None
        self.qmp: Optional[QmpClient] = None

    def __enter__(self) -> "QemuVM":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def socket(self) -> str:
        """The QMP socket's path."""
        assert self.vm is not None
        return self.vm.qmp_path

    @property
    def proc(self) -> Any:
        return self.vm.proc if self.vm is not None else None

    def log(self) -> str:
        return self.vm.output()[-4000:] if self.vm is not None else ""

    def start(self) -> None:
        """Start QEMU and connect to its QMP socket. Raises: QemuError (with QEMU's output)."""
        self.vm = Qemu(self.argv, incoming="defer" if self._incoming else None,
                       paused=self._paused, timeout=self.timeout)
        try:
            self.qmp = self.vm.connect(timeout=self.timeout)
        except (OSError, QmpError) as e:
            raise QemuError(f"no QMP connection within {self.timeout}s ({e}):\n{self.log()}")

    def cmd(self, name: str, **args: Any) -> Any:
        """Run a QMP command and return its result. Raises: QemuError on QMP errors."""
        if self.qmp is None:
            raise QemuError("QEMU is not running")
        try:
            return self.qmp.call(name, **args)
        except (QmpError, OSError) as e:
            raise QemuError(f"QMP {name} {args}: {e}\n{self.log()}") from e

    def set_capabilities(self, **caps: bool) -> None:
        self.cmd("migrate-set-capabilities", capabilities=[
            {"capability": name.replace("_", "-"), "state": state} for name, state in caps.items()])

    def wait_migration(self) -> Dict[str, Any]:
        """Poll query-migrate until completed. Raises: QemuError on failure or timeout."""
        if self.qmp is None:
            raise QemuError("QEMU is not running")
        try:
            return self.qmp.wait_migration(timeout=self.timeout)
        except (MigrationFailed, TimeoutError) as e:
            raise QemuError(f"{e}\n{self.log()}") from None

    def save(self, path: str, *, mapped_ram: bool = True, multifd_channels: Optional[int] = None,
             offset: int = 0) -> Dict[str, Any]:
        """Stop the VM and migrate it to ``file:path[,offset=N]``; returns timing and status."""
        self.cmd("stop")
        return self._migrate("migrate", path, offset, mapped_ram, multifd_channels)

    def load(self, path: str, *, offset: int = 0, mapped_ram: bool = True,
             multifd_channels: Optional[int] = None) -> Dict[str, Any]:
        """Load ``file:path`` into this ``incoming=True`` VM; returns timing and run state."""
        out = self._migrate("migrate-incoming", path, offset, mapped_ram, multifd_channels)
        out["status"] = self.cmd("query-status").get("status")
        return out

    def _migrate(self, command: str, path: str, offset: int, mapped_ram: bool,
                 multifd_channels: Optional[int]) -> Dict[str, Any]:
        """``command`` (migrate or migrate-incoming) on ``file:path``, with these
        capabilities, waited for; the URI, the seconds it took and query-migrate."""
        self.set_capabilities(**{"mapped-ram": mapped_ram,
                                 "multifd": multifd_channels is not None})
        if multifd_channels is not None:
            self.cmd("migrate-set-parameters", **{"multifd-channels": multifd_channels})
        uri = f"file:{os.path.abspath(path)}" + (f",offset={offset}" if offset else "")
        t0 = time.monotonic()
        self.cmd(command, uri=uri)
        info = self.wait_migration()
        return {"uri": uri, "seconds": time.monotonic() - t0, "query-migrate": info}

    def pmemsave(self, path: str, *, addr: int = 0, size: Optional[int] = None) -> None:
        """Dump guest-physical memory [addr, addr+size) (default: all of -m) to ``path``."""
        if size is None:
            size = self.config.mem_bytes - addr
        self.cmd("pmemsave", val=addr, size=size, filename=os.path.abspath(path))

    def dump_guest_memory(self, path: str, *, paging: bool = False) -> Dict[str, Any]:
        """``dump-guest-memory`` (ELF format) of the whole guest to ``path``; returns query-dump.

        Synchronous (QMP returns when the file is written, within ``timeout``).
        QEMU creates the file with mode 0400.  With ``paging: false`` every
        PT_LOAD is a range of guest RAM at its guest-physical address.
        Raises: QemuError if the dump fails or does not complete.
        """
        self.cmd("dump-guest-memory", paging=paging, protocol=f"file:{os.path.abspath(path)}")
        info = dict(self.cmd("query-dump"))
        if info.get("status") != "completed":
            raise QemuError(f"dump-guest-memory did not complete: {info}\n{self.log()}")
        return info

    def ram_ranges(self) -> List[Tuple[int, int, str]]:
        """Guest-physical [start, end) ranges of RAM and ROM, from ``info mtree -f``.

        Adjacent ranges of the same memory region at contiguous offsets are
        merged, as QEMU's dump merges guest memory that is contiguous both in
        the guest and in the host; each item is (start, end, region name).
        """
        text = self.cmd("human-monitor-command", **{"command-line": "info mtree -f"})
        ranges: List[Tuple[int, int, str]] = []
        last_offset = 0
        in_memory = False
        for line in str(text).splitlines():
            if line.startswith("FlatView"):
                in_memory = False
            elif line.strip().startswith('AS "memory"'):
                in_memory = True
            m = re.match(r"\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, (\w+)\): (\S+)"
                         r"(?: @([0-9a-f]+))?", line)
            if not (in_memory and m and m.group(3) in ("ram", "rom", "romd")):
                continue
            start, end, name = int(m.group(1), 16), int(m.group(2), 16) + 1, m.group(4)
            offset = int(m.group(5), 16) if m.group(5) else 0
            if (ranges and ranges[-1][1] == start and ranges[-1][2] == name
                    and last_offset + (ranges[-1][1] - ranges[-1][0]) == offset):
                ranges[-1] = (ranges[-1][0], end, name)
            else:
                ranges.append((start, end, name))
                last_offset = offset
        return ranges

    def close(self) -> None:
        """Close QMP, kill QEMU and remove its directory; safe to call twice."""
        qmp, self.qmp = self.qmp, None
        if qmp is not None:
            qmp.close()
        vm, self.vm = self.vm, None
        if vm is not None:
            vm.kill()


def save_snapshot(config: VmConfig, path: str, *, regions: Sequence[Region] = (),
                  mapped_ram: bool = True, multifd_channels: Optional[int] = None,
                  offset: int = 0, pmemsave: Optional[str] = None, run_seconds: float = 0.0,
                  timeout: float = DEFAULT_TIMEOUT) -> Dict[str, Any]:
    """Start a VM with ``regions`` loaded, let it run ``run_seconds``, save it to ``path``.

    With ``pmemsave``, guest memory is dumped (after ``stop``, before the
    migration) for comparison.  Returns a JSON-able summary.
    Raises: QemuError.
    """
    extra: List[str] = []
    for r in regions:
        extra += r.args()
    t0 = time.monotonic()
    with QemuVM(config, extra=extra, timeout=timeout) as vm:
        if run_seconds:
            time.sleep(run_seconds)
        vm.cmd("stop")
        if pmemsave:
            vm.pmemsave(pmemsave)
        result = vm.save(path, mapped_ram=mapped_ram, multifd_channels=multifd_channels,
                         offset=offset)
    result.update(path=path, pmemsave=pmemsave, total_seconds=time.monotonic() - t0,
                  regions=[{"addr": r.addr, "size": r.size, "path": r.path} for r in regions])
    return result


def load_snapshot(config: VmConfig, path: str, *, offset: int = 0,
                  multifd_channels: Optional[int] = None, pmemsave: Optional[str] = None,
                  timeout: float = DEFAULT_TIMEOUT) -> Dict[str, Any]:
    """Load ``path`` into a fresh QEMU started with ``config``; optionally pmemsave the result.

    Returns a summary with ``seconds`` (migrate-incoming until completed).
    Raises: QemuError.
    """
    t0 = time.monotonic()
    with QemuVM(config, incoming=True, timeout=timeout) as vm:
        result = vm.load(path, offset=offset, multifd_channels=multifd_channels)
        if pmemsave:
            vm.pmemsave(pmemsave)
    result.update(path=path, pmemsave=pmemsave, total_seconds=time.monotonic() - t0)
    return result


def dump_guest_memory(config: VmConfig, path: str, *, regions: Sequence[Region] = (),
                      pmemsave: Optional[str] = None, run_seconds: float = 0.0,
                      paging: bool = False, timeout: float = DEFAULT_TIMEOUT) -> Dict[str, Any]:
    """Start a VM with ``regions`` loaded, stop it, and ``dump-guest-memory`` it to ``path``.

    The ELF dump is what :mod:`uffdpy.elfcore` reads.  With ``pmemsave``,
    guest-physical memory [0, -m) is also saved there for comparison.  The
    summary has ``ram_ranges`` (RAM/ROM ranges from ``info mtree -f``,
    [start, end) pairs) and ``query-dump``.  ``-machine none`` has no CPU and
    QEMU then writes an ELF32/EM_386 file; use a machine with a CPU (``pc``).

    Without ``run_seconds`` the VM never runs (started with ``-S``), so the
    memory layout is the reset one: for ``pc`` the firmware has not yet
    turned the 0xc0000-0xfffff ROM shadows into RAM, and the dump has five
    segments (pc.ram below 0xc0000, pc.rom, the BIOS alias, pc.ram from 1 MiB,
    the BIOS below 4 GiB).  Once the firmware has run it has two.
    Raises: QemuError.
    """
    extra: List[str] = []
    for r in regions:
        extra += r.args()
    t0 = time.monotonic()
    with QemuVM(config, extra=extra, timeout=timeout, paused=not run_seconds) as vm:
        if run_seconds:
            time.sleep(run_seconds)
        vm.cmd("stop")
        if pmemsave:
            vm.pmemsave(pmemsave)
        ranges = vm.ram_ranges()
        t1 = time.monotonic()
        info = vm.dump_guest_memory(path, paging=paging)
        seconds = time.monotonic() - t1
    return {"path": path, "pmemsave": pmemsave, "seconds": seconds, "query-dump": info,
            "total_seconds": time.monotonic() - t0,
            "ram_ranges": [[start, end, name] for start, end, name in ranges],
            "regions": [{"addr": r.addr, "size": r.size, "path": r.path} for r in regions]}
