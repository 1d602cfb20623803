"""Importance maps Z from a client's local validation gradients.

After local training, the client takes the gradient of its *validation*
loss at the trained weights, ``G = mean over batches of dL_val/dW``, with the
model in eval mode (dropout off; training mode would add dropout noise to G),
and turns it into a non-negative map per weight matrix:

* ``grad``   ``Z = |G|``: OSD's score then bounds the first-order loss change
  of dropping a factor entry.
* ``taylor`` ``Z = |G * dW|``: first-order Taylor importance of each update
  entry (needs ``reference``, the weights before local training).
* ``fisher`` ``Z = mean g^2``: empirical Fisher diagonal (per-batch squares).
* ``obd``    ``Z = mean_i g_i^2`` over single validation *examples*: the
  per-example empirical Fisher diagonal, the diagonal Hessian estimate of
  Optimal Brain Damage. With OSD's ``l2`` damage, ``sum Z (dW - dW_hat)^2``
  is then OBD's second-order estimate of the validation-loss increase of
  the compression error. Per-batch squares (``fisher``) square batch means,
  in which the examples' gradients largely cancel; ``obd`` does not, at one
  forward and backward per example (``importance_batches`` x batch size).
* ``adam``   ``Z = exp_avg_sq`` of the local Adam/AdamW optimizer: a Fisher
  estimate of *training* gradients at no extra forward/backward pass.
* ``ones``   ``Z = 1``: data-free (returns an empty mapping, which
  :func:`osd_fl.compress` reads as ones).

The loss can be given three ways (:func:`as_loss_fn`): ``loss_fn(model,
batch) -> loss``; a standard criterion such as ``nn.CrossEntropyLoss()``,
applied to the model's output and the batch's labels; or ``None``, the
model's own loss (a Hugging Face model returns ``.loss`` when the batch has
``labels``).

Memory: one buffer per matrix (the ``.grad`` it already has; ``fisher`` adds
one). Existing ``.grad`` of the selected parameters is overwritten.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from typing import Any

import torch
from torch import nn

from osd_fl.config import ImportanceForm
from osd_fl.errors import ConfigError

__all__ = ["IMPORTANCE_FORMS", "LossFn", "LossSpec", "as_loss_fn", "compute_importance", "default_names"]

IMPORTANCE_FORMS: tuple[str, ...] = ("grad", "taylor", "fisher", "obd", "ones", "adam")

LossFn = Callable[[nn.Module, Any], torch.Tensor]
#: What a caller may pass as the loss: ``loss_fn(model, batch)``, a criterion module, or ``None``.
LossSpec = LossFn | nn.Module | None

#: Keys a mapping batch may keep its labels under.
_LABEL_KEYS = ("labels", "label", "targets", "target", "y")


def _split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """``(inputs, labels)`` of a ``(inputs, labels)`` pair or a mapping with a label key."""
    if isinstance(batch, Mapping):
        key = next((k for k in _LABEL_KEYS if k in batch), None)
        if key is None:
            raise ConfigError(
                f"importance: a batch mapping needs its labels under one of {_LABEL_KEYS} to apply a criterion "
                f"(keys: {sorted(batch)}); or pass loss_fn(model, batch)"
            )
        return {k: v for k, v in batch.items() if k != key}, batch[key]
    if isinstance(batch, list | tuple) and len(batch) == 2:
        return batch[0], batch[1]
    raise ConfigError(
        f"importance: cannot find inputs and labels in a batch of type {type(batch).__name__}; "
        "use (inputs, labels) pairs or a mapping with 'labels', or pass loss_fn(model, batch)"
    )


def _logits(output: Any) -> torch.Tensor:
    """The tensor a criterion compares with the labels: the output itself or its ``.logits``."""
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor):
        raise ConfigError(f"importance: the model returned {type(output).__name__}, not a tensor or .logits")
    return logits


def _forward(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def as_loss_fn(loss: LossSpec) -> LossFn:
    """Turn any accepted form of the loss into ``loss_fn(model, batch) -> scalar``.

    Parameters
    ----------
    loss
        ``loss_fn(model, batch)`` (returned as is); a criterion module such as
        ``nn.CrossEntropyLoss()``, called as ``criterion(model output or its
        .logits, labels)`` with the labels from an ``(inputs, labels)`` pair
        or a mapping's ``labels`` key; or ``None``: the model's own loss,
        ``model(**batch).loss`` (Hugging Face models with ``labels`` in the
        batch).

    Returns
    -------
    callable
        ``loss_fn(model, batch) -> scalar loss``.
    """
    if loss is None:

        def own_loss(model: nn.Module, batch: Any) -> torch.Tensor:
            output = _forward(model, batch)
            value = getattr(output, "loss", None)
            if not isinstance(value, torch.Tensor):
                raise ConfigError(
                    "importance: loss_fn=None uses the model's own loss, but its output has no .loss "
                    "(put 'labels' in the batch of a Hugging Face model, or pass a criterion or loss_fn)"
                )
            return value

        return own_loss
    if isinstance(loss, nn.Module):
        criterion = loss

        def criterion_loss(model: nn.Module, batch: Any) -> torch.Tensor:
            inputs, labels = _split_batch(batch)
            result: torch.Tensor = criterion(_logits(_forward(model, inputs)), labels)
            return result

        return criterion_loss
    return loss


def default_names(model: nn.Module) -> list[str]:
    """Trainable parameters with two or more dimensions (the matrices OSD compresses)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]


