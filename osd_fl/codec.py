"""The wire format: a self-describing, versioned, checksummed binary payload.

Layout (all integers little-endian)::

    header   magic b"OSDF" | version u8 | value dtype u8 | method length u8 |
             method (ascii) | record count u32
    record   name length u16 | name (utf-8) | dtype u8 | kind u8 | ndim u8 |
             dims u32 x ndim | kind-specific part
               ZERO     nothing
               DENSE    numel values
               LOWRANK  k u16 | section A (n*k slots) | section B (k*d slots)
               SPARSE   section (numel slots)
               QUANT8   block u32 | float32 scale per block | int8 x numel
    section  coding u8 | param u8 | count u32 | positions | count values
    trailer  CRC-32 of everything before it, u32

Values are float32 or float16 (``value dtype``, the same for every method).
Positions use the cheapest exact coding (:mod:`osd_fl.positions`); the fixed
fields are the layouts of :mod:`osd_fl.sizes`, which prices them. Every length
is derived from fields that are checked before anything is allocated, and
:func:`decode` raises :class:`~osd_fl.errors.PayloadError` naming the field
on anything malformed. Nothing here unpickles or evaluates wire data.
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import numpy.typing as npt
import torch

from osd_fl import sizes
from osd_fl.dtypes import (
    FP16_MAX,
    INT8_BLOCK,
    INT8_SCALE,
    INT8_WIRE,
    QUANT8_SCALE,
    QUANT8_VALUE,
    TENSOR_CODES,
    TORCH_DTYPES,
    VALUE_CODES,
    VALUE_WIRE,
)
from osd_fl.dtypes import dtype_name as _dtype_name
from osd_fl.errors import PayloadError
from osd_fl.payload import Kind, Payload, Section, TensorRecord
from osd_fl.positions import Coding, best_coding, decode_positions, encode_positions, position_bytes

__all__ = [
    "FORMAT_VERSION",
    "MAX_DECODED_VALUE",
    "MAX_ELEMENTS",
    "VALUE_LIMIT",
    "TensorSpec",
    "decode",
    "encode",
    "iter_tensors",
    "reconstruct",
]

#: Without a model to check against, the most elements a payload's tensors may claim in total
#: (2**26: at most 512 MiB rebuilt as float64). Pass ``expected`` (what a server does) or a
#: larger ``max_elements`` for bigger updates.
MAX_ELEMENTS = 2**26
FORMAT_VERSION = 1
#: Largest magnitude a transmitted value may have. Keeps every product of two
#: factors and every sum of up to 2**16 of them finite in float32.
VALUE_LIMIT = float(2**48)
#: No value of a decoded DENSE, SPARSE or QUANT8 record is larger in magnitude (2**55): values and int8
#: block scales are at most :data:`VALUE_LIMIT` and int8 codes at most 127, with room for float32 rounding.
#: A LOWRANK record's rebuilt values are products of factors and have no such bound.
MAX_DECODED_VALUE = 128 * VALUE_LIMIT
_CODE_VALUES = {v: k for k, v in VALUE_CODES.items()}
_CODE_DTYPES = {v: k for k, v in TENSOR_CODES.items()}
_MAX_NDIM = 8
_MAX_NAME = 1024

#: ``(shape, dtype)`` of a tensor the receiver expects; dtype as a torch dtype or name.
TensorSpec = tuple[Sequence[int], "torch.dtype | str"]


# ------------------------------------------------------------------------ encoding


def _int8_bytes(values: npt.NDArray[np.float32]) -> bytes:
    """Blocks of :data:`INT8_BLOCK` values: all the blocks' float32 scales, then every value as int8."""
    return _int8_many([values])[0]


#: Value arrays up to this size are quantized together, one batch per payload (:class:`_Values`).
INT8_BATCH_MAX = 1 << 16


