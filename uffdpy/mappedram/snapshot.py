"""An open, validated mapped-ram snapshot: :class:`Snapshot`, and which of its blocks are memory backends."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from ..pagesource import OpenImage, PathLike, RegionNotFound
from .model import (DeviceSection, MappedRamError, RamBlock, TARGET_PAGE_BITS_DEFAULT, _Source)
from .parse import _Parser

#: the machine's own RAM block on x86 (``pc``/``q35``: pc.ram; ``-machine none``: ram)
MACHINE_RAM_IDS = ("pc.ram", "ram")
#: blocks with no slash that QEMU allocates itself: a user cannot give them a backend
_FIRMWARE_BLOCKS = ("pc.bios", "pc.rom", "isa-bios")


def backend_blocks(snap: "Snapshot") -> List[RamBlock]:
    """The blocks that are memory backends: the machine's RAM and NUMA backends.

    A user can give these a backend of their own (a file to map, a NUMA node's
    memory); a block QEMU creates itself (firmware, option ROMs, VGA RAM, ACPI
    tables: named with a ``/`` or one of ``pc.bios``/``pc.rom``) cannot.
    """
    return [b for b in snap.blocks
            if "/" not in b.name and b.name not in _FIRMWARE_BLOCKS
            and not b.name.endswith((".rom", ".bios"))]


class Snapshot(OpenImage):
    """An open, validated mapped-ram snapshot file.

    Use :meth:`open`; the object holds the file open until :meth:`close`
    (idempotent; also on ``with`` exit).  Attributes: ``path``, ``offset``
    (where the stream starts in the file), ``machine`` (machine type name),
    ``capabilities``, ``blocks`` (file order), ``devices`` (device sections in
    file order), ``vmdesc`` (the JSON trailer, or None), ``file_size``,
    ``ram_section_id``, ``device_state_range`` (start, end) of everything after
    the RAM sections: device sections, EOF byte and vmdesc, to copy verbatim,
    and ``early_device_state_range``, the device sections QEMU writes before
    the RAM section (``early_setup`` devices such as virtio-mem; usually
    empty).
    """

    noun = "snapshot"

    path: str
    offset: int
    machine: str
    capabilities: List[str]
    blocks: List[RamBlock]
    devices: List[DeviceSection]
    vmdesc: Optional[Dict[str, Any]]
    device_state_range: Tuple[int, int]
    file_size: int

    def __init__(self, source: _Source, offset: int) -> None:
        self._source: Optional[_Source] = source
        self.path = source.path
        self.offset = offset
        self.file_size = source.size
        self.machine = ""
        self.capabilities = []
        self.target_page_bits = TARGET_PAGE_BITS_DEFAULT
        self.uuid: Optional[bytes] = None
        self.blocks = []
        self.devices = []
        self.vmdesc = None
        self.ram_section_id = -1
        self.ram_section_offset = -1
        self.device_state_range = (source.size, source.size)
        self.early_device_state_range = (0, 0)
        self.eof_offset = -1
        self.vmdesc_offset: Optional[int] = None

    @classmethod
    def open(cls, path: PathLike, *, offset: int = 0) -> "Snapshot":
        """Open and validate the mapped-ram stream starting at byte ``offset`` of ``path``.

        Raises: OSError if the file cannot be opened; NotMappedRamError for a
        migration stream saved without mapped-ram; MappedRamError for any
        other malformation.
        """
        source = _Source(path)
        try:
            if offset < 0 or offset >= source.size:
                raise MappedRamError(source.path, None, "stream offset outside the file",
                                     f"0 <= offset < {source.size}", offset)
            snap = cls(source, offset)
            _Parser(snap, source).parse()
            return snap
        except BaseException:
            source.close()
            raise

    format = "mapped-ram"

    @property
    def regions(self) -> List[RamBlock]:
        """The blocks, as the page-source interface names them (see uffdpy.pagesource)."""
        return self.blocks

    def region(self, name: str) -> RamBlock:
        """Same as :meth:`block`."""
        return self.block(name)

    def block(self, name: str) -> RamBlock:
        """The RAMBlock named ``name``. Raises: RegionNotFound (a KeyError) if there is none."""
        for b in self.blocks:
            if b.name == name:
                return b
        raise RegionNotFound(f"{self.path}: no RAMBlock named {name!r} "
                       f"(blocks: {', '.join(b.name for b in self.blocks)})")

    def __repr__(self) -> str:
        return (f"Snapshot(path={self.path!r}, offset={self.offset}, machine={self.machine!r}, "
                f"blocks={[b.name for b in self.blocks]}, devices={len(self.devices)})")
