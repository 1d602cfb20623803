"""budget_dtype: float16 values priced at the float32 budget keep more entries at equal bytes."""

from __future__ import annotations

from typing import Any

import torch

from osd_fl import compress, decompress, payload_budget


def _update() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "w": torch.randn(64, 48, generator=g) @ torch.randn(48, 40, generator=g) / 7,
        "b": torch.randn(40, generator=g),
    }


def test_float32_budget_with_float16_values_is_the_float32_budget_less_the_dense_part() -> None:
    shapes = {k: tuple(v.shape) for k, v in _update().items()}
    f32 = payload_budget(shapes, method="osd", rank=2, value_dtype="float32")
    f16_half = payload_budget(shapes, method="osd", rank=2, value_dtype="float16")
    f16_eq = payload_budget(shapes, method="osd", rank=2, value_dtype="float16", budget_dtype="float32")
    dense_bias_saving = 40 * 2  # the 1-D bias travels dense at float16: 2 bytes less per value
    assert f16_eq == f32 - dense_bias_saving
    assert f16_half < f16_eq


def test_osd_float16_at_float32_budget_spends_it_and_beats_float16_at_half_the_bytes() -> None:
    upd = _update()
    shapes = {k: tuple(v.shape) for k, v in upd.items()}
    opts: dict[str, Any] = {"method": "osd", "rank": 2, "value_dtype": "float16", "relax": 3}
    half = compress(upd, **opts)
    equal = compress(upd, budget_dtype="float32", **opts)
    f32 = compress(upd, method="osd", rank=2, relax=3, value_dtype="float32")
    assert len(equal) <= payload_budget(shapes, budget_dtype="float32", **opts)
    assert len(half) < len(equal) <= len(f32)
    # the larger budget spends its bytes on more entries: a strictly smaller error
    err_half = torch.linalg.norm(decompress(half)["w"] - upd["w"])
    err_equal = torch.linalg.norm(decompress(equal)["w"] - upd["w"])
    assert err_equal < 0.9 * err_half


def test_budget_dtype_value_is_the_old_behaviour() -> None:
    upd = _update()
    assert compress(upd, method="osd", rank=1, value_dtype="float16", budget_dtype="value") == compress(
        upd, method="osd", rank=1, value_dtype="float16"
    )


def test_int8_values_round_trip_within_half_a_step_of_their_block_scale() -> None:
    import numpy as np

    from osd_fl.codec import decode, encode
    from osd_fl.payload import Kind, Payload, Section, TensorRecord

    rng = np.random.default_rng(0)
    vals = (rng.standard_normal(200) * np.repeat([1e-3, 5.0, 0.0, 2.0], 50)).astype(np.float32)
    rec = TensorRecord("x", (200,), "float32", Kind.DENSE, sections=[Section(200, vals)])
    back = decode(encode(Payload("dense", "int8", [rec]))).records[0].sections[0].values
    blocks = [slice(i, min(i + 64, 200)) for i in range(0, 200, 64)]
    for b in blocks:
        step = float(np.abs(vals[b]).max()) / 127
        assert float(np.abs(back[b] - vals[b]).max()) <= step / 2 * (1 + 1e-5) + 1e-30
    assert np.all(back[100:150][np.abs(vals[100:150]) == 0] == 0)


def test_int8_values_at_the_float32_budget_keep_more_entries_and_lose_less() -> None:
    upd = _update()
    shapes = {k: tuple(v.shape) for k, v in upd.items()}
    f32 = compress(upd, method="osd", rank=2, relax=12, value_dtype="float32")
    i8 = compress(upd, method="osd", rank=2, relax=12, value_dtype="int8", budget_dtype="float32")
    assert len(i8) <= payload_budget(shapes, method="osd", rank=2, value_dtype="int8", budget_dtype="float32")
    err32 = torch.linalg.norm(decompress(f32)["w"] - upd["w"])
    err8 = torch.linalg.norm(decompress(i8)["w"] - upd["w"])
    assert err8 < err32


def test_auto_precision_is_int8_at_the_float32_budget_for_osd_and_float32_for_the_rest() -> None:
    """The default ``value_dtype="auto"``: OSD's measured choice (docs/results.md), every baseline float32."""
    upd = _update()
    assert compress(upd, method="osd", rank=2) == compress(
        upd, method="osd", rank=2, value_dtype="int8", budget_dtype="float32"
    )
    assert compress(upd, method="osd", rank=2) != compress(upd, method="osd", rank=2, value_dtype="float32")
    for method in ("truncsvd", "magtruncsvd", "dense", "topk"):
        assert compress(upd, method=method, rank=2) == compress(upd, method=method, rank=2, value_dtype="float32")
    # an explicit budget dtype is kept: int8 values priced at a float16 budget
    own = compress(upd, method="osd", rank=2, budget_dtype="float16")
    assert own == compress(upd, method="osd", rank=2, value_dtype="int8", budget_dtype="float16")
