"""``uffdpy inspect``: what a snapshot, an ELF core or a working set holds."""
from __future__ import annotations

import argparse
import shlex
from typing import Any, Dict, Tuple

from ..needs import destination_needs
from ..outcome import Outcome
from .args import Command, human, open_source, printable, sniff, snapshot_arg, tabulate

__all__ = ["COMMANDS"]


def _page_counts(region: Any) -> Dict[str, int]:
    """The sizes ``inspect --json`` gives for a region of any format, in its key order."""
    return {"length": region.length, "page_size": region.page_size, "pages": region.pages,
            "present_pages": region.present_pages, "zero_pages": region.zero_pages}


def _inspect_elf_dict(image: Any) -> Dict[str, Any]:
    return {
        "path": image.path,
        "format": image.format,
        "machine": image.machine,
        "address_space": image.address_space,
        "regions": [{"name": r.name, "address": r.address, **_page_counts(r),
                     "file_offset": r.file_offset, "file_bytes": r.file_bytes,
                     "flags": r.flags} for r in image.regions],
        "notes": [{"name": n.name, "type": n.type, "type_name": n.type_name,
                   "offset": n.offset, "size": n.size} for n in image.notes],
    }


def _elf_text(info: Dict[str, Any]) -> str:
    rows = [[printable(r["name"]), human(r["length"]), r["present_pages"], r["zero_pages"],
             f"0x{r['file_offset']:x}", "".join(c if r["flags"] & bit else "-" for c, bit
                                                in (("r", 4), ("w", 2), ("x", 1)))]
            for r in info["regions"]]
    notes = [[printable(n["name"]), printable(n["type_name"]), n["size"], f"0x{n['offset']:x}"]
             for n in info["notes"]]
    return "\n".join([
        f"file:          {printable(info['path'])}",
        f"format:        ELF core ({printable(info['machine'])}), "
        f"{info['address_space']} addresses",
        tabulate(rows, headers=["region", "size", "in file", "zero", "file offset", "flags"]),
        "",
        tabulate(notes, headers=["note", "type", "bytes", "offset"])])


def _inspect_dict(snap: Any) -> Dict[str, Any]:
    return {
        "path": snap.path,
        "format": snap.format,
        "machine": snap.machine,
        "capabilities": list(snap.capabilities),
        "regions": [{"name": b.name, **_page_counts(b), "bitmap_offset": b.bitmap_offset,
                     "pages_offset": b.pages_offset} for b in snap.blocks],
        "devices": [{"name": d.name, "instance": d.instance, "version": d.version}
                    for d in snap.devices],
        "destination": destination_needs(snap),
    }


def _snapshot_text(info: Dict[str, Any]) -> str:
    rows = [[printable(b["name"]), human(b["length"]), b["page_size"], b["present_pages"],
             b["zero_pages"], f"{100 * b['present_pages'] / b['pages']:.1f}" if b["pages"] else "-",
             f"0x{b['pages_offset']:x}"] for b in info["regions"]]
    devices = [[printable(d["name"]), d["instance"], d["version"]] for d in info["devices"]]
    return "\n".join([
        f"file:         {printable(info['path'])}",
        f"machine:      {printable(info['machine'])}",
        f"capabilities: {printable(', '.join(info['capabilities'])) or '-'}",
        tabulate(rows, headers=["block", "size", "page size", "present", "zero",
                                "% present", "pages offset"]),
        "",
        tabulate(devices, headers=["device section", "instance", "version"]),
        "",
        "a destination needs (as far as the snapshot tells):",
        "  " + " ".join(shlex.quote(printable(a)) for a in info["destination"]["args"]),
        *(f"  ({printable(n)})" for n in info["destination"]["notes"]),
        f"  and what it cannot tell: {', '.join(info['destination']['unknown'])}"])


def _inspect_regions_dict(image: Any) -> Dict[str, Any]:
    """What ``inspect`` shows of a format it has no entry for: the ``PageSource`` view."""
    return {"path": image.path, "format": image.format,
            "regions": [{"name": r.name, **_page_counts(r), "file_offset": r.file_offset,
                         "file_bytes": r.file_bytes} for r in image.regions]}


def _regions_text(info: Dict[str, Any]) -> str:
    rows = [[printable(r["name"]), human(r["length"]), r["present_pages"], r["zero_pages"],
             f"0x{r['file_offset']:x}"] for r in info["regions"]]
    return "\n".join([f"file:   {printable(info['path'])}",
                      f"format: {printable(info['format'])}",
                      tabulate(rows, headers=["region", "size", "in file", "zero",
                                              "file offset"])])


#: per format (``PageSource.format``): what ``inspect`` computes, and its text; a
#: format without an entry (a new one in ``pagesource.FORMATS``) shows its regions
_INSPECTORS = {
    "mapped-ram": (_inspect_dict, _snapshot_text),
    "elf-core": (_inspect_elf_dict, _elf_text),
}


def cmd_inspect(args: argparse.Namespace) -> Outcome:
    head, regular = sniff(args)
    if regular and not args.offset and head.startswith(b"{"):     # JSON: a working set
        from .ws import inspect_file
        return inspect_file(args.snapshot, args.against)
    if args.against:
        raise ValueError("--against applies to working-set files (FILE.ws) only")
    with open_source(args, head) as image:
        describe, text = _INSPECTORS.get(image.format, (_inspect_regions_dict, _regions_text))
        info = describe(image)
    return Outcome(lambda: text(info), info)


def _inspect_arguments(sp: argparse.ArgumentParser) -> None:
    snapshot_arg(sp)
    sp.add_argument("--json", action="store_true", help="print everything as JSON")
    sp.add_argument("--against", action="append", default=[], metavar="OTHER.ws",
                    help="for a working set (FILE.ws): its Jaccard index with this "
                         "recording (repeatable)")


#: this module's commands, in ``uffdpy --help`` order
COMMANDS: Tuple[Command, ...] = (
    Command("inspect", _inspect_arguments, cmd_inspect, dict(
        help="show RAMBlocks and device sections, ELF segments and notes, or a working set")),
)
