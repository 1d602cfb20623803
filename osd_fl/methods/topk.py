"""``topk``: the largest ``|dW_ij|`` under the budget, each paying its value and position."""

from __future__ import annotations

import numpy as np
import torch

from osd_fl import sizes
from osd_fl.compressor import Compressor, CompressorState, MatrixItem, RecordForm, to_numpy
from osd_fl.payload import Kind, Section, TensorRecord
from osd_fl.selection import select

__all__ = ["TopK"]


def _sparse_record(item: MatrixItem, pos: np.ndarray) -> TensorRecord:
    # Gather the kept values where the matrix lives, then copy only those to the host
    # (the same values as indexing a host copy of the whole matrix).
    index = torch.from_numpy(np.asarray(pos, dtype=np.int64)).to(item.mat.device)
    values = to_numpy(item.mat.detach().reshape(-1)[index])
    return TensorRecord(
        name=item.name,
        shape=item.shape,
        dtype=item.dtype,
        kind=Kind.SPARSE,
        sections=[Section(slots=item.mat.numel(), values=values, positions=pos)],
    )


class TopK(Compressor):
    """Largest ``|dW_ij|`` under the budget, each paying its value and position."""

    name = "topk"
    supports_global = True

    def encode_matrix(self, item: MatrixItem, budget: int, state: CompressorState) -> TensorRecord:
        """SPARSE record of the largest entries."""
        (pos,) = select(
            [item.mat.abs()], self.config.value_bytes, sizes.entries_room(budget, 1, self.config.value_dtype)
        )
        return _sparse_record(item, pos)

    def encode_global(self, items: list[MatrixItem], budget: int, state: CompressorState) -> list[TensorRecord]:
        """Largest entries across all matrices under one budget."""
        room = sizes.entries_room(budget, len(items), self.config.value_dtype)
        positions = select([i.mat.abs() for i in items], self.config.value_bytes, room)
        return [_sparse_record(item, pos) for item, pos in zip(items, positions, strict=True)]

    def record_form(self, n: int, d: int) -> RecordForm:
        """A sparse set of entries."""
        return RecordForm(Kind.SPARSE)
