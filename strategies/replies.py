"""Validation of one train reply: everything the server checks before a reply may touch the model.

:func:`check_reply` takes a reply and the global model it answers and
returns its weight, its decoded payload (the compressed factors, not the
rebuilt tensors) and, when asked, its update norm, or raises
:class:`ReplyRejected` with a reason naming the problem. In order:

1. exactly one ``MetricRecord`` with a positive, finite ``num-examples`` of
   at most 2**53 (:func:`reply_weight`);
2. exactly one ``ArrayRecord``, the payload, no larger than the limit;
3. the payload decodes (:func:`osd_fl.decode`: framing, CRC, version, the
   configured method, the model's tensor names, shapes and dtypes, finite
   values bounded by 2**48), one record per tensor of the model;
4. it is what a correct client of the configured method sends
   (:func:`osd_fl.checks.check_conformance`: record kinds, ranks, value
   dtype, int8 blocks);
5. no rebuilt value exceeds the model dtype's safe magnitude
   (:func:`osd_fl.checks.value_limit`: 64 in float16, 2**62 in float32), so
   no single reply can overflow the model, a float16 cast, or a server
   optimizer's second moment (DENSE, SPARSE and QUANT8 values of a model
   whose limit is at least :data:`osd_fl.codec.MAX_DECODED_VALUE`, 2**55,
   are within it by step 3 and are not measured again);
6. with a norm bound, its float64 norm (:func:`update_norm`, independent of
   torch's thread count).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.app.message import make_message

from osd_fl import (
    CompressionConfig,
    Kind,
    Payload,
    PayloadError,
    check_conformance,
    decode,
    exceeds,
    record_sq_norm,
    value_limit,
)
from osd_fl.codec import MAX_DECODED_VALUE
from osd_fl.records import PAYLOAD_RECORD_KEY, record_to_payload
from strategies.metrics import clean_reply, common_metrics

__all__ = [
    "MAX_WEIGHT",
    "ReplyRejected",
    "check_evaluate_replies",
    "check_reply",
    "check_value_bound",
    "reply_weight",
    "update_norm",
]

#: Largest accepted ``num-examples``: every integer up to it is exact in float64,
#: and weight times the largest decodable value stays far from overflow.
MAX_WEIGHT: Final = float(2**53)

Specs = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


class ReplyRejected(Exception):
    """A reply failed validation; the message is the reason."""


def reply_weight(content: RecordDict, key: str) -> float:
    """The reply's self-reported weight ``key``, checked.

    Raises
    ------
    ReplyRejected
        Not exactly one ``MetricRecord``, the key missing, not a number, not
        positive and finite, or above :data:`MAX_WEIGHT`.
    """
    records = list(content.metric_records.values())
    if len(records) != 1:
        raise ReplyRejected(f"expected exactly one MetricRecord, found {len(records)}")
    if key not in records[0]:
        raise ReplyRejected(f"metric {key!r} is missing")
    value = records[0][key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReplyRejected(f"metric {key!r} must be a number, got {type(value).__name__}")
    if isinstance(value, int) and value > MAX_WEIGHT:  # before float(): a huge int would overflow it
        raise ReplyRejected(f"metric {key!r} = {value} exceeds the largest accepted weight 2**53")
    weight = float(value)
    if not math.isfinite(weight) or weight <= 0:
        raise ReplyRejected(f"metric {key!r} must be positive and finite, got {value!r}")
    if weight > MAX_WEIGHT:
        raise ReplyRejected(f"metric {key!r} = {value!r} exceeds the largest accepted weight 2**53")
    return weight


def decode_payload(msg: Message, specs: Specs, limit: int, config: CompressionConfig) -> Payload:
    """Steps 2-5 of the module docstring: the reply's payload, decoded and checked.

    Raises
    ------
    ReplyRejected
        With the reason.
    """
    content = msg.content
    if PAYLOAD_RECORD_KEY not in content.array_records:
        found = sorted(content.array_records)
        raise ReplyRejected(
            f"no OSD payload record {PAYLOAD_RECORD_KEY!r} (found ArrayRecords {found}); "
            "is clients.osd_mod installed on the ClientApp?"
        )
    extra = sorted(k for k in content.array_records if k != PAYLOAD_RECORD_KEY)
    if extra:
        raise ReplyRejected(f"unexpected ArrayRecords {extra} besides the payload")
    try:
        blob = record_to_payload(content.array_records[PAYLOAD_RECORD_KEY], max_bytes=limit)
        payload = decode(blob, expected=specs, max_bytes=limit, method=config.method)
        names = [rec.name for rec in payload.records]
        if len(names) != len(set(names)) or set(names) != set(specs):
            raise ReplyRejected(f"payload tensors {sorted(names)} do not match the model's {sorted(specs)}")
        check_conformance(payload, config)
        check_value_bound(payload)
    except PayloadError as exc:
        raise ReplyRejected(f"invalid payload: {exc}") from None
    return payload


def check_value_bound(payload: Payload) -> None:
    """Step 5 of the module docstring, on a payload :func:`osd_fl.decode` returned.

    DENSE, SPARSE and QUANT8 records of a model dtype whose limit is at
    least :data:`osd_fl.codec.MAX_DECODED_VALUE` are within it by the
    decoder's own bound and are not measured again; every other record goes
    through :func:`osd_fl.exceeds`.

    Raises
    ------
    ReplyRejected
        Naming the tensor, the largest magnitude and the limit.
    """
    for rec in payload.records:
        limit_value = value_limit(rec.dtype)
        if rec.kind != Kind.LOWRANK and limit_value >= MAX_DECODED_VALUE:
            continue  # decode bounded these values already: no float64 pass needed to know they fit
        largest = exceeds(rec, limit_value)
        if largest is not None:
            raise ReplyRejected(
                f"tensor {rec.name!r}: an update value of magnitude {largest:.6g} exceeds {limit_value:.6g}, "
                f"the largest a {rec.dtype} model accepts (sqrt of the dtype's maximum / 4)"
            )


def update_norm(payload: Payload) -> float:
    """L2 norm of the decoded update over every tensor, in float64, the same with any thread count."""
    return math.sqrt(math.fsum(record_sq_norm(rec) for rec in payload.records))


def check_reply(
    msg: Message, specs: Specs, limit: int, config: CompressionConfig, weight_key: str, *, with_norm: bool
) -> tuple[float, Payload, float]:
    """Validate one reply: ``(weight, payload, norm)``; the norm is NaN unless ``with_norm``.

    Raises
    ------
    ReplyRejected
        With the reason (see the module docstring for the checks).
    """
    weight = reply_weight(msg.content, weight_key)
    payload = decode_payload(msg, specs, limit, config)
    norm = update_norm(payload) if with_norm else math.nan
    if with_norm and not math.isfinite(norm):
        raise ReplyRejected(f"update norm is {norm}")
    return weight, payload, norm


def check_evaluate_replies(replies: list[Message], weight_key: str) -> tuple[list[Message], int, list[tuple[int, str]]]:
    """The evaluate replies fit for the inner strategy's metric aggregation.

    An error reply is skipped (the inner strategy counts it); one with a bad
    weight or without the metric names most replies share
    (:func:`strategies.metrics.common_metrics`) is left out with a reason;
    the others' metrics are cleaned and restricted to those shared names.

    Returns
    -------
    tuple
        The harmonised replies, the number of metric entries dropped, and
        ``(node, reason)`` for each reply left out.
    """
    usable: list[Message] = []
    records: list[MetricRecord] = []
    left_out: list[tuple[int, str]] = []
    dropped = 0
    for msg in replies:
        if msg.has_error():
            continue  # counted by the inner strategy's own reply check
        try:
            reply_weight(msg.content, weight_key)
        except ReplyRejected as exc:
            left_out.append((int(msg.metadata.src_node_id), f"evaluate reply: {exc}"))
            continue
        cleaned, n = clean_reply(msg, weight_key)
        dropped += n
        usable.append(cleaned)
        records.append(next(iter(cleaned.content.metric_records.values())))
    kept, restricted = common_metrics(records)
    harmonised = [
        make_message(metadata=usable[i].metadata, content=RecordDict({"metrics": record}))
        for i, record in zip(kept, restricted, strict=True)
    ]
    for i in sorted(set(range(len(usable))) - set(kept)):
        left_out.append((int(usable[i].metadata.src_node_id), "evaluate reply lacks metrics the other replies carry"))
    return harmonised, dropped, left_out
