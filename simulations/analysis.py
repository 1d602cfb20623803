"""How a sweep's round rows become the numbers a comparison reports.

A federated run is a curve: cumulative uplink bytes against central test
accuracy, one point per round. The final round alone says little when
curves swing from round to round, so every method is also compared on

* the **mean of its last rounds** (``last_k``),
* the **uplink bytes it needs to reach a target** accuracy (by default
  dense FedAvg's last-rounds mean minus 2 points; a run that never reaches
  it counts as not reached), and
* its **accuracy at equal cumulative bytes** against a reference method
  (TruncSVD at the same rank): at each of the reference's rounds, the
  method's accuracy at the last round whose cumulative bytes do not exceed
  the reference's (a step curve, so a method is never credited with bytes it
  had not sent yet), minus the reference's accuracy, paired by seed.

Margins are paired by seed (the seed fixes data, partitions and
initialisation, which move every method alike) and come with a 95%
Student-t confidence interval over seeds. The largest gap at equal bytes is
a maximum over rounds, so it is the best point of the curve, not a test of
one pre-chosen point; its interval is that round's interval.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Curve",
    "accuracy_at_bytes",
    "bytes_to_target",
    "compare",
    "curves_by_run",
    "paired_interval",
    "read_rows",
    "rows_by_run",
    "summarize",
    "summary_markdown",
    "t_quantile_975",
]

#: Two-sided 95% Student-t quantiles by degrees of freedom (1..30); beyond, the normal 1.96.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (``nan`` for ``df < 1``)."""
    if df < 1:
        return math.nan
    return _T975[df - 1] if df <= len(_T975) else 1.96


def paired_interval(diffs: Sequence[float]) -> tuple[float, float]:
    """Mean of paired differences and the half-width of its 95% t interval (``nan`` with one pair)."""
    if not diffs:
        return math.nan, math.nan
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.nan
    return mean, t_quantile_975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))


@dataclass(frozen=True)
class Curve:
    """One run: rounds 1.. as cumulative uplink bytes and test accuracy (round 0 left out)."""

    bytes_up: tuple[float, ...]
    accuracy: tuple[float, ...]

    def last_mean(self, k: int) -> float:
        """Mean accuracy of the last ``k`` rounds."""
        return statistics.fmean(self.accuracy[-k:])


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The round rows of one run CSV (or of a sweep's ``rounds.csv``), as strings."""
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def rows_by_run(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int, int], list[Mapping[str, Any]]]:
    """``(method, rank, seed)`` -> that run's round rows, in round order (round 0 included)."""
    out: dict[tuple[str, int, int], list[Mapping[str, Any]]] = {}
    for r in rows:
        out.setdefault((str(r["method"]), int(r["rank"]), int(r["seed"])), []).append(r)
    for rs in out.values():
        rs.sort(key=lambda r: int(r["round"]))
    return out


def curves_by_run(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int, int], Curve]:
    """``(method, rank, seed)`` -> its :class:`Curve`, from the sweep's round rows."""
    out: dict[tuple[str, int, int], Curve] = {}
    for key, rs in rows_by_run(rows).items():
        pts = [r for r in rs if int(r["round"]) >= 1]
        if pts:
            out[key] = Curve(
                tuple(float(r["cum_bytes_up"]) for r in pts), tuple(float(r["test_accuracy"]) for r in pts)
            )
    return out


def accuracy_at_bytes(curve: Curve, budget: float) -> float:
    """Accuracy of the last round whose cumulative bytes are at most ``budget`` (``nan`` if none)."""
    best = math.nan
    for b, a in zip(curve.bytes_up, curve.accuracy):
        if b <= budget:
            best = a
        else:
            break
    return best


def bytes_to_target(curve: Curve, target: float) -> float:
    """Cumulative uplink bytes at the first round with accuracy >= ``target`` (``inf`` if never)."""
    for b, a in zip(curve.bytes_up, curve.accuracy):
        if a >= target:
            return b
    return math.inf


def _equal_bytes_gap(
    curves: Mapping[tuple[str, int, int], Curve],
    method: str,
    rank: int,
    reference: tuple[str, int],
    seeds: Sequence[int],
) -> tuple[float, float, int]:
    """Largest mean paired gap at the reference's (method, rank) cumulative bytes: (gap, half-width, round)."""
    best = (math.nan, math.nan, 0)
    n_rounds = min(len(curves[(*reference, s)].bytes_up) for s in seeds)
    for k in range(n_rounds):
        diffs = []
        for s in seeds:
            ref = curves[(*reference, s)]
            acc = accuracy_at_bytes(curves[(method, rank, s)], ref.bytes_up[k])
            diffs.append(acc - ref.accuracy[k])
        if any(math.isnan(d) for d in diffs):
            continue
        mean, half = paired_interval(diffs)
        if math.isnan(best[0]) or mean > best[0]:
            best = (mean, half, k + 1)
    return best


