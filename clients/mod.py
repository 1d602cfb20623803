"""Client side of osd-fl: a Flower mod that compresses the train reply.

Add it to an existing ClientApp; nothing else in the app changes::

    from clients import osd_mod
    app = ClientApp(mods=[osd_mod])

and wrap the server's strategy in :class:`strategies.OSDStrategy`. On every
train message the mod

1. keeps the global model the server sent and reads the ``osd.*`` settings
   from the train config (over the mod's own defaults);
2. calls the train function, which replies as usual with its trained weights
   (one ``ArrayRecord``) and a ``MetricRecord`` with ``num-examples``;
3. forms ``dW = trained - global`` for every floating tensor, adds the
   error-feedback residual kept in ``context.state`` (if enabled), compresses
   with :func:`osd_fl.compress` using the importance maps the train function
   attached (see :func:`clients.attach_importance`; Z = ones if none), and
4. replaces the reply's weights by the payload record and adds the metrics
   ``osd-compress-s`` (seconds in ``compress``, measured here),
   ``osd-payload-bytes`` and ``osd-dense-bytes`` (what dense float32 would
   cost), plus ``osd-residual-in-norm`` / ``osd-residual-norm`` with error
   feedback (a zero ``in`` norm after round 1 means the residual was lost,
   e.g. by a SuperNode restart).

Integer tensors (e.g. BatchNorm's ``num_batches_tracked``) are not sent;
the server keeps their global value.

The error-feedback residual lives in ``context.state`` and is never trusted
blindly. Lost (a restarted SuperNode): the client starts again from
``e = 0``, exactly like a new client; the unsent part it held is gone.
Stale (the client skipped rounds): it is added in full to the next update
the client sends, however old. A residual whose shape no longer matches its
tensor, or state that cannot be read or holds NaN/Inf, is dropped with a
warning. The residual assumes the reply is delivered and accepted: if the
server rejects it or it never arrives, that round's sent part is lost too.

With a compressed downlink (``OSDStrategy(downlink=...)``) the mod first
rebuilds the public model from the broadcast chain and the replica kept in
``context.state`` (:mod:`clients.downlink`), for train and evaluate messages
alike; the app's functions see the usual dense weights.

Otherwise messages other than ``train`` pass through untouched; so do train messages
whose config has no ``osd.*`` key (a server that does not use
:class:`~strategies.OSDStrategy` gets plain weights, with a warning). Any
problem becomes an error reply with a reason, which the server counts as
``failed``; so does a Flower privacy mod (``fixedclipping_mod``,
``LocalDpMod``, ...) running *outside* osd_mod, which must be inside it to
clip the dense update (see :mod:`clients.privacy`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode

from clients.downlink import InitialModel, receive_model
from clients.privacy import enclosing_privacy_mod, privacy_mod_order_error
from osd_fl import (
    CompressionConfig,
    CompressorState,
    ErrorFeedback,
    OSDError,
    compress,
    methods_with,
    total_dense_bytes,
)
from osd_fl.records import (
    IMPORTANCE_RECORD_KEY,
    METRIC_COMPRESS_SECONDS,
    METRIC_DENSE_BYTES,
    METRIC_PAYLOAD_BYTES,
    METRIC_RESIDUAL_IN,
    METRIC_RESIDUAL_OUT,
    PAYLOAD_RECORD_KEY,
    STATE_CLIENT_KEY,
    STATE_COMPRESSOR_KEY,
    STATE_RESIDUAL_KEY,
    WEIGHT_KEY,
    config_from_record,
    has_config,
    numpy_to_record,
    payload_to_record,
    record_to_numpy,
    record_to_tensors,
)

__all__ = ["make_osd_mod", "osd_mod", "read_compression_config"]

# A child of Flower's logger, so messages show in the ClientApp's console like Flower's own.
log = logging.getLogger("flwr.osd.client")

_FLAG_WARNED_NO_IMPORTANCE = "warned-no-importance"
_FLAG_WARNED_NO_CONFIG = "warned-no-config"


def read_compression_config(msg: Message, defaults: CompressionConfig | None = None) -> CompressionConfig | None:
    """The compression settings of a train message, over ``defaults``.

    A train function can call this to learn, e.g., which importance form to
    compute. Returns ``None`` when no ``ConfigRecord`` of the message has an
    ``osd.*`` key (the server does not ask for compression).

    Raises
    ------
    osd_fl.ConfigError
        A setting the server sent is invalid.
    """
    found: dict[str, Any] = {}
    for record in msg.content.config_records.values():
        if has_config(record):
            found.update(record)
    if not found:
        return None
    return config_from_record(found, defaults=defaults)


def _error_reply(msg: Message, reason: str, code: int = ErrorCode.MOD_FAILED_PRECONDITION) -> Message:
    log.error("osd_mod: %s", reason)
    return Message(Error(code=code, reason=f"osd_mod: {reason}"), reply_to=msg)


def _flags(context: Context) -> ConfigRecord:
    if STATE_CLIENT_KEY not in context.state.config_records:
        context.state[STATE_CLIENT_KEY] = ConfigRecord()
    return context.state.config_records[STATE_CLIENT_KEY]


def _warn_once(context: Context, flag: str, text: str) -> None:
    # The flag lives in context.state, so "once" holds per node across rounds
    # even where each message runs in a fresh process (deployment).
    flags = _flags(context)
    if not flags.get(flag, False):
        log.warning(text)
        flags[flag] = True


def _load_numpy_state(context: Context, key: str) -> dict[str, Any]:
    """Arrays kept under ``key`` in ``context.state``; ``{}`` if none or unreadable.

    State that cannot be read (or holds NaN/Inf) is dropped with a warning
    rather than failing this and every later round: the client goes on as
    one whose state was lost (a restarted SuperNode).
    """
    record = context.state.array_records.get(key)
    if record is None:
        return {}
    try:
        arrays = record_to_numpy(record)
    except Exception as exc:  # e.g. an Array that is not a NumPy array
        log.warning("osd_mod: cannot read %r from context.state (%s); starting from empty state", key, exc)
        return {}
    bad = sorted(k for k, v in arrays.items() if not np.issubdtype(v.dtype, np.floating) or not np.isfinite(v).all())
    if bad:
        log.warning("osd_mod: dropping non-finite or non-float state %s under %r", bad, key)
    return {k: v for k, v in arrays.items() if k not in bad}


def _without_config(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A train message without ``osd.*`` settings: train, strip any importance maps, send plain weights."""
    _warn_once(
        context,
        _FLAG_WARNED_NO_CONFIG,
        "osd_mod: the train config has no 'osd.*' settings (is the server strategy "
        "wrapped in OSDStrategy?); sending uncompressed weights",
    )
    reply = call_next(msg, context)
    if reply.has_content() and IMPORTANCE_RECORD_KEY in reply.content:
        del reply.content[IMPORTANCE_RECORD_KEY]
    return reply


