"""The digits task's server side: its initial model, central evaluation and round loop.

:func:`run_server` runs :func:`simulations.federation.run_federation` with the
digits MLP; the registered ServerApp (:mod:`simulations.server_app`) calls it
when ``task = "digits"``.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from osd_fl import CompressionConfig
from osd_fl.records import record_to_tensors, tensors_to_record
from simulations.app_config import AppSettings
from simulations.devices import torch_threads
from simulations.digits_task import build_model, evaluate, test_data
from simulations.federation import EvaluateFn, run_federation
from strategies import OSDStrategy

__all__ = ["run_server"]


def _central_eval(settings: AppSettings) -> EvaluateFn:
    loader = test_data(test_fraction=settings.test_fraction, seed=settings.seed)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        model = build_model(settings.hidden, seed=None)
        model.load_state_dict(record_to_tensors(arrays))
        loss, accuracy, _ = evaluate(model, loader)
        return MetricRecord({"test-loss": loss, "test-accuracy": accuracy})

    return evaluate_fn


def run_server(grid: Grid, settings: AppSettings, compression: CompressionConfig) -> tuple[Result, OSDStrategy]:
    """Run the digits task's federated rounds on ``grid``; return Flower's result and the strategy.

    Parameters
    ----------
    grid
        The grid Flower gives the ServerApp (or any :class:`~flwr.serverapp.Grid`).
    settings
        Task and federation settings.
    compression
        Upload compression settings sent to every client.
    """
    with torch_threads(1):
        model = build_model(settings.hidden, seed=settings.seed)
        return run_federation(
            grid,
            settings,
            compression,
            tensors_to_record(model.state_dict()),
            _central_eval(settings) if settings.central_eval else None,
            train_config={"lr": settings.lr, "local-epochs": settings.local_epochs},
        )
