"""Make a real Linux guest snapshot in QEMU's mapped-ram migration format.

What it shows
-------------
uffdpy lazily loads the RAM of a QEMU "mapped-ram" snapshot.  The synthetic
files the unit tests build are useful, but only a snapshot written by QEMU
itself, of a guest that really ran, proves that the reader understands the
format as QEMU writes it.  This script makes such a snapshot, on demand, with
nothing but Debian packages and QEMU:

1. It takes a Debian kernel (``linux-image-<version>-amd64``, fetched with
   ``apt-get download`` and unpacked into a cache, never installed on the
   host) and a static busybox (``busybox-static``, likewise).
2. It builds an initramfs (cpio "newc", gzip; written in Python) holding
   busybox, an ``/init`` script and a tiny hand-made x86-64 program,
   ``/bin/uffdpy-fill``, that writes a deterministic pseudo-random pattern
   (xorshift64, seeded from ``--seed``) to stdout.
3. The guest's ``/init`` mounts proc/sys and a tmpfs, fills a file of
   ``--fill-mib`` MiB on the tmpfs with the pattern (tmpfs pages live in guest
   RAM), prints ``UFFDPY-READY`` on the serial console and then serves
   requests on its second serial port (ttyS1, a UNIX socket on the host):
   ``GET A N`` is answered with ``OK A N <md5>``, the md5 of MiB A..A+N of
   that file, which the guest reads to answer (:func:`ask`,
   :func:`expected_answer`): a warmed-up function waiting for its next call.
4. The host boots that under TCG (``-accel tcg``; no KVM needed), waits for
   the marker, and then over QMP: ``stop``, ``migrate-set-capabilities``
   mapped-ram on, ``migrate`` to ``file:OUT``, polls ``query-migrate`` until
   completed, and ``pmemsave``-s the whole guest RAM if asked, so callers can
   compare what a reader returns against what the guest held.

Use
---
Command line (``scripts/linux_guest.py``, a thin face on this module)::

    python3 scripts/linux_guest.py OUT.img [--mem 256M] [--fill-mib 64]
        [--seed N] [--pmemsave OUT.pmem] [--cache DIR] [--timeout S]

It prints a JSON summary (timings, paths, kernel version).  From Python::

    from uffdpy.harness.linuxguest import make_linux_guest_snapshot, fill_pattern_pages
    info = make_linux_guest_snapshot("guest.img", mem_mib=256, fill_mib=64,
                                     seed=0, pmemsave="guest.pmem")
    expected = set(fill_pattern_pages(seed=0, fill_mib=64))  # 4 KiB pages

The first run needs ``apt-get`` (Debian or a derivative) and, if the package
lists are missing, root to run ``apt-get update``; later runs reuse the cache
(default ``~/.cache/uffdpy/linux-guest``) and need no network.  ``--kernel``
and ``--busybox`` use files of your own instead.  Only the standard library
and uffdpy's own :mod:`uffdpy.qemu` launcher and :mod:`uffdpy.qmp` (its face on
qemu.qmp, QEMU's QMP library) are used.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import socket
import struct
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from ..errors import UffdpyError
from ..qemu import Qemu, QemuError
from ..qmp import MigrationFailed, QmpClient, QmpError

PathLike = Union[str, "os.PathLike[str]"]

PAGE_SIZE = 4096
READY_MARKER = "UFFDPY-READY"
BOOTED_MARKER = "UFFDPY-BOOTED"
FAILED_MARKER = "UFFDPY-FAILED"
DEFAULT_CACHE = Path.home() / ".cache" / "uffdpy" / "linux-guest"
DEFAULT_TIMEOUT = 300.0
_M64 = (1 << 64) - 1

__all__ = [
    "make_linux_guest_snapshot",
    "fill_pattern_pages",
    "fill_initial_state",
    "ensure_guest_files",
    "build_initramfs",
    "GuestError",
    "READY_MARKER",
    "guest_machine_args",
    "request_port_args",
    "destination_args",
    "expected_answer",
    "ask",
]


class GuestError(UffdpyError, RuntimeError):
    """Any failure while fetching the guest files, booting or snapshotting."""


# --------------------------------------------------------------------------
# The fill pattern: xorshift64 (13, 7, 17), one 64-bit little-endian word at
# a time, page after page.  The guest's /bin/uffdpy-fill computes exactly the
# same stream as fill_pattern_pages() below.


def fill_initial_state(seed: int) -> int:
    """The xorshift64 start state for ``seed`` (a splitmix64 step, never 0)."""
    z = (seed * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    z ^= z >> 31
    return z or 0x2545F4914F6CDD1D


def fill_pattern_pages(seed: int, fill_mib: int) -> Iterator[bytes]:
    """Yield the ``fill_mib`` MiB that the guest writes, one 4 KiB page at a time."""
    x = fill_initial_state(seed)
    words = PAGE_SIZE // 8
    pack = struct.Struct("<%dQ" % words).pack
    for _ in range(fill_mib * (1 << 20) // PAGE_SIZE):
        page: List[int] = []
        append = page.append
        for _ in range(words):
            x ^= (x << 13) & _M64
            x ^= x >> 7
            x ^= (x << 17) & _M64
            append(x)
        yield pack(*page)


# Machine code of /bin/uffdpy-fill (x86-64 Linux, no libc).  Assembly:
#
#       movabs rbx, STATE          ; xorshift64 state
#       movabs r12, NPAGES
#       sub    rsp, 4096           ; one page of buffer on the stack
#   page:
#       mov rdi, rsp ; mov ecx, 512
#   word:
#       mov rax, rbx ; shl rax, 13 ; xor rbx, rax
#       mov rax, rbx ; shr rax, 7  ; xor rbx, rax
#       mov rax, rbx ; shl rax, 17 ; xor rbx, rax
#       mov [rdi], rbx ; add rdi, 8 ; dec ecx ; jnz word
#       mov r13, rsp ; mov r14d, 4096
#   write:                         ; write(1, r13, r14) until the page is out
#       mov eax, 1 ; mov edi, 1 ; mov rsi, r13 ; mov rdx, r14 ; syscall
#       test rax, rax ; jle fail
#       add r13, rax ; sub r14, rax ; jnz write
#       dec r12 ; jnz page
#       xor edi, edi ; mov eax, 60 ; syscall      ; exit(0)
#   fail:
#       mov edi, 1 ; mov eax, 60 ; syscall        ; exit(1)
_FILL_CODE = bytes.fromhex(
    "48bb" "0000000000000000"          # movabs rbx, STATE   (imm at offset 2)
    "49bc" "0000000000000000"          # movabs r12, NPAGES  (imm at offset 12)
    "4881ec00100000"
    "4889e7" "b900020000"
    "4889d8" "48c1e00d" "4831c3"
    "4889d8" "48c1e807" "4831c3"
    "4889d8" "48c1e011" "4831c3"
    "48891f" "4883c708" "ffc9" "75d7"
    "4989e5" "41be00100000"
    "b801000000" "bf01000000" "4c89ee" "4c89f2" "0f05"
    "4885c0" "7e16"
    "4901c5" "4929c6" "75e1"
    "49ffcc" "75a2"
    "31ff" "b83c000000" "0f05"
    "bf01000000" "b83c000000" "0f05"
)


def fill_program(seed: int, fill_mib: int) -> bytes:
    """A static x86-64 ELF executable that writes the fill pattern to stdout."""
    npages = fill_mib * (1 << 20) // PAGE_SIZE
    if npages < 1:
        raise ValueError("fill_mib must be at least 1")
    code = bytearray(_FILL_CODE)
    code[2:10] = struct.pack("<Q", fill_initial_state(seed))
    code[12:20] = struct.pack("<Q", npages)
    base, ehsize, phsize = 0x400000, 64, 56
    entry = base + ehsize + phsize
    total = ehsize + phsize + len(code)
    ehdr = (b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
            + struct.pack("<HHIQQQIHHHHHH",
                          2, 0x3E, 1,        # ET_EXEC, EM_X86_64, EV_CURRENT
                          entry, ehsize, 0,  # entry, phoff, shoff
                          0, ehsize, phsize, 1, 0, 0, 0))
    phdr = struct.pack("<IIQQQQQQ",
                       1, 5,                 # PT_LOAD, PF_R | PF_X
                       0, base, base,        # offset, vaddr, paddr
                       total, total, 0x1000)
    return ehdr + phdr + bytes(code)


# --------------------------------------------------------------------------
# The initramfs.


def _newc_entry(name: str, mode: int, data: bytes = b"", ino: int = 1,
                rdev: Tuple[int, int] = (0, 0), nlink: int = 1) -> bytes:
    raw_name = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0,
              rdev[0], rdev[1], len(raw_name), 0)
    head = b"070701" + b"".join(b"%08x" % f for f in fields) + raw_name
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def _init_script(fill_mib: int) -> str:
    tmpfs_mib = fill_mib + 4
    return f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "{BOOTED_MARKER} $(cut -d' ' -f1 /proc/uptime)"
mkdir -p /fill
mount -t tmpfs -o size={tmpfs_mib}m tmpfs /fill || echo "{FAILED_MARKER} mount tmpfs"
echo "uffdpy: writing {fill_mib} MiB of pattern to /fill/pattern"
if /bin/uffdpy-fill > /fill/pattern; then
    set -- $(ls -l /fill/pattern)
    stty -F /dev/ttyS1 raw -echo 2>/dev/null
    exec 3<>/dev/ttyS1
    echo "{READY_MARKER} bytes=$5 $(grep -E '^(MemTotal|MemFree|Shmem):' /proc/meminfo | tr -s ' ' | tr '\\n' ' ')"
    # the request server: "GET A N" -> "OK A N <md5 of MiB A..A+N of the pattern>";
    # "ZAP A N" overwrites those MiB with zeros (a write to guest RAM) -> "ZAPPED A N"
    while read -r cmd a n <&3; do
        case "$cmd" in
        GET) set -- $(dd if=/fill/pattern bs=1M skip="$a" count="$n" 2>/dev/null | md5sum)
             echo "OK $a $n $1" >&3 ;;
        ZAP) dd if=/dev/zero of=/fill/pattern bs=1M seek="$a" count="$n" conv=notrunc \
                2>/dev/null && echo "ZAPPED $a $n" >&3 || echo "ERR ZAP" >&3 ;;
        *)   echo "ERR $cmd" >&3 ;;
        esac
    done
    echo "{FAILED_MARKER} request port closed"
else
    echo "{FAILED_MARKER} fill exited $?"
fi
while :; do sleep 3600; done
"""


