"""Server and client cost of the compressed broadcast, per round, side by side with a dense copy.

Per round the server compresses ``x - w`` once (:meth:`BroadcastServer.publish`,
which also applies the broadcast to its public model and digests it); each
client applies the chain it receives (:func:`osd_fl.downlink.apply_chain`,
exact decode plus digest). Both are timed against the dense path's own work
(serializing the model into an ``ArrayRecord`` once, as Flower does for every
round) on the same process, alternating, with the bytes each sends::

    python -m simulations.bench.downlink                          # MiniLM and BERT-base shapes, r = 1, 4
    python -m simulations.bench.downlink --models minilm --ranks 1 --rounds 3

The server's memory is the public model plus the byte-capped history (at most
one model by default), computed from :attr:`BroadcastServer.memory_bytes`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

import torch

from osd_fl import CompressionConfig
from osd_fl.downlink import BroadcastServer, apply_chain, model_bytes
from osd_fl.records import tensors_to_record
from simulations.bench.harness import QUIET, machine, wait_quiet
from simulations.bench.workloads import minilm_shapes, synthetic_update
from simulations.devices import torch_threads

__all__ = ["main"]

MODELS = {"minilm": {}, "bert-base": {"layers": 12, "hidden": 768, "ffn": 3072}}


def _row(model: str, rank: int, rounds: int) -> list[str]:
    shapes = minilm_shapes(**MODELS[model])
    x = {k: torch.zeros(s) for k, s in shapes.items()}
    server = BroadcastServer(x, CompressionConfig(method="osd", rank=rank))
    replica = {k: v.clone() for k, v in x.items()}
    publish, apply, dense, sizes = [], [], [], []
    for t in range(rounds):
        step = synthetic_update(shapes, seed=t)
        x = {k: x[k] + step[k] for k in x}
        t0 = time.perf_counter()
        b = server.publish(x)
        publish.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        apply_chain(replica, [b])
        apply.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tensors_to_record(x)
        dense.append(time.perf_counter() - t0)
        sizes.append(b.nbytes)
    assert all(torch.equal(replica[k], server.public[k]) for k in x)
    full = model_bytes(x)
    return [
        model,
        str(rank),
        f"{full / 2**20:.1f}",
        f"{statistics.mean(sizes) / 2**10:.1f}",
        f"{statistics.mean(sizes) / full:.2%}",
        f"{1000 * statistics.median(publish):.0f}",
        f"{1000 * statistics.median(apply):.0f}",
        f"{1000 * statistics.median(dense):.0f}",
        f"{server.memory_bytes / full:.2f}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,bert-base")
    ap.add_argument("--ranks", default="1,4")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-wait", type=float, default=QUIET["max_wait"], help="seconds to wait for a quiet CPU")
    args = ap.parse_args(argv)
    saved = QUIET["max_wait"]
    QUIET["max_wait"] = args.max_wait
    try:
        print(f"machine: {machine()}; {wait_quiet('downlink bench')}")
    finally:
        QUIET["max_wait"] = saved
    with torch_threads(args.threads):
        print(f"torch threads {torch.get_num_threads()}, {args.rounds} rounds, OSD broadcasts, medians")
        head = [
            "model",
            "rank",
            "model MiB",
            "broadcast KiB",
            "share of dense",
            "server publish ms",
            "client apply ms",
            "dense ArrayRecord ms",
            "server memory / model",
        ]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for model in args.models.split(","):
            for rank in (int(r) for r in args.ranks.split(",")):
                print("| " + " | ".join(_row(model, rank, args.rounds)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
