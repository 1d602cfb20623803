"""The text task on a user's own model folder and data file (issue 14: "any model, any data")."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Value
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from osd_fl import ConfigError
from simulations.text import TextTask, TextTaskConfig, evaluate, find_minilm_path, make_optimizer, train_epoch
from simulations.text.cache import activation_cache_key
from simulations.text.data import load_text_dataset

pytestmark = pytest.mark.usefixtures("global_rng")  # model construction and training draw from torch's generator

WORDS = ["good", "bad", "fine", "awful", "great", "dull", "fun", "slow"]


def _frame(rows: int = 60) -> pd.DataFrame:
    labels = ["neg", "neutral", "pos"]
    return pd.DataFrame(
        {
            "review": [f"{WORDS[i % 8]} {WORDS[(3 * i) % 8]} film number {i}" for i in range(rows)],
            "sentiment": [labels[i % 3] for i in range(rows)],
        }
    )


@pytest.fixture
def data_files(tmp_path: Path) -> dict[str, Path]:
    frame = _frame()
    files = {"csv": tmp_path / "reviews.csv", "jsonl": tmp_path / "reviews.jsonl", "parquet": tmp_path / "r.parquet"}
    frame.to_csv(files["csv"], index=False)
    frame.to_json(files["jsonl"], orient="records", lines=True)
    frame.to_parquet(files["parquet"])
    names = sorted(set(frame["sentiment"]))
    saved = Dataset.from_dict(
        {"review": list(frame["review"]), "sentiment": [names.index(v) for v in frame["sentiment"]]},
        features=Features({"review": Value("string"), "sentiment": ClassLabel(names=names)}),
    )
    files["folder"] = tmp_path / "saved"
    saved.save_to_disk(str(files["folder"]))
    return files


def test_every_file_form_loads_the_same_dataset(data_files: dict[str, Path]) -> None:
    loaded = {k: load_text_dataset(p, "review", "sentiment", seed=3) for k, p in data_files.items()}
    first = loaded["csv"]
    assert first.features["label"].names == ["neg", "neutral", "pos"]
    assert first.num_rows == 60
    for name, ds in loaded.items():
        assert ds.features["label"].names == first.features["label"].names, name
        assert ds["text"] == first["text"] and ds["label"] == first["label"], name


def test_what_is_missing_is_named(data_files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no column 'text'.*'review'"):
        load_text_dataset(data_files["csv"])
    with pytest.raises(ConfigError, match="expected an existing"):
        load_text_dataset(tmp_path / "nothing.csv")
    one_class = tmp_path / "one.csv"
    _frame().assign(sentiment="pos").to_csv(one_class, index=False)
    with pytest.raises(ConfigError, match="1 class"):
        load_text_dataset(one_class, "review", "sentiment")
    with pytest.raises(ConfigError, match="not a local Hugging Face model folder"):
        TextTask(TextTaskConfig(model_path=str(tmp_path), mode="full")).base_model()


def _full_config(**changes: object) -> TextTaskConfig:
    base = TextTaskConfig(
        mode="full", frozen_layers=0, max_len=16, test_size=9, num_clients=2, batch_size=4, cache_dir="", device="cpu"
    )
    return base.replace(**changes)


def _one_round(task: TextTask) -> float:
    model = task.new_model()
    train, _ = task.client_loaders(0)
    train_epoch(model, train, make_optimizer(model, 1e-4), steps=2)
    _, acc = evaluate(model, task.test_loader())
    return acc


def test_the_task_trains_on_a_local_file_with_its_label_count(data_files: dict[str, Path]) -> None:
    task = TextTask(_full_config(data_path=str(data_files["csv"]), text_column="review", label_column="sentiment"))
    assert task.num_labels == 3
    head = task.new_model().classifier
    assert isinstance(head, torch.nn.Linear) and head.out_features == 3
    assert 0.0 <= _one_round(task) <= 1.0


def test_the_task_loads_a_local_model_folder(data_files: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "tiny-bert"
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    config.intermediate_size = 64
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(find_minilm_path(), local_files_only=True).save_pretrained(folder)
    cfg = _full_config(
        model_path=str(folder), data_path=str(data_files["jsonl"]), text_column="review", label_column="sentiment"
    )
    task = TextTask(cfg)
    model = task.new_model()
    assert isinstance(model, BertForSequenceClassification) and model.config.hidden_size == 32
    assert isinstance(model.classifier, torch.nn.Linear) and model.classifier.out_features == 3
    assert 0.0 <= _one_round(task) <= 1.0
    # the activation cache key follows the model and the data, so caches never mix
    ids = torch.arange(10).numpy()
    keys = {
        activation_cache_key(TextTaskConfig(), ids),
        activation_cache_key(TextTaskConfig(model_path=str(folder)), ids),
        activation_cache_key(
            TextTaskConfig(data_path=str(data_files["csv"]), text_column="review", label_column="sentiment"), ids
        ),
    }
    assert len(keys) == 3
