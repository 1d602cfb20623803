"""A federated run in which about 30% of the clients misbehave every round.

The digits task (``simulations.digits_*``: the real train function with its
importance maps, OSD-compressed by ``osd_mod``) runs on ``LocalGrid`` with 10
nodes for 4 rounds. Each round 3 nodes misbehave, each in one of three ways:

* garbage: a reply that fails validation (random bytes, a flipped bit, an
  edited header with a recomputed CRC, NaN values with a recomputed CRC, a
  10**12-element size bomb, a payload for another model's shapes, plain
  uncompressed weights, a 1e30 ``num-examples``);
* raise: the ClientApp crashes (Flower turns that into an error reply);
* silence: the node trains but its reply never arrives (a timeout).

The test asserts that the run completes, that each round's counts are right,
and that each round's new global model equals the weighted FedAvg of the
honest clients' updates, decoded independently here with
``osd_fl.decompress`` from the payloads the honest clients produced.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from clients import osd_mod
from osd_fl import CompressionConfig, compress, decompress
from osd_fl.payload import Kind
from osd_fl.records import (
    PAYLOAD_RECORD_KEY,
    payload_to_record,
    record_to_payload,
    record_to_tensors,
    tensors_to_record,
)
from simulations import digits_client
from simulations.digits_task import build_model
from strategies import OSDStrategy
from strategies.local_grid import LocalGrid
from tests.test_security_fuzz_decoder import raw_payload, raw_record, walk, with_crc

NODES, ROUNDS = 10, 4
NODE_IDS = [1001 + i for i in range(NODES)]
COMPRESSION = CompressionConfig(method="osd", rank=1, importance="grad")
GARBAGE = [
    "random bytes",
    "bit flip",
    "forged header",
    "nan values",
    "size bomb",
    "other model",
    "plain weights",
    "huge weight",
]


#: Per round, the behaviours of its 3 misbehaving nodes (30% of 10): all three kinds in round 1, and
#: enough garbage senders overall to use every garbage kind once.
BEHAVIOURS = {
    1: ["garbage", "raise", "silent"],
    2: ["garbage", "garbage", "silent"],
    3: ["garbage", "garbage", "raise"],
    4: ["garbage", "garbage", "garbage"],
}


def _plan() -> dict[int, dict[int, str]]:
    """round -> {partition-id: behaviour} for the 3 misbehaving nodes (the rest are honest)."""
    rng = np.random.default_rng(2024)
    garbage = iter(GARBAGE)
    plan: dict[int, dict[int, str]] = {}
    for r in range(1, ROUNDS + 1):
        bad = rng.choice(NODES, size=3, replace=False)
        plan[r] = {
            int(p): (f"garbage: {next(garbage)}" if k == "garbage" else k)
            for p, k in zip(bad, BEHAVIOURS[r], strict=True)
        }
    return plan


PLAN = _plan()


def _garble(kind: str, reply: Message, msg: Message, context: Context) -> Message:
    content = reply.content
    blob = record_to_payload(content[PAYLOAD_RECORD_KEY])
    rng = np.random.default_rng(len(blob))
    if kind == "random bytes":
        bad = rng.integers(0, 256, size=len(blob), dtype=np.uint8).tobytes()
    elif kind == "bit flip":
        flipped = bytearray(blob)
        flipped[len(flipped) // 3] ^= 0x10
        bad = bytes(flipped)
    elif kind == "forged header":
        dim = next(f for f in walk(blob) if f.role == "dim")
        body = bytearray(blob[:-4])
        body[dim.offset : dim.offset + 4] = struct.pack("<I", 7)
        bad = with_crc(bytes(body))
    elif kind == "nan values":
        # float32 values, or the float32 block scales of int8 values (OSD's default)
        values = next(f for f in walk(blob) if f.role in ("values", "scales") and f.value_bytes == 4)
        body = bytearray(blob[:-4])
        body[values.offset : values.offset + 4] = struct.pack("<f", float("nan"))
        bad = with_crc(bytes(body))
    elif kind == "size bomb":
        bad = raw_payload([raw_record(b"0.weight", Kind.DENSE, (10**6, 10**6), b"\x00" * 64)], method=b"osd")
    elif kind == "other model":
        other = {k: 0.01 * torch.ones(tuple(reversed(v.shape))) for k, v in build_model(seed=0).state_dict().items()}
        bad = compress(other, config=COMPRESSION.replace(importance="ones"))
    elif kind == "plain weights":
        return digits_client.train(msg, context)  # forgot the mod: dense weights, no payload
    else:
        assert kind == "huge weight"
        content.metric_records["metrics"]["num-examples"] = 1e30
        return reply
    content[PAYLOAD_RECORD_KEY] = payload_to_record(bad)
    return reply


class _LossyGrid(LocalGrid):
    """LocalGrid whose replies from the nodes in ``silent`` are lost (the server times out on them)."""

    def __init__(self, app: ClientApp, nodes: int) -> None:
        super().__init__(app, nodes)
        self.silent: set[int] = set()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = [
            r for r in super().send_and_receive(messages, timeout=timeout) if r.metadata.src_node_id not in self.silent
        ]
        self.silent.clear()
        return replies


def test_run_completes_and_each_round_is_fedavg_of_the_honest_clients() -> None:
    honest: dict[int, list[tuple[bytes, float]]] = {r: [] for r in range(1, ROUNDS + 1)}
    app = ClientApp()
    grid = _LossyGrid(app, NODES)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        server_round = int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
        behaviour = PLAN[server_round].get(int(context.node_config["partition-id"]), "honest")
        if behaviour == "raise":
            raise RuntimeError("client crashed mid-round")
        reply = osd_mod(msg, context, digits_client.train)
        assert not reply.has_error()
        if behaviour == "silent":
            grid.silent.add(context.node_id)
        elif behaviour.startswith("garbage: "):
            reply = _garble(behaviour.removeprefix("garbage: "), reply, msg, context)
        else:
            weight = float(reply.content.metric_records["metrics"]["num-examples"])  # type: ignore[arg-type]
            honest[server_round].append((record_to_payload(reply.content[PAYLOAD_RECORD_KEY]), weight))
        return reply

    models: list[dict[str, torch.Tensor]] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        models.append(record_to_tensors(arrays))
        return MetricRecord({})

    strategy = OSDStrategy(
        FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=NODES, min_train_nodes=NODES),
        config=COMPRESSION,
    )
    initial = build_model(seed=0).state_dict()
    result = strategy.start(
        grid=grid, initial_arrays=tensors_to_record(initial), num_rounds=ROUNDS, evaluate_fn=evaluate_fn
    )

    # The run completed: every round reported, the model evaluated after each.
    assert sorted(result.train_metrics_clientapp) == list(range(1, ROUNDS + 1))
    assert len(models) == ROUNDS + 1
    expected_model = {k: v.shape for k, v in initial.items()}
    used_garbage = set()
    for r in range(1, ROUNDS + 1):
        kinds = list(PLAN[r].values())
        garbage = sum(k.startswith("garbage") for k in kinds)
        used_garbage |= {k for k in kinds if k.startswith("garbage")}
        silent = kinds.count("silent")
        m = result.train_metrics_clientapp[r]
        assert (m["accepted"], m["rejected"], m["failed"], m["no-reply"]) == (
            NODES - len(kinds),
            garbage,
            kinds.count("raise") + silent,
            silent,
        )
        assert len(honest[r]) == NODES - len(kinds)
        # Reference: weighted FedAvg of the honest clients' decoded updates, on the previous model.
        base = models[r - 1]
        total = sum(w for _, w in honest[r])
        decoded = [
            (decompress(b, expected={k: (s, torch.float32) for k, s in expected_model.items()}), w)
            for b, w in honest[r]
        ]
        for name, w0 in base.items():
            want = (w0.double() + sum(w * u[name].double() for u, w in decoded) / total).float()
            torch.testing.assert_close(models[r][name], want, atol=1e-6, rtol=0)
        assert not torch.equal(models[r]["0.weight"], base["0.weight"])  # a real step every round
    assert len(used_garbage) == len(GARBAGE)
    per_round = [
        sum(1 for x in strategy.rejections + strategy.missing if x.server_round == r) for r in range(1, ROUNDS + 1)
    ]
    assert per_round == [3] * ROUNDS
    assert all(x.reason for x in strategy.rejections)
