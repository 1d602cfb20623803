"""``powersgd``: rank-r PowerSGD (Vogels et al. 2019).

One power iteration per round, warm-started from the previous round's ``Q``
(kept in :class:`~osd_fl.compressor.CompressorState`); use it with error
feedback, as Vogels et al. do.
"""

from __future__ import annotations

import torch

from osd_fl.compressor import Compressor, CompressorState, MatrixItem, RecordForm, item_generator, lowrank_record
from osd_fl.payload import Kind, TensorRecord
from osd_fl.thin import t_times_thin, times_thin

__all__ = ["PowerSGD"]


class PowerSGD(Compressor):
    """Rank-r PowerSGD (Vogels et al. 2019): one warm-started power iteration per round."""

    name = "powersgd"

    def encode_matrix(self, item: MatrixItem, budget: int, state: CompressorState) -> TensorRecord:
        """``P = orth(M Q)``, ``Q = M^T P``; sends ``P`` and ``Q^T``, keeps ``Q``."""
        r = min(self.config.rank, item.n, item.d)
        key = f"powersgd.q.{item.name}"
        q = state.tensors.get(key)
        if q is None or tuple(q.shape) != (item.d, r):
            q = torch.randn(item.d, r, generator=item_generator(self.config, item), device=item.mat.device)
        q = q.to(item.mat.device, torch.float32)
        p, _ = torch.linalg.qr(times_thin(item.mat, q))
        q = t_times_thin(item.mat, p).contiguous()
        state.tensors[key] = q.detach()
        return lowrank_record(item, p, q.T)

    def record_form(self, n: int, d: int) -> RecordForm:
        """Whole factors ``P`` and ``Q^T`` at rank ``min(r, n, d)``."""
        return RecordForm(Kind.LOWRANK, max_rank=min(self.config.rank, n, d), full_factors=True)
