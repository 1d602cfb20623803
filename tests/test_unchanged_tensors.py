"""A tensor that did not change costs next to nothing (its name and shape), with every method.

Full-model fine-tuning with frozen embeddings used to send the embedding's
zero update dense: 47 MB per client per round for MiniLM "at rank 1".
"""

from __future__ import annotations

import pytest
import torch

from osd_fl import (
    REGISTRY,
    CompressionConfig,
    ErrorFeedback,
    UpdateError,
    check_conformance,
    compress,
    decode,
    decompress,
    resolve_config,
)
from osd_fl.sizes import record_header_bytes

pytestmark = pytest.mark.usefixtures("global_rng")


def _update(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embeddings.word_embeddings.weight": torch.zeros(3000, 64),  # frozen: exactly zero
        "layer.0.dense.weight": torch.randn(64, 64, generator=g),
        "layer.0.dense.bias": torch.randn(64, generator=g),
        "layer.1.frozen.weight": torch.zeros(64, 64),  # a frozen layer the policy compresses
        "layer.1.frozen.bias": torch.zeros(64),  # a frozen bias the policy sends dense
    }


FROZEN = ("embeddings.word_embeddings.weight", "layer.1.frozen.weight", "layer.1.frozen.bias")


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_unchanged_tensors_cost_their_header_only(method: str) -> None:
    update = _update()
    changed = {k: v for k, v in update.items() if k not in FROZEN}
    blob = compress(update, method=method, rank=2)
    without = compress(changed, method=method, rank=2)
    headers = sum(record_header_bytes(name, update[name].dim()) for name in FROZEN)
    # the frozen tensors add their record headers and nothing else (the header's record count is fixed-size)
    assert len(blob) == len(without) + headers, (len(blob), len(without), headers)
    out = decompress(blob)
    for name in FROZEN:
        assert torch.equal(out[name], torch.zeros_like(update[name]))
    rest = decompress(without)
    for name in changed:
        assert torch.equal(out[name], rest[name]), name


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_a_server_accepts_zero_records_on_any_route(method: str) -> None:
    update = _update()
    config = resolve_config(CompressionConfig(method=method, rank=2))
    payload = decode(compress(update, config=config))
    check_conformance(payload, config)  # raises on a record a correct client would not send


def test_error_feedback_keeps_no_residual_for_an_unchanged_tensor() -> None:
    update = _update()
    feedback = ErrorFeedback()
    for _ in range(2):
        compress(update, method="osd", rank=1, feedback=feedback)
    for name in FROZEN:
        assert not bool(feedback.residuals[name].any()), name
    assert bool(feedback.residuals["layer.0.dense.weight"].any())  # the changed matrix does keep one


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zero_detection_is_exact_in_every_input_dtype(dtype: torch.dtype) -> None:
    """A tensor of (signed) zeros is unchanged; one tiny non-zero entry, or one in float16, is not."""
    tiny = torch.zeros(64, 64, dtype=dtype)
    tiny[63, 63] = torch.finfo(dtype).tiny  # the smallest normal number: not zero
    update = {
        "neg.weight": -torch.zeros(64, 64, dtype=dtype),  # -0.0 everywhere: no change
        "tiny.weight": tiny,
        "neg.bias": -torch.zeros(64, dtype=dtype),
    }
    kinds = {r.name: r.kind.name for r in decode(compress(update, method="osd", rank=1, min_numel=0)).records}
    assert kinds["neg.weight"] == "ZERO" and kinds["neg.bias"] == "ZERO"
    assert kinds["tiny.weight"] != "ZERO"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_entry_is_refused_even_in_an_otherwise_zero_tensor(bad: float) -> None:
    t = torch.zeros(32, 32)
    t[5, 7] = bad
    with pytest.raises(UpdateError, match="NaN or Inf"):
        compress({"w": t}, method="truncsvd", rank=1, min_numel=0)