def _int8_many(arrays: Sequence[npt.NDArray[np.float32]]) -> list[bytes]:
    """:func:`_int8_bytes` of each array, the blocks of all of them quantized in one pass.

    Every array's blocks are laid out, zero-padded, in one ``blocks x
    INT8_BLOCK`` table, so the scales and the quantized values of all arrays
    come from a handful of numpy calls instead of about ten per array; each
    block's arithmetic (its largest magnitude, the division, the rounding)
    does not depend on its neighbours. One array of whole blocks is not copied.
    """
    counts = [int(a.size) for a in arrays]
    block_at = [0, *itertools.accumulate(-(-n // INT8_BLOCK) for n in counts)]
    if len(arrays) == 1 and counts[0] == block_at[1] * INT8_BLOCK:  # whole blocks: no padded copy
        table = arrays[0].astype(np.float32, copy=False).reshape(block_at[1], INT8_BLOCK)
    else:
        table = np.zeros((block_at[-1], INT8_BLOCK), dtype=np.float32)
        flat = table.reshape(-1)
        for a, b0, n in zip(arrays, block_at, counts, strict=False):
            flat[b0 * INT8_BLOCK : b0 * INT8_BLOCK + n] = a.reshape(-1)
    scales = np.abs(table).max(axis=1) / np.float32(127)
    safe = np.where(scales > 0, scales, np.float32(1))
    x = np.rint(table / safe[:, None])
    q = np.clip(x, -127, 127, out=x).astype(INT8_WIRE).reshape(-1)
    wire_scales = scales.astype(INT8_SCALE, copy=False)
    return [
        wire_scales[b0:b1].tobytes() + q[b0 * INT8_BLOCK : b0 * INT8_BLOCK + n].tobytes()
        for b0, b1, n in zip(block_at[:-1], block_at[1:], counts, strict=True)
    ]


def _values_bytes(values: npt.NDArray[np.float32], value_dtype: str) -> bytes:
    if value_dtype == "int8":
        return _int8_bytes(values)
    if value_dtype == "float16":
        return np.clip(values, -FP16_MAX, FP16_MAX).astype(VALUE_WIRE[value_dtype]).tobytes()
    return values.astype(VALUE_WIRE[value_dtype]).tobytes()


class _Values:
    """Writes a payload's value arrays in its value dtype.

    With int8 values the small arrays of the whole payload (dense vectors,
    factor sections) are quantized in one :func:`_int8_many` call up front;
    larger ones, and other dtypes, are written one by one.
    """

    def __init__(self, value_dtype: str, records: Sequence[TensorRecord]) -> None:
        self.value_dtype = value_dtype
        self._ready: dict[int, bytes] = {}
        if value_dtype != "int8":
            return
        small = [  # every section's values go through this writer (QUANT8 and ZERO records have none)
            s.values
            for rec in records
            for s in rec.sections
            if isinstance(s.values, np.ndarray) and s.values.size <= INT8_BATCH_MAX
        ]
        self._arrays = small  # held so that their ids stay theirs while this writer lives
        if len(small) > 1:
            self._ready = dict(zip(map(id, small), _int8_many(small), strict=True))

    def __call__(self, values: npt.NDArray[np.float32]) -> bytes:
        ready = self._ready.get(id(values))
        return ready if ready is not None else _values_bytes(values, self.value_dtype)


def _encode_section(section: Section, values: _Values, field: str) -> bytes:
    count = section.count
    if section.positions is None:
        if count != section.slots:
            raise PayloadError(f"{field}: a section without positions must hold every slot")
        coding, param = Coding.ALL, 0
        pos_bytes = b""
    else:
        if section.positions.shape != (count,):
            raise PayloadError(f"{field}: {section.positions.size} positions for {count} values")
        coding, param, _ = best_coding(count, section.slots)
        pos_bytes = b"" if coding == Coding.ALL else encode_positions(coding, param, section.positions, section.slots)
    return sizes.SECTION_HEAD.pack(int(coding), param, count) + pos_bytes + values(section.values)


def _sections(rec: TensorRecord, wanted: int, field: str) -> list[Section]:
    if len(rec.sections) != wanted:
        raise PayloadError(f"{field}: a {rec.kind.name} record needs {wanted} section(s), it has {len(rec.sections)}")
    return rec.sections


def _encode_body(rec: TensorRecord, values: _Values, field: str) -> list[bytes]:
    """The kind-specific part of one record."""
    if rec.kind == Kind.DENSE:
        return [values(_sections(rec, 1, field)[0].values)]
    if rec.kind == Kind.LOWRANK:
        a, b = _sections(rec, 2, field)
        return [
            sizes.RANK.pack(rec.rank),
            _encode_section(a, values, f"{field} factor A"),
            _encode_section(b, values, f"{field} factor B"),
        ]
    if rec.kind == Kind.SPARSE:
        return [_encode_section(_sections(rec, 1, field)[0], values, f"{field} entries")]
    if rec.kind == Kind.QUANT8:
        if rec.scales is None or rec.qvalues is None:
            raise PayloadError(f"{field}: a QUANT8 record needs scales and qvalues")
        return [
            sizes.BLOCK.pack(rec.block),
            rec.scales.astype(QUANT8_SCALE).tobytes(),
            rec.qvalues.astype(QUANT8_VALUE).tobytes(),
        ]
    return []


def _encode_record(rec: TensorRecord, values: _Values) -> list[bytes]:
    field = f"tensor {rec.name!r}"
    if rec.dtype not in TENSOR_CODES:
        raise PayloadError(f"{field}: dtype {rec.dtype!r} is not one of {list(TENSOR_CODES)}")
    name = rec.name.encode("utf-8")
    try:
        head = [
            sizes.NAME_LEN.pack(len(name)) + name,
            sizes.RECORD_HEAD.pack(TENSOR_CODES[rec.dtype], int(rec.kind), len(rec.shape)),
            sizes.dims(len(rec.shape)).pack(*rec.shape),
        ]
        return head + _encode_body(rec, values, field)
    except struct.error as exc:  # a field out of its wire range (name length, rank, dims)
        raise PayloadError(f"{field}: a field does not fit the wire format ({exc})") from None


def encode(payload: Payload) -> bytes:
    """Serialize ``payload`` to bytes (the exact bytes that travel).

    Raises
    ------
    PayloadError
        If ``payload`` cannot be written (an unknown value dtype or tensor
        dtype, a record missing the sections its kind needs, a field out of
        its wire range); the message names the tensor and the problem.
    """
    method = payload.method.encode("ascii")
    if len(method) > 255:
        raise PayloadError("method name longer than 255 bytes")
    if payload.value_dtype not in VALUE_CODES:
        raise PayloadError(f"value dtype {payload.value_dtype!r} is not one of {list(VALUE_CODES)}")
    parts: list[bytes] = [
        sizes.MAGIC,
        sizes.HEAD.pack(FORMAT_VERSION, VALUE_CODES[payload.value_dtype], len(method)),
        method,
        sizes.COUNT.pack(len(payload.records)),
    ]
    values = _Values(payload.value_dtype, payload.records)
    for rec in payload.records:
        parts.extend(_encode_record(rec, values))
    body = b"".join(parts)
    return body + sizes.CRC.pack(zlib.crc32(body))


# ------------------------------------------------------------------------ decoding


class _Reader:
    def __init__(self, data: bytes, end: int) -> None:
        self.data = data
        self.pos = 0
        self.end = end

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise PayloadError(f"{field}: needs {n} bytes but only {self.end - self.pos} remain (truncated payload?)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, layout: struct.Struct, field: str) -> tuple[int, ...]:
        return layout.unpack(self.take(layout.size, field))


def _check_values(values: npt.NDArray[np.float32], field: str) -> None:
    if values.size and not bool(np.all(np.abs(values) <= VALUE_LIMIT)):
        raise PayloadError(
            f"{field}: values must be finite with magnitude <= {VALUE_LIMIT:.3g} (found NaN/Inf or huge)"
        )


def _read_values(reader: _Reader, count: int, value_dtype: str, field: str) -> npt.NDArray[np.float32]:
    if value_dtype == "int8":
        nblocks = -(-count // INT8_BLOCK)
        scales = np.frombuffer(reader.take(nblocks * INT8_SCALE.itemsize, f"{field} scales"), dtype=INT8_SCALE)
        if scales.size and not bool(np.all((scales >= 0) & (scales <= VALUE_LIMIT / 127))):
            raise PayloadError(
                f"{field}: int8 block scales must be in [0, {VALUE_LIMIT / 127:.3g}] (NaN/Inf, negative or huge)"
            )
        q = np.frombuffer(reader.take(count, f"{field} int8 values"), dtype=INT8_WIRE)
        if q.size and int(q.min()) < -127:
            raise PayloadError(f"{field}: int8 value -128 is not produced by the encoder (range is -127..127)")
        return (q.astype(np.float32) * np.repeat(scales, INT8_BLOCK)[:count]).astype(np.float32)
    raw = reader.take(count * sizes.value_bytes(value_dtype), f"{field} values")
    values = np.frombuffer(raw, dtype=VALUE_WIRE[value_dtype]).astype(np.float32)
    _check_values(values, f"{field} values")
    return values


def _read_section(reader: _Reader, slots: int, value_dtype: str, field: str) -> Section:
    coding_raw, param, count = reader.unpack(sizes.SECTION_HEAD, f"{field} header")
    try:
        coding = Coding(coding_raw)
    except ValueError:
        raise PayloadError(f"{field}: unknown position coding {coding_raw}") from None
    if count > slots:
        raise PayloadError(f"{field}: count {count} exceeds the {slots} slots")
    if coding == Coding.ALL:
        if count != slots:
            raise PayloadError(f"{field}: coding ALL needs count == slots ({slots}), got {count}")
        return Section(slots=slots, values=_read_values(reader, count, value_dtype, field))
    if coding == Coding.ELIAS_FANO:
        if param > 62:
            raise PayloadError(f"{field}: Elias-Fano low bits {param} > 62")
    elif param != 0:
        raise PayloadError(f"{field}: parameter must be 0 for coding {coding.name}")
    nbytes = position_bytes(coding, count, slots, param)
    value_bytes = sizes.values_bytes(count, value_dtype)
    if nbytes + value_bytes > reader.remaining:
        # Checked before any position is unpacked: a count the payload's bytes
        # cannot back is refused without allocating anything for it.
        raise PayloadError(
            f"{field}: count {count} needs {nbytes} position bytes and {value_bytes} value bytes "
            f"but only {reader.remaining} remain (truncated payload?)"
        )
    buf = reader.take(nbytes, f"{field} positions")
    positions = decode_positions(coding, param, buf, count, slots, f"{field} positions")
    values = _read_values(reader, count, value_dtype, field)
    return Section(slots=slots, values=values, positions=positions)


def decode(
    blob: bytes | bytearray | memoryview,
    *,
    expected: Mapping[str, TensorSpec] | None = None,
    max_bytes: int | None = None,
    max_elements: int = MAX_ELEMENTS,
    method: str | None = None,
) -> Payload:
    """Parse and validate a payload without rebuilding any tensor.

    Parameters
    ----------
    blob
        The bytes received.
    expected
        ``{name: (shape, dtype)}`` of the model the update belongs to. When
        given, the payload must hold exactly these names with these shapes and
        dtypes; each record is checked against it before its data is read.
    max_bytes
        Reject payloads larger than this before parsing (before copying them).
    max_elements
        Without ``expected``: the most entries the payload's tensors may claim
        in total (so also each one), checked on each record's shape before
        its data is read. It bounds what :func:`reconstruct` allocates.
    method
        If given, the method named in the header must be exactly this
        (checked before any record is read).

    Raises
    ------
    PayloadError
        On anything malformed; the message names the field.

    """
    size = memoryview(blob).nbytes
    if max_bytes is not None and size > max_bytes:
        raise PayloadError(f"payload: {size} bytes exceeds the maximum of {max_bytes}")
    if size < sizes.header_bytes(""):
        raise PayloadError(f"payload: {size} bytes is shorter than the smallest valid payload")
    data = bytes(blob)
    magic = data[: len(sizes.MAGIC)]
    if magic != sizes.MAGIC:
        raise PayloadError(f"magic: expected {sizes.MAGIC!r}, got {magic!r} (not an osd-fl payload)")
    (crc,) = sizes.CRC.unpack(data[-sizes.CRC.size :])
    if zlib.crc32(memoryview(data)[: -sizes.CRC.size]) != crc:  # a view: no second copy of the payload
        raise PayloadError("checksum: CRC-32 mismatch (payload corrupted or truncated)")
    reader = _Reader(data, len(data) - sizes.CRC.size)
    reader.take(len(sizes.MAGIC), "magic")
    version, vcode, mlen = reader.unpack(sizes.HEAD, "header")
    if version != FORMAT_VERSION:
        raise PayloadError(f"version: payload format {version}, this decoder reads {FORMAT_VERSION}")
    if vcode not in _CODE_VALUES:
        raise PayloadError(f"value dtype: unknown code {vcode}")
    value_dtype = _CODE_VALUES[vcode]
    raw_method = reader.take(mlen, "method")
    if not all(0x20 <= c < 0x7F for c in raw_method):
        raise PayloadError(f"method: {raw_method!r} is not printable ASCII")
    name = raw_method.decode("ascii")
    if method is not None and name != method:
        raise PayloadError(f"method: payload is {name!r}, expected {method!r}")
    (nrec,) = reader.unpack(sizes.COUNT, "record count")
    if expected is not None and nrec != len(expected):
        raise PayloadError(f"record count: payload has {nrec} tensors, the model has {len(expected)}")
    if nrec > reader.remaining // sizes.MIN_RECORD_BYTES:
        raise PayloadError(f"record count: {nrec} records cannot fit in {reader.remaining} bytes")
    records: list[TensorRecord] = []
    seen: set[str] = set()
    claimed = 0
    for index in range(nrec):
        rec = _read_record(reader, index, value_dtype, expected, (max_elements, claimed), seen)
        claimed += rec.numel
        records.append(rec)
    if reader.pos != reader.end:
        raise PayloadError(f"payload: {reader.end - reader.pos} unexpected bytes after the last record")
    return Payload(method=name, value_dtype=value_dtype, records=records)


def _read_record(
    reader: _Reader,
    index: int,
    value_dtype: str,
    expected: Mapping[str, TensorSpec] | None,
    limit: tuple[int, int],
    seen: set[str],
) -> TensorRecord:
    (nlen,) = reader.unpack(sizes.NAME_LEN, f"record {index} name length")
    if nlen > _MAX_NAME:
        raise PayloadError(f"record {index} name: length {nlen} > {_MAX_NAME}")
    try:
        name = reader.take(nlen, f"record {index} name").decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError(f"record {index} name: not UTF-8") from None
    field = f"tensor {name!r}"
    if name in seen:
        raise PayloadError(f"{field}: appears twice")
    seen.add(name)
    dcode, kcode, ndim = reader.unpack(sizes.RECORD_HEAD, f"{field} header")
    if dcode not in _CODE_DTYPES:
        raise PayloadError(f"{field}: unknown dtype code {dcode}")
    try:
        kind = Kind(kcode)
    except ValueError:
        raise PayloadError(f"{field}: unknown kind {kcode}") from None
    if ndim > _MAX_NDIM:
        raise PayloadError(f"{field}: ndim {ndim} > {_MAX_NDIM}")
    shape = tuple(int(x) for x in reader.unpack(sizes.dims(ndim), f"{field} shape"))
    dtype = _CODE_DTYPES[dcode]
    numel = math.prod(shape)
    if expected is not None:
        if name not in expected:
            raise PayloadError(f"{field}: not a tensor of the model (expected one of {sorted(expected)[:5]}...)")
        exp_shape, exp_dtype = expected[name]
        if tuple(int(s) for s in exp_shape) != shape:
            raise PayloadError(f"{field}: shape {shape} does not match the model's {tuple(exp_shape)}")
        if _dtype_name(exp_dtype) != dtype:
            raise PayloadError(f"{field}: dtype {dtype} does not match the model's {_dtype_name(exp_dtype)}")
    elif numel > limit[0] - limit[1]:
        raise PayloadError(
            f"{field}: {numel} elements exceeds the limit of {limit[0]} ({limit[1]} already claimed by earlier tensors)"
        )
    rec = TensorRecord(name=name, shape=shape, dtype=dtype, kind=kind)
    if kind == Kind.DENSE:
        rec.sections = [Section(slots=numel, values=_read_values(reader, numel, value_dtype, field))]
    elif kind == Kind.LOWRANK:
        if ndim < 2 or numel == 0:
            raise PayloadError(f"{field}: a low-rank record needs a non-empty matrix, got shape {shape}")
        n, d = shape[0], numel // shape[0]
        (k,) = reader.unpack(sizes.RANK, f"{field} rank")
        if not 1 <= k <= min(n, d):
            raise PayloadError(f"{field}: rank {k} outside 1..{min(n, d)}")
        rec.rank = k
        rec.sections = [
            _read_section(reader, n * k, value_dtype, f"{field} factor A"),
            _read_section(reader, k * d, value_dtype, f"{field} factor B"),
        ]
    elif kind == Kind.SPARSE:
        rec.sections = [_read_section(reader, numel, value_dtype, f"{field} entries")]
    elif kind == Kind.QUANT8:
        (block,) = reader.unpack(sizes.BLOCK, f"{field} block")
        if block < 1 or block > max(numel, 1):
            raise PayloadError(f"{field}: block {block} outside 1..{numel}")
        nblocks = -(-numel // block)
        scale_bytes, value_bytes = sizes.quant8_body_bytes(nblocks, numel)
        scales = np.frombuffer(reader.take(scale_bytes, f"{field} scales"), dtype=QUANT8_SCALE).astype(np.float32)
        _check_values(scales, f"{field} scales")
        if scales.size and float(scales.min()) < 0:
            raise PayloadError(f"{field} scales: negative scale")
        q = np.frombuffer(reader.take(value_bytes, f"{field} int8 values"), dtype=QUANT8_VALUE)
        if q.size and int(q.min()) < -127:
            raise PayloadError(f"{field} int8 values: -128 is not a valid code (range is -127..127)")
        rec.block, rec.scales, rec.qvalues = block, scales, q
    return rec


# -------------------------------------------------------------------- reconstruction


def _ordered_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as rank-1 terms added in index order, each a rounded elementwise op.

    Unlike a BLAS product (blocked, FMA, thread-dependent order), every
    element's float bits depend only on the inputs: the same on any CPU, GPU
    and thread count.
    """
    out = a[:, :1] * b[:1, :]
    for j in range(1, a.shape[1]):
        out = out + a[:, j : j + 1] * b[j : j + 1, :]
    return out


def reconstruct(rec: TensorRecord, device: torch.device | str | None = None, *, exact: bool = False) -> torch.Tensor:
    """Rebuild one tensor (float32 compute, then the record's dtype).

    With ``exact=True`` a low-rank product is formed term by term in a fixed
    order (:func:`_ordered_product`), so the result is bit-identical on every
    machine: what a compressed broadcast needs, where server and clients must
    hold the same model.

    Raises
    ------
    PayloadError
        If the rebuilt tensor holds NaN or Inf (e.g. a float16 tensor whose
        bounded values overflow float16): what comes out is always finite.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if rec.kind == Kind.ZERO:
        out = torch.zeros(rec.shape, dtype=torch.float32, device=dev)
    elif rec.kind in (Kind.DENSE, Kind.SPARSE):
        out = torch.from_numpy(rec.sections[0].dense()).to(dev).reshape(rec.shape)
    elif rec.kind == Kind.LOWRANK:
        n, d = rec.matrix_shape
        a = torch.from_numpy(rec.sections[0].dense()).to(dev).reshape(n, rec.rank)
        b = torch.from_numpy(rec.sections[1].dense()).to(dev).reshape(rec.rank, d)
        out = (_ordered_product(a, b) if exact else a @ b).reshape(rec.shape)
    else:
        assert rec.scales is not None and rec.qvalues is not None
        scales = np.repeat(rec.scales, rec.block)[: rec.numel]
        vals = rec.qvalues.astype(np.float32) * scales
        out = torch.from_numpy(vals).to(dev).reshape(rec.shape)
    out = out.to(TORCH_DTYPES[rec.dtype])
    if rec.kind != Kind.ZERO and not bool(torch.isfinite(out).all()):
        # Every value was finite and bounded on decoding, but a product or the
        # cast to a narrow dtype (float16 tops out at 65504) can still overflow.
        raise PayloadError(f"tensor {rec.name!r}: rebuilds to NaN/Inf values in {rec.dtype} (out of its range)")
    return out


def iter_tensors(
    payload: Payload, device: torch.device | str | None = None, *, exact: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one at a time, so a receiver holds one at once (``exact``: see :func:`reconstruct`)."""
    for rec in payload.records:
        yield rec.name, reconstruct(rec, device, exact=exact)
