"""Small builders shared by the tests."""

from __future__ import annotations

import weakref
from typing import Any

import torch


def low_rank_plus_sparse(
    n: int, d: int, *, rank: int = 8, decay: float = 1.5, noise: float = 0.002, seed: int = 0
) -> torch.Tensor:
    """A fine-tuning-like update: decaying low-rank part, dense noise, a few spikes."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, rank, generator=g)
    v = torch.randn(rank, d, generator=g)
    s = torch.logspace(0, -decay, rank)
    mat = (u * s) @ v * 0.01 + noise * torch.randn(n, d, generator=g)
    idx = torch.randint(0, n * d, (max(1, n * d // 1000),), generator=g)
    mat.view(-1)[idx] += 0.05 * torch.randn(idx.numel(), generator=g)
    return mat


def weighted_rel_error(m: torch.Tensor, approx: torch.Tensor, z: torch.Tensor | None) -> float:
    w = torch.ones_like(m) if z is None else z
    return float(((m - approx) ** 2 * w).sum() / ((m**2) * w).sum())


class AddTracker:
    """How the strategy adds replies: rebuilds (and how many earlier rebuilds were still alive) and factor-space adds.

    ``leaked`` gets, per rebuilt tensor, the number of earlier rebuilt tensors still alive;
    ``factored`` gets, per factor-space product, the number of low-rank records it adds.
    """

    def __init__(self, monkeypatch: Any) -> None:
        import osd_fl.codec
        import strategies.aggregation as aggregation

        self.alive: list[weakref.ref[torch.Tensor]] = []
        self.leaked: list[int] = []
        self.factored: list[int] = []
        real, real_form = osd_fl.codec.reconstruct, aggregation.FactorSum._form

        def tracking(rec: Any, device: torch.device | str | None = None) -> torch.Tensor:
            self.leaked.append(sum(ref() is not None for ref in self.alive))
            tensor = real(rec, device)
            self.alive.append(weakref.ref(tensor))
            return tensor

        def counting(sums: aggregation.FactorSum, name: str) -> None:
            self.factored.append(len(sums._pending[name][0]))
            real_form(sums, name)

        monkeypatch.setattr(aggregation, "reconstruct", tracking)
        monkeypatch.setattr(aggregation.FactorSum, "_form", counting)

    def clear(self) -> None:
        """Forget what was seen so far."""
        self.alive.clear()
        self.leaked.clear()
        self.factored.clear()
