"""The ClientApp registered in ``pyproject.toml`` (``flwr run .``), with OSD-compressed uploads.

The only lines that concern compression are ``mods=[osd_mod]`` here and the
:func:`~clients.attach_importance` call in each task's train function; the
rest is a plain Flower ClientApp that runs the task named by ``task``.
"""

from __future__ import annotations

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients import make_osd_mod
from simulations import digits_client, text_fl
from simulations.app_config import AppSettings
from simulations.digits_task import build_model

__all__ = ["app"]


def _is_digits(context: Context) -> bool:
    return AppSettings.from_run_config(context.run_config).task == "digits"


def _initial_model(context: Context) -> dict[str, torch.Tensor]:
    """The initial global model this node builds itself (used with ``downlink-hold-initial``)."""
    settings = AppSettings.from_run_config(context.run_config)
    if settings.task == "digits":
        return dict(build_model(settings.hidden, seed=settings.seed).state_dict())
    return text_fl.initial_model(context)


app = ClientApp(mods=[make_osd_mod(initial_model=_initial_model)])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the run's task locally from the global model."""
    return digits_client.train(msg, context) if _is_digits(context) else text_fl.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the local validation split."""
    return digits_client.evaluate_fn(msg, context) if _is_digits(context) else text_fl.evaluate_fn(msg, context)
