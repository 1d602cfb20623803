"""strategies.metering: exact message sizes, the metered Grid proxy, CSV output."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid

from strategies.local_grid import LocalGrid, train_message
from strategies.metering import ByteMeter, MessageSize, MeteredGrid, message_size


def _size(msg: Message) -> int:
    return int(message_to_proto(msg).ByteSize())


def _array_bytes(msg: Message) -> int:
    if not msg.has_content():
        return 0
    return sum(len(a.data) for rec in msg.content.array_records.values() for a in rec.values())


def _content(n: int) -> RecordDict:
    rng = np.random.default_rng(n)
    return RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(rng.standard_normal((n, 3)).astype(np.float32))}),
            "config": ConfigRecord({"lr": 0.1, "osd.method": "osd", "server-round": 3}),
        }
    )


def test_message_size_is_message_to_proto_bytesize() -> None:
    ins = train_message(_content(50), dst_node_id=12345678901234)
    reply = Message(RecordDict({"metrics": MetricRecord({"num-examples": 3, "acc": [0.1, 0.2]})}), reply_to=ins)
    error = Message(Error(code=2, reason="boom" * 10), reply_to=ins)
    empty = train_message(RecordDict(), dst_node_id=1)
    big = train_message(_content(200_000), dst_node_id=3)  # 2.4 MB: several varint bytes of length prefix
    for msg in (ins, reply, error, empty, big):
        size = message_size(msg)
        assert size.message_bytes == _size(msg)
        assert size.payload_bytes == _array_bytes(msg)


def test_message_size_cache_shares_content_exactly() -> None:
    content = _content(1000)
    msgs = [train_message(content, dst_node_id=node) for node in (1, 300, 2**40, 2**62)]
    cache: dict[int, MessageSize] = {}
    sizes = [message_size(m, cache) for m in msgs]
    assert len(cache) == 1
    assert [s.message_bytes for s in sizes] == [_size(m) for m in msgs]
    assert len({s.message_bytes for s in sizes}) > 1  # node ids of different varint lengths


def _echo_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = next(iter(msg.content.array_records.values()))
        metrics = MetricRecord({"num-examples": 10 + context.node_id % 7})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        if context.node_config["partition-id"] == 1:
            raise RuntimeError("evaluation broke on this node")
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 5})}), reply_to=msg)

    return app


class SpyGrid(LocalGrid):
    """Keeps every message object that went out and came back, to size them independently."""

    def __init__(self, app: ClientApp, nodes: int) -> None:
        super().__init__(app, nodes)
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


def _broadcast(grid: Grid, content: RecordDict, message_type: str) -> list[Message]:
    return [Message(content, node, message_type) for node in grid.get_node_ids()]


def test_metered_grid_counts_every_message_both_ways(tmp_path: Path) -> None:
    spy = SpyGrid(_echo_app(), nodes=3)
    meter = ByteMeter()
    grid = MeteredGrid(spy, meter)
    meter.begin_round(1)
    train_replies = list(grid.send_and_receive(_broadcast(grid, _content(40), MessageType.TRAIN)))
    eval_replies = list(grid.send_and_receive(_broadcast(grid, _content(40), MessageType.EVALUATE)))
    meter.begin_round(2)
    ids = grid.push_messages(_broadcast(grid, _content(80), MessageType.TRAIN))
    pulled = list(grid.pull_messages(ids))

    assert len(train_replies) == len(eval_replies) == len(pulled) == 3
    assert sum(m.has_error() for m in eval_replies) == 1  # error replies are metered too
    totals = meter.totals()
    assert totals["bytes-down"] == sum(_size(m) for m in spy.sent)
    assert totals["bytes-up"] == sum(_size(m) for m in spy.received)
    assert totals["payload-bytes-down"] == sum(_array_bytes(m) for m in spy.sent)
    assert totals["payload-bytes-up"] == sum(_array_bytes(m) for m in spy.received)
    assert totals["messages-down"] == totals["messages-up"] == 9
    assert totals["bytes-down"] > totals["payload-bytes-down"] > 0

    # Per round and phase.
    r1_train = meter.totals(1, "train")
    assert r1_train["messages-down"] == 3
    assert r1_train["bytes-up"] == sum(_size(m) for m in train_replies)
    assert meter.totals(1, "evaluate")["payload-bytes-up"] == 0
    assert meter.totals(2)["bytes-down"] == sum(_size(m) for m in spy.sent[6:])
    assert sum(meter.totals(r)["bytes-up"] for r in (1, 2)) == totals["bytes-up"]

    # Per node, written to CSV.
    path = meter.to_csv(tmp_path / "sub" / "traffic.csv")
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 3 * 2 + 3 * 2  # round 1: 2 phases x 3 nodes x 2 directions; round 2: train only
    nodes = {int(r["node_id"]) for r in rows}
    assert nodes == set(spy.get_node_ids())
    up_node = [r for r in rows if r["round"] == "2" and r["direction"] == "up"]
    for row in up_node:
        reply = next(m for m in pulled if m.metadata.src_node_id == int(row["node_id"]))
        assert int(row["message_bytes"]) == _size(reply)
        assert int(row["messages"]) == 1


def test_metered_grid_forwards_everything_else() -> None:
    spy = SpyGrid(_echo_app(), nodes=2)
    grid = MeteredGrid(spy, ByteMeter())
    assert grid.wrapped is spy
    assert list(grid.get_node_ids()) == list(spy.get_node_ids())
    assert grid.run.run_id == spy.run.run_id
    assert grid.contexts is spy.contexts  # attribute of the wrapped grid
