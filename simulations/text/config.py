"""TextTaskConfig: every setting of the text task, typed, with the label names and batch types."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from osd_fl.errors import ConfigError
from osd_fl.settings import Settings, check_literal_fields

#: Label names in label order: ``0 = rotten``, ``1 = fresh``.
LABEL_NAMES: tuple[str, str] = ("rotten", "fresh")

#: A batch as the loaders yield it. Cached mode: ``hidden_states`` (B, T, H)
#: float32, ``attention_mask`` (B, T) int64, ``labels`` (B,) int64. Full mode:
#: ``input_ids`` (B, T) instead of ``hidden_states``.
Batch = dict[str, torch.Tensor]

TaskMode = Literal["cached", "full"]
Partitioning = Literal["iid", "dirichlet"]
CacheDType = Literal["float32", "float16"]


@dataclass(frozen=True)
class TextTaskConfig(Settings):
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
    ``python -m simulations.bench.text``.
    """

    settings_name: ClassVar[str] = "text-task"

    model_path: str = field(
        default="",
        metadata={
            "help": "Local Hugging Face sequence-classification model folder ('' = the shipped MiniLM); "
            "mode=cached and frozen_layers > 0 need a BERT-family model."
        },
    )
    data_path: str = field(
        default="",
        metadata={
            "help": "Local text-classification data: a CSV, JSON lines or parquet file, or a "
            "datasets.save_to_disk folder ('' = the shipped Rotten Tomatoes snippets); labels from the data."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Text column of data_path."})
    label_column: str = field(default="label", metadata={"help": "Label column of data_path (any values)."})
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
        metadata={"help": "Examples used, after a seeded shuffle (0 = all; Rotten Tomatoes has 12,752)."},
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

    @property
    def trained_layers(self) -> int:
        """Number of BertLayers trained (of MiniLM's 6)."""
        return max(6 - self.frozen_layers, 0)
