"""Paired comparison of a finished sweep against any reference method.

The sweep's summary measures every method against TruncSVD at the same rank.
A choice between two variants of one method (float32, float16 or int8 values;
with or without error feedback) needs them measured against each other,
paired by seed, with the same definitions (:mod:`simulations.analysis`)::

    python -m simulations.compare results/fullmodel --reference osd --methods osd-fp16,osd-int8

It reads the sweep folder's ``runs/*.csv`` (every finished run, whatever the
shard that wrote it) and prints one markdown row per method and rank: the
last-rounds accuracy and its paired gap to the reference, the largest paired
gap at equal cumulative uplink bytes, the uplink bytes and the client's
compression seconds (median over rounds) as ratios to the reference's
(same seeds). Seconds from runs made at different times on a shared machine
are not a side-by-side measurement: read that column as a rough guide.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from simulations.analysis import compare, read_rows, rows_by_run

__all__ = ["compare_table", "load_runs", "main"]


def load_runs(folder: Path) -> list[dict[str, Any]]:
    """Every round row of the finished runs in ``folder/runs``.

    Raises
    ------
    SystemExit
        When the folder holds no run CSVs (say which folder).
    """
    paths = sorted((folder / "runs").glob("*.csv"))
    if not paths:
        raise SystemExit(f"no run CSVs in {folder / 'runs'}: run the sweep first (python -m simulations.sweep)")
    return [row for path in paths for row in read_rows(path)]


def _final(rows: Sequence[Mapping[str, Any]], field: str, agg: str) -> dict[tuple[str, int, int], float]:
    """Per run: the last round's ``field`` (agg="last") or its median over rounds 1.. (agg="median").

    A median, not a mean: one stalled round (a busy machine) can take 100x the others.
    """
    out = {}
    for key, rs in rows_by_run(rows).items():
        values = [float(r[field]) for r in rs if int(r["round"]) > 0]
        out[key] = values[-1] if agg == "last" else statistics.median(values) if values else math.nan
    return out


def compare_table(
    rows: Sequence[Mapping[str, Any]],
    reference: str,
    methods: Sequence[str] = (),
    *,
    last_k: int = 3,
) -> str:
    """A markdown table of ``methods`` (default: all but the reference) against ``reference``, by rank.

    Ratios (uplink bytes, compression seconds) are means over the seeds both
    methods ran; a rank the reference did not run gets no row. A rank-free
    reference (dense FedAvg, fp16, int8: rank 0 only) is paired with every rank.
    """
    up = _final(rows, "cum_bytes_up", "last")
    secs = _final(rows, "compress_s", "median")
    seeds: dict[tuple[str, int], set[int]] = {}
    for method, rank, seed in up:
        seeds.setdefault((method, rank), set()).add(seed)
    rank_free = {r for m, r in seeds if m == reference} == {0}
    stats = compare(rows, last_k=last_k, reference=reference, reference_rank=0 if rank_free else None)
    lines = [
        f"Against `{reference}` "
        + ("(rank-free: paired with every rank)" if rank_free else "at the same rank")
        + f", paired by seed (95% CI); last-{last_k} = mean of the last "
        f"{last_k} rounds.",
        "",
        f"| method | rank | seeds | last-{last_k} acc. (%) | vs {reference} last-{last_k} (pts) | "
        f"best gap at equal bytes (pts) | uplink bytes / {reference} | compress s / {reference} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (method, rank), entry in sorted(stats.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if method == reference or (methods and method not in methods) or rank == 0:
            continue
        ref_rank = 0 if rank_free else rank
        both = sorted(seeds[(method, rank)] & seeds.get((reference, ref_rank), set()))
        if not both:
            continue
        ratio_up = _ratio(up, (method, rank), (reference, ref_rank), both)
        ratio_s = _ratio(secs, (method, rank), (reference, ref_rank), both)
        gap = f"{entry['vs_ref_last']:+.2f} ± {entry['vs_ref_last_ci']:.2f}"
        at_bytes = (
            f"{entry['vs_ref_bytes']:+.2f} ± {entry['vs_ref_bytes_ci']:.2f} (round {entry['vs_ref_bytes_round']})"
        )
        lines.append(
            f"| {method} | {rank} | {len(both)} | {100 * entry['last_accuracy']:.2f} | {gap} | {at_bytes} | "
            f"{ratio_up:.3f} | {ratio_s:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _ratio(
    values: Mapping[tuple[str, int, int], float], run: tuple[str, int], ref: tuple[str, int], seeds: list[int]
) -> float:
    num = statistics.fmean(values[(*run, s)] for s in seeds)
    den = statistics.fmean(values[(*ref, s)] for s in seeds)
    return num / den if den else math.nan


def main(argv: Sequence[str] | None = None) -> int:
    """Print the paired table of a sweep folder against ``--reference``."""
    ap = argparse.ArgumentParser(prog="python -m simulations.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a sweep's results folder (holding runs/*.csv)")
    ap.add_argument("--reference", default="truncsvd", help="the method every other is paired against")
    ap.add_argument("--methods", default="", help="comma list of methods to show (default: all)")
    ap.add_argument("--last-k", type=int, default=3, help="rounds averaged for the last-rounds accuracy")
    args = ap.parse_args(argv)
    rows = load_runs(args.folder)
    known = {str(r["method"]) for r in rows}
    wanted = [m for m in args.methods.split(",") if m]
    unknown = sorted({args.reference, *wanted} - known)
    if unknown:
        raise SystemExit(f"method(s) {', '.join(unknown)} not in {args.folder}; it has {', '.join(sorted(known))}")
    print(compare_table(rows, args.reference, wanted, last_k=args.last_k), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
