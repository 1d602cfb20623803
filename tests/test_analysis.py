"""The comparison numbers of a sweep: paired intervals, bytes to target, accuracy at equal bytes, run order."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest

from simulations.analysis import (
    Curve,
    accuracy_at_bytes,
    bytes_to_target,
    compare,
    paired_interval,
    summarize,
    summary_markdown,
    t_quantile_975,
)
from simulations.compare import compare_table, load_runs
from simulations.compare import main as compare_main
from simulations.presets import PRESETS, RANK_FREE
from simulations.sweep import parse_args, plan


def _rows(method: str, rank: int, seed: int, per_round: float, accs: list[float]) -> list[dict[str, Any]]:
    rows = [{"method": method, "rank": rank, "seed": seed, "round": 0, "cum_bytes_up": 0, "test_accuracy": 0.5}]
    for k, acc in enumerate(accs, start=1):
        rows.append(
            {
                "method": method,
                "rank": rank,
                "seed": seed,
                "round": k,
                "cum_bytes_up": per_round * k,
                "cum_bytes_down": 10 * k,
                "test_accuracy": acc,
                "compress_s": 0.0,
            }
        )
    return rows


def test_t_quantiles_and_paired_interval() -> None:
    assert t_quantile_975(2) == pytest.approx(4.303)
    assert t_quantile_975(100) == pytest.approx(1.96)
    assert math.isnan(t_quantile_975(0))
    mean, half = paired_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3))
    mean, half = paired_interval([0.5])
    assert mean == 0.5 and math.isnan(half)


def test_accuracy_at_bytes_is_a_step_curve_and_target_is_first_crossing() -> None:
    curve = Curve(bytes_up=(10.0, 20.0, 30.0), accuracy=(0.6, 0.8, 0.7))
    assert math.isnan(accuracy_at_bytes(curve, 9.0))  # nothing sent yet: no credit
    assert accuracy_at_bytes(curve, 19.9) == 0.6  # not the later round's accuracy
    assert accuracy_at_bytes(curve, 20.0) == 0.8
    assert accuracy_at_bytes(curve, 1e9) == 0.7
    assert bytes_to_target(curve, 0.75) == 20.0
    assert bytes_to_target(curve, 0.9) == math.inf
    assert curve.last_mean(2) == pytest.approx(0.75)


def _sweep_rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for seed, shift in ((0, 0.0), (1, 0.025)):
        rows += _rows("dense", 0, seed, 1000.0, [0.70 + shift, 0.80 + shift, 0.82 + shift, 0.84 + shift])
        rows += _rows("truncsvd", 1, seed, 10.0, [0.60 + shift, 0.65 + shift, 0.75 + shift, 0.81 + shift])
        # OSD sends slightly more per round, so at TruncSVD's bytes it is credited with its previous round
        rows += _rows("osd", 1, seed, 10.5, [0.70 + shift, 0.78 + shift, 0.80 + shift, 0.815 + shift])
    return rows


def test_compare_pairs_by_seed_at_equal_bytes() -> None:
    stats = compare(_sweep_rows(), last_k=2)
    # target: the mean of dense's last-2 means (0.83 and 0.855) minus 2 points; every accuracy
    # compared with it is at least 0.0025 away, far above float rounding
    assert stats[("dense", 0)]["target"] == pytest.approx(0.8225)
    osd, trunc = stats[("osd", 1)], stats[("truncsvd", 1)]
    # seed 0 never gets there (0.81, 0.815); seed 1 does at its 4th (TruncSVD) and 3rd (OSD) round
    assert trunc["reached"] == 1 and osd["reached"] == 1
    assert trunc["bytes_to_target"] == math.inf  # the median of (inf, 40): half of the seeds never reached it
    # last-2: +2.75 points in both seeds, so no spread
    assert osd["vs_ref_last"] == pytest.approx(2.75) and osd["vs_ref_last_ci"] == pytest.approx(0.0, abs=1e-9)
    # TruncSVD's round 1 (10 B): OSD has sent nothing yet (10.5 B), no point; round 2 (20 B): OSD's
    # round 1, +5 points; round 3 (30 B): OSD's round 2, +3; round 4: OSD's round 3, -1
    assert osd["vs_ref_bytes"] == pytest.approx(5.0) and osd["vs_ref_bytes_round"] == 2
    assert math.isnan(trunc["vs_ref_bytes"])


def test_summary_table_says_not_reached_and_shows_intervals() -> None:
    summary = summarize(_sweep_rows(), last_k=2)
    md = summary_markdown(summary, "header", last_k=2)
    assert md.startswith("header\n")
    osd = next(s for s in summary if s["method"] == "osd")
    assert osd["vs_truncsvd_points"] == pytest.approx(0.5)  # final round: +0.5 in both seeds
    assert "| osd | 1 | 82.00 | +2.75 ± 0.00 | 1/2 | not reached | +5.00 ± 0.00 (round 2) |" in md
    assert "| truncsvd | 1 | 79.25 | - | 1/2 | not reached | - |" in md


def test_plan_puts_rank_free_first_then_rank_by_rank_and_shards_split_it() -> None:
    cfg = PRESETS["fullmodel"]
    runs = plan(cfg)
    n_free = sum(m in RANK_FREE for m in cfg.methods) * len(cfg.seeds)
    assert all(rank == 0 for _, rank, _ in runs[:n_free])
    ranks = [rank for _, rank, _ in runs[n_free:]]
    assert ranks == sorted(ranks) and set(ranks) == set(cfg.ranks)
    per_seed = sum(len(cfg.method_ranks.get(m, cfg.ranks)) for m in cfg.methods if m not in RANK_FREE)
    assert len(runs) == len(set(runs)) == n_free + per_seed * len(cfg.seeds) == 105
    shards = [dataclasses.replace(cfg, shard=(i, 2)) for i in range(2)]
    parts = [[r for k, r in enumerate(runs) if k % 2 == s.shard[0]] for s in shards]
    assert sorted(parts[0] + parts[1]) == sorted(runs) and not set(parts[0]) & set(parts[1])
    parsed, _ = parse_args(["--preset", "fullmodel", "--shard", "1/2", "--compression", "relax=2"])
    assert parsed.shard == (1, 2) and parsed.compression == {"min_numel": 0, "relax": "2"}
    with pytest.raises(SystemExit):
        parse_args(["--preset", "fullmodel", "--shard", "2/2"])


def _write_runs(folder: Path, rows: list[dict[str, Any]]) -> None:
    (folder / "runs").mkdir(parents=True)
    fields = ["method", "rank", "seed", "round", "cum_bytes_up", "cum_bytes_down", "test_accuracy", "compress_s"]
    for r in rows:
        r.setdefault("cum_bytes_down", 0)
        r["compress_s"] = {"osd": 0.2, "truncsvd": 0.1}.get(r["method"], 0.0) if r["round"] else 0.0
    for key in {(r["method"], r["rank"], r["seed"]) for r in rows}:
        with (folder / "runs" / "{}_r{}_s{}.csv".format(*key)).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(r for r in rows if (r["method"], r["rank"], r["seed"]) == key)


def test_compare_command_pairs_against_any_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_runs(tmp_path, _sweep_rows())
    assert compare_main([str(tmp_path), "--reference", "osd", "--last-k", "2"]) == 0
    out = capsys.readouterr().out
    # the mirror of test_compare_pairs_by_seed_at_equal_bytes: TruncSVD is 2.75 points behind OSD in
    # both seeds, sends 10/10.5 of its bytes and takes half its compression time
    assert "| truncsvd | 1 | 2 | 79.25 | -2.75 ± 0.00 |" in out
    assert "| 0.952 | 0.50 |" in out
    assert "| osd | 1 |" not in out and "| dense |" not in out  # the reference and rank-free runs
    assert compare_table(load_runs(tmp_path), "truncsvd", ["osd"], last_k=2).count("| osd | 1 | 2 | 82.00 | +2.75") == 1
    # a rank-free reference (dense, rank 0) is paired with every rank: TruncSVD's last-2 is 5 points
    # below dense's in both seeds, at 10/1000 of its bytes
    assert compare_main([str(tmp_path), "--reference", "dense", "--last-k", "2"]) == 0
    assert "| truncsvd | 1 | 2 | 79.25 | -5.00 ± 0.00 | +11.00 ± 0.00 (round 1) | 0.010 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="osd-int8 not in"):
        compare_main([str(tmp_path), "--reference", "osd", "--methods", "osd-int8"])
    with pytest.raises(SystemExit, match="no run CSVs"):
        compare_main([str(tmp_path / "nothing")])
