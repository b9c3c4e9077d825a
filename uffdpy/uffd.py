"""A userfaultfd you own: create it, negotiate features, register, resolve, read events.

Some facts about userfaultfd
============================

The kernel parks a thread that touches a *registered* range when the page is
missing (``RegisterMode.MISSING``), write-protected (``WP``) or present in the
page cache but not mapped (``MINOR``), and queues a 32-byte ``uffd_msg`` on the
fd.  The handler reads the message and *resolves* the fault with one of the
fill ioctls (COPY, ZEROPAGE, CONTINUE, POISON, MOVE) or with WRITEPROTECT; by
default the ioctl also wakes every thread parked on the range it filled.  This
module relies on the following kernel behaviour (``fs/userfaultfd.c``).

**Results are signed counts, and two "errors" are outcomes.**  Each fill ioctl
writes a signed 64-bit count into its struct: the bytes done, or ``-errno``.
The methods here return that count decoded as *signed* (reading it unsigned
turns ``-EAGAIN`` into a 16 EiB "partial copy"; a Rust crate shipped that bug):

* ``length``: all done, and the range was woken unless DONTWAKE was asked.
* ``-EEXIST``: the *first* page was already there (another thread, or the
  prefetcher, filled it).  Not an error.  The kernel did not wake anybody,
  so the caller must :meth:`Userfaultfd.wake` the range, or a thread parked
  on it sleeps forever.
* ``0 < n < length``: the kernel made progress and then stopped (typically a
  later page was already present) and returned EAGAIN.  Only the first ``n``
  bytes were woken; continue from ``dst + n``.
* ``-EAGAIN``: nothing was done because a non-cooperative event (fork, mremap,
  ``MADV_DONTNEED``/``MADV_REMOVE``, munmap; see ``Feature.EVENT_*``) is queued
  and not yet read; the address space is changing under the handler.  Drain
  the events with :meth:`Userfaultfd.read_events`, update your view of the
  ranges, then retry.  Older kernels leave the count untouched in this case;
  the struct is zeroed before each call and a zero count with EAGAIN is
  reported as ``-EAGAIN`` too.

Everything else raises a :class:`UffdError` naming the ioctl and its
arguments: ``ENOENT`` (:class:`RangeGoneError`: the range was unmapped or
unregistered meanwhile; older kernels say ``EINVAL``), ``ESRCH``
(:class:`ProcessGoneError`: the process owning the memory has exited), and
plain ``EINVAL`` for misaligned or unregistered ranges and unsupported modes.

**DONTWAKE.**  ``*Mode.DONTWAKE`` fills without waking, so that several
fills can be batched and woken once with :meth:`Userfaultfd.wake`.  Forget
the wake and the faulting thread never returns.

**Closing the fd does not fail pending faults.**  On the last close the
kernel unregisters every range and wakes every parked thread; their faults,
and all later ones, are then handled as *ordinary* faults: anonymous memory
is filled with zeros.  A handler that dies therefore does not hang the guest;
it silently corrupts it.  Keep the fd open until every page has been filled
(the loader documents its shutdown order around this).

**USER_MODE_ONLY.**  ``Userfaultfd(user_mode_only=True)`` creates a uffd that
only traps faults raised by user-mode instructions.  It needs no privilege,
but a *kernel-mode* access to a registered, missing page (``os.read`` into
the range, ``copy_to_user`` in any syscall, GUP, and a **KVM vCPU touching
guest RAM**) is not queued: the syscall fails with ``EFAULT`` or the thread
gets SIGBUS.  Never use it for VM guest memory.

**Privilege.**  ``/dev/userfaultfd`` (kernel 6.1+) is tried first: whoever
may open it may trap kernel faults.  If the device is absent or not
accessible, the ``userfaultfd`` syscall is used (``created_via`` says which);
without USER_MODE_ONLY the syscall needs ``CAP_SYS_PTRACE`` or the sysctl
``vm.unprivileged_userfaultfd=1`` (default 0).  :class:`UffdPermissionError`
lists the ways out.

**Handshake.**  ``UFFDIO_API`` must be the first ioctl and works once per fd;
asking for a feature the kernel lacks fails with EINVAL and teaches nothing,
so :func:`probe_features` asks on a throw-away fd.  The kernel reports *all*
the features it offers; only the requested ones are enabled.

**fork.**  Without ``Feature.EVENT_FORK`` a child inherits the registered
memory but not the registration: its faults are ordinary.  With it (which
needs ``CAP_SYS_PTRACE``, EPERM otherwise), the child's copy of the ranges is
registered on a *new* uffd, which the kernel installs as a new fd in the
process that reads the FORK event; :class:`ForkEvent` carries that fd number
and the reader owns it (wrap it with :meth:`Userfaultfd.from_fd`).  The
uffd binds to the creator's address space: a handler in another process
(fd passed with ``SCM_RIGHTS``) resolves faults of the creator, except that
``UFFDIO_MOVE`` refuses to work across address spaces (EINVAL).

**The GIL.**  A Python thread that touches registered memory while holding
the GIL (``view[i] = 1``, ``bytes(view)``) is parked by the kernel *with the
GIL held*, so an in-process handler thread can never run: deadlock.  Touch
registered memory only with calls that release the GIL, such as
``ctypes.memmove``/``ctypes.memset``, or from another process (a VM's vCPU
threads are in QEMU).  Every ioctl and read here releases the GIL.

**Threads.**  The resolve methods may be called from several threads at once
(fault loop plus prefetcher): COPY, ZEROPAGE and WAKE borrow a set of structs
from the uffd's spares for the call (a new set when every one is in use),
the other fills build a fresh struct per call.
:meth:`Userfaultfd.read_events` and :meth:`Userfaultfd.read_raw` read into
one preallocated buffer and are meant for a single reader thread.

**Speed.**  COPY, ZEROPAGE and WAKE write their struct as 64-bit words into a
preallocated ``bytearray`` (cheaper than building a ctypes Structure per
call), and every fill passes its struct's address to an ``ioctl`` declared
without an errcheck; the kernel writes its count straight into the struct,
also on failure.  Not :func:`fcntl.ioctl`: it copies small buffers and, on
recent CPythons, copies the kernel's writes back only on success, and older
ones hold the GIL for buffers over 1 KiB.  A success returns ``length``
without decoding the struct: the kernel answers 0 only when the whole range
was done.  :class:`Filler` is the fault loop's fast path: one thread, the
structs and the message buffer preallocated, no enum objects per call.

**Polling.**  The fd is always ``O_NONBLOCK`` and ``O_CLOEXEC``; ``poll``
reports ``POLLERR`` on a blocking uffd and before the handshake.
"""
from __future__ import annotations

