"""What keeps the global model finite and the inner strategy sound, whatever the replies.

* :func:`check_inner_strategy`: the wrapper hands the inner strategy one
  synthetic reply (the decoded weighted mean), which is exact for FedAvg and
  for server optimizers that step from the mean (FedAvgM, FedAdam, FedYogi,
  FedAdagrad, FedProx), and wrong for robust aggregators that need every
  update (FedMedian, trimmed mean, Krum, Multi-Krum, Bulyan) or loss-based
  weighting (q-FedAvg): those are refused.
* :func:`out_of_range`: the rule the new model must satisfy: finite, and no
  value above :func:`osd_fl.checks.value_limit` of its dtype unless it was
  already there and did not grow. When a round's mean breaks it, the
  strategy leaves out the reply pushing hardest at the offending entries
  (``rejected``, ``rejected-range``) and sums the round again, until the
  rule holds; if no reply is to blame (an inner optimizer's own momentum
  carries the model out) the round is kept out (``round-kept-out``).
* :class:`InnerGuard`: runs the inner strategy's calls with a private Python
  and NumPy random state (Flower samples nodes with the global ``random``
  and draws DP noise from NumPy's global generator; neither may move the
  caller's streams), and rolls the inner strategy's attributes back when its
  step is rejected, so a rejected step cannot poison a server optimizer's
  moments.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)

from osd_fl import ConfigError
from osd_fl.checks import value_limit
from osd_fl.records import array_to_tensor

__all__ = ["InnerGuard", "OutOfRange", "check_inner_strategy", "out_of_range"]

#: Inner strategies whose aggregation is a weighted mean (then, possibly, a server step from it).
MEAN_BASED: tuple[type[Strategy], ...] = (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedProx)
#: Flower strategies that need each client's update (or loss) and so cannot run on the mean.
REFUSED: tuple[type[Strategy], ...] = (FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan, QFedAvg)

_T = TypeVar("_T")


def _wrapped(strategy: Strategy) -> Strategy | None:
    """The strategy a Flower wrapper (the DP wrappers) delegates to, if any."""
    inner = getattr(strategy, "strategy", None)
    return inner if isinstance(inner, Strategy) else None


def check_inner_strategy(inner: Strategy, *, trust_custom: bool = False) -> None:
    """Refuse an inner strategy whose aggregation would silently change under the wrapper.

    Parameters
    ----------
    inner
        The strategy :class:`~strategies.OSDStrategy` wraps.
    trust_custom
        Accept a strategy this function does not know (your own subclass
        that overrides ``aggregate_train``), on your word that it aggregates
        a weighted mean and at most steps from it.

    Raises
    ------
    osd_fl.ConfigError
        For the robust aggregators (FedMedian, FedTrimmedAvg, Krum,
        MultiKrum, Bulyan) and q-FedAvg, and for unknown strategies unless
        ``trust_custom``.
    """
    seen = inner
    while True:
        if isinstance(seen, REFUSED):
            raise ConfigError(
                f"{type(seen).__name__} aggregates each client's update separately (a median, a trimmed mean, "
                "a Krum selection or loss-based weights), but OSDStrategy hands the inner strategy one decoded "
                "weighted mean, so it would silently become a mean. Use FedAvg, FedAvgM, FedAdam, FedYogi, "
                "FedAdagrad or FedProx inside OSDStrategy; for robustness to bad clients use OSDStrategy's own "
                "norm_bound / norm_bound_relative."
            )
        nested = _wrapped(seen)
        if nested is None:
            break
        seen = nested
    known = isinstance(seen, MEAN_BASED)
    if isinstance(seen, FedAvg) and not isinstance(seen, (FedAvgM, FedAdam, FedYogi, FedAdagrad, FedProx)):
        known = type(seen).aggregate_train is FedAvg.aggregate_train
    if not known and not trust_custom:
        raise ConfigError(
            f"OSDStrategy does not know how {type(seen).__name__} aggregates: it will receive ONE synthetic "
            "reply carrying the decoded weighted mean of the accepted updates. If its aggregate_train is a "
            "weighted mean (optionally followed by a server step), pass trust_custom_inner=True."
        )


#: Entries of a tensor checked at a time by :func:`out_of_range` (2 MiB of float64 per temporary).
RANGE_BLOCK = 1 << 18
#: Positions an :class:`OutOfRange` names at most.
MAX_POSITIONS = 64


@dataclass(frozen=True)
class OutOfRange:
    """Where a model left the safe range: one tensor, some flat positions, and which way."""

    name: str
    positions: torch.Tensor  #: int64 flat positions (at most 64)
    signs: torch.Tensor  #: +1 / -1 per position: the direction of the excess (0 for NaN)
    largest: float  #: the largest magnitude found (inf/nan included)

    def describe(self) -> str:
        """One line for a log or a rejection reason."""
        return f"{self.name!r} reaches {self.largest:.6g} at {self.positions.numel()} position(s)"


def out_of_range(name: str, new: torch.Tensor, old: torch.Tensor) -> OutOfRange | None:
    """Check one tensor of a new model against its old value; ``None`` if it is within the rule.

    A value is out of range if it is not finite, or its magnitude exceeds
    both :func:`osd_fl.checks.value_limit` of the dtype and the old value's
    magnitude (a weight that was already large may stay, not grow).
    """
    if not new.is_floating_point():
        return None
    limit = value_limit(new.dtype)
    flat_new, flat_old = new.detach().reshape(-1), old.detach().reshape(-1)
    found: list[torch.Tensor] = []
    count = 0
    # in blocks, so that the float64 temporaries stay small whatever the tensor's size
    for start in range(0, flat_new.numel(), RANGE_BLOCK):
        new64 = flat_new[start : start + RANGE_BLOCK].to(torch.float64)
        old64 = flat_old[start : start + RANGE_BLOCK].to(torch.float64)
        bad = ~torch.isfinite(new64) | ((new64.abs() > limit) & (new64.abs() > old64.abs()))
        if bool(bad.any()):
            hits = bad.nonzero().reshape(-1)[: MAX_POSITIONS - count] + start
            found.append(hits)
            count += hits.numel()
            if count >= MAX_POSITIONS:
                break
    if not found:
        return None
    positions = torch.cat(found)
    values = flat_new[positions].to(torch.float64)
    signs = torch.sign(torch.nan_to_num(values, nan=0.0))
    return OutOfRange(name, positions, signs, float(values.abs().max()))


def record_out_of_range(new: ArrayRecord, old: ArrayRecord) -> OutOfRange | None:
    """The first tensor of ``new`` outside the rule of :func:`out_of_range`, or ``None``."""
    for name, array in new.items():
        if name not in old:
            continue
        found = out_of_range(name, array_to_tensor(array), array_to_tensor(old[name]))
        if found is not None:
            return found
    return None


class InnerGuard:
    """Private randomness for the inner strategy, and a rollback of its state.

    Parameters
    ----------
    inner
        The wrapped strategy.
    sampling_seed
        Seed of the private Python generator the inner strategy samples nodes
        with: the same seed samples the same nodes in the same order. NumPy's
        private state (DP noise) is seeded from the OS: noise must never be
        reproducible from a public seed.
    """

    def __init__(self, inner: Strategy, sampling_seed: int) -> None:
        self.inner = inner
        self._py_state = random.Random(sampling_seed).getstate()
        self._np_state = np.random.RandomState().get_state()

    @contextmanager
    def randomness(self) -> Iterator[None]:
        """Run the block with the inner strategy's own Python and NumPy global random state."""
        saved_py, saved_np = random.getstate(), np.random.get_state()  # noqa: NPY002
        random.setstate(self._py_state)
        np.random.set_state(self._np_state)  # noqa: NPY002 (swapping Flower's global generator, on purpose)
        try:
            yield
        finally:
            self._py_state, self._np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
            random.setstate(saved_py)
            np.random.set_state(saved_np)  # noqa: NPY002

    def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` under :meth:`randomness`."""
        with self.randomness():
            return fn(*args)

    def snapshot(self) -> dict[str, Any]:
        """The inner strategy's attributes, shallow (Flower's optimizers replace their moment dicts each step)."""
        return _snapshot(self.inner)

    def restore(self, snap: dict[str, Any]) -> None:
        """Put back what :meth:`snapshot` returned, nested wrappers included."""
        _restore(self.inner, snap)


def _snapshot(strategy: Strategy) -> dict[str, Any]:
    state: dict[str, Any] = {"attrs": dict(vars(strategy))}
    nested = _wrapped(strategy)
    if nested is not None:
        state["nested"] = _snapshot(nested)
    return state


def _restore(strategy: Strategy, snap: dict[str, Any]) -> None:
    vars(strategy).clear()
    vars(strategy).update(snap["attrs"])
    nested = _wrapped(strategy)
    if nested is not None and "nested" in snap:
        _restore(nested, snap["nested"])
