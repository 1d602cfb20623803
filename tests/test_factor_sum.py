"""Factor-space sums equal the rebuild-and-add sums within the float32 rounding of each rebuild."""

from __future__ import annotations

import pytest
import torch

from osd_fl import Kind, Payload, compress, decode
from strategies.aggregation import FactorSum, accumulate

SHAPES = {"w": (48, 40), "conv": (6, 3, 5, 5), "b": (48,), "frozen": (20, 20), "half": (32, 24)}


def _update(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    upd = {k: torch.randn(s, generator=g) * (1 + seed) for k, s in SHAPES.items()}
    upd["frozen"].zero_()  # a ZERO record
    upd["half"] = upd["half"].to(torch.float16)  # rebuilt (rounded to float16), never in factor space
    return upd


def _payloads() -> list[tuple[Payload, float]]:
    out: list[tuple[Payload, float]] = []
    for i, (method, rank) in enumerate([("osd", 1), ("truncsvd", 2), ("powersgd", 1), ("osd", 3), ("topk", 2)] * 3):
        blob = compress(_update(i), method=method, rank=rank, seed=i)
        out.append((decode(blob), float(1 + i % 4)))
    return out


def _rounding_bound(payloads: list[tuple[Payload, float]], name: str) -> torch.Tensor:
    """sum_i w_i (k_i + 1) 2**-24 (|A_i| |B_i|): what each float32 rebuild may round, per entry."""
    bound = torch.zeros(SHAPES[name], dtype=torch.float64)
    for payload, w in payloads:
        for rec in payload.records:
            if rec.name == name and rec.kind == Kind.LOWRANK:
                n, d = rec.matrix_shape
                a = torch.from_numpy(rec.sections[0].dense()).reshape(n, rec.rank).double().abs()
                b = torch.from_numpy(rec.sections[1].dense()).reshape(rec.rank, d).double().abs()
                bound += (w * (rec.rank + 1) * 2.0**-24 * (a @ b)).reshape(SHAPES[name])
    return bound


@pytest.mark.parametrize("chunk", [1, 4, 128])
def test_factor_space_sum_matches_rebuilt_sum(chunk: int) -> None:
    payloads = _payloads()
    kinds = {rec.kind for p, _ in payloads for rec in p.records}
    assert {Kind.LOWRANK, Kind.ZERO, Kind.DENSE, Kind.SPARSE} <= kinds
    rebuilt = {k: torch.zeros(s, dtype=torch.float64) for k, s in SHAPES.items()}
    factored = {k: torch.zeros(s, dtype=torch.float64) for k, s in SHAPES.items()}
    sums = FactorSum(factored, chunk=chunk)
    for payload, w in payloads:
        accumulate(rebuilt, payload, w)
        sums.add(payload, w)
    sums.flush()
    for name in ("w", "conv"):
        err = (factored[name] - rebuilt[name]).abs()
        assert bool((err <= _rounding_bound(payloads, name) + 1e-12 * rebuilt[name].abs().max()).all()), name
    for name in ("b", "frozen", "half"):  # rebuilt on both paths, in the same order: identical
        assert torch.equal(factored[name], rebuilt[name]), name


def test_flush_is_needed_and_idempotent() -> None:
    payload, _ = _payloads()[0]
    acc = {k: torch.zeros(s, dtype=torch.float64) for k, s in SHAPES.items()}
    sums = FactorSum(acc, chunk=1000)
    sums.add(payload, 2.0)
    assert float(acc["w"].abs().sum()) == 0.0  # pending until flushed
    sums.flush()
    once = acc["w"].clone()
    sums.flush()
    assert torch.equal(acc["w"], once) and float(once.abs().sum()) > 0
