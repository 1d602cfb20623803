"""A tiny built-in federated task: an MLP on scikit-learn's digits, fully offline.

``load_digits`` (1,797 8x8 images, 10 classes) ships inside scikit-learn, so
runs need no download. A fixed share is held out as the server's test set;
the rest is split IID into ``num_partitions`` client partitions, each split
again into local train and validation data (the validation part feeds the
importance maps). One round of 4 clients takes well under a second of compute.

The model, ``Linear(64, hidden) -> ReLU -> Linear(hidden, 10)``, has one
matrix large enough to be compressed at the default ``min_numel`` (the first
layer, ``hidden x 64``); the rest travel dense.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from simulations.devices import seeded

__all__ = [
    "Batch",
    "ClientData",
    "Loader",
    "build_model",
    "client_data",
    "evaluate",
    "loss_fn",
    "make_optimizer",
    "test_data",
    "train_epochs",
]

Batch = tuple[torch.Tensor, torch.Tensor]


class Loader:
    """Minimal re-iterable mini-batch loader over in-memory tensors.

    Parameters
    ----------
    x, y
        Features and labels.
    batch_size
        Rows per batch.
    shuffle_seed
        Shuffle with this seed on each pass (a new permutation each pass);
        ``None`` keeps the order.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle_seed: int | None = None) -> None:
        self.x, self.y, self.batch_size = x, y, int(batch_size)
        self._gen = torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None

    def __len__(self) -> int:
        """Number of batches per pass."""
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        """Yield ``(x, y)`` batches."""
        n = len(self.y)
        order = torch.randperm(n, generator=self._gen) if self._gen is not None else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.x[idx], self.y[idx]


@dataclass(frozen=True)
class ClientData:
    """One client's local data."""

    train: Loader
    val: Loader
    num_train: int
    num_val: int


@lru_cache(maxsize=4)
def _split(
    test_fraction: float, seed: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (np.asarray(data.data, dtype=np.float32) / 16.0).astype(np.float32)
    y = np.asarray(data.target, dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = round(test_fraction * len(y))
    test_idx = np.sort(perm[:n_test])
    pool_idx = perm[n_test:]
    return x, y, np.concatenate([test_idx, pool_idx])  # test first, then the shuffled pool


def test_data(*, test_fraction: float = 0.2, seed: int = 0, batch_size: int = 256) -> Loader:
    """The server's held-out test set (the same for every partitioning)."""
    x, y, order = _split(test_fraction, seed)
    n_test = round(test_fraction * len(y))
    idx = order[:n_test]
    return Loader(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]), batch_size)


def client_data(
    partition_id: int,
    num_partitions: int,
    *,
    batch_size: int = 32,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    shuffle_seed: int = 0,
) -> ClientData:
    """Partition ``partition_id`` of ``num_partitions`` IID shares of the non-test data.

    Raises
    ------
    ValueError
        If ``partition_id`` is not in ``0..num_partitions-1``.
    """
    if num_partitions < 1 or not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is not in 0..{num_partitions - 1}")
    x, y, order = _split(test_fraction, seed)
    n_test = round(test_fraction * len(y))
    pool = order[n_test:]
    part = np.array_split(pool, num_partitions)[partition_id]
    n_val = max(1, round(val_fraction * len(part)))
    val_idx, train_idx = part[:n_val], part[n_val:]
    xt, yt = torch.from_numpy(x[train_idx]), torch.from_numpy(y[train_idx])
    xv, yv = torch.from_numpy(x[val_idx]), torch.from_numpy(y[val_idx])
    return ClientData(
        train=Loader(xt, yt, batch_size, shuffle_seed=shuffle_seed),
        val=Loader(xv, yv, batch_size),
        num_train=len(train_idx),
        num_val=len(val_idx),
    )


def build_model(hidden: int = 128, *, seed: int | None = 0) -> nn.Module:
    """``Linear(64, hidden) -> ReLU -> Linear(hidden, 10)``, seeded init."""
    with seeded(seed):  # never moves the caller's global generator
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of ``model`` on one ``(x, y)`` batch."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def make_optimizer(model: nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    """``sgd`` (momentum 0.9) or ``adam``."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    raise ValueError(f"optimizer {name!r} is not one of ['adam', 'sgd']")


def train_epochs(model: nn.Module, loader: Loader, optimizer: torch.optim.Optimizer, epochs: int) -> float:
    """Train in place; return the mean training loss of the last epoch."""
    model.train()
    mean = float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += loss.item() * len(batch[1])
            count += len(batch[1])
        mean = total / max(count, 1)
    return mean


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader) -> tuple[float, float, int]:
    """``(mean loss, accuracy, examples)`` of ``model`` on ``loader``."""
    model.eval()
    total, correct, count = 0.0, 0, 0
    for x, y in loader:
        logits = model(x)
        total += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
        count += len(y)
    return total / max(count, 1), correct / max(count, 1), count
