"""Shared test fixtures.

Tests are grouped by what they need (see README): pure tests run anywhere;
``kernel`` tests need a working userfaultfd; ``qemu`` tests need a real
``qemu-system-x86_64``.  A QEMU test skips only when QEMU is absent, and
``UFFDPY_REQUIRE_QEMU=1`` (set by CI) turns that skip into a failure.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

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
