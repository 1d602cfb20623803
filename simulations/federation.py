"""The ServerApp side both tasks share: a strategy that records every reply, and the round loop.

:func:`run_federation` runs FedAvg wrapped in :class:`RecordingStrategy` (an
:class:`~strategies.OSDStrategy`) on a Flower grid from the task's initial
weights and central evaluation. With ``results-dir`` set it writes
``traffic.csv`` (bytes per round, phase, node and direction),
``rounds.csv`` (per-round metrics), ``replies.csv`` (one row per reply: the
node it answers for and the metrics that node reported, e.g.
``osd-residual-in-norm``, which rounds.csv only has averaged) and
``result.json`` (everything, including central test accuracy per round).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from osd_fl import CompressionConfig
from simulations.app_config import AppSettings
from strategies import OSDStrategy
from strategies.downlink import Downlink

__all__ = ["REPLIES_CSV", "EvaluateFn", "RecordingStrategy", "downlink_of", "result_summary", "run_federation"]

log = logging.getLogger("flwr.osd.app")

#: File in ``results-dir`` with one row per reply the ServerApp received.
REPLIES_CSV = "replies.csv"

#: Central evaluation: ``(server_round, global arrays) -> metrics`` (Flower's ``evaluate_fn``).
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class RecordingStrategy(OSDStrategy):
    """:class:`~strategies.OSDStrategy` that also keeps every reply, per node (``replies.csv``).

    ``rounds.csv`` averages the clients' metrics over accepted replies; this
    keeps what each node sent, train and evaluate, before validation: one row
    per reply with ``round``, ``phase``, ``node_id`` (the node the instruction
    went to, found by ``reply_to_message_id``; ``-1`` if no instruction of
    this round matches), ``src_node_id`` (as the reply says: the SuperLink's
    own id for an error it generated, e.g. for a node that stopped sending
    heartbeats), ``error`` (empty, or ``code: reason``) and the node's metrics.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replies: list[dict[str, Any]] = []
        self._sent: list[Message] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As :meth:`OSDStrategy.configure_train`; keeps the messages to map replies to nodes."""
        return self._keep(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As :meth:`OSDStrategy.configure_evaluate`; keeps the messages to map replies to nodes."""
        return self._keep(super().configure_evaluate(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record the replies, then :meth:`OSDStrategy.aggregate_train`."""
        replies = list(replies)
        self._record(server_round, MessageType.TRAIN, replies)
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record the replies, then :meth:`OSDStrategy.aggregate_evaluate`."""
        replies = list(replies)
        self._record(server_round, MessageType.EVALUATE, replies)
        return super().aggregate_evaluate(server_round, replies)

    def _keep(self, messages: Iterable[Message]) -> list[Message]:
        # The grid stamps the message ids on these very objects when it pushes
        # them, before any reply is aggregated.
        self._sent = list(messages)
        return self._sent

    def _record(self, server_round: int, phase: str, replies: list[Message]) -> None:
        sent_to = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in self._sent}
        for msg in replies:
            meta = msg.metadata
            row: dict[str, Any] = {
                "round": server_round,
                "phase": phase,
                "node_id": sent_to.get(meta.reply_to_message_id, -1),
                "src_node_id": int(meta.src_node_id),
                "error": f"{msg.error.code}: {msg.error.reason}" if msg.has_error() else "",
            }
            if msg.has_content():
                for record in msg.content.metric_records.values():
                    row.update({k: v for k, v in record.items() if k not in row and not isinstance(v, list)})
            self.replies.append(row)
        if self.csv_dir is not None:
            try:
                self._write_replies(self.csv_dir / REPLIES_CSV)
            except OSError:
                log.exception("could not write %s", self.csv_dir / REPLIES_CSV)

    def _write_replies(self, path: Path) -> None:
        columns: list[str] = []
        for row in self.replies:
            columns.extend(k for k in row if k not in columns)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.replies)


def downlink_of(settings: AppSettings) -> Downlink | None:
    """The compressed broadcast the settings ask for (``downlink-method``), or None (dense)."""
    if not settings.downlink_method:
        return None
    config = CompressionConfig(method=settings.downlink_method, rank=settings.downlink_rank)
    return Downlink(config, clients_hold_initial=settings.downlink_hold_initial)


def run_federation(
    grid: Grid,
    settings: AppSettings,
    compression: CompressionConfig,
    initial_arrays: ArrayRecord,
    evaluate_fn: EvaluateFn | None,
    *,
    train_config: Mapping[str, Any] | None = None,
    extra_settings: Mapping[str, Any] | None = None,
    sampling_seed: int | None = None,
) -> tuple[Result, OSDStrategy]:
    """Run ``settings.num_server_rounds`` rounds on ``grid``; return Flower's result and the strategy.

    Parameters
    ----------
    grid
        The grid Flower gives the ServerApp (or any :class:`~flwr.serverapp.Grid`).
    settings
        Federation settings (fractions, rounds, server learning rate, results folder).
    compression
        Upload compression settings sent to every client.
    initial_arrays
        The task's initial global model.
    evaluate_fn
        Central evaluation of the global model each round, or None.
    train_config
        Extra keys of every train instruction (e.g. the local learning rate).
    extra_settings
        Written into ``result.json`` beside the settings (e.g. the text task's).
    sampling_seed
        Seed of the node sampling (default: the compression config's seed).
    """
    inner = FedAvg(
        fraction_train=settings.fraction_train,
        fraction_evaluate=settings.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1 if settings.fraction_evaluate > 0 else 0,
        min_available_nodes=settings.min_nodes,
    )
    strategy = RecordingStrategy(
        inner,
        config=compression,
        server_lr=settings.server_lr,
        max_payload_bytes=settings.max_payload_bytes or None,
        csv_dir=settings.results_dir or None,
        sampling_seed=sampling_seed,
        downlink=downlink_of(settings),
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=initial_arrays,
        num_rounds=settings.num_server_rounds,
        train_config=ConfigRecord(dict(train_config or {})),
        evaluate_fn=evaluate_fn,
    )
    if settings.results_dir:
        path = Path(settings.results_dir) / "result.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        summary = result_summary(result, strategy)
        summary["settings"] = {**vars(settings), **dict(extra_settings or {}), "compression": compression.to_dict()}
        path.write_text(json.dumps(summary, indent=2))
        log.info("results written to %s", path.parent)
    return result, strategy


def result_summary(result: Result, strategy: OSDStrategy) -> dict[str, Any]:
    """Plain-JSON view of a run: metrics per round, traffic totals, rejections."""

    def plain(records: dict[int, MetricRecord]) -> dict[str, dict[str, Any]]:
        return {str(r): dict(m.items()) for r, m in sorted(records.items())}

    return {
        "train": plain(result.train_metrics_clientapp),
        "evaluate": plain(result.evaluate_metrics_clientapp),
        "central": plain(result.evaluate_metrics_serverapp),
        "traffic": strategy.meter.totals(),
        "rejections": [vars(r) for r in strategy.rejections],
    }
