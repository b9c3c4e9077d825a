"""The userfaultfd kernel ABI and the libc calls it needs, transcribed with ctypes.

This module is ``<linux/userfaultfd.h>`` (plus the few ``<sys/mman.h>`` and
``<linux/memfd.h>`` constants the package uses) written out in Python, with no
behaviour of its own:

* one :class:`ctypes.Structure` per kernel struct, fields in header order under
  the header's names (``from`` becomes ``from_``, a Python keyword);
* constants under the kernel's own UPPERCASE names, so ``grep UFFDIO_COPY``
  finds both the kernel and us;
* ioctl numbers computed from :func:`_IOWR` and ``ctypes.sizeof`` of the struct,
  as the header does, never typed in as hex (``tests/test_abi.py`` pins them);
* the libc functions declared once, with ``argtypes``/``restype`` and an
  ``errcheck`` that raises :class:`OSError` carrying ``errno``.

The ``_IOC`` encoding below is the generic one (x86, arm, arm64, riscv,
s390...).  powerpc, mips and sparc encode directions differently; the owning
layer refuses those machines rather than issue wrong numbers.

Importing this module touches no kernel and works on any OS: libc is loaded
on the first attribute access of :data:`libc`, which raises :class:`OSError`
(``ENOSYS``) anywhere but Linux.

The owning, checked layer is :mod:`uffdpy.uffd`; this one is for it, for
teaching and for debugging.
"""
from __future__ import annotations

import ctypes
import errno
import os
import sys
from typing import Any, Callable, Dict, Optional, Tuple

# ---------------------------------------------------------------------------
# <asm-generic/ioctl.h>
# ---------------------------------------------------------------------------
_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(dir_: int, type_: int, nr: int, size: int) -> int:
    """Encode an ioctl request number (generic encoding)."""
    return ((dir_ << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT)
            | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT))


def _IO(type_: int, nr: int) -> int:
    """An ioctl with no argument struct."""
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, struct: Any) -> int:
    """An ioctl whose struct the kernel writes (by the header's declaration)."""
    return _IOC(_IOC_READ, type_, nr, ctypes.sizeof(struct))


def _IOW(type_: int, nr: int, struct: Any) -> int:
    """An ioctl whose struct the kernel reads."""
    return _IOC(_IOC_WRITE, type_, nr, ctypes.sizeof(struct))


def _IOWR(type_: int, nr: int, struct: Any) -> int:
    """An ioctl whose struct the kernel reads and writes."""
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, ctypes.sizeof(struct))


# ---------------------------------------------------------------------------
# <linux/userfaultfd.h>: constants
# ---------------------------------------------------------------------------
UFFD_API = 0xAA

# Ioctl type and numbers (the ``nr`` field of the request).
UFFDIO = 0xAA
_UFFDIO_REGISTER = 0x00
_UFFDIO_UNREGISTER = 0x01
_UFFDIO_WAKE = 0x02
_UFFDIO_COPY = 0x03
_UFFDIO_ZEROPAGE = 0x04
_UFFDIO_MOVE = 0x05
_UFFDIO_WRITEPROTECT = 0x06
_UFFDIO_CONTINUE = 0x07
_UFFDIO_POISON = 0x08
_UFFDIO_API = 0x3F

# Masks of ioctls (bit = 1 << _UFFDIO_x), as reported in uffdio_api.ioctls
# and uffdio_register.ioctls.
UFFD_API_IOCTLS = (1 << _UFFDIO_REGISTER) | (1 << _UFFDIO_UNREGISTER) | (1 << _UFFDIO_API)
UFFD_API_RANGE_IOCTLS = ((1 << _UFFDIO_WAKE) | (1 << _UFFDIO_COPY) | (1 << _UFFDIO_ZEROPAGE)
                         | (1 << _UFFDIO_MOVE) | (1 << _UFFDIO_WRITEPROTECT)
                         | (1 << _UFFDIO_CONTINUE) | (1 << _UFFDIO_POISON))
UFFD_API_RANGE_IOCTLS_BASIC = ((1 << _UFFDIO_WAKE) | (1 << _UFFDIO_COPY)
                               | (1 << _UFFDIO_WRITEPROTECT) | (1 << _UFFDIO_CONTINUE)
                               | (1 << _UFFDIO_POISON))

# uffd_msg.event
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16

# uffd_msg.arg.pagefault.flags
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2

# uffdio_api.features
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_MINOR_HUGETLBFS = 1 << 9
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_EXACT_ADDRESS = 1 << 11
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_POISON = 1 << 14
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_FEATURE_MOVE = 1 << 16

# uffdio_register.mode
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2

# uffdio_copy.mode
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_COPY_MODE_WP = 1 << 1

# uffdio_zeropage.mode
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0

# uffdio_writeprotect.mode (both bits together is EINVAL)
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1

