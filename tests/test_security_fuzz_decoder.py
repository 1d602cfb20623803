"""Property-based fuzzing of the decoder (``osd_fl/codec.py``) with hostile payloads.

``tests/test_codec.py`` already checks truncations/extensions/flips of whole
payloads *without* a valid checksum, random single-byte edits with a
recomputed CRC, and one 2**40-element DENSE claim. This module goes further:
an attacker recomputes the CRC, so every structured field of a valid payload
(version, method, record count, names, dtypes, kinds, dims, ranks, section
codings, counts, positions, values, scales, int8 codes) is edited and the
checksum fixed; sections are written by hand with duplicate, unsorted and
out-of-range positions; NaN/Inf/huge values are planted; and every size field
is inflated (10**12-element shapes, 2**32-1 counts and records, ...).

The oracle, for every input:

* the decoder raises :class:`PayloadError` (with a message) and nothing
  else, or it returns a payload that is sane: names, shapes and dtypes are the
  model's when ``expected`` is given, positions sorted, unique and in range,
  and every rebuilt tensor finite;
* inputs that are invalid by construction (size bombs, NaN values, bad
  positions, edits of checked fields, CRC-breaking flips, strict prefixes and
  extensions) must be rejected; unmodified payloads must be accepted.

The generators live here and are reused by ``test_security_fuzz_strategy.py``.
A small run is part of the default suite; ``-m slow`` runs 10,000 cases and
prints the count and time (see ``docs/security.md``).
"""

from __future__ import annotations

import math
import struct
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from osd_fl import REGISTRY, PayloadError, compress
from osd_fl.codec import VALUE_LIMIT, decode, iter_tensors
from osd_fl.dtypes import INT8_BLOCK
from osd_fl.payload import Kind, Payload
from osd_fl.positions import Coding, index_width, position_bytes

METHODS = sorted(REGISTRY)

#: Default-suite and long-run sizes of every fuzz property in this module.
FAST_EXAMPLES = 500
LONG_EXAMPLES = 10_000

Specs = dict[str, tuple[tuple[int, ...], str]]
_MAX_NAME = 1024  # longest tensor name the format allows

# --------------------------------------------------------------------------- raw writer
# Written from the format description, independently of osd_fl.codec.encode.


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def raw_payload(
    records: list[bytes], *, method: bytes = b"osd", version: int = 1, vcode: int = 0, nrec: int | None = None
) -> bytes:
    count = len(records) if nrec is None else nrec
    body = b"OSDF" + bytes([version, vcode, len(method)]) + method + struct.pack("<I", count) + b"".join(records)
    return with_crc(body)


def raw_record(name: bytes, kind: int, dims: tuple[int, ...], part: bytes = b"", dtype: int = 0) -> bytes:
    head = struct.pack("<H", len(name)) + name + bytes([dtype, kind, len(dims)])
    return head + struct.pack(f"<{len(dims)}I", *dims) + part


def raw_section(coding: int, param: int, count: int, positions: bytes = b"", values: bytes = b"") -> bytes:
    return struct.pack("<BBI", coding, param, count) + positions + values


def _pack_bits(bits: np.ndarray) -> bytes:
    return np.packbits(bits.astype(np.uint8), bitorder="little").tobytes()


def _pack_uints(values: np.ndarray, width: int) -> bytes:
    if values.size == 0 or width == 0:
        return b""
    bits = (values[:, None] >> np.arange(width, dtype=np.int64)) & 1
    return _pack_bits(bits.reshape(-1))


