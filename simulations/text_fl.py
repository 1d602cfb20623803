"""The federated text task: its ClientApp, the registered app's text server, and the sweep's server loop.

The client is a plain Flower ClientApp with ``mods=[osd_mod]`` and an
:func:`~clients.attach_importance` call; the server is FedAvg wrapped in
:class:`~strategies.OSDStrategy`. :func:`run_text_fl` runs them for a number
of rounds, by default on :class:`~strategies.local_grid.LocalGrid` (every
message serialized to protobuf and back, every byte metered as Flower
sends it, clients one after another in this process so that the frozen
activation cache is built once), or on any Flower ``Grid``.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from clients import attach_importance, make_osd_mod
from osd_fl import CompressionConfig
from osd_fl.records import (
    METRIC_BYTES_DOWN,
    METRIC_BYTES_UP,
    METRIC_COMPRESS_SECONDS,
    record_to_tensors,
    tensors_to_record,
)
from osd_fl.seeds import client_seed
from simulations.app_config import TEXT_PREFIX, AppSettings
from simulations.devices import seeded
from simulations.federation import run_federation
from simulations.text import TextTask, TextTaskConfig, evaluate, loss_fn, make_optimizer, train_epoch
from strategies import OSDStrategy
from strategies.downlink import Downlink
from strategies.local_grid import LocalGrid

__all__ = [
    "RoundRow",
    "evaluate_fn",
    "get_task",
    "initial_model",
    "make_client_app",
    "run_text_fl",
    "run_text_server",
    "train",
]

_TASKS: dict[str, TextTask] = {}


def get_task(config: TextTaskConfig) -> TextTask:
    """One :class:`TextTask` per configuration and process (data, model and cache built once)."""
    key = json.dumps(config.to_dict(), sort_keys=True)
    if key not in _TASKS:
        _TASKS[key] = TextTask(config)
    return _TASKS[key]


def _round(msg: Message) -> int:
    for record in msg.content.config_records.values():
        if "server-round" in record:
            return int(record["server-round"])  # type: ignore[arg-type]
    return 0


def _node_task_config(cfg: TextTaskConfig, context: Context) -> tuple[TextTaskConfig, int]:
    """The task as this node sees it, and its partition: ``num-partitions`` of the node config wins."""
    node = context.node_config
    if "num-partitions" in node and int(node["num-partitions"]) != cfg.num_clients:
        cfg = cfg.replace(num_clients=int(node["num-partitions"]))
    pid = int(node.get("partition-id", 0))
    if not 0 <= pid < cfg.num_clients:
        raise ValueError(
            f"node config partition-id={pid} is outside 0..{cfg.num_clients - 1}: start the SuperNode with "
            f"--node-config 'partition-id=<0..N-1> num-partitions=N' or set text.num-clients"
        )
    return cfg, pid


def _global_model(task: TextTask, msg: Message) -> torch.nn.Module:
    records = list(msg.content.array_records.values())
    if len(records) != 1:
        raise ValueError(f"expected one ArrayRecord (the global model), found {len(records)}")
    model = task.new_model()
    model.load_state_dict(record_to_tensors(records[0]))
    return model


def _run_config_task(context: Context) -> TextTaskConfig:
    return TextTaskConfig.from_mapping(context.run_config, prefix=TEXT_PREFIX, strict=False)


def train(msg: Message, context: Context, task_config: TextTaskConfig | None = None) -> Message:
    """Train locally from the global model (settings: ``task_config`` or the run_config's ``text.*`` keys)."""
    cfg, pid = _node_task_config(task_config or _run_config_task(context), context)
    task = get_task(cfg)
    model = _global_model(task, msg)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    server_round = _round(msg)
    train_loader, val_loader = task.client_loaders(pid, round_seed=server_round)
    # dropout draws from torch's global generator: seed it per (seed, client, round),
    # inside a block that restores the caller's generator afterwards
    with seeded(client_seed(cfg.seed, pid, server_round)):
        optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
        loss = train_epoch(model, train_loader, optimizer, steps=cfg.local_steps or None)
        content = RecordDict(
            {
                "arrays": tensors_to_record(model.state_dict()),
                "metrics": MetricRecord({"train-loss": loss, "num-examples": task.client_data(pid).train.num_rows}),
            }
        )
        attach_importance(
            content, msg, model, val_loader, loss_fn, reference=reference, optimizer=optimizer, warn_unused=False
        )
    return Message(content=content, reply_to=msg)


def evaluate_fn(msg: Message, context: Context, task_config: TextTaskConfig | None = None) -> Message:
    """Evaluate the global model on this node's validation split."""
    cfg, pid = _node_task_config(task_config or _run_config_task(context), context)
    task = get_task(cfg)
    model = _global_model(task, msg)
    _, val_loader = task.client_loaders(pid)
    loss, accuracy = evaluate(model, val_loader)
    count = len(val_loader.dataset)  # type: ignore[arg-type]
    metrics = MetricRecord({"eval-loss": loss, "eval-accuracy": accuracy, "num-examples": count})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def initial_model(context: Context, task_config: TextTaskConfig | None = None) -> dict[str, torch.Tensor]:
    """The initial global model as this node builds it (every process builds the same, as the server does)."""
    cfg, _ = _node_task_config(task_config or _run_config_task(context), context)
    return dict(get_task(cfg).new_model().state_dict())


def make_client_app(task_config: TextTaskConfig | None = None) -> ClientApp:
    """The text task's ClientApp (settings from ``task_config`` or the run_config's ``text.*`` keys)."""
    app = ClientApp(mods=[make_osd_mod(initial_model=functools.partial(initial_model, task_config=task_config))])

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, task_config)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate_fn(msg, context, task_config)

    return app


