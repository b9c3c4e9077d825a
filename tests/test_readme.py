"""Every ```python example of the README runs as written.

Each block runs in a fresh interpreter in a directory holding the files the
examples name: ``vm.img`` is the session's real QEMU snapshot of the
request-serving Linux guest (machine pc, RAMBlock ``pc.ram``), ``guest.elf`` a
small ELF core with a segment at guest-physical 0x100000.  The ``Resume``
example gets a real QEMU 10 destination started with ``-incoming defer``: its
QMP socket is the one substitution made in the text.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from uffdpy.harness import linuxguest
from helpers import LAZY_SERVERS

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS: List[str] = re.findall(r"^```python\n(.*?)^```$", README, flags=re.S | re.M)


def _title(block: str) -> str:
    return block.strip().splitlines()[0][:60]


def test_the_readme_has_the_examples_this_file_runs() -> None:
    assert len(BLOCKS) >= 6, [_title(b) for b in BLOCKS]


@pytest.fixture(scope="module")
def workdir(guest: Dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_elfcore import make_core, note, rnd
    d = tmp_path_factory.mktemp("readme")
    (d / "vm.img").symlink_to(guest["snapshot"])
    make_core(d / "guest.elf", [(0x100000, rnd(1 << 20, 5), 1 << 20)], paddr=True,
              notes=note(b"QEMU", 0, bytes(8)))
    return d


@pytest.fixture
def short_tmp() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="uffdpy-readme-")
    yield path
    subprocess.run(["rm", "-rf", path], check=False)


def _run(block: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", block], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240, stdin=subprocess.DEVNULL)


@pytest.mark.qemu
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[_title(b) for b in BLOCKS])
def test_readme_example_runs(index: int, workdir: Path, guest: Dict[str, Any],
                             qemu_binary: str, short_tmp: str) -> None:
    block = BLOCKS[index]
    if 'server="interpreter"' in block and "interpreter" not in LAZY_SERVERS:
        pytest.skip("server='interpreter' needs Python 3.13+ (.ci/run runs it under one)")
    destination = None
    for placeholder in ("/run/vm/qmp.sock", "/run/vm/map-qmp.sock"):
        if placeholder not in block:
            continue
        from uffdpy.mappedram import Snapshot
        from uffdpy.qemu import Qemu
        from uffdpy.resume.mapped import map_arguments
        args = linuxguest.destination_args(guest, os.path.join(short_tmp, "req.sock"))
        if placeholder == "/run/vm/map-qmp.sock":         # as `uffdpy qemu-args vm.img --map`
            with Snapshot.open(workdir / "vm.img") as snap:
                args += map_arguments(snap)
        destination = Qemu([qemu_binary, *args], incoming="defer")
        block = block.replace(placeholder, destination.qmp_paths[0])
    try:
        proc = _run(block, workdir)
    finally:
        if destination is not None:
            destination.kill()
    assert proc.returncode == 0, f"README example failed:\n{block}\n{proc.stdout}{proc.stderr}"


RECIPE = re.search(r"^## A real guest in five minutes\n.*?^```sh\n(.*?)^```$", README,
                   flags=re.S | re.M)


@pytest.mark.qemu
def test_the_recipe_runs_as_written(qemu_binary: str, guest: Dict[str, Any]) -> None:
    """The README's recipe, every line as written (its directory moved to a fresh one)."""
    assert RECIPE is not None, "the README lost its recipe"
    work = tempfile.mkdtemp(prefix="uffdpy-recipe-")
    script = RECIPE.group(1).replace("/tmp/uffdpy-demo", work)
    bindir = os.path.dirname(sys.executable)       # the uffdpy and python3 of this install
    env = dict(os.environ, PATH=f"{bindir}:{os.environ.get('PATH', '')}")
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            out, err = proc.communicate()
        for pid in re.findall(r"QEMU pid (\d+)", out):
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        subprocess.run(["rm", "-rf", work], check=False)
    assert proc.returncode == 0, f"the recipe failed:\n{out}\n{err}"
    answers = [line for line in out.splitlines() if line.startswith("OK ")]
    assert answers == [linuxguest.expected_answer(0, 0, 4)] * 4, out
    assert len(re.findall(r"QEMU pid \d+", out)) == 4


def _leaf_parsers(name: str, parser: Any) -> Iterator[Tuple[str, Any]]:
    import argparse
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield name.strip(), parser
        return
    for sub_name, sub in subs[0].choices.items():
        yield from _leaf_parsers(f"{name} {sub_name}", sub)


def test_the_command_table_names_every_option() -> None:
    """Every command and every option its parser has is in the README's command table."""
    from uffdpy.cli import build_parser
    table = README[README.index("## The `uffdpy` command"):]
    table = table[:table.index("\n## ")]
    rows = [line for line in table.splitlines() if line.startswith("| `uffdpy ")]
    missing = []
    for name, parser in _leaf_parsers("", build_parser()):
        text = " ".join(r for r in rows if r.startswith((f"| `uffdpy {name} ",
                                                         f"| `uffdpy {name}`")))
        if not text:
            missing.append(name)
        for action in parser._actions:
            opts = [o for o in action.option_strings if o not in ("-h", "--help", "--debug")]
            if opts and not any(o in text for o in opts):
                missing.append(f"{name} {opts[-1]}")
    assert not missing, missing


def test_links_lead_to_files_of_the_repository() -> None:
    """No README or docs/ link to a file the repository does not have; no private notes."""
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}"
        assert "reference/" not in text and "STYLE.md" not in text, doc.name
