"""MagTruncSVD: rank ``r + relax`` factors, largest ``|entries|`` kept under the same exact byte cost as OSD.

The paper's magnitude baseline, on the sparse low-rank engine
(:mod:`osd_fl.methods.sparse_lowrank`) with magnitude scores and a fixed
relaxation.
"""

from __future__ import annotations

import torch

from osd_fl.methods.osd import damage_scores
from osd_fl.methods.sparse_lowrank import SparseLowRank

__all__ = ["MagTruncSVD"]


class MagTruncSVD(SparseLowRank):
    """Rank ``r + relax`` factors, largest magnitudes kept under the budget."""

    name = "magtruncsvd"

    def scores(self, a: torch.Tensor, b: torch.Tensor, z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``|A|`` and ``|B|``."""
        return a.abs(), b.abs()

    def second_pass_scores(self, a_kept: torch.Tensor, b: torch.Tensor, z: torch.Tensor) -> torch.Tensor | None:
        """OSD's damage scores of ``B`` (``second_pass`` with an importance map has always re-selected so here)."""
        return damage_scores(a_kept, b, z, self.config.damage)[1]
