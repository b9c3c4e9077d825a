"""The kernel ABI pinned to literal values (pure: runs anywhere, touches no kernel).

The literals come from <linux/userfaultfd.h> (sizes and offsets checked with
gcc, ioctl numbers exercised on a 6.18 kernel): see
shared/reference/userfaultfd-abi.md, sections 4.2 to 4.5.
"""
from __future__ import annotations

import ctypes

import pytest

from uffdpy import ioctl as abi
from uffdpy import uffd

STRUCT_LAYOUTS = {
    "uffdio_api": (24, {"api": 0, "features": 8, "ioctls": 16}),
    "uffdio_range": (16, {"start": 0, "len": 8}),
    "uffdio_register": (32, {"range": 0, "mode": 16, "ioctls": 24}),
    "uffdio_copy": (40, {"dst": 0, "src": 8, "len": 16, "mode": 24, "copy": 32}),
    "uffdio_zeropage": (32, {"range": 0, "mode": 16, "zeropage": 24}),
    "uffdio_writeprotect": (24, {"range": 0, "mode": 16}),
    "uffdio_continue": (32, {"range": 0, "mode": 16, "mapped": 24}),
    "uffdio_poison": (32, {"range": 0, "mode": 16, "updated": 24}),
    "uffdio_move": (40, {"dst": 0, "src": 8, "len": 16, "mode": 24, "move": 32}),
    "uffd_msg": (32, {"event": 0, "reserved1": 1, "reserved2": 2, "reserved3": 4, "arg": 8}),
}


@pytest.mark.parametrize("name", sorted(STRUCT_LAYOUTS))
def test_struct_size_and_offsets(name: str) -> None:
    struct = getattr(abi, name)
    size, offsets = STRUCT_LAYOUTS[name]
    assert ctypes.sizeof(struct) == size
    assert [f[0] for f in struct._fields_] == list(offsets)  # header order, header names
    for field, offset in offsets.items():
        assert getattr(struct, field).offset == offset, field


def test_uffd_msg_union_members() -> None:
    """Offsets inside uffd_msg, counted from the start of the message."""
    arg = abi.uffd_msg.arg.offset
    assert ctypes.sizeof(abi.uffd_msg_arg) == 24
    pagefault = abi.uffd_msg_arg.pagefault.offset
    assert arg + pagefault + abi.uffd_msg_pagefault.flags.offset == 8
    assert arg + pagefault + abi.uffd_msg_pagefault.address.offset == 16
    assert arg + pagefault + abi.uffd_msg_pagefault.feat.offset == 24
    assert abi.uffd_msg_pagefault_feat.ptid.offset == 0
    assert ctypes.sizeof(abi.uffd_msg_pagefault_feat) == 4
    assert arg + abi.uffd_msg_arg.fork.offset + abi.uffd_msg_fork.ufd.offset == 8
    assert abi.uffd_msg_fork.ufd.size == 4
    remap = arg + abi.uffd_msg_arg.remap.offset
    assert (remap + abi.uffd_msg_remap.from_.offset, remap + abi.uffd_msg_remap.to.offset,
            remap + abi.uffd_msg_remap.len.offset) == (8, 16, 24)
    remove = arg + abi.uffd_msg_arg.remove.offset
    assert (remove + abi.uffd_msg_remove.start.offset,
            remove + abi.uffd_msg_remove.end.offset) == (8, 16)
    reserved = arg + abi.uffd_msg_arg.reserved.offset
    assert [reserved + getattr(abi.uffd_msg_reserved, f).offset
            for f in ("reserved1", "reserved2", "reserved3")] == [8, 16, 24]


def test_uffd_msg_decodes_from_bytes() -> None:
    raw = bytearray(32)
    raw[0] = 0x12
    raw[8:16] = (0x3).to_bytes(8, "little")
    raw[16:24] = (0x7F0000001000).to_bytes(8, "little")
    raw[24:28] = (4242).to_bytes(4, "little")
    msg = abi.uffd_msg.from_buffer(raw)
    event = uffd.decode_message(msg)
    assert event == uffd.PagefaultEvent(0x7F0000001000,
                                        uffd.PagefaultFlag.WRITE | uffd.PagefaultFlag.WP, 4242)


