"""The shape of the tree, as the redesign left it: kept by tests so it stays.

* No import cycle inside ``uffdpy``, counting every import: those made inside
  functions (a deferred import still ties two modules together) and those
  under ``if TYPE_CHECKING:`` (a module that needs another's types to be
  read knows that module, and a circle of them is one tangle all the same).
* No module over 700 lines but ``uffd.py`` (its essay on the ABI).
* The library (the kernel layer, the formats, the stream and the engines)
  imports nothing from ``uffdpy.harness`` or ``uffdpy.cli``; the harness
  imports nothing from the command line.
* Tests and the package import nothing from ``scripts/``.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "uffdpy"


def _modules() -> Dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """The uffdpy modules ``name`` imports anywhere: at the top, in a function, for types."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in modules else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    # a package's own __init__ runs before its modules: importing it is no edge back
    return {m for m in found if m in modules and m != name and not name.startswith(m + ".")}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_inside_uffdpy() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph["uffdpy.cli"], "the import graph is empty: the parser above is broken"
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_module_sizes() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    too_big = {n: s for n, s in sizes.items() if s > 700 and n != "uffdpy.uffd"}
    assert too_big == {}, "split these: 700 lines at most (uffd.py, an essay on the ABI, excepted)"


def test_nothing_imports_scripts() -> None:
    scripts = {p.stem for p in (ROOT / "scripts").glob("*.py")}
    for path in list(PACKAGE.rglob("*.py")) + list((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            assert not scripts & {n.partition(".")[0] for n in names}, (
                f"{path.relative_to(ROOT)} imports from scripts/: the library is uffdpy")


def test_imports_for_types_and_in_functions_count(tmp_path: Path) -> None:
    """The parser sees an import under ``if TYPE_CHECKING:`` and one inside a function."""
    modules = {"uffdpy.a": tmp_path / "a.py", "uffdpy.b": tmp_path / "b.py",
               "uffdpy.c": tmp_path / "c.py"}
    modules["uffdpy.a"].write_text("from typing import TYPE_CHECKING\n"
                                   "if TYPE_CHECKING:\n    from .b import B\n"
                                   "def f():\n    from . import c\n")
    assert _imports("uffdpy.a", modules["uffdpy.a"], modules) == {"uffdpy.b", "uffdpy.c"}


def _harness(modules: Dict[str, Path]) -> Set[str]:
    """The harness (QEMU-made snapshots, guests and cores for tests, workloads,
    benchmarks, pictures) and the command line: what the library must not import."""
    return {n for n in modules if n.startswith(("uffdpy.harness", "uffdpy.cli"))
            or n == "uffdpy.__main__"}


def test_engines_and_formats_import_no_harness() -> None:
    """The kernel layer, the formats, the stream and the engines stand on their own."""
    modules = _modules()
    harness = _harness(modules)
    assert {"uffdpy.harness.vm", "uffdpy.harness.bench", "uffdpy.cli.app"} <= harness
    leaks = {}
    for name, path in modules.items():
        if name in harness or name == "uffdpy":             # the package's lazy re-exports
            continue
        bad = _imports(name, path, modules) & harness
        if bad:
            leaks[name] = sorted(bad)
    assert leaks == {}, leaks


def test_the_harness_imports_no_command_line() -> None:
    """The command line stands on the harness, never the other way round."""
    modules = _modules()
    cli = {n for n in modules if n.startswith("uffdpy.cli")}
    leaks = {name: sorted(_imports(name, path, modules) & cli)
             for name, path in modules.items() if name.startswith("uffdpy.harness")}
    assert {n: v for n, v in leaks.items() if v} == {}