def _trained_parts(content: RecordDict, expected: set[str]) -> tuple[str, ArrayRecord, MetricRecord] | str:
    """The reply's one weights record (its key too) and its one metrics record, or what is wrong with them."""
    trained_records = list(content.array_records.items())
    if len(trained_records) != 1:
        return f"expected exactly one ArrayRecord in the train reply, found {len(trained_records)}"
    trained_key, trained_record = trained_records[0]
    if set(trained_record.keys()) != expected:
        missing = sorted(expected - set(trained_record.keys()))
        extra = sorted(set(trained_record.keys()) - expected)
        return f"reply arrays do not match the global model (missing {missing}, extra {extra})"
    metric_records = list(content.metric_records.values())
    if len(metric_records) != 1 or WEIGHT_KEY not in metric_records[0]:
        return f"the train reply needs exactly one MetricRecord with {WEIGHT_KEY!r}"
    return trained_key, trained_record, metric_records[0]


def _update(global_tensors: dict[str, torch.Tensor], trained_record: ArrayRecord) -> dict[str, torch.Tensor] | str:
    """``dW = trained - global`` of every floating tensor (integer buffers keep the global value), or the error."""
    trained = record_to_tensors(trained_record)
    update: dict[str, torch.Tensor] = {}
    for name, before in global_tensors.items():
        after = trained[name]
        if tuple(after.shape) != tuple(before.shape):
            return f"tensor {name!r}: trained shape {tuple(after.shape)} != global {tuple(before.shape)}"
        if before.dtype.is_floating_point:
            update[name] = after.to(before.dtype) - before
    return update


def _importance(
    context: Context, cfg: CompressionConfig, record: ArrayRecord | None, update: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor] | None:
    """The attached importance maps of the update's tensors; warn once if the method wants some and none came."""
    if record is not None:
        return {k: v for k, v in record_to_tensors(record).items() if k in update}
    if cfg.method in methods_with("uses_importance") and cfg.importance != "ones":
        _warn_once(
            context,
            _FLAG_WARNED_NO_IMPORTANCE,
            f"osd_mod: no importance maps attached (importance={cfg.importance!r}); using Z = ones. "
            "Call clients.attach_importance in the train function to use validation gradients.",
        )
    return None


