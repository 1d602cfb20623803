"""OSD — Optimal Singular Damage — and the sparse low-rank machinery it shares.

For one matrix ``M`` (n x d) with importance ``Z`` and budget rank ``r``:

1. SVD at the relaxed rank ``k = r + c``; fold ``sqrt(S)`` into both factors,
   ``A = U sqrt(S)`` (n x k) and ``B = sqrt(S) Vh`` (k x d).
2. Damage scores: zeroing ``A_ij`` removes ``A_ij B_j,:`` from row ``i`` of the
   approximation, zeroing ``B_jt`` removes ``A_:,j B_jt`` from column ``t``;
   weighted by ``Z``::

       S_A = |A| * (Z |B|^T)        S_B = |B| * (|A|^T Z)

3. Rank all entries of ``A`` and ``B`` together by score and keep them while
   the *encoded* sections fit the bytes dense rank-``r`` factors would take
   (:func:`osd_fl.selection.select`).
4. Adaptive ``c`` (default): try ``c = 0`` (dense TruncSVD) and ``c = 1..relax``
   and keep the one with the least ``||sqrt(Z) * (M - A_hat B_hat)||_F^2``,
   so OSD is never worse than TruncSVD on that error at the same budget.

Tuning: ``relax`` bounds the extra directions (3 is a good default; each
extra c costs one more ``n x d x k`` product when adaptive); ``second_pass``
re-selects B after A is masked (measure before enabling: see docs);
``value_dtype="float16"`` roughly doubles the kept entries.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import numpy as np
import numpy.typing as npt
import torch

from osd_fl.budget import LOWRANK_OVERHEAD
from osd_fl.compressor import (
    Compressor,
    CompressorState,
    MatrixItem,
    item_generator,
    lowrank_record,
    register,
    weighted_error,
)
from osd_fl.payload import TensorRecord
from osd_fl.selection import select, selection_bytes
from osd_fl.svd import split_factors, truncated_svd

__all__ = ["OSD", "SparseLowRank", "damage_scores"]


def damage_scores(
    a: torch.Tensor, b: torch.Tensor, z: torch.Tensor | None, damage: str = "l2"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score the damage of dropping each entry of ``A`` and of ``B``.

    ``l1``: ``S_A = |A| * (Z |B|^T)``, ``S_B = |B| * (|A|^T Z)`` -- with
    ``Z = |G|`` a bound on the first-order loss change (ALGORITHM.md).
    ``l2``: ``S_A = A^2 * (Z (B^2)^T)``, ``S_B = B^2 * ((A^2)^T Z)`` -- exactly
    the Z-weighted squared error ``sum_t Z_it (A_ij B_jt)^2`` that dropping
    that one entry adds, i.e. the objective adaptive c minimises. ``Z = ones``
    when ``None``.
    """
    if damage == "l2":
        abs_a, abs_b = a.square(), b.square()
    else:
        abs_a, abs_b = a.abs(), b.abs()
    if z is None:
        return abs_a * abs_b.sum(dim=1)[None, :], abs_b * abs_a.sum(dim=0)[:, None]
    return abs_a * (z @ abs_b.T), abs_b * (abs_a.T @ z)


def _masked(f: torch.Tensor, pos: npt.NDArray[np.int64]) -> torch.Tensor:
    mask = torch.zeros(f.numel(), dtype=f.dtype, device=f.device)
    mask[torch.from_numpy(pos).to(f.device)] = 1
    return f * mask.reshape(f.shape)


def _weighted_error_into(approx: torch.Tensor, mat: torch.Tensor, z: torch.Tensor | None) -> float:
    """:func:`~osd_fl.compressor.weighted_error` computed in ``approx``'s storage (overwritten).

    Bit for bit the same number: ``approx - mat`` is exactly ``-(mat - approx)``
    in IEEE arithmetic, squaring drops the sign, and the sum reduces a tensor
    of the same values in the same (contiguous) layout. It saves the n x d
    temporary and its page faults, which cost more than the arithmetic on
    CPU. Falls back to the allocating form for a non-contiguous ``mat``,
    whose difference would take ``mat``'s layout and sum in another order.
    """
    if not (mat.is_contiguous() and approx.is_contiguous()):
        return weighted_error(mat, approx, z)
    diff = approx.sub_(mat).square_()
    if z is not None:
        diff.mul_(z)
    return float(diff.sum())


