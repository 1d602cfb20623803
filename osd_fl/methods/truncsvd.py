"""``truncsvd``: dense rank-r SVD factors, the paper's baseline (it defines the budget)."""

from __future__ import annotations

from osd_fl import timing
from osd_fl.compressor import Compressor, CompressorState, MatrixItem, RecordForm, item_generator, lowrank_record
from osd_fl.payload import Kind, TensorRecord
from osd_fl.svd import split_factors, truncated_svd

__all__ = ["TruncSVD"]


class TruncSVD(Compressor):
    """Dense rank-r SVD factors: ``r (n + d)`` values, exactly the budget."""

    name = "truncsvd"

    def encode_matrix(self, item: MatrixItem, budget: int, state: CompressorState) -> TensorRecord:
        """LOWRANK record with full factors at rank r."""
        cfg = self.config
        with timing.phase("svd"):
            u, s, vh = truncated_svd(
                item.mat,
                cfg.rank,
                mode=cfg.svd,
                oversample=cfg.oversample,
                niter=cfg.niter,
                generator=item_generator(cfg, item),
            )
            a, b = split_factors(u, s, vh, int(s.numel()))
        with timing.phase("record"):
            return lowrank_record(item, a, b)

    def record_form(self, n: int, d: int) -> RecordForm:
        """Whole factors at rank ``min(r, n, d)`` at most."""
        return RecordForm(Kind.LOWRANK, max_rank=min(self.config.rank, n, d), full_factors=True)
