"""The activation cache: the frozen lower part run once over every example, keyed and saved on disk."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import (
    PreTrainedTokenizerBase,
)

from osd_fl.errors import ConfigError
from simulations.text.assets import file_sha256, find_minilm_path, find_rotten_tomatoes_path
from simulations.text.config import TextTaskConfig
from simulations.text.data import column
from simulations.text.model import LowerMiniLM

_CACHE_FORMAT_VERSION = 1


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


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int) -> list[list[int]]:
    encoded = tokenizer(list(texts), truncation=True, max_length=max_len, padding=False)
    return [list(ids) for ids in encoded["input_ids"]]


def pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
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
    token_rows = tokenize(tokenizer, [texts[int(i)] for i in by_id], max_len)
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
            input_ids, mask = pad([token_rows[int(k)] for k in chunk], pad_id)
            out = lower(input_ids.to(device), mask.to(device)).to("cpu", dtype)
            for row, k in enumerate(chunk):
                a, b = int(offsets[k]), int(offsets[k + 1])
                hidden[a:b] = out[row, : b - a]
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    lower.train(was_training)
    return ActivationCache(hidden=hidden, offsets=offsets, ids=torch.from_numpy(id_arr))


def _first_file_sha(folder: Path, names: Sequence[str]) -> str:
    """SHA-256 of the first of ``names`` that exists in ``folder`` (a model's weights or vocabulary)."""
    for name in names:
        if (folder / name).is_file():
            return file_sha256(str(folder / name))
    raise ConfigError(f"{folder} has none of {', '.join(names)}")


def _data_sha(config: TextTaskConfig) -> str:
    """SHA-256 of the data: Rotten Tomatoes' file, a data file, or every file of a saved dataset folder."""
    if not config.data_path:
        return file_sha256(str(find_rotten_tomatoes_path()))
    path = Path(config.data_path)
    columns = f"|{config.text_column}|{config.label_column}"
    if path.is_file():
        return file_sha256(str(path)) + columns
    files = sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.relative_to(path)}:{file_sha256(str(p))};".encode())
    return digest.hexdigest() + columns


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
    model_dir = model_path or (Path(config.model_path) if config.model_path else find_minilm_path())
    id_bytes = np.sort(np.asarray(ids, dtype=np.int64)).tobytes()
    payload = {
        "version": _CACHE_FORMAT_VERSION,
        "model": _first_file_sha(model_dir, ("model.safetensors", "pytorch_model.bin")),
        "model_config": file_sha256(str(model_dir / "config.json")),
        "tokenizer": _first_file_sha(model_dir, ("tokenizer.json", "vocab.txt")),
        "data": _data_sha(config),
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
    *,
    cold: bool = False,
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
    cold
        Build even when the file exists; the file is then neither read nor
        written (what a cold start costs).

    Returns
    -------
    ActivationCache
        Activations of every example of ``dataset``.

    """
    ids = column(dataset, "idx").astype(np.int64)
    file = None if cold else activation_cache_file(config, ids)
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
        [str(t) for t in column(dataset, "text")],
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
