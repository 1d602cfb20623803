"""Client side of the compressed downlink: keep a replica of the public model, apply broadcasts to it.

With ``OSDStrategy(downlink=...)`` a train or evaluate message carries either
the dense public model or the chain of broadcasts since the version this
node holds (:mod:`osd_fl.downlink`). :func:`receive_model` (called by
:func:`clients.osd_mod` before the app's own function) turns either into the
usual dense ``ArrayRecord``, so the train and evaluate functions do not
change. The replica and its version live in ``context.state``.

The client never trains on a model it cannot vouch for: a dense model whose
digest differs from the one announced, a chain that does not start at the
replica's version, a replica that is missing (a restarted SuperNode, a new
node) or whose result does not match a step's digest all make it reply with
an error whose reason starts with :data:`osd_fl.records.RESYNC_REASON`; the
strategy counts a resync and sends this node the dense model next time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from osd_fl import PayloadError
from osd_fl.downlink import ReplicaMismatch, apply_chain, model_digest
from osd_fl.records import (
    BROADCAST_RECORD_KEY,
    DOWNLINK_RECORD_KEY,
    RESYNC_REASON,
    STATE_REPLICA_KEY,
    STATE_REPLICA_META_KEY,
    read_downlink,
    record_to_tensors,
    tensors_to_record,
)

__all__ = ["InitialModel", "receive_model"]

#: ``initial_model(context) -> state dict``: the initial global model a node already holds.
InitialModel = Callable[[Context], Mapping[str, torch.Tensor]]

log = logging.getLogger("flwr.osd.client")


def _forget(context: Context) -> None:
    for key in (STATE_REPLICA_KEY, STATE_REPLICA_META_KEY):
        if key in context.state:
            del context.state[key]


def receive_model(msg: Message, context: Context, initial_model: InitialModel | None = None) -> str | None:
    """Rebuild the public model into ``msg`` (dense ``ArrayRecord``), in place; return an error reason or None.

    A message without a downlink record is left as it is. On success the
    replica in ``context.state`` is the new public model; on any failure it
    is dropped and the returned reason starts with ``RESYNC_REASON``. A chain
    from version 0 to a node without a replica starts from
    ``initial_model(context)`` when given (its digest is checked like any replica's).
    """
    content = msg.content
    try:
        info = read_downlink(content)
    except PayloadError as exc:
        _forget(context)
        return f"{RESYNC_REASON} malformed downlink: {exc}"
    if info is None:
        return None
    if info.chain is None:
        dense = list(content.array_records.items())
        if len(dense) != 1:
            _forget(context)
            return f"{RESYNC_REASON} a dense downlink needs exactly one ArrayRecord, found {len(dense)}"
        key, record_in = dense[0]
        replica = record_to_tensors(record_in)
        if model_digest(replica) != info.digest:
            _forget(context)
            return f"{RESYNC_REASON} the dense model does not match its digest (corrupted in transit?)"
    else:
        key = "arrays"
        meta = context.state.config_records.get(STATE_REPLICA_META_KEY)
        stored = context.state.array_records.get(STATE_REPLICA_KEY)
        held = int(meta["version"]) if meta is not None and "version" in meta else None  # type: ignore[arg-type]
        if (stored is None or held is None) and initial_model is not None and info.base == 0:
            stored, held = tensors_to_record(initial_model(context)), 0
        if stored is None or held is None:
            return f"{RESYNC_REASON} no replica in context.state (new node or lost state); need the dense model"
        if held != info.base:
            _forget(context)
            return f"{RESYNC_REASON} replica is version {held}, the chain starts at {info.base}"
        replica = record_to_tensors(stored)
        try:
            apply_chain(replica, info.chain)
        except (ReplicaMismatch, PayloadError) as exc:
            _forget(context)
            return f"{RESYNC_REASON} {exc}"
        del content[BROADCAST_RECORD_KEY]
    del content[DOWNLINK_RECORD_KEY]
    record_out: ArrayRecord = tensors_to_record(replica)
    for name in list(content.array_records):
        del content[name]
    content[key] = record_out
    context.state[STATE_REPLICA_KEY] = record_out
    context.state[STATE_REPLICA_META_KEY] = ConfigRecord({"version": info.version, "digest": info.digest})
    return None
