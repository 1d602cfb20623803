"""Server sums side by side: rebuilding every reply (``accumulate``) against factor space (``FactorSum``).

The same decoded OSD payloads (``distinct`` different client updates,
cycled to N clients, each with its own weight) are summed both ways in one
process, alternating (``--repeats`` times, medians), and the table gives seconds per round, the ratio, and
the largest difference relative to the sum's largest entry::

    python -m simulations.bench.aggregate                       # MiniLM shapes, r = 1, N = 10, 100, 1000
    python -m simulations.bench.aggregate --model bert-base --clients 10,100

Decoding is the same on both paths (the strategy decodes each reply once to
validate it) and is timed separately. The pending factors' memory is
computed, not measured: at most ``chunk + k`` float32 columns per matrix (as decoded).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

import torch

from osd_fl import Payload, compress, decode
from simulations.bench.workloads import minilm_shapes, synthetic_update
from simulations.devices import torch_threads
from strategies.aggregation import FACTOR_CHUNK, FactorSum, accumulate

__all__ = ["main"]

MODELS = {
    "minilm": {},
    "bert-base": {"layers": 12, "hidden": 768, "ffn": 3072},
    "bert-large": {"layers": 24, "hidden": 1024, "ffn": 4096},
}


def _payloads(shapes: dict[str, tuple[int, ...]], distinct: int, method: str, rank: int) -> tuple[list[Payload], float]:
    blobs = [compress(synthetic_update(shapes, seed=i), method=method, rank=rank, seed=i) for i in range(distinct)]
    t0 = time.perf_counter()
    limit = 2 * sum(torch.Size(s).numel() for s in shapes.values())
    payloads = [decode(b, max_elements=limit) for b in blobs]
    return payloads, (time.perf_counter() - t0) / distinct


def _rebuild(shapes: dict[str, tuple[int, ...]], payloads: list[Payload], n: int) -> dict[str, torch.Tensor]:
    acc = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
    for i in range(n):
        accumulate(acc, payloads[i % len(payloads)], float(100 + i % 7))
    return acc


def _factor(shapes: dict[str, tuple[int, ...]], payloads: list[Payload], n: int) -> dict[str, torch.Tensor]:
    acc = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
    sums = FactorSum(acc)
    for i in range(n):
        sums.add(payloads[i % len(payloads)], float(100 + i % 7))
    sums.flush()
    return acc


def main(argv: Sequence[str] | None = None) -> int:
    """Print the side-by-side table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", choices=sorted(MODELS))
    ap.add_argument("--clients", default="10,100,1000")
    ap.add_argument("--method", default="osd")
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--distinct", type=int, default=8, help="different client updates, cycled to N")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of both paths; medians reported")
    args = ap.parse_args(argv)
    shapes = minilm_shapes(**MODELS[args.model])
    with torch_threads(args.threads):
        payloads, decode_s = _payloads(shapes, args.distinct, args.method, args.rank)
        params = sum(torch.Size(s).numel() for s in shapes.values())
        pending = sum(4 * (FACTOR_CHUNK + 4) * sum(s[:1]) + 4 * (FACTOR_CHUNK + 4) * (torch.Size(s[1:]).numel())
                      for s in shapes.values() if len(s) >= 2)  # fmt: skip
        print(
            f"{args.model}: {params:,} parameters ({4 * params / 2**20:.0f} MiB float32), {args.method} r={args.rank}, "
            f"torch threads {torch.get_num_threads()}; decode {1000 * decode_s:.1f} ms per reply (both paths); "
            f"pending factors at most {pending / 2**20:.0f} MiB (computed); medians of {args.repeats} interleaved runs"
        )
        print("| clients | rebuild each reply (s) | factor space (s) | speed-up | max diff / max entry |")
        print("|---|---|---|---|---|")
        for n in (int(x) for x in args.clients.split(",")):
            factor_s, rebuild_s = [], []
            for _ in range(args.repeats):  # interleaved: a burst of load hits both paths alike
                t0 = time.perf_counter()
                factored = _factor(shapes, payloads, n)
                factor_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                rebuilt = _rebuild(shapes, payloads, n)
                rebuild_s.append(time.perf_counter() - t0)
            t_factor, t_rebuild = statistics.median(factor_s), statistics.median(rebuild_s)
            diff = max(float((factored[k] - rebuilt[k]).abs().max()) for k in shapes)
            scale = max(float(rebuilt[k].abs().max()) for k in shapes)
            print(f"| {n} | {t_rebuild:.2f} | {t_factor:.2f} | {t_rebuild / t_factor:.1f}x | {diff / scale:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
