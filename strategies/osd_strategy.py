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
import re
import time
from collections import Counter
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
from flwr.common.constant import SUPERLINK_NODE_ID, SType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from osd_fl import (
    CompressionConfig,
    ConfigError,
    PayloadError,
    payload_limit,
    resolve_config,
)
from osd_fl.codec import reconstruct
from osd_fl.payload import Payload
from osd_fl.records import (
    METRIC_ACCEPTED,
    METRIC_FAILED,
    METRIC_METRICS_DROPPED,
    METRIC_NO_REPLY,
    METRIC_NORM_MEDIAN,
    METRIC_NORM_THRESHOLD,
    METRIC_REJECTED,
    METRIC_REJECTED_NORM,
    METRIC_REJECTED_RANGE,
    METRIC_ROUND_KEPT_OUT,
    WEIGHT_KEY,
    array_to_tensor,
    config_to_record,
    record_specs,
)
from strategies.metering import ByteMeter, MeteredGrid
from strategies.metrics import clean_reply, common_metrics, printable
from strategies.privacy import check_inner_strategy_privacy, check_train_config_privacy
from strategies.replies import MAX_WEIGHT, ReplyRejected, check_reply, decode_payload, reference_norm, reply_weight
from strategies.safety import InnerGuard, OutOfRange, check_inner_strategy, out_of_range, record_out_of_range

__all__ = ["MAX_WEIGHT", "FederationStalled", "OSDStrategy", "Rejection"]

# A child of Flower's logger, so messages show in the ServerApp's console like Flower's own.
log = logging.getLogger("flwr.osd.strategy")