import ctypes
import enum
import errno
import os
import threading
from dataclasses import dataclass
from operator import index as _index
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

from .errors import UffdpyError
from . import ioctl as _abi

__all__ = [
    "Feature", "RegisterMode", "Ioctl", "CopyMode", "ZeropageMode", "WriteprotectMode",
    "ContinueMode", "PoisonMode", "MoveMode", "PagefaultFlag", "EventType",
    "PagefaultEvent", "ForkEvent", "RemapEvent", "RemoveEvent", "UnmapEvent", "Event",
    "UffdError", "UffdPermissionError", "FeatureUnavailableError", "RangeGoneError",
    "ProcessGoneError", "EventsPendingError", "Userfaultfd", "Filler", "probe_features",
    "DEVICE_PATH",
]

DEVICE_PATH = "/dev/userfaultfd"

# Unknown bits are kept (a newer kernel's features must survive a round trip):
# IntFlag does so by default on 3.9 and 3.10, and with boundary=KEEP from 3.11.
_KEEP: Dict[str, Any] = {"boundary": enum.KEEP} if hasattr(enum, "KEEP") else {}


class Feature(enum.IntFlag, **_KEEP):
    """``UFFD_FEATURE_*`` bits of ``uffdio_api.features``."""

    PAGEFAULT_FLAG_WP = _abi.UFFD_FEATURE_PAGEFAULT_FLAG_WP
    EVENT_FORK = _abi.UFFD_FEATURE_EVENT_FORK
    EVENT_REMAP = _abi.UFFD_FEATURE_EVENT_REMAP
    EVENT_REMOVE = _abi.UFFD_FEATURE_EVENT_REMOVE
    MISSING_HUGETLBFS = _abi.UFFD_FEATURE_MISSING_HUGETLBFS
    MISSING_SHMEM = _abi.UFFD_FEATURE_MISSING_SHMEM
    EVENT_UNMAP = _abi.UFFD_FEATURE_EVENT_UNMAP
    SIGBUS = _abi.UFFD_FEATURE_SIGBUS
    THREAD_ID = _abi.UFFD_FEATURE_THREAD_ID
    MINOR_HUGETLBFS = _abi.UFFD_FEATURE_MINOR_HUGETLBFS
    MINOR_SHMEM = _abi.UFFD_FEATURE_MINOR_SHMEM
    EXACT_ADDRESS = _abi.UFFD_FEATURE_EXACT_ADDRESS
    WP_HUGETLBFS_SHMEM = _abi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    WP_UNPOPULATED = _abi.UFFD_FEATURE_WP_UNPOPULATED
    POISON = _abi.UFFD_FEATURE_POISON
    WP_ASYNC = _abi.UFFD_FEATURE_WP_ASYNC
    MOVE = _abi.UFFD_FEATURE_MOVE


class RegisterMode(enum.IntFlag, **_KEEP):
    """``UFFDIO_REGISTER_MODE_*``: which faults on a range are reported."""

    MISSING = _abi.UFFDIO_REGISTER_MODE_MISSING
    WP = _abi.UFFDIO_REGISTER_MODE_WP
    MINOR = _abi.UFFDIO_REGISTER_MODE_MINOR


class Ioctl(enum.IntFlag, **_KEEP):
    """Masks of ioctls (bit ``1 << _UFFDIO_x``) reported by API and REGISTER."""

    REGISTER = 1 << _abi._UFFDIO_REGISTER
    UNREGISTER = 1 << _abi._UFFDIO_UNREGISTER
    WAKE = 1 << _abi._UFFDIO_WAKE
    COPY = 1 << _abi._UFFDIO_COPY
    ZEROPAGE = 1 << _abi._UFFDIO_ZEROPAGE
    MOVE = 1 << _abi._UFFDIO_MOVE
    WRITEPROTECT = 1 << _abi._UFFDIO_WRITEPROTECT
    CONTINUE = 1 << _abi._UFFDIO_CONTINUE
    POISON = 1 << _abi._UFFDIO_POISON
    API = 1 << _abi._UFFDIO_API


class CopyMode(enum.IntFlag, **_KEEP):
    """``UFFDIO_COPY_MODE_*``."""

    DONTWAKE = _abi.UFFDIO_COPY_MODE_DONTWAKE
    WP = _abi.UFFDIO_COPY_MODE_WP


class ZeropageMode(enum.IntFlag, **_KEEP):
    """``UFFDIO_ZEROPAGE_MODE_*``."""

    DONTWAKE = _abi.UFFDIO_ZEROPAGE_MODE_DONTWAKE


class WriteprotectMode(enum.IntFlag, **_KEEP):
    """``UFFDIO_WRITEPROTECT_MODE_*``; no WP bit means "remove protection"."""

    WP = _abi.UFFDIO_WRITEPROTECT_MODE_WP
    DONTWAKE = _abi.UFFDIO_WRITEPROTECT_MODE_DONTWAKE


class ContinueMode(enum.IntFlag, **_KEEP):
    """``UFFDIO_CONTINUE_MODE_*``."""

    DONTWAKE = _abi.UFFDIO_CONTINUE_MODE_DONTWAKE
    WP = _abi.UFFDIO_CONTINUE_MODE_WP


class PoisonMode(enum.IntFlag, **_KEEP):
    """``UFFDIO_POISON_MODE_*``."""

    DONTWAKE = _abi.UFFDIO_POISON_MODE_DONTWAKE


class MoveMode(enum.IntFlag, **_KEEP):
    """``UFFDIO_MOVE_MODE_*``."""

    DONTWAKE = _abi.UFFDIO_MOVE_MODE_DONTWAKE
    ALLOW_SRC_HOLES = _abi.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES


class PagefaultFlag(enum.IntFlag, **_KEEP):
    """``UFFD_PAGEFAULT_FLAG_*``: why a page fault was reported."""

    WRITE = _abi.UFFD_PAGEFAULT_FLAG_WRITE
    WP = _abi.UFFD_PAGEFAULT_FLAG_WP
    MINOR = _abi.UFFD_PAGEFAULT_FLAG_MINOR


