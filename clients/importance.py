"""Hand-off of importance maps from a train function to :func:`clients.osd_mod`.

A mod sees messages, not the model or the validation data, so the train
function computes the importance maps and attaches them to its reply under
:data:`osd_fl.records.IMPORTANCE_RECORD_KEY`; the mod takes them, uses them as
Z, and strips them before the reply leaves the client::

    @app.train()
    def train(msg, context):
        ...  # train `model` from the global weights in msg
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"num-examples": n})})
        attach_importance(content, msg, model, val_loader, loss_fn,
                          reference=global_state, optimizer=optimizer)
        return Message(content=content, reply_to=msg)

``loss_fn`` may be ``loss_fn(model, batch)``, a criterion such as
``nn.CrossEntropyLoss()`` (applied to the model's output and the batch's
labels), or ``None`` for a Hugging Face model's own loss
(:func:`osd_fl.importance.as_loss_fn`).

The form (``grad``, ``taylor``, ``fisher``, ``obd``, ``adam``, ``ones``) and the
number of batches come from the server's ``osd.importance`` and
``osd.importance-batches`` settings. Nothing is computed (and nothing
attached) when the server did not ask for compression, when the method uses
no importance, or when the form is ``ones`` (the default): then a
``UserWarning`` (once per call site) says how to switch the maps on.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from flwr.app import Message, RecordDict
from torch import nn

from clients.mod import read_compression_config
from osd_fl import CompressionConfig, compute_importance, methods_with
from osd_fl.importance import LossSpec
from osd_fl.records import IMPORTANCE_RECORD_KEY, tensors_to_record

__all__ = ["attach_importance"]


def attach_importance(
    content: RecordDict,
    msg: Message | CompressionConfig,
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: LossSpec = None,
    *,
    reference: Mapping[str, torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    names: Iterable[str] | None = None,
    defaults: CompressionConfig | None = None,
    warn_unused: bool = True,
) -> dict[str, torch.Tensor] | None:
    """Compute importance maps for the OSD mod and add them to a train reply.

    Parameters
    ----------
    content
        The reply's ``RecordDict``; gets an ``ArrayRecord`` under
        :data:`~osd_fl.records.IMPORTANCE_RECORD_KEY`.
    msg
        The train message (its ``osd.*`` settings choose the form), or a
        :class:`~osd_fl.config.CompressionConfig` directly.
    model
        The locally trained model (the maps are taken at its weights).
    loader
        Local validation batches (not the training batches: Z should measure
        how the *held-out* loss reacts to each weight).
    loss_fn
        ``loss_fn(model, batch) -> scalar loss``, a criterion module such as
        ``nn.CrossEntropyLoss()``, or ``None`` (default) for the model's own
        loss (a Hugging Face model with ``labels`` in the batch).
    reference
        Weights before local training; needed by the ``taylor`` form.
    optimizer
        The local optimizer; needed by the ``adam`` form.
    names
        Parameters to score (default: every trainable matrix).
    defaults
        Client-side settings under the server's (as given to ``make_osd_mod``).
    warn_unused
        Warn when the form is ``ones`` (maps attached but not used); ``False``
        for an app that runs ``ones`` on purpose, e.g. a sweep comparing forms.

    Returns
    -------
    dict or None
        The maps attached, or ``None`` if nothing was computed.
    """
    cfg = msg if isinstance(msg, CompressionConfig) else read_compression_config(msg, defaults)
    if cfg is None or cfg.method not in methods_with("uses_importance"):
        return None
    if cfg.importance == "ones":
        if not warn_unused:
            return None
        warnings.warn(
            "attach_importance: the server's importance form is 'ones' (the default), so no maps are computed "
            "and OSD weighs every entry alike; to use validation gradients set it on the server, e.g. "
            "OSDStrategy(..., config=CompressionConfig(importance='grad')) or run_config osd.importance='grad'",
            UserWarning,
            stacklevel=2,
        )
        return None
    maps = compute_importance(
        model,
        loader,
        loss_fn,
        form=cfg.importance,
        num_batches=cfg.importance_batches,
        names=names,
        reference=reference,
        optimizer=optimizer,
    )
    if not maps:
        return None
    content[IMPORTANCE_RECORD_KEY] = tensors_to_record(maps)
    return maps
