"""A destination QEMU that uffdpy starts itself (the ``--`` form of ``uffdpy resume``)."""
from __future__ import annotations

from typing import Sequence

from ..qemu import Qemu, QemuError
from .destination import DestinationError

__all__ = ["QemuProcess"]


class QemuProcess(Qemu):
    """A destination QEMU that uffdpy starts: ``argv -incoming defer`` and a private QMP socket.

    It runs in its own session with its output in ``log_path``, so it
    outlives uffdpy; :meth:`kill` ends exactly this process group.
    Raises: DestinationError when QEMU cannot start.
    """

    def __init__(self, argv: Sequence[str], *, paused: bool, timeout: float = 30.0) -> None:
        try:
            super().__init__(argv, incoming="defer", paused=paused, timeout=timeout)
        except QemuError as e:
            raise DestinationError(e.message, e.reason) from None
