"""Small builders shared by the tests."""

from __future__ import annotations

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
