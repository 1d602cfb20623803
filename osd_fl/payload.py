"""In-memory form of a compressed update, before and after the wire.

A :class:`Payload` is a list of :class:`TensorRecord` s, one per tensor of the
update, each saying how that tensor travels (:class:`Kind`). Decoding is
method-agnostic: whatever compressor produced a record, the receiver rebuilds
the tensor from the record's kind alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import numpy.typing as npt

__all__ = ["Kind", "Payload", "Section", "TensorRecord", "matrix_dims"]


class Kind(IntEnum):
    """How one tensor travels."""

    ZERO = 0  #: no update sent (e.g. a frozen embedding by policy)
    DENSE = 1  #: every value
    LOWRANK = 2  #: factors A (n x k) and B (k x d), each a sparse or full section
    SPARSE = 3  #: a sparse set of entries of the flattened tensor (top-k)
    QUANT8 = 4  #: int8 values with one float32 scale per block


def matrix_dims(shape: Sequence[int]) -> tuple[int, int]:
    """``(n, d)`` of a tensor seen as the matrix ``shape[0] x prod(shape[1:])`` (a scalar is ``1 x 1``)."""
    n = int(shape[0]) if shape else 1
    return n, (math.prod(shape) // n if n else 0)


@dataclass
class Section:
    """A set of kept values among ``slots`` slots (row-major flat positions).

    ``positions`` is ``None`` when every slot is kept; otherwise it holds
    sorted, unique int64 positions in ``[0, slots)``, one per value.
    """

    slots: int
    values: npt.NDArray[np.float32]
    positions: npt.NDArray[np.int64] | None = None

    @property
    def count(self) -> int:
        """Number of kept values."""
        return int(self.values.shape[0])

    def dense(self) -> npt.NDArray[np.float32]:
        """All ``slots`` values with the dropped ones as zero."""
        if self.positions is None:
            return self.values.astype(np.float32, copy=False)
        out = np.zeros(self.slots, dtype=np.float32)
        out[self.positions] = self.values
        return out


@dataclass
class TensorRecord:
    """One tensor of the update and how it travels."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: Kind
    sections: list[Section] = field(default_factory=list)
    rank: int = 0  #: LOWRANK: inner dimension k
    block: int = 0  #: QUANT8: values per scale
    scales: npt.NDArray[np.float32] | None = None  #: QUANT8 scales
    qvalues: npt.NDArray[np.int8] | None = None  #: QUANT8 values

    @property
    def numel(self) -> int:
        """Number of entries of the tensor."""
        return math.prod(self.shape)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(n, d)``: the tensor seen as a matrix ``shape[0] x prod(shape[1:])``."""
        return matrix_dims(self.shape)

    @property
    def kept(self) -> int:
        """Number of transmitted values."""
        if self.kind == Kind.QUANT8:
            return self.numel
        return sum(s.count for s in self.sections)


@dataclass
class Payload:
    """A whole compressed update."""

    method: str
    value_dtype: str
    records: list[TensorRecord]
    meta: dict[str, int] = field(default_factory=dict)