def build_initramfs(busybox: PathLike, seed: int, fill_mib: int) -> bytes:
    """A gzip-compressed cpio (newc) archive: busybox, /init, /bin/uffdpy-fill."""
    entries: List[bytes] = []
    ino = 100

    def add(name: str, mode: int, data: bytes = b"", rdev: Tuple[int, int] = (0, 0)) -> None:
        nonlocal ino
        ino += 1
        entries.append(_newc_entry(name, mode, data, ino=ino, rdev=rdev,
                                   nlink=2 if mode & 0o170000 == 0o040000 else 1))

    for d in ("bin", "dev", "proc", "sys", "tmp", "fill"):
        add(d, 0o040755)
    add("dev/console", 0o020600, rdev=(5, 1))
    add("dev/null", 0o020666, rdev=(1, 3))
    add("bin/busybox", 0o100755, Path(busybox).read_bytes())
    add("bin/uffdpy-fill", 0o100755, fill_program(seed, fill_mib))
    add("init", 0o100755, _init_script(fill_mib).encode())
    entries.append(_newc_entry("TRAILER!!!", 0, ino=0, nlink=1))
    archive = b"".join(entries)
    archive += b"\0" * (-len(archive) % 512)
    return gzip.compress(archive, compresslevel=6, mtime=0)


