"""The working-set and picture commands of ``uffdpy``: ``ws inspect``, ``ws merge``, ``plot``.

Kept apart from :mod:`uffdpy.cli`, which registers them with :func:`add_parsers`.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, List

from .args import tabulate
from ..outcome import Outcome

__all__ = ["add_parsers", "inspect_file"]


def _inspect_dict(path: str, against: List[str], snapshot: str) -> Dict[str, Any]:
    from ..workingset import WorkingSet, jaccard
    ws = WorkingSet.load(path)
    if snapshot:
        from ..mappedram import Snapshot
        with Snapshot.open(snapshot) as snap:
            ws.check(snap, path)
    times = [t for _, _, t, _ in ws.pages]
    blocks: Dict[str, int] = {}
    for block, _, _, _ in ws.pages:
        blocks[block] = blocks.get(block, 0) + 1
    out: Dict[str, Any] = {
        "path": path, "pages": len(ws.pages), "bytes": len(ws.pages) * 4096,
        "data_pages": ws.data_pages, "zero_pages": len(ws.pages) - ws.data_pages,
        "pages_by_block": blocks, "snapshot_digest": ws.snapshot.get("digest"),
        "first_demand_s": min(times) if times else None,
        "last_demand_s": max(times) if times else None,
        "jaccard": {},
    }
    for other in against:
        out["jaccard"][other] = round(jaccard(ws, WorkingSet.load(other)), 4)
    if snapshot:                       # ws.check refused a recording of another snapshot
        out["belongs_to"] = snapshot
    return out


def cmd_ws_inspect(args: argparse.Namespace) -> Outcome:
    info = _inspect_dict(args.ws, args.against, args.snapshot)
    return Outcome(lambda: _text(info), info)


def inspect_file(path: str, against: List[str]) -> Outcome:
    """``uffdpy inspect FILE.ws``: the same as ``uffdpy ws inspect FILE.ws``."""
    info = _inspect_dict(path, against, "")
    return Outcome(lambda: _text(info), info)


def _text(info: Dict[str, Any]) -> str:
    """A working set's summary (``_inspect_dict``) as a table."""
    rows = [("pages", f"{info['pages']} ({info['bytes'] / (1 << 20):.1f} MiB)"),
            ("data pages", info["data_pages"]), ("zero pages", info["zero_pages"]),
            ("first / last demand",
             "-" if info["first_demand_s"] is None
             else f"{info['first_demand_s'] * 1e3:.1f} / {info['last_demand_s'] * 1e3:.1f} ms"),
            ("snapshot digest", str(info["snapshot_digest"])[:16])]
    rows += [(f"pages in {name!r}", n) for name, n in info["pages_by_block"].items()]
    rows += [(f"Jaccard with {other}", j) for other, j in info["jaccard"].items()]
    if info.get("belongs_to"):
        rows.append(("belongs to", f"{info['belongs_to']} (its blocks and digest match)"))
    return tabulate(rows, tablefmt="plain")


def cmd_ws_merge(args: argparse.Namespace) -> Outcome:
    from ..workingset import WorkingSet, merge
    merged = merge(WorkingSet.load(p) for p in args.inputs)
    merged.save(args.output)
    return Outcome(f"{args.output}: {len(merged.pages)} pages ({merged.data_pages} data) from "
                   f"{len(args.inputs)} recordings")


def cmd_plot(args: argparse.Namespace) -> Outcome:
    from ..harness.plot import load_run, plot_run
    plot_run(load_run(args.run), args.output, width_px=args.width, height_px=args.height,
             title=args.title)
    return Outcome(f"{args.output}: {args.width}x{args.height} PNG")


def _pixels(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of pixels: {text!r}") from None
    if not 100 <= value <= 10000:
        raise argparse.ArgumentTypeError(f"must be 100..10000 pixels, not {value}")
    return value


def add_parsers(sub: Any) -> None:
    """Register ``ws`` and ``plot`` on the subparsers object of the ``uffdpy`` parser."""
    ws = sub.add_parser("ws", help="working sets: inspect or merge recordings")
    wsub = ws.add_subparsers(dest="ws_command", metavar="WS_COMMAND", required=True)
    sp = wsub.add_parser("inspect", help="size, data and zero pages, overlap with others")
    sp.add_argument("ws", metavar="FILE.ws", help="a working set written by --record-ws")
    sp.add_argument("--against", action="append", default=[], metavar="OTHER.ws",
                    help="print the Jaccard index with this recording (repeatable)")
    sp.add_argument("--snapshot", default="", metavar="SNAP",
                    help="also check that the recording belongs to this snapshot")
    sp.add_argument("--json", action="store_true", help="print as JSON")
    sp.set_defaults(func=cmd_ws_inspect)
    sp = wsub.add_parser("merge", help="union of recordings, in order of first demand")
    sp.add_argument("inputs", nargs="+", metavar="IN.ws", help="recordings of one snapshot")
    sp.add_argument("-o", "--output", required=True, metavar="OUT.ws",
                    help="the merged working set to write")
    sp.set_defaults(func=cmd_ws_merge)

    sp = sub.add_parser("plot", help="draw a resume over time (needs the plot extra)",
                        description="Draw the JSON of 'uffdpy resume --json --trace' as a PNG: "
                                    "guest memory against time, each page coloured by who "
                                    "sent it. Needs matplotlib: pip install 'uffdpy[plot]'.")
    sp.add_argument("run", metavar="RUN.json", help="the output of resume --json --trace")
    sp.add_argument("-o", "--output", required=True, metavar="OUT.png",
                    help="the picture to write")
    sp.add_argument("--width", type=_pixels, default=1200, help="pixels (default 1200)")
    sp.add_argument("--height", type=_pixels, default=700, help="pixels (default 700)")
    sp.add_argument("--title", default=None, help="the picture's title")
    sp.set_defaults(func=cmd_plot)
