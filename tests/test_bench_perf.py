"""The performance benchmark's measuring code (issue 6): its byte accounting, and a smoke run of its CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from osd_fl import compress
from simulations.bench.codec import codec_stats
from simulations.bench.workloads import model_shapes, synthetic_importance, synthetic_update


@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("adaptive", [True, False])
def test_osd_bytes_are_below_the_papers_formula_and_above_the_entropy_bound(rank: int, adaptive: bool) -> None:
    """Issue 6's codec target (ours <= 0.85 x the paper's mu for the same kept entries), on a 2-layer MiniLM."""
    shapes = model_shapes("minilm", quick=True)
    update = synthetic_update(shapes, seed=0)
    imp = synthetic_importance(shapes, 0)
    blob = compress(update, method="osd", rank=rank, adaptive=adaptive, importance=imp, value_dtype="float32")
    st = codec_stats(blob, 32, {k: (s, torch.float32) for k, s in shapes.items()})
    assert st["kept"] > 0 and st["sparse"] > 0
    assert st["bound"] <= st["ours"] <= 0.85 * st["paper"], st


@pytest.mark.slow
def test_bench_perf_quick_runs_every_section() -> None:
    """`python -m simulations.bench.perf --section all --quick` prints every section (no waiting for quiet)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulations.bench.perf",
            "--section",
            "all",
            "--quick",
            "--repeats",
            "1",
            "--max-load",
            "1000",
            "--max-busy",
            "1.0",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for title in (
        "1. Client compression cost",
        "2. Server aggregation",
        "3. Codec",
        "LLaMA-7B-shaped",
        "x TruncSVD",
        "peak / model",
        "Per reply: decode, conformance",
        "framing share",
    ):
        assert title in out, f"missing {title!r} in the output:\n{out[-3000:]}"


def test_benchmarks_use_no_library_privates() -> None:
    """Benchmarks call the library as users do (issue 13): no ``_name`` from osd_fl, no monkeypatching it."""
    import ast
    from pathlib import Path

    offenders = []
    for path in sorted(Path(__file__).resolve().parent.parent.joinpath("simulations", "bench").glob("*.py")):
        tree = ast.parse(path.read_text())
        aliases = {"osd_fl"}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("osd_fl"):
                offenders += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
                aliases.update(a.asname or a.name for a in node.names)
            elif isinstance(node, ast.Import):
                aliases.update(a.asname or a.name for a in node.names if a.name.startswith("osd_fl"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in aliases:
                    offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, offenders
