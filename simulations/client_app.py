"""The ClientApp registered in ``pyproject.toml`` (``flwr run .``), with OSD-compressed uploads.

The only lines that concern compression are ``mods=[osd_mod]`` here and the
:func:`~clients.attach_importance` call in each task's train function; the
rest is a plain Flower ClientApp that runs the task named by ``task``.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients import osd_mod
from simulations import digits_client, text_fl
from simulations.app_config import AppSettings

__all__ = ["app"]

app = ClientApp(mods=[osd_mod])


def _is_digits(context: Context) -> bool:
    return AppSettings.from_run_config(context.run_config).task == "digits"


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the run's task locally from the global model."""
    return digits_client.train(msg, context) if _is_digits(context) else text_fl.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the local validation split."""
    return digits_client.evaluate_fn(msg, context) if _is_digits(context) else text_fl.evaluate_fn(msg, context)
