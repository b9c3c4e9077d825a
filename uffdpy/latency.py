"""One percentile summary for every latency uffdpy reports (faults, accesses, requests).

``percentiles(samples, unit=...)`` gives p50, p90, p99 and max in
microseconds, rounded to 0.1 µs, from samples in any unit (``unit`` is the
factor to microseconds: ``1e-3`` for nanoseconds, ``1e6`` for seconds).  No
samples, no figures: every value is None.  Kernel-free and harness-free, so
the loader, the resume and the benchmarks share it.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

__all__ = ["percentiles", "EMPTY"]

#: the summary of no samples
EMPTY: Dict[str, Optional[float]] = {"p50": None, "p90": None, "p99": None, "max": None}


def percentiles(samples: Sequence[Union[int, float]], *,
                unit: float) -> Dict[str, Optional[float]]:
    """p50/p90/p99/max of ``samples`` times ``unit``, in microseconds (None without samples)."""
    if not samples:
        return dict(EMPTY)
    xs = sorted(samples)
    n = len(xs)

    def at(q: float) -> float:
        return round(xs[min(n - 1, int(q * n))] * unit, 1)
    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": round(xs[-1] * unit, 1)}
