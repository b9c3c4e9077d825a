"""Resume a mapped-ram snapshot into an unmodified QEMU 10, two ways.

* :class:`Resume` (:mod:`.postcopy`): uffdpy plays the source of a postcopy
  migration.  The guest runs a few milliseconds after the connect and its
  RAM streams in behind it; afterwards the VM owns a private copy of all its
  RAM and no longer depends on the file.  The way for a snapshot on another
  host, or a VM that must outlive its file.
* :class:`MapResume` (:mod:`.mapped`): QEMU maps the snapshot file itself as
  guest RAM, private (copy-on-write); uffdpy sends a precopy stream with the
  device state and the pages of the few blocks that cannot be mapped.  The
  guest runs at full speed at once, and clones of one snapshot share every
  page none of them wrote.  The way for a local file and many clones; the
  file must stay unchanged for as long as any clone runs.

:mod:`.destination` holds what both share: addresses, the QMP side of a
destination, the errors, and a QEMU of our own (:class:`QemuProcess`).
"""
from .destination import (DestinationError, QemuDestination, QemuProcess, ResumeError,
                          parse_address)
from .mapped import MapResume, MapStats
from .postcopy import Resume, ResumeStats

__all__ = ["Resume", "ResumeStats", "MapResume", "MapStats", "ResumeError", "DestinationError",
           "QemuDestination", "QemuProcess", "parse_address"]
