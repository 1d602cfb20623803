"""ServerApp of the digits task: FedAvg wrapped in :class:`~strategies.OSDStrategy`.

Registered in ``pyproject.toml`` as ``simulations.digits_server:app``; all
settings come from ``[tool.flwr.app.config]`` (see
:mod:`simulations.digits_config`). With ``results-dir`` set it writes
``traffic.csv`` (bytes per round, phase, node and direction),
``rounds.csv`` (per-round metrics) and ``result.json`` (everything, including
central test accuracy per round).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result

from osd_fl import CompressionConfig
from osd_fl.records import record_to_tensors, tensors_to_record
from simulations.digits_config import DigitsSettings, compression_from_run_config
from simulations.digits_task import build_model, evaluate, test_data
from strategies import OSDStrategy

__all__ = ["app", "make_server_app", "result_summary", "run_server"]

log = logging.getLogger("flwr.osd.digits")


def _central_eval(settings: DigitsSettings) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    loader = test_data(test_fraction=settings.test_fraction, seed=settings.seed)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        model = build_model(settings.hidden, seed=None)
        model.load_state_dict(record_to_tensors(arrays))
        loss, accuracy, _ = evaluate(model, loader)
        return MetricRecord({"test-loss": loss, "test-accuracy": accuracy})

    return evaluate_fn


def run_server(grid: Grid, settings: DigitsSettings, compression: CompressionConfig) -> tuple[Result, OSDStrategy]:
    """Run the federated rounds on ``grid``; return Flower's result and the strategy.

    Parameters
    ----------
    grid
        The grid Flower gives the ServerApp (or any :class:`~flwr.serverapp.Grid`).
    settings
        Task and federation settings.
    compression
        Upload compression settings sent to every client.
    """
    torch.set_num_threads(1)
    model = build_model(settings.hidden, seed=settings.seed)
    inner = FedAvg(
        fraction_train=settings.fraction_train,
        fraction_evaluate=settings.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1 if settings.fraction_evaluate > 0 else 0,
        min_available_nodes=settings.min_nodes,
    )
    strategy = OSDStrategy(
        inner,
        config=compression,
        server_lr=settings.server_lr,
        max_payload_bytes=settings.max_payload_bytes or None,
        csv_dir=settings.results_dir or None,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=tensors_to_record(model.state_dict()),
        num_rounds=settings.num_server_rounds,
        train_config=ConfigRecord({"lr": settings.lr, "local-epochs": settings.local_epochs}),
        evaluate_fn=_central_eval(settings) if settings.central_eval else None,
    )
    if settings.results_dir:
        path = Path(settings.results_dir) / "result.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        summary = result_summary(result, strategy)
        summary["settings"] = {**vars(settings), "compression": compression.to_dict()}
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


def make_server_app(
    settings: DigitsSettings | None = None,
    compression: CompressionConfig | None = None,
    on_finish: Callable[[Result, OSDStrategy], None] | None = None,
) -> ServerApp:
    """A ServerApp with fixed settings (default: read them from the run_config).

    ``on_finish(result, strategy)`` is called at the end, e.g. for tests that
    run the app in the same process with ``run_simulation``.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        s = settings if settings is not None else DigitsSettings.from_run_config(context.run_config)
        c = compression if compression is not None else compression_from_run_config(context.run_config)
        result, strategy = run_server(grid, s, c)
        if on_finish is not None:
            on_finish(result, strategy)

    return server_app


app = make_server_app()
