"""The importance path as a README user calls it: a standard criterion, a Hugging Face model's own loss, a warning.

Before, ``loss_fn=nn.CrossEntropyLoss()`` was called as ``loss_fn(model, batch)``
and failed every client every round, and ``attach_importance`` silently did
nothing while the server's importance form was ``ones``.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from flwr.app import RecordDict
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from clients import attach_importance
from osd_fl import CompressionConfig, ConfigError, compute_importance
from osd_fl.records import IMPORTANCE_RECORD_KEY

pytestmark = pytest.mark.usefixtures("global_rng")  # module construction draws from torch's global generator


def _mlp_and_batches() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    batches = [(torch.randn(5, 8, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(3)]
    return model, batches


def _tiny_bert() -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    cfg.num_labels = 2
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = BertForSequenceClassification(cfg)
    batches = [
        {"input_ids": torch.randint(0, 50, (4, 6), generator=g), "labels": torch.randint(0, 2, (4,), generator=g)}
        for _ in range(2)
    ]
    return model, batches


@pytest.mark.parametrize("form", ["grad", "fisher"])
def test_a_criterion_gives_the_same_maps_as_the_explicit_loss(form: str) -> None:
    model, batches = _mlp_and_batches()
    criterion = nn.CrossEntropyLoss()

    def explicit(m: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        out: torch.Tensor = nn.functional.cross_entropy(m(x), y)
        return out

    want = compute_importance(model, batches, explicit, form=form, num_batches=3)
    got = compute_importance(model, batches, criterion, form=form, num_batches=3)
    assert want.keys() == got.keys() == {"0.weight", "2.weight"}
    for name in want:
        assert torch.equal(want[name], got[name]), name
        assert bool(want[name].any())


def test_a_hugging_face_model_uses_its_own_loss_or_a_criterion_on_its_logits() -> None:
    model, batches = _tiny_bert()

    def explicit(m: nn.Module, batch: Any) -> torch.Tensor:
        out: torch.Tensor = m(**batch).loss
        return out

    want = compute_importance(model, batches, explicit, num_batches=2)
    own = compute_importance(model, batches, None, num_batches=2)
    crit = compute_importance(model, batches, nn.CrossEntropyLoss(), num_batches=2)
    assert want and want.keys() == own.keys() == crit.keys()
    for name in want:
        assert torch.equal(want[name], own[name]), name
        # the criterion sees the logits without labels in the forward: the same loss, up to float rounding
        torch.testing.assert_close(crit[name], want[name], rtol=1e-5, atol=1e-7)


def test_batches_without_labels_get_an_error_that_says_what_to_do() -> None:
    model, _ = _mlp_and_batches()
    with pytest.raises(ConfigError, match="labels"):
        compute_importance(model, [{"x": torch.randn(2, 8)}], nn.CrossEntropyLoss())
    bert, batches = _tiny_bert()
    unlabelled = [{"input_ids": b["input_ids"]} for b in batches]
    with pytest.raises(ConfigError, match=r"no \.loss"):
        compute_importance(bert, unlabelled, None)


def test_attach_importance_with_a_criterion_attaches_maps() -> None:
    model, batches = _mlp_and_batches()
    content = RecordDict()
    maps = attach_importance(content, CompressionConfig(importance="grad"), model, batches, nn.CrossEntropyLoss())
    assert maps is not None and set(maps) == {"0.weight", "2.weight"}
    assert IMPORTANCE_RECORD_KEY in content


def test_attach_importance_warns_when_the_server_form_makes_it_a_no_op() -> None:
    model, batches = _mlp_and_batches()
    with pytest.warns(UserWarning, match="importance='grad'"):
        assert attach_importance(RecordDict(), CompressionConfig(), model, batches, nn.CrossEntropyLoss()) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a method without importance: nothing to say
        assert attach_importance(RecordDict(), CompressionConfig(method="truncsvd"), model, batches) is None
        # an app running 'ones' on purpose (a sweep comparing forms) turns the warning off
        assert attach_importance(RecordDict(), CompressionConfig(), model, batches, warn_unused=False) is None


def test_obd_is_the_per_example_fisher_diagonal() -> None:
    model, batches = _mlp_and_batches()
    obd = compute_importance(model, batches, nn.CrossEntropyLoss(), form="obd", num_batches=2)
    fisher = compute_importance(model, batches, nn.CrossEntropyLoss(), form="fisher", num_batches=2)
    weight = dict(model.named_parameters())["0.weight"]
    manual = torch.zeros_like(weight)
    model.eval()
    for x, y in batches[:2]:
        for i in range(len(y)):
            model.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
            assert weight.grad is not None
            manual += weight.grad.square()
    model.zero_grad()
    torch.testing.assert_close(obd["0.weight"], manual / 10, rtol=1e-5, atol=1e-9)
    # Jensen: a batch mean's square is at most the mean of the examples' squares, and far below it here
    assert bool((fisher["0.weight"] <= obd["0.weight"] + 1e-7).all())
    assert float(obd["0.weight"].sum()) > 2 * float(fisher["0.weight"].sum())


def test_obd_splits_mapping_batches_of_a_hugging_face_model() -> None:
    model, batches = _tiny_bert()
    maps = compute_importance(model, batches, None, form="obd", num_batches=1)
    params = dict(model.named_parameters())
    assert maps and all(z.shape == params[n].shape and bool((z >= 0).all()) for n, z in maps.items())
    assert any(float(z.sum()) > 0 for z in maps.values())