# uffdio_continue.mode
UFFDIO_CONTINUE_MODE_DONTWAKE = 1 << 0
UFFDIO_CONTINUE_MODE_WP = 1 << 1

# uffdio_poison.mode
UFFDIO_POISON_MODE_DONTWAKE = 1 << 0

# uffdio_move.mode
UFFDIO_MOVE_MODE_DONTWAKE = 1 << 0
UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES = 1 << 1

# userfaultfd(2) flags: O_CLOEXEC and O_NONBLOCK as the kernel spells them on
# the generic ABI (x86, arm64, riscv), plus the uffd-specific one.
O_RDWR = 0o2
O_NONBLOCK = 0o4000
O_CLOEXEC = 0o2000000
UFFD_USER_MODE_ONLY = 1

# /dev/userfaultfd: ioctl(devfd, USERFAULTFD_IOC_NEW, flags) returns a new uffd.
USERFAULTFD_IOC = 0xAA
USERFAULTFD_IOC_NEW = _IO(USERFAULTFD_IOC, 0x00)

# __NR_userfaultfd by the machine (``uname -m``).  Only machines whose ``_IOC``
# encoding is the generic one above are listed.
NR_USERFAULTFD_BY_MACHINE: Dict[str, int] = {
    "x86_64": 323,
    "amd64": 323,
    "aarch64": 282,
    "arm64": 282,
    "riscv64": 282,
}
__NR_userfaultfd: Optional[int] = NR_USERFAULTFD_BY_MACHINE.get(
    os.uname().machine.lower() if hasattr(os, "uname") else "")

# ---------------------------------------------------------------------------
# <linux/userfaultfd.h>: structs
# ---------------------------------------------------------------------------
_u8 = ctypes.c_uint8
_u16 = ctypes.c_uint16
_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64
_s64 = ctypes.c_int64


class uffdio_api(ctypes.Structure):
    _fields_ = [
        ("api", _u64),        # in: UFFD_API
        ("features", _u64),   # in: requested; out: all the kernel offers
        ("ioctls", _u64),     # out: UFFD_API_IOCTLS
    ]


class uffdio_range(ctypes.Structure):
    _fields_ = [
        ("start", _u64),
        ("len", _u64),
    ]


class uffdio_register(ctypes.Structure):
    _fields_ = [
        ("range", uffdio_range),
        ("mode", _u64),
        ("ioctls", _u64),     # out: ioctls allowed on the range
    ]


class uffdio_copy(ctypes.Structure):
    _fields_ = [
        ("dst", _u64),
        ("src", _u64),
        ("len", _u64),
        ("mode", _u64),
        ("copy", _s64),       # out: bytes copied, or -errno
    ]


class uffdio_zeropage(ctypes.Structure):
    _fields_ = [
        ("range", uffdio_range),
        ("mode", _u64),
        ("zeropage", _s64),   # out: bytes zeroed, or -errno
    ]


class uffdio_writeprotect(ctypes.Structure):
    _fields_ = [
        ("range", uffdio_range),
        ("mode", _u64),
    ]


class uffdio_continue(ctypes.Structure):
    _fields_ = [
        ("range", uffdio_range),
        ("mode", _u64),
        ("mapped", _s64),     # out: bytes mapped, or -errno
    ]


class uffdio_poison(ctypes.Structure):
    _fields_ = [
        ("range", uffdio_range),
        ("mode", _u64),
        ("updated", _s64),    # out: bytes poisoned, or -errno
    ]


class uffdio_move(ctypes.Structure):
    _fields_ = [
        ("dst", _u64),
        ("src", _u64),
        ("len", _u64),
        ("mode", _u64),
        ("move", _s64),       # out: bytes moved, or -errno
    ]


# struct uffd_msg and the members of its ``arg`` union.  The kernel struct is
# __packed; with these field sizes packing changes nothing, but say it anyway.
class uffd_msg_pagefault_feat(ctypes.Union):
    _fields_ = [
        ("ptid", _u32),       # valid with UFFD_FEATURE_THREAD_ID
    ]


class uffd_msg_pagefault(ctypes.Structure):
    _fields_ = [
        ("flags", _u64),
        ("address", _u64),
        ("feat", uffd_msg_pagefault_feat),
    ]


class uffd_msg_fork(ctypes.Structure):
    _fields_ = [
        ("ufd", _u32),        # a new fd installed in the reader's process
    ]


class uffd_msg_remap(ctypes.Structure):
    _fields_ = [
        ("from_", _u64),      # kernel name: from
        ("to", _u64),
        ("len", _u64),
    ]


class uffd_msg_remove(ctypes.Structure):
    _fields_ = [
        ("start", _u64),
        ("end", _u64),
    ]


