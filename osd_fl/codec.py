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
Positions use the cheapest exact coding (:mod:`osd_fl.budget`). Every length
is derived from fields that are checked before anything is allocated, and
:func:`decode` raises :class:`~osd_fl.errors.PayloadError` naming the field
on anything malformed. Nothing here unpickles or evaluates wire data.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import numpy.typing as npt
import torch

from osd_fl.budget import SECTION_HEADER, Coding, best_coding, index_width, position_bytes
from osd_fl.errors import PayloadError
from osd_fl.payload import DTYPE_CODES, Kind, Payload, Section, TensorRecord

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "VALUE_LIMIT",
    "TensorSpec",
    "decode",
    "encode",
    "header_bytes",
    "iter_tensors",
    "reconstruct",
]

MAGIC = b"OSDF"
#: Without a model to check against, the most elements a payload's tensors may claim in total
#: (2**26: at most 512 MiB rebuilt as float64). Pass ``expected`` (what a server does) or a
#: larger ``max_elements`` for bigger updates.
MAX_ELEMENTS = 2**26
FORMAT_VERSION = 1
#: Largest magnitude a transmitted value may have. Keeps every product of two
#: factors and every sum of up to 2**16 of them finite in float32.
VALUE_LIMIT = float(2**48)
_FP16_MAX = 65504.0
_VALUE_CODES = {"float32": 0, "float16": 1}
_CODE_VALUES = {v: k for k, v in _VALUE_CODES.items()}
_CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
_MAX_NDIM = 8
_MAX_NAME = 1024
#: Smallest record: name length u16, dtype, kind and ndim u8 (empty name, scalar ZERO).
_MIN_RECORD_BYTES = 5

#: ``(shape, dtype)`` of a tensor the receiver expects; dtype as a torch dtype or name.
TensorSpec = tuple[Sequence[int], "torch.dtype | str"]


def header_bytes(method: str) -> int:
    """Bytes of the payload header and trailer for ``method``."""
    return 4 + 1 + 1 + 1 + len(method.encode("ascii")) + 4 + 4


def record_header_bytes(name: str, ndim: int) -> int:
    """Bytes of a record's common header (name, dtype, kind, shape)."""
    return 2 + len(name.encode("utf-8")) + 3 + 4 * ndim


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


# ------------------------------------------------------------------------ encoding


def _values_bytes(values: npt.NDArray[np.float32], value_dtype: str) -> bytes:
    if value_dtype == "float16":
        return np.clip(values, -_FP16_MAX, _FP16_MAX).astype("<f2").tobytes()
    return values.astype("<f4").tobytes()


def _encode_section(section: Section, value_dtype: str) -> bytes:
    count = section.count
    if section.positions is None:
        if count != section.slots:
            raise ValueError("a section without positions must hold every slot")
        coding, param = Coding.ALL, 0
        pos_bytes = b""
    else:
        coding, param, _ = best_coding(count, section.slots)
        pos_bytes = b"" if coding == Coding.ALL else encode_positions(coding, param, section.positions, section.slots)
    return struct.pack("<BBI", int(coding), param, count) + pos_bytes + _values_bytes(section.values, value_dtype)


def encode(payload: Payload) -> bytes:
    """Serialize ``payload`` to bytes (the exact bytes that travel)."""
    method = payload.method.encode("ascii")
    if len(method) > 255:
        raise ValueError("method name longer than 255 bytes")
    parts: list[bytes] = [
        MAGIC,
        struct.pack("<BBB", FORMAT_VERSION, _VALUE_CODES[payload.value_dtype], len(method)),
        method,
        struct.pack("<I", len(payload.records)),
    ]
    for rec in payload.records:
        name = rec.name.encode("utf-8")
        parts.append(struct.pack("<H", len(name)) + name)
        parts.append(struct.pack("<BBB", DTYPE_CODES[rec.dtype], int(rec.kind), len(rec.shape)))
        parts.append(struct.pack(f"<{len(rec.shape)}I", *rec.shape))
        if rec.kind == Kind.DENSE:
            parts.append(_values_bytes(rec.sections[0].values, payload.value_dtype))
        elif rec.kind == Kind.LOWRANK:
            parts.append(struct.pack("<H", rec.rank))
            parts.extend(_encode_section(s, payload.value_dtype) for s in rec.sections)
        elif rec.kind == Kind.SPARSE:
            parts.append(_encode_section(rec.sections[0], payload.value_dtype))
        elif rec.kind == Kind.QUANT8:
            assert rec.scales is not None and rec.qvalues is not None
            parts.append(struct.pack("<I", rec.block))
            parts.append(rec.scales.astype("<f4").tobytes())
            parts.append(rec.qvalues.astype(np.int8).tobytes())
    body = b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