class EventType(enum.IntEnum):
    """``UFFD_EVENT_*``: the ``event`` byte of a ``uffd_msg``."""

    PAGEFAULT = _abi.UFFD_EVENT_PAGEFAULT
    FORK = _abi.UFFD_EVENT_FORK
    REMAP = _abi.UFFD_EVENT_REMAP
    REMOVE = _abi.UFFD_EVENT_REMOVE
    UNMAP = _abi.UFFD_EVENT_UNMAP


# ---------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PagefaultEvent:
    """A thread is parked on ``address`` (page-aligned unless EXACT_ADDRESS).

    ``thread_id`` is the faulting thread's kernel tid with
    ``Feature.THREAD_ID``, else 0.
    """

    address: int
    flags: PagefaultFlag
    thread_id: int


@dataclass(frozen=True)
class ForkEvent:
    """The process forked; ``ufd`` is a new fd, owned by the reader, for the child's ranges."""

    ufd: int


@dataclass(frozen=True)
class RemapEvent:
    """``mremap`` moved ``length`` bytes of a registered range from ``from_`` to ``to``."""

    from_: int
    to: int
    length: int


@dataclass(frozen=True)
class RemoveEvent:
    """``MADV_DONTNEED``/``MADV_REMOVE`` dropped the pages of ``[start, end)``."""

    start: int
    end: int


@dataclass(frozen=True)
class UnmapEvent:
    """``munmap`` (or ``mremap`` shrinking) removed ``[start, end)``."""

    start: int
    end: int


Event = Union[PagefaultEvent, ForkEvent, RemapEvent, RemoveEvent, UnmapEvent]

# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class UffdError(UffdpyError, OSError):
    """A userfaultfd call failed; carries ``errno``, the call with its arguments, and a hint.

    ``str()`` reads ``"UFFDIO_REGISTER(start=0x7f.., len=0x200000, mode=MISSING):
    [Errno 22] Invalid argument; <what to do>"``.
    """

    def __init__(self, error: int, call: str, hint: str = "") -> None:
        super().__init__(error, os.strerror(error))
        self.call = call
        self.hint = hint

    def __str__(self) -> str:
        text = f"{self.call}: [Errno {self.errno}] {self.strerror}"
        return f"{text}; {self.hint}" if self.hint else text

    def __reduce__(self) -> Tuple[Any, ...]:
        return (type(self), (self.errno, self.call, self.hint))


class UffdPermissionError(UffdError, PermissionError):
    """Not allowed to create a userfaultfd (or to enable a privileged feature)."""


class FeatureUnavailableError(UffdError):
    """``UFFDIO_API`` refused the requested features.

    ``requested``, ``offered`` and ``missing`` are :class:`Feature` values.
    """

    def __init__(self, error: int, call: str, hint: str = "", *,
                 requested: int = 0, offered: int = 0) -> None:
        super().__init__(error, call, hint)
        self.requested = Feature(requested)
        self.offered = Feature(offered)
        self.missing = Feature(requested & ~offered)

    def __reduce__(self) -> Tuple[Any, ...]:
        return (_rebuild_feature_error,
                (type(self), self.errno, self.call, self.hint,
                 int(self.requested), int(self.offered)))


def _rebuild_feature_error(cls: Type[FeatureUnavailableError], error: int, call: str,
                           hint: str, requested: int, offered: int) -> FeatureUnavailableError:
    return cls(error, call, hint, requested=requested, offered=offered)


class RangeGoneError(UffdError, FileNotFoundError):
    """ENOENT: the range was unmapped or unregistered while being resolved."""


class ProcessGoneError(UffdError, ProcessLookupError):
    """ESRCH: the process whose memory the uffd covers has exited."""


class EventsPendingError(UffdError, BlockingIOError):
    """EAGAIN from an ioctl without a count (WRITEPROTECT): drain events, then retry."""


PERMISSION_HINT = (
    "creating a userfaultfd that traps kernel-mode faults needs one of: run as root "
    "or with CAP_SYS_PTRACE; set the sysctl vm.unprivileged_userfaultfd=1; grant this "
    f"user read/write access to {DEVICE_PATH} (kernel 6.1+); or pass "
    "user_mode_only=True, which needs no privilege but then kernel-mode accesses to "
    "missing pages (os.read into the range, any syscall's copy_to_user, a KVM vCPU) "
    "fail with EFAULT or SIGBUS instead of faulting, so it cannot serve VM guest RAM"
)

_REGISTER_EINVAL_HINT = (
    "start and length must be page-aligned (huge-page-aligned on hugetlbfs) and cover "
    "only mappings of a supported type (anonymous, shmem/memfd with MISSING_SHMEM, "
    "hugetlbfs); MINOR mode needs shmem or hugetlbfs, WP mode needs PAGEFAULT_FLAG_WP; "
    "and the handshake (api()) must have been done")

_CONTINUE_HINTS: Dict[int, str] = {
    errno.EFAULT: ("no page in the page cache at this file offset (a hole): write the "
                   "file (pwrite, or through another mapping) before UFFDIO_CONTINUE"),
}

_HINTS: Dict[int, str] = {
    errno.EINVAL: ("check that start and length are page-aligned (huge-page-aligned on "
                   "hugetlbfs), that the range is registered with this uffd in a mode "
                   "that allows this ioctl (see the mask register() returned), and that "
                   "the mode bits are valid"),
    errno.ENOENT: "the range was unmapped or unregistered meanwhile; drop it",
    errno.ESRCH: "the process owning the memory has exited; close the uffd",
    errno.EBUSY: "the range is already registered with another userfaultfd",
    errno.EFAULT: "an address in the request (source buffer?) is not mapped readable",
    errno.ENOMEM: "the kernel ran out of memory (or a memory cgroup limit was hit)",
    errno.EBADF: "the userfaultfd is closed",
    errno.EAGAIN: "non-cooperative events are pending: read_events(), then retry",
    errno.EPERM: "operation not permitted on this range or fd",
}


def _error(error: int, call: str, hint: Optional[str] = None) -> UffdError:
    """The :class:`UffdError` subclass for ``error``, with the default hint."""
    if hint is None:
        hint = _HINTS.get(error, "")
    if error == errno.ENOENT:
        return RangeGoneError(error, call, hint)
    if error == errno.ESRCH:
        return ProcessGoneError(error, call, hint)
    if error in (errno.EPERM, errno.EACCES):
        return UffdPermissionError(error, call, hint)
    if error == errno.EAGAIN:
        return EventsPendingError(error, call, hint)
    return UffdError(error, call, hint)


