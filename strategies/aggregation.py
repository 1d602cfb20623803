"""The round's arithmetic: float64 running sums, the server step, and keeping the model in range.

Accepted replies are added into float64 weighted sums (:class:`FactorSum`:
low-rank records in factor space, a chunk of clients' stacked factors per
product; every other record rebuilt one tensor at a time; the sums, 2x a
float32 model, plus the pending factors, however many clients answer). :func:`apply_step` forms
``W + server_lr * sum_i(n_i * dW_i) / sum_i(n_i)`` tensor by tensor, freeing
each sum as its tensor is written. :class:`Aggregator` then hands that model
to the inner strategy as a single reply (so FedAdam, FedYogi, FedAvgM, ...
apply their step to the decoded average), and when the mean or the inner
step would leave the dtype's safe range (:mod:`strategies.safety`) it
excludes the reply pushing hardest at the offending entries and sums the
round again without it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import DEFAULT_TTL, Array, ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.app.message import make_message
from flwr.common.constant import SType
from flwr.serverapp.strategy import FedAvg, Strategy

from osd_fl import CompressionConfig, Kind, Payload, PayloadError, TensorRecord, reconstruct
from osd_fl.records import METRIC_REJECTED, METRIC_REJECTED_RANGE, METRIC_ROUND_KEPT_OUT, array_to_tensor
from strategies.metrics import aggregate_client_metrics
from strategies.replies import decode_payload
from strategies.safety import InnerGuard, OutOfRange, out_of_range, record_out_of_range

__all__ = [
    "FACTOR_CHUNK",
    "Aggregator",
    "FactorSum",
    "RoundInputs",
    "Specs",
    "Valid",
    "accumulate",
    "apply_step",
    "plain_fedavg",
    "restore_dtypes",
    "zeros",
]

# A child of Flower's logger, so messages show in the ServerApp's console like Flower's own.
log = logging.getLogger("flwr.osd.strategy")

Specs = Mapping[str, tuple[tuple[int, ...], torch.dtype]]
#: ``reject(node, reason, kind)``: record why a reply was left out.
Reject = Callable[[int, str, str], None]


@dataclass
class Valid:
    """A reply that passed validation: no tensors, just what is needed to add it (again)."""

    msg: Message  #: with its metrics cleaned
    node: int
    weight: float
    norm: float


@dataclass(frozen=True)
class RoundInputs:
    """What every step of one round's aggregation reads: the model sent, its specs, the limits."""

    server_round: int
    global_record: ArrayRecord
    specs_all: Specs  #: every array of the global model
    specs: Specs  #: the floating-point ones (the ones clients update)
    limit: int  #: largest accepted payload (bytes)
    config: CompressionConfig  #: what a correct client runs (method overrides applied)


def zeros(specs: Specs) -> dict[str, torch.Tensor]:
    """Fresh float64 sums, one per floating-point tensor."""
    return {n: torch.zeros(s, dtype=torch.float64) for n, (s, _) in specs.items()}


#: Inner dimension of the stacked factors at which a matrix's pending products are formed (see FactorSum).
FACTOR_CHUNK = 128


