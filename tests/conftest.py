"""Shared test fixtures.

Tests are grouped by what they need (see README): pure tests run anywhere;
``kernel`` tests need a working userfaultfd; ``qemu`` tests need a real
``qemu-system-x86_64``.  A QEMU test skips only when QEMU is absent, and
``UFFDPY_REQUIRE_QEMU=1`` (set by CI) turns that skip into a failure.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence

import pytest

from uffdpy.mappedram import Snapshot
from uffdpy.qemu import Qemu
from uffdpy.qmp import QmpClient

ROOT = Path(__file__).resolve().parent.parent

QEMU_BINARY = os.environ.get("UFFDPY_QEMU", "qemu-system-x86_64")


def qemu_available() -> bool:
    return shutil.which(QEMU_BINARY) is not None


@pytest.fixture(scope="session")
def qemu_binary() -> str:
    """Path of qemu-system-x86_64; skips (or fails under UFFDPY_REQUIRE_QEMU=1) without it."""
    path = shutil.which(QEMU_BINARY)
    if path is None:
        reason = (f"{QEMU_BINARY} not found: install QEMU 10 (apt-get install -t "
                  "bookworm-backports qemu-system-x86), see .ci/run")
        if os.environ.get("UFFDPY_REQUIRE_QEMU") == "1":
            pytest.fail(reason + " [UFFDPY_REQUIRE_QEMU=1]")
        pytest.skip(reason)
    return path


#: the Linux guest every test of a real guest shares (one boot per session)
LINUX_GUEST_MEM_MIB = 256
LINUX_GUEST_FILL_MIB = 64
LINUX_GUEST_SEED = 20240607


@pytest.fixture(scope="session")
def guest(qemu_binary, tmp_path_factory):
    """Boot, fill and snapshot the request-serving Linux guest once per session.

    Yields ``linuxguest.make_linux_guest_snapshot``'s dict (snapshot, pmemsave,
    ``qemu_args`` for a destination...).  Skips only when the kernel and
    busybox cannot be had (fails instead under ``UFFDPY_REQUIRE_QEMU=1``).
    """
    import time
    from uffdpy.harness import linuxguest
    cache = os.environ.get("UFFDPY_LINUX_GUEST_CACHE") or None
    try:
        linuxguest.ensure_guest_files(cache)
    except linuxguest.GuestError as e:
        reason = f"cannot get a Debian kernel and busybox: {e}"
        if os.environ.get("UFFDPY_REQUIRE_QEMU") == "1":
            pytest.fail(reason + " [UFFDPY_REQUIRE_QEMU=1]")
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("linux-guest")
    t0 = time.monotonic()
    info = linuxguest.make_linux_guest_snapshot(
        d / "guest.img", mem_mib=LINUX_GUEST_MEM_MIB, fill_mib=LINUX_GUEST_FILL_MIB,
        seed=LINUX_GUEST_SEED, pmemsave=d / "guest.pmem", cache=cache, timeout=240,
        qemu=qemu_binary)
    info["fixture_seconds"] = time.monotonic() - t0
    print(f"\nlinux guest: kernel {info['kernel_version']}, timings {info['seconds']}, "
          f"snapshot {info['snapshot_bytes']} bytes ({info['snapshot_disk_bytes']} on disk)")
    yield info


def _huge_pages_free() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


@pytest.fixture
def hugetlb_pool():
    """``reserve(n)``: make sure ``n`` 2 MiB pages are free in the hugetlb pool.

    As root the pool is grown through /proc/sys/vm/nr_hugepages for the test and
    shrunk back after it.  A test skips only when the kernel refuses (no root,
    or no memory for the pages), with the errno and the fix in the reason.
    """
    path = "/proc/sys/vm/nr_hugepages"
    with open(path) as f:
        original = int(f.read())
    grown = False

    def reserve(n: int) -> None:
        nonlocal grown
        deficit = n - _huge_pages_free()
        if deficit <= 0:
            return
        with open(path) as f:
            current = int(f.read())
        try:
            with open(path, "w") as f:
                f.write(f"{current + deficit}\n")
            grown = True
        except OSError as exc:
            pytest.skip(f"cannot grow the hugetlb pool ({exc}); as root: "
                        f"echo {current + deficit} > {path}")
        if _huge_pages_free() < n:
            pytest.skip(f"the kernel found memory for only {_huge_pages_free()} of {n} "
                        f"2 MiB pages (ENOMEM); free memory or reserve at boot "
                        f"(hugepages={n} on the kernel command line)")

    yield reserve
    if grown:
        with open(path, "w") as f:
            f.write(f"{original}\n")


# ------------------------------------------------------------------ destination QEMUs

class Destination:
    """QEMU ``ARGS -incoming defer`` with a test QMP socket and one for uffdpy; killed by pid."""

    def __init__(self, qemu: str, args: Sequence[str], *, paused: bool) -> None:
        self.qemu = Qemu([qemu, *args], incoming="defer", paused=paused, qmp_sockets=2)
        self.proc = self.qemu.proc
        self.uffdpy_sock, self.test_sock = self.qemu.qmp_paths
        self.qmp = QmpClient(self.test_sock, timeout=30)

    def output(self) -> str:
        return self.qemu.output()

    def status(self) -> str:
        return str(self.qmp.call("query-migrate").get("status", "none"))

    def wait_status(self, status: str, timeout: float = 30, since: int = 0) -> Dict[str, Any]:
        """The MIGRATION event of ``status``, the first at index ``since`` of the events or later."""
        return self.qmp.wait_event("MIGRATION", timeout=timeout, since=since,
                                   match=lambda e: e["data"]["status"] == status)

    def resave(self, path: Path) -> Snapshot:
        """Save the (paused) destination again with mapped-ram; QEMU writes the file."""
        self.qmp.call("migrate-set-capabilities", capabilities=[
            {"capability": "postcopy-preempt", "state": False},
            {"capability": "postcopy-ram", "state": False},
            {"capability": "mapped-ram", "state": True}])
        self.qmp.call("migrate", uri=f"file:{path}")
        self.qmp.wait_migration(timeout=60, poll=0.02)
        return Snapshot.open(path)

    def close(self) -> None:
        self.qmp.close()
        self.qemu.kill()


@pytest.fixture
def destination(qemu_binary: str) -> Iterator[Any]:
    made: List[Destination] = []

    def start(args: Sequence[str], *, paused: bool = False) -> Destination:
        d = Destination(qemu_binary, args, paused=paused)
        made.append(d)
        return d
    yield start
    for d in made:
        d.close()



@pytest.fixture
def short_tmp() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="uffdpy-rt-")
    yield path
    subprocess.run(["rm", "-rf", path], check=False)



@pytest.fixture(scope="session")
def firmware(qemu_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """pc (with VGA and known bytes at 2 MiB) and q35 snapshots that QEMU saved after 0.3 s."""
    from uffdpy.harness.vm import VmConfig, random_region, save_snapshot
    d = tmp_path_factory.mktemp("fw")
    out = {}
    for machine, extra in (("pc", ("-device", "VGA")), ("q35", ())):
        cfg = VmConfig(machine=machine, mem="64M", args=extra, qemu=qemu_binary)
        region = random_region(str(d), addr=0x200000, size=0x80000, seed=11)
        path = d / f"{machine}.img"
        save_snapshot(cfg, str(path), regions=[region], run_seconds=0.3, timeout=60)
        out[machine] = (str(path), cfg.argv()[1:] + region.args())
    return out
