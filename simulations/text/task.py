"""The task facade: TextTask ties assets, data, model, cache and loaders together from one TextTaskConfig."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    Partitioner,
)
from torch import nn
from torch.utils.data import DataLoader
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from osd_fl.errors import ConfigError
from osd_fl.seeds import client_seed
from simulations.devices import resolve_device
from simulations.text.cache import ActivationCache, load_or_build_activation_cache
from simulations.text.config import TextTaskConfig
from simulations.text.data import (
    client_split,
    column,
    load_rotten_tomatoes,
    load_text_dataset,
    make_partitioner,
    quiet_datasets,
    split_test_pool,
)
from simulations.text.loaders import CachedTextDataset, TokenizedTextDataset, make_loader
from simulations.text.model import LowerMiniLM, freeze_lower, load_minilm, split_minilm


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
            cfg = self.config
            if cfg.data_path:
                self._dataset = load_text_dataset(
                    cfg.data_path, cfg.text_column, cfg.label_column, cfg.max_examples or None, cfg.seed
                )
            else:
                self._dataset = load_rotten_tomatoes(cfg.max_examples or None, cfg.seed)
        return self._dataset

    @property
    def num_labels(self) -> int:
        """Classes of the data (the new classification head's outputs)."""
        return int(self.dataset.features["label"].num_classes)

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
            with quiet_datasets():
                partition = self.partitioner.load_partition(partition_id)
            seed = self.config.seed * 100_003 + partition_id
            train, val = client_split(partition, self.config.val_fraction, seed)
            self._clients[partition_id] = ClientData(train=train, val=val)
        return self._clients[partition_id]

    # model --------------------------------------------------------------

    def base_model(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        if self._base is None:
            cfg = self.config
            model, tokenizer = load_minilm(cfg.model_path or None, num_labels=self.num_labels, seed=cfg.seed)
            n_layers = int(getattr(model.config, "num_hidden_layers", 0))
            if self.config.frozen_layers > n_layers:
                raise ConfigError(f"frozen_layers={self.config.frozen_layers} must be in 0..{n_layers}")
            self._base = (model, tokenizer)
        return self._base

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer (the shipped MiniLM's unless ``model_path`` is set)."""
        return self.base_model()[1]

    def _template_model(self) -> nn.Module:
        if self._template is None:
            model, _ = self.base_model()
            if self.config.mode == "cached":
                if not hasattr(model, "bert"):
                    raise ConfigError(
                        f"mode=cached needs a BERT-family model ({type(model).__name__} given); use mode=full"
                    )
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

    def activation_cache(
        self, progress: Callable[[int, int], None] | None = None, *, cold: bool = False
    ) -> ActivationCache:
        """Return the lower part's activations of every example in :attr:`dataset` (cached mode).

        Parameters
        ----------
        progress
            Called as ``progress(done, total)`` while building.
        cold
            Build it again even when it is loaded or on disk (the file is then
            neither read nor written): what a cold start costs.

        Returns
        -------
        ActivationCache
            Loaded from ``cache_dir`` or built (and saved) once per process.

        """
        if self.config.mode != "cached":
            raise ConfigError("activation_cache() needs mode=cached")
        if cold or self._cache is None:
            self._template_model()
            assert self._lower is not None
            self._cache = load_or_build_activation_cache(
                self.config, self.dataset, self._lower, self.tokenizer, progress, cold=cold
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
        labels = column(data, "label").astype(np.int64)
        if self.config.mode == "cached":
            return CachedTextDataset(self.activation_cache(), column(data, "idx").astype(np.int64), labels)
        return TokenizedTextDataset(self.tokenizer, [str(t) for t in column(data, "text")], labels, self.config.max_len)

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
        seed = client_seed(self.config.seed, partition_id, round_seed)
        train = make_loader(train_set, self.config.batch_size, shuffle=True, seed=seed)
        val = make_loader(val_set, self.config.batch_size)
        return train, val

    def test_loader(self) -> DataLoader[Any]:
        """Build the loader over the central test set (length-sorted, ``eval_batch_size``)."""
        return make_loader(self.torch_dataset(self.test), self.config.eval_batch_size, length_sorted=True)
