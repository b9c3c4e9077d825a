"""The loader's errors (a leaf: every module of the package may raise them)."""
from __future__ import annotations

from typing import Optional

from ..errors import UffdpyError

__all__ = ["LoaderError", "ServerDiedError"]


class LoaderError(UffdpyError, RuntimeError):
    """The loader stopped because a worker failed; the worker's error is ``__cause__``."""


class ServerDiedError(LoaderError):
    """The fault-server process exited before every page was placed."""

    def __init__(self, message: str, *, pid: int, status: Optional[int] = None,
                 signal_number: Optional[int] = None) -> None:
        super().__init__(message)
        self.pid = pid
        self.status = status
        self.signal_number = signal_number
