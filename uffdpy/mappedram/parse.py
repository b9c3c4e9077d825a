"""The mapped-ram parser: every byte read is checked before a snapshot is returned."""
from __future__ import annotations

import json
from typing import Any, List, Optional, Tuple

from ..migstream import (QEMU_VM_COMMAND, QEMU_VM_CONFIGURATION, QEMU_VM_EOF, QEMU_VM_FILE_MAGIC,
                         QEMU_VM_FILE_VERSION, QEMU_VM_SECTION_END, QEMU_VM_SECTION_FOOTER,
                         QEMU_VM_SECTION_FULL, QEMU_VM_SECTION_PART, QEMU_VM_SECTION_START,
                         QEMU_VM_SUBSECTION, QEMU_VM_VMDESCRIPTION, RAM_SAVE_FLAG_EOS,
                         RAM_SAVE_FLAG_HOOK, RAM_SAVE_FLAG_MEM_SIZE, RAM_SAVE_FLAG_MULTIFD_FLUSH,
                         RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_XBZRLE, RAM_SAVE_FLAG_ZERO,
                         RAM_SECTION_VERSION)

from .model import (DeviceSection, MAPPED_RAM_HDR_VERSION, MAPPED_RAM_HEADER_SIZE,
                    MIG_CMD_SWITCHOVER_START, MappedRamError, NotMappedRamError,
                    RAM_SECTION_IDSTR, RamBlock, TARGET_PAGE_SIZE, _BE32,
                    _CONFIG_SUBSECTION_PREFIX, _Cursor, _HEADER, _MAX_TAIL_BYTES,
                    _NOT_MAPPED_RAM_HINT, _Source, _bitmap_size)

