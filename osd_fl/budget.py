"""Byte arithmetic, in one place: what each part of a payload costs.

Every function here returns the *exact* number of bytes the codec
(:mod:`osd_fl.codec`) writes, so a selection made against these costs is a
selection against the serialized payload. Tests check the two agree.

Position codings of a set of ``count`` kept entries among ``slots`` slots:

* ``ALL``: every slot is kept (``count == slots``); no position bytes.
* ``BITMASK``: one bit per slot, ``ceil(slots / 8)`` bytes.
* ``FIXED``: the paper's fixed-width flat index, ``ceil(count * w / 8)`` bytes
  with ``w = ceil(log2(slots))`` bits.
* ``ELIAS_FANO``: sorted positions as ``L`` low bits each plus a unary-coded
  high part, ``ceil(count * L / 8) + ceil((count + ((slots - 1) >> L) + 1) / 8)``
  bytes; within 2 bits per entry of the information bound
  ``log2(C(slots, count))``.

The codec takes the cheapest of these per section.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from enum import IntEnum

__all__ = [
    "LOWRANK_OVERHEAD",
    "SECTION_HEADER",
    "SPARSE_OVERHEAD",
    "Coding",
    "best_coding",
    "elias_fano_low_bits",
    "index_width",
    "matrix_budget",
    "paper_bits",
    "position_bytes",
]


class Coding(IntEnum):
    """How the kept positions of one section are written."""

    ALL = 0
    BITMASK = 1
    FIXED = 2
    ELIAS_FANO = 3


#: Bytes of one section header: coding (u8), parameter (u8), count (u32).
SECTION_HEADER = 6
#: Kind-specific bytes of a low-rank record beyond its values and positions:
#: k (u16) and two section headers.
LOWRANK_OVERHEAD = 2 + 2 * SECTION_HEADER
#: Kind-specific bytes of a sparse (top-k) record beyond values and positions.
SPARSE_OVERHEAD = SECTION_HEADER


def index_width(slots: int) -> int:
    """Bits of a fixed-width flat index into ``slots`` slots (at least 1)."""
    return max(1, (slots - 1).bit_length())


def elias_fano_low_bits(count: int, slots: int) -> int:
    """The number of low bits ``L`` that minimises the Elias-Fano size."""
    if count <= 0:
        return 0
    guess = max(0, math.floor(math.log2(max(slots, 1) / count)))
    best, best_bytes = guess, _ef_bytes(count, slots, guess)
    for low in (guess - 1, guess + 1):
        if low >= 0:
            size = _ef_bytes(count, slots, low)
            if size < best_bytes:
                best, best_bytes = low, size
    return best


def _ef_bytes(count: int, slots: int, low: int) -> int:
    return (count * low + 7) // 8 + (count + ((slots - 1) >> low) + 1 + 7) // 8


def position_bytes(coding: Coding, count: int, slots: int, param: int = 0) -> int:
    """Exact position bytes of ``count`` kept entries among ``slots`` under ``coding``."""
    if coding == Coding.ALL:
        return 0
    if coding == Coding.BITMASK:
        return (slots + 7) // 8
    if coding == Coding.FIXED:
        return (count * index_width(slots) + 7) // 8
    if count == 0:
        return 0
    return _ef_bytes(count, slots, param)


@functools.lru_cache(maxsize=1 << 16)
def best_coding(count: int, slots: int) -> tuple[Coding, int, int]:
    """Cheapest exact coding for ``count`` of ``slots``: ``(coding, param, bytes)``.

    Ties go to the simpler coding (ALL, then FIXED, BITMASK, ELIAS_FANO), so the
    choice is deterministic.
    """
    if count == slots:
        return Coding.ALL, 0, 0
    if count == 0:
        return Coding.FIXED, 0, 0
    options = [
        (position_bytes(Coding.FIXED, count, slots), 0, Coding.FIXED, 0),
        (position_bytes(Coding.BITMASK, count, slots), 1, Coding.BITMASK, 0),
    ]
    low = elias_fano_low_bits(count, slots)
    options.append((_ef_bytes(count, slots, low), 2, Coding.ELIAS_FANO, low))
    size, _, coding, param = min(options)
    return coding, param, size


def section_bytes(count: int, slots: int, value_bytes: int) -> int:
    """Positions plus values of one section (without its 6-byte header)."""
    return best_coding(count, slots)[2] + count * value_bytes


def matrix_budget(n: int, d: int, rank: int, value_bytes: int) -> int:
    """Kind-specific bytes every method may spend on one ``n x d`` matrix.

    This is exactly what dense rank-``rank`` TruncSVD factors cost in our
    format: ``rank * (n + d)`` values plus the low-rank record's fixed fields.
    It is the paper's per-matrix budget ``32 * r * (n + d)`` bits, at the
    configured value precision.
    """
    return LOWRANK_OVERHEAD + rank * (n + d) * value_bytes


def paper_bits(n: int, d: int, k: int, s_a: int, s_b: int, value_bits: int = 32) -> int:
    """The paper's memory of one layer: ``32(s_A + s_B) + ceil(log2(n k)) s_A + ceil(log2(k d)) s_B``."""
    return value_bits * (s_a + s_b) + index_width(n * k) * s_a + index_width(k * d) * s_b


def total_dense_bytes(shapes: Mapping[str, Sequence[int]], value_bytes: int = 4) -> int:
    """Bytes of every tensor's values sent dense (no framing)."""
    return sum(math.prod(s) * value_bytes for s in shapes.values())
