"""Every byte size of a payload, in one place.

Every function here returns the *exact* number of bytes the codec
(:mod:`osd_fl.codec`) writes, so a selection made against these costs is a
selection against the serialized payload; tests check the two agree
(``tests/test_sizes.py``). The fixed-width fields of the layout are the
:class:`struct.Struct` s below, which the codec packs and unpacks with, so a
field's size and the bytes written for it cannot drift apart. Position bytes
come from the position coding (:func:`osd_fl.positions.best_coding`), value
bytes from the value dtype (:data:`osd_fl.dtypes.VALUE_WIRE`).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Collection, Mapping, Sequence

from osd_fl.dtypes import INT8_BLOCK, INT8_SCALE, INT8_WIRE, QUANT8_SCALE, QUANT8_VALUE, VALUE_WIRE
from osd_fl.payload import Kind, Section, TensorRecord, matrix_dims
from osd_fl.positions import best_coding, index_width

__all__ = [
    "BLOCK",
    "COUNT",
    "CRC",
    "DIM",
    "HEAD",
    "LOWRANK_OVERHEAD",
    "MAGIC",
    "MIN_RECORD_BYTES",
    "NAME_LEN",
    "RANK",
    "RECORD_HEAD",
    "SECTION_HEAD",
    "SECTION_HEADER",
    "SPARSE_OVERHEAD",
    "UNBUDGETED_SLACK",
    "dims",
    "entries_room",
    "factor_room",
    "header_bytes",
    "matrix_budget",
    "paper_bits",
    "payload_parts",
    "quant8_body_bytes",
    "record_body_bytes",
    "record_bytes",
    "record_header_bytes",
    "section_bytes",
    "selection_bytes",
    "total_dense_bytes",
    "unbudgeted_limit",
    "value_bytes",
    "values_bytes",
]

# --------------------------------------------------------------------- the layout

#: First bytes of every payload.
MAGIC = b"OSDF"
#: Header: format version, value dtype code, method name length (u8 each).
HEAD = struct.Struct("<BBB")
#: Header: record count (u32).
COUNT = struct.Struct("<I")
#: Trailer: CRC-32 of everything before it (u32).
CRC = struct.Struct("<I")
#: Record: name length (u16).
NAME_LEN = struct.Struct("<H")
#: Record: tensor dtype code, kind, ndim (u8 each).
RECORD_HEAD = struct.Struct("<BBB")
#: Record: one dimension (u32).
DIM = struct.Struct("<I")
#: LOWRANK record: inner dimension k (u16).
RANK = struct.Struct("<H")
#: QUANT8 record: values per scale (u32).
BLOCK = struct.Struct("<I")
#: Section header: coding (u8), parameter (u8), count (u32).
SECTION_HEAD = struct.Struct("<BBI")

#: Bytes of one section header.
SECTION_HEADER = SECTION_HEAD.size
#: Kind-specific bytes of a low-rank record beyond its values and positions:
#: k (u16) and two section headers.
LOWRANK_OVERHEAD = RANK.size + 2 * SECTION_HEADER
#: Kind-specific bytes of a sparse (top-k) record beyond values and positions.
SPARSE_OVERHEAD = SECTION_HEADER
#: Smallest record: name length, dtype, kind and ndim (empty name, scalar ZERO).
MIN_RECORD_BYTES = NAME_LEN.size + RECORD_HEAD.size
#: Framing slack allowed on top of twice the float32 model for an unbudgeted method.
UNBUDGETED_SLACK = 64 * 1024


def dims(ndim: int) -> struct.Struct:
    """The shape field of a record of ``ndim`` dimensions (u32 each)."""
    return struct.Struct(f"<{ndim}I")


# ----------------------------------------------------------------------- framing


def value_bytes(dtype_name: str) -> int:
    """Bytes of one transmitted value in ``dtype_name`` (4 float32, 2 float16, 1 int8 before its block scales)."""
    if dtype_name == "int8":
        return INT8_WIRE.itemsize
    return VALUE_WIRE[dtype_name].itemsize


def values_bytes(count: int, dtype_name: str) -> int:
    """Exact bytes of ``count`` values of one section in ``dtype_name`` (int8: with one scale per block)."""
    if dtype_name == "int8":
        return count * INT8_WIRE.itemsize + -(-count // INT8_BLOCK) * INT8_SCALE.itemsize
    return count * value_bytes(dtype_name)


def _scale_reserve(room: int, sections: int, dtype_name: str) -> int:
    """``room`` less what int8 block scales of ``sections`` sections can take (nothing for floats).

    Each section of ``c`` values has at most ``c / INT8_BLOCK + 1`` scales of 4 bytes, so the
    values and positions selected at one byte a value fit when they get ``(room - 4 S) * B / (B + 4)``.
    """
    if dtype_name != "int8" or room <= 0:
        return room
    per = INT8_SCALE.itemsize
    return max(0, (room - per * sections) * INT8_BLOCK // (INT8_BLOCK + per))


def header_bytes(method: str) -> int:
    """Bytes of the payload header and trailer for ``method``."""
    return len(MAGIC) + HEAD.size + len(method.encode("ascii")) + COUNT.size + CRC.size


def record_header_bytes(name: str, ndim: int) -> int:
    """Bytes of a record's common header (name, dtype, kind, shape)."""
    return NAME_LEN.size + len(name.encode("utf-8")) + RECORD_HEAD.size + DIM.size * ndim


# ---------------------------------------------------------------------- sections


