"""Shared test fixtures.

Tests are grouped by what they need (see README): pure tests run anywhere;
``kernel`` tests need a working userfaultfd; ``qemu`` tests need a real
``qemu-system-x86_64``.  A QEMU test skips only when QEMU is absent, and
``UFFDPY_REQUIRE_QEMU=1`` (set by CI) turns that skip into a failure.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

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
    from uffdpy import linuxguest
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
