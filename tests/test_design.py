"""The structure docs/design.md describes, held against the code.

* the layers: ``simulations -> clients/strategies -> osd_fl``, nothing back up;
* no import circle inside the library, and every module of ``osd_fl`` imports
  on its own in a fresh interpreter (a circle shows up only in some orders);
* the method registry is full right after ``import osd_fl``;
* size limits: no source file over 600 lines, no function over 80, outside
  ``tests/`` (exceptions listed here with the reason);
* docs/design.md's table "Where each idea lives" names only paths that exist,
  and every source module appears in it.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("osd_fl", "clients", "strategies", "simulations")
#: What each package may import from the project (its own package always).
ALLOWED = {
    "osd_fl": set(),
    "clients": {"osd_fl"},
    "strategies": {"osd_fl"},
    "simulations": {"osd_fl", "clients", "strategies"},
}
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
#: ``path:function`` -> why it may be longer (keep this empty unless a split would hide the logic).
LONG_FUNCTIONS: dict[str, str] = {}
LONG_FILES: dict[str, str] = {}


def source_files() -> Iterator[Path]:
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every project module ``path`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            found.add(mod)
            # ``from osd_fl import methods`` imports a submodule, not only a name.
            found.update(f"{mod}.{alias.name}" for alias in node.names)
    modules = {module_name(p) for p in source_files()}
    return {m for m in found if m in modules and m != this}


def test_layers_point_one_way() -> None:
    wrong = []
    for path in source_files():
        top = module_name(path).split(".")[0]
        for mod in imported_modules(path):
            other = mod.split(".")[0]
            if other != top and other not in ALLOWED[top]:
                wrong.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circle(package: str) -> None:
    """A package's ``__init__`` re-exporting its modules is not a circle; anything else is."""
    graph: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        name = module_name(path)
        # A submodule importing its package's __init__ (to reach a sibling) is left out only
        # when it names a sibling module directly; a bare "from pkg import x" counts as an edge.
        graph[name] = {m for m in imported_modules(path) if m.split(".")[0] == package}
    packages = {module_name(p) for p in (ROOT / package).rglob("__init__.py")}
    for init in packages:
        # The package's own __init__ importing its children is the usual re-export, not a circle.
        graph[init] = {m for m in graph[init] if not m.startswith(init + ".")}
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph) or [])}"


def _fresh_import(module: str) -> tuple[str, int, str]:
    proc = subprocess.run(
        [sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    return module, proc.returncode, proc.stderr[-2000:]


def test_every_library_module_imports_alone() -> None:
    modules = sorted(module_name(p) for p in (ROOT / "osd_fl").rglob("*.py"))
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(_fresh_import, modules))
    failed = [f"{m}: rc {rc}\n{err}" for m, rc, err in results if rc]
    assert not failed, "\n".join(failed)


def test_registry_full_on_import() -> None:
    code = "import osd_fl; print(' '.join(sorted(osd_fl.REGISTRY)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    names = set(proc.stdout.split())
    assert {"osd", "truncsvd", "magtruncsvd", "topk", "powersgd", "int8", "dense", "fp16"} <= names


def _functions(tree: ast.AST) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                yield prefix + child.name, child
                yield from walk(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, prefix + child.name + ".")

    yield from walk(tree, "")


def function_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function from its ``def`` to its end, its docstring (a tuning guide is welcome) left out."""
    lines = (fn.end_lineno or fn.lineno) - fn.lineno + 1
    first = fn.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= (first.end_lineno or first.lineno) - first.lineno + 1
    return lines


def test_file_and_function_sizes() -> None:
    long_files, long_functions = [], []
    for path in source_files():
        rel = str(path.relative_to(ROOT))
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_FILE_LINES and rel not in LONG_FILES:
            long_files.append(f"{rel}: {lines} lines")
        for name, fn in _functions(ast.parse(text)):
            body = function_lines(fn)
            key = f"{rel}:{name}"
            if body > MAX_FUNCTION_LINES and key not in LONG_FUNCTIONS:
                long_functions.append(f"{key}: {body} lines")
    assert not long_files and not long_functions, "\n".join(long_files + long_functions)


def test_size_checker_measures_functions() -> None:
    doc = '        """Doc.\n\n        More."""\n'
    src = "def f():\n" + "    x = 1\n" * 90 + "class C:\n    def g(self):\n" + doc + "        return 1\n"
    sizes = {name: function_lines(fn) for name, fn in _functions(ast.parse(src))}
    assert sizes == {"f": 91, "C.g": 2}


def design_table() -> list[tuple[str, list[str]]]:
    """Rows of docs/design.md's "Where each idea lives": (idea, paths named in its home column)."""
    text = (ROOT / "docs" / "design.md").read_text()
    match = re.search(r"^## Where each idea lives\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "docs/design.md has no section '## Where each idea lives'"
    rows = []
    for line in match.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or set(cells[0]) <= {"-", " "} or cells[0] == "idea":
            continue
        # paths with a folder: `osd_fl/sizes.py`, `simulations/bench/` (bare names such as `perf.py` are prose)
        rows.append((cells[0], re.findall(r"`(\w+/[\w/.]*)`", cells[1])))
    return rows


def test_design_table_names_real_homes() -> None:
    rows = design_table()
    ideas = {idea for idea, _ in rows}
    for needed in (
        "budget and sizes",
        "dtypes",
        "wire format",
        "positions coding",
        "method capabilities",
        "settings parsing",
        "record keys",
        "reply validation",
        "aggregation",
        "metering",
        "tasks",
        "benchmarks",
    ):
        assert needed in ideas, f"docs/design.md's table has no row {needed!r}"
    for idea, paths in rows:
        assert paths, f"row {idea!r} names no file"
        for p in paths:
            assert (ROOT / p).exists(), f"row {idea!r} names {p}, which does not exist"


def test_design_module_list_is_complete() -> None:
    """Every source module is named somewhere in docs/design.md (its module table or the idea table)."""
    text = (ROOT / "docs" / "design.md").read_text()
    missing = []
    for path in source_files():
        rel = path.relative_to(ROOT)
        if path.name == "__init__.py" or path.name == "__main__.py":
            continue
        if f"`{rel}`" not in text and f"`{rel.parent}/`" not in text:
            missing.append(str(rel))
    assert not missing, "modules docs/design.md does not name:\n" + "\n".join(missing)