def test_signed_out_fields() -> None:
    """The fill counts are s64: -EAGAIN must read back as -11, not 2**64 - 11."""
    for struct, field in [(abi.uffdio_copy, "copy"), (abi.uffdio_zeropage, "zeropage"),
                          (abi.uffdio_continue, "mapped"), (abi.uffdio_poison, "updated"),
                          (abi.uffdio_move, "move")]:
        value = struct()
        setattr(value, field, -11)
        assert getattr(value, field) == -11
        buf = bytes(value)
        assert buf[-8:] == (2**64 - 11).to_bytes(8, "little")


IOCTL_NUMBERS = {
    "UFFDIO_API": 0xC018AA3F,
    "UFFDIO_REGISTER": 0xC020AA00,
    "UFFDIO_UNREGISTER": 0x8010AA01,
    "UFFDIO_WAKE": 0x8010AA02,
    "UFFDIO_COPY": 0xC028AA03,
    "UFFDIO_ZEROPAGE": 0xC020AA04,
    "UFFDIO_MOVE": 0xC028AA05,
    "UFFDIO_WRITEPROTECT": 0xC018AA06,
    "UFFDIO_CONTINUE": 0xC020AA07,
    "UFFDIO_POISON": 0xC020AA08,
    "USERFAULTFD_IOC_NEW": 0x0000AA00,
}


@pytest.mark.parametrize("name", sorted(IOCTL_NUMBERS))
def test_ioctl_numbers(name: str) -> None:
    assert getattr(abi, name) == IOCTL_NUMBERS[name]


def test_ioc_helpers() -> None:
    assert abi._IOC(3, 0xAA, 0x3F, 24) == 0xC018AA3F
    assert abi._IO(0xAA, 0) == 0xAA00
    assert abi._IOR(0xAA, 1, abi.uffdio_range) == 0x8010AA01
    assert abi._IOW(0xAA, 1, abi.uffdio_range) == 0x4010AA01
    assert abi._IOWR(0xAA, 3, abi.uffdio_copy) == 0xC028AA03


def test_constants() -> None:
    assert abi.UFFD_API == 0xAA
    assert [abi._UFFDIO_REGISTER, abi._UFFDIO_UNREGISTER, abi._UFFDIO_WAKE, abi._UFFDIO_COPY,
            abi._UFFDIO_ZEROPAGE, abi._UFFDIO_MOVE, abi._UFFDIO_WRITEPROTECT,
            abi._UFFDIO_CONTINUE, abi._UFFDIO_POISON, abi._UFFDIO_API] == [
        0, 1, 2, 3, 4, 5, 6, 7, 8, 0x3F]
    assert abi.UFFD_API_IOCTLS == 0x8000000000000003
    assert abi.UFFD_API_RANGE_IOCTLS == 0x1FC
    assert abi.UFFD_API_RANGE_IOCTLS_BASIC == 0x1CC
    assert [abi.UFFD_EVENT_PAGEFAULT, abi.UFFD_EVENT_FORK, abi.UFFD_EVENT_REMAP,
            abi.UFFD_EVENT_REMOVE, abi.UFFD_EVENT_UNMAP] == [0x12, 0x13, 0x14, 0x15, 0x16]
    assert (abi.UFFD_PAGEFAULT_FLAG_WRITE, abi.UFFD_PAGEFAULT_FLAG_WP,
            abi.UFFD_PAGEFAULT_FLAG_MINOR) == (1, 2, 4)
    assert (abi.UFFDIO_REGISTER_MODE_MISSING, abi.UFFDIO_REGISTER_MODE_WP,
            abi.UFFDIO_REGISTER_MODE_MINOR) == (1, 2, 4)
    assert (abi.UFFDIO_COPY_MODE_DONTWAKE, abi.UFFDIO_COPY_MODE_WP) == (1, 2)
    assert abi.UFFDIO_ZEROPAGE_MODE_DONTWAKE == 1
    assert (abi.UFFDIO_WRITEPROTECT_MODE_WP, abi.UFFDIO_WRITEPROTECT_MODE_DONTWAKE) == (1, 2)
    assert (abi.UFFDIO_CONTINUE_MODE_DONTWAKE, abi.UFFDIO_CONTINUE_MODE_WP) == (1, 2)
    assert abi.UFFDIO_POISON_MODE_DONTWAKE == 1
    assert (abi.UFFDIO_MOVE_MODE_DONTWAKE, abi.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES) == (1, 2)
    assert (abi.O_CLOEXEC, abi.O_NONBLOCK, abi.UFFD_USER_MODE_ONLY) == (0x80000, 0x800, 1)
    assert abi.NR_USERFAULTFD_BY_MACHINE["x86_64"] == 323
    assert abi.NR_USERFAULTFD_BY_MACHINE["aarch64"] == 282
    assert (abi.MAP_SHARED, abi.MAP_PRIVATE, abi.MAP_FIXED, abi.MAP_ANONYMOUS,
            abi.MAP_NORESERVE, abi.MAP_POPULATE, abi.MAP_HUGETLB) == (
        0x1, 0x2, 0x10, 0x20, 0x4000, 0x8000, 0x40000)
    assert (abi.MADV_DONTNEED, abi.MADV_REMOVE, abi.MADV_HUGEPAGE,
            abi.MADV_POPULATE_WRITE) == (4, 9, 14, 23)
    assert (abi.MREMAP_MAYMOVE, abi.MREMAP_FIXED, abi.MREMAP_DONTUNMAP) == (1, 2, 4)
    assert (abi.MFD_CLOEXEC, abi.MFD_ALLOW_SEALING,
            abi.MFD_HUGETLB) == (1, 2, 4)


