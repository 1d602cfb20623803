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
    f32 = payload_budget(shapes, method="osd", rank=2)
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
    f32 = compress(upd, method="osd", rank=2, relax=3)
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
