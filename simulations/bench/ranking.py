"""Ordering scores best first: a stable argsort against :func:`osd_fl.selection.key_order`, side by side.

:func:`osd_fl.selection.select` orders the scores it cannot settle by one
order statistic. Below :data:`osd_fl.selection.KEY_SORT_FROM` slots it takes
``np.argsort(-v, kind="stable")`` (two calls), from it one sort of 64-bit keys
(a dozen calls, but a vectorised sort). This prints the median time of both
at several sizes (interleaved repeats, one warm-up), so the threshold can be
checked on a new CPU or numpy::

    python -m simulations.bench.ranking
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

from osd_fl.selection import KEY_SORT_FROM, key_order
from simulations.bench.harness import header, print_table, wait_quiet

SIZES = [100, 400, 800, 1024, 1500, 2048, 3000, 6000, 20000, 100000]


def stable_argsort(vals: np.ndarray) -> np.ndarray:
    """What :func:`osd_fl.selection.select` runs below ``KEY_SORT_FROM`` slots."""
    return np.argsort(-vals, kind="stable")


def _median_us(fns: Sequence[Callable[[], object]], calls: int, repeats: int) -> list[float]:
    """Median microseconds per call of each function, repeats interleaved after a warm-up round."""
    times: list[list[float]] = [[] for _ in fns]
    for rep in range(repeats + 1):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            if rep:
                times[i].append((time.perf_counter() - t0) / calls * 1e6)
    return [statistics.median(t) for t in times]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    args.device, args.quick = "cpu", False
    header("Ordering scores: stable argsort against key_order (select's two ways)", args)
    wait_quiet("ranking")
    gen = np.random.default_rng(0)
    rows = []
    for size in SIZES:
        vals = gen.random(size).astype(np.float32) ** 2
        vals[::7] = vals[3]  # ties, as damage scores of equal entries have
        assert np.array_equal(key_order(vals), stable_argsort(vals))
        calls = max(10, 100_000 // size)
        fns = [functools.partial(stable_argsort, vals), functools.partial(key_order, vals)]
        arg, key = _median_us(fns, calls, args.repeats)
        picked = "argsort" if size < KEY_SORT_FROM else "key_order"
        rows.append([str(size), f"{arg:.1f}", f"{key:.1f}", f"{key / arg:.2f}", picked])
    print_table(["slots", "argsort stable us", "key_order us", "key / argsort", "select takes"], rows)


if __name__ == "__main__":
    main()
