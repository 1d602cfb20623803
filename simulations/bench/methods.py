"""Compression cost per method on a MiniLM-shaped update and on one 4096x4096 matrix.

Prints, per method: payload bytes, compress and decompress time (median of
``--repeats``), relative error, and each method's compress time as a ratio
of TruncSVD's measured in the same run. Also compares OSD's two damage
scores (l1, l2) on the same updates, which is how the default was chosen.

    python -m simulations.bench.methods            # full (about a minute on 2 CPU cores)
    python -m simulations.bench.methods --quick    # smaller shapes, seconds
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from osd_fl import compress, decompress
from simulations.bench.workloads import minilm_shapes, synthetic_update

METHODS = ["truncsvd", "osd", "osd-fixed-c", "magtruncsvd", "topk", "powersgd", "int8", "fp16", "dense"]


T = TypeVar("T")


def _time(fn: Callable[[], T], repeats: int) -> tuple[float, T]:
    times: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _options(method: str) -> dict[str, Any]:
    if method == "osd-fixed-c":
        return {"method": "osd", "adaptive": False}
    return {"method": method}


def bench(title: str, update: dict[str, torch.Tensor], rank: int, repeats: int) -> None:
    dense_norm = sum(float(v.square().sum()) for v in update.values()) ** 0.5
    print(f"\n## {title}: {len(update)} tensors, rank r={rank}, median of {repeats}")
    print(f"{'method':<13}{'bytes':>11}{'compress ms':>13}{'decompress ms':>15}{'rel. error':>12}{'x TruncSVD':>12}")
    base = None
    compress(update, rank=rank)  # warm-up (first LAPACK/allocator calls)
    for method in METHODS:
        opts = _options(method)
        t_c, blob = _time(functools.partial(compress, update, rank=rank, **opts), repeats)
        t_d, out = _time(functools.partial(decompress, blob), repeats)
        err = sum(float((out[k].float() - v).square().sum()) for k, v in update.items()) ** 0.5 / dense_norm
        base = t_c if method == "truncsvd" else base
        ratio = t_c / base if base else float("nan")
        print(f"{method:<13}{len(blob):>11,}{t_c * 1e3:>13.1f}{t_d * 1e3:>15.1f}{err:>12.4f}{ratio:>12.2f}")


def compare_damage(update: dict[str, torch.Tensor], ranks: list[int]) -> None:
    """Relative error of OSD with the l1 and l2 damage scores, fixed and adaptive c."""
    norm = sum(float(v.square().sum()) for v in update.values()) ** 0.5
    print("\n## OSD damage score (rel. error, same bytes)")
    print(f"{'rank':<6}{'l1 fixed c':>12}{'l2 fixed c':>12}{'l1 adaptive':>13}{'l2 adaptive':>13}{'truncsvd':>10}")
    for r in ranks:
        row = []
        for adaptive in (False, True):
            for damage in ("l1", "l2"):
                out = decompress(compress(update, rank=r, damage=damage, adaptive=adaptive))
                row.append(sum(float((out[k] - v).square().sum()) for k, v in update.items()) ** 0.5 / norm)
        out = decompress(compress(update, method="truncsvd", rank=r))
        row.append(sum(float((out[k] - v).square().sum()) for k, v in update.items()) ** 0.5 / norm)
        print(f"{r:<6}" + "".join(f"{x:>12.4f} " for x in row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (a 2-layer MiniLM and 1024x1024)")
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    mini = synthetic_update(minilm_shapes(layers=2 if args.quick else 6))
    bench("MiniLM-shaped update", mini, args.rank, args.repeats)
    big = 1024 if args.quick else 4096
    one = synthetic_update({"w": (big, big)})
    bench(f"one {big}x{big} matrix", one, args.rank, args.repeats)
    compare_damage(mini, [1, 2, 4])


if __name__ == "__main__":
    main()
