"""Userfaultfd against the running kernel: real faults, every ioctl, every event.

Every toucher is another process or a thread whose access is a GIL-releasing
ctypes call (memmove/memset), so the handler (the test's own thread) can run
while it is parked; every wait has a timeout.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import select
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import pytest

from uffdpy import ioctl as abi
from uffdpy.memory import PAGE_SIZE, Mapping, memfd_create
from uffdpy.uffd import (
    ContinueMode, CopyMode, Event, EventsPendingError, Feature, FeatureUnavailableError,
    Filler, ForkEvent, Ioctl, MoveMode, PagefaultEvent, PagefaultFlag, ProcessGoneError,
    RangeGoneError, RegisterMode, RemoveEvent, UffdError, Userfaultfd,
    WriteprotectMode, ZeropageMode, _fill_outcome, probe_features,
)

pytestmark = [pytest.mark.timeout(60), pytest.mark.kernel]

ROOT = Path(__file__).resolve().parent.parent
WAIT = 10.0  # seconds: the longest any single wait in these tests may take


def _kernel_uffd_or_skip() -> None:
    try:
        Userfaultfd().close()
    except UffdError as exc:
        pytest.skip(f"userfaultfd unavailable here: {exc}")


@pytest.fixture(autouse=True)
def _need_uffd() -> None:
    _kernel_uffd_or_skip()


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


class Toucher(threading.Thread):
    """A thread that reads (or writes) registered memory with a GIL-releasing call."""

    def __init__(self, address: int, *, write: Optional[bytes] = None, size: int = 8) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.write = write
        self.data = ctypes.create_string_buffer(size)
        self.tid = 0
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        self.tid = threading.get_native_id()
        try:
            if self.write is None:
                ctypes.memmove(self.data, self.address, len(self.data))
            else:
                ctypes.memmove(self.address, self.write, len(self.write))
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self) -> bytes:
        """Join with a timeout; the bytes read."""
        self.join(WAIT)
        assert not self.is_alive(), "toucher still parked on its fault"
        assert self.error is None, self.error
        return self.data.raw


def next_events(uffd: Userfaultfd, timeout: float = WAIT) -> List[Event]:
    """Poll ``uffd`` and read what is queued; fails after ``timeout`` seconds."""
    poller = select.poll()
    poller.register(uffd.fileno(), select.POLLIN)
    assert poller.poll(int(timeout * 1000)), f"no event within {timeout} s"
    events = uffd.read_events()
    assert events, "poll said readable but nothing was read"
    return events


def next_fault(uffd: Userfaultfd) -> PagefaultEvent:
    (event,) = next_events(uffd)
    assert isinstance(event, PagefaultEvent), event
    return event


def page_of(byte: int) -> ctypes.Array:  # type: ignore[type-arg]
    return ctypes.create_string_buffer(bytes([byte]) * PAGE_SIZE, PAGE_SIZE)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def region() -> "Mapping":
    with Mapping.anonymous(4 * PAGE_SIZE) as mapping:
        yield mapping


# The fill scenarios run through both ways to COPY, ZEROPAGE and WAKE: the
# Userfaultfd methods and a Filler.  ``Methods`` gives the methods Filler's
# signatures (modes as plain ints), so one test body serves both.


class Methods:
    """The :class:`Userfaultfd` fill methods behind :class:`Filler`'s signatures."""

    def __init__(self, uffd: Userfaultfd) -> None:
        self.uffd = uffd

    def copy(self, dst: int, src: int, length: int, mode: int = 0) -> int:
        return self.uffd.copy(dst, src, length, mode=CopyMode(mode))

    def zeropage(self, start: int, length: int, mode: int = 0) -> int:
        return self.uffd.zeropage(start, length, mode=ZeropageMode(mode))

    def wake(self, start: int, length: int) -> None:
        self.uffd.wake(start, length)


Fills = Union[Methods, Filler]


@pytest.fixture(params=[Methods, Filler], ids=["methods", "filler"])
def api(request: pytest.FixtureRequest) -> Callable[[Userfaultfd], Fills]:
    """The fills of a uffd, by one API: ``api(uffd).copy(dst, src, length, mode)``."""
    return request.param


def python_usable_by(setpriv: List[str]) -> str:
    """This interpreter, or else the system's, if the other user cannot run this one.

    A Python built with a shared libpython under /root (pyenv's 3.13, say)
    does not start for another user: /root is 0700 and the library is found
    through a RUNPATH there.  The code under test is the same either way.
    """
    for candidate in (sys.executable, "/usr/bin/python3"):
        if subprocess.run(setpriv + [candidate, "-c", "pass"], capture_output=True,
                          timeout=30, cwd="/").returncode == 0:
            return candidate
    raise AssertionError(f"no Python that {setpriv[1:3]} can run: tried {sys.executable} "
                         "and /usr/bin/python3")


def run_python(code: str, *, user: Optional[int] = None,
               timeout: float = 30) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    """Run ``code`` in a fresh interpreter that imports uffdpy from this checkout."""
    argv = [sys.executable, "-c", textwrap.dedent(code)]
    path = str(ROOT)
    with tempfile.TemporaryDirectory(prefix="uffdpy-user-") as tmp:
        if user is not None:
            # the checkout may sit in a folder the other user cannot enter
            # (mktemp -d is 0700): give it a world-readable copy of the package
            os.chmod(tmp, 0o755)
            shutil.copytree(ROOT / "uffdpy", os.path.join(tmp, "uffdpy"))
            for dirpath, dirnames, filenames in os.walk(tmp):
                for name in dirnames + filenames:
                    os.chmod(os.path.join(dirpath, name), 0o755)
            path = tmp
            setpriv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
            argv = setpriv + [python_usable_by(setpriv)] + argv[1:]
        env = dict(os.environ, PYTHONPATH=path, PYTHONDONTWRITEBYTECODE="1")
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd="/")