class SparseLowRank(Compressor):
    """Relaxed-rank SVD factors sparsified jointly by a score (OSD, MagTruncSVD)."""

    supports_global: ClassVar[bool] = True
    #: Whether to try c = 0..relax and keep the least weighted error.
    adaptive_c: ClassVar[bool] = False

    @abstractmethod
    def scores(self, a: torch.Tensor, b: torch.Tensor, z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Score every entry of ``a`` and ``b`` (higher = keep first)."""

    def _svd(self, item: MatrixItem, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        return truncated_svd(
            item.mat, k, mode=cfg.svd, oversample=cfg.oversample, niter=cfg.niter, generator=item_generator(cfg, item)
        )

    def _sparse(
        self, item: MatrixItem, a: torch.Tensor, b: torch.Tensor, budget: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        vb = self.config.value_bytes
        s_a, s_b = self.scores(a, b, item.importance)
        pos_a, pos_b = select([s_a, s_b], vb, budget)
        if self.config.second_pass and item.importance is not None:
            spent_a = selection_bytes([pos_a.size], [a.numel()], vb)
            _, s_b2 = damage_scores(_masked(a, pos_a), b, item.importance, self.config.damage)
            (pos_b,) = select([s_b2], vb, budget - spent_a)
        return pos_a, pos_b

    def _relax_values(self) -> list[int]:
        cfg = self.config
        if self.adaptive_c and cfg.adaptive:
            return list(range(0, cfg.relax + 1))
        return [cfg.relax]

    def encode_matrix(self, item: MatrixItem, budget: int, state: CompressorState) -> TensorRecord:
        """Compress one matrix; with adaptive c keep the candidate of least weighted error."""
        r = self.config.rank
        cs = [c for c in self._relax_values() if r + c <= min(item.n, item.d)] or [0]
        u, s, vh = self._svd(item, r + max(cs))
        best: tuple[float, TensorRecord] | None = None
        work: torch.Tensor | None = None  # one n x d buffer reused by every candidate's error
        for c in cs:
            k = min(r + c, int(s.numel()))
            a, b = split_factors(u, s, vh, k)
            if c == 0:
                rec = lowrank_record(item, a, b)
                approx_a, approx_b = a, b
            else:
                pos_a, pos_b = self._sparse(item, a, b, budget - LOWRANK_OVERHEAD)
                rec = lowrank_record(item, a, b, pos_a, pos_b)
                approx_a, approx_b = _masked(a, pos_a), _masked(b, pos_b)
            if len(cs) == 1:
                return rec
            work = approx_a @ approx_b if work is None else torch.matmul(approx_a, approx_b, out=work)
            err = _weighted_error_into(work, item.mat, item.importance)
            if best is None or err < best[0]:
                best = (err, rec)
        assert best is not None
        return best[1]

    def encode_global(self, items: list[MatrixItem], budget: int, state: CompressorState) -> list[TensorRecord]:
        """One budget for all matrices: every factor entry of every matrix ranked together.

        The relaxation is fixed at ``relax`` (adaptive c is per matrix only).
        """
        r, c = self.config.rank, max(self.config.relax, 1)
        factors: list[tuple[MatrixItem, torch.Tensor, torch.Tensor]] = []
        scores: list[torch.Tensor] = []
        for item in items:
            k = min(r + c, item.n, item.d)
            u, s, vh = self._svd(item, k)
            a, b = split_factors(u, s, vh, k)
            s_a, s_b = self.scores(a, b, item.importance)
            factors.append((item, a, b))
            scores += [s_a, s_b]
        positions = select(scores, self.config.value_bytes, budget - LOWRANK_OVERHEAD * len(items))
        return [
            lowrank_record(item, a, b, positions[2 * i], positions[2 * i + 1]) for i, (item, a, b) in enumerate(factors)
        ]


@register
class OSD(SparseLowRank):
    """Optimal Singular Damage: importance-weighted damage scores, adaptive relaxation."""

    name = "osd"
    adaptive_c = True

    def scores(self, a: torch.Tensor, b: torch.Tensor, z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """OSD damage scores (:func:`damage_scores`, ``config.damage``)."""
        return damage_scores(a, b, z, self.config.damage)