def _compress(
    context: Context,
    cfg: CompressionConfig,
    update: dict[str, torch.Tensor],
    importance: dict[str, torch.Tensor] | None,
    metrics: MetricRecord,
) -> bytes:
    """Compress with the state kept in ``context.state``, store the new state, and add the metrics."""
    feedback = None
    residual_in = 0.0
    if cfg.error_feedback:
        feedback = ErrorFeedback.from_numpy(_load_numpy_state(context, STATE_RESIDUAL_KEY))
        residual_in = feedback.norm()
    state = CompressorState.from_numpy(_load_numpy_state(context, STATE_COMPRESSOR_KEY))
    start = time.perf_counter()
    blob = compress(update, importance=importance, config=cfg, feedback=feedback, state=state)
    seconds = time.perf_counter() - start
    if feedback is not None:
        context.state[STATE_RESIDUAL_KEY] = numpy_to_record(feedback.to_numpy())
    elif STATE_RESIDUAL_KEY in context.state:
        del context.state[STATE_RESIDUAL_KEY]  # EF switched off: drop the stale residual
    saved_state = state.to_numpy()
    if saved_state:
        context.state[STATE_COMPRESSOR_KEY] = numpy_to_record(saved_state)
    metrics[METRIC_COMPRESS_SECONDS] = seconds
    metrics[METRIC_PAYLOAD_BYTES] = len(blob)
    metrics[METRIC_DENSE_BYTES] = total_dense_bytes({k: tuple(t.shape) for k, t in update.items()})
    if feedback is not None:
        metrics[METRIC_RESIDUAL_IN] = residual_in
        metrics[METRIC_RESIDUAL_OUT] = feedback.norm()
    return blob


def _compressed_reply(msg: Message, context: Context, call_next: ClientAppCallable, cfg: CompressionConfig) -> Message:
    """Train, then replace the reply's weights by the payload of ``trained - global``."""
    sent = list(msg.content.array_records.values())
    if len(sent) != 1:
        return _error_reply(msg, f"expected exactly one ArrayRecord in the train message, found {len(sent)}")
    # Decode the global model before training: the train function may change the message it was given.
    global_tensors = record_to_tensors(sent[0])
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    content = reply.content
    importance_record = content.array_records.get(IMPORTANCE_RECORD_KEY)
    if IMPORTANCE_RECORD_KEY in content:
        del content[IMPORTANCE_RECORD_KEY]
    parts = _trained_parts(content, set(global_tensors))
    if isinstance(parts, str):
        return _error_reply(msg, parts)
    trained_key, trained_record, metrics = parts
    update = _update(global_tensors, trained_record)
    del global_tensors
    if isinstance(update, str):
        return _error_reply(msg, update)
    importance = _importance(context, cfg, importance_record, update)
    try:
        blob = _compress(context, cfg, update, importance, metrics)
    except OSDError as exc:
        return _error_reply(msg, f"compression failed: {exc}")
    del content[trained_key]
    content[PAYLOAD_RECORD_KEY] = payload_to_record(blob)
    return reply


def make_osd_mod(defaults: CompressionConfig | None = None, *, initial_model: InitialModel | None = None) -> Mod:
    """Build an OSD client mod with client-side default settings.

    Parameters
    ----------
    defaults
        Settings for every field the server does not send. (``OSDStrategy``
        sends all fields, so these matter for servers that send a subset.)
    initial_model
        With a compressed downlink and ``Downlink(..., clients_hold_initial=True)``:
        ``initial_model(context)`` returns the initial global model this node
        already has (e.g. the pretrained checkpoint), so its first download is
        a digest check instead of the dense model.

    Returns
    -------
    Mod
        ``mod(msg, context, call_next) -> Message`` for ``ClientApp(mods=[...])``.
    """
    base = defaults if defaults is not None else CompressionConfig()

    def osd_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.has_content():  # a compressed downlink: rebuild the public model first (train and evaluate)
            reason = receive_model(msg, context, initial_model)
            if reason is not None:
                return _error_reply(msg, reason.removeprefix("osd_mod: "))
        if msg.metadata.message_type.split(".", 1)[0] != MessageType.TRAIN or not msg.has_content():
            return call_next(msg, context)
        try:
            cfg = read_compression_config(msg, base)
        except OSDError as exc:
            return _error_reply(msg, f"invalid compression settings from the server: {exc}")
        if cfg is None:
            return _without_config(msg, context, call_next)
        outer = enclosing_privacy_mod()  # a Flower DP mod around osd_mod would reject the payload
        if outer is not None:
            return _error_reply(msg, privacy_mod_order_error(outer))
        return _compressed_reply(msg, context, call_next, cfg)

    osd_mod.__doc__ = f"Compress the train reply's update with OSD (see :mod:`clients.mod`); defaults: {base.to_dict()}"
    return osd_mod


osd_mod: Mod = make_osd_mod()
"""The OSD client mod with default client-side settings (see :func:`make_osd_mod`)."""
