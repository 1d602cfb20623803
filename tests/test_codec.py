"""The wire format: exact sizes, bit-exact round trips, and typed errors on bad bytes."""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from osd_fl import REGISTRY, PayloadError, codec, compress, decompress, payload_budget
from osd_fl.codec import decode, encode
from osd_fl.dtypes import INT8_BLOCK
from osd_fl.payload import Kind, Payload, Section, TensorRecord
from osd_fl.positions import Coding, best_coding, decode_positions, encode_positions, position_bytes

METHODS = sorted(REGISTRY)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def positions_case(draw: st.DrawFn) -> tuple[int, np.ndarray]:
    slots = draw(st.integers(1, 5000))
    count = draw(st.integers(0, min(slots, 400)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pos = np.sort(rng.choice(slots, size=count, replace=False)).astype(np.int64)
    return slots, pos


@SETTINGS
@given(positions_case(), st.sampled_from([Coding.BITMASK, Coding.FIXED, Coding.ELIAS_FANO, None]))
def test_position_codings_round_trip_with_exact_size(case: tuple[int, np.ndarray], coding: Coding | None) -> None:
    slots, pos = case
    if coding is None:
        coding, param, size = best_coding(pos.size, slots)
        if coding == Coding.ALL:
            return
    else:
        from osd_fl.positions import elias_fano_low_bits

        param = elias_fano_low_bits(pos.size, slots) if coding == Coding.ELIAS_FANO else 0
        size = position_bytes(coding, pos.size, slots, param)
    buf = encode_positions(coding, param, pos, slots)
    assert len(buf) == size
    back = decode_positions(coding, param, buf, pos.size, slots, "t")
    np.testing.assert_array_equal(back, pos)


def test_best_coding_beats_the_paper_index_when_dense() -> None:
    # a third of the slots kept: bitmask/Elias-Fano cost far less than fixed-width indices
    slots, count = 3 * (384 + 1536), 384 + 1536
    coding, _, size = best_coding(count, slots)
    assert coding != Coding.FIXED
    assert size < position_bytes(Coding.FIXED, count, slots) / 4


@st.composite
def update_case(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    out: dict[str, torch.Tensor] = {}
    for i in range(draw(st.integers(1, 3))):
        n, d = draw(st.integers(1, 70)), draw(st.integers(1, 70))
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
        out[f"layer{i}.weight"] = (torch.randn(n, d, generator=g) * 0.1).to(dtype)
        if draw(st.booleans()):
            out[f"layer{i}.bias"] = torch.randn(n, generator=g).to(dtype)
    return out


@SETTINGS
@given(
    update_case(),
    st.sampled_from(METHODS),
    st.integers(1, 4),
    st.sampled_from(["float32", "float16", "int8"]),
    st.sampled_from(["matrix", "global"]),
    st.integers(0, 3),
)
def test_budget_holds_and_decoding_restores_every_tensor(
    update: dict[str, torch.Tensor], method: str, rank: int, vdt: str, mode: str, relax: int
) -> None:
    opts: dict[str, Any] = {"min_numel": 16, "value_dtype": vdt, "budget": mode, "relax": relax}
    blob = compress(update, method=method, rank=rank, **opts)
    cls = REGISTRY[method]
    budget = payload_budget({k: tuple(v.shape) for k, v in update.items()}, method=method, rank=rank, **opts)
    if cls.budgeted:
        assert len(blob) <= budget
    out = decompress(blob, expected={k: (tuple(v.shape), v.dtype) for k, v in update.items()})
    assert list(out) == list(update)
    for k, v in update.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype
        assert bool(torch.isfinite(out[k]).all())
    if method in ("dense",) and vdt == "float32":
        for k, v in update.items():
            torch.testing.assert_close(out[k], v.float().to(v.dtype), rtol=0, atol=0)


@SETTINGS
@given(st.integers(1, 3000), st.data(), st.sampled_from(["float32", "float16"]))
def test_kept_values_survive_bit_exact(slots: int, data: st.DataObject, vdt: str) -> None:
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    count = data.draw(st.integers(0, slots))
    pos = np.sort(rng.choice(slots, size=count, replace=False)).astype(np.int64)
    vals = (rng.standard_normal(count) * 10.0).astype(np.float32)
    if vdt == "float16":
        vals = vals.astype(np.float16).astype(np.float32)
    rec = TensorRecord("x", (slots,), "float32", Kind.SPARSE, sections=[Section(slots, vals, pos)])
    back = decode(encode(Payload("topk", vdt, [rec]))).records[0].sections[0]
    assert back.values.tobytes() == vals.tobytes()
    got = back.positions if back.positions is not None else np.arange(slots)  # coding ALL: every slot
    np.testing.assert_array_equal(got, pos)


def _valid_blob(method: str = "osd") -> bytes:
    g = torch.Generator().manual_seed(0)
    upd = {"a.weight": torch.randn(40, 30, generator=g), "a.bias": torch.randn(40, generator=g)}
    return compress(upd, method=method, rank=2, min_numel=16)


@SETTINGS
@given(st.sampled_from(METHODS), st.data())
def test_truncated_extended_or_corrupted_blobs_raise_payload_error(method: str, data: st.DataObject) -> None:
    blob = _valid_blob(method)
    choice = data.draw(st.sampled_from(["truncate", "extend", "flip", "burst"]))
    if choice == "truncate":
        bad = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif choice == "extend":
        bad = blob + data.draw(st.binary(min_size=1, max_size=64))
    elif choice == "flip":
        i = data.draw(st.integers(0, len(blob) * 8 - 1))
        arr = bytearray(blob)
        arr[i // 8] ^= 1 << (i % 8)
        bad = bytes(arr)
    else:  # any change within 4 consecutive bytes is caught by CRC-32
        i = data.draw(st.integers(0, len(blob) - 4))
        burst = data.draw(st.binary(min_size=4, max_size=4))
        if burst == blob[i : i + 4]:
            return
        bad = blob[:i] + burst + blob[i + 4 :]
    with pytest.raises(PayloadError):
        decompress(bad)


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


@SETTINGS
@given(st.data())
def test_hostile_bodies_with_valid_checksum_raise_payload_error_only(data: st.DataObject) -> None:
    """An attacker can recompute the CRC: the parser itself must reject garbage cleanly."""
    blob = _valid_blob(data.draw(st.sampled_from(METHODS)))
    body = bytearray(blob[:-4])
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] = data.draw(st.integers(0, 255))
    try:
        out = decompress(_with_crc(bytes(body)))
    except PayloadError:
        return
    for t in out.values():  # if it parses, what comes out is sane
        assert bool(torch.isfinite(t).all())


def test_random_bytes_with_valid_magic_and_crc_raise_payload_error() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        body = b"OSDF" + rng.integers(0, 256, size=int(rng.integers(0, 200)), dtype=np.uint8).tobytes()
        with pytest.raises(PayloadError):
            decompress(_with_crc(body))


def test_errors_name_the_field() -> None:
    blob = _valid_blob()
    with pytest.raises(PayloadError, match="checksum"):
        decompress(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(PayloadError, match="magic"):
        decompress(b"XXXX" + blob[4:])
    with pytest.raises(PayloadError, match="shape"):
        decompress(blob, expected={"a.weight": ((30, 40), torch.float32), "a.bias": ((40,), torch.float32)})
    with pytest.raises(PayloadError, match="record count"):
        decompress(blob, expected={"a.weight": ((40, 30), torch.float32)})
    with pytest.raises(PayloadError, match="not a tensor of the model"):
        decompress(blob, expected={"b.weight": ((40, 30), torch.float32), "a.bias": ((40,), torch.float32)})
    with pytest.raises(PayloadError, match="maximum"):
        decompress(blob, max_bytes=10)


def test_nan_values_and_size_bombs_are_rejected_before_use() -> None:
    nan_rec = TensorRecord(
        "x", (4,), "float32", Kind.DENSE, sections=[Section(4, np.array([1, np.nan, 0, 0], np.float32))]
    )
    with pytest.raises(PayloadError, match="NaN"):
        decompress(encode(Payload("dense", "float32", [nan_rec])))
    # a record that claims 2**40 elements: refused on the shape alone, nothing allocated
    body = bytearray(b"OSDF" + bytes([1, 0, 5]) + b"dense" + struct.pack("<I", 1))
    body += struct.pack("<H", 1) + b"x" + bytes([0, int(Kind.DENSE), 2]) + struct.pack("<II", 2**20, 2**20)
    with pytest.raises(PayloadError, match="exceeds the limit"):
        decompress(_with_crc(bytes(body)))
    with pytest.raises(PayloadError, match="shape"):
        decompress(_with_crc(bytes(body)), expected={"x": ((4, 4), "float32")})


def test_same_seed_same_bytes() -> None:
    g = torch.Generator().manual_seed(3)
    upd = {"w": torch.randn(600, 300, generator=g)}
    for method in METHODS:
        assert compress(upd, method=method, rank=2, seed=7) == compress(upd, method=method, rank=2, seed=7)


def test_zero_record_claiming_billions_of_elements_is_refused_without_a_model() -> None:
    """A 50-byte payload must not make decompress() allocate gigabytes (found by the long fuzz run)."""
    body = bytearray(b"OSDF" + bytes([1, 0, 3]) + b"osd" + struct.pack("<I", 1))
    body += struct.pack("<H", 1) + b"z" + bytes([3, int(Kind.ZERO), 2]) + struct.pack("<II", 2**16, 2**15)
    with pytest.raises(PayloadError, match="exceeds the limit"):
        decompress(_with_crc(bytes(body)))
    # an explicit, larger limit is the caller's choice
    small = bytearray(b"OSDF" + bytes([1, 0, 3]) + b"osd" + struct.pack("<I", 1))
    small += struct.pack("<H", 1) + b"z" + bytes([0, int(Kind.ZERO), 2]) + struct.pack("<II", 2**13, 2**14)
    with pytest.raises(PayloadError):
        decompress(_with_crc(bytes(small)))
    assert decompress(_with_crc(bytes(small)), max_elements=2**27)["z"].shape == (2**13, 2**14)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_rebuild_is_finite_at_the_largest_decodable_values(dtype: str) -> None:
    """float32/float64/bfloat16 records rebuild finite at the decoder's worst case; float16 ones may not.

    ``VALUE_LIMIT`` promises finite float32 products and sums: the claim must
    hold with every factor entry at ``VALUE_LIMIT``, the largest a decodable
    payload can carry (the server's safe-range check, osd_fl.checks, then
    rejects such a record by its magnitude).
    """
    from osd_fl.codec import VALUE_LIMIT, reconstruct

    n = k = d = 512  # the rank is at most min(n, d)
    a = np.full(n * k, VALUE_LIMIT, dtype=np.float32)
    b = np.full(k * d, VALUE_LIMIT, dtype=np.float32)
    rec = TensorRecord(
        name="w",
        shape=(n, d),
        dtype=dtype,
        kind=Kind.LOWRANK,
        rank=k,
        sections=[Section(slots=a.size, values=a), Section(slots=b.size, values=b)],
    )
    payload = decode(encode(Payload(method="osd", value_dtype="float32", records=[rec])))
    decoded = payload.records[0]
    if dtype != "float16":
        out = reconstruct(decoded)
        assert bool(torch.isfinite(out).all())
        assert float(out[0, 0]) == pytest.approx(k * VALUE_LIMIT**2, rel=1e-6)
    else:
        with pytest.raises(PayloadError, match="NaN/Inf"):
            reconstruct(decoded)


@SETTINGS
@given(st.lists(st.integers(0, 700), min_size=2, max_size=12), st.integers(0, 2**32 - 1))
def test_int8_batch_writes_what_each_array_alone_writes(sizes_: list[int], seed: int) -> None:
    """The payload-wide int8 quantization gives each array the bytes of its own call, zeros and ties included."""
    rng = np.random.default_rng(seed)
    arrays = [(rng.standard_normal(n) * 10.0 ** rng.integers(-6, 3)).astype(np.float32) for n in sizes_]
    arrays[0][: len(arrays[0]) // 2] = 0.0  # a block of zeros: scale 0
    if arrays[1].size:
        arrays[1][:] = np.float32(0.5)  # every value at the block's maximum
    assert codec._int8_many(arrays) == [codec._int8_bytes(a) for a in arrays] == [_int8_reference(a) for a in arrays]


def _int8_reference(values: np.ndarray) -> bytes:
    """The int8 wire form block by block: scale = max |v| / 127 (float32), v / scale rounded, in [-127, 127]."""
    scales, ints = [], []
    for i in range(0, values.size, INT8_BLOCK):
        block = values[i : i + INT8_BLOCK]
        scale = np.float32(np.abs(block).max() / np.float32(127))
        scales.append(scale)
        ints.append(np.clip(np.rint(block / (scale if scale > 0 else np.float32(1))), -127, 127))
    q = np.concatenate(ints).astype(np.int8) if ints else np.zeros(0, np.int8)
    return np.array(scales, dtype="<f4").tobytes() + q.tobytes()


def test_int8_payload_bytes_do_not_depend_on_the_batch() -> None:
    """A whole int8 payload encodes to the bytes of writing every record's values one by one."""
    gen = torch.Generator().manual_seed(4)
    update = {f"w{i}": torch.randn(40, 24 + i, generator=gen) for i in range(4)}
    update |= {f"b{i}": torch.randn(24 + 40 * i, generator=gen) for i in range(4)}
    blob = compress(update, method="osd", rank=1, value_dtype="int8")
    payload = decode(blob)
    one_by_one = codec._Values("int8", [])  # nothing batched: every array through _int8_bytes
    batched = codec._Values("int8", payload.records)
    assert batched._ready  # the batch did take the small arrays
    for rec in payload.records:
        for sec in rec.sections:
            assert batched(sec.values) == one_by_one(sec.values)
    assert encode(payload) == blob
