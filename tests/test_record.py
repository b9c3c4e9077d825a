"""Records (uffdpy.record): what the stream's options and stats rely on, and the
resume command's way to its connect kept free of what made it slow."""
from __future__ import annotations

import copy
import pickle
import subprocess
import sys
from pathlib import Path
from typing import ClassVar, Dict, List, Optional

import pytest

from uffdpy.record import FrozenRecordError, Record
from uffdpy.resume.options import ResumeOptions
from uffdpy.resume.stats import ResumeStats

ROOT = Path(__file__).resolve().parent.parent


class Point(Record, frozen=True):
    x: int
    y: int = 0
    label: Optional[str] = None
    scale: ClassVar[int] = 10           # not a field
    _cache: Dict[str, int] = {}          # not a field

    def _check(self) -> None:
        if self.x < 0:
            raise ValueError(f"x must be >= 0, not {self.x}")


class Counts(Record):
    n: int = 0
    seen: List[int] = []
    by: Dict[str, int] = {}


class Point3(Point, frozen=True):
    z: int = 0


def test_fields_defaults_positions_and_names() -> None:
    assert Point._fields == ("x", "y", "label")
    assert Point(1) == Point(x=1, y=0, label=None)
    assert Point(1, 2, "a") == Point(label="a", y=2, x=1)
    assert repr(Point(1, label="a")) == "Point(x=1, y=0, label='a')"
    assert Point3._fields == ("x", "y", "label", "z")
    assert Point3(1, z=4).z == 4 and Point3(1) != Point(1)       # another class
    for bad, why in (((), "missing the field 'x'"), ((1, 2, "a", 4), "takes 3 fields"),
                     ((1,), "unexpected keyword argument 'w'")):
        with pytest.raises(TypeError, match=why):
            Point(*bad, **({"w": 1} if why.startswith("unexpected") else {}))
    with pytest.raises(TypeError, match="two values for 'x'"):
        Point(1, x=2)


def test_a_field_without_default_after_one_with_is_refused() -> None:
    with pytest.raises(TypeError, match="'b' without a default follows"):
        class Bad(Record):
            a: int = 0
            b: int


def test_check_runs_when_made_and_when_replaced() -> None:
    with pytest.raises(ValueError, match="x must be >= 0, not -1"):
        Point(-1)
    p = Point(1)
    with pytest.raises(ValueError, match="not -2"):
        p.replace(x=-2)
    with pytest.raises(TypeError, match="no field 'w'"):
        p.replace(w=3)
    assert p.replace(y=5) == Point(1, 5) and p == Point(1)        # the original unchanged
    if sys.version_info >= (3, 13):
        assert copy.replace(p, y=6) == Point(1, 6)               # type: ignore[attr-defined]


def test_frozen_refuses_assignment_and_hashes() -> None:
    p = Point(1, 2)
    with pytest.raises(FrozenRecordError, match="field 'x' of a frozen Point"):
        p.x = 3                                                   # type: ignore[misc]
    with pytest.raises(AttributeError):                           # as dataclasses do
        del p.y                                                   # type: ignore[misc]
    assert hash(p) == hash(Point(1, 2)) and len({p, Point(1, 2), Point(2)}) == 2

    class Keyed(Record):
        name: str = ""

        def __hash__(self) -> int:                  # its own, kept
            return len(self.name)
    assert hash(Keyed("abc")) == 3
    assert copy.deepcopy(p) == p and copy.copy(Keyed("x")) == Keyed("x")
    assert pickle.loads(pickle.dumps(p)) == p
    assert Point(1) != (1, 0, None) and Point(1) != "Point(x=1)"


def test_mutable_record_assigns_copies_defaults_and_is_not_hashable() -> None:
    a, b = Counts(), Counts()
    a.n += 1
    a.seen.append(7)
    a.by["x"] = 1
    assert (b.seen, b.by, Counts._defaults["seen"]) == ([], {}, [])
    with pytest.raises(TypeError, match="unhashable"):
        hash(a)
    d = a.as_dict()
    assert d == {"n": 1, "seen": [7], "by": {"x": 1}}
    d["seen"].append(8)
    assert a.seen == [7]                                          # as_dict copies


def test_stream_options_and_stats_are_records() -> None:
    opts = ResumeOptions(batch_pages=7)
    assert opts.replace(timeout=5.0) == ResumeOptions(batch_pages=7, timeout=5.0)
    with pytest.raises(ValueError, match="timeout must be > 0"):
        opts.replace(timeout=0)
    with pytest.raises(FrozenRecordError):
        opts.timeout = 1.0                                        # type: ignore[misc]
    recovery = opts.for_recovery()
    assert recovery.recover and recovery.batch_pages == 7
    s1, s2 = ResumeStats(), ResumeStats()
    s1.request_service_us["p50"] = 12.0
    assert s2.request_service_us["p50"] is None                  # each its own summary
    assert s1.as_dict()["request_service_us"]["p50"] == 12.0


def test_the_resume_commands_way_imports_no_dataclasses_shutil_or_asyncio() -> None:
    """What the command imports up to its connect (the parser built, the supervisor
    and the server's engine): dataclasses with inspect cost it 16 ms, shutil (argparse
    finding the terminal's width for each argument) with bz2 and lzma some more."""
    code = ("import sys\n"
            "before = set(sys.modules)\n"      # what the interpreter's site brought
            "from uffdpy.cli.app import build_parser\n"
            "build_parser('resume').parse_args(['resume', 's.img', '--qmp', 'q'])\n"
            "import uffdpy.resume.supervise, uffdpy.resume.postcopy, uffdpy.resume.sender\n"
            "print(' '.join(sorted(m for m in ('dataclasses', 'inspect', 'shutil', 'asyncio',"
            " 'tabulate', 'uffdpy.cli.ws') if m in set(sys.modules) - before)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
