"""``python -m uffdpy``: the same as the ``uffdpy`` command."""
import sys

from .cli import main

sys.exit(main())
