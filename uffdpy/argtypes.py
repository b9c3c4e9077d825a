"""Argument types: text read into a checked number, or an ``argparse.ArgumentTypeError``.

One factory, :func:`bounded`, makes each (``positive_int``, ``non_negative_float``,
``page_size_multiple``...), so that every flag says what it wants the same way:
``must be at least 1, not 0``.  The options that register their own flags
(:class:`uffdpy.resume.options.ResumeOptions`) and the command line share them.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable, List, Sequence

from . import sizes

__all__ = ["parse_size", "bounded", "integer", "number", "positive_int", "non_negative_int",
           "non_negative_float", "positive_float", "hot_fraction", "fraction",
           "page_size_multiple", "chunk_size", "cpu", "ranges"]


def parse_size(text: str) -> int:
    """``256M``, ``1G``, ``4096``, ``0x1000`` -> bytes (:func:`uffdpy.sizes.parse_size`)."""
    try:
        return sizes.parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _number(kind: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def read(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if value != value:                                   # NaN: no number at all
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}")
        return value
    return read


def bounded(read: Callable[[str], Any], ok: Callable[[Any], bool],
            rule: str) -> Callable[[str], Any]:
    """An argument type: ``read`` the text, then refuse a value that is not ``ok``, saying
    ``must be RULE, not TEXT``."""
    def check(text: str) -> Any:
        value = read(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, not {text.strip()}")
        return value
    return check


integer = _number(int, "an integer")
number = _number(float, "a number")
positive_int = bounded(integer, lambda v: v >= 1, "at least 1")
non_negative_int = bounded(integer, lambda v: v >= 0, ">= 0")
non_negative_float = bounded(number, lambda v: v >= 0, ">= 0")
positive_float = bounded(number, lambda v: v > 0, "> 0")
hot_fraction = bounded(number, lambda v: 0 < v <= 1, "in (0, 1]")
fraction = bounded(number, lambda v: 0 <= v <= 1, "between 0 and 1")
page_size_multiple = bounded(parse_size, lambda v: v > 0 and v % 4096 == 0,
                             "a positive multiple of 4096")
chunk_size = bounded(parse_size, lambda v: v >= 4096, "at least 4096 (one page)")


def cpu(text: str) -> int:
    """A CPU this process may run on (``os.sched_getaffinity``)."""
    value = non_negative_int(text)
    allowed = sorted(os.sched_getaffinity(0))
    if value not in allowed:
        raise argparse.ArgumentTypeError(
            f"CPU {value} does not exist or is not available to this process "
            f"(CPUs {ranges(allowed)})")
    return value


def ranges(cpus: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5``."""
    out: List[str] = []
    for c in cpus:
        if out and c - 1 == int(out[-1].rpartition("-")[2]):
            out[-1] = f"{out[-1].partition('-')[0]}-{c}"
        else:
            out.append(str(c))
    return ",".join(out)