def encoded_section_bytes(count: int, slots: int, value_bytes: int) -> int:
    """Exact encoded size of one section, header included."""
    return SECTION_HEADER + best_coding(count, slots)[2] + count * value_bytes


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

    def unpack(self, fmt: str, field: str) -> tuple[int, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), field))


def _dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def _check_values(values: npt.NDArray[np.float32], field: str) -> None:
    if values.size and not bool(np.all(np.abs(values) <= VALUE_LIMIT)):
        raise PayloadError(
            f"{field}: values must be finite with magnitude <= {VALUE_LIMIT:.3g} (found NaN/Inf or huge)"
        )


def _read_values(reader: _Reader, count: int, value_dtype: str, field: str) -> npt.NDArray[np.float32]:
    size = 2 if value_dtype == "float16" else 4
    raw = reader.take(count * size, f"{field} values")
    values = np.frombuffer(raw, dtype="<f2" if size == 2 else "<f4").astype(np.float32)
    _check_values(values, f"{field} values")
    return values


def _read_section(reader: _Reader, slots: int, value_dtype: str, field: str) -> Section:
    coding_raw, param, count = reader.unpack("<BBI", f"{field} header")
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
    value_bytes = count * (2 if value_dtype == "float16" else 4)
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
    if size < header_bytes(""):
        raise PayloadError(f"payload: {size} bytes is shorter than the smallest valid payload")
    data = bytes(blob)
    if data[:4] != MAGIC:
        raise PayloadError(f"magic: expected {MAGIC!r}, got {data[:4]!r} (not an osd-fl payload)")
    (crc,) = struct.unpack("<I", data[-4:])
    if zlib.crc32(memoryview(data)[:-4]) != crc:  # a view: no second copy of the payload
        raise PayloadError("checksum: CRC-32 mismatch (payload corrupted or truncated)")
    reader = _Reader(data, len(data) - 4)
    reader.take(4, "magic")
    version, vcode, mlen = reader.unpack("<BBB", "header")
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
    (nrec,) = reader.unpack("<I", "record count")
    if expected is not None and nrec != len(expected):
        raise PayloadError(f"record count: payload has {nrec} tensors, the model has {len(expected)}")
    if nrec > reader.remaining // _MIN_RECORD_BYTES:
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
    (nlen,) = reader.unpack("<H", f"record {index} name length")
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
    dcode, kcode, ndim = reader.unpack("<BBB", f"{field} header")
    if dcode not in _CODE_DTYPES:
        raise PayloadError(f"{field}: unknown dtype code {dcode}")
    try:
        kind = Kind(kcode)
    except ValueError:
        raise PayloadError(f"{field}: unknown kind {kcode}") from None
    if ndim > _MAX_NDIM:
        raise PayloadError(f"{field}: ndim {ndim} > {_MAX_NDIM}")
    shape = tuple(int(x) for x in reader.unpack(f"<{ndim}I", f"{field} shape"))
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
        (k,) = reader.unpack("<H", f"{field} rank")
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
        (block,) = reader.unpack("<I", f"{field} block")
        if block < 1 or block > max(numel, 1):
            raise PayloadError(f"{field}: block {block} outside 1..{numel}")
        nblocks = -(-numel // block)
        scales = np.frombuffer(reader.take(4 * nblocks, f"{field} scales"), dtype="<f4").astype(np.float32)
        _check_values(scales, f"{field} scales")
        if scales.size and float(scales.min()) < 0:
            raise PayloadError(f"{field} scales: negative scale")
        q = np.frombuffer(reader.take(numel, f"{field} int8 values"), dtype=np.int8)
        if q.size and int(q.min()) < -127:
            raise PayloadError(f"{field} int8 values: -128 is not a valid code (range is -127..127)")
        rec.block, rec.scales, rec.qvalues = block, scales, q
    return rec


# -------------------------------------------------------------------- reconstruction

_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def reconstruct(rec: TensorRecord, device: torch.device | str | None = None) -> torch.Tensor:
    """Rebuild one tensor (float32 compute, then the record's dtype).

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
        out = (a @ b).reshape(rec.shape)
    else:
        assert rec.scales is not None and rec.qvalues is not None
        scales = np.repeat(rec.scales, rec.block)[: rec.numel]
        vals = rec.qvalues.astype(np.float32) * scales
        out = torch.from_numpy(vals).to(dev).reshape(rec.shape)
    out = out.to(_TORCH_DTYPES[rec.dtype])
    if rec.kind != Kind.ZERO and not bool(torch.isfinite(out).all()):
        # Every value was finite and bounded on decoding, but a product or the
        # cast to a narrow dtype (float16 tops out at 65504) can still overflow.
        raise PayloadError(f"tensor {rec.name!r}: rebuilds to NaN/Inf values in {rec.dtype} (out of its range)")
    return out


def iter_tensors(payload: Payload, device: torch.device | str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one at a time, so a receiver holds one at once."""
    for rec in payload.records:
        yield rec.name, reconstruct(rec, device)
