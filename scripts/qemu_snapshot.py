#!/usr/bin/env python3
"""Make and load real QEMU mapped-ram snapshots over QMP, for tests and experiments.

What it does
------------
Starts ``qemu-system-x86_64`` with no guest OS (the machine sits in firmware,
or does nothing at all with ``-machine none``), optionally puts known bytes at
known guest-physical addresses with ``-device loader,file=F,addr=A,force-raw=on``,
then over QMP: ``stop``, ``migrate-set-capabilities`` (mapped-ram, multifd),
``migrate`` to ``file:PATH[,offset=N]``, polls ``query-migrate`` until
completed, and optionally ``pmemsave``-s guest memory so a reader can be
checked against QEMU's own view.  ``dump`` writes an ELF core of guest memory
with ``dump-guest-memory`` instead (the format :mod:`uffdpy.elfcore` reads).  It can also load a snapshot back into a
fresh QEMU (``-incoming defer``, ``migrate-incoming``), time it and
``pmemsave`` the result.

TCG is the default accelerator (``accel=tcg``): nested KVM is unreliable on CI
machines and firmware-only guests need no speed.  Every QEMU process is
killed in a ``finally`` block, every wait has a timeout, and sockets live in a
private temporary directory.

Use
---
Command line::

    python3 scripts/qemu_snapshot.py save OUT.img [--machine pc] [--mem 128M]
        [--arg=-device --arg=VGA] [--random ADDR:SIZE[:SEED]]... [--multifd N]
        [--offset N] [--no-mapped-ram] [--pmemsave OUT.pmem] [--qemu PATH]
    python3 scripts/qemu_snapshot.py load IMG [--machine pc] [--mem 128M]
        [--arg ...] [--offset N] [--multifd N] [--pmemsave OUT.pmem]
    python3 scripts/qemu_snapshot.py dump OUT.elf --machine pc [--mem 128M]
        [--random ADDR:SIZE[:SEED]]... [--pmemsave OUT.pmem] [--paging]

Both print a JSON summary (timings in seconds, paths, regions).  From Python
(the tests put ``scripts/`` on ``sys.path``)::

    from qemu_snapshot import VmConfig, save_snapshot, load_snapshot, random_region
    cfg = VmConfig(machine="none", mem="64M")
    region = random_region(tmpdir, addr=0x100000, size=0x10000, seed=1)
    info = save_snapshot(cfg, "vm.img", regions=[region], pmemsave="vm.pmem")
    info = load_snapshot(cfg, "vm.img", pmemsave="loaded.pmem")
    info = dump_guest_memory(VmConfig(machine="pc", mem="128M"), "vm.elf", regions=[region])

Only the standard library and :mod:`uffdpy.qmp` (uffdpy's own small QMP
client) are used; run from a checkout, the script finds ``uffdpy`` next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)    # run from a checkout without installing

from uffdpy.qmp import QmpClient, QmpError  # noqa: E402

DEFAULT_QEMU = os.environ.get("UFFDPY_QEMU", "qemu-system-x86_64")
DEFAULT_TIMEOUT = 60.0


class QemuError(RuntimeError):
    """QEMU failed to start, a QMP command failed, or a migration failed or timed out."""


def parse_size(text: str) -> int:
    """Bytes in a QEMU-style size ("64M", "1G", "4096", "0x1000")."""
    m = re.fullmatch(r"\s*(0x[0-9a-fA-F]+|\d+)\s*([kKmMgGtT]?)[bB]?\s*", text)
    if not m:
        raise ValueError(f"bad size {text!r}")
    value = int(m.group(1), 0)
    shift = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]
    return value << shift


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

    def command(self, qmp_socket: str, *, extra: Sequence[str] = ()) -> List[str]:
        return [self.qemu, "-nodefaults", "-no-user-config", "-display", "none",
                "-machine", f"{self.machine},accel={self.accel}", "-m", self.mem,
                "-qmp", f"unix:{qmp_socket},server=on,wait=off",
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
        self._tmp = tempfile.mkdtemp(prefix="uffdpy-qemu-")
        self.socket = os.path.join(self._tmp, "qmp.sock")
        self.log_path = os.path.join(self._tmp, "qemu.log")
        extra = list(extra) + (["-incoming", "defer"] if incoming else []) + (["-S"] if paused else [])
        self.argv = config.command(self.socket, extra=extra)
        self.proc: Optional[subprocess.Popen[bytes]] = None
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

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-4000:]
        except OSError:
            return ""

    def start(self) -> None:
        """Start QEMU and connect to its QMP socket. Raises: QemuError (with QEMU's output)."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        last: Optional[BaseException] = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise QemuError(f"QEMU exited with {self.proc.returncode} at start:\n"
                                f"{' '.join(self.argv)}\n{self.log()}")
            if os.path.exists(self.socket):
                try:  # a short try, so that a QEMU that died is noticed above
                    qmp = QmpClient(self.socket,
                                    timeout=max(0.1, min(2.0, deadline - time.monotonic())))
                except (OSError, QmpError) as e:  # refused, closed, timed out: QEMU not ready yet
                    last = e
                else:
                    qmp.timeout = self.timeout
                    self.qmp = qmp
                    return
            time.sleep(0.02)
        raise QemuError(f"no QMP connection within {self.timeout}s ({last}):\n{self.log()}")

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
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            info = self.cmd("query-migrate")
            status = info.get("status")
            if status == "completed":
                return dict(info)
            if status in ("failed", "cancelled"):
                raise QemuError(f"migration {status}: {info.get('error-desc', info)}\n{self.log()}")
            time.sleep(0.01)
        raise QemuError(f"migration did not complete within {self.timeout}s")

    def save(self, path: str, *, mapped_ram: bool = True, multifd_channels: Optional[int] = None,
             offset: int = 0) -> Dict[str, Any]:
        """Stop the VM and migrate it to ``file:path[,offset=N]``; returns timing and status."""
        self.cmd("stop")
        caps: Dict[str, bool] = {"mapped-ram": mapped_ram}
        caps["multifd"] = multifd_channels is not None
        self.set_capabilities(**caps)
        if multifd_channels is not None:
            self.cmd("migrate-set-parameters", **{"multifd-channels": multifd_channels})
        uri = f"file:{os.path.abspath(path)}" + (f",offset={offset}" if offset else "")
        t0 = time.monotonic()
        self.cmd("migrate", uri=uri)
        info = self.wait_migration()
        return {"uri": uri, "seconds": time.monotonic() - t0, "query-migrate": info}

    def load(self, path: str, *, offset: int = 0, mapped_ram: bool = True,
             multifd_channels: Optional[int] = None) -> Dict[str, Any]:
        """Load ``file:path`` into this ``incoming=True`` VM; returns timing and run state."""
        caps = {"mapped-ram": mapped_ram, "multifd": multifd_channels is not None}
        self.set_capabilities(**caps)
        if multifd_channels is not None:
            self.cmd("migrate-set-parameters", **{"multifd-channels": multifd_channels})
        uri = f"file:{os.path.abspath(path)}" + (f",offset={offset}" if offset else "")
        t0 = time.monotonic()
        self.cmd("migrate-incoming", uri=uri)
        info = self.wait_migration()
        seconds = time.monotonic() - t0
        return {"uri": uri, "seconds": seconds, "query-migrate": info,
                "status": self.cmd("query-status").get("status")}

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
        """Quit QMP, kill QEMU and remove the socket directory; safe to call twice."""
        qmp, self.qmp = self.qmp, None
        if qmp is not None:
            qmp.close()
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(self._tmp, ignore_errors=True)


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