class FactorSum:
    """Weighted float64 sums of replies, low-rank records summed in factor space.

    A float32 LOWRANK record ``A B`` (any sparsity: its factors are filled
    into small dense ones) is not rebuilt: its weighted factors ``w A`` and
    ``B`` wait, per matrix, until their inner dimensions add up to
    ``chunk``; then one float64 product ``[w_1 A_1 | ... ] [B_1; ...]`` adds
    them all. Every other record (dense, sparse, int8, zero, or a low-rank
    record of another dtype, whose rebuild rounds to that dtype) is rebuilt
    and added at once, as :func:`accumulate` does. Call :meth:`flush` before
    reading the sums.

    Compared with rebuilding each reply in float32 (today's
    :func:`accumulate`), each entry differs by at most what that rebuild
    rounded: ``sum_i w_i (k_i + 1) 2**-24 (|A_i| |B_i|)`` plus float64
    rounding (``tests/test_factor_sum.py`` checks this bound).

    Memory: the sums plus, per matrix, at most ``chunk + k`` pending
    factor columns (float32, as decoded; each weight is applied in float64
    when the product is formed).
    """

    def __init__(self, acc: dict[str, torch.Tensor], chunk: int = FACTOR_CHUNK) -> None:
        self.acc = acc
        self.chunk = chunk
        self._pending: dict[str, tuple[list[torch.Tensor], list[torch.Tensor], list[float]]] = {}
        self._width: dict[str, int] = {}

    def add(self, payload: Payload, weight: float) -> None:
        """Add ``weight`` x every tensor of ``payload`` (validated by :func:`strategies.replies.check_reply`)."""
        for rec in payload.records:
            if rec.kind == Kind.LOWRANK and rec.dtype == "float32" and rec.rank > 0:
                n, d = rec.matrix_shape
                # kept as decoded (float32) with the weight aside: half the memory of weighted float64
                # factors, and _form computes the very same float64 products w * A
                a = torch.from_numpy(rec.sections[0].dense()).reshape(n, rec.rank)
                b = torch.from_numpy(rec.sections[1].dense()).reshape(rec.rank, d)
                lefts, rights, weights = self._pending.setdefault(rec.name, ([], [], []))
                lefts.append(a)
                rights.append(b)
                weights.append(weight)
                self._width[rec.name] = self._width.get(rec.name, 0) + rec.rank
                if self._width[rec.name] >= self.chunk:
                    self._form(rec.name)
            else:
                _add_rebuilt(self.acc, rec, weight)

    def _form(self, name: str) -> None:
        lefts, rights, weights = self._pending.pop(name)
        self._width.pop(name)
        target = self.acc[name]
        flat = target.view(lefts[0].shape[0], rights[0].shape[1])
        column_weights = torch.tensor(
            [w for w, a in zip(weights, lefts, strict=True) for _ in range(a.shape[1])], dtype=torch.float64
        )
        left = torch.cat(lefts, dim=1).to(torch.float64).mul_(column_weights)
        flat.addmm_(left, torch.cat(rights, dim=0).to(torch.float64))

    def flush(self) -> None:
        """Form every pending product; the sums are complete afterwards."""
        for name in list(self._pending):
            self._form(name)


def _add_rebuilt(acc: dict[str, torch.Tensor], rec: TensorRecord, weight: float) -> None:
    try:
        delta = reconstruct(rec)
    except PayloadError as exc:  # pragma: no cover - excluded by check_reply
        raise RuntimeError(f"tensor {rec.name!r} failed to rebuild after validation: {exc}") from exc
    acc[rec.name].add_(delta, alpha=weight)  # computed in float64 without a float64 copy
    del delta


def accumulate(acc: dict[str, torch.Tensor], payload: Payload, weight: float) -> None:
    """Add ``weight`` x each rebuilt tensor to its float64 sum, one tensor alive at a time.

    The reply passed :func:`strategies.replies.check_reply`, so no tensor can
    fail here; if one still did, half of the reply would be in the sum, so the
    round is abandoned (the caller keeps the global model) rather than
    continued. The strategy sums with :class:`FactorSum`, which equals this
    within float32 rounding and forms low-rank records in factor space.
    """
    for rec in payload.records:
        _add_rebuilt(acc, rec, weight)


def resum(kept: list[Valid], rnd: RoundInputs, acc: dict[str, torch.Tensor]) -> float:
    """Fresh sums in ``acc``, every reply of ``kept`` added again (parsed anew: nothing decoded is kept)."""
    acc.update(zeros(rnd.specs))
    sums = FactorSum(acc)
    total = 0.0
    for valid in kept:
        payload = decode_payload(valid.msg, rnd.specs, rnd.limit, rnd.config)
        sums.add(payload, valid.weight)
        total += valid.weight
    sums.flush()
    return total


