"""Resume a mapped-ram snapshot into an unmodified QEMU 10, two ways.

* :class:`Resume` (:mod:`.postcopy`): uffdpy plays the source of a postcopy
  migration.  The guest runs a few milliseconds after the connect and its
  RAM streams in behind it; afterwards the VM owns a private copy of all its
  RAM and no longer depends on the file.  The way for a snapshot on another
  host, or a VM that must outlive its file.  The command runs it through
  :mod:`.supervise` (the stream in a child, the QMP session kept, recovery
  when the stream's process dies).
* :class:`MapResume` (:mod:`.mapped`): QEMU maps the snapshot file itself as
  guest RAM, private (copy-on-write); uffdpy sends a precopy stream with the
  device state and the pages of the few blocks that cannot be mapped.  The
  guest runs at full speed at once, and clones of one snapshot share every
  page none of them wrote.  The way for a local file and many clones; the
  file must stay unchanged for as long as any clone runs.

:mod:`.destination` holds what both share: addresses, the QMP side of a
destination and the errors; :mod:`.process` a QEMU of our own.  Names are
imported on first use, so a command pays only for the way it takes.
"""
from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "Resume": "postcopy", "ResumeStats": "postcopy",
    "MapResume": "mapped", "MapStats": "mapped",
    "ResumeError": "destination", "DestinationError": "destination",
    "QemuDestination": "destination", "parse_address": "destination",
    "QemuProcess": "process",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
