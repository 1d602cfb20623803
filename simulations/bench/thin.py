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

``--svd`` times the whole randomized SVD (:func:`osd_fl.svd.truncated_svd`,
rank 1 and 4: 11 and 14 sketch columns) as it is against the same call
with its two products swapped for each choice of layout (the library's own
pair among them, as a check of the run's noise): ``torch.linalg.qr``
returns ``Q`` column-major, so the power steps multiply by transposed views,
a layout the tables above do not time::

    python -m simulations.bench.thin --svd --threads 2

Use it to check the layout :mod:`osd_fl.thin` picks (last column) on a new CPU or BLAS.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import time
from collections.abc import Callable

import torch

import osd_fl.svd as svd_module
from osd_fl.svd import truncated_svd
from osd_fl.thin import plain_is_fast, t_times_thin, thin_first, thin_first_t, times_rows_t, times_thin
from simulations.bench.harness import header, print_table, wait_quiet
from simulations.devices import seeded, torch_threads

SHAPES = [(384, 384), (1536, 384), (3072, 768), (4096, 4096)]
SHAPES_QUICK = [(384, 384), (1536, 384)]
SVD_SHAPES = [(384, 384), (1536, 384), (384, 1536), (3072, 768), (768, 3072), (4096, 4096), (11008, 4096)]

Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: The forward step ``M @ X`` (``X`` = the sketch, then a column-major ``Q`` of ``M^T Q``).
FORWARD: dict[str, Product] = {
    "times_thin": times_thin,
    "plain": torch.matmul,
    "times_thin(row-major X)": lambda m, x: times_thin(m, x.contiguous()),
}
#: The backward step ``M^T @ Q`` (``Q`` column-major from the QR).
BACKWARD: dict[str, Product] = {
    "t_times_thin": t_times_thin,
    "plain": lambda m, q: m.T @ q,
    "t_times_thin(row-major Q)": lambda m, q: t_times_thin(m, q.contiguous()),
}


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


def _with_products(fwd: Product, bwd: Product, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with :mod:`osd_fl.svd`'s two products replaced by ``fwd`` and ``bwd`` (restored after)."""

    def run() -> object:
        names = ("times_thin", "t_times_thin")  # the names osd_fl.svd calls them by
        saved = [getattr(svd_module, name) for name in names]
        for name, product in zip(names, (fwd, bwd), strict=True):
            setattr(svd_module, name, product)
        try:
            return fn()
        finally:
            for name, product in zip(names, saved, strict=True):
                setattr(svd_module, name, product)

    return run


def compare_svd(n: int, d: int, repeats: int) -> list[list[str]]:
    """One row per rank and layout pair: median ms, and the ratio to osd_fl.svd.truncated_svd's own layout."""
    with seeded(0):
        m = torch.randn(n, d)
    rows = []
    for k in (1, 4):
        gen = torch.Generator().manual_seed(0)
        svd = functools.partial(truncated_svd, m, k, mode="randomized", generator=gen)
        fns: list[Callable[[], object]] = [svd]
        names = [("truncated_svd (library)", "")]
        for (fname, fwd), (bname, bwd) in itertools.product(FORWARD.items(), BACKWARD.items()):
            fns.append(_with_products(fwd, bwd, svd))
            names.append((fname, bname))
        times = _median_ms(fns, repeats)
        for (fname, bname), t in zip(names, times, strict=True):
            rows.append([f"{n}x{d}", str(k + 10), fname, bname, f"{t:.3f}", f"{times[0] / t:.2f}"])
    return rows


def main(argv: list[str] | None = None) -> None:
    """Print the comparison for each thread count."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--widths", default="1-24", help="'a-b' or comma-separated column counts")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="the two MiniLM shapes only")
    parser.add_argument("--rows", action="store_true", help="M @ B.T for a row-major B (see above)")
    parser.add_argument("--svd", action="store_true", help="the randomized SVD's product layouts (see above)")
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
            if args.svd:
                shapes = SHAPES_QUICK if args.quick else SVD_SHAPES
            for n, d in shapes:
                quiet = wait_quiet(f"{n}x{d}, {threads} threads")
                print(f"\n{n}x{d}, {threads} thread(s); {quiet}; median ms of {args.repeats} interleaved repeats")
                if args.svd:
                    heads = ["matrix", "sketch columns", "M @ X by", "M^T @ Q by", "median ms", "library / this"]
                    print_table(heads, compare_svd(n, d, args.repeats))
                    continue
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