# ---------------------------------------------------------------------------
# creation, handshake, ownership
# ---------------------------------------------------------------------------


def test_create_via_device_nonblocking_cloexec() -> None:
    with Userfaultfd() as uffd:
        assert uffd.created_via in ("/dev/userfaultfd", "syscall")
        if os.path.exists("/dev/userfaultfd"):
            assert uffd.created_via == "/dev/userfaultfd"
        assert not os.get_blocking(uffd.fileno())
        assert not os.get_inheritable(uffd.fileno())
        assert uffd.ioctls & (Ioctl.REGISTER | Ioctl.UNREGISTER | Ioctl.API) == (
            Ioctl.REGISTER | Ioctl.UNREGISTER | Ioctl.API)
        assert uffd.features == probe_features()
        assert not uffd.user_mode_only and not uffd.closed
        assert uffd.read_events() == []


def test_user_mode_only_as_root() -> None:
    with Userfaultfd(user_mode_only=True) as uffd:
        assert uffd.user_mode_only


def test_api_works_once_per_fd() -> None:
    with Userfaultfd(handshake=False) as uffd:
        assert uffd.features == Feature(0)
        offered = uffd.api(Feature.THREAD_ID)
        assert Feature.THREAD_ID in offered
        assert uffd.requested_features == Feature.THREAD_ID
        with pytest.raises(UffdError) as info:
            uffd.api()
        assert info.value.errno == errno.EINVAL
        assert "UFFDIO_API" in str(info.value) and "once per fd" in str(info.value)


def test_missing_feature_names_requested_and_offered() -> None:
    before = fd_count()
    future = Feature(1 << 40)
    with pytest.raises(FeatureUnavailableError) as info:
        Userfaultfd(features=Feature.THREAD_ID | future)
    err = info.value
    assert err.errno == errno.EINVAL
    assert err.missing == future and err.offered == probe_features()
    assert "offers" in str(err) and "THREAD_ID" in str(err) and "0x10000000000" in str(err)
    assert fd_count() == before


def test_close_twice_and_after_failed_constructor() -> None:
    uffd = Userfaultfd()
    fd = uffd.fileno()
    uffd.close()
    uffd.close()
    assert uffd.closed
    with pytest.raises(ValueError):
        uffd.fileno()
    assert fd >= 0
    half = Userfaultfd.__new__(Userfaultfd)  # as if __init__ had raised before the fd
    half.close()
    half.close()
    assert half.closed
    before = fd_count()
    with pytest.raises(FeatureUnavailableError) as info:
        Userfaultfd(features=Feature(1 << 50))
    assert fd_count() == before
    assert info.value.missing == Feature(1 << 50)


def test_no_fd_leak_over_100_cycles(region: Mapping) -> None:
    before = fd_count()
    for _ in range(100):
        with Userfaultfd() as uffd:
            uffd.register(region.address, PAGE_SIZE)
    assert fd_count() == before


def test_fills_on_a_closed_uffd_fail_with_ebadf(region: Mapping,
                                                 api: Callable[[Userfaultfd], Fills]) -> None:
    """Also when the fd number is in use again, by another uffd over the same range."""
    uffd = Userfaultfd()
    fills = api(uffd)                 # made while open
    number = uffd.fileno()
    uffd.close()
    src = page_of(0x66)
    with Userfaultfd() as other:
        other.register(region.address, region.length)
        extra = -1
        if other.fileno() != number:     # the old number must name the other uffd
            extra = os.dup2(other.fileno(), number)
        try:
            calls = (
                (lambda: fills.copy(region.address, ctypes.addressof(src), PAGE_SIZE),
                 f"UFFDIO_COPY(dst={region.address:#x}, src={ctypes.addressof(src):#x}, "
                 f"len={PAGE_SIZE:#x}, mode=0)"),
                (lambda: fills.zeropage(0x1000, PAGE_SIZE),
                 f"UFFDIO_ZEROPAGE(start=0x1000, len={PAGE_SIZE:#x}, mode=0)"),
                (lambda: fills.wake(region.address, PAGE_SIZE),
                 f"UFFDIO_WAKE(start={region.address:#x}, len={PAGE_SIZE:#x})"),
            )
            for call, name in calls:
                with pytest.raises(UffdError) as info:
                    call()
                assert info.value.errno == errno.EBADF, info.value
                assert str(info.value).startswith(name + ": [Errno 9]"), str(info.value)
        finally:
            if extra >= 0:
                os.close(extra)
        # nothing reached the other uffd's range: its first page is still missing
        assert other.zeropage(region.address, PAGE_SIZE) == PAGE_SIZE


# ---------------------------------------------------------------------------
# register / fill
# ---------------------------------------------------------------------------


def test_register_returns_allowed_ioctls(region: Mapping) -> None:
    with Userfaultfd(features=Feature.PAGEFAULT_FLAG_WP) as uffd:
        allowed = uffd.register(region.address, region.length)
        assert allowed == 0x13C  # WAKE|COPY|ZEROPAGE|MOVE|POISON
        uffd.unregister(region.address, region.length)
        allowed = uffd.register(region.address, region.length,
                                mode=RegisterMode.MISSING | RegisterMode.WP)
        assert allowed == 0x17C and Ioctl.WRITEPROTECT in allowed
        uffd.unregister(region.address, region.length)
        with pytest.raises(UffdError) as info:
            uffd.register(region.address, region.length, mode=RegisterMode.MINOR)
        assert info.value.errno == errno.EINVAL
        text = str(info.value)
        assert text.startswith(f"UFFDIO_REGISTER(start={region.address:#x}, len=0x4000, "
                               "mode=MINOR): [Errno 22]"), text
        assert "MINOR mode needs shmem" in text
        with pytest.raises(UffdError):
            uffd.register(region.address + 1, PAGE_SIZE)