def _range_call(name: str, start: int, length: int, mode: Any = None) -> str:
    """``NAME(start=0x.., len=0x..[, mode=..])`` for error messages."""
    text = f"{name}(start={start:#x}, len={length:#x}"
    if mode is not None:
        text += f", mode={_flag_names(mode)}"
    return text + ")"


def _flag_names(value: Any) -> str:
    """``MISSING|WP`` for flag values (unknown bits in hex), hex for plain ints."""
    bits = int(value)
    if not isinstance(value, enum.IntFlag):
        return f"{bits:#x}"
    if not bits:
        return "0"
    known = {int(member): name for name, member in type(value).__members__.items()}
    names = []
    for shift in range(bits.bit_length()):
        bit = 1 << shift
        if bits & bit:
            names.append(known.get(bit, f"{bit:#x}"))
    return "|".join(names)


# ---------------------------------------------------------------------------
# Creation
# ---------------------------------------------------------------------------

_MSG_SIZE = ctypes.sizeof(_abi.uffd_msg)
_U64 = (1 << 64) - 1

#: The fill and WAKE requests as C unsigned longs, converted once.
_REQUEST = {name: ctypes.c_ulong(getattr(_abi, name)) for name in (
    "UFFDIO_COPY", "UFFDIO_ZEROPAGE", "UFFDIO_CONTINUE", "UFFDIO_POISON", "UFFDIO_MOVE",
    "UFFDIO_WAKE")}
_COPY_REQUEST = _REQUEST["UFFDIO_COPY"]
_ZEROPAGE_REQUEST = _REQUEST["UFFDIO_ZEROPAGE"]
_WAKE_REQUEST = _REQUEST["UFFDIO_WAKE"]


def _fill_ioctl(fd: int, request: ctypes.c_ulong, arg: Any) -> int:
    """``ioctl(2)`` for the fills and WAKE: -1 on failure, errno in ``_last_error()``.

    Through ctypes (the GIL is released for the call; the kernel writes its
    count straight into the struct, also on failure), declared without an
    errcheck or argtypes: the request comes converted and ``arg`` is a
    ``byref`` or pointer.  Not :func:`fcntl.ioctl`: it copies small buffers
    and, on recent CPythons, copies the kernel's writes back only on
    success; for buffers over 1 KiB, older versions keep the GIL.
    """
    result: int = _abi.libc.ioctl_unchecked(fd, request, arg)
    return result


def _last_error() -> OSError:
    """The errno of the last failed ctypes call in this thread, as an OSError."""
    error = ctypes.get_errno()
    return OSError(error, os.strerror(error))


def _create_fd(user_mode_only: bool) -> Tuple[int, str]:
    """A new non-blocking, close-on-exec uffd and the path that created it.

    Raises:
        UffdPermissionError: neither the device nor the syscall is allowed.
        UffdError: the machine is unsupported, or another failure.
    """
    flags = _abi.O_CLOEXEC | _abi.O_NONBLOCK
    if user_mode_only:
        flags |= _abi.UFFD_USER_MODE_ONLY
    device_error: Optional[OSError] = None
    try:
        devfd = os.open(DEVICE_PATH, os.O_RDWR | os.O_CLOEXEC)
    except (FileNotFoundError, PermissionError) as exc:
        device_error = exc
    else:
        try:
            return _abi.libc.ioctl(devfd, _abi.USERFAULTFD_IOC_NEW, flags), DEVICE_PATH
        except OSError as exc:
            raise _error(exc.errno or errno.EIO,
                         f"ioctl({DEVICE_PATH}, USERFAULTFD_IOC_NEW, flags={flags:#x})") from exc
        finally:
            os.close(devfd)
    return _create_fd_syscall(flags, device_error), "syscall"


def _create_fd_syscall(flags: int, device_error: OSError) -> int:
    """userfaultfd(2), for when the device is absent or not ours to open."""
    number = _abi.__NR_userfaultfd
    call = f"userfaultfd(flags={flags:#x})"
    if number is None:
        import platform
        raise UffdError(errno.ENOSYS, call,
                        f"no userfaultfd syscall number known for machine "
                        f"{platform.machine()!r} (supported: "
                        f"{', '.join(sorted(_abi.NR_USERFAULTFD_BY_MACHINE))}), and "
                        f"{DEVICE_PATH} could not be used: {device_error}")
    try:
        return _abi.libc.syscall(number, flags)
    except OSError as exc:
        error = exc.errno or errno.EIO
        if error == errno.EPERM:
            raise UffdPermissionError(
                error, call, f"{DEVICE_PATH}: {device_error.strerror}; {PERMISSION_HINT}") from exc
        if error == errno.ENOSYS:
            raise UffdError(error, call, "the kernel was built without CONFIG_USERFAULTFD") from exc
        raise _error(error, call) from exc


def probe_features(*, user_mode_only: bool = False) -> Feature:
    """The features the kernel offers, asked on a throw-away uffd.

    Raises:
        UffdPermissionError: a uffd cannot be created here (try user_mode_only=True).
        UffdError: any other failure.
    """
    with Userfaultfd(user_mode_only=user_mode_only, handshake=False) as probe:
        return probe.api(Feature(0))


# ---------------------------------------------------------------------------
# The fd
# ---------------------------------------------------------------------------


