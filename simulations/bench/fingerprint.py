"""Byte fingerprints of :func:`osd_fl.compress` over many cases, to prove an optimisation changed no byte.

Run it against two versions of ``osd_fl`` and compare; it is run as a
script (not ``-m``) so that ``PYTHONPATH`` picks the version::

    git archive 626e434 osd_fl | tar -x -C /tmp/old          # the version before
    PYTHONPATH=/tmp/old python simulations/bench/fingerprint.py /tmp/old.json --threads 1
    python simulations/bench/fingerprint.py /tmp/new.json --threads 1 --compare /tmp/old.json

Cases: 5 updates (a 2-layer MiniLM, 1024x1024, odd and tall shapes, a conv
kernel, tiny matrices) x ranks 1, 4, 16 x with/without importance x 23
method/option variants (OSD adaptive/fixed c, second pass, l1 damage,
float16, relax 5, global budget, exact/randomized SVD, seed, an explicit
byte budget, min_numel 0; MagTruncSVD, TruncSVD, top-k, PowerSGD, int8,
dense, fp16), three rounds of error feedback and PowerSGD warm starts, and
the decompressed tensors of one payload: 694 cases. A case that raises
records its error message, which must match too. Bytes depend on the torch
thread count (BLAS reductions), so compare runs with the same ``--threads``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from typing import Any

import torch

import osd_fl
from osd_fl import CompressorState, ErrorFeedback, compress, decompress

VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("osd", {}),
    ("osd", {"adaptive": False}),
    ("osd", {"second_pass": True}),
    ("osd", {"damage": "l1"}),
    ("osd", {"value_dtype": "float16"}),
    ("osd", {"relax": 5}),
    ("osd", {"budget": "global"}),
    ("osd", {"svd": "exact"}),
    ("osd", {"svd": "randomized", "niter": 1}),
    ("osd", {"seed": 7}),
    ("magtruncsvd", {}),
    ("magtruncsvd", {"relax": 1}),
    ("magtruncsvd", {"budget": "global"}),
    ("truncsvd", {}),
    ("topk", {}),
    ("topk", {"budget": "global"}),
    ("topk", {"value_dtype": "float16"}),
    ("powersgd", {}),
    ("int8", {}),
    ("dense", {}),
    ("fp16", {}),
    ("osd", {"budget_bytes": 60000}),
    ("osd", {"min_numel": 0}),
]


def low_rank(n: int, d: int, seed: int, rank: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, rank, generator=g)
    v = torch.randn(rank, d, generator=g)
    s = torch.logspace(0, -1.5, rank)
    return (u * s) @ v * 0.01 + 0.002 * torch.randn(n, d, generator=g)


def minilm(layers: int, hidden: int = 384, ffn: int = 1536, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for m in ("q", "k", "v", "o"):
            out[p + m + ".weight"] = low_rank(hidden, hidden, seed * 100 + i * 10 + len(m) + ord(m[0]))
            out[p + m + ".bias"] = 1e-3 * torch.randn(hidden, generator=g)
        out[p + "inter.weight"] = low_rank(ffn, hidden, seed * 100 + i * 10 + 7)
        out[p + "out.weight"] = low_rank(hidden, ffn, seed * 100 + i * 10 + 8)
        out[p + "ln.weight"] = 1e-3 * torch.randn(hidden, generator=g)
    return out


def importance(update: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 999)
    return {k: torch.rand(v.shape, generator=g) ** 3 for k, v in update.items() if v.ndim >= 2}


def fingerprints() -> dict[str, str]:

    torch.manual_seed(12345)
    updates = {
        "minilm2": minilm(2),
        "sq1024": {"w": low_rank(1024, 1024, 3), "b": torch.randn(1024)},
        "odd": {
            "a": low_rank(100, 700, 4),
            "c": low_rank(700, 90, 5),
            "conv": torch.randn(16, 8, 3, 3),
            "tiny": torch.randn(20, 20),
            "e": low_rank(300, 64, 6),
        },
        "small": {"x": low_rank(80, 120, 7), "y": low_rank(257, 300, 8)},
        "tall": {"t": low_rank(3000, 200, 9)},
    }
    res: dict[str, str] = {}
    for uname, up in updates.items():
        for rank in (1, 4, 16):
            for use_imp in (False, True):
                for method, opts in VARIANTS:
                    key = f"{uname}|r{rank}|imp{int(use_imp)}|{method}|{json.dumps(opts, sort_keys=True)}"
                    try:
                        imp = importance(up, rank) if use_imp else None
                        blob = compress(up, method=method, rank=rank, importance=imp, **opts)
                        res[key] = hashlib.sha256(blob).hexdigest()[:16] + f":{len(blob)}"
                    except Exception as exc:  # the error must be the same too
                        res[key] = f"ERR {type(exc).__name__}: {exc}"[:120]
    for method in ("osd", "powersgd", "topk"):  # cross-round state: error feedback, warm starts
        fb, state, hashes = ErrorFeedback(), CompressorState(), []
        for rnd in range(3):
            scaled = {k: v * (rnd + 1) for k, v in updates["odd"].items()}
            blob = compress(scaled, method=method, rank=2, feedback=fb, state=state)
            hashes.append(hashlib.sha256(blob).hexdigest()[:12])
        res[f"feedback|{method}"] = ",".join(hashes)
    blob = compress(updates["minilm2"], method="osd", rank=4, importance=importance(updates["minilm2"], 1))
    out = decompress(blob)
    h = hashlib.sha256()
    for k in sorted(out):
        h.update(out[k].numpy().tobytes())
    res["decompress|minilm2"] = h.hexdigest()[:16]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="JSON file to write the fingerprints to")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compare", help="fingerprints of another version: print the cases that differ")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    res = fingerprints()
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(res, fh, indent=0, sort_keys=True)
    errors = sum(v.startswith("ERR") for v in res.values())
    print(f"osd_fl from {osd_fl.__file__}: {len(res)} cases ({errors} raise), threads {args.threads}")
    if args.compare:
        with open(args.compare, encoding="utf-8") as fh:
            other = json.load(fh)
        differ = sorted(k for k in set(res) | set(other) if res.get(k) != other.get(k))
        print(f"{len(differ)} of {len(res)} cases differ from {args.compare}")
        for k in differ[:20]:
            print(f"  {k}: {other.get(k)} -> {res.get(k)}")
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