# --------------------------------------------------------------------------
# Kernel and busybox from Debian packages.


def _run(cmd: List[str], timeout: float, cwd: Optional[PathLike] = None) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=timeout, universal_newlines=True)
    except FileNotFoundError:
        raise GuestError(f"{cmd[0]} not found: this needs a Debian-like host "
                         "(or pass --kernel and --busybox)") from None
    except subprocess.TimeoutExpired:
        raise GuestError(f"{' '.join(cmd)} timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise GuestError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _apt_update_if_needed(probe: str) -> None:
    """Run ``apt-get update`` if apt knows no candidate for ``probe``."""
    out = subprocess.run(["apt-cache", "policy", probe], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, universal_newlines=True).stdout
    m = re.search(r"Candidate:\s*(\S+)", out)
    if m and m.group(1) != "(none)":
        return
    if os.geteuid() != 0:
        raise GuestError(f"apt knows no {probe} and we are not root to run apt-get update: "
                         "run 'apt-get update' first")
    _run(["apt-get", "update"], timeout=600)


def resolve_kernel_package() -> str:
    """The package ``linux-image-amd64`` currently depends on, e.g. linux-image-6.1.0-56-amd64."""
    _apt_update_if_needed("linux-image-amd64")
    out = _run(["apt-cache", "depends", "linux-image-amd64"], timeout=60)
    for m in re.finditer(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)\b", out):
        return m.group(1)
    raise GuestError(f"cannot find the kernel package in apt-cache depends output:\n{out}")


def _download_deb(package: str, into: Path) -> Path:
    before = set(into.glob("*.deb"))
    _run(["apt-get", "download", package], timeout=900, cwd=into)
    new = [p for p in into.glob("*.deb") if p not in before]
    if not new:
        raise GuestError(f"apt-get download {package} produced no .deb")
    return new[0]


def _extract_from_deb(deb: Path, wanted: "re.Pattern[str]", dest_dir: Path) -> List[Path]:
    """Extract the members of ``deb`` whose path matches ``wanted`` (flattened) into dest_dir."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    got: List[Path] = []
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if member.isfile() and wanted.search(member.name):
                    src = tar.extractfile(member)
                    assert src is not None
                    target = dest_dir / Path(member.name).name
                    with open(target, "wb") as f:
                        shutil.copyfileobj(src, f)
                    got.append(target)
        proc.stdout.read()  # drain, so dpkg-deb does not die of SIGPIPE
    finally:
        _, err = proc.communicate(timeout=120)
    if proc.returncode != 0:
        raise GuestError(f"dpkg-deb --fsys-tarfile {deb} failed: {err.decode(errors='replace')}")
    return got


def ensure_guest_files(cache: Optional[PathLike] = None) -> Dict[str, Any]:
    """Return ``{"kernel", "kernel_version", "busybox"}``, downloading into the cache if needed.

    A kernel already in the cache is reused as is (newest version first), so a
    warm cache needs neither apt nor the network.
    """
    cache_dir = Path(cache) if cache is not None else DEFAULT_CACHE
    cache_dir.mkdir(parents=True, exist_ok=True)
    kernels = sorted(cache_dir.glob("vmlinuz-*"), key=lambda p: _version_key(p.name))
    busybox = cache_dir / "busybox"
    if kernels and busybox.is_file():
        k = kernels[-1]
        return {"kernel": str(k), "kernel_version": k.name[len("vmlinuz-"):],
                "busybox": str(busybox), "downloaded": False}

    with tempfile.TemporaryDirectory(prefix="dl-", dir=cache_dir) as tmp:
        tmpdir = Path(tmp)
        # (As root, apt-get download warns that it downloads unsandboxed
        # because _apt cannot write here; harmless, and stderr is not shown.)
        if not kernels:
            pkg = resolve_kernel_package()
            deb = _download_deb(pkg, tmpdir)
            found = _extract_from_deb(deb, re.compile(r"^\.?/?boot/vmlinuz-"), tmpdir)
            if not found:
                raise GuestError(f"no boot/vmlinuz-* in {deb.name}")
            os.replace(found[0], cache_dir / found[0].name)
            kernels = [cache_dir / found[0].name]
        if not busybox.is_file():
            _apt_update_if_needed("busybox-static")
            deb = _download_deb("busybox-static", tmpdir)
            found = _extract_from_deb(deb, re.compile(r"^\.?/?bin/busybox$"), tmpdir)
            if not found:
                raise GuestError(f"no bin/busybox in {deb.name}")
            os.chmod(found[0], 0o755)
            os.replace(found[0], busybox)
    k = kernels[-1]
    return {"kernel": str(k), "kernel_version": k.name[len("vmlinuz-"):],
            "busybox": str(busybox), "downloaded": True}


def _version_key(name: str) -> List[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------
# Boot and snapshot.


def _qemu_version(qemu: str) -> str:
    try:
        out = subprocess.run([qemu, "--version"], stdout=subprocess.PIPE, timeout=30,
                             universal_newlines=True).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.splitlines()[0] if out else "?"


def guest_machine_args(machine: str, mem_mib: int) -> List[str]:
    """The machine arguments of the guest, without serial backends: a destination needs them.

    A destination adds ``-serial BACKEND`` for the console (ttyS0) and
    :func:`request_port_args` for the request port (ttyS1), in that order.
    """
    return ["-machine", machine, "-accel", "tcg", "-cpu", "max", "-smp", "1",
            "-m", f"{mem_mib}M", "-nodefaults", "-display", "none", "-no-reboot"]


def request_port_args(socket_path: str) -> List[str]:
    """The second serial port (the guest's ttyS1) as a listening UNIX socket at ``socket_path``."""
    return ["-chardev", f"socket,id=uffdpy-req,path={socket_path},server=on,wait=off",
            "-serial", "chardev:uffdpy-req"]


def resume_command(info: Dict[str, Any], request_socket: str, *, mapped: bool = False) -> str:
    """The ``uffdpy resume`` command line that runs the snapshot ``info`` describes."""
    import shlex
    words = ["uffdpy", "resume", info["snapshot"], *(["--map"] if mapped else []), "--",
             os.path.basename(info.get("qemu") or "qemu-system-x86_64"),
             *destination_args(info, request_socket)]
    return " ".join(shlex.quote(w) for w in words)


def destination_args(info: Dict[str, Any], request_socket: str,
                     console: str = "null") -> List[str]:
    """The arguments (after the binary) of a QEMU that loads the snapshot ``info`` describes."""
    return [*info["qemu_args"], "-serial", console, *request_port_args(request_socket)]


def expected_answer(seed: int, first_mib: int, count_mib: int) -> str:
    """What the guest answers to ``GET first_mib count_mib``."""
    digest = hashlib.md5()
    for i, page in enumerate(fill_pattern_pages(seed, first_mib + count_mib)):
        if i >= first_mib * (1 << 20) // PAGE_SIZE:
            digest.update(page)
    return f"OK {first_mib} {count_mib} {digest.hexdigest()}"


def zeroed_answer(first_mib: int, count_mib: int) -> str:
    """What the guest answers to ``GET first_mib count_mib`` after ``ZAP`` of those MiB."""
    return f"OK {first_mib} {count_mib} {hashlib.md5(bytes(count_mib << 20)).hexdigest()}"


def ask(socket_path: str, first_mib: int, count_mib: int, *, timeout: float,
        verb: str = "GET") -> str:
    """Send ``VERB first_mib count_mib`` to the guest's request port; return its answer line.

    ``GET``: the guest reads that part of its tmpfs file and answers with its
    md5 (see :func:`expected_answer`); ``ZAP``: it overwrites that part with
    zeros and answers ``ZAPPED A N``.  Raises: TimeoutError if no whole line
    came within ``timeout`` seconds; OSError if the port cannot be reached.
    """
    return ask_line(socket_path, f"{verb} {first_mib} {count_mib}", timeout=timeout)


def ask_line(socket_path: str, request: str, *, timeout: float) -> str:
    """Send one request line to the guest's request port; return its answer line.

    Raises: TimeoutError if no whole line came within ``timeout`` seconds;
    OSError if the port cannot be reached.
    """
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(request.encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer on {socket_path} within {timeout:g}s")
            sock.settimeout(left)
            try:
                chunk = sock.recv(4096)
            except socket.timeout:
                raise TimeoutError(f"no answer on {socket_path} within {timeout:g}s") from None
            if not chunk:
                raise ConnectionError(f"{socket_path} closed before the guest answered")
            buf += chunk
    return buf.split(b"\n", 1)[0].decode(errors="replace").strip()


def make_linux_guest_snapshot(out: PathLike, *, mem_mib: int = 256, fill_mib: int = 64,
                              seed: int = 0, pmemsave: Optional[PathLike] = None,
                              cache: Optional[PathLike] = None,
                              timeout: float = DEFAULT_TIMEOUT,
                              qemu: Optional[str] = None,
                              kernel: Optional[PathLike] = None,
                              busybox: Optional[PathLike] = None,
                              machine: str = "pc") -> Dict[str, Any]:
    """Boot a Linux guest under TCG, fill ``fill_mib`` MiB of its RAM, save a mapped-ram snapshot.

    ``out`` receives the migration stream (mapped-ram, ``file:`` transport);
    ``pmemsave``, if given, receives guest-physical memory ``0 .. mem_mib MiB``.
    ``timeout`` bounds the whole QEMU run (boot, fill, migration, dump).
    Returns a dict of paths, sizes, the kernel version and timings in seconds.
    """
    t_start = time.monotonic()
    if fill_mib < 1:
        raise ValueError("fill_mib must be >= 1")
    if mem_mib < 64 or fill_mib > mem_mib // 2:
        raise ValueError(f"need mem_mib >= 64 and fill_mib <= mem_mib/2 (got {mem_mib}, {fill_mib}): "
                         "the kernel and the tmpfs need room")
    if mem_mib > 3 * 1024:
        raise ValueError("mem_mib above 3 GiB would split pc.ram around the PCI hole; not supported")
    qemu = qemu or os.environ.get("UFFDPY_QEMU", "qemu-system-x86_64")
    qemu_path = shutil.which(qemu)
    if qemu_path is None:
        raise GuestError(f"{qemu} not found")
    out_path = Path(out).resolve()
    pmem_path = Path(pmemsave).resolve() if pmemsave is not None else None

    if kernel is not None and busybox is not None:
        files: Dict[str, Any] = {
            "kernel": str(kernel), "busybox": str(busybox), "downloaded": False,
            "kernel_version": Path(kernel).name.replace("vmlinuz-", "")}
    else:
        files = ensure_guest_files(cache)
        if kernel is not None:
            files["kernel"] = str(kernel)
            files["kernel_version"] = Path(kernel).name.replace("vmlinuz-", "")
        if busybox is not None:
            files["busybox"] = str(busybox)
    t_files = time.monotonic()

    result: Dict[str, Any] = {
        "snapshot": str(out_path), "pmemsave": str(pmem_path) if pmem_path else None,
        "mem_mib": mem_mib, "fill_mib": fill_mib, "seed": seed,
        "fill_initial_state": fill_initial_state(seed),
        "kernel": files["kernel"], "kernel_version": files["kernel_version"],
        "busybox": files["busybox"], "qemu": qemu_path, "qemu_version": _qemu_version(qemu_path),
        "machine": machine, "ram_block": "pc.ram",
    }

    with tempfile.TemporaryDirectory(prefix="uffdpy-guest-") as work_s:
        work = Path(work_s)
        initrd = work / "initramfs.cpio.gz"
        initrd.write_bytes(build_initramfs(files["busybox"], seed, fill_mib))
        serial = work / "serial.log"
        for p in (out_path, pmem_path):
            if p is not None:
                p.parent.mkdir(parents=True, exist_ok=True)
                if p.exists():
                    p.unlink()
        machine_args = guest_machine_args(machine, mem_mib)
        cmdline = [qemu_path, *machine_args, "-serial", f"file:{serial}",
                   *request_port_args(str(work / "req.sock")),
                   "-kernel", files["kernel"], "-initrd", str(initrd),
                   "-append", "console=ttyS0 quiet panic=1 mitigations=off"]
        result["qemu_cmdline"] = cmdline
        result["qemu_args"] = machine_args
        deadline = time.monotonic() + timeout
        t_boot0 = time.monotonic()
        try:
            vm = Qemu(cmdline, timeout=min(60.0, timeout))     # the one launcher: own session
        except QemuError as e:
            raise GuestError(f"QEMU did not start: {e}") from None
        proc = vm.proc
        assert proc is not None
        qmp: Optional[QmpClient] = None

        def console() -> str:
            try:
                return serial.read_text(errors="replace")
            except FileNotFoundError:
                return ""

        def fail(why: str) -> GuestError:
            qlog = vm.output().strip()
            tail = "\n".join(console().splitlines()[-30:])
            return GuestError(f"{why}\n--- qemu output ---\n{qlog}\n--- serial console (tail) ---\n{tail}")

        try:
            qmp = vm.connect(timeout=max(1.0, deadline - time.monotonic()))
            # 1. Wait for the guest to say it is ready.
            t_booted = None
            while True:
                text = console()
                if t_booted is None and BOOTED_MARKER in text:
                    t_booted = time.monotonic()
                if READY_MARKER in text:
                    break
                if FAILED_MARKER in text:
                    raise fail("guest reported a failure")
                if proc.poll() is not None:
                    raise fail(f"QEMU exited ({proc.returncode}) before the guest was ready")
                if time.monotonic() > deadline:
                    raise fail(f"no {READY_MARKER} on the serial console within {timeout:.0f} s")
                time.sleep(0.2)
            t_ready = time.monotonic()
            time.sleep(0.5)          # let the guest reach its blocking read of the request port
            ready_line = next(l for l in text.splitlines() if READY_MARKER in l)
            result["guest_ready_line"] = ready_line.strip()

            # 2. Stop the guest and save it with mapped-ram.
            qmp.call("stop")
            qmp.call("migrate-set-capabilities",
                     capabilities=[{"capability": "mapped-ram", "state": True}])
            t_mig0 = time.monotonic()
            qmp.call("migrate", uri=f"file:{out_path}")
            try:
                info = qmp.wait_migration(timeout=max(1.0, deadline - time.monotonic()),
                                          poll=0.05)
            except (MigrationFailed, TimeoutError) as e:
                raise fail(str(e)) from None
            t_mig1 = time.monotonic()
            result["migrate_info"] = {k: info[k] for k in ("total-time", "ram") if k in info}

            # 3. Dump guest-physical RAM for comparison.
            if pmem_path is not None:
                qmp.call("pmemsave", val=0, size=mem_mib << 20, filename=str(pmem_path))
            t_pmem = time.monotonic()
            qmp.call("quit")
            try:
                proc.wait(timeout=max(1.0, min(30.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
            result["console"] = console()
        except (QmpError, TimeoutError, ConnectionError) as e:
            raise fail(f"QMP: {e}") from e
        finally:
            if qmp is not None:
                qmp.close()
            vm.kill()

    st = out_path.stat()
    result.update({
        "snapshot_bytes": st.st_size,
        "snapshot_disk_bytes": st.st_blocks * 512,
        "pmemsave_bytes": pmem_path.stat().st_size if pmem_path else None,
        "downloaded": files.get("downloaded", False),
        "seconds": {
            "fetch_files": round(t_files - t_start, 3),
            "boot": round((t_booted or t_ready) - t_boot0, 3),
            "boot_and_fill": round(t_ready - t_boot0, 3),
            "migrate": round(t_mig1 - t_mig0, 3),
            "pmemsave": round(t_pmem - t_mig1, 3),
            "total": round(time.monotonic() - t_start, 3),
        },
    })
    return result
