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
   shapes and dtypes, positions, finite values, and optionally the norm of the decoded
   update), rejecting a bad reply with its reason logged and counted instead of failing
   the round; no reply (timeout) or an error reply counts as ``failed`` (a resync request: ``resyncs``);
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

import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result, Strategy

from osd_fl import CompressionConfig, ConfigError, Payload, payload_limit, resolve_config
from osd_fl.records import (
    METRIC_ACCEPTED,
    METRIC_FAILED,
    METRIC_METRICS_DROPPED,
    METRIC_NO_REPLY,
    METRIC_REJECTED,
    METRIC_REJECTED_NORM,
    WEIGHT_KEY,
    config_to_record,
    record_specs,
)
from strategies.aggregation import Aggregator, FactorSum, RoundInputs, Valid, resum, zeros
from strategies.downlink import Downlink, is_resync_request
from strategies.metering import ByteMeter, MeteredGrid
from strategies.metrics import clean_reply, merge_metrics
from strategies.norm_bound import NormBound
from strategies.privacy import check_inner_strategy_privacy, check_train_config_privacy
from strategies.replies import MAX_WEIGHT, ReplyRejected, check_evaluate_replies, check_reply
from strategies.reporting import (
    FederationStalled,
    History,
    Rejection,
    RejectionLog,
    StallTracker,
    log_settings,
    new_counts,
)
from strategies.safety import InnerGuard, check_inner_strategy

__all__ = ["MAX_WEIGHT", "FederationStalled", "OSDStrategy", "Rejection"]