class uffd_msg_reserved(ctypes.Structure):
    _fields_ = [
        ("reserved1", _u64),
        ("reserved2", _u64),
        ("reserved3", _u64),
    ]


class uffd_msg_arg(ctypes.Union):
    _fields_ = [
        ("pagefault", uffd_msg_pagefault),
        ("fork", uffd_msg_fork),
        ("remap", uffd_msg_remap),
        ("remove", uffd_msg_remove),  # also UFFD_EVENT_UNMAP
        ("reserved", uffd_msg_reserved),
    ]


class uffd_msg(ctypes.Structure):
    _pack_ = 1
    _fields_ = [
        ("event", _u8),
        ("reserved1", _u8),
        ("reserved2", _u16),
        ("reserved3", _u32),
        ("arg", uffd_msg_arg),
    ]


UFFDIO_REGISTER = _IOWR(UFFDIO, _UFFDIO_REGISTER, uffdio_register)
UFFDIO_UNREGISTER = _IOR(UFFDIO, _UFFDIO_UNREGISTER, uffdio_range)   # _IOR: historical
UFFDIO_WAKE = _IOR(UFFDIO, _UFFDIO_WAKE, uffdio_range)               # _IOR: historical
UFFDIO_COPY = _IOWR(UFFDIO, _UFFDIO_COPY, uffdio_copy)
UFFDIO_ZEROPAGE = _IOWR(UFFDIO, _UFFDIO_ZEROPAGE, uffdio_zeropage)
UFFDIO_MOVE = _IOWR(UFFDIO, _UFFDIO_MOVE, uffdio_move)
UFFDIO_WRITEPROTECT = _IOWR(UFFDIO, _UFFDIO_WRITEPROTECT, uffdio_writeprotect)
UFFDIO_CONTINUE = _IOWR(UFFDIO, _UFFDIO_CONTINUE, uffdio_continue)
UFFDIO_POISON = _IOWR(UFFDIO, _UFFDIO_POISON, uffdio_poison)
UFFDIO_API = _IOWR(UFFDIO, _UFFDIO_API, uffdio_api)

# ---------------------------------------------------------------------------
# <sys/mman.h>, <linux/mman.h>, <linux/memfd.h> (generic ABI values)
# ---------------------------------------------------------------------------
PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4

MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_SHARED_VALIDATE = 0x03
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_POPULATE = 0x8000
MAP_HUGETLB = 0x40000
MAP_FIXED_NOREPLACE = 0x100000
MAP_HUGE_SHIFT = 26
MAP_HUGE_2MB = 21 << MAP_HUGE_SHIFT
MAP_HUGE_1GB = 30 << MAP_HUGE_SHIFT
MAP_FAILED = ctypes.c_void_p(-1).value  # (void *)-1 as the unsigned int ctypes returns

MADV_NORMAL = 0
MADV_RANDOM = 1
MADV_SEQUENTIAL = 2
MADV_WILLNEED = 3
MADV_DONTNEED = 4
MADV_FREE = 8
MADV_REMOVE = 9
MADV_DONTFORK = 10
MADV_DOFORK = 11
MADV_MERGEABLE = 12
MADV_UNMERGEABLE = 13
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_DONTDUMP = 16
MADV_DODUMP = 17
MADV_WIPEONFORK = 18
MADV_KEEPONFORK = 19
MADV_COLD = 20
MADV_PAGEOUT = 21
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
MADV_DONTNEED_LOCKED = 24
MADV_COLLAPSE = 25
MADV_HWPOISON = 100

MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MREMAP_DONTUNMAP = 4

MFD_CLOEXEC = 0x0001

# <sys/eventfd.h> (x86_64/arm64 values; they equal O_CLOEXEC and O_NONBLOCK)
EFD_CLOEXEC = 0o2000000
EFD_NONBLOCK = 0o4000

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
MFD_ALLOW_SEALING = 0x0002
MFD_HUGETLB = 0x0004
MFD_NOEXEC_SEAL = 0x0008
MFD_EXEC = 0x0010
MFD_HUGE_2MB = MAP_HUGE_2MB
MFD_HUGE_1GB = MAP_HUGE_1GB

# ---------------------------------------------------------------------------
# libc, declared once, loaded on first use
# ---------------------------------------------------------------------------


def _raise_errno() -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


def _check_int(result: int, func: Any, args: Tuple[Any, ...]) -> int:
    """errcheck for calls that return -1 and set errno on failure."""
    if result == -1:
        _raise_errno()
    return result