def apply_step(
    global_record: ArrayRecord, acc: dict[str, torch.Tensor], scale: float
) -> tuple[ArrayRecord | None, OutOfRange | None]:
    """``W + scale * acc`` as a new record, one tensor at a time (``acc`` is consumed).

    Each accumulator is scaled in place and the new tensor written while
    the next waits, so the peak is the accumulators plus one tensor, not
    accumulators plus two models. Returns ``(None, where)`` if a new
    value breaks the safe-range rule (:func:`strategies.safety.out_of_range`);
    ``acc`` is then unusable until summed again.
    """
    out: dict[str, Array] = {}
    for name, array in global_record.items():
        if name not in acc:
            out[name] = array  # integer buffers: the same (immutable) Array
            continue
        current = array_to_tensor(array)
        step = acc[name].mul_(scale)
        new = step.add_(current).to(current.dtype)  # in float64, then the model's dtype
        where = out_of_range(name, new, current)
        if where is not None:
            return None, where
        out[name] = Array(np.asarray(new.numpy()))
        acc[name] = torch.empty(0, dtype=torch.float64)  # free the sum as its tensor is written
        del new, current, step
    return ArrayRecord(out), None


def culprit(kept: list[Valid], where: OutOfRange, rnd: RoundInputs) -> Valid | None:
    """The reply whose weighted update pushes hardest in the direction ``where`` overflows, if any does."""
    best: Valid | None = None
    best_push = 0.0
    for valid in kept:
        payload = decode_payload(valid.msg, rnd.specs, rnd.limit, rnd.config)
        rec = next(r for r in payload.records if r.name == where.name)
        values = reconstruct(rec).to(torch.float64).reshape(-1)[where.positions]
        push = torch.where(where.signs != 0, values * where.signs, values.abs())
        strength = float(push.max()) * valid.weight
        if strength > best_push:
            best, best_push = valid, strength
    return best


def restore_dtypes(arrays: ArrayRecord, specs: Specs) -> ArrayRecord:
    """Cast arrays back to the global model's dtypes where an inner strategy changed them.

    Flower's server optimizers (FedAdam, FedYogi, ...) compute in float64 and
    return float64 arrays; left alone that doubles every later broadcast and
    makes clients send float64 updates.
    """
    changed = False
    out: dict[str, Array] = {}
    for name, array in arrays.items():
        spec = specs.get(name)
        if spec is not None and array.stype == SType.NUMPY and _numpy_dtype_name(spec[1]) != array.dtype:
            out[name] = Array(np.asarray(array.numpy(), dtype=_numpy_dtype_name(spec[1])))
            changed = True
        else:
            out[name] = array
    return ArrayRecord(out) if changed else arrays


def _numpy_dtype_name(dtype: torch.dtype) -> str:
    return str(torch.empty(0, dtype=dtype).numpy().dtype)


def plain_fedavg(strategy: Strategy) -> bool:
    """Whether ``strategy`` aggregates arrays exactly as Flower's FedAvg does (a subclass may not)."""
    return isinstance(strategy, FedAvg) and type(strategy).aggregate_train is FedAvg.aggregate_train


def synthetic_metadata(template: Message) -> Metadata:
    """Metadata of the one reply the inner strategy sees (the decoded average), modelled on a real one."""
    meta = template.metadata
    return Metadata(
        run_id=meta.run_id,
        message_id="",
        src_node_id=meta.src_node_id,
        dst_node_id=meta.dst_node_id,
        reply_to_message_id=meta.reply_to_message_id,
        group_id=meta.group_id,
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=MessageType.TRAIN,
    )


