"""Products with a thin matrix: the plain layout against :mod:`osd_fl.thin`'s, side by side.

Every randomized SVD, power step and candidate error multiplies a large
``n x d`` matrix by one of a few columns. This prints, for the shapes of
MiniLM, BERT-base and LLaMA-7B and every width from 1 to 24, the median time
of ``M @ X`` against ``(X.T @ M.T).T`` and of ``M.T @ Q`` against
``(Q.T @ M).T`` (interleaved repeats, each thread count in turn)::

    python -m simulations.bench.thin                    # 1 and 2 threads
    python -m simulations.bench.thin --threads 2 --quick

Use it to check the layout :mod:`osd_fl.thin` picks (last column) on a new CPU or BLAS.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

from osd_fl.thin import plain_is_fast, thin_first, thin_first_t
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


def main(argv: list[str] | None = None) -> None:
    """Print the comparison for each thread count."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--widths", default="1-24", help="'a-b' or comma-separated column counts")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="the two MiniLM shapes only")
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
            for n, d in SHAPES_QUICK if args.quick else SHAPES:
                quiet = wait_quiet(f"{n}x{d}, {threads} threads")
                print(f"\n{n}x{d}, {threads} thread(s); {quiet}; median ms of {args.repeats} interleaved repeats")
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
