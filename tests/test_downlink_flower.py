"""The compressed downlink through Flower's message loop: replicas, resyncs, refused broadcasts, real bytes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.serde import message_to_proto
from flwr.serverapp.strategy import FedAvg

from osd_fl import CompressionConfig
from osd_fl.downlink import model_digest
from osd_fl.records import (
    BROADCAST_RECORD_KEY,
    STATE_REPLICA_KEY,
    STATE_REPLICA_META_KEY,
    record_to_tensors,
    tensors_to_record,
)
from simulations.devices import torch_threads
from simulations.digits_client import app as client_app
from simulations.digits_task import build_model, evaluate
from simulations.digits_task import test_data as digits_test_data
from strategies import OSDStrategy
from strategies.downlink import Downlink
from strategies.local_grid import LocalGrid

NODES = 6


class FaultyGrid(LocalGrid):
    """LocalGrid that, once, wipes every node's context.state or corrupts one chain, from a given push on."""

    def __init__(self, *, wipe_at: int = 0, corrupt_at: int = 0) -> None:
        super().__init__(client_app, NODES)
        self.pushes = 0
        self.wipe_at, self.corrupt_at = wipe_at, corrupt_at
        self.down_bytes = 0
        self.corrupted: list[int] = []
        self.wiped = False

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        batch = list(messages)
        if batch:
            self.pushes += 1
        if self.wipe_at and self.pushes >= self.wipe_at and not self.wiped and batch:
            for ctx in self.contexts.values():  # every SuperNode restarted
                ctx.state = type(ctx.state)()
            self.wiped = True
        for msg in batch:
            due = self.corrupt_at and self.pushes >= self.corrupt_at and not self.corrupted
            if due and BROADCAST_RECORD_KEY in msg.content:
                record = msg.content.array_records[BROADCAST_RECORD_KEY]
                array = record[list(record.keys())[-1]]
                data = bytearray(array.data)
                data[len(data) // 2] ^= 0x10
                array.data = bytes(data)
                self.corrupted.append(int(msg.metadata.dst_node_id))
        ids = super().push_messages(batch)  # stamps the message ids, as a real grid does
        self.down_bytes += sum(int(message_to_proto(msg).ByteSize()) for msg in batch)
        return ids


def _run(
    grid: LocalGrid, *, downlink: CompressionConfig | Downlink | None, rounds: int = 8, **kwargs: Any
) -> OSDStrategy:
    loader = digits_test_data()
    accuracy: dict[int, float] = {}

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = build_model(seed=None)
        model.load_state_dict(record_to_tensors(arrays))
        _, acc, _ = evaluate(model, loader)
        accuracy[server_round] = acc
        return MetricRecord({"test-accuracy": acc})

    inner = FedAvg(fraction_train=0.5, fraction_evaluate=0.0, min_available_nodes=NODES, min_evaluate_nodes=0)
    strategy = OSDStrategy(inner, config=CompressionConfig(method="osd", rank=2), downlink=downlink, **kwargs)
    with torch_threads(1):
        strategy.start(
            grid=grid,
            initial_arrays=tensors_to_record(build_model(seed=0).state_dict()),
            num_rounds=rounds,
            train_config=ConfigRecord({"lr": 0.1, "local-epochs": 1}),
            evaluate_fn=central,
        )
    strategy.accuracy = accuracy  # type: ignore[attr-defined]
    return strategy


DOWN = CompressionConfig(method="osd", rank=4)


def test_replicas_match_the_public_model_and_the_downlink_shrinks() -> None:
    grid = FaultyGrid()
    strategy = _run(grid, downlink=DOWN)
    down = strategy.downlink
    assert down is not None and down.server is not None
    public = down.server.public
    current = 0
    for node, ctx in grid.contexts.items():
        meta = ctx.state.config_records.get(STATE_REPLICA_META_KEY)
        if meta is None:
            continue
        replica = record_to_tensors(ctx.state.array_records[STATE_REPLICA_KEY])
        assert model_digest(replica) == meta["digest"]  # every kept replica is the version it claims
        if down.held.get(node) == down.server.version:
            current += 1
            assert all(torch.equal(replica[k], public[k]) for k in public), node
    assert current >= 1
    assert down.counts.chains > 0 and down.counts.resyncs == 0
    dense = FaultyGrid()
    baseline = _run(dense, downlink=None)
    assert grid.down_bytes < 0.6 * dense.down_bytes  # first syncs are dense; every chain after is ~1% of it
    assert strategy.accuracy[8] > 0.6  # type: ignore[attr-defined]
    assert abs(strategy.accuracy[8] - baseline.accuracy[8]) < 0.1  # type: ignore[attr-defined]
    assert strategy.meter.totals()["bytes-down"] == grid.down_bytes  # the meter counts what was sent


def test_lost_state_and_a_corrupted_chain_make_nodes_resync_and_nothing_trains_on_a_wrong_model() -> None:
    grid = FaultyGrid(corrupt_at=3, wipe_at=7)
    strategy = _run(grid, downlink=DOWN, rounds=10)
    down = strategy.downlink
    assert down is not None
    assert len(grid.corrupted) == 1 and grid.wiped
    errors = [r for r in strategy.rejections if r.kind == "resync"]
    assert errors and all("resync" in r.reason for r in errors)
    assert not [r for r in strategy.rejections if r.kind == "error"]  # a resync request is not a failure
    train = [row for row in strategy.history if row.get("phase") == "train"]
    assert sum(row["failed"] for row in train) == 0 and sum(row["resyncs"] for row in train) == len(errors)
    assert any("digest" in r.reason or "malformed" in r.reason or "CRC" in r.reason for r in errors)
    assert any("no replica in context.state" in r.reason for r in errors)
    assert down.counts.resyncs == len(errors) >= 2
    # a node asks once: the server then sends it the dense model (never a second chain it cannot apply)
    assert down.counts.dense >= NODES + 1
    assert strategy.accuracy[10] > 0.6  # type: ignore[attr-defined]
    # only the round right after every SuperNode restarted can have no reply accepted (all ask for a resync)
    empty = [row for row in strategy.history if row.get("phase") == "train" and row["accepted"] == 0]
    assert len(empty) <= 1


def _held_app(seed: int) -> Any:
    from flwr.clientapp import ClientApp

    from clients import make_osd_mod
    from simulations import digits_client

    app = ClientApp(mods=[make_osd_mod(initial_model=lambda ctx: build_model(seed=seed).state_dict())])
    app.train()(digits_client.train)
    return app


def test_clients_that_hold_the_initial_model_skip_the_dense_first_download() -> None:

    held = FaultyGrid()
    held.client_app = _held_app(seed=0)  # the same initial weights as the server's
    strategy = _run(held, downlink=Downlink(DOWN, clients_hold_initial=True), rounds=4)
    down = strategy.downlink
    assert down is not None
    assert down.counts.dense == 0 and down.counts.resyncs == 0  # nobody downloaded the dense model
    plain = FaultyGrid()
    _run(plain, downlink=DOWN, rounds=4)
    assert held.down_bytes < 0.5 * plain.down_bytes
    # a node whose "initial model" differs (another seed) asks for a resync and gets the dense model
    wrong = FaultyGrid()
    wrong.client_app = _held_app(seed=1)
    strategy = _run(wrong, downlink=Downlink(DOWN, clients_hold_initial=True), rounds=4)
    assert strategy.downlink is not None and strategy.downlink.counts.resyncs >= 1
    resyncs = [r for r in strategy.rejections if r.kind == "resync"]
    assert resyncs and all("digest" in r.reason for r in resyncs)
    assert strategy.downlink.counts.dense >= 1


def test_the_registered_app_compresses_the_broadcast_from_its_run_config() -> None:
    """``downlink-method='osd' downlink-hold-initial=true``: train and evaluate go down as chains only."""
    from simulations import client_app as registered
    from simulations.app_config import AppSettings
    from simulations.digits_server import run_server

    run_config = {"task": "digits", "downlink-method": "osd", "downlink-hold-initial": True}
    grid = LocalGrid(registered.app, 3, run_config=run_config)
    settings = AppSettings.from_run_config({**run_config, "num-server-rounds": 3, "min-nodes": 3})
    result, strategy = run_server(grid, settings, CompressionConfig(method="osd", rank=2))
    down = strategy.downlink
    assert down is not None and down.config.rank == 4
    assert down.counts.dense == 0 and down.counts.resyncs == 0 and down.counts.chains == 2 * 3 * 3
    assert [r for r in strategy.rejections] == []
    acc = result.evaluate_metrics_serverapp
    assert float(acc[3]["test-accuracy"]) > float(acc[0]["test-accuracy"]) + 0.2  # type: ignore[arg-type]
