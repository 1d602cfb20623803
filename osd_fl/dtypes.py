"""Every dtype table of osd-fl, in one place.

Two kinds of dtype meet in a payload:

* the *value dtype* every transmitted value travels in (``float32``,
  ``float16`` or ``int8``, the same for every method; :data:`VALUE_CODES`,
  :data:`VALUE_WIRE`; ``int8`` values go in blocks of :data:`INT8_BLOCK`,
  each with one float32 scale, :data:`INT8_SCALE`);
* the *tensor dtype* each rebuilt tensor has (its original floating dtype;
  :data:`TENSOR_CODES`, :data:`TORCH_DTYPES`).

The wire codes here are part of the format (:mod:`osd_fl.codec`): never
renumber them.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "FP16_MAX",
    "INT8_BLOCK",
    "INT8_SCALE",
    "INT8_WIRE",
    "QUANT8_SCALE",
    "QUANT8_VALUE",
    "TENSOR_CODES",
    "TORCH_DTYPES",
    "TORCH_NAMES",
    "VALUE_CODES",
    "VALUE_WIRE",
    "dtype_name",
    "finfo_max",
]

#: Value dtype name <-> its code in the payload header.
VALUE_CODES: dict[str, int] = {"float32": 0, "float16": 1, "int8": 2}
#: Value dtype name -> the little-endian numpy dtype its values are written in.
VALUE_WIRE: dict[str, np.dtype[np.floating]] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
#: Largest finite float16; float16 values are clipped to it before they are written.
FP16_MAX = 65504.0
#: ``int8`` values: each block of this many values of a section is written as one float32
#: scale (its largest magnitude / 127) and the values rounded to multiples of it.
INT8_BLOCK = 64
INT8_SCALE: np.dtype[np.float32] = np.dtype("<f4")
INT8_WIRE: np.dtype[np.int8] = np.dtype(np.int8)

#: Original dtype of a tensor <-> its code on the wire.
TENSOR_CODES: dict[str, int] = {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}
#: Tensor dtype name -> torch dtype (the floating dtypes an update may have).
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
#: torch dtype -> tensor dtype name (inverse of :data:`TORCH_DTYPES`).
TORCH_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}

#: QUANT8 records: one float32 scale per block and one int8 per value.
QUANT8_SCALE: np.dtype[np.float32] = np.dtype("<f4")
QUANT8_VALUE: np.dtype[np.int8] = np.dtype(np.int8)


def dtype_name(dtype: torch.dtype | str) -> str:
    """``"float32"`` for ``torch.float32`` or ``"float32"`` (names pass through)."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def finfo_max(name: str) -> float:
    """Largest finite value of the tensor dtype ``name``; ``KeyError`` for a dtype not in :data:`TORCH_DTYPES`."""
    return float(torch.finfo(TORCH_DTYPES[name]).max)
