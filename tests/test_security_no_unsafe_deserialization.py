"""No pickle, ``torch.load``, ``eval``/``exec`` or pickling NumPy loads on any path that reads wire data.

The scan parses the source (``ast``), so comments and strings do not count
and ``model.eval()`` (a method) is not ``eval`` (the builtin). The wire
paths, ``osd_fl/``, ``clients/`` and ``strategies/``, may not use any of these
at all. Elsewhere in the project (task code that reads local checkpoints),
``torch.load`` is allowed only with a literal ``weights_only=True``.
Flower's own ``Array.numpy()`` (used for the global model, never for the
payload) calls ``np.load(..., allow_pickle=False)``; a test pins that too.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WIRE_PACKAGES = ("osd_fl", "clients", "strategies")
OTHER_PACKAGES = ("simulations",)

#: Modules whose import alone means unsafe deserialization is possible.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib", "jsonpickle"}
#: Builtins that evaluate code.
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__"}
#: Dotted call names that unpickle.
UNSAFE_CALLS = {"torch.load", "pickle.loads", "pickle.load", "yaml.load", "yaml.unsafe_load", "np.load", "numpy.load"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        kw.arg == name and isinstance(kw.value, ast.Constant) and kw.value.value is value for kw in call.keywords
    )


def findings(source: str, filename: str, *, wire: bool) -> list[str]:
    """Unsafe imports and calls in ``source`` (empty list: clean)."""
    out: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNSAFE_MODULES:
                    out.append(f"{filename}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            names = {a.name for a in node.names}
            if module in UNSAFE_MODULES or (module == "torch" and "load" in names):
                out.append(f"{filename}:{node.lineno}: from {node.module} import {sorted(names)}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if isinstance(node.func, ast.Name) and name in UNSAFE_BUILTINS:
                out.append(f"{filename}:{node.lineno}: {name}()")
            elif name in ("np.load", "numpy.load"):
                if not _keyword_is(node, "allow_pickle", False):
                    out.append(f"{filename}:{node.lineno}: {name}() without allow_pickle=False")
            elif name == "torch.load":
                if wire or not _keyword_is(node, "weights_only", True):
                    out.append(f"{filename}:{node.lineno}: torch.load" + ("" if wire else " without weights_only=True"))
            elif name in UNSAFE_CALLS or name.split(".")[0] in UNSAFE_MODULES:
                out.append(f"{filename}:{node.lineno}: {name}()")
    return out


def _files(packages: tuple[str, ...]) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def test_wire_paths_never_unpickle_or_evaluate() -> None:
    files = _files(WIRE_PACKAGES)
    assert len(files) >= 15  # the scan really ran over the packages
    bad = [f for path in files for f in findings(path.read_text(), str(path.relative_to(ROOT)), wire=True)]
    assert bad == []


def test_the_rest_of_the_project_loads_checkpoints_only_with_weights_only() -> None:
    bad = [
        f
        for path in _files(OTHER_PACKAGES)
        for f in findings(path.read_text(), str(path.relative_to(ROOT)), wire=False)
    ]
    assert bad == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "from pickle import loads",
        "import dill as d",
        "x = eval(data)",
        "exec(code)",
        "torch.load(buf)",
        "from torch import load",
        "np.load(f)",
        "np.load(f, allow_pickle=True)",
        "yaml.load(s)",
        "marshal.loads(b)",
        "__import__(name)",
    ],
)
def test_the_scanner_catches_each_pattern(snippet: str) -> None:
    assert findings(snippet, "x.py", wire=True)


@pytest.mark.parametrize(
    "snippet",
    ["model.eval()", "np.load(f, allow_pickle=False)", "x = 'pickle.loads'  # eval(", "evaluate(x)"],
)
def test_the_scanner_passes_safe_code(snippet: str) -> None:
    assert findings(snippet, "x.py", wire=True) == []


def test_torch_load_needs_weights_only_outside_the_wire_paths() -> None:
    assert findings("torch.load(f, weights_only=True)", "x.py", wire=False) == []
    assert findings("torch.load(f)", "x.py", wire=False)
    assert findings("torch.load(f, weights_only=True)", "x.py", wire=True)


def test_flowers_array_numpy_refuses_pickles() -> None:
    from flwr.app import Array

    assert "allow_pickle=False" in inspect.getsource(Array.numpy)
    assert "allow_pickle=True" not in inspect.getsource(Array)
