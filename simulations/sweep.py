"""Accuracy versus bytes: run a sweep of methods, budgets and seeds; write CSV, plots and a summary.

Every run is a federated training of the text task (MiniLM on Rotten
Tomatoes, :mod:`simulations.text_fl`) with one upload compression setting.
Runs are independent; each writes ``runs/<run-id>.csv`` when it finishes,
so an interrupted sweep resumes where it stopped (finished runs are skipped).
At the end the sweep writes ``rounds.csv`` (every round of every run),
``summary.csv`` / ``summary.md`` (final accuracy and bytes per method and
budget, mean and spread over seeds) and three plots.

    python -m simulations.sweep --preset demo        # the README's demo (minutes)
    python -m simulations.sweep --preset medium      # 11 methods, r = 1 and 4, one seed (under an hour)
    python -m simulations.sweep --preset headline    # the full comparison (78 runs, about 85 min on 2 CPU cores)
    python -m simulations.sweep --preset quick --out results/quick   # seconds; used by the tests

Presets are :data:`PRESETS`; any field can be overridden on the command line
(``--methods osd,truncsvd --ranks 1,2 --seeds 0 --rounds 5``), and task
settings with ``--task key=value`` (fields of
:class:`~simulations.text.TextTaskConfig`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

from tqdm import tqdm

from osd_fl import CompressionConfig
from osd_fl.config import ValueDType
from osd_fl.settings import coerce_value
from simulations.analysis import read_rows, summarize, summary_markdown
from simulations.devices import torch_threads
from simulations.presets import CACHED_ERA, DOWNLINK_SPECS, METHOD_SPECS, PRESETS, RANK_FREE, SweepConfig
from simulations.text import TextTaskConfig
from simulations.text_fl import RoundRow, run_text_fl
from strategies.downlink import Downlink

__all__ = ["CACHED_ERA", "METHOD_SPECS", "PRESETS", "SweepConfig", "main", "run_sweep", "summarize"]


def run_id(method: str, rank: int, seed: int) -> str:
    """File-safe id of one run."""
    return f"{method.replace('+', 'P')}_r{rank}_s{seed}"


def plan(cfg: SweepConfig) -> list[tuple[str, int, int]]:
    """Every ``(method, rank, seed)`` of the sweep; rank-free methods get rank 0.

    Ordered so that a partial sweep is already a paired comparison: the
    rank-free runs first, then rank by rank (smallest first), seed by seed,
    every method of that rank and seed.
    """
    for method in cfg.methods:
        if method not in METHOD_SPECS:
            raise SystemExit(f"unknown sweep method {method!r}; known: {', '.join(METHOD_SPECS)}")
    runs = [(m, 0, seed) for seed in cfg.seeds for m in cfg.methods if m in RANK_FREE]
    ranks = sorted({r for m in cfg.methods if m not in RANK_FREE for r in cfg.method_ranks.get(m, cfg.ranks)})
    for rank in ranks:
        for seed in cfg.seeds:
            for method in cfg.methods:
                if method not in RANK_FREE and rank in cfg.method_ranks.get(method, cfg.ranks):
                    runs.append((method, rank, seed))
    return runs


def downlink_for(cfg: SweepConfig, method: str, seed: int) -> Downlink | None:
    """The compressed broadcast of one run (``cfg.downlink`` under the method's own), or None (dense)."""
    spec = {**cfg.downlink, **DOWNLINK_SPECS.get(method, {})}
    if not spec:
        return None
    on = {k: coerce_value(k, bool, spec.pop(k, d)) for k, d in (("server_ef", True), ("hold_initial", False))}
    return Downlink(
        CompressionConfig(seed=seed).replace(**spec),
        error_feedback=on["server_ef"],
        clients_hold_initial=on["hold_initial"],
    )


def compression_for(cfg: SweepConfig, method: str, rank: int, seed: int) -> CompressionConfig:
    """The CompressionConfig of one run."""
    spec = {"value_dtype": cfg.value_dtype, **cfg.compression, **METHOD_SPECS[method]}
    return CompressionConfig(rank=max(rank, 1), relax=cfg.relax, seed=seed).replace(**spec)


ROUND_FIELDS = [
    "run",
    "method",
    "rank",
    "seed",
    "round",
    "test_accuracy",
    "test_loss",
    "bytes_up",
    "bytes_down",
    "cum_bytes_up",
    "cum_bytes_down",
    "compress_s",
    "round_s",
]


def _write_rows(path: Path, rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def run_sweep(cfg: SweepConfig, out: Path) -> list[dict[str, Any]]:
    """Run every missing run of ``cfg`` into ``out/runs``; return all round rows."""
    with torch_threads(cfg.threads):  # restored afterwards: the caller may be a notebook or a test
        return _run_sweep(cfg, out)


def _run_sweep(cfg: SweepConfig, out: Path) -> list[dict[str, Any]]:
    task_base = TextTaskConfig().replace(**dict(cfg.task))
    runs = plan(cfg)
    index, count = cfg.shard
    mine = [r for k, r in enumerate(runs) if k % count == index]
    todo = [r for r in mine if not (out / "runs" / f"{run_id(*r)}.csv").exists()]
    shard = f" (shard {index} of {count}: {len(mine)} runs)" if count > 1 else ""
    print(f"sweep {cfg.name!r}: {len(runs)} runs{shard}, {len(mine) - len(todo)} already done, results in {out}")
    bar = tqdm(total=len(todo) * (cfg.rounds + 1), unit="round", dynamic_ncols=True, disable=None)
    for method, rank, seed in todo:
        rid = run_id(method, rank, seed)
        bar.set_description(rid)
        task_cfg = task_base.replace(seed=seed)
        compression = compression_for(cfg, method, rank, seed)
        start = time.perf_counter()
        rows = run_text_fl(
            task_cfg,
            compression,
            cfg.rounds,
            fraction_train=cfg.fraction_train,
            server_lr=cfg.server_lr,
            downlink=downlink_for(cfg, method, seed),
            on_round=functools.partial(_progress, bar, rid),
        )
        records = [{"run": rid, "method": method, "rank": rank, "seed": seed, **_plain(row)} for row in rows]
        _write_rows(out / "runs" / f"{rid}.csv", records, ROUND_FIELDS)
        tqdm.write(
            f"{rid}: final acc {rows[-1].test_accuracy:.4f}, uplink {rows[-1].cum_bytes_up:,} B, "
            f"{time.perf_counter() - start:.0f} s"
        )
    bar.close()
    all_rows: list[dict[str, Any]] = []
    missing = [r for r in runs if not (out / "runs" / f"{run_id(*r)}.csv").exists()]
    if missing:  # another shard's runs (or an interrupted one): summarise what is there, and say so
        print(f"{len(missing)} of {len(runs)} runs not finished yet (other shards); summarising the rest")
    for method, rank, seed in runs:
        if (method, rank, seed) not in missing:
            all_rows += read_rows(out / "runs" / f"{run_id(method, rank, seed)}.csv")
    _write_rows(out / "rounds.csv", all_rows, ROUND_FIELDS)
    return all_rows


def _progress(bar: tqdm[Any], rid: str, row: RoundRow) -> None:
    bar.update(1)
    bar.set_postfix(acc=f"{row.test_accuracy:.3f}")
    if bar.disable:  # no terminal (a background sweep): one line per round instead of the bar
        print(f"{rid} round {row.round}: acc {row.test_accuracy:.4f}, uplink {row.cum_bytes_up:,} B", flush=True)


def _plain(row: RoundRow) -> dict[str, Any]:
    d = dataclasses.asdict(row)
    d.pop("extra", None)
    return d


Curves = dict[tuple[str, int], dict[int, list[tuple[float, float]]]]


def _curves(rows: Sequence[Mapping[str, Any]], *, total: bool = False) -> Curves:
    """(method, rank) -> round -> [(cumulative uplink (or up + down) bytes, test accuracy)] over seeds."""
    curves: Curves = {}
    for r in rows:
        key = (str(r["method"]), int(r["rank"]))
        sent = float(r["cum_bytes_up"]) + (float(r["cum_bytes_down"]) if total else 0.0)
        curves.setdefault(key, {}).setdefault(int(r["round"]), []).append((sent, float(r["test_accuracy"])))
    return curves


def _save(fig: Any, ax: Any, path: Path, labels: tuple[str, str, str], *, log_x: bool, legend: dict[str, Any]) -> Path:
    """Label, grid, legend and write one figure; returns its path."""
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(labels[2])
    ax.grid(alpha=0.3)
    ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return path


def plot(rows: Sequence[Mapping[str, Any]], summary: Sequence[Mapping[str, Any]], out: Path) -> list[Path]:
    """Accuracy vs cumulative uplink bytes, final accuracy vs budget, accuracy vs round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({str(r["method"]) for r in rows})
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    colors = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
    curves = _curves(rows)
    ranks = sorted({k[1] for k in curves if k[1] > 0}) or [0]
    markers = dict(zip(ranks, "os^Dvx*"))
    paths: list[Path] = []

    def bytes_figure(keep: set[int] | None, path: Path, title: str, *, total: bool = False) -> None:
        fig, ax = plt.subplots(figsize=(8, 5))
        for (method, rank), by_round in sorted((_curves(rows, total=True) if total else curves).items()):
            if keep is not None and rank not in keep:
                continue
            pts = [
                (statistics.mean(b for b, _ in v), statistics.mean(a for _, a in v))
                for _, v in sorted(by_round.items())
            ]
            pts = [p for p in pts if p[0] > 0]
            if not pts:
                continue
            label = method if rank == 0 else f"{method} r={rank}"
            ax.plot(*zip(*pts), marker=markers.get(rank, "."), ms=3, lw=1.2, color=colors[method], label=label)
        what = "uplink + downlink" if total else "uplink"
        labels = (f"cumulative {what} bytes (Flower messages, all clients)", "central test accuracy", title)
        paths.append(_save(fig, ax, path, labels, log_x=True, legend={"fontsize": 6, "ncol": 2}))
        plt.close(fig)

    bytes_figure(None, out / "accuracy_vs_bytes.png", "Accuracy vs uplink bytes")
    bytes_figure(None, out / "accuracy_vs_total_bytes.png", "Accuracy vs total bytes (both directions)", total=True)
    if len(ranks) > 1:  # the full figure is crowded: one per rank, with the rank-free methods
        for rank in ranks:
            bytes_figure({0, rank}, out / f"accuracy_vs_bytes_r{rank}.png", f"Accuracy vs uplink bytes (rank {rank})")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in methods:
        pts = sorted((s["uplink_bytes"], s["final_accuracy"]) for s in summary if s["method"] == method)
        ax.plot(*zip(*pts), marker="o", color=colors[method], label=method)
    labels = ("total uplink bytes", "final test accuracy", "Final accuracy vs budget")
    paths.append(_save(fig, ax, out / "final_accuracy_vs_budget.png", labels, log_x=True, legend={"fontsize": 7}))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    low = min(ranks)
    for (method, rank), by_round in sorted(curves.items()):
        if rank not in (0, low):
            continue
        xs = sorted(by_round)
        label = method if rank == 0 else f"{method} r={rank}"
        ax.plot(
            xs, [statistics.mean(a for _, a in by_round[x]) for x in xs], marker=".", color=colors[method], label=label
        )
    labels = ("round", "central test accuracy", f"Accuracy vs round (rank {low})")
    paths.append(_save(fig, ax, out / "accuracy_vs_round.png", labels, log_x=False, legend={"fontsize": 7}))
    plt.close(fig)
    return paths


def _csv_list(text: str, cast: type) -> tuple[Any, ...]:
    return tuple(cast(x) for x in text.split(",") if x.strip())


def parse_args(argv: Sequence[str] | None = None) -> tuple[SweepConfig, Path]:
    """CLI: a preset plus overrides."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    ap.add_argument("--out", default="", help="results folder (default results/<preset>)")
    ap.add_argument("--methods", default="", help=f"comma list of {', '.join(METHOD_SPECS)}")
    ap.add_argument("--ranks", default="")
    ap.add_argument("--seeds", default="")
    ap.add_argument("--rounds", type=int, default=0)
    ap.add_argument("--threads", type=int, default=-1)
    ap.add_argument("--value-dtype", default="", choices=["", *get_args(ValueDType)])
    ap.add_argument("--shard", default="", metavar="I/N", help="run only runs I mod N (N processes side by side)")
    ap.add_argument("--fraction-train", type=float, default=0.0, help="share of clients per round (partial)")
    ap.add_argument("--task", action="append", default=[], metavar="KEY=VALUE", help="TextTaskConfig override")
    ap.add_argument(
        "--compression", action="append", default=[], metavar="KEY=VALUE", help="CompressionConfig override"
    )
    ap.add_argument(
        "--downlink",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="compress the broadcast too: CompressionConfig of the downlink (e.g. method=osd rank=4)",
    )
    args = ap.parse_args(argv)
    cfg = PRESETS[args.preset]
    changes: dict[str, Any] = {}
    if args.methods:
        changes["methods"] = _csv_list(args.methods, str)
    if args.ranks:
        changes["ranks"] = _csv_list(args.ranks, int)
    if args.seeds:
        changes["seeds"] = _csv_list(args.seeds, int)
    if args.rounds:
        changes["rounds"] = args.rounds
    if args.threads >= 0:
        changes["threads"] = args.threads
    if args.value_dtype:
        changes["value_dtype"] = args.value_dtype
    if args.fraction_train:
        changes["fraction_train"] = args.fraction_train
    if args.shard:
        i, _, n = args.shard.partition("/")
        if not (i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
            raise SystemExit(f"--shard {args.shard!r}: expected I/N with 0 <= I < N, e.g. 0/2")
        changes["shard"] = (int(i), int(n))
    for name, items in (("task", args.task), ("compression", args.compression), ("downlink", args.downlink)):
        if items:
            merged = dict(getattr(cfg, name))
            for item in items:
                key, _, value = item.partition("=")
                merged[key.replace("-", "_")] = value
            changes[name] = merged
    cfg = dataclasses.replace(cfg, **changes)
    out = Path(args.out or f"results/{cfg.name}")
    return cfg, out


def main(argv: Sequence[str] | None = None) -> int:
    """Run a sweep, print the summary table, write CSV/markdown/plots."""
    cfg, out = parse_args(argv)
    start = time.perf_counter()
    rows = run_sweep(cfg, out)
    summary = summarize(rows)
    _write_rows(out / "summary.csv", summary, list(summary[0]))
    header = (
        f"Sweep `{cfg.name}`: {cfg.rounds} rounds, seeds {list(cfg.seeds)}, task {dict(cfg.task)}"
        + (f", compression {dict(cfg.compression)}" if cfg.compression else "")
        + (f", {cfg.fraction_train:.0%} of clients per round" if cfg.fraction_train < 1 else "")
    )
    md = summary_markdown(summary, header)
    (out / "summary.md").write_text(md)
    paths = plot(rows, summary, out)
    print()
    print(md)
    print(f"wrote {out / 'rounds.csv'}, {out / 'summary.csv'}, {out / 'summary.md'}")
    for p in paths:
        print(f"wrote {p}")
    print(f"sweep took {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