class Aggregator:
    """The server step of :class:`~strategies.OSDStrategy`: the mean, then the inner strategy's step.

    Parameters
    ----------
    inner
        The wrapped Flower strategy.
    guard
        Runs the inner strategy's calls on a private RNG and rolls its state back.
    weighted_by_key
        The metric that weights replies (``num-examples``).
    server_lr
        Scale of the mean update.
    """

    def __init__(self, inner: Strategy, guard: InnerGuard, weighted_by_key: str, server_lr: float) -> None:
        self.inner = inner
        self.guard = guard
        self.weighted_by_key = weighted_by_key
        self.server_lr = server_lr

    def client_metrics(self, kept: list[Valid]) -> MetricRecord:
        """The clients' train metrics over ``kept``, aggregated the inner strategy's way."""
        return aggregate_client_metrics(self.inner, [v.msg for v in kept], self.weighted_by_key)

    def step_within_range(
        self,
        rnd: RoundInputs,
        kept: list[Valid],
        acc: dict[str, torch.Tensor],
        total_weight: float,
        counts: dict[str, int],
        reject: Reject,
    ) -> tuple[ArrayRecord | None, MetricRecord | None, MetricRecord | None]:
        """The new model from ``acc``, leaving out the replies that push it out of range (``kept`` shrinks).

        Returns the new model, the inner strategy's metrics and the clients'
        metrics over the final ``kept`` (``None, None, None`` when no model
        within range could be formed).
        """
        while kept:
            candidate, where = apply_step(rnd.global_record, acc, self.server_lr / total_weight)
            stage = "the mean"
            if candidate is not None:
                client_metrics = self.client_metrics(kept)
                arrays, inner_metrics, where = self.inner_step(rnd, candidate, kept, client_metrics)
                if where is None:
                    return arrays, inner_metrics, client_metrics
                stage = f"{type(self.inner).__name__}'s step"
            assert where is not None
            blamed = culprit(kept, where, rnd)
            if blamed is None:
                log.warning(
                    "round %d: %s takes the model out of its safe range (%s) and no reply is to blame; "
                    "the global model is left unchanged",
                    rnd.server_round,
                    stage,
                    where.describe(),
                )
                counts[METRIC_ROUND_KEPT_OUT] = 1
                return None, None, None
            counts[METRIC_REJECTED] += 1
            counts[METRIC_REJECTED_RANGE] += 1
            reason = (
                f"with this reply {stage} takes the model out of its dtype's safe range ({where.describe()}); "
                "the round was summed again without it"
            )
            reject(blamed.node, reason, "range")
            kept.remove(blamed)
            if kept:
                total_weight = resum(kept, rnd, acc)
        return None, None, None

    def inner_step(
        self, rnd: RoundInputs, candidate: ArrayRecord, kept: list[Valid], client_metrics: MetricRecord
    ) -> tuple[ArrayRecord | None, MetricRecord | None, OutOfRange | None]:
        """Let the inner strategy step from ``candidate``; roll it back if its result leaves the safe range."""
        total_weight = math.fsum(v.weight for v in kept)
        reply_metrics = MetricRecord(dict(client_metrics.items()))
        reply_metrics[self.weighted_by_key] = total_weight
        if plain_fedavg(self.inner):
            # FedAvg of one reply is that reply's arrays times w / w = 1.0,
            # exactly: skip its copies (it would hold three models at once)
            # and aggregate the metrics the way it would.
            assert isinstance(self.inner, FedAvg)
            contents = [RecordDict({"metrics": reply_metrics})]
            return candidate, self.inner.train_metrics_aggr_fn(contents, self.weighted_by_key), None
        inner_arrays_key = str(getattr(self.inner, "arrayrecord_key", "arrays"))
        synthetic = make_message(
            metadata=synthetic_metadata(kept[0].msg),
            content=RecordDict({inner_arrays_key: candidate, "metrics": reply_metrics}),
        )
        snapshot = self.guard.snapshot()
        try:
            arrays, metrics = self.guard.call(self.inner.aggregate_train, rnd.server_round, [synthetic])
        except BaseException:
            self.guard.restore(snapshot)
            raise
        if arrays is None:
            return None, metrics, None
        arrays = restore_dtypes(arrays, rnd.specs_all)
        where = record_out_of_range(arrays, rnd.global_record)
        if where is not None:
            self.guard.restore(snapshot)  # the rejected step never reaches the optimizer's state
        return arrays, metrics, where
