"""Importance maps from validation gradients, and OSD on a real fine-tuning update."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from osd_fl import ConfigError, compress, compute_importance, decompress
from tests.helpers import weighted_rel_error

# test code here draws from torch's global generator: seeded per test and restored afterwards
pytestmark = pytest.mark.usefixtures("global_rng")


def _tiny() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.5), nn.ReLU(), nn.Linear(5, 3))
    batches = [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    return model, batches


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def test_grad_fisher_taylor_match_manual_computation() -> None:
    model, batches = _tiny()
    model.train()
    names = ["0.weight", "3.weight"]
    params = dict(model.named_parameters())
    model.eval()
    grads = []
    for b in batches:
        model.zero_grad()
        _loss(model, b).backward()
        grads.append({n: params[n].grad.detach().clone() for n in names})  # type: ignore[union-attr]
    model.train()
    mean = {n: torch.stack([g[n] for g in grads]).mean(0) for n in names}
    fisher = {n: torch.stack([g[n] ** 2 for g in grads]).mean(0) for n in names}
    z = compute_importance(model, batches, _loss, form="grad", num_batches=3)
    assert set(z) == set(names)
    assert model.training, "training mode must be restored"
    for n in names:
        torch.testing.assert_close(z[n], mean[n].abs())
        assert params[n].grad is None
    zf = compute_importance(model, batches, _loss, form="fisher", num_batches=3)
    for n in names:
        torch.testing.assert_close(zf[n], fisher[n])
    ref = {n: params[n].detach() - 0.1 for n in names}
    zt = compute_importance(model, batches, _loss, form="taylor", num_batches=3, reference=ref)
    for n in names:
        torch.testing.assert_close(zt[n], (mean[n] * 0.1).abs(), rtol=1e-4, atol=1e-7)
    # eval mode: dropout off, so two calls agree exactly
    torch.testing.assert_close(
        compute_importance(model, batches, _loss, num_batches=2)["0.weight"],
        compute_importance(model, batches, _loss, num_batches=2)["0.weight"],
    )
    assert compute_importance(model, batches, _loss, form="ones") == {}


def test_adam_form_reads_optimizer_state_and_errors_are_clear() -> None:
    model, batches = _tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(ConfigError, match="exp_avg_sq"):
        compute_importance(model, batches, _loss, form="adam", optimizer=opt)
    _loss(model, batches[0]).backward()
    opt.step()
    z = compute_importance(model, batches, _loss, form="adam", optimizer=opt)
    first = dict(model.named_parameters())["0.weight"]
    torch.testing.assert_close(z["0.weight"], opt.state[first]["exp_avg_sq"])
    with pytest.raises(ConfigError, match="reference"):
        compute_importance(model, batches, _loss, form="taylor")
    with pytest.raises(ConfigError, match="form"):
        compute_importance(model, batches, _loss, form="nope")


def test_osd_on_a_real_minilm_fine_tuning_update() -> None:
    """A few AdamW steps of the shipped MiniLM on shipped review snippets; OSD vs baselines at equal bytes."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from simulations.text import find_minilm_path, find_rotten_tomatoes_path

    torch.manual_seed(0)
    path = find_minilm_path()
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=2)
    df = pd.read_csv(find_rotten_tomatoes_path())
    df = df[df["category"].isin(["fresh", "rotten"])].drop_duplicates("text").head(96)
    enc = tok(list(df["text"]), truncation=True, max_length=48, padding=True, return_tensors="pt")
    labels = torch.tensor((df["category"] == "fresh").astype(int).to_numpy())
    batches = [({k: v[i : i + 16] for k, v in enc.items()}, labels[i : i + 16]) for i in range(0, 96, 16)]

    def loss_fn(m: nn.Module, batch: tuple[dict[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return m(**batch[0], labels=batch[1]).loss  # type: ignore[no-any-return]

    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    model.train()
    for b in batches[:4]:
        opt.zero_grad()
        loss_fn(model, b).backward()
        opt.step()
    names = [n for n, p in model.named_parameters() if p.ndim == 2 and "encoder.layer.5" in n]
    update = {n: model.state_dict()[n] - before[n] for n in names}
    z = compute_importance(model, batches[4:], loss_fn, form="grad", num_batches=2, names=names)
    worse = 0
    for r in (1, 2):
        errs = {}
        for method in ("osd", "truncsvd", "magtruncsvd"):
            out = decompress(compress(update, method=method, rank=r, importance=z))
            errs[method] = sum(weighted_rel_error(update[n], out[n], z[n]) for n in names) / len(names)
        print(
            f"\nMiniLM layer-5 update r={r}: mean Z-weighted rel. error {errs}; "
            f"OSD margin vs TruncSVD {errs['truncsvd'] - errs['osd']:+.4f}, "
            f"vs Mag {errs['magtruncsvd'] - errs['osd']:+.4f}"
        )
        assert errs["osd"] <= errs["truncsvd"] * (1 + 1e-4)
        worse += errs["osd"] > errs["magtruncsvd"]
    assert worse == 0
