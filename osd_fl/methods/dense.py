"""``dense`` and ``fp16``: every value, float32 or float16 (FedAvg's payload)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from osd_fl.compressor import Compressor, CompressorState, MatrixItem, RecordForm, dense_record
from osd_fl.payload import Kind, TensorRecord

__all__ = ["FP16", "Dense"]


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


class FP16(Dense):
    """Every tensor sent dense as float16."""

    name = "fp16"
    overrides: ClassVar[Mapping[str, object]] = {"value_dtype": "float16"}