def section_bytes(section: Section, value_dtype: str) -> int:
    """Exact encoded bytes of one section: header, positions and values."""
    count = section.count
    positions = 0 if section.positions is None else best_coding(count, section.slots)[2]
    return SECTION_HEADER + positions + values_bytes(count, value_dtype)


def selection_bytes(counts: Sequence[int], slots: Sequence[int], value_bytes: int) -> int:
    """Exact bytes of positions and values of sections with ``counts`` kept entries (no headers)."""
    return sum(best_coding(c, m)[2] + c * value_bytes for c, m in zip(counts, slots, strict=True))


def factor_room(budget: int, matrices: int = 1, value_dtype: str = "float32") -> int:
    """Bytes left for the positions and values of ``matrices`` low-rank records' factors within ``budget``.

    With ``int8`` values, what their block scales may take is set aside first.
    """
    return _scale_reserve(budget - LOWRANK_OVERHEAD * matrices, 2 * matrices, value_dtype)


def entries_room(budget: int, matrices: int = 1, value_dtype: str = "float32") -> int:
    """Bytes left for the positions and values of ``matrices`` sparse records within ``budget`` (see factor_room)."""
    return _scale_reserve(budget - SPARSE_OVERHEAD * matrices, matrices, value_dtype)


# ----------------------------------------------------------------------- records


def quant8_body_bytes(nblocks: int, numel: int) -> tuple[int, int]:
    """``(scale bytes, int8 value bytes)`` of a QUANT8 record with ``nblocks`` blocks over ``numel`` values."""
    return nblocks * QUANT8_SCALE.itemsize, numel * QUANT8_VALUE.itemsize


def record_body_bytes(rec: TensorRecord, value_dtype: str = "float32") -> int:
    """Exact kind-specific bytes the codec writes for ``rec`` (what follows its name and shape)."""
    if rec.kind == Kind.ZERO:
        return 0
    if rec.kind == Kind.DENSE:
        return values_bytes(rec.sections[0].count, value_dtype)
    if rec.kind == Kind.LOWRANK:
        return RANK.size + sum(section_bytes(s, value_dtype) for s in rec.sections)
    if rec.kind == Kind.SPARSE:
        return section_bytes(rec.sections[0], value_dtype)
    assert rec.scales is not None and rec.qvalues is not None
    scales, values = quant8_body_bytes(int(rec.scales.size), int(rec.qvalues.size))
    return BLOCK.size + scales + values


def record_bytes(rec: TensorRecord, value_dtype: str = "float32") -> int:
    """Exact bytes the codec writes for ``rec``, its header included."""
    return record_header_bytes(rec.name, len(rec.shape)) + record_body_bytes(rec, value_dtype)


# ----------------------------------------------------------------------- budgets


def matrix_budget(n: int, d: int, rank: int, value_dtype: str) -> int:
    """Kind-specific bytes every method may spend on one ``n x d`` matrix.

    This is exactly what dense rank-``rank`` TruncSVD factors cost in our
    format: ``rank * (n + d)`` values (in ``value_dtype``, int8 with its
    block scales) plus the low-rank record's fixed fields. It is the
    paper's per-matrix budget ``32 * r * (n + d)`` bits, at the configured
    value precision.
    """
    return LOWRANK_OVERHEAD + values_bytes(rank * n, value_dtype) + values_bytes(rank * d, value_dtype)


def payload_parts(
    shapes: Mapping[str, Sequence[int]],
    method: str,
    rank: int,
    value_dtype: str,
    *,
    budget_dtype: str | None = None,
    dense: Collection[str],
    compressed: Collection[str],
) -> tuple[int, int]:
    """``(fixed, matrices)`` bytes of a payload of tensors ``shapes``.

    ``fixed``: the header, every record's header and the ``dense`` tensors'
    values; ``matrices``: the :func:`matrix_budget` of every ``compressed``
    tensor seen as ``shape[0] x prod(shape[1:])``, priced in
    ``budget_dtype`` (``value_dtype`` when None). Other
    tensors (skipped) cost only their record header.
    """
    fixed = header_bytes(method)
    matrices = 0
    for name, shape in shapes.items():
        fixed += record_header_bytes(name, len(shape))
        if name in dense:
            fixed += values_bytes(math.prod(shape), value_dtype)
        elif name in compressed:
            n, d = matrix_dims(shape)
            matrices += matrix_budget(n, d, rank, budget_dtype or value_dtype)
    return fixed, matrices


def unbudgeted_limit(shapes: Mapping[str, Sequence[int]]) -> int:
    """The largest payload of an unbudgeted method (dense, fp16, int8): twice float32 plus framing slack."""
    return 2 * total_dense_bytes(shapes) + UNBUDGETED_SLACK


def paper_bits(n: int, d: int, k: int, s_a: int, s_b: int, value_bits: int = 32) -> int:
    """The paper's memory of one layer: ``32(s_A + s_B) + ceil(log2(n k)) s_A + ceil(log2(k d)) s_B``."""
    return value_bits * (s_a + s_b) + index_width(n * k) * s_a + index_width(k * d) * s_b


def total_dense_bytes(shapes: Mapping[str, Sequence[int]], value_bytes: int = VALUE_WIRE["float32"].itemsize) -> int:
    """Bytes of every tensor's values sent dense (no framing); float32 unless ``value_bytes`` says otherwise."""
    return sum(math.prod(s) * value_bytes for s in shapes.values())
