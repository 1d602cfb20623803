"""1b. Where OSD's time goes: the phases of the real ``encode_matrix`` on single matrices.

Each case times :func:`osd_fl.compress` of one matrix as a whole and, in the
same call, the phases the library marks (:mod:`osd_fl.timing`: ``svd``,
``scores``, ``select``, ``candidates``, ``record``), so what is timed is the
code users run, not a re-implementation of its steps.
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import statistics
from typing import Any

import torch

from osd_fl import CompressionConfig, compress, resolve_config, timing
from osd_fl.selection import affordable_prefix, rank_prefix
from osd_fl.sizes import factor_room, matrix_budget
from osd_fl.thin import times_rows_t
from simulations.bench.harness import header, load1, print_table, timed, wait_quiet
from simulations.bench.workloads import llama_update

#: Matrix shapes of the split section: MiniLM (384 x 384, 1536 x 384), BERT-base (3072 x 768), LLaMA-7B.
SPLIT_SHAPES = [(384, 384), (1536, 384), (3072, 768), (4096, 4096), (11008, 4096)]
SPLIT_SHAPES_QUICK = [(384, 384), (1536, 384), (1024, 1024)]
#: The library's phases, in the order they run.
PHASES = ("svd", "scores", "select", "candidates", "record")


def _bare_work(mat: torch.Tensor, cfg: CompressionConfig) -> dict[str, Any]:
    """The operations adaptive c cannot avoid, alone, on fresh scores: ranking the scores, one ``M B^T``.

    ``bare topk``: a sorted ``torch.topk`` of as many of the ``(n + d)(r + relax)``
    scores as the budget's values allow (what :func:`osd_fl.selection.select`
    ranked until 2026-12-04); ``bare rank``: what it ranks with now
    (:func:`osd_fl.selection.rank_prefix`: one partition, a sort of the ranks past
    the prefix every coding affords); ``bare M B^T``: ``M`` times the
    ``r + relax`` rows of the one candidate the default compares through ``M``,
    via :func:`osd_fl.thin.times_rows_t` (the engine's product since 2026-12-07). Each call gets other scores (a pool of
    8): sorting the same scores again runs several times faster (branch
    prediction), which the library never sees.
    """
    n, d = mat.shape
    cfg = resolve_config(cfg)
    k = cfg.rank + cfg.relax
    gen = torch.Generator(device=mat.device).manual_seed(0)
    pool = [torch.rand((n + d) * k, generator=gen, device=mat.device) for _ in range(8)]
    pool_np = [p.cpu().numpy() for p in pool]
    room = factor_room(matrix_budget(n, d, cfg.rank, cfg.budget_value_dtype), 1, cfg.value_dtype)
    count = min(pool[0].numel(), room // cfg.value_bytes)
    known = affordable_prefix([n * k, k * d], cfg.value_bytes, room)
    b_rows = torch.randn(k, d, generator=gen, device=mat.device)
    turn = itertools.count()

    def topk() -> Any:
        return torch.topk(pool[next(turn) % 8], count, sorted=True)

    def rank() -> Any:
        return rank_prefix(pool_np[next(turn) % 8], count, known) if known > 0 else topk()

    return {"bare topk": topk, "bare rank": rank, "bare M B^T": functools.partial(times_rows_t, mat, b_rows)}


def split_case(n: int, d: int, cfg: CompressionConfig, device: torch.device, repeats: int) -> dict[str, float]:
    """Median ms of TruncSVD, OSD fixed c and OSD adaptive c on one ``n x d`` matrix, and of each phase.

    Keys: ``<method>`` (the whole ``compress`` call) and ``<method>:<phase>``.
    """
    mat, z = llama_update(n, d, 11, device, None, None)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    cases: dict[str, tuple[CompressionConfig, dict[str, torch.Tensor] | None]] = {
        "truncsvd": (cfg.replace(method="truncsvd"), None),
        "osd fixed": (cfg.replace(adaptive=False), {"w": z}),
        "osd adaptive": (cfg, {"w": z}),
        "osd fixed ones": (cfg.replace(adaptive=False), None),
        "osd adaptive ones": (cfg, None),
    }
    times: dict[str, list[float]] = {}
    bare = _bare_work(mat, cfg)
    for rep in range(repeats + 1):  # the first pass is a warm-up
        for label, fn in bare.items():
            seconds, _ = timed(fn, device)
            if rep:
                times.setdefault(label, []).append(seconds * 1e3)
        for label, (config, imp) in cases.items():
            run = functools.partial(compress, {"w": mat}, config=config, importance=imp)
            with timing.record(sync) as phases:
                seconds, _ = timed(run, device)
            if rep == 0:
                continue
            times.setdefault(label, []).append(seconds * 1e3)
            for name in PHASES:
                times.setdefault(f"{label}:{name}", []).append(phases.get(name, 0.0) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def split_row(n: int, d: int, med: dict[str, float], quiet: str, suffix: str = "") -> list[str]:
    """One table row: totals with their ratio to TruncSVD, then OSD adaptive c's phases.

    ``suffix``: ``""`` for the weighted path (an importance map), ``" ones"`` for ``Z = ones``.
    """
    base = med["truncsvd"]
    adaptive = med[f"osd adaptive{suffix}"]
    fixed = med[f"osd fixed{suffix}"]
    phases = [med[f"osd adaptive{suffix}:{p}"] for p in PHASES]
    return [
        f"{n}x{d}",
        f"{base:.1f}",
        f"{med['truncsvd:svd']:.1f}",
        f"{fixed:.1f} ({fixed / base:.2f}x)",
        f"{adaptive:.1f} ({adaptive / base:.2f}x)",
        *(f"{t:.1f}" for t in phases),
        f"{adaptive - sum(phases):.1f}",
        f"{med['bare topk']:.2f} / {med['bare rank']:.2f} + {med['bare M B^T']:.2f}",
        quiet.split(",")[0],
    ]


def section_split(args: argparse.Namespace) -> None:
    """Where OSD's time goes on one matrix: the phases of ``encode_matrix`` as the library marks them."""
    header("1b. Where OSD's time goes: the phases of adaptive c on one matrix (weighted path and Z = ones)", args)
    cfg = CompressionConfig(rank=args.rank)
    device = torch.device(args.device)
    print(
        f"rank r={cfg.rank}, c_max={cfg.relax}, randomized SVD (oversample {cfg.oversample}, niter {cfg.niter}) "
        f"where `auto` picks it; importance map as in the LLaMA case; median of {args.repeats} interleaved "
        "repeats, ms. Phases are the library's own (osd_fl.timing) inside one compress call; `outside` = the "
        "call's total minus its phases (routing, item set-up, encoding the payload)."
    )
    rows: list[list[Any]] = []
    ones_rows: list[list[Any]] = []
    for n, d in SPLIT_SHAPES_QUICK if args.quick else SPLIT_SHAPES:
        quiet = wait_quiet(f"split {n}x{d}")
        med = split_case(n, d, cfg, device, args.repeats)
        rows.append(split_row(n, d, med, quiet))
        ones_rows.append(split_row(n, d, med, quiet, " ones"))
        gc.collect()
    for title, table in (("with an importance map Z (the weighted path)", rows), ("Z = ones (the default)", ones_rows)):
        print(f"\nOSD {title}:")
        _print_split(table, cfg)
    print(f"load average (1 min) at end: {load1():.2f}")


def _print_split(rows: list[list[Any]], cfg: CompressionConfig) -> None:
    print_table(
        [
            "matrix",
            "TruncSVD total",
            "TruncSVD svd",
            "OSD fixed c total",
            "OSD adaptive c total",
            f"svd (rank {cfg.rank + cfg.relax})",
            "damage scores",
            f"selections ({cfg.relax})",
            "candidate errors",
            "record",
            "outside",
            "bare sorted top-k / rank + M B^T",
            "load at start",
        ],
        rows,
    )
