"""``int8``: per-block symmetric linear quantization (about a quarter of dense).

One float32 scale per ``int8_block`` values.
"""

from __future__ import annotations

import numpy as np
import torch

from osd_fl.compressor import Compressor, CompressorState, MatrixItem, RecordForm, to_numpy
from osd_fl.payload import Kind, TensorRecord

__all__ = ["Int8", "quantize_int8"]


def quantize_int8(flat: torch.Tensor, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-block int8: ``q = round(x / s)``, ``s = max|x| / 127`` per block."""
    n = flat.numel()
    nblocks = -(-n // block)
    padded = torch.zeros(nblocks * block, dtype=torch.float32, device=flat.device)
    padded[:n] = flat
    blocks = padded.reshape(nblocks, block)
    scales = blocks.abs().amax(dim=1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(blocks / safe[:, None]).clamp_(-127, 127).to(torch.int8).reshape(-1)[:n]
    return to_numpy(scales), q.cpu().numpy()


class Int8(Compressor):
    """Per-block int8 quantization of every compressed matrix."""

    name = "int8"
    budgeted = False

    def encode_matrix(self, item: MatrixItem, budget: int, state: CompressorState) -> TensorRecord:
        """QUANT8 record of the matrix."""
        flat = item.mat.reshape(-1)
        block = self.config.int8_block or flat.numel()
        block = min(block, flat.numel())
        scales, q = quantize_int8(flat, block)
        return TensorRecord(
            name=item.name, shape=item.shape, dtype=item.dtype, kind=Kind.QUANT8, block=block, scales=scales, qvalues=q
        )

    def record_form(self, n: int, d: int) -> RecordForm:
        """int8 values in blocks of ``int8_block`` (one block for the whole matrix when 0 or larger)."""
        return RecordForm(Kind.QUANT8, block=min(self.config.int8_block or n * d, n * d))