def compute_importance(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: LossSpec,
    *,
    form: ImportanceForm | str = "grad",
    num_batches: int = 4,
    names: Iterable[str] | None = None,
    reference: Mapping[str, torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, torch.Tensor]:
    """Compute Z for the named parameters of ``model``.

    Parameters
    ----------
    model
        The locally trained model.
    loader
        Local *validation* batches; the first ``num_batches`` are used.
    loss_fn
        ``loss_fn(model, batch) -> scalar loss``, a criterion such as
        ``nn.CrossEntropyLoss()``, or ``None`` for the model's own loss
        (:func:`as_loss_fn`).
    form
        ``grad``, ``taylor``, ``fisher``, ``obd``, ``adam`` or ``ones`` (see module doc).
    num_batches
        Batches averaged; 4 is usually enough, more costs one forward and
        backward each.
    names
        Parameters to score (default :func:`default_names`).
    reference
        ``taylor`` only: the weights before local training.
    optimizer
        ``adam`` only: the optimizer used for local training.

    Returns
    -------
    dict
        ``{name: Z}`` float32, detached, on the parameters' device.

    """
    if form not in IMPORTANCE_FORMS:
        raise ConfigError(f"importance form {form!r} is not one of {IMPORTANCE_FORMS}")
    if num_batches < 1:
        raise ConfigError(f"num_batches={num_batches} must be >= 1")
    params = dict(model.named_parameters())
    selected = list(names) if names is not None else default_names(model)
    for n in selected:
        if n not in params:
            raise ConfigError(f"importance: model has no parameter {n!r}")
    if form == "ones":
        return {}
    if form == "adam":
        return _adam_importance(params, selected, optimizer)
    if form == "taylor" and reference is None:
        raise ConfigError("importance form 'taylor' needs reference= (the weights before local training)")
    was_training = model.training
    model.eval()
    grads_enabled = {n: params[n].requires_grad for n in selected}
    for n in selected:
        params[n].requires_grad_(True)
        params[n].grad = None
    try:
        fisher, batches = _backward_batches(model, loader, as_loss_fn(loss_fn), params, selected, form, num_batches)
        return {n: _map(params[n], fisher.get(n), batches, form, reference, n) for n in selected}
    finally:
        for n in selected:
            params[n].grad = None
            params[n].requires_grad_(grads_enabled[n])
        model.train(was_training)


def _backward_batches(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: LossFn,
    params: Mapping[str, nn.Parameter],
    selected: list[str],
    form: str,
    num_batches: int,
) -> tuple[dict[str, torch.Tensor], int]:
    """Backward the loss of up to ``num_batches`` batches: gradients summed in ``.grad``, or squares summed.

    ``fisher`` sums squared batch gradients, ``obd`` squared per-example gradients. Returns those
    sums (empty for the other forms) and the number of backward passes (batches or examples).
    """
    fisher: dict[str, torch.Tensor] = {}
    batches = 0
    with torch.enable_grad():
        for batch in islice(loader, num_batches):
            for part in _examples(batch) if form == "obd" else (batch,):
                loss = loss_fn(model, part)
                torch.autograd.backward(loss)
                batches += 1
                if form in ("fisher", "obd"):
                    for n in selected:
                        g = params[n].grad
                        if g is not None:
                            sq = g.detach().to(torch.float32).square()
                            fisher[n] = fisher[n].add_(sq) if n in fisher else sq
                            params[n].grad = None
    if batches == 0:
        raise ConfigError("importance: the validation loader yielded no batch")
    return fisher, batches


def _examples(batch: Any) -> list[Any]:
    """The single-example batches of a mapping or tuple of tensors (leading dimension = examples)."""
    values = list(batch.values()) if isinstance(batch, Mapping) else list(batch)
    sizes = {int(v.shape[0]) for v in values if isinstance(v, torch.Tensor) and v.ndim > 0}
    if len(sizes) != 1:
        raise ConfigError(
            "importance form 'obd' splits batches into examples: every tensor of a batch needs the same "
            f"leading size (found {sorted(sizes)})"
        )
    (n,) = sizes

    def pick(v: Any, i: int) -> Any:
        return v[i : i + 1] if isinstance(v, torch.Tensor) and v.ndim > 0 else v

    if isinstance(batch, Mapping):
        return [{k: pick(v, i) for k, v in batch.items()} for i in range(n)]
    return [
        type(batch)(pick(v, i) for v in batch) if isinstance(batch, tuple) else [pick(v, i) for v in batch]
        for i in range(n)
    ]


def _map(
    p: nn.Parameter,
    fisher_sum: torch.Tensor | None,
    batches: int,
    form: str,
    reference: Mapping[str, torch.Tensor] | None,
    name: str,
) -> torch.Tensor:
    """Z of one parameter from its summed gradient (``p.grad``) or summed squared gradients (fisher)."""
    if form in ("fisher", "obd"):
        return (fisher_sum if fisher_sum is not None else torch.zeros_like(p, dtype=torch.float32)) / batches
    g = p.grad.detach().to(torch.float32) / batches if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
    if form == "taylor":
        assert reference is not None
        g = g * (p.detach().to(torch.float32) - reference[name].to(p.device, torch.float32))
    return g.abs()


def _adam_importance(
    params: Mapping[str, nn.Parameter], names: list[str], optimizer: torch.optim.Optimizer | None
) -> dict[str, torch.Tensor]:
    if optimizer is None:
        raise ConfigError("importance form 'adam' needs optimizer= (the local Adam/AdamW optimizer)")
    out: dict[str, torch.Tensor] = {}
    for n in names:
        st = optimizer.state.get(params[n], {})
        v = st.get("exp_avg_sq")
        if v is None:
            raise ConfigError(f"importance 'adam': optimizer has no exp_avg_sq for {n!r} (not Adam, or not stepped)")
        out[n] = v.detach().to(torch.float32).clone()
    return out
