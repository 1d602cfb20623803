"""Client metrics, checked one reply at a time before anyone aggregates or logs them.

A client's ``MetricRecord`` is client data: one bad entry must cost that
entry, never the reply, and never the other clients' metrics. Every reply's
metrics pass :func:`clean_metrics` before they reach Flower's (or a user's)
metric aggregation, the strategy's history, its CSV files or a log line:

* values: finite ``int`` or ``float`` scalars (lists are dropped: Flower's
  aggregation zips them across replies and one odd length fails the whole
  round's metrics);
* names: at most :data:`MAX_NAME_CHARS` printable characters, not one of the
  strategy's own names (:data:`RESERVED`: ``round``, ``accepted``,
  ``bytes-up``, ...), at most :data:`MAX_ENTRIES` per reply;
* the weight (``num-examples``) is checked by the reply validation, not here.

Text that reaches a log line is clipped and escaped by :func:`printable`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping
from typing import Any, Final

from flwr.app import Message, MetricRecord, RecordDict
from flwr.app.message import make_message
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from osd_fl import records as rk

__all__ = [
    "MAX_ENTRIES",
    "MAX_NAME_CHARS",
    "RESERVED",
    "aggregate_client_metrics",
    "clean_metrics",
    "clean_reply",
    "common_metrics",
    "merge_metrics",
    "printable",
]

#: Longest accepted metric name.
MAX_NAME_CHARS: Final = 64
#: Most metric entries kept from one reply (the rest are dropped and counted).
MAX_ENTRIES: Final = 64
#: Characters of a client-supplied text (error reason, tensor name) kept in a log line.
MAX_REASON_CHARS: Final = 500
#: Largest magnitude of a kept metric value (a weighted mean of such values stays finite).
MAX_VALUE: Final = 1e300

#: Names the strategy writes itself; a client metric of the same name is dropped.
RESERVED: Final = frozenset(
    {
        "round",
        "phase",
        rk.METRIC_ACCEPTED,
        rk.METRIC_REJECTED,
        rk.METRIC_FAILED,
        rk.METRIC_NO_REPLY,
        rk.METRIC_REJECTED_NORM,
        rk.METRIC_REJECTED_RANGE,
        rk.METRIC_ROUND_KEPT_OUT,
        rk.METRIC_METRICS_DROPPED,
        rk.METRIC_NORM_MEDIAN,
        rk.METRIC_NORM_THRESHOLD,
        rk.METRIC_BYTES_DOWN,
        rk.METRIC_BYTES_UP,
        rk.METRIC_PAYLOAD_BYTES_DOWN,
        rk.METRIC_PAYLOAD_BYTES_UP,
        rk.METRIC_MESSAGES_DOWN,
        rk.METRIC_MESSAGES_UP,
    }
)


def printable(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` clipped to ``limit`` characters, control characters escaped (it may come from a client)."""
    clipped = text[:limit]
    out = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in clipped)
    return out + (f"... [{len(text) - limit} more characters]" if len(text) > limit else "")


def _valid_name(name: object) -> bool:
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME_CHARS and name.isprintable() and name not in RESERVED


def _valid_value(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and abs(float(value)) <= MAX_VALUE
    except OverflowError:  # an int too large for a float
        return False


def clean_metrics(record: MetricRecord, weight_key: str) -> tuple[MetricRecord, int]:
    """The entries of ``record`` that are safe to aggregate and log, and how many were dropped.

    ``weight_key`` is kept as it is (the reply validation has already
    checked it) and does not count towards :data:`MAX_ENTRIES`.
    """
    kept = MetricRecord()
    dropped = 0
    entries = 0
    for name, value in record.items():
        if name == weight_key:
            kept[name] = value
            continue
        if entries >= MAX_ENTRIES or not _valid_name(name) or not _valid_value(value):
            dropped += 1
            continue
        kept[name] = value
        entries += 1
    return kept, dropped


def clean_reply(msg: Message, weight_key: str) -> tuple[Message, int]:
    """A copy of ``msg`` whose every ``MetricRecord`` went through :func:`clean_metrics`.

    Other records are shared, not copied (they are not changed). Error
    replies are returned as they are.
    """
    if msg.has_error():
        return msg, 0
    content = RecordDict()
    dropped = 0
    for key, record in msg.content.items():
        if isinstance(record, MetricRecord):
            record, n = clean_metrics(record, weight_key)
            dropped += n
        content[key] = record
    return make_message(metadata=msg.metadata, content=content), dropped


def common_metrics(records: list[MetricRecord]) -> tuple[list[int], list[MetricRecord]]:
    """Restrict cleaned metric records to the set of names most of them share.

    Flower's aggregation expects every reply to carry the same metric names
    (its consistency check skips the whole round's metrics otherwise), so
    one reply with an extra or a missing name would wipe everyone's. The
    names the most replies carry win (a tie: the names all tied sets share); a reply with
    more has the extras ignored, a reply with fewer is left out of the
    *metric* aggregation only.

    Returns
    -------
    tuple
        The indices of the records kept, and those records restricted to the
        common names, in order.
    """
    if not records:
        return [], []
    counts = Counter(frozenset(r.keys()) for r in records)
    top = max(counts.values())
    common = frozenset.intersection(*(keys for keys, n in counts.items() if n == top))
    kept: list[int] = []
    out: list[MetricRecord] = []
    for i, record in enumerate(records):
        if common <= set(record.keys()):
            kept.append(i)
            out.append(MetricRecord({k: record[k] for k in record if k in common}))
    return kept, out


def aggregate_client_metrics(inner: Strategy, replies: list[Message], weight_key: str) -> MetricRecord:
    """The clients' train metrics over ``replies`` (already cleaned), aggregated the inner strategy's way.

    Restricted to the names most replies share (:func:`common_metrics`);
    the inner strategy's ``train_metrics_aggr_fn`` if it has one, else
    Flower's weighted average. A failure costs the metrics, never the round.
    """
    records = [next(iter(msg.content.metric_records.values())) for msg in replies]
    _, restricted = common_metrics(records)
    contents = [RecordDict({"metrics": record}) for record in restricted]
    if not contents:
        return MetricRecord()
    fn = getattr(inner, "train_metrics_aggr_fn", None) or aggregate_metricrecords
    try:
        result = fn(contents, weight_key)
        if isinstance(result, MetricRecord):
            return result
    except Exception:  # metrics must not cost the round
        logging.getLogger("flwr.osd.strategy").warning(
            "client train metrics could not be aggregated; continuing without them", exc_info=True
        )
    return MetricRecord()


def merge_metrics(*parts: Mapping[str, Any] | None) -> MetricRecord:
    """One ``MetricRecord`` of ``parts`` in order (a later part's value wins); ``None`` parts are skipped."""
    merged = MetricRecord()
    for part in parts:
        if part is not None:
            for key, value in part.items():
                merged[key] = value
    return merged
