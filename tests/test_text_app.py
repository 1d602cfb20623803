"""The registered Flower app runs the text task: settings from run_config keys, clients and server wired."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context

from osd_fl import CompressionConfig, ConfigError, payload_budget
from simulations import client_app
from simulations.app_config import AppSettings, text_config_from_run_config
from simulations.text_fl import _node_task_config, get_task, run_text_server
from strategies.local_grid import LocalGrid, make_context

RUN_CONFIG = {
    "text.mode": "full",
    "text.frozen-layers": 0,
    "text.max-examples": 160,
    "text.test-size": 40,
    "text.max-len": 24,
    "text.local-steps": 1,
    "text.batch-size": 8,
}


def test_flwr_app_runs_the_text_task_with_compressed_uploads(tmp_path: Path) -> None:
    nodes = 2
    grid = LocalGrid(client_app.app, nodes, run_config=RUN_CONFIG)
    settings = AppSettings(num_server_rounds=1, min_nodes=nodes, results_dir=str(tmp_path))
    task_config = text_config_from_run_config(RUN_CONFIG)
    compression = CompressionConfig(method="osd", rank=1)
    result, strategy = run_text_server(grid, settings, task_config, compression)

    summary = json.loads((tmp_path / "result.json").read_text())
    assert summary["settings"]["text"]["mode"] == "full"
    assert sorted(int(r) for r in summary["central"]) == [0, 1]
    for r in ("1",):
        train = summary["train"][r]
        assert (train["accepted"], train["rejected"], train["failed"]) == (nodes, 0, 0)
        assert summary["evaluate"][r]["eval-accuracy"] >= 0.0  # the clients' evaluate ran on the text model
    # every reply is a rank-1 OSD payload of the whole text model, inside its budget
    model = get_task(task_config.replace(num_clients=nodes)).new_model()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    budget = payload_budget(shapes, compression)
    dense = sum(v.numel() * 4 for v in model.state_dict().values())
    up_train = summary["train"]["1"]["bytes-up"]
    assert up_train <= nodes * (budget + 4096)  # payload plus Flower's message framing
    assert up_train < nodes * dense / 50
    assert strategy.rejections == []
    assert 0.0 <= float(result.evaluate_metrics_serverapp[1]["test-accuracy"]) <= 1.0  # type: ignore[arg-type]


def test_node_config_sets_the_partition_and_a_bad_one_says_what_to_do() -> None:
    cfg = text_config_from_run_config(RUN_CONFIG)
    got, pid = _node_task_config(cfg, make_context(1, node_config={"partition-id": 2, "num-partitions": 3}))
    assert (got.num_clients, pid) == (3, 2)
    ctx: Context = make_context(1, node_config={"partition-id": 5, "num-partitions": 3})
    with pytest.raises(ValueError, match=r"partition-id=5 is outside 0\.\.2"):
        _node_task_config(cfg, ctx)


def test_text_keys_are_checked_strictly() -> None:
    with pytest.raises(ConfigError, match=r"max.lne"):
        text_config_from_run_config({"text.max-lne": 3})