class _Parser:
    def __init__(self, snap: Any, src: _Source) -> None:   # the Snapshot it fills in
        self.snap = snap
        self.src = src
        self.cur = _Cursor(src, snap.offset)
        self.vmdesc_devices: Optional[List[Tuple[str, int]]] = None
        self.device_index = 0

    def err(self, offset: Optional[int], what: str, expected: object = None,
            actual: object = None) -> MappedRamError:
        return MappedRamError(self.src.path, offset, what, expected, actual)

    def parse(self) -> None:
        self._header()
        self._configuration()
        self._sections()

    # header and configuration

    def _header(self) -> None:
        cur = self.cur
        cur.expect(cur.be32, QEMU_VM_FILE_MAGIC, "file magic", digits=8,
                   problem="not a QEMU migration stream: bad magic",
                   shown=f"{QEMU_VM_FILE_MAGIC:#010x} ('QEVM')")
        cur.expect(cur.be32, QEMU_VM_FILE_VERSION, "stream version",
                   problem="unsupported stream version")

    def _configuration(self) -> None:
        cur, snap = self.cur, self.snap
        cur.expect(cur.u8, QEMU_VM_CONFIGURATION, "configuration section marker", digits=2,
                   problem="configuration section (mapped-ram streams always carry one)")
        at = cur.pos
        n = cur.be32("machine type length")
        if not 0 < n <= 256:
            raise self.err(at, "machine type length", "1..256", n)
        raw = cur.take(n, "machine type")
        try:
            snap.machine = raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.err(at + 4, "machine type is not ASCII", "ASCII", repr(raw)) from None
        has_caps = False
        while True:
            at = cur.pos
            peek = self.src.read_exact(at, min(2 + len(_CONFIG_SUBSECTION_PREFIX),
                                               self.src.size - at), "configuration subsection")
            if (len(peek) < 2 or peek[0] != QEMU_VM_SUBSECTION
                    or peek[1] < len(_CONFIG_SUBSECTION_PREFIX) + 1
                    or not peek[2:].startswith(_CONFIG_SUBSECTION_PREFIX)):
                break
            cur.pos += 1
            name = cur.counted_string("configuration subsection name")
            vat = cur.pos
            sub_version = cur.be32(f"{name} version")
            if sub_version != 1:
                raise self.err(vat, f"{name} version", 1, sub_version)
            if name == "configuration/capabilities":
                cat = cur.pos
                count = cur.be32("capability count")
                if count > 64:
                    raise self.err(cat, "capability count", "<= 64", count)
                for _ in range(count):
                    snap.capabilities.append(cur.counted_string("capability name"))
                has_caps = True
            elif name == "configuration/target-page-bits":
                bat = cur.pos
                bits = cur.be32("target page bits")
                if not 12 <= bits <= 30:
                    raise self.err(bat, "target page bits", "12..30", bits)
                snap.target_page_bits = bits
            elif name == "configuration/uuid":
                snap.uuid = cur.take(16, "uuid")
            else:
                raise self.err(at, "unknown configuration subsection",
                               "capabilities, target-page-bits or uuid", repr(name))
        if "mapped-ram" not in snap.capabilities:
            listed = ", ".join(snap.capabilities) if has_caps else "no capabilities subsection"
            raise NotMappedRamError(self.src.path, cur.pos, "capabilities do not include mapped-ram",
                                    "mapped-ram", listed, hint=_NOT_MAPPED_RAM_HINT)

    # vmdesc trailer

    def _find_vmdesc(self, tail_start: int) -> None:
        """Locate the ``06 | be32 len | JSON`` trailer at the very end of the file, if any.

        Only bytes from ``tail_start`` on are searched (called when the first
        device section or the EOF byte is reached, so normally just the tail).
        """
        if self.snap.eof_offset >= 0:
            return
        src, snap = self.src, self.snap
        tail_start = max(tail_start, src.size - _MAX_TAIL_BYTES)
        # Device state is small; the tail before the vmdesc is read again later anyway.
        window = min(src.size - tail_start, 4 << 20)
        while True:
            start = src.size - window
            tail = src.read_exact(start, window, "vmdesc trailer")
            p = tail.rfind(b"{")
            found = None
            while p >= 5:
                q = p - 5
                if (tail[q] == QEMU_VM_VMDESCRIPTION
                        and _BE32.unpack_from(tail, q + 1)[0] == len(tail) - p):
                    found = q
                    break
                p = tail.rfind(b"{", 0, p)
            if found is not None or start == tail_start:
                break
            window = min(src.size - tail_start, window * 4)
        if found is None:
            snap.eof_offset = src.size - 1
            return
        json_at = start + found + 5
        try:
            desc = json.loads(tail[found + 5:].decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise self.err(json_at, "vmdesc trailer is not valid JSON", "a JSON object",
                           str(e)) from None
        if not isinstance(desc, dict):
            raise self.err(json_at, "vmdesc trailer", "a JSON object", type(desc).__name__)
        devices = desc.get("devices", [])
        listed: List[Tuple[str, int]] = []
        if not isinstance(devices, list):
            raise self.err(json_at, "vmdesc 'devices'", "a list", type(devices).__name__)
        for d in devices:
            if (not isinstance(d, dict) or not isinstance(d.get("name"), str)
                    or not isinstance(d.get("instance_id"), int)):
                raise self.err(json_at, "vmdesc device entry", "{name: str, instance_id: int}",
                               repr(d)[:80])
            listed.append((d["name"], d["instance_id"]))
        snap.vmdesc = desc
        snap.vmdesc_offset = start + found
        snap.eof_offset = start + found - 1
        self.vmdesc_devices = listed

    # sections

    def _sections(self) -> None:
        cur, snap = self.cur, self.snap
        ram_done = False
        device_phase = False
        config_end = cur.pos
        while True:
            at = cur.pos
            kind = cur.u8("section type")
            if kind in (QEMU_VM_EOF, QEMU_VM_SECTION_FULL):
                self._find_vmdesc(at)
            if kind == QEMU_VM_EOF:
                if at != snap.eof_offset:
                    raise self.err(at, "end of stream (QEMU_VM_EOF) position",
                                   f"{snap.eof_offset:#x} (just before the vmdesc trailer / end "
                                   "of file)", f"{at:#x}")
                if not ram_done:
                    raise self.err(at, "stream ends without a RAM section", "a 'ram' START section",
                                   "EOF")
                if not device_phase:
                    snap.device_state_range = (at, self.src.size)
                return
            if kind == QEMU_VM_SECTION_FULL:
                if ram_done and not device_phase:
                    device_phase = True
                    snap.device_state_range = (at, self.src.size)
                self._device_section(at, early=not ram_done)
            elif device_phase:
                raise self.err(at, "section type after device state", "FULL (0x04) or EOF (0x00)",
                               f"{kind:#04x}")
            elif kind == QEMU_VM_SECTION_START:
                if ram_done:
                    raise self.err(at, "second START section", "PART/END/FULL/EOF", "START")
                snap.early_device_state_range = (config_end, at)
                self._ram_start(at)
                ram_done = True
            elif kind in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
                if not ram_done:
                    raise self.err(at, "PART/END section before the RAM START section")
                sid = cur.be32("section id")
                if sid != snap.ram_section_id:
                    raise self.err(at + 1, "PART/END section id (only 'ram' is iterable here)",
                                   snap.ram_section_id, sid)
                self._ram_eos()
                cur.footer(sid, "RAM PART/END section")
            elif kind == QEMU_VM_COMMAND:
                cmd_at = cur.pos
                cmd = cur.be16("command")
                length = cur.be16("command length")
                if (cmd, length) != (MIG_CMD_SWITCHOVER_START, 0):
                    raise self.err(cmd_at, "command (only SWITCHOVER_START is expected with "
                                   "mapped-ram)", f"{MIG_CMD_SWITCHOVER_START:#06x} length 0",
                                   f"{cmd:#06x} length {length}")
            else:
                raise self.err(at, "section type",
                               "EOF, START, PART, END, FULL or COMMAND (0x00-0x04, 0x08)",
                               f"{kind:#04x}")

    def _ram_eos(self) -> None:
        at = self.cur.pos
        word = self.cur.be64("RAM flags word")
        if word != RAM_SAVE_FLAG_EOS:
            self._bad_ram_word(at, word, "EOS (0x10)")

    def _bad_ram_word(self, at: int, word: int, expected: str) -> None:
        mask = (1 << self.snap.target_page_bits) - 1
        flags = word & mask
        bad = flags & (RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_XBZRLE
                       | RAM_SAVE_FLAG_HOOK | RAM_SAVE_FLAG_MULTIFD_FLUSH)
        what = "RAM flags word"
        if bad:
            what += " (flags that mapped-ram never writes)"
        raise self.err(at, what, expected, f"{word:#x}")

    def _ram_start(self, at: int) -> None:
        cur, snap, src = self.cur, self.snap, self.src
        sid = cur.be32("section id")
        name_at = cur.pos
        name = cur.counted_string("section name")
        instance = cur.be32("section instance")
        vat = cur.pos
        version = cur.be32("section version")
        if name != RAM_SECTION_IDSTR or instance != 0:
            raise self.err(name_at, "START section (only the 'ram' iterable section is supported)",
                           "'ram' instance 0", f"{name!r} instance {instance}")
        if version != RAM_SECTION_VERSION:
            raise self.err(vat, "'ram' section version", RAM_SECTION_VERSION, version)
        snap.ram_section_id = sid
        snap.ram_section_offset = at
        word_at = cur.pos
        word = cur.be64("RAM MEM_SIZE word")
        mask = (1 << snap.target_page_bits) - 1
        if word & mask != RAM_SAVE_FLAG_MEM_SIZE:
            self._bad_ram_word(word_at, word, "MEM_SIZE (0x04) with the total RAM size")
        total = word & ~mask
        consumed = 0
        ignore_shared = "x-ignore-shared" in snap.capabilities
        regions: List[Tuple[int, int, str]] = [
            (snap.offset, cur.pos, "stream header and RAM section start")]
        names = set()
        while consumed < total:
            rec_at = cur.pos
            name = cur.counted_string("RAMBlock name")
            if not name:
                raise self.err(rec_at, "RAMBlock name length", ">= 1", 0)
            if name in names:
                raise self.err(rec_at, "RAMBlock name", "a unique name", f"duplicate {name!r}")
            names.add(name)
            len_at = cur.pos
            length = cur.be64(f"used length of {name!r}")
            if ignore_shared:
                cur.be64(f"guest address of {name!r}")
            hdr_at = cur.pos
            hdr_version, page_size, bitmap_offset, pages_offset = _HEADER.unpack(
                cur.take(MAPPED_RAM_HEADER_SIZE, f"MappedRamHeader of {name!r}"))
            hdr_end = cur.pos
            if hdr_version > MAPPED_RAM_HDR_VERSION:
                raise self.err(hdr_at, "bad RAMBlock header version",
                               f"<= {MAPPED_RAM_HDR_VERSION}", hdr_version)
            if page_size != TARGET_PAGE_SIZE:
                # QEMU writes its target page size here and nothing else.  10.0.2
                # does not check it on load (it then misplaces every page); later
                # QEMU refuses it, and so do we: loading such a file by the 4 KiB
                # page would give zeros or wrong data.
                raise self.err(hdr_at + 4, f"page size of {name!r} (QEMU writes its "
                               "target page size; no QEMU loads any other correctly)",
                               TARGET_PAGE_SIZE, page_size)
            if length % page_size:
                raise self.err(len_at, f"used length of {name!r}",
                               f"a multiple of the page size {page_size}", f"{length:#x}")
            if consumed + length > total:
                raise self.err(len_at, f"used length of {name!r} (sum exceeds MEM_SIZE total)",
                               f"<= {total - consumed:#x}", f"{length:#x}")
            if pages_offset % 4096:
                raise self.err(hdr_at + 20, f"pages offset of {name!r}", "4096-aligned",
                               f"{pages_offset:#x}")
            pages = length // page_size
            bitmap_size = _bitmap_size(pages)
            for what, off, size, field_at in (("bitmap", bitmap_offset, bitmap_size, hdr_at + 12),
                                              ("pages region", pages_offset, length, hdr_at + 20)):
                if off < snap.offset or off + size > src.size:
                    raise self.err(field_at, f"{what} of {name!r} outside the stream",
                                   f"[{snap.offset:#x}, {src.size:#x})",
                                   f"[{off:#x}, {off + size:#x})")
            next_at = pages_offset + length
            if next_at < hdr_end:
                raise self.err(hdr_at + 20, f"pages region of {name!r} ends before its header",
                               f"end >= {hdr_end:#x}", f"{next_at:#x}")
            regions.append((rec_at, hdr_end, f"record of {name!r}"))
            regions.append((bitmap_offset, bitmap_offset + bitmap_size, f"bitmap of {name!r}"))
            regions.append((pages_offset, pages_offset + length, f"pages of {name!r}"))
            bitmap = src.read_exact(bitmap_offset, bitmap_size, f"bitmap of {name!r}")
            snap.blocks.append(RamBlock(
                src, name=name, length=length, page_size=page_size,
                bitmap_offset=bitmap_offset, pages_offset=pages_offset, bitmap=bitmap,
                header_offset=rec_at, header_version=hdr_version))
            consumed += length
            cur.pos = next_at
        regions.append((cur.pos, src.size, "end of the RAM section and device state"))
        self._check_overlaps(regions)
        self._ram_eos()
        cur.footer(sid, "RAM START section")

    def _check_overlaps(self, regions: List[Tuple[int, int, str]]) -> None:
        spans = sorted((r for r in regions if r[1] > r[0]), key=lambda r: (r[0], r[1]))
        for (a0, a1, aname), (b0, b1, bname) in zip(spans, spans[1:]):
            if b0 < a1:
                raise self.err(b0, f"{bname} overlaps {aname}", f"start >= {a1:#x}", f"{b0:#x}")

    # device sections

    def _device_section(self, at: int, *, early: bool) -> None:
        cur, snap = self.cur, self.snap
        sid = cur.be32("section id")
        name_at = cur.pos
        name = cur.counted_string("device section name")
        instance = cur.be32("device section instance")
        version = cur.be32("device section version")
        body = cur.pos
        k = self.device_index
        expected: Optional[Tuple[str, int]] = None
        following: Optional[Tuple[str, int]] = None
        if self.vmdesc_devices is not None:
            if k >= len(self.vmdesc_devices):
                raise self.err(at, "device section not listed in the vmdesc trailer",
                               f"{len(self.vmdesc_devices)} device sections",
                               f"section {k} ({name!r})")
            expected = self.vmdesc_devices[k]
            if (name, instance) != expected:
                raise self.err(name_at, f"device section {k} (vmdesc order)",
                               f"{expected[0]!r} instance {expected[1]}",
                               f"{name!r} instance {instance}")
            if k + 1 < len(self.vmdesc_devices):
                following = self.vmdesc_devices[k + 1]
        self.device_index += 1
        end = self._device_end(body, sid, early=early, following=following, last=(
            self.vmdesc_devices is not None and following is None))
        snap.devices.append(DeviceSection(name=name, instance=instance, version=version,
                                          section_id=sid, offset=at, length=end - at))
        cur.pos = end

    def _device_end(self, body: int, sid: int, *, early: bool,
                    following: Optional[Tuple[str, int]], last: bool) -> int:
        """Find the end of a device section whose body starts at ``body``.

        The body's layout is device-specific, so look for the footer
        ``7e | be32 sid`` followed by something that can only start the next
        thing in the stream: the next device section of the vmdesc list, the
        RAM START section (early sections), or the EOF byte at its known offset.
        """
        src, snap = self.src, self.snap
        footer = bytes([QEMU_VM_SECTION_FOOTER]) + _BE32.pack(sid)
        limit = snap.eof_offset if not early else src.size
        window = 1 << 16
        while True:
            stop = min(limit, body + window)
            buf = src.read_exact(body, stop - body, "device section")
            p = buf.find(footer)
            while p >= 0:
                nxt = body + p + 5
                if self._plausible_next(buf, p + 5, nxt, early=early, following=following,
                                        last=last):
                    return nxt
                p = buf.find(footer, p + 1)
            if stop >= limit:
                break
            window *= 4
        raise self.err(body, "end of device section (footer followed by the next section)",
                       f"7e {sid:08x} then the next section", "no such footer")

    def _plausible_next(self, buf: bytes, i: int, nxt: int, *, early: bool,
                        following: Optional[Tuple[str, int]], last: bool) -> bool:
        if not early and nxt == self.snap.eof_offset:
            return True
        if last or i >= len(buf):
            return False
        kind = buf[i]
        if kind == QEMU_VM_SECTION_START and early:
            return buf[i + 5:i + 9] == b"\x03ram"
        if kind != QEMU_VM_SECTION_FULL or i + 6 > len(buf):
            return False
        n = buf[i + 5]
        name = buf[i + 6:i + 6 + n]
        inst = buf[i + 6 + n:i + 10 + n]
        if len(inst) < 4 or n == 0:
            return False
        if following is not None:
            return name == following[0].encode("ascii", "replace") and \
                _BE32.unpack(inst)[0] == following[1]
        return all(32 < c < 127 for c in name)
