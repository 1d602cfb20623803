"""Products with a thin matrix: the plain layout against :mod:`osd_fl.thin`'s, side by side.

Every randomized SVD, power step and candidate error multiplies a large
``n x d`` matrix by one of a few columns. This prints, for the shapes of
MiniLM, BERT-base and LLaMA-7B and every width from 1 to 24, the median time
of ``M @ X`` against ``(X.T @ M.T).T`` and of ``M.T @ Q`` against
``(Q.T @ M).T`` (interleaved repeats, each thread count in turn)::

    python -m simulations.bench.thin                    # 1 and 2 threads
    python -m simulations.bench.thin --threads 2 --quick
    python -m simulations.bench.thin --rows --threads 2 --widths 2,4,8,10

``--rows`` times instead ``M @ B.T`` for a row-major thin ``B`` (``w x d``,
a factor of ``A B``; the candidate errors' product): :func:`osd_fl.thin.times_thin`
on the transposed view (what the engine called until 2026-12-07) against
the plain NT product :func:`osd_fl.thin.times_rows_t`, LLaMA's 11008 x 4096 included.

Use it to check the layout :mod:`osd_fl.thin` picks (last column) on a new CPU or BLAS.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

from osd_fl.thin import plain_is_fast, thin_first, thin_first_t, times_rows_t, times_thin
from simulations.bench.harness import header, print_table, wait_quiet
from simulations.devices import seeded, torch_threads

SHAPES = [(384, 384), (1536, 384), (3072, 768), (4096, 4096)]
SHAPES_QUICK = [(384, 384), (1536, 384)]


def _median_ms(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median ms of each function, repeats interleaved after one warm-up round."""
    times: list[list[float]] = [[] for _ in fns]
    for rep in range(repeats + 1):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            if rep:
                times[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def compare(n: int, d: int, widths: list[int], repeats: int) -> list[list[str]]:
    """One row per width: the four medians, the two ratios plain / thin-first, and the form osd_fl.thin picks."""
    with seeded(0):
        m = torch.randn(n, d)
        rows = []
        for w in widths:
            x, q = torch.randn(d, w), torch.randn(n, w)
            plain_r, thin_r, plain_t, thin_t = _median_ms(
                [
                    functools.partial(torch.matmul, m, x),
                    functools.partial(thin_first, m, x),
                    functools.partial(torch.matmul, m.T, q),
                    functools.partial(thin_first_t, m, q),
                ],
                repeats,
            )
            rows.append(
                [
                    f"{n}x{d}",
                    str(w),
                    f"{plain_r:.3f}",
                    f"{thin_r:.3f}",
                    f"{plain_r / thin_r:.2f}",
                    f"{plain_t:.3f}",
                    f"{thin_t:.3f}",
                    f"{plain_t / thin_t:.2f}",
                    "plain" if plain_is_fast(w) else "thin first",
                ]
            )
    return rows


def compare_rows(n: int, d: int, widths: list[int], repeats: int) -> list[list[str]]:
    """One row per width: ``times_thin(M, B.T)`` against ``times_rows_t(M, B)`` for a row-major ``B``."""
    with seeded(0):
        m = torch.randn(n, d)
        rows = []
        for w in widths:
            b = torch.randn(w, d)
            old, new = _median_ms(
                [functools.partial(times_thin, m, b.T), functools.partial(times_rows_t, m, b)], repeats
            )
            rows.append([f"{n}x{d}", str(w), f"{old:.3f}", f"{new:.3f}", f"{old / new:.2f}"])
    return rows


def main(argv: list[str] | None = None) -> None:
    """Print the comparison for each thread count."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--widths", default="1-24", help="'a-b' or comma-separated column counts")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="the two MiniLM shapes only")
    parser.add_argument("--rows", action="store_true", help="M @ B.T for a row-major B (see above)")
    args = parser.parse_args(argv)
    args.device = "cpu"
    if "-" in args.widths:
        lo, hi = (int(v) for v in args.widths.split("-"))
        widths = list(range(lo, hi + 1))
    else:
        widths = [int(v) for v in args.widths.split(",")]
    header("Products with a thin matrix: plain layout against osd_fl.thin", args)
    for threads in (int(t) for t in args.threads.split(",")):
        with torch_threads(threads):
            shapes = SHAPES_QUICK if args.quick else SHAPES + ([(11008, 4096)] if args.rows else [])
            for n, d in shapes:
                quiet = wait_quiet(f"{n}x{d}, {threads} threads")
                print(f"\n{n}x{d}, {threads} thread(s); {quiet}; median ms of {args.repeats} interleaved repeats")
                if args.rows:
                    heads = ["matrix", "rows of B", "times_thin(M, B^T)", "times_rows_t(M, B)", "ratio"]
                    print_table(heads, compare_rows(n, d, widths, args.repeats))
                    continue
                print_table(
                    [
                        "matrix",
                        "width",
                        "M @ X",
                        "(X^T M^T)^T",
                        "ratio",
                        "M^T @ Q",
                        "(Q^T M)^T",
                        "ratio",
                        "osd_fl.thin uses",
                    ],
                    compare(n, d, widths, args.repeats),
                )


if __name__ == "__main__":
    main()
