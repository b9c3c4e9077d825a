"""Sizes as people write them: ``4096``, ``0x1000``, ``64M``, ``1G``, ``2 GiB``, ``1T``.

The one parser behind every size uffdpy reads: the command line's options
(``--size``, ``--offset``, ``--ram-size``, ``-m``), ``$UFFDPY_MAX_MEMORY`` and
QEMU's own ``-m`` values.  Units are binary (``K`` is 1024) and may be
spelled ``K``, ``KB`` or ``KiB`` in either case, as QEMU reads them.
"""
from __future__ import annotations

import re

__all__ = ["parse_size", "qemu_size", "round_up", "MiB"]

MiB = 1 << 20

#: a number, then a unit (K, KB or KiB; ...) or a bare B, in any case
_SIZE = re.compile(r"\s*(0x[0-9a-f]+|\d+)\s*(?:([kmgtp])(?:i?b)?|b)?\s*", re.IGNORECASE)
_SHIFT = {"k": 10, "m": 20, "g": 30, "t": 40, "p": 50}


def parse_size(text: str) -> int:
    """Bytes in ``text``; ValueError naming it if it is not a size."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 4096, 0x1000, 64M, 1G)")
    unit = m.group(2)
    return int(m.group(1), 0) << (_SHIFT[unit.lower()] if unit else 0)


def qemu_size(n: int) -> str:
    """A size as QEMU's ``-m`` reads it: ``256M``, or ``4K`` when not whole MiB."""
    return f"{n >> 20}M" if n % (1 << 20) == 0 else f"{n >> 10}K"


def round_up(value: int, align: int) -> int:
    """``value`` rounded up to a multiple of ``align``."""
    return -(-value // align) * align
