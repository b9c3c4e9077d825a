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

import json
from typing import Any, Callable, Dict, Optional, Union

__all__ = ["Outcome"]


class Outcome:
    """A command's result: :attr:`text` for a person, ``data`` for ``--json``, the exit status.

    ``text`` may be given as a function of no arguments, called the first time
    the text is wanted: a command run with ``--json`` then never builds its
    table (``tabulate`` alone costs ~25 ms to import).
    """

    __slots__ = ("_text", "data", "status")

    def __init__(self, text: Union[str, Callable[[], str]],
                 data: Optional[Dict[str, Any]] = None, status: int = 0) -> None:
        self._text = text
        self.data = data
        self.status = status

    @property
    def text(self) -> str:
        if not isinstance(self._text, str):
            self._text = self._text()
        return self._text

    def render(self, as_json: bool) -> str:
        """What stdout shows: the data as indented JSON if asked for and there is any."""
        if as_json and self.data is not None:
            return json.dumps(self.data, indent=2)
        return self.text

    def __repr__(self) -> str:
        return f"Outcome(status={self.status}, data={'yes' if self.data else 'no'})"
