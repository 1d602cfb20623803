"""OSD — Optimal Singular Damage.

The sparse low-rank engine (:mod:`osd_fl.methods.sparse_lowrank`) with
importance-weighted damage scores and adaptive relaxation. Zeroing ``A_ij``
removes ``A_ij B_j,:`` from row ``i`` of the approximation, zeroing ``B_jt``
removes ``A_:,j B_jt`` from column ``t``; weighted by ``Z``::

    S_A = |A| * (Z |B|^T)        S_B = |B| * (|A|^T Z)

Adaptive ``c`` (default) tries ``c = 0`` (dense TruncSVD) and ``c = 1..relax``
and keeps the one with the least ``||sqrt(Z) * (M - A_hat B_hat)||_F^2``, so
OSD is never worse than TruncSVD on that error at the same budget.

Tuning: ``relax`` bounds the extra directions (3 is a good default; each
extra c costs one more ``n x d x k`` product when adaptive); ``second_pass``
re-selects B after A is masked (measure before enabling: see docs). Values
travel as int8 by default (``value_dtype="auto"``) within the bytes float32
TruncSVD sends, about four times the entries of float32 values: measured
better per byte on full-model fine-tuning (docs/results.md, "Value
precision"); ``value_dtype="float32"`` is the paper's setting.
"""

from __future__ import annotations

import torch

from osd_fl.methods.sparse_lowrank import SparseLowRank
from osd_fl.thin import times_thin

__all__ = ["OSD", "damage_scores"]


def damage_scores(
    a: torch.Tensor, b: torch.Tensor, z: torch.Tensor | None, damage: str = "l2"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score the damage of dropping each entry of ``A`` and of ``B``.

    ``l1``: ``S_A = |A| * (Z |B|^T)``, ``S_B = |B| * (|A|^T Z)`` -- with
    ``Z = |G|`` a bound on the first-order loss change of dropping the entry.
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
    return abs_a * times_thin(z, abs_b.T), abs_b * (abs_a.T @ z)


class OSD(SparseLowRank):
    """Optimal Singular Damage: importance-weighted damage scores, adaptive relaxation."""

    name = "osd"
    adaptive_c = True
    uses_importance = True
    auto_precision = ("int8", "float32")

    def scores(self, a: torch.Tensor, b: torch.Tensor, z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """OSD damage scores (:func:`damage_scores`, ``config.damage``)."""
        return damage_scores(a, b, z, self.config.damage)

    def second_pass_scores(self, a_kept: torch.Tensor, b: torch.Tensor, z: torch.Tensor) -> torch.Tensor | None:
        """The damage scores of ``B`` against the masked ``A``."""
        return damage_scores(a_kept, b, z, self.config.damage)[1]
