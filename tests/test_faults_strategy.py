"""Faults at the server: missing, failed and rejected replies, and the inner strategy's sampling rules.

Every test compares the strategy's new model with a reference computed
independently (``osd_fl.decompress`` and a float64 weighted average of the
replies that should count), so "the round aggregates the others exactly as if
the bad ones had never replied" is checked, not assumed.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAvg, Strategy

import osd_fl.codec
import strategies.replies as replies_module
from clients import osd_mod
from osd_fl import CompressionConfig, compress, decompress
from osd_fl.records import (
    PAYLOAD_RECORD_KEY,
    payload_to_record,
    record_to_payload,
    record_to_tensors,
    tensors_to_record,
)
from strategies import OSDStrategy
from strategies.local_grid import LocalGrid

SHAPES = {"fc1.weight": (32, 24), "fc1.bias": (32,), "fc2.weight": (5, 32)}
# float32 values (not OSD's default int8): the security tests hand-build hostile float32 payloads against it
CFG = CompressionConfig(method="osd", rank=2, min_numel=128, importance="ones", value_dtype="float32")


def state(seed: int, scale: float = 1.0, shapes: Mapping[str, tuple[int, ...]] = SHAPES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g) for k, s in shapes.items()}


GLOBAL = state(0)


def delta(i: int) -> dict[str, torch.Tensor]:
    return state(100 + i, 0.05)


def blob(i: int, config: CompressionConfig = CFG) -> bytes:
    return compress(delta(i), config=config)


def configure(strategy: Strategy, nodes: int, server_round: int = 1) -> list[Message]:
    grid = LocalGrid(ClientApp(), nodes)
    msgs = strategy.configure_train(server_round, tensors_to_record(GLOBAL), ConfigRecord(), grid)
    return sorted(msgs, key=lambda m: m.metadata.dst_node_id)


def payload_reply(ins: Message, payload: bytes, weight: float | int = 10) -> Message:
    content = RecordDict(
        {PAYLOAD_RECORD_KEY: payload_to_record(payload), "metrics": MetricRecord({"num-examples": weight})}
    )
    return Message(content, reply_to=ins)


def error_reply(ins: Message, reason: str = "client crashed") -> Message:
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=ins)


def reference(
    pairs: Iterable[tuple[bytes, float]], base: Mapping[str, torch.Tensor] = GLOBAL, server_lr: float = 1.0
) -> dict[str, torch.Tensor]:
    """``W + lr * sum_i n_i decode(b_i) / sum_i n_i`` in float64 (decoded by the library, not the strategy)."""
    items = [(decompress(b), float(w)) for b, w in pairs]
    total = sum(w for _, w in items)
    return {
        name: (w0.double() + server_lr * sum(w * u[name].double() for u, w in items) / total).to(w0.dtype)
        for name, w0 in base.items()
    }


def assert_model(record: ArrayRecord | None, want: Mapping[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert record is not None
    got = record_to_tensors(record)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=0)


def counts(metrics: MetricRecord | None) -> tuple[object, ...]:
    assert metrics is not None
    return metrics["accepted"], metrics["rejected"], metrics["failed"], metrics["no-reply"]


# --- missing, failed, rejected ---------------------------------------------------------------


def test_a_node_that_never_replies_is_counted_failed_and_the_others_aggregate(caplog: pytest.LogCaptureFixture) -> None:
    strategy = OSDStrategy(FedAvg(), config=CFG)
    msgs = configure(strategy, 4)
    replies = [payload_reply(msgs[0], blob(0), 10), payload_reply(msgs[2], blob(2), 30)]  # 1 and 3 time out
    with caplog.at_level(logging.WARNING, logger="flwr.osd.strategy"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert_model(arrays, reference([(blob(0), 10), (blob(2), 30)]))
    assert counts(metrics) == (2, 0, 2, 2)
    assert strategy.rejections == []
    silent = {msgs[1].metadata.dst_node_id, msgs[3].metadata.dst_node_id}
    assert {m.node_id for m in strategy.missing} == silent
    assert all(m.failed and m.kind == "no-reply" for m in strategy.missing)
    assert sum("sent no reply" in r.getMessage() for r in caplog.records) == 2


def test_garbage_error_crash_and_silence_in_one_round() -> None:
    strategy = OSDStrategy(FedAvg(), config=CFG)
    msgs = configure(strategy, 6)
    replies = [
        payload_reply(msgs[0], blob(0), 12),
        payload_reply(msgs[1], b"\x00garbage" * 9, 50),  # fails validation
        error_reply(msgs[2], "CUDA out of memory"),  # a Flower error reply
        Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node went away"), reply_to=msgs[3]),
        payload_reply(msgs[4], blob(4), 7),
        # msgs[5]: no reply at all (timeout)
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert_model(arrays, reference([(blob(0), 12), (blob(4), 7)]))
    assert counts(metrics) == (2, 1, 3, 1)
    kinds = sorted(r.kind for r in strategy.rejections + strategy.missing)
    assert kinds == ["error", "error", "invalid", "no-reply"]


def test_every_reply_rejected_or_missing_leaves_the_model_and_the_run_goes_on() -> None:
    strategy = OSDStrategy(FedAvg(), config=CFG)
    msgs = configure(strategy, 3)
    arrays, metrics = strategy.aggregate_train(1, [payload_reply(msgs[0], b"junk"), error_reply(msgs[1])])
    assert arrays is None  # Strategy.start keeps the previous global model
    assert counts(metrics) == (0, 1, 2, 1)
    arrays, metrics = strategy.aggregate_train(1, [])
    assert arrays is None and counts(metrics) == (0, 0, 3, 3)


def test_an_unexpected_exception_while_validating_costs_only_that_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder bug triggered by one hostile payload must not discard the round (it used to)."""
    poison = blob(9)
    real = osd_fl.codec.decode

    def flaky(data: bytes, **kwargs: object) -> object:
        if bytes(data) == poison:
            raise IndexError("decoder bug")
        return real(data, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(replies_module, "decode", flaky)
    strategy = OSDStrategy(FedAvg(), config=CFG)
    msgs = configure(strategy, 3)
    replies = [
        payload_reply(msgs[0], blob(0), 5),
        payload_reply(msgs[1], poison, 5),
        payload_reply(msgs[2], blob(2), 15),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert_model(arrays, reference([(blob(0), 5), (blob(2), 15)]))
    assert counts(metrics) == (2, 1, 0, 0)
    (rejection,) = strategy.rejections
    assert "IndexError: decoder bug" in rejection.reason


@pytest.mark.parametrize(
    ("weight", "ok"),
    [(2**53, True), (2**53 + 1, False), (2**62, False), (1e300, False), (float(2**53), True), (0.5, True)],
)
def test_self_reported_weights_are_bounded(weight: float, ok: bool) -> None:
    """A weight of 1e300 would overflow the float64 sum (NaN model); 2**53 is the largest exact one."""
    strategy = OSDStrategy(FedAvg(), config=CFG)
    msgs = configure(strategy, 2)
    arrays, metrics = strategy.aggregate_train(
        1, [payload_reply(msgs[0], blob(0), 10), payload_reply(msgs[1], blob(1), weight)]
    )
    if ok:
        assert_model(arrays, reference([(blob(0), 10), (blob(1), weight)]), atol=1e-5)
        assert counts(metrics) == (2, 0, 0, 0)
    else:
        assert_model(arrays, reference([(blob(0), 10)]))
        assert counts(metrics) == (1, 1, 0, 0)
        assert "largest accepted weight" in strategy.rejections[0].reason


def test_client_supplied_reasons_are_clipped_and_escaped(caplog: pytest.LogCaptureFixture) -> None:
    strategy = OSDStrategy(FedAvg(), config=CFG)
    msgs = configure(strategy, 2)
    reason = "boom\n[fake] round 1: everything fine\x1b[31m" + "x" * 100_000
    with caplog.at_level(logging.WARNING, logger="flwr.osd.strategy"):
        strategy.aggregate_train(1, [payload_reply(msgs[0], blob(0)), error_reply(msgs[1], reason)])
    (rejection,) = strategy.rejections
    assert "\n" not in rejection.reason and "\x1b" not in rejection.reason
    assert "boom\\n[fake]" in rejection.reason and "more characters" in rejection.reason
    assert len(rejection.reason) < 1_000
    assert all(len(r.getMessage()) < 1_200 and "\n" not in r.getMessage() for r in caplog.records)


def test_values_beyond_the_dtypes_safe_range_are_rejected_per_reply(caplog: pytest.LogCaptureFixture) -> None:
    """float16 model: finite, well-formed updates of 20000 (their mean would overflow float16) are refused
    one by one (above 64 = sqrt(65504) / 4), and a model value already out there may stay."""
    base = {"w": torch.full((8, 8), 60000.0, dtype=torch.float16)}
    cfg = CompressionConfig(method="dense")
    strategy = OSDStrategy(FedAvg(), config=cfg)
    grid = LocalGrid(ClientApp(), 2)
    msgs = sorted(
        strategy.configure_train(1, tensors_to_record(base), ConfigRecord(), grid), key=lambda m: m.metadata.dst_node_id
    )
    up = compress({"w": torch.full((8, 8), 20000.0, dtype=torch.float16)}, config=cfg)
    with caplog.at_level(logging.WARNING, logger="flwr.osd.strategy"):
        arrays, metrics = strategy.aggregate_train(1, [payload_reply(m, up) for m in msgs])
    assert arrays is None
    assert metrics is not None and metrics["accepted"] == 0 and metrics["rejected"] == 2
    assert all("the largest a float16 model accepts" in r.reason for r in strategy.rejections)
    small = compress({"w": torch.full((8, 8), -1.0, dtype=torch.float16)}, config=cfg)
    msgs = sorted(
        strategy.configure_train(2, tensors_to_record(base), ConfigRecord(), grid), key=lambda m: m.metadata.dst_node_id
    )
    arrays, metrics = strategy.aggregate_train(2, [payload_reply(m, small) for m in msgs])
    assert arrays is not None and metrics is not None and metrics["accepted"] == 2  # 60000 - 1 shrinks: allowed
    assert torch.equal(record_to_tensors(arrays)["w"], torch.full((8, 8), 59999.0, dtype=torch.float16))


def test_min_accepted() -> None:
    strategy = OSDStrategy(FedAvg(), config=CFG, min_accepted=2)
    msgs = configure(strategy, 3)
    arrays, metrics = strategy.aggregate_train(1, [payload_reply(msgs[0], blob(0)), error_reply(msgs[1])])
    assert arrays is None and counts(metrics) == (1, 0, 2, 1)
    strategy = OSDStrategy(FedAvg(), config=CFG, min_accepted=2)
    msgs = configure(strategy, 3)
    arrays, _ = strategy.aggregate_train(1, [payload_reply(msgs[0], blob(0)), payload_reply(msgs[2], blob(2))])
    assert_model(arrays, reference([(blob(0), 10), (blob(2), 10)]))
    with pytest.raises(ValueError, match="min_accepted"):
        OSDStrategy(config=CFG, min_accepted=0)


# --- the inner strategy's minimum-client settings ------------------------------------------------


@pytest.mark.parametrize(("nodes", "fraction", "min_train"), [(10, 0.5, 2), (10, 0.3, 4), (6, 1.0, 2), (5, 0.2, 3)])
def test_sampling_is_the_inner_strategys(nodes: int, fraction: float, min_train: int) -> None:
    """Same nodes as the bare inner strategy with the same random state: max(int(N * fraction), min_train_nodes)."""
    kwargs = {"fraction_train": fraction, "min_train_nodes": min_train, "min_available_nodes": 2}
    state = random.getstate()
    random.seed(7)
    bare = {m.metadata.dst_node_id for m in configure(FedAvg(**kwargs), nodes)}  # type: ignore[arg-type]
    random.setstate(state)
    strategy = OSDStrategy(FedAvg(**kwargs), config=CFG, sampling_seed=7)  # type: ignore[arg-type]
    wrapped = {m.metadata.dst_node_id for m in configure(strategy, nodes)}
    assert random.getstate() == state  # sampled with the strategy's own generator, the caller's untouched
    assert wrapped == bare
    assert len(wrapped) == max(int(nodes * fraction), min_train)


class _ArrivingGrid(LocalGrid):
    """Nodes connect one at a time: each call of get_node_ids sees one more."""

    def __init__(self, nodes: int, first: int) -> None:
        super().__init__(ClientApp(), nodes)
        self.visible = first
        self.calls = 0

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        ids = list(self.contexts)[: self.visible]
        self.visible = min(self.visible + 1, len(self.contexts))
        return ids


def test_configure_waits_for_min_available_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.serverapp.strategy.strategy_utils as utils

    sleeps: list[float] = []
    monkeypatch.setattr(utils, "sleep", sleeps.append)
    grid = _ArrivingGrid(6, first=1)
    strategy = OSDStrategy(FedAvg(fraction_train=0.5, min_train_nodes=2, min_available_nodes=5), config=CFG)
    msgs = list(strategy.configure_train(1, tensors_to_record(GLOBAL), ConfigRecord(), grid))
    assert len(sleeps) >= 3  # waited while fewer than 5 nodes were connected
    assert len(msgs) == 2


def test_fraction_train_zero_skips_training_and_the_run_goes_on() -> None:
    strategy = OSDStrategy(FedAvg(fraction_train=0.0, fraction_evaluate=0.0), config=CFG)
    seen: list[dict[str, torch.Tensor]] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        seen.append(record_to_tensors(arrays))
        return MetricRecord({"round": server_round})

    result = strategy.start(
        grid=LocalGrid(ClientApp(), 3), initial_arrays=tensors_to_record(GLOBAL), num_rounds=2, evaluate_fn=evaluate_fn
    )
    assert len(seen) == 3 and all(torch.equal(s["fc1.weight"], GLOBAL["fc1.weight"]) for s in seen)
    assert result.train_metrics_clientapp[2]["accepted"] == 0


# --- whole runs -----------------------------------------------------------------------------------


def _plain(msg: Message, trained: Mapping[str, torch.Tensor], n: int) -> Message:
    content = RecordDict({"arrays": tensors_to_record(dict(trained)), "metrics": MetricRecord({"num-examples": n})})
    return Message(content, reply_to=msg)


def test_a_round_where_everyone_misbehaves_keeps_the_model_and_later_rounds_proceed() -> None:
    sent: dict[tuple[int, int], tuple[bytes, int]] = {}
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        server_round = int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
        pid = int(context.node_config["partition-id"])
        current = record_to_tensors(msg.content.array_records["arrays"])
        step = delta(10 * server_round + pid)
        reply = osd_mod(msg, context, lambda m, c: _plain(m, {k: current[k] + step[k] for k in current}, 5 + pid))
        if server_round == 2:  # round 2: one garbles its payload, one crashes
            if pid == 0:
                reply.content[PAYLOAD_RECORD_KEY] = payload_to_record(b"OSDF" + bytes(40))
            else:
                raise RuntimeError("crash in round 2")
        sent[(server_round, pid)] = (record_to_payload(reply.content[PAYLOAD_RECORD_KEY]), 5 + pid)
        return reply

    models: list[dict[str, torch.Tensor]] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        models.append(record_to_tensors(arrays))
        return MetricRecord({"round": server_round})

    strategy = OSDStrategy(FedAvg(fraction_evaluate=0.0, min_available_nodes=2), config=CFG)
    result = strategy.start(
        grid=LocalGrid(app, 2), initial_arrays=tensors_to_record(GLOBAL), num_rounds=3, evaluate_fn=evaluate_fn
    )
    assert len(models) == 4
    assert_model(tensors_to_record(models[1]), reference([sent[(1, 0)], sent[(1, 1)]]))
    for name in GLOBAL:
        assert torch.equal(models[2][name], models[1][name])  # round 2: nothing accepted, model kept
    assert_model(tensors_to_record(models[3]), reference([sent[(3, 0)], sent[(3, 1)]], base=models[2]))
    assert counts(result.train_metrics_clientapp[2]) == (0, 1, 1, 0)


def test_an_error_the_superlink_sends_for_a_dead_node_counts_once_for_that_node() -> None:
    """Flower's SuperLink answers for a node whose heartbeat lapsed with NODE_UNAVAILABLE from its own id (1);
    found by tests/test_faults_deployment.py: the dead node used to count as rejected *and* failed."""
    strategy = OSDStrategy(FedAvg(), config=CFG)
    msgs = configure(strategy, 3)
    for i, m in enumerate(msgs):
        m.metadata.__dict__["_message_id"] = f"sent-{i}"  # what the grid stamps when it pushes them (no setter)
    dead = error_reply(msgs[1], "node unavailable")
    dead.metadata.__dict__["_src_node_id"] = 1  # the SuperLink's own id (SUPERLINK_NODE_ID)
    dead.metadata.__dict__["_reply_to_message_id"] = "sent-1"
    replies = [payload_reply(msgs[0], blob(0)), dead, payload_reply(msgs[2], blob(2))]
    _, metrics = strategy.aggregate_train(1, replies)
    assert counts(metrics) == (2, 0, 1, 0)
    (rejection,) = strategy.rejections
    assert rejection.node_id == msgs[1].metadata.dst_node_id and rejection.kind == "error"
