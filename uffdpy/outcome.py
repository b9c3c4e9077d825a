"""What a ``uffdpy`` command found, kept apart from how it is shown.

Every command (``cli.py``, ``cli/ws.py``) computes an :class:`Outcome` and
returns it; :func:`uffdpy.cli.main` alone prints it: the data as JSON when the
command was given ``--json``, the text otherwise, and exits with its status.
A command prints nothing else on stdout but progress lines meant for a person
(``demo``'s "making a snapshot ...") and nothing on stderr but progress bars
and warnings.  So a command can be called from Python and its result read
without capturing stdout, and a new command cannot forget ``--json``.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Optional

__all__ = ["Outcome"]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A command's result: ``text`` for a person, ``data`` for ``--json``, the exit status."""

    text: str
    data: Optional[Dict[str, Any]] = None
    status: int = 0

    def render(self, as_json: bool) -> str:
        """What stdout shows: the data as indented JSON if asked for and there is any."""
        if as_json and self.data is not None:
            return json.dumps(self.data, indent=2)
        return self.text