def _check_ptr(result: Optional[int], func: Any, args: Tuple[Any, ...]) -> int:
    """errcheck for calls that return MAP_FAILED and set errno on failure (mmap, mremap).

    The error names the call and the size asked for: a bare "Cannot allocate
    memory" does not say which allocation failed, or how large it was.
    """
    if result == MAP_FAILED:
        err = ctypes.get_errno()
        name = getattr(func, "__name__", "mmap")
        size = args[2] if name == "mremap" else args[1]
        hint = (" (more than this process may map: see ulimit -v, vm.overcommit_memory, "
                "or for huge pages /proc/sys/vm/nr_hugepages)" if err == errno.ENOMEM else "")
        raise OSError(err, f"{os.strerror(err)}: {name} of {size:#x} bytes "
                           f"({size / (1 << 20):.1f} MiB){hint}")
    return result or 0     # ctypes turns a NULL c_void_p into None


_c_int = ctypes.c_int
_c_uint = ctypes.c_uint
_c_long = ctypes.c_long
_c_ulong = ctypes.c_ulong
_c_size_t = ctypes.c_size_t
_c_void_p = ctypes.c_void_p
_c_off_t = ctypes.c_int64

# name: (restype, argtypes, errcheck).  ioctl and syscall are variadic in C;
# the declared argtypes are the shapes this package passes (a pointer or a
# by-value integer both travel as one register-sized word).
_LIBC_FUNCTIONS: Dict[str, Tuple[Any, Tuple[Any, ...], Optional[Callable[..., Any]]]] = {
    "ioctl": (_c_int, (_c_int, _c_ulong, _c_void_p), _check_int),
    # the same ioctl(2) for the fault path: no errcheck (returns -1 and leaves
    # errno in ctypes.get_errno()) and no argtypes (the caller passes an int
    # fd, a c_ulong request and a pointer object, converted once): ~0.4 us
    # less per call
    "ioctl_unchecked": (_c_int, (), None),
    # sendmsg(2) for the postcopy source, unchecked like ioctl_unchecked: the
    # caller passes an int fd, a pointer to its msghdr and int flags
    "sendmsg_unchecked": (ctypes.c_ssize_t, (), None),
    # vmsplice(2) and splice(2), for the source's main channel: a pipe of pages
    "vmsplice": (ctypes.c_ssize_t, (_c_int, _c_void_p, _c_size_t, _c_uint), _check_int),
    "splice": (ctypes.c_ssize_t, (_c_int, _c_void_p, _c_int, _c_void_p, _c_size_t, _c_uint),
               _check_int),
    "syscall": (_c_long, (_c_long, _c_long), _check_int),
    "mmap": (_c_void_p, (_c_void_p, _c_size_t, _c_int, _c_int, _c_int, _c_off_t), _check_ptr),
    "munmap": (_c_int, (_c_void_p, _c_size_t), _check_int),
    "madvise": (_c_int, (_c_void_p, _c_size_t, _c_int), _check_int),
    "mprotect": (_c_int, (_c_void_p, _c_size_t, _c_int), _check_int),
    "mremap": (_c_void_p, (_c_void_p, _c_size_t, _c_size_t, _c_int, _c_void_p), _check_ptr),
    "memfd_create": (_c_int, (ctypes.c_char_p, _c_uint), _check_int),
    "eventfd": (_c_int, (_c_uint, _c_int), _check_int),
    "prctl": (_c_int, (_c_int, _c_ulong, _c_ulong, _c_ulong, _c_ulong), _check_int),
}


class _Libc:
    """The libc functions above, declared on first attribute access.

    Each attribute is a ctypes function whose errcheck raises :class:`OSError`
    with the C ``errno``.  Raises :class:`OSError` (``ENOSYS``) on first use
    anywhere but Linux, so that importing the package never fails.
    """

    ioctl: Callable[..., int]
    ioctl_unchecked: Callable[..., int]
    sendmsg_unchecked: Callable[..., int]
    vmsplice: Callable[..., int]
    splice: Callable[..., int]
    syscall: Callable[..., int]
    mmap: Callable[..., int]
    munmap: Callable[..., int]
    madvise: Callable[..., int]
    mprotect: Callable[..., int]
    mremap: Callable[..., int]
    memfd_create: Callable[..., int]
    eventfd: Callable[..., int]
    prctl: Callable[..., int]

    def __getattr__(self, name: str) -> Any:
        if name not in _LIBC_FUNCTIONS:
            raise AttributeError(name)
        self._load()
        return self.__dict__[name]

    def _load(self) -> None:
        if not sys.platform.startswith("linux"):
            raise OSError(errno.ENOSYS,
                          f"uffdpy needs Linux (userfaultfd, mmap); this is {sys.platform}")
        lib = ctypes.CDLL(None, use_errno=True)
        for name, (restype, argtypes, errcheck) in _LIBC_FUNCTIONS.items():
            # a fresh function object per name: "ioctl_unchecked" is ioctl(2) too
            func = lib[name.replace("_unchecked", "")]
            func.restype = restype
            if argtypes:
                func.argtypes = argtypes
            if errcheck is not None:
                func.errcheck = errcheck
            self.__dict__[name] = func


libc = _Libc()