def compare(
    rows: Sequence[Mapping[str, Any]],
    *,
    last_k: int = 3,
    target_drop: float = 0.02,
    reference: str = "truncsvd",
    reference_rank: int | None = None,
) -> dict[tuple[str, int], dict[str, Any]]:
    """Per ``(method, rank)``: last-rounds accuracy, bytes to target, and paired gaps to ``reference``.

    Parameters
    ----------
    rows
        The sweep's round rows (``method``, ``rank``, ``seed``, ``round``,
        ``cum_bytes_up``, ``test_accuracy``).
    last_k
        Rounds averaged for the "last rounds" accuracy.
    target_drop
        The target accuracy is dense's last-rounds mean minus this (0.02 = 2 points);
        without a dense run there is no target.
    reference
        The method the paired gaps are measured against, at the same rank.
    reference_rank
        Pair against the reference at this rank instead (0 for a rank-free
        reference such as dense FedAvg).

    Returns
    -------
    dict
        Keys ``last_accuracy``, ``target``, ``reached`` (seeds that reached the
        target), ``bytes_to_target`` (median over seeds, ``inf`` when half or
        more never reached it), ``vs_ref_last`` and ``vs_ref_last_ci`` (paired
        last-rounds gap and 95% half-width, points), ``vs_ref_bytes``,
        ``vs_ref_bytes_ci`` and ``vs_ref_bytes_round`` (the largest paired gap
        at equal cumulative bytes, its half-width and the reference round).
    """
    curves = curves_by_run(rows)
    groups: dict[tuple[str, int], list[int]] = {}
    for method, rank, seed in sorted(curves):
        groups.setdefault((method, rank), []).append(seed)
    k = max(1, min([last_k, *(len(c.accuracy) for c in curves.values())]))
    dense = [curves[("dense", 0, s)].last_mean(k) for s in groups.get(("dense", 0), [])]
    target = statistics.fmean(dense) - target_drop if dense else math.nan
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for (method, rank), seeds in groups.items():
        runs = [curves[(method, rank, s)] for s in seeds]
        reach = [bytes_to_target(c, target) for c in runs] if dense else []
        entry: dict[str, Any] = {
            "last_accuracy": statistics.fmean(c.last_mean(k) for c in runs),
            "target": target,
            "reached": sum(math.isfinite(b) for b in reach),
            "bytes_to_target": statistics.median(reach) if reach else math.nan,
            "vs_ref_last": math.nan,
            "vs_ref_last_ci": math.nan,
            "vs_ref_bytes": math.nan,
            "vs_ref_bytes_ci": math.nan,
            "vs_ref_bytes_round": 0,
        }
        ref = (reference, rank if reference_rank is None else reference_rank)
        paired = [s for s in seeds if (*ref, s) in curves]
        if rank > 0 and (method, rank) != ref and paired:
            diffs = [curves[(method, rank, s)].last_mean(k) - curves[(*ref, s)].last_mean(k) for s in paired]
            entry["vs_ref_last"], entry["vs_ref_last_ci"] = (100 * x for x in paired_interval(diffs))
            gap, half, rnd = _equal_bytes_gap(curves, method, rank, ref, paired)
            entry.update(vs_ref_bytes=100 * gap, vs_ref_bytes_ci=100 * half, vs_ref_bytes_round=rnd)
        out[(method, rank)] = entry
    return out


def summarize(rows: Sequence[Mapping[str, Any]], *, last_k: int = 3) -> list[dict[str, Any]]:
    """Per method and rank: final and last-rounds accuracy, bytes, bytes to target, paired gaps to TruncSVD.

    The paired gaps and the target are defined in :mod:`simulations.analysis`.
    """
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    last_round = max(int(r["round"]) for r in rows)
    for r in rows:
        if int(r["round"]) == last_round:
            groups.setdefault((str(r["method"]), int(r["rank"])), []).append(r)
    by_seed = {
        (str(r["method"]), int(r["rank"]), int(r["seed"])): float(r["test_accuracy"])
        for rs in groups.values()
        for r in rs
    }
    dense = groups.get(("dense", 0))
    dense_up = statistics.mean(float(r["cum_bytes_up"]) for r in dense) if dense else math.nan
    dense_acc = statistics.mean(float(r["test_accuracy"]) for r in dense) if dense else math.nan
    curve_stats = compare(rows, last_k=last_k)
    out: list[dict[str, Any]] = []
    for (method, rank), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        accs = [float(r["test_accuracy"]) for r in rs]
        up = statistics.mean(float(r["cum_bytes_up"]) for r in rs)
        # paired by seed against TruncSVD at the same rank: the seed moves every method alike
        diffs = [
            by_seed[(method, rank, int(r["seed"]))] - by_seed[("truncsvd", rank, int(r["seed"]))]
            for r in rs
            if ("truncsvd", rank, int(r["seed"])) in by_seed
        ]
        vs_t, vs_t_ci = paired_interval(diffs) if diffs and rank > 0 else (math.nan, math.nan)
        stats = curve_stats[(method, rank)]
        out.append(
            {
                "method": method,
                "rank": rank,
                "seeds": len(rs),
                "final_accuracy": statistics.mean(accs),
                "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "last_accuracy": stats["last_accuracy"],
                "vs_dense_points": 100 * (statistics.mean(accs) - dense_acc),
                "vs_truncsvd_points": 100 * vs_t,
                "vs_truncsvd_ci": 100 * vs_t_ci,
                "seeds_ahead_of_truncsvd": sum(d > 0 for d in diffs) if rank > 0 else 0,
                "vs_truncsvd_last": stats["vs_ref_last"],
                "vs_truncsvd_last_ci": stats["vs_ref_last_ci"],
                "vs_truncsvd_equal_bytes": stats["vs_ref_bytes"],
                "vs_truncsvd_equal_bytes_ci": stats["vs_ref_bytes_ci"],
                "vs_truncsvd_equal_bytes_round": stats["vs_ref_bytes_round"],
                "target_accuracy": stats["target"],
                "seeds_reaching_target": stats["reached"],
                "bytes_to_target": stats["bytes_to_target"],
                "uplink_bytes": up,
                "uplink_share_of_dense": up / dense_up if dense_up else math.nan,
                "downlink_bytes": statistics.mean(float(r["cum_bytes_down"]) for r in rs),
                "compress_s": statistics.mean(float(r["compress_s"]) for r in rs),
            }
        )
    return out


