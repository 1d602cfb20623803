"""ClientApp of the digits task, with OSD-compressed uploads.

The only lines that concern compression are ``mods=[osd_mod]`` and the
:func:`~clients.attach_importance` call; the rest is a plain Flower
ClientApp. The registered app (:mod:`simulations.client_app`) calls :func:`train`
and :func:`evaluate_fn` when ``task = "digits"``; ``app`` here is the
digits-only ClientApp the in-process tests run.
"""

from __future__ import annotations

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import attach_importance, osd_mod
from osd_fl.records import record_to_tensors, tensors_to_record
from simulations.app_config import AppSettings
from simulations.devices import torch_threads
from simulations.digits_task import build_model, client_data, evaluate, loss_fn, make_optimizer, train_epochs

__all__ = ["app"]

app = ClientApp(mods=[osd_mod])


def _partition(context: Context, settings: AppSettings) -> tuple[int, int]:
    cfg = context.node_config
    num = int(cfg.get("num-partitions", settings.default_partitions))
    pid = int(cfg.get("partition-id", context.node_id % num))
    return pid, num


def _global_model(msg: Message, settings: AppSettings) -> torch.nn.Module:
    records = list(msg.content.array_records.values())
    if len(records) != 1:
        raise ValueError(f"expected one ArrayRecord (the global model), found {len(records)}")
    model = build_model(settings.hidden, seed=None)
    model.load_state_dict(record_to_tensors(records[0]))
    return model


def _server_value(msg: Message, key: str, default: float) -> float:
    for record in msg.content.config_records.values():
        if key in record:
            return float(record[key])  # type: ignore[arg-type]
    return default


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train locally from the global model; reply with the trained weights (one torch thread)."""
    with torch_threads(1):
        return _train(msg, context)


def _train(msg: Message, context: Context) -> Message:
    settings = AppSettings.from_run_config(context.run_config)
    pid, num = _partition(context, settings)
    server_round = int(_server_value(msg, "server-round", 0))
    data = client_data(
        pid,
        num,
        batch_size=settings.batch_size,
        val_fraction=settings.val_fraction,
        test_fraction=settings.test_fraction,
        seed=settings.seed,
        shuffle_seed=settings.seed * 10_007 + pid * 101 + server_round,
    )
    model = _global_model(msg, settings)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lr = _server_value(msg, "lr", settings.lr)
    epochs = int(_server_value(msg, "local-epochs", settings.local_epochs))
    optimizer = make_optimizer(model, settings.optimizer, lr)
    train_loss = train_epochs(model, data.train, optimizer, epochs)

    content = RecordDict(
        {
            "arrays": tensors_to_record(model.state_dict()),
            "metrics": MetricRecord({"train-loss": train_loss, "num-examples": data.num_train}),
        }
    )
    # Importance maps from the local validation split, for the OSD mod.
    attach_importance(content, msg, model, data.val, loss_fn, reference=reference, optimizer=optimizer)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the local validation split (one torch thread)."""
    with torch_threads(1):
        return _evaluate(msg, context)


def _evaluate(msg: Message, context: Context) -> Message:
    settings = AppSettings.from_run_config(context.run_config)
    pid, num = _partition(context, settings)
    data = client_data(
        pid, num, val_fraction=settings.val_fraction, test_fraction=settings.test_fraction, seed=settings.seed
    )
    model = _global_model(msg, settings)
    loss, accuracy, count = evaluate(model, data.val)
    metrics = MetricRecord({"eval-loss": loss, "eval-accuracy": accuracy, "num-examples": count})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