def test_register_busy_with_another_uffd(region: Mapping) -> None:
    with Userfaultfd() as first, Userfaultfd() as second:
        first.register(region.address, region.length)
        with pytest.raises(UffdError) as info:
            second.register(region.address, region.length)
        assert info.value.errno == errno.EBUSY


def test_copy_serves_a_fault(region: Mapping, api: Callable[[Userfaultfd], Fills]) -> None:
    with Userfaultfd() as uffd:
        fills = api(uffd)
        uffd.register(region.address, region.length)
        toucher = Toucher(region.address + PAGE_SIZE + 100)
        toucher.start()
        fault = next_fault(uffd)
        assert fault.address == region.address + PAGE_SIZE
        assert fault.flags == PagefaultFlag(0) and fault.thread_id == 0
        src = page_of(0x5A)
        assert fills.copy(fault.address, ctypes.addressof(src), PAGE_SIZE) == PAGE_SIZE
        assert toucher.finish() == b"\x5a" * 8
        writer = Toucher(region.address + 2 * PAGE_SIZE + 8, write=b"w")
        writer.start()
        fault = next_fault(uffd)
        assert fault.address == region.address + 2 * PAGE_SIZE
        assert fault.flags == PagefaultFlag.WRITE
        assert fills.copy(fault.address, ctypes.addressof(src), PAGE_SIZE) == PAGE_SIZE
        writer.finish()
        assert ctypes.string_at(fault.address + 7, 3) == b"\x5aw\x5a"


def test_write_fault_flag(region: Mapping) -> None:
    with Userfaultfd() as uffd:
        uffd.register(region.address, region.length)
        toucher = Toucher(region.address, write=b"hi")
        toucher.start()
        fault = next_fault(uffd)
        assert fault.flags == PagefaultFlag.WRITE
        assert uffd.zeropage(fault.address, PAGE_SIZE) == PAGE_SIZE
        toucher.finish()
        assert ctypes.string_at(region.address, 3) == b"hi\0"


def test_zeropage_serves_a_fault(region: Mapping, api: Callable[[Userfaultfd], Fills]) -> None:
    with Userfaultfd() as uffd:
        fills = api(uffd)
        uffd.register(region.address, region.length)
        toucher = Toucher(region.address + 3 * PAGE_SIZE)
        toucher.start()
        fault = next_fault(uffd)
        assert fault.address == region.address + 3 * PAGE_SIZE
        assert fills.zeropage(fault.address, PAGE_SIZE) == PAGE_SIZE
        assert toucher.finish() == b"\0" * 8
        writer = Toucher(region.address + 8, write=b"w")
        writer.start()
        fault = next_fault(uffd)
        assert fault.address == region.address and fault.flags == PagefaultFlag.WRITE
        assert fills.zeropage(fault.address, PAGE_SIZE) == PAGE_SIZE
        writer.finish()
        assert ctypes.string_at(region.address + 7, 3) == b"\0w\0"


def test_eexist_then_wake(region: Mapping, api: Callable[[Userfaultfd], Fills]) -> None:
    with Userfaultfd() as uffd:
        fills = api(uffd)
        uffd.register(region.address, region.length)
        toucher = Toucher(region.address + PAGE_SIZE)
        toucher.start()
        fault = next_fault(uffd)
        src = page_of(0x11)
        done = fills.copy(fault.address, ctypes.addressof(src), PAGE_SIZE,
                          abi.UFFDIO_COPY_MODE_DONTWAKE)
        assert done == PAGE_SIZE
        toucher.join(0.3)
        assert toucher.is_alive(), "DONTWAKE must leave the thread parked"
        assert fills.copy(fault.address, ctypes.addressof(src), PAGE_SIZE) == -errno.EEXIST
        assert fills.zeropage(fault.address, PAGE_SIZE) == -errno.EEXIST
        toucher.join(0.3)
        assert toucher.is_alive(), "EEXIST wakes nobody: the caller must wake the range"
        fills.wake(fault.address, PAGE_SIZE)
        assert toucher.finish() == b"\x11" * 8


def test_partial_progress_over_a_half_populated_range(
        region: Mapping, api: Callable[[Userfaultfd], Fills]) -> None:
    with Userfaultfd() as uffd:
        fills = api(uffd)
        uffd.register(region.address, region.length)
        src = ctypes.create_string_buffer(b"\x01" * PAGE_SIZE + b"\x02" * PAGE_SIZE)
        second = region.address + PAGE_SIZE
        assert fills.zeropage(second, PAGE_SIZE) == PAGE_SIZE
        done = fills.copy(region.address, ctypes.addressof(src), 2 * PAGE_SIZE)
        assert done == PAGE_SIZE  # EAGAIN with progress: continue from +done
        assert ctypes.string_at(region.address, 1) == b"\x01"
        assert ctypes.string_at(second, 1) == b"\0"
        assert fills.copy(second, ctypes.addressof(src) + PAGE_SIZE, PAGE_SIZE) == -errno.EEXIST
        third = region.address + 2 * PAGE_SIZE
        assert fills.zeropage(third + PAGE_SIZE, PAGE_SIZE) == PAGE_SIZE
        assert fills.zeropage(third, 2 * PAGE_SIZE) == PAGE_SIZE   # partial zeropage
        assert fills.zeropage(third, PAGE_SIZE) == -errno.EEXIST


