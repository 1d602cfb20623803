"""What a round reports: its counts, why replies were left out, when a run has stalled, its CSV files.

* :class:`Rejection` and :class:`RejectionLog`: every reply received but not
  aggregated, and every sampled node that sent nothing, with the reason
  (printable, clipped), logged as a warning;
* :func:`new_counts`: the round's counters (``accepted``, ``rejected``,
  ``failed`` and their breakdowns);
* :class:`StallTracker`: rounds in a row that changed nothing, and
  :class:`FederationStalled` at the limit, naming the most frequent reason;
* :class:`History`: one row per round and phase, written to ``rounds.csv``
  beside the byte meter's ``traffic.csv``.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import MetricRecord

from osd_fl.records import (
    METRIC_ACCEPTED,
    METRIC_FAILED,
    METRIC_METRICS_DROPPED,
    METRIC_NO_REPLY,
    METRIC_REJECTED,
    METRIC_REJECTED_NORM,
    METRIC_REJECTED_RANGE,
)
from strategies.metering import ByteMeter
from strategies.metrics import printable

__all__ = ["FederationStalled", "History", "Rejection", "RejectionLog", "StallTracker", "log_settings", "new_counts"]

# A child of Flower's logger, so messages show in the ServerApp's console like Flower's own.
log = logging.getLogger("flwr.osd.strategy")


@dataclass(frozen=True)
class Rejection:
    """A reply that was not aggregated, and why."""

    server_round: int
    node_id: int
    reason: str
    failed: bool = False
    """True for a reply that carried a Flower ``Error`` or never came (counted as ``failed``)."""
    kind: str = "invalid"
    """``invalid`` (failed validation), ``norm`` (outside the norm bound),
    ``range`` (would take the model out of its dtype's safe range),
    ``unsolicited`` (unsampled node or second reply), ``error`` (Flower error
    reply), ``resync`` (the node's replica of the compressed broadcast did not
    match: it asks for the dense model, which the next round sends),
    ``no-reply`` (sampled, nothing received before the timeout) or
    ``evaluate`` (an evaluate reply left out of the metrics)."""


class FederationStalled(RuntimeError):
    """Raised by :meth:`OSDStrategy.aggregate_train` after too many rounds in a row changed nothing.

    Ends the ServerApp with an error (``flwr run`` then reports the run as
    failed) instead of letting a run in which nothing can succeed exit 0.
    The message names the most frequent reason replies were rejected or
    failed in those rounds.
    """


def log_settings(compression: dict[str, Any], server: dict[str, Any]) -> None:
    """Log the strategy's settings as Flower logs a strategy summary: compression first, then the server's own."""
    log.info("\t├──> OSD compression (uplink):")
    items = [*compression.items(), *server.items()]
    for k, (name, value) in enumerate(items):
        log.info("\t│\t%s── %s: %s", "└" if k == len(items) - 1 else "├", name, value)


def new_counts(bounds_norm: bool) -> dict[str, int]:
    """A train round's counters, all zero (``rejected-norm`` only when a norm bound is set)."""
    counts = {
        METRIC_ACCEPTED: 0,
        METRIC_REJECTED: 0,
        METRIC_FAILED: 0,
        METRIC_NO_REPLY: 0,
        METRIC_REJECTED_RANGE: 0,
        METRIC_METRICS_DROPPED: 0,
    }
    if bounds_norm:
        counts[METRIC_REJECTED_NORM] = 0
    return counts


class RejectionLog:
    """Replies received but not aggregated (:attr:`rejections`) and nodes that sent nothing (:attr:`missing`)."""

    def __init__(self) -> None:
        self.rejections: list[Rejection] = []
        self.missing: list[Rejection] = []

    def reject(self, server_round: int, node: int, reason: str, *, failed: bool = False, kind: str = "invalid") -> None:
        """Record and log why ``node``'s reply (or its absence, ``kind="no-reply"``) was left out."""
        reason = printable(reason)
        entry = Rejection(server_round, node, reason, failed, kind)
        if kind == "no-reply":
            self.missing.append(entry)
            log.warning("round %d: node %d sent no reply before the timeout", server_round, node)
            return
        self.rejections.append(entry)
        if kind == "resync":  # expected after a lost state or a corrupted broadcast; the downlink logs it
            return
        log.warning("round %d: reply from node %d excluded: %s", server_round, node, reason)

    def of_round(self, server_round: int) -> list[Rejection]:
        """Every entry of ``server_round``, rejections first."""
        return [e for e in [*self.rejections, *self.missing] if e.server_round == server_round]


class StallTracker:
    """Counts train rounds in a row that changed nothing.

    Parameters
    ----------
    limit
        Raise :class:`FederationStalled` at this many rounds in a row (0: never).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.stalled = 0
        self._reasons: Counter[str] = Counter()
        self._examples: dict[str, str] = {}

    def track(self, server_round: int, *, changed: bool, entries: list[Rejection]) -> None:
        """Note one round (``entries``: its rejections); raise :class:`FederationStalled` at the limit."""
        if changed:
            self.stalled = 0
            self._reasons.clear()
            self._examples.clear()
            return
        self.stalled += 1
        for entry in entries:
            key = re.sub(r"\d[\d.e+-]*", "#", entry.reason)  # numbers masked, so alike reasons group
            self._reasons[key] += 1
            self._examples.setdefault(key, entry.reason)
        if not self.limit or self.stalled < self.limit:
            return
        if self._reasons:
            key, count = self._reasons.most_common(1)[0]
            why = f"most frequent reason ({count} times): {self._examples[key]}"
        else:
            why = "no node was sampled or every reply was valid but left the model unchanged"
        raise FederationStalled(
            f"round {server_round}: {self.stalled} rounds in a row changed nothing; {why}. "
            f"Stopping the run (raise max_stalled_rounds={self.limit}, or 0 to never stop)."
        )


class History:
    """One row per round and phase; with ``csv_dir``, ``traffic.csv`` and ``rounds.csv`` rewritten after each."""

    def __init__(self, meter: ByteMeter, csv_dir: Path | None) -> None:
        self.meter = meter
        self.csv_dir = csv_dir
        self.rows: list[dict[str, Any]] = []

    def record(self, server_round: int, phase: str, metrics: MetricRecord) -> None:
        """Add a row (list-valued metrics left out) and rewrite the CSV files if a folder is set."""
        row: dict[str, Any] = {"round": server_round, "phase": phase}
        row.update({k: v for k, v in metrics.items() if not isinstance(v, list)})
        self.rows.append(row)
        if self.csv_dir is not None:
            try:
                self.write_csv(self.csv_dir)
            except OSError:
                log.exception("could not write CSV files to %s", self.csv_dir)

    def write_csv(self, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``traffic.csv`` (per node) and ``rounds.csv`` (per round and phase); returns both paths."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        traffic = self.meter.to_csv(out / "traffic.csv")
        rounds = out / "rounds.csv"
        columns: list[str] = []
        for row in self.rows:
            columns.extend(k for k in row if k not in columns)
        with rounds.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        return traffic, rounds
