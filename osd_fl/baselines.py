"""Baselines, compared with OSD at equal bytes through the same codec.

* ``dense`` / ``fp16``: every value, float32 or float16.
* ``int8``: per-block symmetric linear quantization (one float32 scale per
  ``int8_block`` values), about a quarter of dense.
* ``truncsvd``: dense rank-r factors (the paper's baseline; defines the budget).
* ``magtruncsvd``: rank ``r + relax`` factors, largest ``|entries|`` kept under
  the same exact byte cost as OSD (the paper's baseline).
* ``topk``: largest ``|dW_ij|`` under the same budget.
* ``powersgd``: rank-r, one power iteration per round warm-started from the
  previous round's ``Q`` (kept in :class:`~osd_fl.compressor.CompressorState`);
  use it with error feedback, as Vogels et al. do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import torch

from osd_fl.budget import SPARSE_OVERHEAD
from osd_fl.compressor import (
    Compressor,
    CompressorState,
    MatrixItem,
    RecordForm,
    dense_record,
    item_generator,
    lowrank_record,
    register,
    to_numpy,
)
from osd_fl.osd import SparseLowRank
from osd_fl.payload import Kind, Section, TensorRecord
from osd_fl.selection import select
from osd_fl.svd import split_factors, truncated_svd

__all__ = ["FP16", "Dense", "Int8", "MagTruncSVD", "PowerSGD", "TopK", "TruncSVD", "quantize_int8"]


@register
class Dense(Compressor):
    """Every tensor sent dense at ``value_dtype`` (FedAvg's payload)."""

    name = "dense"
    budgeted = False
    all_dense = True

    def encode_matrix(self, item: MatrixItem, budget: int, state: CompressorState) -> TensorRecord:
        """Dense record of the matrix."""
        return dense_record(item.name, item.mat.reshape(item.shape), item.dtype)

    def record_form(self, n: int, d: int) -> RecordForm:
        """Every value."""
        return RecordForm(Kind.DENSE)


@register
class FP16(Dense):
    """Every tensor sent dense as float16."""

    name = "fp16"
    overrides: ClassVar[Mapping[str, object]] = {"value_dtype": "float16"}


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


@register
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


@register
class TruncSVD(Compressor):
    """Dense rank-r SVD factors: ``r (n + d)`` values, exactly the budget."""

    name = "truncsvd"

    def encode_matrix(self, item: MatrixItem, budget: int, state: CompressorState) -> TensorRecord:
        """LOWRANK record with full factors at rank r."""
        cfg = self.config
        u, s, vh = truncated_svd(
            item.mat,
            cfg.rank,
            mode=cfg.svd,
            oversample=cfg.oversample,
            niter=cfg.niter,
            generator=item_generator(cfg, item),
        )
        a, b = split_factors(u, s, vh, int(s.numel()))
        return lowrank_record(item, a, b)

    def record_form(self, n: int, d: int) -> RecordForm:
        """Whole factors at rank ``min(r, n, d)`` at most."""
        return RecordForm(Kind.LOWRANK, max_rank=min(self.config.rank, n, d), full_factors=True)


@register
class MagTruncSVD(SparseLowRank):
    """Rank ``r + relax`` factors, largest magnitudes kept under the budget."""

    name = "magtruncsvd"

    def scores(self, a: torch.Tensor, b: torch.Tensor, z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``|A|`` and ``|B|``."""
        return a.abs(), b.abs()


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


@register
class TopK(Compressor):
    """Largest ``|dW_ij|`` under the budget, each paying its value and position."""

    name = "topk"
    supports_global = True

    def encode_matrix(self, item: MatrixItem, budget: int, state: CompressorState) -> TensorRecord:
        """SPARSE record of the largest entries."""
        (pos,) = select([item.mat.abs()], self.config.value_bytes, budget - SPARSE_OVERHEAD)
        return _sparse_record(item, pos)

    def encode_global(self, items: list[MatrixItem], budget: int, state: CompressorState) -> list[TensorRecord]:
        """Largest entries across all matrices under one budget."""
        positions = select([i.mat.abs() for i in items], self.config.value_bytes, budget - SPARSE_OVERHEAD * len(items))
        return [_sparse_record(item, pos) for item, pos in zip(items, positions, strict=True)]

    def record_form(self, n: int, d: int) -> RecordForm:
        """A sparse set of entries."""
        return RecordForm(Kind.SPARSE)


@register
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
        p, _ = torch.linalg.qr(item.mat @ q)
        q = item.mat.T @ p
        state.tensors[key] = q.detach()
        return lowrank_record(item, p, q.T)

    def record_form(self, n: int, d: int) -> RecordForm:
        """Whole factors ``P`` and ``Q^T`` at rank ``min(r, n, d)``."""
        return RecordForm(Kind.LOWRANK, max_rank=min(self.config.rank, n, d), full_factors=True)