def wait_readable(uffd: Userfaultfd) -> None:
    poller = select.poll()
    poller.register(uffd.fileno(), select.POLLIN)
    assert poller.poll(int(WAIT * 1000)), f"no event within {WAIT} s"


def start_dontneed(region: Mapping) -> Tuple[threading.Thread, List[BaseException]]:
    """``MADV_DONTNEED`` of the first page from a thread, leaving a REMOVE event pending.

    madvise waits until the REMOVE event is read, so it runs in a thread (the
    ctypes call releases the GIL).  Returns the thread and its errors.
    """
    errors: List[BaseException] = []

    def dontneed() -> None:
        try:
            abi.libc.madvise(region.address, PAGE_SIZE, abi.MADV_DONTNEED)
        except BaseException as exc:
            errors.append(exc)

    advisor = threading.Thread(target=dontneed, daemon=True)
    advisor.start()
    return advisor, errors


def test_eagain_while_events_pending(region: Mapping,
                                     api: Callable[[Userfaultfd], Fills]) -> None:
    with Userfaultfd(features=Feature.EVENT_REMOVE) as uffd:
        fills = api(uffd)
        uffd.register(region.address, region.length)
        src = page_of(0x33)
        assert fills.copy(region.address, ctypes.addressof(src), PAGE_SIZE) == PAGE_SIZE
        advisor, result = start_dontneed(region)
        wait_readable(uffd)
        target = region.address + 2 * PAGE_SIZE
        assert fills.copy(target, ctypes.addressof(src), PAGE_SIZE) == -errno.EAGAIN
        assert fills.zeropage(target, PAGE_SIZE) == -errno.EAGAIN
        assert fills.copy(target, ctypes.addressof(src), PAGE_SIZE) == -errno.EAGAIN
        events = uffd.read_events()
        assert events == [RemoveEvent(region.address, region.address + PAGE_SIZE)]
        advisor.join(WAIT)
        assert not advisor.is_alive() and not result
        assert fills.copy(target, ctypes.addressof(src), PAGE_SIZE) == PAGE_SIZE
        assert ctypes.string_at(target, 1) == b"\x33"


def test_no_progress_eagain_is_negative_on_old_kernels() -> None:
    """Kernels that leave the count untouched (0 here) still report -EAGAIN."""
    exc = OSError(errno.EAGAIN, "x")
    assert _fill_outcome(exc, 0, "UFFDIO_COPY", 0, PAGE_SIZE, CopyMode(0), 0) == -errno.EAGAIN
    assert _fill_outcome(exc, -errno.EAGAIN, "UFFDIO_COPY", 0, 1, 0) == -errno.EAGAIN
    assert _fill_outcome(exc, 8192, "UFFDIO_COPY", 0, 3 * PAGE_SIZE, 0) == 8192
    with pytest.raises(ProcessGoneError):
        _fill_outcome(OSError(errno.ESRCH, "x"), -errno.ESRCH, "UFFDIO_COPY", 0, 1, 0)


def test_fill_on_unregistered_range_is_range_gone(region: Mapping,
                                                  api: Callable[[Userfaultfd], Fills]) -> None:
    with Userfaultfd() as uffd:
        fills = api(uffd)
        src = page_of(1)
        call = (f"UFFDIO_COPY(dst={region.address:#x}, src={ctypes.addressof(src):#x}, "
                f"len={PAGE_SIZE:#x}, mode=0)")
        with pytest.raises(UffdError) as info:            # never registered
            fills.copy(region.address, ctypes.addressof(src), PAGE_SIZE)
        assert info.value.errno in (errno.ENOENT, errno.EINVAL)
        assert call in str(info.value)
        uffd.register(region.address, region.length)
        uffd.unregister(region.address, region.length)
        with pytest.raises(RangeGoneError) as info:       # registered, then no more
            fills.copy(region.address, ctypes.addressof(src), PAGE_SIZE)
        assert isinstance(info.value, FileNotFoundError)
        assert info.value.errno == errno.ENOENT
        assert str(info.value).startswith(call + ": [Errno 2]"), str(info.value)


def test_fill_errors_name_the_ioctl_and_range(region: Mapping,
                                              api: Callable[[Userfaultfd], Fills]) -> None:
    with Userfaultfd() as uffd:
        fills = api(uffd)
        uffd.register(region.address, region.length)
        src = page_of(0)
        with pytest.raises(UffdError) as info:            # misaligned
            fills.zeropage(region.address + 1, PAGE_SIZE, abi.UFFDIO_ZEROPAGE_MODE_DONTWAKE)
        assert type(info.value) is UffdError and info.value.errno == errno.EINVAL
        assert str(info.value).startswith(
            f"UFFDIO_ZEROPAGE(start={region.address + 1:#x}, len={PAGE_SIZE:#x}, "
            "mode=DONTWAKE): [Errno 22]"), str(info.value)
        with pytest.raises(UffdError) as info:            # misaligned length
            fills.copy(region.address, ctypes.addressof(src), PAGE_SIZE + 1,
                       abi.UFFDIO_COPY_MODE_DONTWAKE | abi.UFFDIO_COPY_MODE_WP)
        assert info.value.errno == errno.EINVAL
        assert str(info.value).startswith(
            f"UFFDIO_COPY(dst={region.address:#x}, src={ctypes.addressof(src):#x}, "
            f"len={PAGE_SIZE + 1:#x}, mode=DONTWAKE|WP): [Errno 22]"), str(info.value)
        with pytest.raises(UffdError) as info:
            fills.wake(region.address, 0)
        assert info.value.errno == errno.EINVAL
        assert str(info.value).startswith(
            f"UFFDIO_WAKE(start={region.address:#x}, len=0x0): [Errno 22]"), str(info.value)


