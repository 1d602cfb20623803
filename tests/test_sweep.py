"""The sweep runs end to end on a tiny preset, writes its outputs, and resumes without redoing runs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from simulations.sweep import PRESETS, main, plan, run_id


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_quick_sweep_writes_results_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "quick"
    assert main(["--preset", "quick", "--out", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| osd | 1 |" in printed and "| dense | - |" in printed
    for name in (
        "rounds.csv",
        "summary.csv",
        "summary.md",
        "accuracy_vs_bytes.png",
        "final_accuracy_vs_budget.png",
        "accuracy_vs_round.png",
    ):
        assert (out / name).stat().st_size > 0, name
    rows = _rows(out / "rounds.csv")
    runs = plan(PRESETS["quick"])
    assert {r["run"] for r in rows} == {run_id(*r) for r in runs}
    by_run: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_run.setdefault(r["run"], []).append(r)
    for rs in by_run.values():
        assert [int(r["round"]) for r in rs] == [0, 1, 2]
        # bytes are cumulative sums of the per-round metered bytes, both directions
        total = 0
        for r in rs:
            total += int(r["bytes_up"])
            assert int(r["cum_bytes_up"]) == total
        assert int(rs[-1]["bytes_down"]) > 0
    dense_up = int(by_run["dense_r0_s0"][-1]["cum_bytes_up"])
    osd_up = int(by_run["osd_r1_s0"][-1]["cum_bytes_up"])
    assert osd_up < 0.02 * dense_up  # rank-1 factors of a 384-wide layer: a tiny fraction of dense
    # resume: a second call finds every run done and redoes none
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.csv")}
    assert main(["--preset", "quick", "--out", str(out)]) == 0
    assert "3 already done" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.csv")} == mtimes


def test_same_seed_same_bytes_and_same_curve() -> None:
    """Two runs of one configuration give identical bytes and accuracy, round by round."""
    from osd_fl import CompressionConfig
    from simulations.text import TextTaskConfig
    from simulations.text_fl import run_text_fl

    task = TextTaskConfig(num_clients=3, max_examples=300, test_size=60, local_steps=2, cache_dir="", seed=1)
    comp = CompressionConfig(method="osd", rank=1, importance="grad", error_feedback=True)
    first = run_text_fl(task, comp, 2)
    second = run_text_fl(task, comp, 2)
    assert [(r.test_accuracy, r.test_loss, r.bytes_up, r.bytes_down) for r in first] == [
        (r.test_accuracy, r.test_loss, r.bytes_up, r.bytes_down) for r in second
    ]


def test_method_ranks_restrict_an_ablation_to_its_ranks() -> None:
    cfg = PRESETS["headline"]
    runs = plan(cfg)
    assert len(runs) == len(set(runs))
    grad_ranks = {rank for method, rank, _ in runs if method == "osd-grad"}
    osd_ranks = {rank for method, rank, _ in runs if method == "osd"}
    assert grad_ranks == set(cfg.method_ranks["osd-grad"]) == {1}
    assert osd_ranks == set(cfg.ranks) == {1, 2, 4, 8}
    assert {rank for method, rank, _ in runs if method == "dense"} == {0}
    assert {seed for *_, seed in runs} == set(cfg.seeds)


def test_downlink_methods_compress_the_broadcast_and_the_total_bytes_plot_is_written(tmp_path: Path) -> None:
    out = tmp_path / "down"
    args = ["--preset", "quick", "--out", str(out), "--threads", "1", "--rounds", "3"]
    assert main([*args, "--methods", "dense,osd,osd+down1,osd+down4-noef"]) == 0
    assert (out / "accuracy_vs_total_bytes.png").stat().st_size > 0
    final = {r["run"]: r for r in _rows(out / "rounds.csv") if r["round"] == "3"}
    dense_down = int(final["osd_r1_s0"]["cum_bytes_down"])
    compressed = int(final[run_id("osd+down1", 1, 0)]["cum_bytes_down"])
    # round 1 is a dense sync; rounds 2 and 3 go down as rank-1 broadcasts, a small share of the model
    assert compressed < 0.5 * dense_down
    # OSD's uplink leaves the downlink alone (the config records differ by the method names' length)
    assert abs(int(final["dense_r0_s0"]["cum_bytes_down"]) - dense_down) < 100
