"""Truncated SVD, exact or randomized, always computed in float32.

:func:`truncated_svd` picks the routine: the exact LAPACK/cuSOLVER SVD for
small matrices, and a randomized range finder (Halko, Martinsson & Tropp
2011) with ``oversample`` extra columns and ``niter`` power iterations when
the wanted rank is much smaller than the matrix. Unlike
``torch.svd_lowrank``, the randomness comes from an explicit
:class:`torch.Generator`, so the same seed gives the same factors (and the
same bytes), and the sketch width is always ``k + oversample``.
"""

from __future__ import annotations

from typing import Literal

import torch

from osd_fl.thin import t_times_thin, times_thin

__all__ = ["split_factors", "truncated_svd", "use_randomized"]

#: Below this smaller side, the exact SVD is cheap enough to always use.
EXACT_BELOW = 256


def use_randomized(n: int, d: int, k: int, oversample: int, mode: Literal["auto", "exact", "randomized"]) -> bool:
    """Whether ``mode`` selects the randomized routine for an ``n x d`` matrix at rank ``k``."""
    if mode == "exact":
        return False
    if mode == "randomized":
        return k + oversample < min(n, d)
    return min(n, d) > EXACT_BELOW and 4 * (k + oversample) <= min(n, d)


def truncated_svd(
    mat: torch.Tensor,
    k: int,
    *,
    mode: Literal["auto", "exact", "randomized"] = "auto",
    oversample: int = 10,
    niter: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``k`` SVD ``mat ~ U diag(S) Vh`` with ``U: n x k``, ``S: k``, ``Vh: k x d``.

    Parameters
    ----------
    mat
        A 2-D tensor on any device; computed in float32.
    k
        Wanted rank, clipped to ``min(n, d)``.
    mode
        ``"exact"``, ``"randomized"`` or ``"auto"`` (see :func:`use_randomized`).
    oversample, niter
        Randomized routine only: sketch width ``k + oversample`` and power
        iterations. ``niter=2`` is accurate for fast-decaying spectra such
        as fine-tuning updates; raise it for flat spectra.
    generator
        Source of the random sketch (must live on ``mat``'s device).

    """
    m = mat.detach().to(torch.float32)
    n, d = m.shape
    k = min(k, n, d)
    if not use_randomized(n, d, k, oversample, mode):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :k], s[:k], vh[:k]
    width = min(k + oversample, n, d)
    transpose = n < d
    if transpose:
        m = m.T
    omega = torch.randn(m.shape[1], width, generator=generator, device=m.device, dtype=m.dtype)
    q, _ = torch.linalg.qr(times_thin(m, omega))
    for _ in range(niter):
        z, _ = torch.linalg.qr(t_times_thin(m, q))
        q, _ = torch.linalg.qr(times_thin(m, z))
    small = q.T @ m
    ub, s, vh = torch.linalg.svd(small, full_matrices=False)
    u = q @ ub
    u, s, vh = u[:, :k], s[:k], vh[:k]
    if transpose:
        return vh.T.contiguous(), s, u.T.contiguous()
    return u, s, vh


def split_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold the singular values into both factors: ``A = U_k sqrt(S)``, ``B = sqrt(S) Vh_k``.

    Splitting ``sqrt(S)`` to both sides gives the factors comparable
    magnitudes, so their entries can be ranked against each other.
    """
    root = s[:k].clamp_min(0).sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k]
