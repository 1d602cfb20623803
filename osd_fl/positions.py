"""Position coding: how the kept positions of one section are written and read.

Position codings of a set of ``count`` kept entries among ``slots`` slots:

* ``ALL``: every slot is kept (``count == slots``); no position bytes.
* ``BITMASK``: one bit per slot, ``ceil(slots / 8)`` bytes.
* ``FIXED``: the paper's fixed-width flat index, ``ceil(count * w / 8)`` bytes
  with ``w = ceil(log2(slots))`` bits.
* ``ELIAS_FANO``: sorted positions as ``L`` low bits each plus a unary-coded
  high part, ``ceil(count * L / 8) + ceil((count + ((slots - 1) >> L) + 1) / 8)``
  bytes; within 2 bits per entry of the information bound
  ``log2(C(slots, count))``.

The codec (:mod:`osd_fl.codec`) takes the cheapest of these per section
(:func:`best_coding`); :mod:`osd_fl.sizes` prices sections with it.
Reading checks that the positions are in range, sorted and unique and that
padding bits are zero, raising :class:`~osd_fl.errors.PayloadError`.
"""

from __future__ import annotations

import functools
import math
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from osd_fl.errors import PayloadError

__all__ = [
    "Coding",
    "best_coding",
    "decode_positions",
    "elias_fano_low_bits",
    "encode_positions",
    "index_width",
    "position_bytes",
]


class Coding(IntEnum):
    """How the kept positions of one section are written."""

    ALL = 0
    BITMASK = 1
    FIXED = 2
    ELIAS_FANO = 3


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


# --------------------------------------------------------------------------- bits


def _pack_uint(values: npt.NDArray[np.int64], width: int) -> bytes:
    if values.size == 0 or width == 0:
        return b""
    shifts = np.arange(width, dtype=np.int64)
    bits = ((values[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(bits, bitorder="little").tobytes()


#: Bytes of packed bits expanded at a time: keeps the transient memory of
#: unpacking positions bounded whatever the payload size.
_CHUNK_BYTES = 1 << 16


def _check_padding(buf: bytes, nbits: int, field: str) -> None:
    """Bits at index ``nbits`` and above (the padding of the last byte) must be zero."""
    full, rem = divmod(nbits, 8)
    tail = buf[full:]
    if rem and tail:
        if tail[0] >> rem:
            raise PayloadError(f"{field}: padding bits after the last position are not zero")
        tail = tail[1:]
    if tail.count(0) != len(tail):
        raise PayloadError(f"{field}: padding bits after the last position are not zero")


def _set_bits(buf: bytes, nbits: int, count: int, field: str, what: str) -> npt.NDArray[np.int64]:
    """Indices of the set bits among the first ``nbits`` of ``buf``; there must be exactly ``count``.

    The set bits are counted before any index is materialised, so a buffer
    full of ones costs no more than the ``count`` positions it declares.
    """
    _check_padding(buf, nbits, field)
    found = int.from_bytes(buf, "little").bit_count()
    if found != count:
        raise PayloadError(f"{field}: {what} has {found} set bits but count says {count}")
    out = np.empty(count, dtype=np.int64)
    filled = 0
    for start in range(0, len(buf), _CHUNK_BYTES):
        bits = np.unpackbits(
            np.frombuffer(buf, dtype=np.uint8, count=min(_CHUNK_BYTES, len(buf) - start), offset=start),
            bitorder="little",
        )
        ones = np.flatnonzero(bits)
        out[filled : filled + ones.size] = ones + start * 8
        filled += ones.size
    return out


def _unpack_uint(buf: bytes, count: int, width: int, field: str) -> npt.NDArray[np.int64]:
    """``count`` little-endian ``width``-bit unsigned integers packed back to back."""
    if count == 0 or width == 0:
        return np.zeros(count, dtype=np.int64)
    if width > 63:
        raise PayloadError(f"{field}: {width}-bit integers do not fit in int64")
    _check_padding(buf, count * width, field)
    out = np.empty(count, dtype=np.int64)
    # 8 values of `width` bits span exactly `width` bytes: chunks of a multiple
    # of 8 values start on a byte boundary, so each chunk unpacks on its own.
    step = 8 * max(1, _CHUNK_BYTES // width)
    for first in range(0, count, step):
        n = min(step, count - first)
        lo = first * width // 8
        hi = min(len(buf), (first * width + n * width + 7) // 8)
        bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8, count=hi - lo, offset=lo), bitorder="little")
        if bits.size < n * width:  # short buffer: read the missing bits as zero
            bits = np.concatenate([bits, np.zeros(n * width - bits.size, dtype=np.uint8)])
        rows = bits[: n * width].reshape(n, width)
        packed = np.packbits(rows, axis=1, bitorder="little")
        wide = np.zeros((n, 8), dtype=np.uint8)
        wide[:, : packed.shape[1]] = packed
        out[first : first + n] = wide.view("<u8").reshape(n).astype(np.int64)
    return out


def encode_positions(coding: Coding, param: int, positions: npt.NDArray[np.int64], slots: int) -> bytes:
    """Write sorted unique ``positions`` among ``slots`` with ``coding``."""
    if coding == Coding.ALL:
        return b""
    if coding == Coding.BITMASK:
        mask = np.zeros(slots, dtype=np.uint8)
        mask[positions] = 1
        return np.packbits(mask, bitorder="little").tobytes()
    if coding == Coding.FIXED:
        return _pack_uint(positions, index_width(slots))
    count = positions.size
    if count == 0:
        return b""
    low = param
    lows = _pack_uint(positions & ((1 << low) - 1), low)
    nbits = count + ((slots - 1) >> low) + 1
    high = np.zeros(nbits, dtype=np.uint8)
    high[(positions >> low) + np.arange(count, dtype=np.int64)] = 1
    return lows + np.packbits(high, bitorder="little").tobytes()


def decode_positions(
    coding: Coding, param: int, buf: bytes, count: int, slots: int, field: str
) -> npt.NDArray[np.int64]:
    """Read ``count`` positions among ``slots``; check they are in range, sorted and unique."""
    if coding == Coding.BITMASK:
        return _set_bits(buf, slots, count, field, "bitmask")
    if coding == Coding.FIXED:
        pos = _unpack_uint(buf, count, index_width(slots), field)
    else:
        low = param
        nlow = (count * low + 7) // 8
        lows = _unpack_uint(buf[:nlow], count, low, field)
        nbits = count + ((slots - 1) >> low) + 1
        ones = _set_bits(buf[nlow:], nbits, count, field, "Elias-Fano high part")
        pos = ((ones - np.arange(count, dtype=np.int64)) << low) | lows
    if count and (pos[0] < 0 or pos[-1] >= slots):
        raise PayloadError(f"{field}: position out of range [0, {slots})")
    if count > 1 and not bool(np.all(np.diff(pos) > 0)):
        raise PayloadError(f"{field}: positions are not strictly increasing (duplicates or unsorted)")
    if count and int(pos.max()) >= slots:
        raise PayloadError(f"{field}: position out of range [0, {slots})")
    return pos
