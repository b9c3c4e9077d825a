"""The root of uffdpy's errors.

Every error uffdpy raises on purpose is a :class:`UffdpyError`, mixed with
the builtin it has always been (``class UffdError(UffdpyError, OSError)``,
``class ImageError(UffdpyError, ValueError)``...), so ``except OSError`` and
``except ValueError`` still work and ``except UffdpyError`` catches uffdpy's
own failures while letting a bug in uffdpy show its traceback.  This module
imports nothing.
"""
from __future__ import annotations

__all__ = ["UffdpyError"]


class UffdpyError(Exception):
    """Something uffdpy checked failed: a bad file, a refused call, a destination that said no."""