def _region_arg(text: str, directory: str) -> Region:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"--random wants ADDR:SIZE[:SEED], not {text!r}")
    seed = int(parts[2], 0) if len(parts) == 3 else 0
    return random_region(directory, addr=parse_size(parts[0]), size=parse_size(parts[1]), seed=seed)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("save", "load", "dump"):
        p = sub.add_parser(name)
        p.add_argument("image")
        p.add_argument("--machine", default="none")
        p.add_argument("--mem", default="64M")
        p.add_argument("--accel", default="tcg")
        p.add_argument("--arg", action="append", default=[], metavar="ARG",
                       help="extra QEMU argument (repeat; use --arg=-device --arg=VGA)")
        p.add_argument("--qemu", default=DEFAULT_QEMU)
        if name != "dump":
            p.add_argument("--offset", type=lambda s: int(s, 0), default=0)
            p.add_argument("--multifd", type=int, default=None, metavar="CHANNELS")
        p.add_argument("--pmemsave")
        p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
        if name in ("save", "dump"):
            p.add_argument("--random", action="append", default=[], metavar="ADDR:SIZE[:SEED]",
                           help="put random bytes at a guest-physical address")
            p.add_argument("--data-dir", help="where to keep --random files (default: next to IMAGE)")
            p.add_argument("--run-seconds", type=float, default=0.0)
        if name == "save":
            p.add_argument("--no-mapped-ram", action="store_true")
        if name == "dump":
            p.add_argument("--paging", action="store_true",
                           help="dump-guest-memory paging: true (virtual addresses)")
    args = parser.parse_args(argv)
    config = VmConfig(machine=args.machine, mem=args.mem, accel=args.accel, args=args.arg,
                      qemu=args.qemu)
    if args.command == "save":
        directory = args.data_dir or os.path.dirname(os.path.abspath(args.image))
        regions = [_region_arg(r, directory) for r in args.random]
        result = save_snapshot(config, args.image, regions=regions,
                               mapped_ram=not args.no_mapped_ram, multifd_channels=args.multifd,
                               offset=args.offset, pmemsave=args.pmemsave,
                               run_seconds=args.run_seconds, timeout=args.timeout)
    elif args.command == "dump":
        directory = args.data_dir or os.path.dirname(os.path.abspath(args.image))
        regions = [_region_arg(r, directory) for r in args.random]
        result = dump_guest_memory(config, args.image, regions=regions, pmemsave=args.pmemsave,
                                   run_seconds=args.run_seconds, paging=args.paging,
                                   timeout=args.timeout)
    else:
        result = load_snapshot(config, args.image, offset=args.offset,
                               multifd_channels=args.multifd, pmemsave=args.pmemsave,
                               timeout=args.timeout)
    json.dump(result, sys.stdout, indent=2, default=str)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
