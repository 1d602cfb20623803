"""1b. Where OSD's time goes: its steps timed one by one on single matrices."""

from __future__ import annotations

import argparse
import gc
import statistics
from collections.abc import Callable
from typing import Any

import torch

import osd_fl.osd as osd_module
from osd_fl import CompressionConfig, compress
from osd_fl.budget import LOWRANK_OVERHEAD
from osd_fl.selection import select
from osd_fl.svd import split_factors, truncated_svd
from simulations.bench.harness import header, load1, print_table, timed, wait_quiet
from simulations.bench.workloads import llama_update

#: Matrix shapes of the split section: MiniLM (384 x 384, 1536 x 384), BERT-base (3072 x 768), LLaMA-7B.
SPLIT_SHAPES = [(384, 384), (1536, 384), (3072, 768), (4096, 4096), (11008, 4096)]


SPLIT_SHAPES_QUICK = [(384, 384), (1536, 384), (1024, 1024)]


def _split_case(n: int, d: int, cfg: Any, device: torch.device, repeats: int) -> dict[str, float]:
    """Median ms of each step of OSD adaptive c (and of the totals) on one synthetic ``n x d`` matrix."""
    r, cmax = cfg.rank, cfg.relax
    mat, z = llama_update(n, d, 11, device, None, None)
    budget = r * (n + d) * cfg.value_bytes - LOWRANK_OVERHEAD
    gen = torch.Generator(device=device)

    def svd(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen.manual_seed(0)
        return truncated_svd(mat, k, mode=cfg.svd, oversample=cfg.oversample, niter=cfg.niter, generator=gen)

    a_max, b_max = split_factors(*svd(r + cmax), r + cmax)
    scored = osd_module.damage_scores(a_max, b_max, z, cfg.damage)
    approx: list[tuple[torch.Tensor, torch.Tensor]] = [(a_max[:, :r].contiguous(), b_max[:r])]
    for c in range(1, cmax + 1):
        k = r + c
        pos_a, pos_b = select([scored[0][:, :k], scored[1][:k]], cfg.value_bytes, budget)
        approx.append((osd_module._masked(a_max[:, :k].contiguous(), pos_a), osd_module._masked(b_max[:k], pos_b)))

    def errors(block: int) -> Callable[[], Any]:
        def run() -> Any:
            saved = osd_module.BLOCK_BYTES
            osd_module.BLOCK_BYTES = block
            try:
                return osd_module.candidate_errors(mat, z, approx, include_base=False)
            finally:
                osd_module.BLOCK_BYTES = saved

        return run

    def selections() -> None:
        for c in range(1, cmax + 1):
            select([scored[0][:, : r + c], scored[1][: r + c]], cfg.value_bytes, budget)

    steps: dict[str, Callable[[], Any]] = {
        "truncsvd": lambda: compress({"w": mat}, config=cfg, method="truncsvd"),
        "osd adaptive": lambda: compress({"w": mat}, config=cfg, importance={"w": z}),
        "osd fixed": lambda: compress({"w": mat}, config=cfg, importance={"w": z}, adaptive=False),
        "svd r": lambda: svd(r),
        "svd r+c": lambda: svd(r + cmax),
        "scores": lambda: osd_module.damage_scores(a_max, b_max, z, cfg.damage),
        "selections": selections,
        "errors": errors(osd_module.BLOCK_BYTES),
        "errors 256K": errors(1 << 18),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for fn in steps.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in steps.items():
            t, _ = timed(fn, device)
            times[name].append(t * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def section_split(args: argparse.Namespace) -> None:
    """Where OSD's time goes on one matrix: the steps of ``encode_matrix`` timed one by one."""
    header("1b. Where OSD's time goes: the steps of adaptive c on one matrix (weighted path)", args)
    cfg = CompressionConfig(rank=args.rank)
    r, cmax = cfg.rank, cfg.relax
    device = torch.device(args.device)
    print(
        f"rank r={r}, c_max={cmax}, randomized SVD (oversample {cfg.oversample}, niter {cfg.niter}) where "
        f"`auto` picks it; importance map as in the LLaMA case; median of {args.repeats} interleaved repeats, ms. "
        "`rest` = OSD adaptive total minus the timed steps (policy, records, masks, encoding)."
    )
    rows = []
    for n, d in SPLIT_SHAPES_QUICK if args.quick else SPLIT_SHAPES:
        quiet = wait_quiet(f"split {n}x{d}")
        med = _split_case(n, d, cfg, device, args.repeats)
        gc.collect()
        rest = med["osd adaptive"] - med["svd r+c"] - med["scores"] - med["selections"] - med["errors"]
        rows.append(
            [
                f"{n}x{d}",
                f"{med['truncsvd']:.1f}",
                f"{med['osd fixed']:.1f} ({med['osd fixed'] / med['truncsvd']:.2f}x)",
                f"{med['osd adaptive']:.1f} ({med['osd adaptive'] / med['truncsvd']:.2f}x)",
                f"{med['svd r']:.1f}",
                f"{med['svd r+c']:.1f}",
                f"{med['scores']:.1f}",
                f"{med['selections']:.1f}",
                f"{med['errors']:.1f}",
                f"{med['errors 256K']:.1f}",
                f"{rest:.1f}",
                quiet.split(",")[0],
            ]
        )
    block_kib = osd_module.BLOCK_BYTES // 1024
    print_table(
        [
            "matrix",
            "TruncSVD total",
            "OSD fixed c total",
            "OSD adaptive c total",
            f"SVD rank {r}",
            f"SVD rank {r + cmax}",
            "damage scores",
            f"{cmax} selections",
            f"candidate errors ({block_kib:,} KiB blocks)",
            "candidate errors (256 KiB blocks)",
            "rest",
            "load at start",
        ],
        rows,
    )
    print(f"load average (1 min) at end: {load1():.2f}")