def test_values_outside_64_bits(region: Mapping, api: Callable[[Userfaultfd], Fills]) -> None:
    """The methods wrap them as a C ``__u64`` would (the kernel: EINVAL); a Filler refuses them."""
    with Userfaultfd() as uffd:
        fills = api(uffd)
        uffd.register(region.address, region.length)
        for call in (lambda: fills.copy(-PAGE_SIZE, 0, PAGE_SIZE),
                     lambda: fills.zeropage(-PAGE_SIZE, PAGE_SIZE),
                     lambda: fills.zeropage(region.address, 1 << 64),   # wraps to length 0
                     lambda: fills.wake(-PAGE_SIZE, PAGE_SIZE)):
            if isinstance(fills, Methods):
                with pytest.raises(UffdError) as info:
                    call()
                assert info.value.errno == errno.EINVAL
            else:
                with pytest.raises(ValueError):
                    call()
        with pytest.raises(TypeError):
            fills.copy(region.address, 0.5, PAGE_SIZE)  # type: ignore[arg-type]
        # nothing was left half-written: the next call is whole
        assert fills.zeropage(region.address, PAGE_SIZE) == PAGE_SIZE


def test_methods_fill_from_several_threads_at_once() -> None:
    """Each call of the methods has its own struct: concurrent fills never mix their values."""
    threads, pages_each, rounds = 6, 32, 4
    pages = threads * pages_each
    sources = [page_of(t + 1) for t in range(threads)]
    with Mapping.anonymous(pages * PAGE_SIZE) as region, Userfaultfd() as uffd:
        uffd.register(region.address, region.length)
        for _ in range(rounds):
            results: List[List[int]] = [[] for _ in range(threads)]
            errors: List[BaseException] = []
            start = threading.Barrier(threads)

            def fill(t: int) -> None:
                try:
                    start.wait(WAIT)
                    for page in range(t, pages, threads):     # interleaved with the others
                        address = region.address + page * PAGE_SIZE
                        results[t].append(uffd.copy(address, ctypes.addressof(sources[t]),
                                                    PAGE_SIZE))
                        uffd.wake(address, PAGE_SIZE)
                except BaseException as exc:
                    errors.append(exc)

            workers = [threading.Thread(target=fill, args=(t,), daemon=True)
                       for t in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(WAIT)
                assert not worker.is_alive()
            assert not errors, errors
            assert results == [[PAGE_SIZE] * pages_each] * threads
            # as many whole fills as pages: every page is present, reading cannot fault
            for page in range(pages):
                address = region.address + page * PAGE_SIZE
                expected = bytes([page % threads + 1])
                assert ctypes.string_at(address, 1) == expected, page
                assert ctypes.string_at(address + PAGE_SIZE - 1, 1) == expected, page
            region.madvise(abi.MADV_DONTNEED)                 # missing again: next round


def test_thread_id(region: Mapping) -> None:
    with Userfaultfd(features=Feature.THREAD_ID) as uffd:
        uffd.register(region.address, region.length)
        toucher = Toucher(region.address)
        toucher.start()
        fault = next_fault(uffd)
        assert fault.thread_id == toucher.tid != 0
        assert fault.thread_id != threading.get_native_id()
        uffd.zeropage(fault.address, PAGE_SIZE)
        toucher.finish()


def test_exact_address(region: Mapping) -> None:
    with Userfaultfd(features=Feature.EXACT_ADDRESS) as uffd:
        uffd.register(region.address, region.length)
        toucher = Toucher(region.address + 1234)
        toucher.start()
        fault = next_fault(uffd)
        assert fault.address == region.address + 1234
        uffd.zeropage(fault.address & ~(PAGE_SIZE - 1), PAGE_SIZE)
        toucher.finish()


def test_writeprotect_write_fault(region: Mapping) -> None:
    with Userfaultfd(features=Feature.PAGEFAULT_FLAG_WP) as uffd:
        uffd.register(region.address, region.length,
                      mode=RegisterMode.MISSING | RegisterMode.WP)
        src = page_of(0x44)
        uffd.copy(region.address, ctypes.addressof(src), PAGE_SIZE)
        uffd.writeprotect(region.address, PAGE_SIZE)
        reader = Toucher(region.address)  # reads are not trapped
        reader.start()
        assert reader.finish() == b"\x44" * 8
        writer = Toucher(region.address + 8, write=b"\x99")
        writer.start()
        fault = next_fault(uffd)
        assert fault.address == region.address
        assert fault.flags == PagefaultFlag.WRITE | PagefaultFlag.WP
        writer.join(0.2)
        assert writer.is_alive()
        uffd.writeprotect(region.address, PAGE_SIZE, mode=WriteprotectMode(0))
        writer.finish()
        assert ctypes.string_at(region.address + 7, 3) == b"\x44\x99\x44"
        with pytest.raises(UffdError) as info:
            uffd.writeprotect(region.address, PAGE_SIZE,
                              mode=WriteprotectMode.WP | WriteprotectMode.DONTWAKE)
        assert info.value.errno == errno.EINVAL
        assert "mode=WP|DONTWAKE" in str(info.value)
        # COPY with WP installs a protected page.
        uffd.copy(region.address + PAGE_SIZE, ctypes.addressof(src), PAGE_SIZE,
                  mode=CopyMode.WP)
        writer = Toucher(region.address + PAGE_SIZE, write=b"\x01")
        writer.start()
        assert next_fault(uffd).flags & PagefaultFlag.WP
        uffd.writeprotect(region.address + PAGE_SIZE, PAGE_SIZE, mode=WriteprotectMode(0))
        writer.finish()


def test_writeprotect_eagain_while_events_pending(region: Mapping) -> None:
    with Userfaultfd(features=Feature.PAGEFAULT_FLAG_WP | Feature.EVENT_REMOVE) as uffd:
        uffd.register(region.address, region.length,
                      mode=RegisterMode.MISSING | RegisterMode.WP)
        src = page_of(1)
        uffd.copy(region.address, ctypes.addressof(src), 2 * PAGE_SIZE)
        advisor = threading.Thread(
            target=abi.libc.madvise, args=(region.address, PAGE_SIZE, abi.MADV_DONTNEED),
            daemon=True)
        advisor.start()
        next_poll = select.poll()
        next_poll.register(uffd.fileno(), select.POLLIN)
        assert next_poll.poll(int(WAIT * 1000))
        with pytest.raises(EventsPendingError) as info:
            uffd.writeprotect(region.address + PAGE_SIZE, PAGE_SIZE)
        assert isinstance(info.value, BlockingIOError) and "read_events" in str(info.value)
        assert isinstance(uffd.read_events()[0], RemoveEvent)
        advisor.join(WAIT)
        uffd.writeprotect(region.address + PAGE_SIZE, PAGE_SIZE)


def test_minor_fault_on_memfd_released_with_continue() -> None:
    features = Feature.MINOR_SHMEM
    if not probe_features() & features:
        pytest.skip("kernel lacks UFFD_FEATURE_MINOR_SHMEM (needs 5.14+ with "
                    "CONFIG_HAVE_ARCH_USERFAULTFD_MINOR)")
    fd = memfd_create("uffdpy-minor")
    try:
        os.ftruncate(fd, 2 * PAGE_SIZE)
        with Mapping.of_file(fd, 2 * PAGE_SIZE, writable=True) as guest, \
                Userfaultfd(features=features) as uffd:
            allowed = uffd.register(guest.address, guest.length, mode=RegisterMode.MINOR)
            assert Ioctl.CONTINUE in allowed
            os.pwrite(fd, b"page cache", PAGE_SIZE)  # fill the page cache, not the mapping
            toucher = Toucher(guest.address + PAGE_SIZE, size=10)
            toucher.start()
            fault = next_fault(uffd)
            assert fault.address == guest.address + PAGE_SIZE
            assert fault.flags == PagefaultFlag.MINOR
            assert uffd.continue_(fault.address, PAGE_SIZE) == PAGE_SIZE
            assert toucher.finish() == b"page cache"
            assert uffd.continue_(fault.address, PAGE_SIZE) == -errno.EEXIST
            with pytest.raises(UffdError) as info:   # a hole in the file: nothing to map
                uffd.continue_(guest.address, PAGE_SIZE)
            assert info.value.errno == errno.EFAULT and "page cache" in str(info.value)
            os.pwrite(fd, b"first", 0)
            assert uffd.continue_(guest.address, PAGE_SIZE,
                                  mode=ContinueMode.DONTWAKE) == PAGE_SIZE
            assert ctypes.string_at(guest.address, 5) == b"first"
    finally:
        os.close(fd)


def test_poison_gives_sigbus_in_a_child() -> None:
    if not probe_features() & Feature.POISON:
        pytest.skip("kernel lacks UFFD_FEATURE_POISON (needs 6.6+)")
    result = run_python("""
        import ctypes, sys
        from uffdpy.memory import Mapping, PAGE_SIZE
        from uffdpy.uffd import Userfaultfd, Feature
        m = Mapping.anonymous(2 * PAGE_SIZE)
        u = Userfaultfd(features=Feature.POISON)
        u.register(m.address, m.length)
        print("poisoned", u.poison(m.address, PAGE_SIZE), flush=True)
        ctypes.memmove(ctypes.create_string_buffer(1), m.address, 1)
        print("not reached", flush=True)
    """)
    assert result.stdout.split() == ["poisoned", str(PAGE_SIZE)], result.stderr
    assert result.returncode == -signal.SIGBUS, (result.returncode, result.stderr)


def test_move(region: Mapping) -> None:
    if not probe_features() & Feature.MOVE:
        pytest.skip("kernel lacks UFFD_FEATURE_MOVE (needs 6.8+)")
    with Mapping.anonymous(2 * PAGE_SIZE) as source, Userfaultfd(features=Feature.MOVE) as uffd:
        ctypes.memset(source.address, 0x77, source.length)
        allowed = uffd.register(region.address, region.length)
        assert Ioctl.MOVE in allowed
        toucher = Toucher(region.address)
        toucher.start()
        fault = next_fault(uffd)
        assert uffd.move(fault.address, source.address, PAGE_SIZE) == PAGE_SIZE
        assert toucher.finish() == b"\x77" * 8
        # The page moved: the source is now a hole (reads as zero-fill).
        assert ctypes.string_at(source.address, 1) == b"\0"
        # A hole in the source: ENOENT unless ALLOW_SRC_HOLES.
        hole = Mapping.anonymous(PAGE_SIZE)
        with hole:
            with pytest.raises(RangeGoneError):
                uffd.move(region.address + PAGE_SIZE, hole.address, PAGE_SIZE)
            assert uffd.move(region.address + PAGE_SIZE, hole.address, PAGE_SIZE,
                             mode=MoveMode.ALLOW_SRC_HOLES) == PAGE_SIZE
        assert uffd.move(region.address, source.address + PAGE_SIZE, PAGE_SIZE) == -errno.EEXIST


# ---------------------------------------------------------------------------
# fork
# ---------------------------------------------------------------------------

FORKER = """
    import ctypes, os, socket, sys
    from uffdpy.memory import Mapping, PAGE_SIZE
    from uffdpy.uffd import Userfaultfd, Feature
    sock = socket.socket(fileno=int(sys.argv[1]))
    m = Mapping.anonymous(PAGE_SIZE)
    u = Userfaultfd(features=Feature.EVENT_FORK)
    u.register(m.address, m.length)
    socket.send_fds(sock, [m.address.to_bytes(8, "little")], [u.fileno()])
    sock.recv(1)                     # go
    pid = os.fork()                  # parks until the FORK event is read
    if pid == 0:
        out = ctypes.create_string_buffer(1)
        ctypes.memmove(out, m.address, 1)   # faults on the child's uffd
        os._exit(out.raw[0])
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_fork_event_hands_over_a_new_uffd() -> None:
    parent_sock, child_sock = socket.socketpair()
    code = textwrap.dedent(FORKER)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with parent_sock, child_sock:
        forker = subprocess.Popen([sys.executable, "-c", code, str(child_sock.fileno())],
                                  pass_fds=[child_sock.fileno()], env=env,
                                  stderr=subprocess.PIPE)
        try:
            parent_sock.settimeout(WAIT)
            msg, fds, _, _ = socket.recv_fds(parent_sock, 8, 1)
            address = int.from_bytes(msg, "little")
            with Userfaultfd.from_fd(fds[0], features=Feature.EVENT_FORK) as uffd:
                parent_sock.send(b"g")
                (event,) = next_events(uffd)
                assert isinstance(event, ForkEvent), event
                assert os.path.exists(f"/proc/self/fd/{event.ufd}")
                with Userfaultfd.from_fd(event.ufd) as child_uffd:
                    fault = next_fault(child_uffd)
                    assert fault.address == address
                    src = page_of(42)
                    assert child_uffd.copy(address, ctypes.addressof(src), PAGE_SIZE) == PAGE_SIZE
                    assert forker.wait(WAIT) == 42, forker.stderr.read() if forker.stderr else ""
                    # The child's address space is gone now.
                    with pytest.raises((ProcessGoneError, RangeGoneError)):
                        child_uffd.copy(address + 0, ctypes.addressof(src), PAGE_SIZE)
        finally:
            if forker.poll() is None:
                forker.kill()
            forker.wait(WAIT)


# ---------------------------------------------------------------------------
# USER_MODE_ONLY and privilege
# ---------------------------------------------------------------------------


def test_user_mode_only_kernel_access_gets_efault(region: Mapping) -> None:
    with Userfaultfd(user_mode_only=True) as uffd:
        uffd.register(region.address, region.length)
        read_end, write_end = os.pipe()
        try:
            os.write(write_end, b"kernel writes here")
            view = region.view()
            with pytest.raises(OSError) as info:
                os.readv(read_end, [view[:PAGE_SIZE]])  # copy_to_user into the range
            assert info.value.errno == errno.EFAULT
            with pytest.raises(OSError) as info:
                os.write(write_end, view[PAGE_SIZE:2 * PAGE_SIZE])  # copy_from_user
            assert info.value.errno == errno.EFAULT
            del view
        finally:
            os.close(read_end)
            os.close(write_end)
        # A user-mode access is still trapped.
        toucher = Toucher(region.address)
        toucher.start()
        fault = next_fault(uffd)
        uffd.zeropage(fault.address, PAGE_SIZE)
        toucher.finish()


UNPRIVILEGED = """
    import ctypes, json, os
    from uffdpy.memory import Mapping, PAGE_SIZE
    from uffdpy.uffd import Userfaultfd, UffdPermissionError
    out = {"uid": os.getuid()}
    try:
        Userfaultfd().close()
        out["full"] = "created"
    except UffdPermissionError as exc:
        out["full"] = str(exc)
        out["is_permission_error"] = isinstance(exc, PermissionError)
    with Userfaultfd(user_mode_only=True) as u:
        out["via"] = u.created_via
        m = Mapping.anonymous(PAGE_SIZE)
        u.register(m.address, m.length)
        out["zeropage"] = u.zeropage(m.address, PAGE_SIZE)
        m.close()
    print(json.dumps(out))
"""


def test_unprivileged_user_gets_how_to_fix_and_user_mode_only_works() -> None:
    import json
    with open("/proc/sys/vm/unprivileged_userfaultfd") as sysctl:
        if sysctl.read().strip() != "0":
            pytest.skip("vm.unprivileged_userfaultfd=1: unprivileged users are allowed here")
    if os.geteuid() != 0:
        pytest.skip("setpriv to another uid needs root")
    result = run_python(UNPRIVILEGED, user=65534)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["uid"] == 65534
    message = out["full"]
    assert out["is_permission_error"]
    for needle in ("CAP_SYS_PTRACE", "vm.unprivileged_userfaultfd=1", "/dev/userfaultfd",
                   "user_mode_only=True", "EFAULT", "KVM"):
        assert needle in message, (needle, message)
    assert message.startswith("userfaultfd(flags=0x80800): [Errno 1]"), message
    assert out["via"] == "syscall"
    assert out["zeropage"] == PAGE_SIZE


def test_read_raw(region: Mapping) -> None:
    with Userfaultfd() as uffd:
        assert len(uffd.read_raw()) == 0
        uffd.register(region.address, region.length)
        toucher = Toucher(region.address)
        toucher.start()
        poller = select.poll()
        poller.register(uffd.fileno(), select.POLLIN)
        assert poller.poll(int(WAIT * 1000))
        messages = uffd.read_raw()
        assert len(messages) == 1
        assert messages[0].event == abi.UFFD_EVENT_PAGEFAULT
        assert messages[0].arg.pagefault.address == region.address
        uffd.zeropage(region.address, PAGE_SIZE)
        toucher.finish()


def test_many_faults_in_one_read(region: Mapping) -> None:
    with Userfaultfd() as uffd:
        uffd.register(region.address, region.length)
        touchers = [Toucher(region.address + i * PAGE_SIZE) for i in range(4)]
        for toucher in touchers:
            toucher.start()
        seen: set = set()
        while len(seen) < 4:
            for event in next_events(uffd):
                assert isinstance(event, PagefaultEvent)
                seen.add(event.address)
        assert uffd.zeropage(region.address, region.length) == region.length
        for toucher in touchers:
            toucher.finish()


def test_closing_the_uffd_releases_parked_faults_with_zeros(region: Mapping) -> None:
    uffd = Userfaultfd()
    uffd.register(region.address, region.length)
    toucher = Toucher(region.address)
    toucher.start()
    next_fault(uffd)
    uffd.close()
    assert toucher.finish() == b"\0" * 8


# ---------------------------------------------------------------------------
# Filler only: its message buffer (its fills run with the methods' scenarios)
# ---------------------------------------------------------------------------


def test_filler_serves_faults_with_copy_and_zeropage(region: Mapping) -> None:
    with Userfaultfd(features=Feature.THREAD_ID) as uffd:
        uffd.register(region.address, region.length)
        filler = Filler(uffd)
        assert filler.read() == 0                     # nothing queued: 0, no exception
        src = page_of(0x5A)
        for page, use_copy in ((2, True), (0, False), (3, True)):
            toucher = Toucher(region.address + page * PAGE_SIZE + 8, write=b"w")
            toucher.start()
            wait_readable(uffd)
            assert filler.read() == 1
            assert filler.buffer[0] == abi.UFFD_EVENT_PAGEFAULT
            address = filler.words[2]
            assert address == region.address + page * PAGE_SIZE
            assert filler.words[1] == abi.UFFD_PAGEFAULT_FLAG_WRITE
            assert filler.words[3] & 0xFFFFFFFF == toucher.tid != 0
            assert filler.decode(0) == PagefaultEvent(address, PagefaultFlag.WRITE, toucher.tid)
            if use_copy:
                assert filler.copy(address, ctypes.addressof(src), PAGE_SIZE) == PAGE_SIZE
            else:
                assert filler.zeropage(address, PAGE_SIZE) == PAGE_SIZE
            toucher.finish()
            fill = b"\x5a" if use_copy else b"\0"
            assert ctypes.string_at(address + 7, 3) == fill + b"w" + fill


def test_filler_reads_many_faults_at_once(region: Mapping) -> None:
    with Userfaultfd() as uffd:
        uffd.register(region.address, region.length)
        filler = Filler(uffd, max_messages=2)         # fewer than the faults: two reads
        touchers = [Toucher(region.address + i * PAGE_SIZE) for i in range(4)]
        for toucher in touchers:
            toucher.start()
        seen: set = set()
        while len(seen) < 4:
            wait_readable(uffd)
            count = filler.read()
            assert 1 <= count <= 2
            for k in range(count):
                assert filler.buffer[k * 32] == abi.UFFD_EVENT_PAGEFAULT
                seen.add(filler.words[k * 4 + 2])
        assert seen == {region.address + i * PAGE_SIZE for i in range(4)}
        for address in seen:
            assert filler.zeropage(address, PAGE_SIZE) == PAGE_SIZE
        for toucher in touchers:
            assert toucher.finish() == b"\0" * 8


def test_filler_reads_and_decodes_a_remove_event(region: Mapping) -> None:
    with Userfaultfd(features=Feature.EVENT_REMOVE) as uffd:
        uffd.register(region.address, region.length)
        filler = Filler(uffd)
        src = page_of(0x44)
        assert filler.copy(region.address, ctypes.addressof(src), PAGE_SIZE) == PAGE_SIZE
        advisor, result = start_dontneed(region)
        wait_readable(uffd)
        assert filler.read() == 1
        assert filler.buffer[0] == abi.UFFD_EVENT_REMOVE
        assert filler.decode(0) == RemoveEvent(region.address, region.address + PAGE_SIZE)
        advisor.join(WAIT)
        assert not advisor.is_alive() and not result
        assert filler.read() == 0


def test_filler_read_on_a_closed_uffd_and_bad_max_messages() -> None:
    uffd = Userfaultfd()
    filler = Filler(uffd)
    uffd.close()
    late = Filler(uffd)                               # made after the close
    for call in (filler.read, late.read, lambda: late.zeropage(0x1000, PAGE_SIZE)):
        with pytest.raises(UffdError) as info:
            call()
        assert info.value.errno == errno.EBADF
    assert str(info.value).startswith("UFFDIO_ZEROPAGE(start=0x1000, "), str(info.value)
    with pytest.raises(ValueError):
        Filler(uffd, max_messages=0)


def test_bench_fault_quick_runs() -> None:
    script = ROOT / "scripts" / "bench_fault.py"
    result = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True,
                            text=True, timeout=50)
    assert result.returncode == 0, result.stderr
    for needle in ("same CPU, poll", "other CPU, poll", "other CPU, busy", "2 MiB", "ZEROPAGE"):
        assert needle in result.stdout