class Userfaultfd:
    """An owned userfaultfd: a context manager; :meth:`close` is idempotent.

    Creation opens ``/dev/userfaultfd`` and issues ``USERFAULTFD_IOC_NEW``; if
    the device is absent or not accessible it calls ``userfaultfd(2)`` instead
    (``created_via`` says which).  The fd is always ``O_CLOEXEC|O_NONBLOCK``.
    With ``handshake`` (the default) it then issues ``UFFDIO_API`` enabling
    ``features``; otherwise call :meth:`api` yourself, once.

    Raises:
        UffdPermissionError: creating the fd is not allowed (message says how
            to fix it), or EVENT_FORK was requested without CAP_SYS_PTRACE.
        FeatureUnavailableError: the kernel does not offer all of ``features``.
        UffdError: any other failure.  Nothing leaks on failure.
    """

    _fd = -1
    created_via = ""
    user_mode_only = False
    features = Feature(0)
    requested_features = Feature(0)
    ioctls = Ioctl(0)

    def __init__(self, *, features: Feature = Feature(0), user_mode_only: bool = False,
                 handshake: bool = True, event_buffer: int = 64) -> None:
        self._setup(user_mode_only, event_buffer)
        self._fd, self.created_via = _create_fd(user_mode_only)
        try:
            if handshake:
                self.api(features)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_fd(cls, fd: int, *, features: Feature = Feature(0),
                created_via: str = "adopted", event_buffer: int = 64) -> "Userfaultfd":
        """Take ownership of an existing, already handshaken uffd ``fd``.

        For the fd of a :class:`ForkEvent` or one received over ``SCM_RIGHTS``.
        ``features`` records what is known to be enabled on it.  The fd is set
        non-blocking.

        Raises:
            OSError: ``fd`` is not an open fd.
        """
        self = cls.__new__(cls)
        self._setup(False, event_buffer)
        os.set_blocking(fd, False)
        self._fd = fd
        self.created_via = created_via
        self.features = self.requested_features = Feature(features)
        return self

    def _setup(self, user_mode_only: bool, event_buffer: int) -> None:
        if event_buffer < 1:
            raise ValueError(f"event_buffer must be >= 1 message, got {event_buffer}")
        self.user_mode_only = bool(user_mode_only)
        self._read_lock = threading.Lock()
        self._events = (_abi.uffd_msg * event_buffer)()
        self._events_view = memoryview(self._events).cast("B")
        self._ioctl: Callable[..., int] = _abi.libc.ioctl
        #: spare struct sets of copy/zeropage/wake, one per call in flight at most
        self._spare_fills: List[_Fills] = []

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return (f"<Userfaultfd {state} via {self.created_via}"
                f"{' user_mode_only' if self.user_mode_only else ''}"
                f" features={_flag_names(self.requested_features)}>")

    # -- ownership ---------------------------------------------------------

    def fileno(self) -> int:
        """The fd number, for poll/select.

        Raises:
            ValueError: the uffd is closed.
        """
        fd = self._fd
        if fd < 0:
            raise ValueError("I/O operation on a closed Userfaultfd")
        return fd

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run (or the constructor failed)."""
        return self._fd < 0

    def close(self) -> None:
        """Close the fd; safe to call twice.

        Pending and later faults on the ranges become ordinary faults (zero
        fill for anonymous memory): see the module docstring.
        """
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        spare = getattr(self, "_spare_fills", None)
        if spare:
            spare.clear()           # each refers back to this object (its fileno)

    def __enter__(self) -> "Userfaultfd":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- handshake ---------------------------------------------------------

    def api(self, features: Feature = Feature(0)) -> Feature:
        """``UFFDIO_API``: enable ``features``; returns every feature the kernel offers.

        Works once per fd, and must precede every other ioctl.  Sets
        :attr:`features`, :attr:`requested_features` and :attr:`ioctls`.

        Raises:
            FeatureUnavailableError: some of ``features`` are not offered
                (``missing`` names them), or EVENT_FORK without CAP_SYS_PTRACE.
            UffdError: the handshake was already done (EINVAL), or another failure.
        """
        requested = int(features)
        arg = _abi.uffdio_api(_abi.UFFD_API, requested, 0)
        call = f"UFFDIO_API(features={_flag_names(Feature(requested))})"
        try:
            self._ioctl(self._fd, _abi.UFFDIO_API, ctypes.byref(arg))
        except OSError as exc:
            raise self._api_error(exc.errno or errno.EIO, call, requested) from exc
        self.features = Feature(arg.features)
        self.requested_features = Feature(requested)
        self.ioctls = Ioctl(arg.ioctls)
        return self.features

    def _api_error(self, error: int, call: str, requested: int) -> UffdError:
        if error == errno.EPERM and requested & _abi.UFFD_FEATURE_EVENT_FORK:
            return FeatureUnavailableError(
                error, call, "EVENT_FORK needs CAP_SYS_PTRACE: run as root or drop EVENT_FORK",
                requested=requested, offered=requested & ~_abi.UFFD_FEATURE_EVENT_FORK)
        if error == errno.EINVAL and requested:
            try:
                offered = int(probe_features(user_mode_only=self.user_mode_only))
            except UffdError:
                offered = -1
            if offered >= 0 and requested & ~offered:
                missing = Feature(requested & ~offered)
                return FeatureUnavailableError(
                    error, call,
                    f"requested {_flag_names(Feature(requested))} but this kernel offers "
                    f"{_flag_names(Feature(offered))}; missing {_flag_names(missing)} "
                    "(upgrade the kernel or do without)",
                    requested=requested, offered=offered)
        if error == errno.EINVAL:
            return UffdError(error, call, "UFFDIO_API works once per fd, before any other "
                             "ioctl; this fd was already handshaken")
        return _error(error, call)

    # -- ranges ------------------------------------------------------------

    def register(self, start: int, length: int, *,
                 mode: RegisterMode = RegisterMode.MISSING) -> Ioctl:
        """``UFFDIO_REGISTER`` ``length`` bytes at ``start``; returns the ioctls allowed there.

        Raises:
            UffdError: EINVAL (misaligned, unsupported memory type or mode: MINOR
                needs shmem/hugetlbfs, WP needs PAGEFAULT_FLAG_WP), EBUSY (another
                uffd owns it), or another failure.
        """
        arg = _abi.uffdio_register(_abi.uffdio_range(start, length), int(mode), 0)
        try:
            self._ioctl(self._fd, _abi.UFFDIO_REGISTER, ctypes.byref(arg))
        except OSError as exc:
            error = exc.errno or errno.EIO
            hint = _REGISTER_EINVAL_HINT if error == errno.EINVAL else None
            raise _error(error, _range_call("UFFDIO_REGISTER", start, length,
                                            RegisterMode(mode)), hint) from exc
        return Ioctl(arg.ioctls)

    def unregister(self, start: int, length: int) -> None:
        """``UFFDIO_UNREGISTER`` ``length`` bytes at ``start`` (wakes threads parked there).

        Raises:
            UffdError: EINVAL (misaligned) or another failure.
        """
        arg = _abi.uffdio_range(start, length)
        try:
            self._ioctl(self._fd, _abi.UFFDIO_UNREGISTER, ctypes.byref(arg))
        except OSError as exc:
            raise _error(exc.errno or errno.EIO,
                         _range_call("UFFDIO_UNREGISTER", start, length)) from exc

    def wake(self, start: int, length: int) -> None:
        """``UFFDIO_WAKE``: wake threads parked on ``length`` bytes at ``start``.

        Raises:
            UffdError: EINVAL (misaligned, or length 0) or another failure.
        """
        fills = self._borrow_fills()
        try:
            fills.wake(start & _U64, length & _U64)
        finally:
            self._spare_fills.append(fills)

    # -- fills: the hot path -----------------------------------------------
    # COPY, ZEROPAGE and WAKE run the fill code of _Fills, the same code as
    # Filler's, over a set of structs borrowed for the one call (thread
    # safety).  Their values wrap to 64 bits first, as a ctypes field's do
    # (Filler raises ValueError instead).  The other fills pack a fresh
    # ctypes struct per call.  All return the signed count, see the module
    # docstring for the convention; success (ioctl returned 0) means the
    # whole length.

    def _borrow_fills(self) -> _Fills:
        """A set of fill structs for one call, given back to ``_spare_fills`` after it."""
        try:
            return self._spare_fills.pop()
        except IndexError:                     # every set is in use (or none was made yet)
            return _Fills(self.fileno)

    def copy(self, dst: int, src: int, length: int, *, mode: CopyMode = CopyMode(0)) -> int:
        """``UFFDIO_COPY`` ``length`` bytes from ``src`` to the registered ``dst``.

        Returns bytes copied (``length``, or fewer after partial progress),
        ``-errno.EEXIST`` (first page present: wake the range) or
        ``-errno.EAGAIN`` (events pending: drain, retry).

        Raises:
            RangeGoneError: ENOENT.  ProcessGoneError: ESRCH.
            UffdError: any other failure (EINVAL, EFAULT, ENOMEM...).
        """
        fills = self._borrow_fills()
        try:
            return fills.copy(dst & _U64, src & _U64, length & _U64, _index(mode) & _U64)
        finally:
            self._spare_fills.append(fills)

    def zeropage(self, start: int, length: int, *,
                 mode: ZeropageMode = ZeropageMode(0)) -> int:
        """``UFFDIO_ZEROPAGE``: map the zero page over ``length`` bytes at ``start``.

        Returns bytes done, ``-errno.EEXIST`` or ``-errno.EAGAIN`` as :meth:`copy`.

        Raises:
            RangeGoneError: ENOENT.  ProcessGoneError: ESRCH.
            UffdError: any other failure (EINVAL on hugetlbfs, which has no ZEROPAGE).
        """
        fills = self._borrow_fills()
        try:
            return fills.zeropage(start & _U64, length & _U64, _index(mode) & _U64)
        finally:
            self._spare_fills.append(fills)

    def continue_(self, start: int, length: int, *,
                  mode: ContinueMode = ContinueMode(0)) -> int:
        """``UFFDIO_CONTINUE``: map the page-cache pages already there (MINOR mode).

        Returns bytes mapped, ``-errno.EEXIST`` or ``-errno.EAGAIN`` as :meth:`copy`.

        Raises:
            RangeGoneError: ENOENT.  ProcessGoneError: ESRCH.
            UffdError: any other failure (EFAULT: no page in the page cache).
        """
        arg = _abi.uffdio_continue(_abi.uffdio_range(start, length), mode, 0)
        if _fill_ioctl(self._fd, _REQUEST["UFFDIO_CONTINUE"], ctypes.byref(arg)) == -1:
            return _fill_outcome(_last_error(), arg.mapped, "UFFDIO_CONTINUE", start, length,
                                 mode, hints=_CONTINUE_HINTS, mode_type=ContinueMode)
        return length

    def poison(self, start: int, length: int, *, mode: PoisonMode = PoisonMode(0)) -> int:
        """``UFFDIO_POISON``: mark ``length`` bytes at ``start`` poisoned (access -> SIGBUS).

        Returns bytes poisoned, ``-errno.EEXIST`` or ``-errno.EAGAIN`` as :meth:`copy`.

        Raises:
            RangeGoneError: ENOENT.  ProcessGoneError: ESRCH.
            UffdError: any other failure (EINVAL without Feature.POISON).
        """
        arg = _abi.uffdio_poison(_abi.uffdio_range(start, length), mode, 0)
        if _fill_ioctl(self._fd, _REQUEST["UFFDIO_POISON"], ctypes.byref(arg)) == -1:
            return _fill_outcome(_last_error(), arg.updated, "UFFDIO_POISON", start, length,
                                 mode, mode_type=PoisonMode)
        return length

    def move(self, dst: int, src: int, length: int, *, mode: MoveMode = MoveMode(0)) -> int:
        """``UFFDIO_MOVE`` ``length`` bytes of pages from ``src`` to the registered ``dst``.

        The source pages are unmapped, not copied (same address space only).
        Returns bytes moved, ``-errno.EEXIST`` or ``-errno.EAGAIN`` as :meth:`copy`.

        Raises:
            RangeGoneError: ENOENT (also: a hole in ``src`` without ALLOW_SRC_HOLES).
            ProcessGoneError: ESRCH.
            UffdError: any other failure (EINVAL without Feature.MOVE, across
                processes, or for shared/pinned source pages; EBUSY).
        """
        arg = _abi.uffdio_move(dst, src, length, mode, 0)
        if _fill_ioctl(self._fd, _REQUEST["UFFDIO_MOVE"], ctypes.byref(arg)) == -1:
            return _fill_outcome(_last_error(), arg.move, "UFFDIO_MOVE", dst, length, mode, src,
                                 mode_type=MoveMode)
        return length

    def writeprotect(self, start: int, length: int, *,
                     mode: WriteprotectMode = WriteprotectMode.WP) -> None:
        """``UFFDIO_WRITEPROTECT`` ``length`` bytes at ``start``.

        ``mode=WP`` protects; ``mode=WriteprotectMode(0)`` removes protection and
        wakes (add DONTWAKE to skip the wake).

        Raises:
            EventsPendingError: EAGAIN, events pending: read_events(), then retry.
            RangeGoneError: ENOENT.  ProcessGoneError: ESRCH.
            UffdError: any other failure (EINVAL: range not registered in WP mode,
                or WP|DONTWAKE together).
        """
        arg = _abi.uffdio_writeprotect(_abi.uffdio_range(start, length), mode)
        try:
            self._ioctl(self._fd, _abi.UFFDIO_WRITEPROTECT, ctypes.byref(arg))
        except OSError as exc:
            raise _error(exc.errno or errno.EIO,
                         _range_call("UFFDIO_WRITEPROTECT", start, length,
                                     WriteprotectMode(mode))) from exc

    # -- events ------------------------------------------------------------

    def read_raw(self) -> "ctypes.Array[_abi.uffd_msg]":
        """Read every queued message (up to the buffer size) into the preallocated buffer.

        Returns a ctypes array of ``uffd_msg`` over that buffer, empty when
        nothing is queued; it is overwritten by the next read, so a single
        reader thread should consume it first.

        Raises:
            UffdError: the read failed (EBADF after close...) or returned a
                partial message.
        """
        try:
            nbytes = os.readv(self._fd, (self._events_view,))
        except BlockingIOError:
            nbytes = 0
        except OSError as exc:
            raise _error(exc.errno or errno.EIO, f"read(uffd={self._fd})") from exc
        count, rest = divmod(nbytes, _MSG_SIZE)
        if rest:
            raise UffdError(errno.EIO, f"read(uffd={self._fd})",
                            f"read {nbytes} bytes, not a multiple of {_MSG_SIZE}")
        return (_abi.uffd_msg * count).from_buffer(self._events)

    def read_events(self, max_events: int = 64) -> List[Event]:
        """Read and decode up to ``max_events`` queued messages; ``[]`` when none is queued.

        Raises:
            UffdError: the read failed, returned a partial message, or an
                unknown event code (EPROTO).
        """
        with self._read_lock:
            if max_events > len(self._events):
                self._events = (_abi.uffd_msg * max_events)()
                self._events_view = memoryview(self._events).cast("B")
            view = self._events_view[:max_events * _MSG_SIZE]
            try:
                nbytes = os.readv(self._fd, (view,))
            except BlockingIOError:
                return []
            except OSError as exc:
                raise _error(exc.errno or errno.EIO, f"read(uffd={self._fd})") from exc
            count, rest = divmod(nbytes, _MSG_SIZE)
            if rest:
                raise UffdError(errno.EIO, f"read(uffd={self._fd})",
                                f"read {nbytes} bytes, not a multiple of {_MSG_SIZE}")
            messages = self._events
            return [decode_message(messages[i]) for i in range(count)]


def _preallocated(struct_type: Any) -> Tuple[Any, memoryview, ctypes.c_void_p]:
    """A zeroed ``struct_type`` over a bytearray: the struct, its 64-bit words, its address.

    The struct (``from_buffer``) and the words view both keep the bytearray
    from being resized, so the address stays valid for their lifetime.
    """
    raw = bytearray(ctypes.sizeof(struct_type))
    view = struct_type.from_buffer(raw)
    return view, memoryview(raw).cast("Q"), ctypes.c_void_p(ctypes.addressof(view))


class _Fills:
    """COPY, ZEROPAGE and WAKE over one preallocated set of structs: the fill code, once.

    Each call writes its struct, issues the ioctl on the fd that ``fileno()``
    gives *at that call* (a uffd's :meth:`Userfaultfd.fileno`; once it raises
    ValueError, the uffd is closed, -1 is used and the call fails with EBADF
    like any failure) and returns the signed count, ``-EEXIST`` or
    ``-EAGAIN``, or raises (:func:`_fill_outcome`).  One call at a time per
    instance: a :class:`Filler` is one, its thread's own, and the
    :class:`Userfaultfd` methods borrow one per call.  Values outside 64
    unsigned bits raise ValueError.
    """

    __slots__ = ("_fileno", "_ioctl", "_copy", "_copy_words", "_copy_at",
                 "_zero", "_zero_words", "_zero_at", "_range_words", "_range_at")

    def __init__(self, fileno: Callable[[], int]) -> None:
        self._fileno = fileno
        self._ioctl: Callable[..., int] = _abi.libc.ioctl_unchecked
        # Each struct lives in a bytearray: written as 64-bit words (every field
        # of these structs is one; test_abi pins the offsets), read back through
        # the ctypes struct over the same bytes (the signed count).
        self._copy, self._copy_words, self._copy_at = _preallocated(_abi.uffdio_copy)
        self._zero, self._zero_words, self._zero_at = _preallocated(_abi.uffdio_zeropage)
        _, self._range_words, self._range_at = _preallocated(_abi.uffdio_range)

    # The fd is asked for inline in each call (not through a helper): this is
    # the fault loop's hot path, where one more Python call is measurable.

    def copy(self, dst: int, src: int, length: int, mode: int = 0) -> int:
        """``UFFDIO_COPY``, as :meth:`Userfaultfd.copy`: bytes copied, ``-EEXIST`` or ``-EAGAIN``.

        Raises:
            RangeGoneError: ENOENT.  ProcessGoneError: ESRCH.
            UffdError: any other failure.  ValueError: a value outside 64 bits.
        """
        words = self._copy_words
        words[0] = dst
        words[1] = src
        words[2] = length
        words[3] = mode
        words[4] = 0           # the count: an old kernel leaves it alone on EAGAIN
        try:
            fd = self._fileno()
        except ValueError:     # closed: EBADF from the kernel, reported as any failure
            fd = -1
        if self._ioctl(fd, _COPY_REQUEST, self._copy_at) == -1:
            return _fill_outcome(_last_error(), self._copy.copy, "UFFDIO_COPY", dst,
                                 length, mode, src, mode_type=CopyMode)
        return length

    def zeropage(self, start: int, length: int, mode: int = 0) -> int:
        """``UFFDIO_ZEROPAGE``, as :meth:`Userfaultfd.zeropage`.

        Raises:
            RangeGoneError: ENOENT.  ProcessGoneError: ESRCH.
            UffdError: any other failure.  ValueError: a value outside 64 bits.
        """
        words = self._zero_words
        words[0] = start
        words[1] = length
        words[2] = mode
        words[3] = 0
        try:
            fd = self._fileno()
        except ValueError:
            fd = -1
        if self._ioctl(fd, _ZEROPAGE_REQUEST, self._zero_at) == -1:
            return _fill_outcome(_last_error(), self._zero.zeropage, "UFFDIO_ZEROPAGE",
                                 start, length, mode, mode_type=ZeropageMode)
        return length

    def wake(self, start: int, length: int) -> None:
        """``UFFDIO_WAKE``, as :meth:`Userfaultfd.wake`.

        Raises:
            UffdError: EINVAL (misaligned, or length 0) or another failure.
            ValueError: a value outside 64 bits.
        """
        words = self._range_words
        words[0] = start
        words[1] = length
        try:
            fd = self._fileno()
        except ValueError:
            fd = -1
        if self._ioctl(fd, _WAKE_REQUEST, self._range_at) == -1:
            exc = _last_error()
            raise _error(exc.errno or errno.EIO, _range_call("UFFDIO_WAKE", start, length)) from exc


class Filler(_Fills):
    """The fast path of a fault loop: read messages and fill pages of one :class:`Userfaultfd`.

    For the *one* thread that serves faults (a second thread, such as a
    prefetcher, makes its own ``Filler`` or uses the :class:`Userfaultfd`
    methods).  The fill structs and the message buffer are allocated once and
    reused, modes are plain ints, and the result needs no decoding on
    success, so that a served fault costs one ``read`` and one ``ioctl`` plus
    a few hundred nanoseconds of Python.  :meth:`copy`, :meth:`zeropage` and
    :meth:`wake` are the very code of :meth:`Userfaultfd.copy`,
    :meth:`~Userfaultfd.zeropage` and :meth:`~Userfaultfd.wake`, with the
    same semantics: the signed count, ``-EEXIST`` (wake the range
    yourself), ``-EAGAIN`` (read the pending events, retry), partial
    progress, and the same :class:`UffdError` subclasses for the rest.
    Addresses, lengths and modes must fit in 64 unsigned bits (ValueError
    otherwise; the methods wrap them).  The uffd stays owned by its
    :class:`Userfaultfd` and is reached through its :meth:`~Userfaultfd.fileno`
    at every call: after it is closed every call fails with EBADF.

    A fault loop::

        filler = Filler(uffd)
        buffer, words = filler.buffer, filler.words
        while serving:
            poller.poll()
            for k in range(filler.read()):
                if buffer[k * 32] == ioctl.UFFD_EVENT_PAGEFAULT:
                    address = words[k * 4 + 2] & ~(PAGE_SIZE - 1)
                    if filler.copy(address, source_of(address), PAGE_SIZE) == -errno.EEXIST:
                        filler.wake(address, PAGE_SIZE)
                else:
                    handle(filler.decode(k))

    Message ``k`` of the last :meth:`read` occupies ``buffer[32 * k:32 * k + 32]``:
    its event code is ``buffer[32 * k]``; for a page fault ``words[4 * k + 1]``
    is the flags, ``words[4 * k + 2]`` the address and ``words[4 * k + 3] &
    0xFFFFFFFF`` the thread id.  The next :meth:`read` overwrites them.
    """

    __slots__ = ("uffd", "max_messages", "buffer", "words", "_views")

    def __init__(self, uffd: Userfaultfd, *, max_messages: int = 64) -> None:
        if max_messages < 1:
            raise ValueError(f"max_messages must be >= 1, got {max_messages}")
        super().__init__(uffd.fileno)
        self.uffd = uffd
        self.max_messages = max_messages
        #: the raw messages of the last read(), and the same bytes as 64-bit words
        self.buffer = bytearray(max_messages * _MSG_SIZE)
        self.words = memoryview(self.buffer).cast("Q")
        self._views = [memoryview(self.buffer)]

    def __repr__(self) -> str:
        return f"<Filler of {self.uffd!r}, {self.max_messages} messages>"

    def read(self) -> int:
        """Read the queued messages into :attr:`buffer`; how many (0 when none is queued).

        Raises:
            UffdError: the read failed (EBADF after close...) or returned a
                partial message.
        """
        try:
            fd = self._fileno()
        except ValueError:     # closed: EBADF from the kernel, reported as any failure
            fd = -1
        try:
            nbytes = os.readv(fd, self._views)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise _error(exc.errno or errno.EIO, f"read(uffd={fd})") from exc
        if nbytes % _MSG_SIZE:
            raise UffdError(errno.EIO, f"read(uffd={fd})",
                            f"read {nbytes} bytes, not a multiple of {_MSG_SIZE}")
        return nbytes // _MSG_SIZE

    def decode(self, k: int) -> Event:
        """Message ``k`` of the last :meth:`read` as an event dataclass.

        Raises:
            UffdError: unknown event code (EPROTO).
        """
        if not 0 <= k < self.max_messages:
            raise IndexError(f"message {k} of {self.max_messages}")
        return decode_message(_abi.uffd_msg.from_buffer(self.buffer, k * _MSG_SIZE))


def _fill_outcome(exc: OSError, count: int, name: str, start: int, length: int,
                  mode: Any, src: Optional[int] = None,
                  hints: Optional[Dict[int, str]] = None,
                  mode_type: Optional[Type[enum.IntFlag]] = None) -> int:
    """The result of a failed fill ioctl: a count, -EEXIST, -EAGAIN, or a raise.

    ``mode_type`` names the mode's flags in the error message (built only
    when raising: an IntFlag costs a microsecond).
    """
    error = exc.errno
    if error == errno.EAGAIN:
        return count if count > 0 else -errno.EAGAIN
    if error == errno.EEXIST:
        return -errno.EEXIST
    if mode_type is not None:
        mode = mode_type(mode)
    if src is None:
        call = _range_call(name, start, length, mode)
    else:
        call = f"{name}(dst={start:#x}, src={src:#x}, len={length:#x}, mode={_flag_names(mode)})"
    error = error or errno.EIO
    raise _error(error, call, hints.get(error) if hints else None) from exc


def decode_message(msg: _abi.uffd_msg) -> Event:
    """Decode one ``uffd_msg`` into its event dataclass.

    Raises:
        UffdError: unknown event code (EPROTO).
    """
    event = msg.event
    arg = msg.arg
    if event == _abi.UFFD_EVENT_PAGEFAULT:
        fault = arg.pagefault
        return PagefaultEvent(fault.address, PagefaultFlag(fault.flags), fault.feat.ptid)
    if event == _abi.UFFD_EVENT_REMOVE:
        return RemoveEvent(arg.remove.start, arg.remove.end)
    if event == _abi.UFFD_EVENT_UNMAP:
        return UnmapEvent(arg.remove.start, arg.remove.end)
    if event == _abi.UFFD_EVENT_REMAP:
        return RemapEvent(arg.remap.from_, arg.remap.to, arg.remap.len)
    if event == _abi.UFFD_EVENT_FORK:
        return ForkEvent(arg.fork.ufd)
    raise UffdError(errno.EPROTO, "read(uffd)",
                    f"unknown uffd_msg event code {event:#x}; is this a newer kernel feature?")