Specs = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


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
    ``range`` (would take the model out of its dtype's safe range),
    ``unsolicited`` (unsampled node or second reply), ``error`` (Flower error
    reply), ``no-reply`` (sampled, nothing received before the timeout) or
    ``evaluate`` (an evaluate reply left out of the metrics)."""


class FederationStalled(RuntimeError):
    """Raised by :meth:`OSDStrategy.aggregate_train` after too many rounds in a row changed nothing.

    Ends the ServerApp with an error (``flwr run`` then reports the run as
    failed) instead of letting a run in which nothing can succeed exit 0.
    The message names the most frequent reason replies were rejected or
    failed in those rounds.
    """


@dataclass
class _Valid:
    """A reply that passed validation: no tensors, just what is needed to add it (again)."""

    msg: Message  #: with its metrics cleaned
    node: int
    weight: float
    norm: float


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
        a robust reference: the median norm of the round's replies that
        passed every other check (the absolute bound included), the smallest
        one left out, so that no single reply can lower it
        (:func:`strategies.replies.reference_norm`). Must be >= 1. Off by
        default. Norms come from the factors (no rebuild), in float64.
    min_accepted
        Fewest accepted replies for the round to change the model; with fewer,
        the global model is left unchanged (the run goes on). Default 1, as
        FedAvg aggregates any non-empty set of valid replies. Sampling (how
        many nodes, waiting for ``min_available_nodes``) is always the inner
        strategy's.
    max_stalled_rounds
        After this many train rounds in a row in which no reply changed the
        model, raise :class:`FederationStalled` (naming the most frequent
        rejection or failure reason) so the run fails loudly. 0 = never.
        Default 3.
    sampling_seed
        Seed of the private Python generator the inner strategy samples nodes
        with (default ``config.seed``): the same seed samples the same nodes.
        The caller's global ``random`` and NumPy generators are never moved.
    trust_custom_inner
        Accept an inner strategy that overrides ``aggregate_train`` and is not
        one of Flower's mean-based ones, on your word that it aggregates a
        weighted mean (see :func:`strategies.safety.check_inner_strategy`).
        Robust aggregators (FedMedian, trimmed mean, Krum, Bulyan) and
        q-FedAvg are always refused.

    Notes
    -----
    Validation and faults: a reply that fails validation (counted
    ``rejected``), carries a Flower error or never arrives (``failed``;
    ``no-reply`` counts the latter) is left out, its reason logged and kept
    in :attr:`rejections` (missing replies in :attr:`missing`); the round is
    the weighted average of the others, exactly as if the bad ones had never
    replied. If none is accepted the global model is unchanged. See
    ``docs/security.md``.

    Safe range: no reply's rebuilt value may exceed
    :func:`osd_fl.checks.value_limit` of the model's dtype (64 in float16,
    2**62 in float32), and the new model, before and after the inner
    strategy's step, must be finite with no value beyond that limit unless
    it was already there and did not grow. If the round's mean breaks the
    rule, the reply pushing hardest at the offending entries is left out
    (``rejected``, ``rejected-range``) and the round is summed again without
    it, until the rule holds; a rejected inner step is rolled back (the
    inner strategy's attributes restored), so its optimizer state never
    holds a step that was not taken. If no reply is to blame (an inner
    optimizer's own momentum carries the model out), the round is kept out
    (``round-kept-out``) and counts towards ``max_stalled_rounds``.

    Norm bounds: the norm is the L2 norm of the decoded update over every
    floating tensor, computed in float64 NumPy from the factors
    (``||A B||_F^2 = sum((A^T A) * (B B^T))``), so it is the same with any
    torch thread count and costs no rebuild. ``norm_bound_relative`` needs
    the round's reference before any update can be added: the first pass
    keeps only each reply's norm (a float per reply), a second pass parses
    the replies within the bound again and adds them. Memory stays O(model)
    plus O(1) per reply. Rejected outliers count as ``rejected`` and
    ``rejected-norm``; the round's metrics carry ``update-norm-median`` (the
    plain median) and ``norm-threshold``.

    Client metrics are checked per reply (:mod:`strategies.metrics`): an
    entry that is not a finite number, or has an over-long or reserved name
    (``round``, ``accepted``, ``bytes-up``, ...), is dropped and counted in
    ``metrics-dropped``; the reply itself is kept.

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
        max_stalled_rounds: int = 3,
        sampling_seed: int | None = None,
        trust_custom_inner: bool = False,
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
        if max_stalled_rounds < 0:
            raise ConfigError(f"max_stalled_rounds={max_stalled_rounds} must be >= 0 (0 = never stop the run)")
        self.norm_bound = None if norm_bound is None else float(norm_bound)
        self.norm_bound_relative = None if norm_bound_relative is None else float(norm_bound_relative)
        self.min_accepted = int(min_accepted)
        self.max_stalled_rounds = int(max_stalled_rounds)
        self.inner: Strategy = inner if inner is not None else FedAvg()
        check_inner_strategy(self.inner, trust_custom=trust_custom_inner)
        self.config = config if config is not None else CompressionConfig()
        # what a correct client runs: the method's overrides applied (fails now on an unknown method)
        self._resolved = resolve_config(self.config)
        check_inner_strategy_privacy(self.inner, self.config)  # DP wrappers: which orders work
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
        self._guard = InnerGuard(self.inner, self.config.seed if sampling_seed is None else int(sampling_seed))
        self._global: ArrayRecord | None = None
        self._global_round = -1
        self._sampled: set[int] = set()
        self._sent: list[Message] = []
        self._stalled = 0
        self._stall_reasons: Counter[str] = Counter()
        self._stall_examples: dict[str, str] = {}

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
        log.info("\t│\t├── max_stalled_rounds: %s", self.max_stalled_rounds)
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

        Raises
        ------
        FederationStalled
            After ``max_stalled_rounds`` train rounds in a row that changed nothing.
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
        check_train_config_privacy(self.inner, config, grid)  # a DP wrapper around this strategy
        self.meter.begin_round(server_round)
        self._global = arrays
        self._global_round = server_round
        for key, value in config_to_record(self.config).items():
            config[key] = value
        messages = list(self._guard.call(self.inner.configure_train, server_round, arrays, config, grid))
        self._sampled = {int(m.metadata.dst_node_id) for m in messages}
        self._sent = messages  # the grid stamps their message ids when it pushes them
        return messages

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, decode and average the replies; never raises but :class:`FederationStalled`.

        Returns
        -------
        tuple
            The new global model (``None`` when it stays as it was: fewer
            than ``min_accepted`` replies accepted, or no model within the
            safe range) and the round's metrics: the clients' metrics
            averaged over accepted replies, ``accepted``, ``rejected``,
            ``failed`` (``no-reply``, ``rejected-norm`` and
            ``rejected-range`` break these down), ``metrics-dropped``, the
            norm statistics when a bound is set, and the train phase's byte
            counts.

        Raises
        ------
        FederationStalled
            The ``max_stalled_rounds``-th round in a row that changed nothing.
        """
        counts = {
            METRIC_ACCEPTED: 0,
            METRIC_REJECTED: 0,
            METRIC_FAILED: 0,
            METRIC_NO_REPLY: 0,
            METRIC_REJECTED_RANGE: 0,
            METRIC_METRICS_DROPPED: 0,
        }
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
        self._track_progress(server_round, changed=arrays is not None)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the inner strategy (the global model goes down dense)."""
        self.meter.begin_round(server_round)
        return list(self._guard.call(self.inner.configure_evaluate, server_round, arrays, config, grid))

    def aggregate_evaluate(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> MetricRecord | None:
        """Check each reply's metrics, then delegate to the inner strategy; add the phase's byte counts.

        A reply with an error, without exactly one ``MetricRecord`` or with a
        bad weight is left out with its reason (kind ``evaluate``); entries
        that are not finite numbers or carry reserved or over-long names are
        dropped; replies are restricted to the metric names most of them
        share (:func:`strategies.metrics.common_metrics`), so one odd reply
        cannot make Flower skip the others' metrics.
        """
        replies = list(replies)
        usable: list[Message] = []
        records: list[MetricRecord] = []
        dropped = 0
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                continue  # counted by the inner strategy's own reply check
            try:
                reply_weight(msg.content, self.weighted_by_key)
            except ReplyRejected as exc:
                self._reject(server_round, node, f"evaluate reply: {exc}", kind="evaluate")
                continue
            cleaned, n = clean_reply(msg, self.weighted_by_key)
            dropped += n
            usable.append(cleaned)
            records.append(next(iter(cleaned.content.metric_records.values())))
        kept, restricted = common_metrics(records)
        harmonised = [
            make_message(metadata=usable[i].metadata, content=RecordDict({"metrics": record}))
            for i, record in zip(kept, restricted, strict=True)
        ]
        for i in sorted(set(range(len(usable))) - set(kept)):
            node = int(usable[i].metadata.src_node_id)
            self._reject(server_round, node, "evaluate reply lacks metrics the other replies carry", kind="evaluate")
        try:
            inner = self._guard.call(self.inner.aggregate_evaluate, server_round, harmonised)
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
        metrics[METRIC_METRICS_DROPPED] = dropped
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
        shapes = {n: s for n, (s, dt) in record_specs(record).items() if dt.is_floating_point}
        return payload_limit(shapes, self._resolved)

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
        specs = {n: spec for n, spec in specs_all.items() if spec[1].is_floating_point}
        limit = self.payload_limit(global_record)
        t0 = time.perf_counter()
        acc = _zeros(specs)
        kept, total_weight = self._validate_round(server_round, replies, specs, limit, counts, extra, acc)
        if self.norm_bound_relative is not None:  # pass 2: add the replies within the bound
            total_weight = self._resum(kept, specs, limit, acc)
        log.info(
            "round %d: %d replies valid, %d rejected, %d failed (%d without reply) (decoded in %.3fs)",
            server_round,
            len(kept),
            counts[METRIC_REJECTED],
            counts[METRIC_FAILED],
            counts[METRIC_NO_REPLY],
            time.perf_counter() - t0,
        )
        if not kept:
            log.warning("round %d: no reply accepted; the global model is left unchanged", server_round)
            return None, None
        if len(kept) < self.min_accepted:
            counts[METRIC_ACCEPTED] = len(kept)
            log.warning(
                "round %d: %d replies accepted, fewer than min_accepted=%d; the global model is left unchanged",
                server_round,
                len(kept),
                self.min_accepted,
            )
            return None, self._client_metrics(kept)
        arrays, inner_metrics, client_metrics = self._step_within_range(
            server_round, global_record, specs, specs_all, limit, kept, acc, total_weight, counts
        )
        counts[METRIC_ACCEPTED] = len(kept) if arrays is not None else 0
        if client_metrics is None:  # no step taken: the metrics of what was left
            client_metrics = self._client_metrics(kept)
        merged = MetricRecord(dict(client_metrics.items()))
        if inner_metrics is not None:
            for key, value in inner_metrics.items():
                merged[key] = value
        return arrays, merged

    def _validate_round(
        self,
        server_round: int,
        replies: list[Message],
        specs: Specs,
        limit: int,
        counts: dict[str, int],
        extra: dict[str, float],
        acc: dict[str, torch.Tensor],
    ) -> tuple[list[_Valid], float]:
        """Check every reply; add the valid ones to ``acc`` unless a relative bound needs a second pass."""
        two_pass = self.norm_bound_relative is not None
        kept: list[_Valid] = []
        total_weight = 0.0
        answered: set[int] = set()
        sent_to = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in self._sent}
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if node == SUPERLINK_NODE_ID and msg.has_error():
                # The SuperLink answers, from its own id, for a node whose heartbeat lapsed
                # (NODE_UNAVAILABLE) or whose reply expired: count it for the node it stands for.
                node = sent_to.get(msg.metadata.reply_to_message_id, node)
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
            checked = self._check(server_round, node, msg, specs, limit, counts)
            if checked is None:
                continue
            valid, payload = checked
            if not two_pass:
                _accumulate(acc, payload, valid.weight)
                total_weight += valid.weight
            kept.append(valid)
        for node in sorted(self._sampled - answered):
            counts[METRIC_FAILED] += 1
            counts[METRIC_NO_REPLY] += 1
            self._reject(server_round, node, "no reply before the timeout", failed=True, kind="no-reply")
        if two_pass and kept:
            kept = self._relative_bound(server_round, kept, counts, extra)
        return kept, total_weight

    def _check(
        self, server_round: int, node: int, msg: Message, specs: Specs, limit: int, counts: dict[str, int]
    ) -> tuple[_Valid, Payload] | None:
        """Validate one reply (:func:`strategies.replies.check_reply`) and the absolute bound; record a rejection."""
        cleaned, dropped = clean_reply(msg, self.weighted_by_key)
        counts[METRIC_METRICS_DROPPED] += dropped
        try:
            weight, payload, norm = check_reply(
                cleaned, specs, limit, self._resolved, self.weighted_by_key, with_norm=self.bounds_norm
            )
        except ReplyRejected as exc:
            counts[METRIC_REJECTED] += 1
            self._reject(server_round, node, str(exc))
            return None
        except Exception as exc:  # a bug or resource error on hostile input: that reply's failure only
            log.exception("round %d: unexpected error while validating the reply from node %d", server_round, node)
            counts[METRIC_REJECTED] += 1
            self._reject(server_round, node, f"validation raised {type(exc).__name__}: {exc}")
            return None
        if self.norm_bound is not None and norm > self.norm_bound:
            counts[METRIC_REJECTED] += 1
            counts[METRIC_REJECTED_NORM] += 1
            reason = f"update norm {norm:.6g} exceeds the bound {self.norm_bound:g}"
            self._reject(server_round, node, reason, kind="norm")
            return None
        return _Valid(cleaned, node, weight, norm), payload

    def _relative_bound(
        self, server_round: int, kept: list[_Valid], counts: dict[str, int], extra: dict[str, float]
    ) -> list[_Valid]:
        assert self.norm_bound_relative is not None
        norms = [v.norm for v in kept]
        reference = reference_norm(norms)
        threshold = self.norm_bound_relative * reference
        extra[METRIC_NORM_MEDIAN] = float(np.median(norms))
        extra[METRIC_NORM_THRESHOLD] = threshold
        within: list[_Valid] = []
        for valid in kept:
            if valid.norm > threshold:
                counts[METRIC_REJECTED] += 1
                counts[METRIC_REJECTED_NORM] += 1
                reason = (
                    f"update norm {valid.norm:.6g} exceeds {self.norm_bound_relative:g} x the round's reference "
                    f"{reference:.6g} (median without the smallest norm) = {threshold:.6g}"
                )
                self._reject(server_round, valid.node, reason, kind="norm")
                continue
            within.append(valid)
        return within

    def _resum(self, kept: list[_Valid], specs: Specs, limit: int, acc: dict[str, torch.Tensor]) -> float:
        """Fresh sums in ``acc``, every reply of ``kept`` added again (parsed anew: nothing decoded is kept)."""
        acc.update(_zeros(specs))
        total = 0.0
        for valid in kept:
            payload = decode_payload(valid.msg, specs, limit, self._resolved)
            _accumulate(acc, payload, valid.weight)
            total += valid.weight
        return total

    def _step_within_range(
        self,
        server_round: int,
        global_record: ArrayRecord,
        specs: Specs,
        specs_all: Specs,
        limit: int,
        kept: list[_Valid],
        acc: dict[str, torch.Tensor],
        total_weight: float,
        counts: dict[str, int],
    ) -> tuple[ArrayRecord | None, MetricRecord | None, MetricRecord | None]:
        """The new model from ``acc``, leaving out the replies that push it out of range (``kept`` shrinks).

        Returns the new model, the inner strategy's metrics and the clients'
        metrics over the final ``kept`` (``None, None, None`` when no model
        within range could be formed).
        """
        while kept:
            candidate, where = self._apply_step(global_record, acc, self.server_lr / total_weight)
            inner_metrics: MetricRecord | None = None
            stage = "the mean"
            if candidate is not None:
                client_metrics = self._client_metrics(kept)
                arrays, inner_metrics, where = self._inner_step(
                    server_round, global_record, specs_all, candidate, kept, client_metrics
                )
                if where is None:
                    return arrays, inner_metrics, client_metrics
                stage = f"{type(self.inner).__name__}'s step"
            assert where is not None
            culprit = self._culprit(kept, where, specs, limit)
            if culprit is None:
                log.warning(
                    "round %d: %s takes the model out of its safe range (%s) and no reply is to blame; "
                    "the global model is left unchanged",
                    server_round,
                    stage,
                    where.describe(),
                )
                counts[METRIC_ROUND_KEPT_OUT] = 1
                return None, None, None
            counts[METRIC_REJECTED] += 1
            counts[METRIC_REJECTED_RANGE] += 1
            self._reject(
                server_round,
                culprit.node,
                f"with this reply {stage} takes the model out of its dtype's safe range ({where.describe()}); "
                "the round was summed again without it",
                kind="range",
            )
            kept.remove(culprit)
            if kept:
                total_weight = self._resum(kept, specs, limit, acc)
        return None, None, None

    def _inner_step(
        self,
        server_round: int,
        global_record: ArrayRecord,
        specs_all: Specs,
        candidate: ArrayRecord,
        kept: list[_Valid],
        client_metrics: MetricRecord,
    ) -> tuple[ArrayRecord | None, MetricRecord | None, OutOfRange | None]:
        """Let the inner strategy step from ``candidate``; roll it back if its result leaves the safe range."""
        total_weight = math.fsum(v.weight for v in kept)
        reply_metrics = MetricRecord(dict(client_metrics.items()))
        reply_metrics[self.weighted_by_key] = total_weight
        if _plain_fedavg(self.inner):
            # FedAvg of one reply is that reply's arrays times w / w = 1.0,
            # exactly: skip its copies (it would hold three models at once)
            # and aggregate the metrics the way it would.
            assert isinstance(self.inner, FedAvg)
            contents = [RecordDict({"metrics": reply_metrics})]
            return candidate, self.inner.train_metrics_aggr_fn(contents, self.weighted_by_key), None
        inner_arrays_key = str(getattr(self.inner, "arrayrecord_key", "arrays"))
        synthetic = make_message(
            metadata=_synthetic_metadata(kept[0].msg),
            content=RecordDict({inner_arrays_key: candidate, "metrics": reply_metrics}),
        )
        snapshot = self._guard.snapshot()
        try:
            arrays, metrics = self._guard.call(self.inner.aggregate_train, server_round, [synthetic])
        except BaseException:
            self._guard.restore(snapshot)
            raise
        if arrays is None:
            return None, metrics, None
        arrays = _restore_dtypes(arrays, specs_all)
        where = record_out_of_range(arrays, global_record)
        if where is not None:
            self._guard.restore(snapshot)  # the rejected step never reaches the optimizer's state
        return arrays, metrics, where

    def _culprit(self, kept: list[_Valid], where: OutOfRange, specs: Specs, limit: int) -> _Valid | None:
        """The reply whose weighted update pushes hardest in the direction ``where`` overflows, if any does."""
        best: _Valid | None = None
        best_push = 0.0
        for valid in kept:
            payload = decode_payload(valid.msg, specs, limit, self._resolved)
            rec = next(r for r in payload.records if r.name == where.name)
            values = reconstruct(rec).to(torch.float64).reshape(-1)[where.positions]
            push = torch.where(where.signs != 0, values * where.signs, values.abs())
            strength = float(push.max()) * valid.weight
            if strength > best_push:
                best, best_push = valid, strength
        return best

    def _apply_step(
        self,
        global_record: ArrayRecord,
        acc: dict[str, torch.Tensor],
        scale: float,
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

    def _client_metrics(self, kept: list[_Valid]) -> MetricRecord:
        records = [next(iter(v.msg.content.metric_records.values())) for v in kept]
        _, restricted = common_metrics(records)
        contents = [RecordDict({"metrics": record}) for record in restricted]
        if not contents:
            return MetricRecord()
        fn = getattr(self.inner, "train_metrics_aggr_fn", None) or aggregate_metricrecords
        try:
            result = fn(contents, self.weighted_by_key)
            if isinstance(result, MetricRecord):
                return result
        except Exception:  # metrics must not cost the round
            log.warning("client train metrics could not be aggregated; continuing without them", exc_info=True)
        return MetricRecord()

    def _track_progress(self, server_round: int, *, changed: bool) -> None:
        """Count rounds in a row that changed nothing; raise :class:`FederationStalled` at the limit."""
        if changed:
            self._stalled = 0
            self._stall_reasons.clear()
            self._stall_examples.clear()
            return
        self._stalled += 1
        for entry in [*self.rejections, *self.missing]:
            if entry.server_round == server_round:
                key = re.sub(r"\d[\d.e+-]*", "#", entry.reason)
                self._stall_reasons[key] += 1
                self._stall_examples.setdefault(key, entry.reason)
        if not self.max_stalled_rounds or self._stalled < self.max_stalled_rounds:
            return
        if self._stall_reasons:
            key, count = self._stall_reasons.most_common(1)[0]
            why = f"most frequent reason ({count} times): {self._stall_examples[key]}"
        else:
            why = "no node was sampled or every reply was valid but left the model unchanged"
        raise FederationStalled(
            f"round {server_round}: {self._stalled} rounds in a row changed nothing; {why}. "
            f"Stopping the run (raise max_stalled_rounds={self.max_stalled_rounds}, or 0 to never stop)."
        )

    def _reject(
        self, server_round: int, node: int, reason: str, *, failed: bool = False, kind: str = "invalid"
    ) -> None:
        reason = printable(reason)
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


def _zeros(specs: Specs) -> dict[str, torch.Tensor]:
    return {n: torch.zeros(s, dtype=torch.float64) for n, (s, _) in specs.items()}


def _plain_fedavg(strategy: Strategy) -> bool:
    """Whether ``strategy`` aggregates arrays exactly as Flower's FedAvg does (a subclass may not)."""
    return isinstance(strategy, FedAvg) and type(strategy).aggregate_train is FedAvg.aggregate_train


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
