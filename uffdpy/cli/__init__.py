"""The ``uffdpy`` command: :func:`main`.

One module a command family, each with its arguments beside the code that
reads them, and every command returns an :class:`uffdpy.outcome.Outcome`:

    app      the parser, ``main()`` and the one-line errors
    inspect  ``inspect``
    load     ``load``, ``dump``
    make     ``make``, ``convert``, ``demo``
    bench    ``bench``
    resume   ``resume``, ``qemu-args``
    ws       ``ws inspect``, ``ws merge``, ``plot``
    args     what the commands share: numeric argument types, the source's
             sniffing, progress, tables
"""
from __future__ import annotations

from .app import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