# A child of Flower's logger, so messages show in the ServerApp's console like Flower's own.
log = logging.getLogger("flwr.osd.strategy")


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
    downlink
        Compress the broadcast too (:mod:`strategies.downlink`): a
        :class:`~osd_fl.config.CompressionConfig` of its own (method, rank), or
        a :class:`~strategies.downlink.Downlink` for its other knobs. Off by
        default: the dense model goes down, as in Flower.

    Notes
    -----
    Validation and faults: a reply that fails validation (counted
    ``rejected``), carries a Flower error or never arrives (``failed``;
    ``no-reply`` counts the latter; a resync request, ``resyncs``) is left out, its reason logged and kept
    in :attr:`rejections` (missing replies in :attr:`missing`); the round is
    the weighted average of the others, exactly as if the bad ones had never
    replied. If none is accepted the global model is unchanged. See
    ``docs/security.md``.

    Safe range (:mod:`strategies.safety`): no rebuilt value, and no value of
    the new model, may exceed :func:`osd_fl.checks.value_limit` of its dtype
    (64 in float16, 2**62 in float32) unless it was already there. If the
    round's mean breaks the rule, the reply pushing hardest at the offending
    entries is left out (``rejected-range``) and the round summed again; a
    rejected inner step is rolled back. With no reply to blame the round is
    kept out (``round-kept-out``; it counts towards ``max_stalled_rounds``).

    Norm bounds (:mod:`strategies.norm_bound`): float64 norms from the
    factors, no rebuild; rejected outliers count as ``rejected`` and
    ``rejected-norm``; the metrics carry ``update-norm-median`` and ``norm-threshold``.

    Client metrics (:mod:`strategies.metrics`): a non-finite, over-long or
    reserved entry is dropped (counted in ``metrics-dropped``); the reply is kept.

    Tuning: the compression knobs live in :class:`~osd_fl.config.CompressionConfig`
    (turn ``rank`` first, then ``value_dtype``, then ``relax``). The server
    side has one knob of its own, ``server_lr``: above 1 it extrapolates the
    averaged update, which can offset the shrinkage of a low-rank update
    without error feedback; start at 1.0.

    Floating tensors are aggregated; integer buffers (BatchNorm's
    ``num_batches_tracked``) keep their global value. The new model keeps the
    old one's dtypes, also where an inner optimizer (FedAdam) returns float64.
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
        downlink: CompressionConfig | Downlink | None = None,
    ) -> None:
        super().__init__()
        if not math.isfinite(server_lr) or server_lr <= 0:
            raise ConfigError(f"server_lr={server_lr} must be a positive finite number")
        if max_payload_bytes is not None and max_payload_bytes <= 0:
            raise ConfigError(f"max_payload_bytes={max_payload_bytes} must be positive")
        self._bound = NormBound(norm_bound, norm_bound_relative)
        if min_accepted < 1:
            raise ConfigError(f"min_accepted={min_accepted} must be >= 1")
        if max_stalled_rounds < 0:
            raise ConfigError(f"max_stalled_rounds={max_stalled_rounds} must be >= 0 (0 = never stop the run)")
        self.min_accepted = int(min_accepted)
        self.inner: Strategy = inner if inner is not None else FedAvg()
        check_inner_strategy(self.inner, trust_custom=trust_custom_inner)
        self.config = config if config is not None else CompressionConfig()
        # what a correct client runs: the method's overrides applied (fails now on an unknown method)
        self._resolved = resolve_config(self.config)
        check_inner_strategy_privacy(self.inner, self.config)  # DP wrappers: which orders work
        self.max_payload_bytes = max_payload_bytes
        self.meter = meter if meter is not None else ByteMeter()
        self.csv_dir = Path(csv_dir) if csv_dir is not None else None
        self.weighted_by_key: str = str(getattr(self.inner, "weighted_by_key", WEIGHT_KEY))
        self._log = RejectionLog()
        self._stall = StallTracker(int(max_stalled_rounds))
        self._history = History(self.meter, self.csv_dir)
        self._guard = InnerGuard(self.inner, self.config.seed if sampling_seed is None else int(sampling_seed))
        self._step = Aggregator(self.inner, self._guard, self.weighted_by_key, float(server_lr))
        self._global: ArrayRecord | None = None
        self._global_round = -1
        self._sampled: set[int] = set()
        self._sent: list[Message] = []
        self._sent_evaluate: list[Message] = []
        self.downlink = Downlink(downlink) if isinstance(downlink, CompressionConfig) else downlink

    def __repr__(self) -> str:
        """Name the wrapper and what it wraps."""
        return f"OSDStrategy(inner={self.inner!r}, method={self.config.method!r}, rank={self.config.rank})"

    @property
    def norm_bound(self) -> float | None:
        """The absolute norm bound (``None``: none)."""
        return self._bound.absolute

    @property
    def norm_bound_relative(self) -> float | None:
        """The relative norm bound's factor (``None``: none)."""
        return self._bound.relative

    @property
    def bounds_norm(self) -> bool:
        """Whether a norm bound (absolute or relative) is set."""
        return self._bound.active

    @property
    def server_lr(self) -> float:
        """Scale of the mean update in the server step."""
        return self._step.server_lr

    @property
    def max_stalled_rounds(self) -> int:
        """Train rounds in a row that may change nothing before :class:`FederationStalled` (0: never)."""
        return self._stall.limit

    @property
    def rejections(self) -> list[Rejection]:
        """Replies received but not aggregated, with their reasons (every round)."""
        return self._log.rejections

    @property
    def missing(self) -> list[Rejection]:
        """Sampled nodes that sent no reply before the timeout (every round)."""
        return self._log.missing

    @property
    def history(self) -> list[dict[str, Any]]:
        """One row of metrics per round and phase (what ``rounds.csv`` holds)."""
        return self._history.rows

    # --- Strategy API ---------------------------------------------------------------

    def summary(self) -> None:
        """Log the compression settings, then the inner strategy's summary."""
        down = self.downlink.config.to_dict() if self.downlink is not None else None
        extra = {"norm_bound": self.norm_bound, "norm_bound_relative": self.norm_bound_relative}
        extra.update(min_accepted=self.min_accepted, max_stalled_rounds=self.max_stalled_rounds)
        log_settings(self.config.to_dict(), {**extra, "server_lr": self.server_lr, "downlink": down})
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
            self.meter = self._history.meter = grid.meter
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
        self._global = arrays if self.downlink is None else self.downlink.prepare(arrays)
        self._global_round = server_round
        for key, value in config_to_record(self._resolved).items():  # "auto" resolved: what replies must match
            config[key] = value
        messages = list(self._guard.call(self.inner.configure_train, server_round, arrays, config, grid))
        if self.downlink is not None:
            messages = self.downlink.rewrite(server_round, arrays, messages)
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
        counts = new_counts(self.bounds_norm)
        extra: dict[str, float] = {}
        arrays: ArrayRecord | None = None
        client_metrics: MetricRecord | None = None
        replies = list(replies)
        if self.downlink is not None:
            self.downlink.observe(server_round, self._sent, replies)
            extra.update({k: float(v) for k, v in self.downlink.counts.round(server_round).items()})
        try:
            arrays, client_metrics = self._aggregate(server_round, replies, counts, extra)
        except Exception:  # one bad round must not end the ServerApp
            log.exception("round %d: aggregation failed; the global model is left unchanged", server_round)
            arrays = None
        metrics = merge_metrics(client_metrics, counts, extra, self.meter.totals(server_round, MessageType.TRAIN))
        self._history.record(server_round, MessageType.TRAIN, metrics)
        self._stall.track(server_round, changed=arrays is not None, entries=self._log.of_round(server_round))
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the inner strategy (the global model goes down dense, or as broadcasts with a downlink)."""
        self.meter.begin_round(server_round)
        messages = list(self._guard.call(self.inner.configure_evaluate, server_round, arrays, config, grid))
        if self.downlink is not None and messages:
            messages = self.downlink.rewrite(server_round, arrays, messages)
        self._sent_evaluate = messages
        return messages

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
        if self.downlink is not None:
            self.downlink.observe(server_round, self._sent_evaluate, replies)
        harmonised, dropped, left_out = check_evaluate_replies(replies, self.weighted_by_key)
        for node, reason in left_out:
            self._log.reject(server_round, node, reason, kind="evaluate")
        try:
            inner = self._guard.call(self.inner.aggregate_evaluate, server_round, harmonised)
        except Exception:  # keep the run going
            log.exception("round %d: evaluate aggregation failed in the inner strategy", server_round)
            inner = None
        totals = self.meter.totals(server_round, MessageType.EVALUATE)
        if inner is None and not replies and not any(totals.values()):
            return None
        metrics = merge_metrics(inner, {METRIC_METRICS_DROPPED: dropped}, totals)
        self._history.record(server_round, MessageType.EVALUATE, metrics)
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

    def _round_inputs(self, server_round: int) -> RoundInputs:
        if self._global is None or self._global_round != server_round:
            raise RuntimeError(f"aggregate_train({server_round}) without configure_train for that round")
        specs_all = record_specs(self._global)
        specs = {n: spec for n, spec in specs_all.items() if spec[1].is_floating_point}
        limit = self.payload_limit(self._global)
        return RoundInputs(server_round, self._global, specs_all, specs, limit, self._resolved)

    def _aggregate(
        self,
        server_round: int,
        replies: list[Message],
        counts: dict[str, int],
        extra: dict[str, float],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, bound, sum and step; ``(new model or None, the clients' and inner strategy's metrics)``."""
        rnd = self._round_inputs(server_round)
        t0 = time.perf_counter()
        acc = zeros(rnd.specs)
        kept, total_weight = self._validate_round(rnd, replies, counts, acc)
        if self.norm_bound_relative is not None and kept:  # pass 2: the replies within the bound
            kept = self._relative_bound(server_round, kept, counts, extra)
            total_weight = resum(kept, rnd, acc)
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
            return None, self._step.client_metrics(kept)

        def reject(node: int, reason: str, kind: str) -> None:
            self._log.reject(server_round, node, reason, kind=kind)

        arrays, inner_metrics, client_metrics = self._step.step_within_range(
            rnd, kept, acc, total_weight, counts, reject
        )
        counts[METRIC_ACCEPTED] = len(kept) if arrays is not None else 0
        if client_metrics is None:  # no step taken: the metrics of what was left
            client_metrics = self._step.client_metrics(kept)
        return arrays, merge_metrics(client_metrics, inner_metrics)

    def _reply_node(self, msg: Message, sent_to: dict[str, int]) -> int:
        """The node a reply stands for.

        The SuperLink answers, from its own id, for a node whose heartbeat
        lapsed (NODE_UNAVAILABLE) or whose reply expired.
        """
        node = int(msg.metadata.src_node_id)
        if node == SUPERLINK_NODE_ID and msg.has_error():
            node = sent_to.get(msg.metadata.reply_to_message_id, node)
        return node

    def _validate_round(
        self, rnd: RoundInputs, replies: list[Message], counts: dict[str, int], acc: dict[str, torch.Tensor]
    ) -> tuple[list[Valid], float]:
        """Check every reply; add the valid ones to ``acc`` unless a relative bound needs a second pass."""
        server_round = rnd.server_round
        two_pass = self.norm_bound_relative is not None
        kept: list[Valid] = []
        total_weight = 0.0
        sums = FactorSum(acc)
        answered: set[int] = set()
        sent_to = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in self._sent}
        for msg in replies:
            node = self._reply_node(msg, sent_to)
            if node not in self._sampled or node in answered:
                counts[METRIC_REJECTED] += 1
                why = "a second reply from this node" if node in answered else "node was not sampled this round"
                self._log.reject(server_round, node, why, kind="unsolicited")
                continue
            answered.add(node)
            if msg.has_error():  # a resync request of the broadcast counts in ``resyncs``, not ``failed``
                resync = self.downlink is not None and is_resync_request(msg)
                counts[METRIC_FAILED] += 0 if resync else 1
                why = "asks for a dense resync" if resync else f"error reply (code {msg.error.code})"
                kind = "resync" if resync else "error"
                self._log.reject(server_round, node, f"{why}: {msg.error.reason}", failed=not resync, kind=kind)
                continue
            checked = self._check(rnd, node, msg, counts)
            if checked is None:
                continue
            valid, payload = checked
            if not two_pass:
                sums.add(payload, valid.weight)
                total_weight += valid.weight
            kept.append(valid)
        sums.flush()
        for node in sorted(self._sampled - answered):
            counts[METRIC_FAILED] += 1
            counts[METRIC_NO_REPLY] += 1
            self._log.reject(server_round, node, "no reply before the timeout", failed=True, kind="no-reply")
        return kept, total_weight

    def _check(self, rnd: RoundInputs, node: int, msg: Message, counts: dict[str, int]) -> tuple[Valid, Payload] | None:
        """Validate one reply (:func:`strategies.replies.check_reply`) and the absolute bound; record a rejection."""
        cleaned, dropped = clean_reply(msg, self.weighted_by_key)
        counts[METRIC_METRICS_DROPPED] += dropped
        try:
            weight, payload, norm = check_reply(
                cleaned, rnd.specs, rnd.limit, rnd.config, self.weighted_by_key, with_norm=self.bounds_norm
            )
        except ReplyRejected as exc:
            counts[METRIC_REJECTED] += 1
            self._log.reject(rnd.server_round, node, str(exc))
            return None
        except Exception as exc:  # a bug or resource error on hostile input: that reply's failure only
            log.exception("round %d: unexpected error while validating the reply from node %d", rnd.server_round, node)
            counts[METRIC_REJECTED] += 1
            self._log.reject(rnd.server_round, node, f"validation raised {type(exc).__name__}: {exc}")
            return None
        reason = self._bound.absolute_reason(norm)
        if reason is not None:
            counts[METRIC_REJECTED] += 1
            counts[METRIC_REJECTED_NORM] += 1
            self._log.reject(rnd.server_round, node, reason, kind="norm")
            return None
        return Valid(cleaned, node, weight, norm), payload

    def _relative_bound(
        self, server_round: int, kept: list[Valid], counts: dict[str, int], extra: dict[str, float]
    ) -> list[Valid]:
        within, rejected, stats = self._bound.split_relative(kept)
        extra.update(stats)
        for valid, reason in rejected:
            counts[METRIC_REJECTED] += 1
            counts[METRIC_REJECTED_NORM] += 1
            self._log.reject(server_round, valid.node, reason, kind="norm")
        return within

    # --- reporting --------------------------------------------------------------------

    def write_csv(self, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``traffic.csv`` (per node) and ``rounds.csv`` (per round and phase).

        Returns
        -------
        tuple of Path
            ``(traffic.csv, rounds.csv)``.
        """
        return self._history.write_csv(directory)