def pack_positions(coding: Coding, param: int, pos: np.ndarray, slots: int) -> bytes:
    """Write ``pos`` (possibly invalid) the way a hostile encoder would."""
    if coding == Coding.BITMASK:
        nbytes = (slots + 7) // 8
        bits = np.zeros(nbytes * 8, dtype=np.uint8)
        bits[pos[pos < nbytes * 8]] = 1  # positions past the buffer cannot be written
        return _pack_bits(bits)
    if coding == Coding.FIXED:
        return _pack_uints(pos, index_width(slots))
    count = pos.size
    if count == 0:
        return b""
    lows = _pack_uints(pos & ((1 << param) - 1), param)
    nbits = count + ((slots - 1) >> param) + 1
    high = np.zeros(((nbits + 7) // 8) * 8, dtype=np.uint8)
    idx = (pos >> param) + np.arange(count, dtype=np.int64)
    high[idx[idx < nbits]] = 1
    return lows + _pack_bits(high)


# --------------------------------------------------------------------------- valid pool

MODEL: Specs = {
    "enc.weight": ((24, 20), "float32"),
    "enc.bias": ((24,), "float32"),
    "head.weight": ((6, 24), "float16"),
    "embeddings.word_embeddings.weight": ((30, 8), "float64"),
}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}


def _update(seed: int, specs: Mapping[str, tuple[tuple[int, ...], str]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (0.1 * torch.randn(s, generator=g)).to(_TORCH[dt]) for k, (s, dt) in specs.items()}


def _pool() -> list[bytes]:
    update = _update(0, MODEL)
    blobs = []
    for method in METHODS:
        for vdt in ("float32", "float16", "int8"):
            policy = "skip" if vdt == "float16" else "compress"  # ZERO records too
            blobs.append(
                compress(update, method=method, rank=2, min_numel=64, value_dtype=vdt, embedding_policy=policy)
            )
    blobs.append(compress(update, method="topk", rank=2, min_numel=64, budget="global"))
    blobs.append(compress(update, method="osd", rank=3, min_numel=64, relax=1, adaptive=False))
    blobs.append(compress(update, method="int8", min_numel=64, int8_block=7))
    return blobs


POOL = _pool()
# CRC-32 detects every error of up to 3 bits in messages shorter than 91,607 bits.
assert max(len(b) for b in POOL) * 8 < 91_607

# --------------------------------------------------------------------------- payload walker


@dataclass(frozen=True)
class Field:
    role: str
    offset: int
    size: int
    value_bytes: int = 0


def walk(blob: bytes) -> list[Field]:
    """Every field of a *valid* payload, with its offset (for targeted edits)."""
    fields: list[Field] = []
    pos = 0

    def add(role: str, size: int, value_bytes: int = 0) -> None:
        nonlocal pos
        if size:
            fields.append(Field(role, pos, size, value_bytes))
        pos += size

    def u(fmt: str) -> int:
        return int(struct.unpack_from(fmt, blob, pos)[0])

    add("magic", 4)
    vcode, mlen = blob[5], blob[6]
    add("version", 1)
    add("vcode", 1)
    add("mlen", 1)
    add("method", mlen)
    vb = 2 if vcode == 1 else 4
    nrec = u("<I")
    add("nrec", 4)

    def section(slots: int) -> None:
        coding, param, count = struct.unpack_from("<BBI", blob, pos)
        add("coding", 1)
        add("param", 1)
        add("count", 4)
        add("positions", position_bytes(Coding(coding), count, slots, param))
        value_run(count)

    def value_run(count: int) -> None:
        if vcode == 2:  # int8 values: one float32 scale per block of INT8_BLOCK, then the int8 codes
            add("scales", 4 * -(-count // INT8_BLOCK), 4)
            add("int8", count)
        else:
            add("values", count * vb, vb)

    for _ in range(nrec):
        nlen = u("<H")
        add("nlen", 2)
        add("name", nlen)
        kind, ndim = blob[pos + 1], blob[pos + 2]
        add("dtype", 1)
        add("kind", 1)
        add("ndim", 1)
        dims = struct.unpack_from(f"<{ndim}I", blob, pos)
        for _ in dims:
            add("dim", 4)
        numel = math.prod(dims)
        if kind == Kind.DENSE:
            value_run(numel)
        elif kind == Kind.LOWRANK:
            k = u("<H")
            add("rank", 2)
            n = dims[0]
            section(n * k)
            section(k * (numel // n))
        elif kind == Kind.SPARSE:
            section(numel)
        elif kind == Kind.QUANT8:
            block = u("<I")
            add("block", 4)
            add("scales", 4 * -(-numel // block), 4)
            add("int8", numel)
    add("crc", 4)
    assert pos == len(blob)
    return fields


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One hostile input and what the decoder must do with it."""

    label: str
    blob: bytes
    expected: Specs | None = None
    max_bytes: int | None = None
    method: str | None = None
    must_reject: bool = False
    must_accept: bool = False
    positions: list[np.ndarray] | None = field(default=None)
    """If accepted, the positions the (single) section must decode to."""


def _method_of(blob: bytes) -> str:
    return blob[7 : 7 + blob[6]].decode("ascii")


def _setup(data: st.DataObject, blob: bytes, expected: Specs, strict: bool) -> tuple[Specs | None, str | None]:
    """``expected`` and ``method`` as a caller would pass them; ``strict``: as the server does (both)."""
    if strict:
        return expected, _method_of(blob)
    exp = expected if data.draw(st.booleans(), label="with expected") else None
    return exp, (_method_of(blob) if data.draw(st.booleans(), label="with method") else None)


Gen = Callable[[st.DataObject, bytes, Specs, bool], Case]


def gen_valid(data: st.DataObject, blob: bytes, specs: Specs, strict: bool) -> Case:
    exp, meth = _setup(data, blob, specs, strict)
    return Case("valid", blob, exp, None, meth, must_accept=True)


def gen_random(data: st.DataObject, blob: bytes, specs: Specs, strict: bool) -> Case:
    exp, meth = _setup(data, blob, specs, strict)
    body = data.draw(st.binary(max_size=400), label="random body")
    prefix = data.draw(st.sampled_from([b"", b"OSDF", b"OSDF\x01", b"OSDF\x01\x00\x03osd"]), label="prefix")
    raw = prefix + body
    bad = with_crc(raw) if data.draw(st.booleans(), label="fix crc") else raw
    return Case("random bytes", bad, exp, None, meth)


def gen_flip(data: st.DataObject, blob: bytes, specs: Specs, strict: bool) -> Case:
    """1-3 flipped bits, checksum not fixed: CRC-32 must catch every one."""
    exp, meth = _setup(data, blob, specs, strict)
    nbits = len(blob) * 8
    bits = data.draw(st.lists(st.integers(0, nbits - 1), min_size=1, max_size=3, unique=True), label="bits")
    arr = bytearray(blob)
    for i in bits:
        arr[i // 8] ^= 1 << (i % 8)
    return Case("bit flips", bytes(arr), exp, None, meth, must_reject=True)


def gen_flip_crc(data: st.DataObject, blob: bytes, specs: Specs, strict: bool) -> Case:
    exp, meth = _setup(data, blob, specs, strict)
    body = bytearray(blob[:-4])
    for i in data.draw(st.lists(st.integers(0, len(body) * 8 - 1), min_size=1, max_size=16), label="bits"):
        body[i // 8] ^= 1 << (i % 8)
    return Case("bit flips, CRC recomputed", with_crc(bytes(body)), exp, None, meth)


def gen_truncate(data: st.DataObject, blob: bytes, specs: Specs, strict: bool) -> Case:
    exp, meth = _setup(data, blob, specs, strict)
    if data.draw(st.booleans(), label="fix crc"):
        # A strict prefix of the body with a valid CRC: the parser runs out of bytes.
        cut = data.draw(st.integers(0, len(blob) - 5), label="cut")
        return Case("truncated, CRC recomputed", with_crc(blob[:cut]), exp, None, meth, must_reject=True)
    cut = data.draw(st.integers(0, len(blob) - 1), label="cut")
    return Case("truncated", blob[:cut], exp, None, meth)


def gen_extend(data: st.DataObject, blob: bytes, specs: Specs, strict: bool) -> Case:
    exp, meth = _setup(data, blob, specs, strict)
    tail = data.draw(st.binary(min_size=1, max_size=64), label="tail")
    return Case("extended, CRC recomputed", with_crc(blob[:-4] + tail), exp, None, meth, must_reject=True)


def gen_splice(data: st.DataObject, blob: bytes, specs: Specs, strict: bool) -> Case:
    exp, meth = _setup(data, blob, specs, strict)
    body = blob[:-4]
    i = data.draw(st.integers(0, len(body)), label="at")
    j = data.draw(st.integers(i, min(len(body), i + 32)), label="to")
    new = data.draw(st.binary(max_size=32), label="bytes")
    return Case("spliced, CRC recomputed", with_crc(body[:i] + new + body[j:]), exp, None, meth)


_FP32_BAD = [float("nan"), float("inf"), float("-inf"), 1e30, -3e38, VALUE_LIMIT * 2]
_FP16_BAD = [0x7E00, 0x7C00, 0xFC00, 0xFE01]  # NaN, +Inf, -Inf, another NaN


def gen_field(data: st.DataObject, blob: bytes, specs: Specs, strict: bool) -> Case:
    """Edit one structured field and recompute the CRC (an attacker can)."""
    exp, meth = _setup(data, blob, specs, strict)
    fields = [f for f in walk(blob) if f.role not in ("magic", "crc")]
    f = data.draw(st.sampled_from(fields), label="field")
    body = bytearray(blob[:-4])
    old = bytes(body[f.offset : f.offset + f.size])
    must = False
    if f.role in ("values", "scales") and data.draw(st.booleans(), label="plant non-finite"):
        vb = f.value_bytes
        i = data.draw(st.integers(0, f.size // vb - 1), label="slot")
        if vb == 2:
            new = struct.pack("<H", data.draw(st.sampled_from(_FP16_BAD)))
        else:
            new = struct.pack("<f", data.draw(st.sampled_from([*_FP32_BAD, -1.0] if f.role == "scales" else _FP32_BAD)))
        at = f.offset + i * vb
        body[at : at + vb] = new
        value = struct.unpack("<e" if vb == 2 else "<f", new)[0]
        must = not (math.isfinite(value) and abs(value) <= VALUE_LIMIT) or (f.role == "scales" and value < 0)
        return Case(f"field {f.role}: non-finite", with_crc(bytes(body)), exp, None, meth, must_reject=must)
    if f.role == "int8" and data.draw(st.booleans(), label="plant -128"):
        i = data.draw(st.integers(0, f.size - 1), label="slot")
        body[f.offset + i] = 0x80
        return Case("field int8: -128", with_crc(bytes(body)), exp, None, meth, must_reject=True)
    if f.size <= 4 and f.role not in ("values", "positions", "name", "method", "int8", "scales"):
        top = (1 << (8 * f.size)) - 1
        current = int.from_bytes(old, "little")
        boundary = [0, 1, 2, top, top - 1, current + 1, current - 1, current * 2, 1 << (8 * f.size - 1)]
        value = data.draw(st.one_of(st.sampled_from(boundary), st.integers(0, top)), label="value") & top
        new = value.to_bytes(f.size, "little")
    else:
        new = data.draw(st.binary(min_size=f.size, max_size=f.size), label="bytes")
    if new == old:
        return Case(f"field {f.role}: unchanged", blob, exp, None, meth, must_accept=True)
    body[f.offset : f.offset + f.size] = new
    value = int.from_bytes(new, "little")
    if f.role == "version" or (f.role == "vcode" and value > 2):
        must = True
    elif f.role in ("name", "dim", "nrec", "dtype") and exp is not None:
        must = True  # a name no longer the model's (or a duplicate), a shape or a dtype that differs
    elif f.role == "method" and meth is not None:
        must = True
    return Case(f"field {f.role}", with_crc(bytes(body)), exp, None, meth, must_reject=must)


def gen_values(data: st.DataObject, blob: bytes, specs: Specs, strict: bool) -> Case:
    """Plant NaN/Inf/huge (must be rejected) or large finite values (fine unless a dtype overflows)."""
    exp, meth = _setup(data, blob, specs, strict)
    fields = [f for f in walk(blob) if f.role in ("values", "scales", "int8")]
    f = data.draw(st.sampled_from(fields), label="field")
    body = bytearray(blob[:-4])
    if f.role == "int8":
        body[f.offset + data.draw(st.integers(0, f.size - 1), label="slot")] = 0x80
        return Case("values: int8 -128", with_crc(bytes(body)), exp, None, meth, must_reject=True)
    vb = f.value_bytes
    at = f.offset + data.draw(st.integers(0, f.size // vb - 1), label="slot") * vb
    large = [7e4, -1e5, 1e10, 2.0**47, -(2.0**48)]  # finite, within VALUE_LIMIT, beyond float16
    if vb == 2:
        value = data.draw(st.sampled_from([*_FP16_BAD, 0x7BFF]), label="fp16 bits")  # 0x7BFF = 65504
        body[at : at + 2] = struct.pack("<H", value)
        must = value != 0x7BFF
    else:
        pool = [*_FP32_BAD, *large, -1.0] if f.role == "scales" else [*_FP32_BAD, *large]
        number = data.draw(st.sampled_from(pool), label="value")
        body[at : at + 4] = struct.pack("<f", number)
        stored = struct.unpack("<f", struct.pack("<f", number))[0]
        must = not (math.isfinite(stored) and abs(stored) <= VALUE_LIMIT) or (f.role == "scales" and stored < 0)
    return Case(f"values: {f.role}", with_crc(bytes(body)), exp, None, meth, must_reject=must)


def gen_wrong_expected(data: st.DataObject, blob: bytes, specs: Specs, strict: bool) -> Case:
    """A valid payload checked against a model that differs in one way."""
    _, meth = _setup(data, blob, specs, strict)
    exp: Specs = dict(specs)
    name = data.draw(st.sampled_from(sorted(exp)), label="tensor")
    shape, dtype = exp[name]
    how = data.draw(
        st.sampled_from(["grow", "shrink", "transpose", "add dim", "drop dim", "dtype", "drop", "add", "rename"])
    )
    if how == "grow":
        exp[name] = ((shape[0] + 1, *shape[1:]), dtype)
    elif how == "shrink" and shape[-1] > 1:
        exp[name] = ((*shape[:-1], shape[-1] - 1), dtype)
    elif how == "transpose" and len(shape) == 2 and shape[0] != shape[1]:
        exp[name] = ((shape[1], shape[0]), dtype)
    elif how == "add dim":
        exp[name] = ((*shape, 1), dtype)
    elif how == "drop dim" and len(shape) > 1:
        exp[name] = (shape[1:], dtype)
    elif how == "dtype":
        exp[name] = (shape, "float32" if dtype != "float32" else "float16")
    elif how == "drop":
        del exp[name]
    elif how == "add":
        exp["extra.weight"] = ((3,), "float32")
    else:
        exp[name + "x"] = exp.pop(name)
    if strict:  # the server's model is fixed: send a payload encoded for the other model instead
        method = _method_of(blob)
        value_dtype = "float16" if blob[5] == 1 else "float32"
        other = compress(_update(1, exp), method=method, rank=2, min_numel=64, value_dtype=value_dtype)
        return Case(f"wrong model: {how}", other, specs, None, method, must_reject=exp != specs)
    return Case(f"wrong expected: {how}", blob, exp, None, meth, must_reject=exp != specs)


def gen_oversize(data: st.DataObject, blob: bytes, specs: Specs, strict: bool) -> Case:
    exp, meth = _setup(data, blob, specs, strict)
    limit = data.draw(st.integers(0, len(blob) - 1), label="max bytes")
    return Case("over max_bytes", blob, exp, limit, meth, must_reject=True)


@st.composite
def crafted_positions(draw: st.DrawFn) -> Case:
    """A SPARSE section written by hand, with duplicate, unsorted or out-of-range positions."""
    slots = draw(st.integers(1, 3000), label="slots")
    count = draw(st.integers(0, min(slots, 200)), label="count")
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    pos = np.sort(rng.choice(slots, size=count, replace=False)).astype(np.int64)
    coding = draw(st.sampled_from([Coding.BITMASK, Coding.FIXED, Coding.ELIAS_FANO]), label="coding")
    param = draw(st.integers(0, 12), label="low bits") if coding == Coding.ELIAS_FANO else 0
    flaw = draw(st.sampled_from(["none", "duplicate", "swap", "out of range"]), label="flaw")
    expect = "accept"
    if flaw == "duplicate" and count >= 2:
        i = int(rng.integers(1, count))
        pos[i] = pos[i - 1]
        expect = "reject"
    elif flaw == "swap" and count >= 2:
        i = int(rng.integers(0, count - 1))
        pos[i], pos[i + 1] = pos[i + 1], pos[i]
        # a bitmask is a set (order cannot be expressed); Elias-Fano may decode
        # an unsorted list to another, valid, sorted set
        expect = {Coding.BITMASK: "accept", Coding.FIXED: "reject", Coding.ELIAS_FANO: "any"}[coding]
    elif flaw == "out of range" and count >= 1:
        room = (1 << index_width(slots)) - slots if coding == Coding.FIXED else 2 * slots + 64
        if room > 0:
            pos[-1] = slots + draw(st.integers(0, room - 1), label="beyond")
            expect = "reject"
    vdt = draw(st.sampled_from(["float32", "float16"]), label="value dtype")
    values = rng.standard_normal(count).astype("<f4" if vdt == "float32" else "<f2")
    section = raw_section(int(coding), param, count, pack_positions(coding, param, pos, slots), values.tobytes())
    blob = raw_payload([raw_record(b"x", Kind.SPARSE, (slots,), section)], method=b"topk", vcode=int(vdt == "float16"))
    exp: Specs | None = {"x": ((slots,), "float32")} if draw(st.booleans(), label="with expected") else None
    return Case(
        f"positions: {coding.name} {flaw}",
        blob,
        exp,
        must_reject=expect == "reject",
        must_accept=expect == "accept",
        positions=[np.sort(pos)] if expect == "accept" else None,
    )


@st.composite
def size_bomb(draw: st.DrawFn) -> Case:
    """A few bytes whose size fields claim something enormous: rejected, nothing allocated."""
    d1 = draw(st.integers(10**6, 2**32 - 1), label="d1")
    d2 = draw(st.integers(-(-(10**12) // d1), 2**32 - 1), label="d2")
    dims = (d1, d2)
    junk = draw(st.binary(max_size=64), label="junk")
    kind = draw(
        st.sampled_from(
            ["dense", "zero", "sparse", "lowrank", "quant8", "records", "name", "many zero", "unbacked count"]
        ),
        label="bomb",
    )
    match = draw(st.booleans(), label="model as large as claimed")
    exp: Specs | None = {"x": (dims, "float32")} if match else None
    big = draw(st.integers(2**20, 2**32 - 1), label="count")
    if kind == "dense":
        rec = raw_record(b"x", Kind.DENSE, dims, junk)
    elif kind == "zero":
        exp = None  # a ZERO update of a model that really is this large is legitimate
        rec = raw_record(b"x", Kind.ZERO, dims)
    elif kind == "sparse":
        coding = draw(st.sampled_from(list(Coding)), label="coding")
        rec = raw_record(b"x", Kind.SPARSE, dims, raw_section(int(coding), 0, big) + junk)
    elif kind == "lowrank":
        k = draw(st.integers(1, 65535), label="rank")
        rec = raw_record(b"x", Kind.LOWRANK, dims, struct.pack("<H", k) + raw_section(0, 0, big) + junk)
    elif kind == "quant8":
        block = draw(st.integers(1, 2**32 - 1), label="block")
        rec = raw_record(b"x", Kind.QUANT8, dims, struct.pack("<I", block) + junk)
    elif kind == "records":
        return Case("bomb: record count", raw_payload([junk], nrec=big), None, must_reject=True)
    elif kind == "name":
        rec = struct.pack("<H", draw(st.integers(_MAX_NAME + 1, 65535), label="nlen")) + junk
        return Case("bomb: name length", raw_payload([rec]), None, must_reject=True)
    elif kind == "many zero":
        n = draw(st.integers(2, 8), label="records")
        recs = [raw_record(f"z{i}".encode(), Kind.ZERO, (2**16, 2**15)) for i in range(n)]  # 2**31 each
        return Case("bomb: total elements", raw_payload(recs), None, must_reject=True)
    else:  # a bitmask of all ones backs `count` positions but no values: refused before unpacking
        nbytes = draw(st.integers(1, 4096), label="bitmask bytes")
        section = raw_section(int(Coding.BITMASK), 0, nbytes * 8 - 1, b"\xff" * (nbytes - 1) + b"\x7f")
        rec = raw_record(b"x", Kind.SPARSE, (nbytes * 8,), section)
        return Case("bomb: unbacked count", raw_payload([rec]), None, must_reject=True)
    return Case(f"bomb: {kind}", raw_payload([rec]), exp, must_reject=True)


GENERATORS: dict[str, Gen] = {
    "valid": gen_valid,
    "random": gen_random,
    "flip": gen_flip,
    "flip+crc": gen_flip_crc,
    "truncate": gen_truncate,
    "extend": gen_extend,
    "splice": gen_splice,
    "field": gen_field,
    "field2": gen_field,  # structured edits are the richest source: weigh them more
    "field3": gen_field,
    "field4": gen_field,
    "values": gen_values,
    "wrong expected": gen_wrong_expected,
    "oversize": gen_oversize,
}


def draw_case(data: st.DataObject, pool: list[bytes], specs: Specs, *, strict: bool = False) -> Case:
    """Any hostile case: a mutation of a pool payload, crafted positions, or a size bomb.

    ``strict``: decode as the server does, always with ``expected`` and ``method``.
    """
    source = data.draw(st.sampled_from([*GENERATORS, "positions", "bomb"]), label="generator")
    if source == "positions":
        return data.draw(crafted_positions())
    if source == "bomb":
        return data.draw(size_bomb())
    blob = data.draw(st.sampled_from(pool), label="payload")
    return GENERATORS[source](data, blob, specs, strict)


# --------------------------------------------------------------------------- oracle


def check_decoder(case: Case) -> Payload | None:
    """Run the decoder on ``case``; fail on anything but a clean rejection or a sane payload."""
    try:
        payload = decode(case.blob, expected=case.expected, max_bytes=case.max_bytes, method=case.method)
        tensors = dict(iter_tensors(payload))
    except PayloadError as exc:
        assert str(exc), "a PayloadError must say which field failed"
        assert not case.must_accept, f"{case.label}: a valid payload was rejected: {exc}"
        return None
    assert not case.must_reject, f"{case.label}: accepted an invalid payload"
    if case.expected is not None:
        assert list(tensors) == [r.name for r in payload.records]
        assert set(tensors) == set(case.expected)
        for name, t in tensors.items():
            shape, dtype = case.expected[name]
            assert tuple(t.shape) == tuple(shape) and str(t.dtype) == f"torch.{dtype}"
    if case.method is not None:
        assert payload.method == case.method
    for rec in payload.records:
        for sec in rec.sections:
            assert sec.count <= sec.slots
            assert bool(np.all(np.abs(sec.values) <= VALUE_LIMIT))
            if sec.positions is not None and sec.positions.size:
                assert sec.positions.dtype == np.int64
                assert int(sec.positions[0]) >= 0 and int(sec.positions[-1]) < sec.slots
                assert bool(np.all(np.diff(sec.positions) > 0))
    for t in tensors.values():
        assert bool(torch.isfinite(t).all())
    if case.positions is not None:
        (rec,) = payload.records
        got = rec.sections[0].positions
        got = np.arange(rec.sections[0].slots) if got is None else got
        np.testing.assert_array_equal(got, case.positions[0])
    return payload


# --------------------------------------------------------------------------- properties

_COUNTS: dict[str, int] = {}


def _decoder_property(max_examples: int) -> Callable[[], None]:
    @settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def prop(data: st.DataObject) -> None:
        _COUNTS["decoder"] = _COUNTS.get("decoder", 0) + 1
        check_decoder(draw_case(data, POOL, MODEL))

    return prop


def test_fuzz_decoder() -> None:
    """Default suite: a few hundred hostile payloads of every family."""
    _decoder_property(FAST_EXAMPLES)()


@pytest.mark.slow
def test_fuzz_decoder_long(capsys: pytest.CaptureFixture[str]) -> None:
    """Long run (``-m slow``): 10,000 hostile payloads; prints count and time."""
    _COUNTS["decoder"] = 0
    start = time.perf_counter()
    _decoder_property(LONG_EXAMPLES)()
    seconds = time.perf_counter() - start
    cases = _COUNTS["decoder"]
    assert cases >= LONG_EXAMPLES
    with capsys.disabled():
        print(f"\n[fuzz] decoder: {cases} cases in {seconds:.1f} s, 0 failures")


# --------------------------------------------------------------------------- generator sanity
# The oracle is only as good as the generators: check they produce what they claim.


def test_walker_covers_every_byte_of_every_pool_payload() -> None:
    for blob in POOL:
        fields = walk(blob)
        assert sum(f.size for f in fields) == len(blob)
        roles = {f.role for f in fields}
        assert {"version", "method", "nrec", "name", "dim", "crc"} <= roles
    all_roles = {f.role for blob in POOL for f in walk(blob)}
    assert {"rank", "coding", "count", "positions", "values", "block", "scales", "int8"} <= all_roles
    kinds = {r.kind for blob in POOL for r in decode(blob).records}
    assert kinds == set(Kind)


def test_crafted_valid_positions_round_trip_through_the_hand_written_packer() -> None:
    rng = np.random.default_rng(1)
    for coding in (Coding.BITMASK, Coding.FIXED, Coding.ELIAS_FANO):
        for slots in (1, 7, 8, 9, 1000, 4096):
            pos = np.sort(rng.choice(slots, size=min(slots, 37), replace=False)).astype(np.int64)
            param = 3 if coding == Coding.ELIAS_FANO else 0
            section = raw_section(
                int(coding), param, pos.size, pack_positions(coding, param, pos, slots), bytes(4 * pos.size)
            )
            payload = decode(raw_payload([raw_record(b"x", Kind.SPARSE, (slots,), section)], method=b"topk"))
            got = payload.records[0].sections[0].positions
            np.testing.assert_array_equal(got, pos)


@pytest.mark.parametrize(
    ("scale", "q0", "ok"),
    [
        (0.5, 3, True),
        (float("nan"), 3, False),
        (float("inf"), 3, False),
        (-0.5, 3, False),
        (VALUE_LIMIT, 3, False),  # 127 * scale would be beyond the value limit
        (0.5, -128, False),  # the encoder writes -127..127 only
    ],
)
def test_int8_value_blocks_are_checked(scale: float, q0: int, ok: bool) -> None:
    """A DENSE record of 10 int8 values: one float32 block scale, then the values; hostile scales are refused."""
    q = np.array([q0, 1, 2, 3, 4, 5, 6, 7, 8, 9], dtype=np.int8)
    part = struct.pack("<f", scale) + q.tobytes()
    blob = raw_payload([raw_record(b"x", Kind.DENSE, (10,), part)], method=b"dense", vcode=2)
    if ok:
        (rec,) = decode(blob).records
        np.testing.assert_array_equal(rec.sections[0].values, q.astype(np.float32) * np.float32(scale))
    else:
        with pytest.raises(PayloadError, match="int8"):
            decode(blob)