FEATURE_BITS = [
    "PAGEFAULT_FLAG_WP", "EVENT_FORK", "EVENT_REMAP", "EVENT_REMOVE", "MISSING_HUGETLBFS",
    "MISSING_SHMEM", "EVENT_UNMAP", "SIGBUS", "THREAD_ID", "MINOR_HUGETLBFS", "MINOR_SHMEM",
    "EXACT_ADDRESS", "WP_HUGETLBFS_SHMEM", "WP_UNPOPULATED", "POISON", "WP_ASYNC", "MOVE",
]


def test_feature_bits() -> None:
    for bit, name in enumerate(FEATURE_BITS):
        assert getattr(abi, "UFFD_FEATURE_" + name) == 1 << bit, name
        assert uffd.Feature[name] == 1 << bit, name
    assert [m.name for m in uffd.Feature] == FEATURE_BITS


def test_public_flags_keep_unknown_bits() -> None:
    future = uffd.Feature(0x1FFFF | (1 << 17) | (1 << 40))
    assert int(future) == 0x1FFFF | (1 << 17) | (1 << 40)
    assert uffd.Feature.MOVE in future
    assert int(uffd.Ioctl(0x8000000000000003 | (1 << 9))) == 0x8000000000000203
    assert uffd.Ioctl.API == 1 << 63
    assert uffd.Ioctl(0x13C) == (uffd.Ioctl.WAKE | uffd.Ioctl.COPY | uffd.Ioctl.ZEROPAGE
                                 | uffd.Ioctl.MOVE | uffd.Ioctl.POISON)
    assert int(uffd.PagefaultFlag(1 << 5)) == 32
    assert [int(e) for e in uffd.EventType] == [0x12, 0x13, 0x14, 0x15, 0x16]


def test_error_messages_name_the_call() -> None:
    err = uffd.RangeGoneError(2, "UFFDIO_COPY(dst=0x1000, src=0x2000, len=0x1000, mode=0)",
                              "drop it")
    assert isinstance(err, FileNotFoundError) and err.errno == 2
    assert str(err).startswith("UFFDIO_COPY(dst=0x1000")
    assert "[Errno 2]" in str(err) and str(err).endswith("drop it")
    assert isinstance(uffd.ProcessGoneError(3, "x"), ProcessLookupError)
    assert isinstance(uffd.UffdPermissionError(1, "x"), PermissionError)
    import pickle
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is uffd.RangeGoneError and str(again) == str(err)
    fe = uffd.FeatureUnavailableError(22, "UFFDIO_API(...)", requested=0x3, offered=0x1)
    assert fe.missing == uffd.Feature.EVENT_FORK
    assert pickle.loads(pickle.dumps(fe)).missing == uffd.Feature.EVENT_FORK


def test_import_touches_no_kernel() -> None:
    """libc is declared on first use only."""
    import subprocess
    import sys
    code = ("import uffdpy.ioctl as a, uffdpy.uffd, uffdpy.memory; "
            "assert 'ioctl' not in a.libc.__dict__; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30)
    assert out.stdout.strip() == "ok", out.stderr


def test_every_package_export_resolves() -> None:
    """``import uffdpy`` is lazy: every name it lists must import from its module."""
    import uffdpy
    for name in uffdpy.__all__:
        assert getattr(uffdpy, name) is not None, name
