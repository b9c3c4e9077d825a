"""``uffdpy plot RUN.json -o run.png``: a load drawn over time.

The input is what ``uffdpy resume --json --trace`` prints: the stats and a
per-page trace (seconds since the connect, block, 4 KiB page, why it was
sent: ``request``, ``around``, ``ws`` or ``stream``).  The picture puts
guest memory (each block stacked, in MiB) against time, each page a dot
coloured by who brought it, with the moment the guest started running and,
when the run recorded one, the moment it answered a request.

matplotlib is an optional extra (``pip install 'uffdpy[plot]'``); without it
:func:`plot_run` raises :class:`PlotUnavailable` saying how to install it.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from ..errors import UffdpyError
from ..files import replacing
from ..pagesource import PathLike

__all__ = ["plot_run", "PlotUnavailable", "load_run"]

COLOURS = {"request": "#d62728", "around": "#ff7f0e", "ws": "#2ca02c", "stream": "#1f77b4"}
LABELS = {"request": "requested by the guest", "around": "sent around a request",
          "ws": "working set", "stream": "background stream"}


class PlotUnavailable(UffdpyError, RuntimeError):
    """matplotlib is not installed."""


def load_run(path: PathLike) -> Dict[str, Any]:
    """Read a run's JSON. Raises: ValueError (one line) if it has no trace."""
    name = os.fspath(path)
    try:
        with open(name) as f:
            run = json.load(f)
    except ValueError as e:
        raise ValueError(f"{name}: not JSON ({str(e).splitlines()[0]})") from None
    trace = run.get("trace") if isinstance(run, dict) else None
    if not isinstance(trace, dict) or not isinstance(trace.get("rows"), list):
        raise ValueError(f"{name}: no per-page trace (make it with uffdpy resume --json --trace)")
    return run


def plot_run(run: Dict[str, Any], output: PathLike, *, width_px: int = 1200,
             height_px: int = 700, title: Optional[str] = None) -> None:
    """Draw ``run`` (see :func:`load_run`) into the PNG ``output``, ``width_px`` by ``height_px``.

    Written to a temporary name and renamed, so a failure leaves no file.
    Raises: PlotUnavailable without matplotlib; ValueError for a bad run.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("uffdpy plot needs matplotlib: pip install 'uffdpy[plot]' "
                              "(or pip install matplotlib)") from None
    rows: List[List[Any]] = run["trace"]["rows"]
    blocks: Dict[str, int] = {}
    base = 0
    for name, length in run["trace"].get("blocks", []):
        blocks[name] = base
        base += length
    xs: Dict[str, List[float]] = {k: [] for k in COLOURS}
    ys: Dict[str, List[float]] = {k: [] for k in COLOURS}
    for t, block, page, why in rows:
        if block not in blocks:
            blocks[block] = base
        kind = why if why in COLOURS else "stream"
        xs[kind].append(float(t) * 1e3)
        ys[kind].append((blocks[block] + int(page) * 4096) / (1 << 20))
    dpi = 100
    fig, ax = plt.subplots(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    try:
        for kind in ("stream", "ws", "around", "request"):
            if xs[kind]:
                ax.scatter(xs[kind], ys[kind], s=2 if kind == "stream" else 5, marker=".",
                           color=COLOURS[kind], label=f"{LABELS[kind]} ({len(xs[kind])})",
                           linewidths=0)
        stats = run.get("stats", run)
        marks = [("guest running", stats.get("time_to_running_s"), "black"),
                 ("guest answered", run.get("answer_s"), "purple")]
        for label, t, colour in marks:
            if t is not None:
                ax.axvline(float(t) * 1e3, color=colour, linestyle="--", linewidth=1,
                           label=f"{label} ({float(t) * 1e3:.1f} ms)")
        for name, start in blocks.items():
            ax.axhline(start / (1 << 20), color="#cccccc", linewidth=0.5)
        ax.set_xlabel("time since the connect (ms)")
        ax.set_ylabel("guest memory, blocks stacked (MiB)")
        ax.set_title(title or "uffdpy resume: who brought each page, and when")
        ax.legend(loc="upper right", fontsize=8, markerscale=4)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        fig.tight_layout()
        with replacing(os.fspath(output), mode=0o644) as fd, \
                os.fdopen(fd, "wb", closefd=False) as f:
            fig.savefig(f, dpi=dpi, format="png")
    finally:
        plt.close(fig)
