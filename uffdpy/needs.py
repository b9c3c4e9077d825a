"""What a destination QEMU needs to load a snapshot, as far as the snapshot tells.

A migration stream carries the machine type, every RAMBlock with its length
and one section per device instance, but not the command line that made
them.  From those this module derives the arguments a destination must have
(``-machine``, ``-m``, ``-smp``, one ``-serial`` per serial port, NUMA
memory backends, ``-accel kvm`` for a kvmclock, ``-nodefaults`` when no
default display or network device was saved, the PCI devices it can name)
and lists what the snapshot cannot know (the CPU model, a kernel booted
directly, disks, network backends, where a serial port goes).  ``uffdpy
inspect`` prints it; a refused stream's error quotes it.
"""
from __future__ import annotations

import re
import shlex
from typing import Any, Dict, List

from .sizes import qemu_size

__all__ = ["destination_needs", "needs_line"]

#: PCI device sections ("0000:00:02.0/vga") whose device a user adds with -device
_PCI_DEVICES = {"vga": "VGA", "e1000": "e1000", "e1000e": "e1000e", "rtl8139": "rtl8139",
                "virtio-net": "virtio-net-pci", "virtio-blk": "virtio-blk-pci",
                "qxl": "qxl-vga", "cirrus_vga": "cirrus-vga", "virtio-gpu": "virtio-vga"}
_NICS = ("e1000", "e1000e", "rtl8139", "virtio-net")
_PCI_SECTION = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]/(?P<kind>[^/]+)$")
#: what no snapshot says
UNKNOWN = ["the CPU model (-cpu)", "a kernel booted directly (-kernel, -initrd, -append)",
           "disks and their backends", "network backends", "where each serial port goes",
           "the display (-display none for a destination without one)"]


def destination_needs(snap: Any) -> Dict[str, Any]:
    """``{"args": [...], "notes": [...], "unknown": [...]}`` for snapshot ``snap``."""
    names = [d.name for d in snap.devices]
    blocks = {b.name: b.length for b in snap.blocks}
    args: List[str] = ["-machine", snap.machine]
    notes: List[str] = []
    if "kvmclock" in names:
        args += ["-accel", "kvm"]
        notes.append("saved under KVM (it has a kvmclock): load it with -accel kvm")
    from .mappedram import MACHINE_RAM_IDS, backend_blocks
    numa = [b.name for b in backend_blocks(snap) if b.name not in MACHINE_RAM_IDS]
    ram = blocks.get("pc.ram", blocks.get("ram"))
    if numa:
        total = sum(blocks[n] for n in numa)
        args += ["-m", qemu_size(total)]
        for i, name in enumerate(numa):
            args += ["-object", f"memory-backend-ram,id={name},size={qemu_size(blocks[name])}",
                     "-numa", f"node,nodeid={i},memdev={name}"]
        notes.append("NUMA memory backends: their ids and sizes are the snapshot's, the "
                     "node ids a guess")
    elif ram is not None:
        args += ["-m", qemu_size(ram)]
    cpus = names.count("cpu")
    if cpus:
        args += ["-smp", str(cpus)]
    kinds = [m.group("kind") for m in map(_PCI_SECTION.match, names) if m]
    if not any(k in _NICS for k in kinds) and snap.machine.startswith("pc-") and kinds:
        # a pc or q35 made without -nodefaults has a NIC (and a VGA) of its own
        args.append("-nodefaults")
        notes.append("no network device was saved: -nodefaults, and -device for each "
                     "device that was")
    for kind in kinds:
        if kind in _PCI_DEVICES:
            args += ["-device", _PCI_DEVICES[kind]]
    serials = names.count("serial") + names.count("isa-serial")
    for _ in range(serials):
        args += ["-serial", "null"]
    if serials:
        notes.append(f"{serials} serial port{'s' if serials > 1 else ''}: one -serial each, "
                     "in order (null, a file: or a chardev: anything)")
    return {"args": args, "notes": notes, "unknown": list(UNKNOWN)}


def needs_line(snap: Any) -> str:
    """The arguments as one shell line."""
    return " ".join(shlex.quote(a) for a in destination_needs(snap)["args"])