def run_text_server(
    grid: Grid, settings: AppSettings, task_config: TextTaskConfig, compression: CompressionConfig
) -> tuple[Result, OSDStrategy]:
    """The registered ServerApp's text run: :func:`~simulations.federation.run_federation` on ``grid``.

    Parameters
    ----------
    grid
        The grid Flower gives the ServerApp.
    settings
        Federation settings (rounds, fractions, results folder).
    task_config
        The text task (model, data, training); the server builds its test split and initial model.
    compression
        Upload compression settings sent to every client.
    """
    task = get_task(task_config)
    model = task.new_model()
    test_loader = task.test_loader()

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(record_to_tensors(arrays))
        loss, acc = evaluate(model, test_loader)
        return MetricRecord({"test-loss": loss, "test-accuracy": acc})

    return run_federation(
        grid,
        settings,
        compression,
        tensors_to_record(model.state_dict()),
        central if settings.central_eval else None,
        extra_settings={"text": task_config.to_dict()},
        sampling_seed=task_config.seed,
    )


@dataclass
class RoundRow:
    """What one round of one run measured."""

    round: int
    test_accuracy: float
    test_loss: float
    bytes_up: int
    bytes_down: int
    cum_bytes_up: int
    cum_bytes_down: int
    compress_s: float
    round_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def run_text_fl(
    task_config: TextTaskConfig,
    compression: CompressionConfig,
    num_rounds: int,
    *,
    grid: Grid | None = None,
    fraction_train: float = 1.0,
    server_lr: float = 1.0,
    downlink: CompressionConfig | Downlink | None = None,
    on_round: Callable[[RoundRow], None] | None = None,
    quiet: bool = True,
) -> list[RoundRow]:
    """Run federated rounds of the text task; return one :class:`RoundRow` per round (0 = initial model).

    Parameters
    ----------
    task_config
        Task, data and local-training settings.
    compression
        Upload compression sent to every client.
    num_rounds
        Federated rounds.
    grid
        Default: an in-process :class:`LocalGrid` with ``task_config.num_clients`` nodes.
    fraction_train
        Share of clients sampled per round.
    server_lr
        Server learning rate applied to the averaged update.
    downlink
        Compress the broadcast with these settings (``OSDStrategy(downlink=...)``); None = dense.
    on_round
        Called with each row as soon as it is measured (progress bars).
    quiet
        Silence Flower's per-round INFO logs (warnings still show).
    """
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if quiet:
        flwr_logger.setLevel(logging.WARNING)
    try:
        return _run_text_fl(task_config, compression, num_rounds, grid, fraction_train, server_lr, downlink, on_round)
    finally:
        flwr_logger.setLevel(level)  # the caller's logging, as it was


def _run_text_fl(
    task_config: TextTaskConfig,
    compression: CompressionConfig,
    num_rounds: int,
    grid: Grid | None,
    fraction_train: float,
    server_lr: float,
    downlink: CompressionConfig | Downlink | None,
    on_round: Callable[[RoundRow], None] | None,
) -> list[RoundRow]:
    task = get_task(task_config)
    grid = grid or LocalGrid(make_client_app(task_config), task_config.num_clients)
    model = task.new_model()
    test_loader = task.test_loader()
    n = task_config.num_clients
    inner = FedAvg(
        fraction_train=fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_evaluate_nodes=0,
        min_available_nodes=n,
    )
    # The strategy samples nodes with its own generator seeded here, so the sampled nodes and
    # the order replies are summed in (hence every float) repeat with the seed.
    strategy = OSDStrategy(
        inner, config=compression, server_lr=server_lr, sampling_seed=task_config.seed, downlink=downlink
    )
    rows: list[RoundRow] = []
    clock = [time.perf_counter()]

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(record_to_tensors(arrays))
        loss, acc = evaluate(model, test_loader)
        traffic = strategy.meter.totals(server_round=server_round) if server_round else {}
        up, down = int(traffic.get(METRIC_BYTES_UP, 0)), int(traffic.get(METRIC_BYTES_DOWN, 0))
        prev = rows[-1] if rows else None
        train_metrics = result_train.get(server_round)
        now = time.perf_counter()
        row = RoundRow(
            round=server_round,
            test_accuracy=acc,
            test_loss=loss,
            bytes_up=up,
            bytes_down=down,
            cum_bytes_up=(prev.cum_bytes_up if prev else 0) + up,
            cum_bytes_down=(prev.cum_bytes_down if prev else 0) + down,
            compress_s=float(train_metrics.get(METRIC_COMPRESS_SECONDS, 0.0)) if train_metrics else 0.0,
            round_s=now - clock[0],
        )
        clock[0] = now
        rows.append(row)
        if on_round is not None:
            on_round(row)
        return MetricRecord({"test-accuracy": acc, "test-loss": loss})

    result_train: dict[int, dict[str, Any]] = {}
    original = strategy.aggregate_train

    def aggregate_train(server_round: int, replies: Any) -> Any:
        arrays, metrics = original(server_round, replies)
        result_train[server_round] = dict(metrics.items()) if metrics is not None else {}
        return arrays, metrics

    strategy.aggregate_train = aggregate_train  # type: ignore[method-assign]
    strategy.start(
        grid=grid,
        initial_arrays=tensors_to_record(model.state_dict()),
        num_rounds=num_rounds,
        train_config=ConfigRecord({}),
        evaluate_fn=evaluate_fn,
    )
    return rows
