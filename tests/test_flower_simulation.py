"""End to end: the digits apps in Flower's simulation engine and on the in-process grid."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid, ServerApp

from osd_fl import CompressionConfig
from osd_fl.records import PAYLOAD_RECORD_KEY, STATE_RESIDUAL_KEY, record_to_payload
from simulations.app_config import AppSettings
from simulations.digits_client import app as client_app
from simulations.digits_server import run_server
from strategies import ForwardingGrid
from strategies.local_grid import LocalGrid


class RecordingGrid(ForwardingGrid):
    """Keeps every message that crosses the real grid, to size them independently of the meter."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        batch = list(messages)
        self.sent.extend(batch)
        return super().push_messages(batch)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(super().pull_messages(message_ids))
        self.received.extend(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        batch = list(messages)
        self.sent.extend(batch)
        replies = list(super().send_and_receive(batch, timeout=timeout))
        self.received.extend(replies)
        return replies


def _size(msg: Message) -> int:
    return int(message_to_proto(msg).ByteSize())


def _check_run(captured: dict[str, Any], rounds: int, nodes: int) -> None:
    result, strategy, spy = captured["result"], captured["strategy"], captured["grid"]
    # Learning happened: central test accuracy of the global model rose.
    acc = {r: float(m["test-accuracy"]) for r, m in result.evaluate_metrics_serverapp.items()}
    assert sorted(acc) == list(range(rounds + 1))
    assert acc[rounds] > acc[0] + 0.3, acc

    # Every reply was compressed and accepted.
    assert strategy.rejections == []
    for r in range(1, rounds + 1):
        train = result.train_metrics_clientapp[r]
        assert (train["accepted"], train["rejected"], train["failed"]) == (nodes, 0, 0)
        assert train["osd-payload-bytes"] < train["osd-dense-bytes"] / 3

    # Metered bytes are exactly the serialized sizes of every message that crossed the grid.
    assert len(spy.sent) == len(spy.received) == 2 * rounds * nodes  # train + evaluate
    totals = strategy.meter.totals()
    assert totals["bytes-down"] == sum(_size(m) for m in spy.sent)
    assert totals["bytes-up"] == sum(_size(m) for m in spy.received)
    assert totals["messages-down"] == totals["messages-up"] == 2 * rounds * nodes
    # ... and the per-round metrics add up to them.
    per_round = [result.train_metrics_clientapp[r] for r in range(1, rounds + 1)]
    per_round += [result.evaluate_metrics_clientapp[r] for r in range(1, rounds + 1)]
    assert sum(int(m["bytes-up"]) for m in per_round) == totals["bytes-up"]
    assert sum(int(m["bytes-down"]) for m in per_round) == totals["bytes-down"]
    # The uplink payload share is the OSD payloads, byte for byte.
    payloads = [
        len(record_to_payload(m.content[PAYLOAD_RECORD_KEY]))
        for m in spy.received
        if m.has_content() and PAYLOAD_RECORD_KEY in m.content
    ]
    assert len(payloads) == rounds * nodes
    assert totals["payload-bytes-up"] == sum(payloads)


def test_local_grid_run_with_error_feedback_and_importance(tmp_path: Path) -> None:
    """Fast, in-process: 3 clients, 3 rounds, OSD with validation-gradient importance and EF."""
    rounds, nodes = 3, 3
    settings = AppSettings(num_server_rounds=rounds, results_dir=str(tmp_path), min_nodes=nodes)
    compression = CompressionConfig(method="osd", rank=1, importance="grad", error_feedback=True)
    local = LocalGrid(client_app, nodes)
    spy = RecordingGrid(local)
    result, strategy = run_server(spy, settings, compression)
    _check_run({"result": result, "strategy": strategy, "grid": spy}, rounds, nodes)
    # Error feedback: each node kept a residual across rounds and carried it in.
    assert all(STATE_RESIDUAL_KEY in ctx.state for ctx in local.contexts.values())
    assert result.train_metrics_clientapp[1]["osd-residual-in-norm"] == 0.0
    residual_in = result.train_metrics_clientapp[rounds]["osd-residual-in-norm"]
    assert isinstance(residual_in, float) and residual_in > 0.0

    # CSV and JSON outputs.
    with (tmp_path / "traffic.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == rounds * 2 * nodes * 2  # rounds x phases x nodes x directions
    assert sum(int(r["message_bytes"]) for r in rows) == sum(
        strategy.meter.totals()[k] for k in ("bytes-down", "bytes-up")
    )
    with (tmp_path / "rounds.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 2 * rounds
    summary = json.loads((tmp_path / "result.json").read_text())
    assert summary["traffic"] == strategy.meter.totals()
    assert summary["settings"]["compression"]["error_feedback"] is True


@pytest.mark.usefixtures("isolated_engine")  # Flower's simulation engine (Ray) sets env vars and loggers
def test_run_simulation_end_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's simulation engine (Ray): 2 SuperNodes, 2 rounds, the registered ClientApp."""
    from flwr.simulation import run_simulation

    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")

    rounds, nodes = 2, 2
    captured: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        spy = RecordingGrid(grid)
        settings = AppSettings(num_server_rounds=rounds, min_nodes=nodes)
        result, strategy = run_server(spy, settings, CompressionConfig(method="osd", rank=2))
        captured.update(result=result, strategy=strategy, grid=spy)

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=nodes,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    if "result" not in captured:
        pytest.fail("the ServerApp did not finish (see the log above)")
    _check_run(captured, rounds, nodes)


@pytest.mark.slow
@pytest.mark.usefixtures("isolated_engine")
def test_engine_bench_runs_a_sampled_federation_with_state_in_contexts(tmp_path: Path) -> None:
    """The thousand-client bench in small: 8 nodes, 3 sampled per round, downlink and error feedback on."""
    from simulations.bench import engine

    out = tmp_path / "engine.json"
    engine.main(["--nodes", "8", "--per-round", "3", "--rounds", "2", "--out", str(out)])
    run = json.loads(out.read_text())
    rows = run["rows"]
    assert [r["round"] for r in rows] == [1, 2]
    # each round trains 3 distinct nodes; the set of nodes holding state only grows, to at most 6
    assert rows[0]["nodes_with_state"] == 3
    assert 3 <= rows[1]["nodes_with_state"] <= 6
    for r in rows:
        assert 0 < r["server_s"] < r["wall_s"]
    traffic = run["info"]["traffic"]
    assert traffic["messages-up"] == 6 and traffic["messages-down"] == 6
    # held initial model + compressed broadcast: the downlink is far below 6 dense copies of the model
    assert traffic["bytes-down"] < 6 * run["info"]["model_bytes"] / 4
    assert run["info"]["rejections"] == 0