def _pm(value: float, half: float, extra: str = "") -> str:
    """``+1.23 ± 0.45`` (points), ``-`` when undefined."""
    if math.isnan(value):
        return "-"
    ci = "" if math.isnan(half) else f" ± {half:.2f}"
    return f"{value:+.2f}{ci}{extra}"


def summary_markdown(summary: Sequence[Mapping[str, Any]], header: str, *, last_k: int = 3) -> str:
    """The summary as markdown: ``header``, the final-round table, then the curve table."""
    lines = [
        header,
        "",
        "| method | rank | seeds | final acc. (%) | ± std | vs dense (pts) | vs TruncSVD (pts, paired, 95% CI) "
        "| uplink bytes | share of dense | compress s/client |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        ahead = f" ({s['seeds_ahead_of_truncsvd']}/{s['seeds']} ahead)"
        paired = _pm(s["vs_truncsvd_points"], s["vs_truncsvd_ci"], ahead)
        lines.append(
            f"| {s['method']} | {s['rank'] or '-'} | {s['seeds']} | {100 * s['final_accuracy']:.2f} | "
            f"{100 * s['accuracy_std']:.2f} | {s['vs_dense_points']:+.2f} | {paired} | {s['uplink_bytes']:,.0f} | "
            f"{100 * s['uplink_share_of_dense']:.3f}% | {s['compress_s']:.3f} |"
        )
    target = summary[0]["target_accuracy"] if summary else math.nan
    lines += [
        "",
        f"Curves: mean of the last {last_k} rounds; uplink bytes to reach the target "
        + ("(no dense run, no target)" if math.isnan(target) else f"{100 * target:.2f}% (dense's last-rounds mean - 2)")
        + "; largest paired gap to TruncSVD at equal cumulative bytes (TruncSVD's round in brackets).",
        "",
        f"| method | rank | last-{last_k} acc. (%) | vs TruncSVD last-{last_k} (pts, 95% CI) "
        "| seeds at target | median bytes to target | best gap at equal bytes (pts, 95% CI) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        reach = s["bytes_to_target"]
        reach_text = "-" if math.isnan(reach) else ("not reached" if math.isinf(reach) else f"{reach:,.0f}")
        at_bytes = _pm(s["vs_truncsvd_equal_bytes"], s["vs_truncsvd_equal_bytes_ci"])
        if at_bytes != "-":
            at_bytes += f" (round {s['vs_truncsvd_equal_bytes_round']})"
        lines.append(
            f"| {s['method']} | {s['rank'] or '-'} | {100 * s['last_accuracy']:.2f} | "
            f"{_pm(s['vs_truncsvd_last'], s['vs_truncsvd_last_ci'])} | {s['seeds_reaching_target']}/{s['seeds']} | "
            f"{reach_text} | {at_bytes} |"
        )
    dense_total = next((s["uplink_bytes"] + s["downlink_bytes"] for s in summary if s["method"] == "dense"), math.nan)
    lines += [
        "",
        "Both directions (Flower message bytes, all clients, mean over seeds):",
        "",
        "| method | rank | uplink bytes | downlink bytes | total bytes | total share of dense |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        total = s["uplink_bytes"] + s["downlink_bytes"]
        share = "-" if math.isnan(dense_total) else f"{100 * total / dense_total:.3f}%"
        lines.append(
            f"| {s['method']} | {s['rank'] or '-'} | {s['uplink_bytes']:,.0f} | {s['downlink_bytes']:,.0f} | "
            f"{total:,.0f} | {share} |"
        )
    return "\n".join(lines) + "\n"
