"""Server side of osd-fl: a strategy wrapper that validates, decodes and aggregates.

:class:`OSDStrategy` wraps any Flower :class:`~flwr.serverapp.strategy.Strategy`
the way Flower's differential-privacy wrappers do::

    strategy = OSDStrategy(FedAvg(fraction_train=0.5), config=CompressionConfig(rank=2))
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=10)

and pairs with :func:`clients.osd_mod` on the ClientApp. Per round it

1. adds every compression setting to the train config (``osd.*`` keys) and
   lets the inner strategy sample nodes and build the messages;
2. checks each reply against the global model it was sent (from a node
   sampled this round, one reply per node, payload framing,
   ``num-examples``, size limit, format version, method, tensor names,
   shapes and dtypes, positions, finite values, and optionally the norm of
   the decoded update), rejecting a bad reply with its reason logged and
   counted instead of failing the round; a sampled node that sent nothing
   (timeout) and an error reply count as ``failed``;
3. rebuilds accepted replies one tensor at a time into a float64 weighted
   running sum (memory: the sums, 2x a float32 model, plus one tensor,
   however many clients answer) and forms
   ``W + server_lr * sum_i(n_i * dW_i) / sum_i(n_i)`` tensor by tensor,
   freeing each sum as its tensor is written;
4. hands that model to the inner strategy's ``aggregate_train`` as a single
   reply, so inner strategies with a server optimizer (FedAdam, FedYogi,
   FedAvgM, ...) apply their step to the decoded average. With FedAvg (whose
   ``aggregate_train`` is not overridden) the result would be that model
   times ``w / w = 1.0``, so the strategy returns it directly and skips
   FedAvg's copies of the arrays.

Robust aggregators that need every update separately (Krum, FedMedian,
trimmed mean) do not fit the O(model) running sum and are not supported.

Every message in both directions is metered (:mod:`strategies.metering`):
the totals of each phase join that phase's metrics, and with ``csv_dir``
the per-node traffic and the per-round metrics are written after each round.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    DEFAULT_TTL,
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.app.message import make_message
from flwr.common.constant import SType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from osd_fl import CompressionConfig, ConfigError, PayloadError, decode, payload_budget
from osd_fl.budget import total_dense_bytes
from osd_fl.codec import rebuild_is_finite, reconstruct
from osd_fl.compressor import get_compressor
from osd_fl.payload import Payload
from osd_fl.records import (
    METRIC_ACCEPTED,
    METRIC_FAILED,
    METRIC_NO_REPLY,
    METRIC_NORM_MEDIAN,
    METRIC_NORM_THRESHOLD,
    METRIC_REJECTED,
    METRIC_REJECTED_NORM,
    PAYLOAD_RECORD_KEY,
    WEIGHT_KEY,
    array_to_tensor,
    config_to_record,
    record_specs,
    record_to_payload,
)
from strategies.metering import ByteMeter, MeteredGrid

__all__ = ["OSDStrategy", "Rejection"]

# A child of Flower's logger, so messages show in the ServerApp's console like Flower's own.
log = logging.getLogger("flwr.osd.strategy")

#: Slack for framing when a method has no byte budget (dense, fp16, int8).
_UNBUDGETED_SLACK = 64 * 1024

#: Largest accepted ``num-examples``: every integer up to it is exact in float64,
#: and weight times the largest decodable value stays far from overflow.
MAX_WEIGHT = float(2**53)

#: Characters of a client-supplied reason (error text, tensor names) kept in logs.
_REASON_CHARS = 500


@dataclass(frozen=True)
class Rejection:
    """A reply that was not aggregated, and why."""

    server_round: int
    node_id: int
    reason: str
    failed: bool = False
    """True for a reply that carried a Flower ``Error`` or never came (counted as ``failed``)."""
    kind: str = "invalid"
    """``invalid`` (failed validation), ``norm`` (outside the norm bound),
    ``unsolicited`` (unsampled node or second reply), ``error`` (Flower error
    reply) or ``no-reply`` (sampled, nothing received before the timeout)."""


class _Rejected(Exception):
    """Internal: a reply failed validation; the message is the reason."""


def _is_floating(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


class OSDStrategy(Strategy):
    """Wrap a Flower strategy so that clients upload OSD-compressed updates.

    Parameters
    ----------
    inner
        The strategy that samples nodes, builds messages, aggregates metrics
        and (if it has one) applies a server optimizer. Default: ``FedAvg()``.
    config
        Compression settings sent to every client (``osd.*`` train-config
        keys). Default: ``CompressionConfig()``.
    server_lr
        Server learning rate eta in ``W <- W + eta * avg(dW)``. Keep 1.0 with a
        server optimizer in ``inner`` (it has its own step size).
    max_payload_bytes
        Largest payload accepted from one client. Default: the budget of the
        configured method (:func:`osd_fl.payload_budget`); for methods without
        a budget (dense, fp16, int8), twice the dense float32 size plus 64 KiB.
    meter
        Byte meter to use (default: a fresh :class:`ByteMeter`, see
        :attr:`meter`).
    csv_dir
        If set, write ``traffic.csv`` (per round, phase, node, direction) and
        ``rounds.csv`` (this strategy's per-round metrics) there after every
        aggregation.
    norm_bound
        If set, reject a reply whose decoded update ``dW`` (all floating
        tensors together) has an L2 norm above this. Off by default.
    norm_bound_relative
        If set, reject a reply whose update norm is above this factor times
        the median norm of the round's replies that passed every other check
        (the absolute bound included). Must be >= 1. Off by default. Either
        bound costs a second rebuild of each tensor (norms first, then the
        sum), never more memory: see Notes.
    min_accepted
        Fewest accepted replies for the round to change the model; with fewer,
        the global model is left unchanged (the run goes on). Default 1, as
        FedAvg aggregates any non-empty set of valid replies. Sampling (how
        many nodes, waiting for ``min_available_nodes``) is always the inner
        strategy's.

    Notes
    -----
    Validation and faults: a reply that fails validation (counted
    ``rejected``), carries a Flower error or never arrives (``failed``;
    ``no-reply`` counts the latter) is left out, its reason logged and kept
    in :attr:`rejections` (missing replies in :attr:`missing`); the round is
    the weighted average of the others, exactly as if the bad ones had never
    replied. If none is accepted the global model is unchanged. See
    ``docs/security.md``.

    Norm bounds: the norm is the L2 norm of the decoded update over every
    floating tensor, computed in float64. The strategy never holds a whole
    decoded update, only the float64 running sums and one rebuilt tensor, so
    measuring a norm costs a pass of its own: with a bound every tensor of a
    kept reply is rebuilt twice (once to measure, once to add), where without
    one a float32 tensor is rebuilt once. ``norm_bound_relative`` needs the
    round's median before any update can be added: the first pass keeps only
    each reply's norm (a float per reply), a second pass parses the replies
    within the bound again and adds them. Memory stays O(model) plus O(1)
    per reply either way; rebuild time roughly doubles. The median
    is only a robust reference while most replies are honest; with two
    replies it is their mean. Rejected outliers count as ``rejected`` and
    ``rejected-norm``; the round's metrics carry ``update-norm-median`` and
    ``norm-threshold``.

    Tuning: the compression knobs live in :class:`~osd_fl.config.CompressionConfig`
    (turn ``rank`` first, then ``value_dtype``, then ``relax``). The server
    side has one knob of its own, ``server_lr``: above 1 it extrapolates the
    averaged update, which can offset the shrinkage of a low-rank update
    without error feedback; start at 1.0.

    Floating tensors are aggregated; integer buffers (e.g. BatchNorm's
    ``num_batches_tracked``) are not sent by the client mod and keep their
    global value. The new global model keeps the dtypes of the old one, also
    where an inner server optimizer (Flower's FedAdam) returns float64.
    """

    def __init__(
        self,
        inner: Strategy | None = None,
        config: CompressionConfig | None = None,
        *,
        server_lr: float = 1.0,
        max_payload_bytes: int | None = None,
        meter: ByteMeter | None = None,
        csv_dir: str | os.PathLike[str] | None = None,
        norm_bound: float | None = None,
        norm_bound_relative: float | None = None,
        min_accepted: int = 1,
    ) -> None:
        super().__init__()
        if not math.isfinite(server_lr) or server_lr <= 0:
            raise ConfigError(f"server_lr={server_lr} must be a positive finite number")
        if max_payload_bytes is not None and max_payload_bytes <= 0:
            raise ConfigError(f"max_payload_bytes={max_payload_bytes} must be positive")
        if norm_bound is not None and not (math.isfinite(norm_bound) and norm_bound > 0):
            raise ConfigError(f"norm_bound={norm_bound} must be a positive finite number (or None)")
        if norm_bound_relative is not None and not (math.isfinite(norm_bound_relative) and norm_bound_relative >= 1):
            raise ConfigError(f"norm_bound_relative={norm_bound_relative} must be a finite number >= 1 (or None)")
        if min_accepted < 1:
            raise ConfigError(f"min_accepted={min_accepted} must be >= 1")
        self.norm_bound = None if norm_bound is None else float(norm_bound)
        self.norm_bound_relative = None if norm_bound_relative is None else float(norm_bound_relative)
        self.min_accepted = int(min_accepted)
        self.inner: Strategy = inner if inner is not None else FedAvg()
        self.config = config if config is not None else CompressionConfig()
        get_compressor(self.config)  # fail now on an unknown method, not in round 1
        self.server_lr = float(server_lr)
        self.max_payload_bytes = max_payload_bytes
        self.meter = meter if meter is not None else ByteMeter()
        self.csv_dir = Path(csv_dir) if csv_dir is not None else None
        self.weighted_by_key: str = str(getattr(self.inner, "weighted_by_key", WEIGHT_KEY))
        self.rejections: list[Rejection] = []
        """Replies received but not aggregated, with their reasons (every round)."""
        self.missing: list[Rejection] = []
        """Sampled nodes that sent no reply before the timeout (every round)."""
        self.history: list[dict[str, Any]] = []
        self._global: ArrayRecord | None = None
        self._global_round = -1
        self._sampled: set[int] = set()

    def __repr__(self) -> str:
        """Name the wrapper and what it wraps."""
        return f"OSDStrategy(inner={self.inner!r}, method={self.config.method!r}, rank={self.config.rank})"

    @property
    def bounds_norm(self) -> bool:
        """Whether a norm bound (absolute or relative) is set."""
        return self.norm_bound is not None or self.norm_bound_relative is not None

    # --- Strategy API ---------------------------------------------------------------

    def summary(self) -> None:
        """Log the compression settings, then the inner strategy's summary."""
        log.info("\t├──> OSD compression (uplink):")
        for name, value in self.config.to_dict().items():
            log.info("\t│\t├── %s: %s", name, value)
        log.info("\t│\t├── norm_bound: %s", self.norm_bound)
        log.info("\t│\t├── norm_bound_relative: %s", self.norm_bound_relative)
        log.info("\t│\t├── min_accepted: %s", self.min_accepted)
        log.info("\t│\t└── server_lr: %s", self.server_lr)
        self.inner.summary()

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run Flower's round loop with every message metered.

        Same parameters and result as :meth:`flwr.serverapp.strategy.Strategy.start`;
        ``grid`` is wrapped in a :class:`MeteredGrid` unless it already is one.
        """
        metered = grid if isinstance(grid, MeteredGrid) else MeteredGrid(grid, self.meter)
        if isinstance(grid, MeteredGrid) and grid.meter is not self.meter:
            self.meter = grid.meter
        return super().start(
            grid=metered,
            initial_arrays=initial_arrays,
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Add the ``osd.*`` settings to ``config``; the inner strategy builds the messages."""
        self.meter.begin_round(server_round)
        self._global = arrays
        self._global_round = server_round
        for key, value in config_to_record(self.config).items():
            config[key] = value
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._sampled = {int(m.metadata.dst_node_id) for m in messages}
        return messages

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, decode and average the replies; never raises.

        Returns
        -------
        tuple
            The new global model (``None`` when fewer than ``min_accepted``
            replies were accepted, so the global model stays as it was) and
            the round's metrics: the clients' metrics averaged over accepted
            replies, ``accepted``, ``rejected``, ``failed`` (``no-reply``
            and ``rejected-norm`` break these down), the norm statistics when
            a bound is set, and the train phase's byte counts.
        """
        counts = {METRIC_ACCEPTED: 0, METRIC_REJECTED: 0, METRIC_FAILED: 0, METRIC_NO_REPLY: 0}
        if self.bounds_norm:
            counts[METRIC_REJECTED_NORM] = 0
        extra: dict[str, float] = {}
        arrays: ArrayRecord | None = None
        client_metrics: MetricRecord | None = None
        try:
            arrays, client_metrics = self._aggregate(server_round, list(replies), counts, extra)
        except Exception:  # one bad round must not end the ServerApp
            log.exception("round %d: aggregation failed; the global model is left unchanged", server_round)
            arrays = None
        metrics = MetricRecord()
        if client_metrics is not None:
            for key, value in client_metrics.items():
                metrics[key] = value
        for key, count in counts.items():
            metrics[key] = count
        for key, number in extra.items():
            metrics[key] = number
        for key, total in self.meter.totals(server_round, MessageType.TRAIN).items():
            metrics[key] = total
        self._record_history(server_round, MessageType.TRAIN, metrics)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the inner strategy (the global model goes down dense)."""
        self.meter.begin_round(server_round)
        return list(self.inner.configure_evaluate(server_round, arrays, config, grid))

    def aggregate_evaluate(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> MetricRecord | None:
        """Delegate to the inner strategy; add the evaluate phase's byte counts."""
        replies = list(replies)
        try:
            inner = self.inner.aggregate_evaluate(server_round, replies)
        except Exception:  # keep the run going
            log.exception("round %d: evaluate aggregation failed in the inner strategy", server_round)
            inner = None
        totals = self.meter.totals(server_round, MessageType.EVALUATE)
        if inner is None and not replies and not any(totals.values()):
            return None
        metrics = MetricRecord()
        if inner is not None:
            for key, value in inner.items():
                metrics[key] = value
        for key, total in totals.items():
            metrics[key] = total
        self._record_history(server_round, MessageType.EVALUATE, metrics)
        return metrics

    # --- validation and aggregation ---------------------------------------------------

    def payload_limit(self, arrays: ArrayRecord | None = None) -> int:
        """Largest payload (bytes) accepted for a model shaped like ``arrays``.

        Parameters
        ----------
        arrays
            The global model (default: the one sent in the current round).
        """
        if self.max_payload_bytes is not None:
            return self.max_payload_bytes
        record = arrays if arrays is not None else self._global
        if record is None:
            raise ConfigError("no global model yet: call configure_train first or pass arrays")
        shapes = {n: s for n, (s, dt) in record_specs(record).items() if _is_floating(dt)}
        if get_compressor(self.config).budgeted or self.config.budget_bytes:
            return payload_budget(shapes, self.config)
        return 2 * total_dense_bytes(shapes, 4) + _UNBUDGETED_SLACK

    def _aggregate(
        self,
        server_round: int,
        replies: list[Message],
        counts: dict[str, int],
        extra: dict[str, float],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._global is None or self._global_round != server_round:
            raise RuntimeError(f"aggregate_train({server_round}) without configure_train for that round")
        global_record = self._global
        specs_all = record_specs(global_record)
        specs = {n: spec for n, spec in specs_all.items() if _is_floating(spec[1])}
        limit = self.payload_limit(global_record)

        acc: dict[str, torch.Tensor] = {n: torch.zeros(s, dtype=torch.float64) for n, (s, _) in specs.items()}
        total_weight = 0.0
        accepted: list[Message] = []
        # Two passes only with a relative bound: (reply, weight, norm), no tensors.
        pending: list[tuple[Message, float, float]] = []
        two_pass = self.norm_bound_relative is not None
        t0 = time.perf_counter()
        answered: set[int] = set()
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if node not in self._sampled or node in answered:
                counts[METRIC_REJECTED] += 1
                why = "a second reply from this node" if node in answered else "node was not sampled this round"
                self._reject(server_round, node, why, kind="unsolicited")
                continue
            answered.add(node)
            if msg.has_error():
                counts[METRIC_FAILED] += 1
                reason = f"error reply (code {msg.error.code}): {msg.error.reason}"
                self._reject(server_round, node, reason, failed=True, kind="error")
                continue
            checked = self._checked_update(server_round, node, msg, specs, limit, counts)
            if checked is None:
                continue
            weight, payload, norm = checked
            if two_pass:
                pending.append((msg, weight, norm))  # pass 1 keeps the norm only
                continue
            _accumulate(acc, payload, weight)
            total_weight += weight
            accepted.append(msg)
        if two_pass and pending:
            assert self.norm_bound_relative is not None
            median = statistics.median(norm for _, _, norm in pending)
            threshold = self.norm_bound_relative * median
            extra[METRIC_NORM_MEDIAN] = median
            extra[METRIC_NORM_THRESHOLD] = threshold
            for msg, weight, norm in pending:
                node = int(msg.metadata.src_node_id)
                if norm > threshold:
                    counts[METRIC_REJECTED] += 1
                    counts[METRIC_REJECTED_NORM] += 1
                    reason = (
                        f"update norm {norm:.6g} exceeds {self.norm_bound_relative:g} x the round's median "
                        f"{median:.6g} = {threshold:.6g}"
                    )
                    self._reject(server_round, node, reason, kind="norm")
                    continue
                # Parsing again is cheap (the payload is the compressed bytes);
                # nothing decoded is kept between the passes.
                checked = self._checked_update(server_round, node, msg, specs, limit, counts, first_pass=False)
                if checked is None:  # cannot happen (decoding is deterministic); never trust it blindly
                    continue
                weight, payload, _ = checked
                _accumulate(acc, payload, weight)
                total_weight += weight
                accepted.append(msg)
        for node in sorted(self._sampled - answered):
            counts[METRIC_FAILED] += 1
            counts[METRIC_NO_REPLY] += 1
            self._reject(server_round, node, "no reply before the timeout", failed=True, kind="no-reply")
        counts[METRIC_ACCEPTED] = len(accepted)
        log.info(
            "round %d: %d replies accepted, %d rejected, %d failed (%d without reply) (decoded in %.3fs)",
            server_round,
            counts[METRIC_ACCEPTED],
            counts[METRIC_REJECTED],
            counts[METRIC_FAILED],
            counts[METRIC_NO_REPLY],
            time.perf_counter() - t0,
        )
        if not accepted:
            log.warning("round %d: no reply accepted; the global model is left unchanged", server_round)
            return None, None
        client_metrics = self._client_metrics(accepted)
        if len(accepted) < self.min_accepted:
            log.warning(
                "round %d: %d replies accepted, fewer than min_accepted=%d; the global model is left unchanged",
                server_round,
                len(accepted),
                self.min_accepted,
            )
            return None, client_metrics

        candidate = self._apply_step(server_round, global_record, acc, self.server_lr / total_weight)
        del acc
        if candidate is None:
            return None, client_metrics
        reply_metrics = MetricRecord(dict(client_metrics.items()))
        reply_metrics[self.weighted_by_key] = total_weight
        if _plain_fedavg(self.inner):
            # FedAvg of one reply is that reply's arrays times w / w = 1.0,
            # exactly: skip its copies (it would hold three models at once)
            # and aggregate the metrics the way it would.
            assert isinstance(self.inner, FedAvg)
            contents = [RecordDict({"metrics": reply_metrics})]
            inner_metrics: MetricRecord | None = self.inner.train_metrics_aggr_fn(contents, self.weighted_by_key)
            arrays: ArrayRecord | None = candidate
        else:
            # Hand the decoded model to the inner strategy as one reply carrying the
            # total weight: server optimizers step from it.
            inner_arrays_key = str(getattr(self.inner, "arrayrecord_key", "arrays"))
            synthetic = make_message(
                metadata=_synthetic_metadata(accepted[0]),
                content=RecordDict({inner_arrays_key: candidate, "metrics": reply_metrics}),
            )
            del candidate
            arrays, inner_metrics = self.inner.aggregate_train(server_round, [synthetic])
            if arrays is not None:
                arrays = _restore_dtypes(arrays, specs_all)
        merged = MetricRecord(dict(client_metrics.items()))
        if inner_metrics is not None:
            for key, value in inner_metrics.items():
                merged[key] = value
        return arrays, merged

    def _apply_step(
        self,
        server_round: int,
        global_record: ArrayRecord,
        acc: dict[str, torch.Tensor],
        scale: float,
    ) -> ArrayRecord | None:
        """``W + scale * acc`` as a new record, one tensor at a time (``acc`` is emptied).

        Each accumulator is freed as soon as its tensor is written, so the
        peak is the accumulators plus one tensor, not accumulators plus two
        models. Returns ``None`` (global model unchanged) if a new value is
        not finite in the model's dtype.
        """
        out: dict[str, Array] = {}
        for name, array in global_record.items():
            if name not in acc:
                out[name] = array  # integer buffers: the same (immutable) Array
                continue
            current = array_to_tensor(array)
            step = acc.pop(name).mul_(scale)
            new = step.add_(current).to(current.dtype)  # in float64, then the model's dtype
            del step
            if new.is_floating_point() and not bool(torch.isfinite(new).all()):
                # Every accepted update is finite, but their sum can still leave
                # the model's dtype (float16 tops out at 65504): keep the model.
                log.warning(
                    "round %d: the new value of %r is not finite in %s; the global model is left unchanged "
                    "(consider norm_bound)",
                    server_round,
                    name,
                    new.dtype,
                )
                acc.clear()
                return None
            out[name] = Array(np.asarray(new.numpy()))
            del new, current
        return ArrayRecord(out)

    def _checked_update(
        self,
        server_round: int,
        node: int,
        msg: Message,
        specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        limit: int,
        counts: dict[str, int],
        *,
        first_pass: bool = True,
    ) -> tuple[float, Payload, float] | None:
        """Validate one reply; on failure record why and return ``None``.

        Returns ``(weight, payload, norm)``: the parsed payload (compressed
        factors, not the rebuilt tensors) and the update's norm, NaN when no
        bound is set. Every tensor that could rebuild to a non-finite value,
        and every tensor when a norm bound is set, is rebuilt here one at a
        time and dropped, so :func:`_accumulate` cannot fail half-way.
        ``first_pass=False`` (the second pass of a relative norm bound) parses
        the payload again and skips what the first pass checked.
        """
        try:
            weight, payload = self._decode_reply(msg, specs, limit)
            if not first_pass:  # rebuilt and measured in the first pass, and decoding is deterministic
                return weight, payload, math.nan
            norm = self._rebuild_check(payload)
        except _Rejected as exc:
            counts[METRIC_REJECTED] += 1
            self._reject(server_round, node, str(exc))
            return None
        except Exception as exc:  # a bug or resource error on hostile input: that reply's failure only
            log.exception("round %d: unexpected error while validating the reply from node %d", server_round, node)
            counts[METRIC_REJECTED] += 1
            self._reject(server_round, node, f"validation raised {type(exc).__name__}: {exc}")
            return None
        if self.bounds_norm:
            if not math.isfinite(norm):
                counts[METRIC_REJECTED] += 1
                self._reject(server_round, node, f"update norm is {norm}")
                return None
            if self.norm_bound is not None and norm > self.norm_bound:
                counts[METRIC_REJECTED] += 1
                counts[METRIC_REJECTED_NORM] += 1
                reason = f"update norm {norm:.6g} exceeds the bound {self.norm_bound:g}"
                self._reject(server_round, node, reason, kind="norm")
                return None
        return weight, payload, norm

    def _rebuild_check(self, payload: Payload) -> float:
        """Rebuild the tensors that need it, one at a time; return the norm (NaN without a bound).

        Raises
        ------
        _Rejected
            If a tensor rebuilds to NaN/Inf.
        """
        total = 0.0
        try:
            for rec in payload.records:
                if self.bounds_norm:
                    total += float(reconstruct(rec).to(torch.float64).square().sum())
                elif not rebuild_is_finite(rec):
                    reconstruct(rec)  # raises PayloadError on NaN/Inf
        except PayloadError as exc:
            raise _Rejected(f"invalid payload: {exc}") from None
        return math.sqrt(total) if self.bounds_norm else math.nan

    def _decode_reply(
        self,
        msg: Message,
        specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        limit: int,
    ) -> tuple[float, Payload]:
        content = msg.content
        weight = _reply_weight(content, self.weighted_by_key)
        if PAYLOAD_RECORD_KEY not in content.array_records:
            found = sorted(content.array_records)
            raise _Rejected(
                f"no OSD payload record {PAYLOAD_RECORD_KEY!r} (found ArrayRecords {found}); "
                "is clients.osd_mod installed on the ClientApp?"
            )
        extra = sorted(k for k in content.array_records if k != PAYLOAD_RECORD_KEY)
        if extra:
            raise _Rejected(f"unexpected ArrayRecords {extra} besides the payload")
        try:
            blob = record_to_payload(content.array_records[PAYLOAD_RECORD_KEY], max_bytes=limit)
            payload = decode(blob, expected=specs, max_bytes=limit, method=self.config.method)
        except PayloadError as exc:
            raise _Rejected(f"invalid payload: {exc}") from None
        names = [rec.name for rec in payload.records]
        if len(names) != len(set(names)) or set(names) != set(specs):
            raise _Rejected(f"payload tensors {sorted(names)} do not match the model's {sorted(specs)}")
        return weight, payload

    def _client_metrics(self, accepted: list[Message]) -> MetricRecord:
        contents = [m.content for m in accepted]
        fn = getattr(self.inner, "train_metrics_aggr_fn", None) or aggregate_metricrecords
        try:
            result = fn(contents, self.weighted_by_key)
            if isinstance(result, MetricRecord):
                return result
        except Exception:  # metrics must not cost the round
            log.warning("client train metrics could not be aggregated; continuing without them", exc_info=True)
        return MetricRecord()

    def _reject(
        self, server_round: int, node: int, reason: str, *, failed: bool = False, kind: str = "invalid"
    ) -> None:
        reason = _printable(reason)
        entry = Rejection(server_round, node, reason, failed, kind)
        if kind == "no-reply":
            self.missing.append(entry)
            log.warning("round %d: node %d sent no reply before the timeout", server_round, node)
            return
        self.rejections.append(entry)
        log.warning("round %d: reply from node %d excluded: %s", server_round, node, reason)

    # --- reporting --------------------------------------------------------------------

    def _record_history(self, server_round: int, phase: str, metrics: MetricRecord) -> None:
        row: dict[str, Any] = {"round": server_round, "phase": phase}
        row.update({k: v for k, v in metrics.items() if not isinstance(v, list)})
        self.history.append(row)
        if self.csv_dir is not None:
            try:
                self.write_csv(self.csv_dir)
            except OSError:
                log.exception("could not write CSV files to %s", self.csv_dir)

    def write_csv(self, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``traffic.csv`` (per node) and ``rounds.csv`` (per round and phase).

        Returns
        -------
        tuple of Path
            ``(traffic.csv, rounds.csv)``.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        traffic = self.meter.to_csv(out / "traffic.csv")
        rounds = out / "rounds.csv"
        columns: list[str] = []
        for row in self.history:
            columns.extend(k for k in row if k not in columns)
        with rounds.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.history)
        return traffic, rounds


def _restore_dtypes(arrays: ArrayRecord, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> ArrayRecord:
    """Cast arrays back to the global model's dtypes where an inner strategy changed them.

    Flower's server optimizers (FedAdam, FedYogi, ...) compute in float64 and
    return float64 arrays; left alone that doubles every later broadcast and
    makes clients send float64 updates.
    """
    changed = False
    out: dict[str, Array] = {}
    for name, array in arrays.items():
        spec = specs.get(name)
        if spec is not None and array.stype == SType.NUMPY and _torch_dtype_name(spec[1]) != array.dtype:
            out[name] = Array(np.asarray(array.numpy(), dtype=_torch_dtype_name(spec[1])))
            changed = True
        else:
            out[name] = array
    return ArrayRecord(out) if changed else arrays


def _torch_dtype_name(dtype: torch.dtype) -> str:
    return str(torch.empty(0, dtype=dtype).numpy().dtype)


def _printable(text: str, limit: int = _REASON_CHARS) -> str:
    """``text`` clipped to ``limit`` characters, control characters escaped (it may come from a client)."""
    clipped = text[:limit]
    out = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in clipped)
    return out + (f"... [{len(text) - limit} more characters]" if len(text) > limit else "")


def _accumulate(acc: dict[str, torch.Tensor], payload: Payload, weight: float) -> None:
    """Add ``weight`` x each rebuilt tensor to its float64 sum, one tensor alive at a time.

    The reply passed :meth:`OSDStrategy._rebuild_check`, so no tensor can fail
    here; if one still did, half of the reply would be in the sum, so the
    round is abandoned (the caller keeps the global model) rather than
    continued.
    """
    for rec in payload.records:
        try:
            delta = reconstruct(rec)
        except PayloadError as exc:  # pragma: no cover - excluded by _rebuild_check
            raise RuntimeError(f"tensor {rec.name!r} failed to rebuild after validation: {exc}") from exc
        acc[rec.name].add_(delta, alpha=weight)  # computed in float64 without a float64 copy
        del delta


def _plain_fedavg(strategy: Strategy) -> bool:
    """Whether ``strategy`` aggregates arrays exactly as Flower's FedAvg does (a subclass may not)."""
    return isinstance(strategy, FedAvg) and type(strategy).aggregate_train is FedAvg.aggregate_train


def _reply_weight(content: RecordDict, key: str) -> float:
    records = list(content.metric_records.values())
    if len(records) != 1:
        raise _Rejected(f"expected exactly one MetricRecord, found {len(records)}")
    if key not in records[0]:
        raise _Rejected(f"metric {key!r} is missing")
    value = records[0][key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Rejected(f"metric {key!r} must be a number, got {type(value).__name__}")
    if isinstance(value, int) and value > MAX_WEIGHT:  # before float(): a huge int would overflow it
        raise _Rejected(f"metric {key!r} = {value} exceeds the largest accepted weight 2**53")
    weight = float(value)
    if not math.isfinite(weight) or weight <= 0:
        raise _Rejected(f"metric {key!r} must be positive and finite, got {value!r}")
    if weight > MAX_WEIGHT:
        raise _Rejected(f"metric {key!r} = {value!r} exceeds the largest accepted weight 2**53")
    return weight


def _synthetic_metadata(template: Message) -> Metadata:
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
