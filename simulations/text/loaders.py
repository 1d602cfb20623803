"""Loaders: cached-hidden-state and token-id datasets, their collate functions, make_loader."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from transformers import (
    PreTrainedTokenizerBase,
)

from simulations.text.cache import ActivationCache, pad, tokenize
from simulations.text.config import Batch


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
        self.rows = tokenize(tokenizer, texts, max_len)
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
        ids, mask = pad([row for row, _ in items], pad_id)
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
