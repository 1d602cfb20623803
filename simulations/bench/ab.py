"""Two checkouts of ``osd_fl`` side by side in one process: OSD's client time before and after a change.

This machine's speed drifts by up to 2x between runs (other tenants of the
host), so timing two checkouts in two processes one after the other cannot
resolve a change of a few percent. Here both copies of the library are
imported into one process (each keeps its own module globals) and their
``compress`` calls are interleaved with TruncSVD's (from the newer copy) on
the same synthetic update the client section uses::

    git archive <commit> | tar -x -C /tmp/before
    python -m simulations.bench.ab /tmp/before . --model minilm --repeats 20

``--weighted`` passes an importance map (``|N(0, 1)|`` per entry, seeded:
timing does not depend on its values) and ``--value-dtype float32`` pins
the paper's float32 values instead of the int8 default.

The two copies must produce the same bytes (checked first); it prints the
median seconds of each and the ratios ``before / TruncSVD``,
``after / TruncSVD`` and ``after / before``.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from simulations.bench.harness import header, wait_quiet
from simulations.bench.workloads import model_shapes, synthetic_update


def _compress_from(root: Path) -> Callable[..., bytes]:
    """``compress`` of the ``osd_fl`` package under ``root``, imported afresh."""
    for name in [k for k in sys.modules if k == "osd_fl" or k.startswith("osd_fl.")]:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module("osd_fl")
    finally:
        sys.path.pop(0)
    if not str(module.__file__).startswith(str(root)):
        raise SystemExit(f"osd_fl was imported from {module.__file__}, not from {root}")
    compress: Callable[..., bytes] = module.compress
    return compress


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path, help="root of the older checkout (holds osd_fl/)")
    ap.add_argument("after", type=Path, help="root of the newer checkout")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weighted", action="store_true", help="OSD with an importance map (the weighted path)")
    ap.add_argument("--value-dtype", default="auto", help="OSD's values: auto (int8), float32, float16, int8")
    args = ap.parse_args(argv)
    args.device, args.quick = "cpu", False
    before, after = _compress_from(args.before.resolve()), _compress_from(args.after.resolve())
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        what = f"{args.model}, values {args.value_dtype}" + (", weighted" if args.weighted else ", Z = ones")
        header(f"OSD client time, two checkouts in one process ({what})", args)
        update = synthetic_update(model_shapes(args.model, False), seed=0)
        gen = torch.Generator().manual_seed(1)
        imp = {k: torch.randn(v.shape, generator=gen).abs() for k, v in update.items()} if args.weighted else None
        osd = {"importance": imp, "value_dtype": args.value_dtype}
        runs: dict[str, Callable[[], Any]] = {
            "truncsvd": lambda: after(update, rank=1, method="truncsvd"),
            "osd before": lambda: before(update, rank=1, method="osd", **osd),
            "osd after": lambda: after(update, rank=1, method="osd", **osd),
        }
        if runs["osd before"]() != runs["osd after"]():
            raise SystemExit("the two checkouts send different bytes: this compares speed of the same output only")
        wait_quiet("ab")
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for label, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(" ".join(f"{k} {v:.4f} s;" for k, v in med.items()), f"(medians of {args.repeats}, interleaved)")
    print(
        f"before / TruncSVD {med['osd before'] / med['truncsvd']:.3f}, after / TruncSVD "
        f"{med['osd after'] / med['truncsvd']:.3f}, after / before {med['osd after'] / med['osd before']:.3f}"
    )


if __name__ == "__main__":
    main()
