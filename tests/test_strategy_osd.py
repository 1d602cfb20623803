"""strategies.OSDStrategy with hand-built messages: good, malformed, mixed, error replies."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAdam, FedAvg, Strategy

from clients import osd_mod
from osd_fl import CompressionConfig, ConfigError, compress, decompress, payload_budget, resolve_config
from osd_fl.codec import encode
from osd_fl.compressor import dense_record
from osd_fl.payload import Payload
from osd_fl.records import (
    PAYLOAD_RECORD_KEY,
    payload_to_record,
    record_to_payload,
    record_to_tensors,
    tensors_to_record,
)
from strategies import OSDStrategy
from strategies.local_grid import LocalGrid, make_context
from tests.helpers import AddTracker

SHAPES = {"fc1.weight": (48, 40), "fc1.bias": (48,), "fc2.weight": (10, 48), "fc2.bias": (10,)}
CFG = CompressionConfig(method="osd", rank=2, min_numel=256, importance="ones")


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g) for k, s in SHAPES.items()}


GLOBAL = _state(0)


def _trained(i: int) -> dict[str, torch.Tensor]:
    return {k: GLOBAL[k] + v for k, v in _state(100 + i, 0.05).items()}


def _grid(nodes: int = 4) -> LocalGrid:
    return LocalGrid(ClientApp(), nodes)


def _configure(strategy: Strategy, nodes: int = 4, server_round: int = 1) -> list[Message]:
    msgs = list(strategy.configure_train(server_round, tensors_to_record(GLOBAL), ConfigRecord(), _grid(nodes)))
    return sorted(msgs, key=lambda m: m.metadata.dst_node_id)


def _plain_reply(ins: Message, trained: dict[str, torch.Tensor], n: int) -> Message:
    content = RecordDict({"arrays": tensors_to_record(trained), "metrics": MetricRecord({"num-examples": n})})
    return Message(content, reply_to=ins)


def _osd_reply(ins: Message, trained: dict[str, torch.Tensor], n: int) -> Message:
    """A compressed reply exactly as a ClientApp with osd_mod would send it."""
    return osd_mod(ins, make_context(ins.metadata.dst_node_id), lambda m, c: _plain_reply(m, trained, n))


def _payload_reply(
    ins: Message, blob: bytes, metrics: dict[str, int | float | list[int] | list[float]] | None = None
) -> Message:
    content = RecordDict(
        {
            PAYLOAD_RECORD_KEY: payload_to_record(blob),
            "metrics": MetricRecord(metrics if metrics is not None else {"num-examples": 10}),
        }
    )
    return Message(content, reply_to=ins)


def _tensors(record: ArrayRecord | None) -> dict[str, torch.Tensor]:
    assert record is not None
    return record_to_tensors(record)


def _expected(blobs_and_weights: Iterable[tuple[bytes, float]], server_lr: float = 1.0) -> dict[str, torch.Tensor]:
    pairs = list(blobs_and_weights)
    total = sum(w for _, w in pairs)
    out = {}
    for name, w0 in GLOBAL.items():
        step = sum(w * decompress(b)[name].double() for b, w in pairs) / total
        out[name] = (w0.double() + server_lr * step).float()
    return out


def _assert_state_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=0)


# --- configure ------------------------------------------------------------------------


def test_configure_train_sends_every_setting_through_the_inner_strategy() -> None:
    strategy = OSDStrategy(FedAvg(), config=CFG)
    msgs = _configure(strategy)
    assert len(msgs) == 4
    for msg in msgs:
        config = msg.content["config"]
        assert config["server-round"] == 1  # FedAvg's own key still there
        # CFG with value_dtype="auto" resolved (OSD: int8 values at the float32 budget)
        assert CompressionConfig.from_mapping(config, prefix="osd.", strict=True) == resolve_config(CFG)
        assert resolve_config(CFG) == CFG.replace(value_dtype="int8", budget_dtype="float32")
        assert set(msg.content["arrays"].keys()) == set(SHAPES)


def test_constructor_validates() -> None:
    with pytest.raises(ConfigError, match="unknown method"):
        OSDStrategy(config=CompressionConfig(method="nope"))
    with pytest.raises(ConfigError, match="server_lr"):
        OSDStrategy(server_lr=0.0)
    with pytest.raises(ConfigError, match="max_payload_bytes"):
        OSDStrategy(max_payload_bytes=0)


# --- good replies -----------------------------------------------------------------------


def test_weighted_average_of_decoded_updates() -> None:
    strategy = OSDStrategy(FedAvg(), config=CFG)
    msgs = _configure(strategy)
    weights = [10, 20, 30, 40]
    replies = [_osd_reply(m, _trained(i), w) for i, (m, w) in enumerate(zip(msgs, weights, strict=True))]
    blobs = [record_to_payload(r.content[PAYLOAD_RECORD_KEY]) for r in replies]
    arrays, metrics = strategy.aggregate_train(1, replies)
    _assert_state_close(_tensors(arrays), _expected(zip(blobs, weights, strict=True)))
    assert metrics is not None
    assert (metrics["accepted"], metrics["rejected"], metrics["failed"]) == (4, 0, 0)
    expected_bytes = sum(w * len(b) for b, w in zip(blobs, weights, strict=True)) / sum(weights)
    assert metrics["osd-payload-bytes"] == pytest.approx(expected_bytes)  # clients' metrics, weighted
    assert "num-examples" not in metrics


def test_server_learning_rate_scales_the_step() -> None:
    results = []
    for lr in (1.0, 2.5):
        strategy = OSDStrategy(FedAvg(), config=CFG, server_lr=lr)
        msgs = _configure(strategy)
        replies = [_osd_reply(m, _trained(i), 10 + i) for i, m in enumerate(msgs)]
        results.append(_tensors(strategy.aggregate_train(1, replies)[0]))
    for name, w0 in GLOBAL.items():
        torch.testing.assert_close(results[1][name] - w0, 2.5 * (results[0][name] - w0), atol=1e-6, rtol=1e-5)


@pytest.mark.usefixtures("global_rng")  # the bare FedAvg samples with Python's global random
def test_dense_method_matches_plain_fedavg() -> None:
    plain = FedAvg()
    wrapped = OSDStrategy(FedAvg(), config=CompressionConfig(method="dense"))
    plain_msgs = _configure(plain)
    osd_msgs = _configure(wrapped)
    weights = [7, 13, 29]
    plain_arrays, _ = plain.aggregate_train(
        1, [_plain_reply(m, _trained(i), w) for i, (m, w) in enumerate(zip(plain_msgs, weights, strict=False))]
    )
    osd_arrays, _ = wrapped.aggregate_train(
        1, [_osd_reply(m, _trained(i), w) for i, (m, w) in enumerate(zip(osd_msgs, weights, strict=False))]
    )
    want = _tensors(plain_arrays)
    got = _tensors(osd_arrays)
    _assert_state_close(got, want, atol=1e-6)
    assert any(not torch.allclose(want[k], GLOBAL[k], atol=1e-3) for k in want)  # a real step was taken


@pytest.mark.usefixtures("global_rng")  # the bare FedAdam samples with Python's global random
def test_fedadam_inner_strategy_steps_from_the_decoded_average() -> None:
    kwargs = {"eta": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    plain = FedAdam(**kwargs)  # type: ignore[arg-type]
    wrapped = OSDStrategy(FedAdam(**kwargs), config=CompressionConfig(method="dense"))  # type: ignore[arg-type]
    for server_round in (1, 2):  # two rounds: Adam's moments carry over
        plain_msgs = _configure(plain, 3, server_round)
        osd_msgs = _configure(wrapped, 3, server_round)
        plain_replies = [_plain_reply(m, _trained(i), 5 + i) for i, m in enumerate(plain_msgs)]
        osd_replies = [_osd_reply(m, _trained(i), 5 + i) for i, m in enumerate(osd_msgs)]
        want = _tensors(plain.aggregate_train(server_round, plain_replies)[0])
        got = _tensors(wrapped.aggregate_train(server_round, osd_replies)[0])
        assert want["fc1.weight"].dtype == torch.float64  # Flower's FedAdam drifts to float64 ...
        assert all(t.dtype == torch.float32 for t in got.values())  # ... the wrapper keeps the model's dtype
        _assert_state_close(got, {k: v.float() for k, v in want.items()}, atol=1e-5)
        # The wrapped FedAdam stepped from the average of what was sent (here: exact dense updates).
        assert plain.current_arrays is not None
        blobs = [(record_to_payload(r.content[PAYLOAD_RECORD_KEY]), 5.0 + i) for i, r in enumerate(osd_replies)]
        fedavg_step = _expected(blobs)
        assert not torch.allclose(got["fc1.weight"], fedavg_step["fc1.weight"], atol=1e-4)  # Adam, not FedAvg


def test_decoded_tensors_are_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory O(model): whenever a tensor is rebuilt, no tensor rebuilt before it is alive.

    The strategy holds the float64 sums and one rebuilt tensor, never a whole
    decoded update (nor one of an earlier reply).
    """
    track = AddTracker(monkeypatch)
    leaked, factored = track.leaked, track.factored
    for kwargs in ({}, {"norm_bound": 1e6}, {"norm_bound_relative": 10.0}):
        track.clear()
        strategy = OSDStrategy(FedAvg(), config=CFG, **kwargs)  # type: ignore[arg-type]
        msgs = _configure(strategy, 6)
        arrays, _ = strategy.aggregate_train(1, [_osd_reply(m, _trained(i), 10) for i, m in enumerate(msgs)])
        assert arrays is not None
        # each tensor is added once: low-rank ones from their factors, the rest rebuilt one at a time;
        # norms come from the factors, without a rebuild
        assert sum(factored) > 0 and len(leaked) > 0, kwargs
        assert len(leaked) + sum(factored) == 6 * len(SHAPES), kwargs
        assert leaked == [0] * len(leaked), kwargs


class _LoggingFedAvg(FedAvg):
    """A FedAvg subclass with its own aggregate_train: the wrapper must call it."""

    calls = 0

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        type(self).calls += 1
        return super().aggregate_train(server_round, replies)


def test_plain_fedavg_shortcut_matches_fedavg_exactly() -> None:
    """With FedAvg the wrapper skips the inner array averaging (w / w = 1.0); the result is bit-identical."""
    _LoggingFedAvg.calls = 0
    results = []
    for inner in (FedAvg(), _LoggingFedAvg()):
        strategy = OSDStrategy(inner, config=CFG, trust_custom_inner=True)
        msgs = _configure(strategy, 4)
        arrays, metrics = strategy.aggregate_train(1, [_osd_reply(m, _trained(i), 3 + i) for i, m in enumerate(msgs)])
        assert arrays is not None and metrics is not None
        results.append((_tensors(arrays), dict(metrics.items())))
    assert _LoggingFedAvg.calls == 1
    (fast, fast_metrics), (slow, slow_metrics) = results
    assert fast.keys() == slow.keys()
    for name in fast:
        assert fast[name].dtype == slow[name].dtype
        assert torch.equal(fast[name], slow[name]), name
    assert fast_metrics.keys() == slow_metrics.keys()
    timed = {k for k in fast_metrics if k.endswith("-s")}  # the clients' measured compression time
    assert timed == {"osd-compress-s"}
    assert {k: v for k, v in fast_metrics.items() if k not in timed} == {
        k: v for k, v in slow_metrics.items() if k not in timed
    }


# --- malformed replies --------------------------------------------------------------------

GOOD_BLOB = compress({k: v - GLOBAL[k] for k, v in _trained(0).items()}, config=CFG)


def _nan_blob() -> bytes:
    records = [dense_record(k, torch.full(s, float("nan")), "float32") for k, s in SHAPES.items()]
    return encode(Payload(method="osd", value_dtype="float32", records=records))


def _corrupt(blob: bytes, at: int) -> bytes:
    b = bytearray(blob)
    b[at] ^= 0xFF
    return bytes(b)


def _other_model_blob() -> bytes:
    g = torch.Generator().manual_seed(5)
    update = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    update["fc1.weight"] = torch.randn(40, 48, generator=g)
    return compress(update, config=CFG)


BadReply = Callable[[Message], Message]

#: case -> (bad reply, reason it must be rejected with). Cases whose payload
#: would already fail the size limit run with a large ``max_payload_bytes`` so
#: that the check they target is the one that fires.
MALFORMED: dict[str, tuple[BadReply, str]] = {
    "plain weights (no mod)": (lambda ins: _plain_reply(ins, _trained(1), 10), "no OSD payload record"),
    "extra ArrayRecord": (
        lambda ins: Message(
            RecordDict(
                {
                    PAYLOAD_RECORD_KEY: payload_to_record(GOOD_BLOB),
                    "arrays": tensors_to_record(GLOBAL),
                    "metrics": MetricRecord({"num-examples": 10}),
                }
            ),
            reply_to=ins,
        ),
        "unexpected ArrayRecords ['arrays']",
    ),
    "no num-examples": (lambda ins: _payload_reply(ins, GOOD_BLOB, {"loss": 1.0}), "'num-examples' is missing"),
    "zero weight": (lambda ins: _payload_reply(ins, GOOD_BLOB, {"num-examples": 0}), "positive"),
    "negative weight": (lambda ins: _payload_reply(ins, GOOD_BLOB, {"num-examples": -5}), "positive"),
    "nan weight": (lambda ins: _payload_reply(ins, GOOD_BLOB, {"num-examples": float("nan")}), "finite"),
    "list weight": (lambda ins: _payload_reply(ins, GOOD_BLOB, {"num-examples": [1, 2]}), "must be a number"),
    "two MetricRecords": (
        lambda ins: Message(
            RecordDict(
                {
                    PAYLOAD_RECORD_KEY: payload_to_record(GOOD_BLOB),
                    "metrics": MetricRecord({"num-examples": 10}),
                    "more": MetricRecord({"num-examples": 10}),
                }
            ),
            reply_to=ins,
        ),
        "exactly one MetricRecord",
    ),
    "npy array instead of raw payload": (
        lambda ins: Message(
            RecordDict(
                {
                    PAYLOAD_RECORD_KEY: ArrayRecord({"payload": Array(np.frombuffer(GOOD_BLOB, np.uint8).copy())}),
                    "metrics": MetricRecord({"num-examples": 10}),
                }
            ),
            reply_to=ins,
        ),
        "stype",
    ),
    "truncated": (lambda ins: _payload_reply(ins, GOOD_BLOB[:-9]), "invalid payload"),
    "flipped byte": (lambda ins: _payload_reply(ins, _corrupt(GOOD_BLOB, len(GOOD_BLOB) // 2)), "checksum"),
    "not a payload": (lambda ins: _payload_reply(ins, b"\x00" * 64), "magic"),
    "over the budget": (
        lambda ins: _payload_reply(
            ins, compress({k: v - GLOBAL[k] for k, v in _trained(1).items()}, config=CFG.replace(rank=8))
        ),
        "exceed",
    ),
    "other model": (lambda ins: _payload_reply(ins, _other_model_blob()), "does not match"),
    "other method": (
        lambda ins: _payload_reply(
            ins, compress({k: v - GLOBAL[k] for k, v in _trained(1).items()}, config=CFG.replace(method="truncsvd"))
        ),
        "method",
    ),
    "non-finite values": (lambda ins: _payload_reply(ins, _nan_blob()), "finite"),
}


LARGE_LIMIT = {"other method", "non-finite values", "other model"}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_reply_is_excluded_and_the_round_goes_on(case: str, caplog: pytest.LogCaptureFixture) -> None:
    make_bad, reason = MALFORMED[case]
    strategy = OSDStrategy(FedAvg(), config=CFG, max_payload_bytes=10**6 if case in LARGE_LIMIT else None)
    good_ins, bad_ins = _configure(strategy, 2)
    good = _payload_reply(good_ins, GOOD_BLOB, {"num-examples": 10})
    with caplog.at_level(logging.WARNING, logger="flwr.osd.strategy"):
        arrays, metrics = strategy.aggregate_train(1, [good, make_bad(bad_ins)])
    _assert_state_close(_tensors(arrays), _expected([(GOOD_BLOB, 10.0)]))  # the good reply alone
    assert metrics is not None
    assert (metrics["accepted"], metrics["rejected"], metrics["failed"]) == (1, 1, 0)
    (rejection,) = strategy.rejections
    assert rejection.node_id == bad_ins.metadata.dst_node_id and not rejection.failed
    assert reason in rejection.reason
    assert any(reason in r.getMessage() for r in caplog.records)


def test_mixed_round_with_error_reply() -> None:
    strategy = OSDStrategy(FedAvg(), config=CFG)
    msgs = _configure(strategy, 4)
    replies = [
        _osd_reply(msgs[0], _trained(0), 10),
        Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="CUDA out of memory"), reply_to=msgs[1]),
        _payload_reply(msgs[2], GOOD_BLOB[:-1]),
        _osd_reply(msgs[3], _trained(3), 30),
    ]
    blobs = [(record_to_payload(replies[i].content[PAYLOAD_RECORD_KEY]), w) for i, w in ((0, 10), (3, 30))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    _assert_state_close(_tensors(arrays), _expected(blobs))
    assert metrics is not None
    assert (metrics["accepted"], metrics["rejected"], metrics["failed"]) == (2, 1, 1)
    failed = [r for r in strategy.rejections if r.failed]
    assert len(failed) == 1 and "CUDA out of memory" in failed[0].reason
    assert failed[0].node_id == msgs[1].metadata.dst_node_id


def test_duplicate_and_unsolicited_replies_are_rejected() -> None:
    strategy = OSDStrategy(FedAvg(), config=CFG)
    msgs = _configure(strategy, 2)
    good = _osd_reply(msgs[0], _trained(0), 10)
    stranger = _configure(OSDStrategy(FedAvg(), config=CFG), 3)[2]  # node 1003 was not sampled above
    replies = [good, _osd_reply(msgs[0], _trained(1), 50), _osd_reply(stranger, _trained(2), 50)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    _assert_state_close(_tensors(arrays), _expected([(record_to_payload(good.content[PAYLOAD_RECORD_KEY]), 10.0)]))
    assert metrics is not None and (metrics["accepted"], metrics["rejected"]) == (1, 2)
    reasons = sorted(r.reason for r in strategy.rejections)
    assert reasons == ["a second reply from this node", "node was not sampled this round"]


def test_all_rejected_leaves_the_global_model_unchanged() -> None:
    strategy = OSDStrategy(FedAvg(), config=CFG)
    msgs = _configure(strategy, 3)
    replies = [
        _plain_reply(msgs[0], _trained(0), 10),
        Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="gone"), reply_to=msgs[1]),
        _payload_reply(msgs[2], GOOD_BLOB, {"num-examples": 0}),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None  # Strategy.start keeps the previous global model
    assert metrics is not None
    assert (metrics["accepted"], metrics["rejected"], metrics["failed"]) == (0, 2, 1)
    assert strategy.aggregate_train(1, [])[0] is None


class _BrokenInner(FedAvg):
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        raise RuntimeError("inner strategy bug")


def test_aggregate_train_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    strategy = OSDStrategy(_BrokenInner(), config=CFG, trust_custom_inner=True)
    msgs = _configure(strategy, 2)
    with caplog.at_level(logging.ERROR, logger="flwr.osd.strategy"):
        arrays, metrics = strategy.aggregate_train(1, [_osd_reply(m, _trained(i), 10) for i, m in enumerate(msgs)])
    assert arrays is None and metrics is not None
    assert any("aggregation failed" in r.getMessage() for r in caplog.records)
    # Replies for a round that was never configured: also no exception.
    assert OSDStrategy(config=CFG).aggregate_train(5, [])[0] is None


def test_payload_limit_defaults() -> None:
    record = tensors_to_record({**GLOBAL, "steps": torch.tensor(1)})
    floating = SHAPES
    assert OSDStrategy(config=CFG).payload_limit(record) == payload_budget(floating, CFG)
    dense_bytes = 4 * sum(int(np.prod(s)) for s in floating.values())
    assert OSDStrategy(config=CompressionConfig(method="dense")).payload_limit(record) == 2 * dense_bytes + 65536
    assert OSDStrategy(config=CFG, max_payload_bytes=123).payload_limit(record) == 123


def test_evaluate_is_delegated_and_survives_inconsistent_replies() -> None:
    strategy = OSDStrategy(FedAvg(), config=CFG)
    msgs = list(strategy.configure_evaluate(1, tensors_to_record(GLOBAL), ConfigRecord(), _grid(2)))
    assert len(msgs) == 2 and set(msgs[0].content["arrays"].keys()) == set(SHAPES)
    good = [
        Message(RecordDict({"m": MetricRecord({"num-examples": n, "acc": a})}), reply_to=msg)
        for msg, n, a in zip(msgs, (10, 30), (0.5, 0.9), strict=True)
    ]
    metrics = strategy.aggregate_evaluate(1, good)
    assert metrics is not None and metrics["acc"] == pytest.approx(0.8)
    bad = [good[0], Message(RecordDict({"m": MetricRecord({"acc": 1.0})}), reply_to=msgs[1])]
    metrics = strategy.aggregate_evaluate(1, bad)  # FedAvg alone raises InconsistentMessageReplies here
    assert metrics is not None and metrics["acc"] == pytest.approx(0.5)  # the honest reply's metrics survive
    (rejection,) = strategy.rejections
    assert rejection.kind == "evaluate" and "num-examples" in rejection.reason


# --- the whole round loop -------------------------------------------------------------------

DELTA = {k: v - GLOBAL[k] for k, v in _trained(0).items()}


def _mixed_client_app() -> ClientApp:
    """Node 0 sends a proper OSD reply, node 1 forgot the mod, node 2 crashes."""
    app = ClientApp()

    def train_fn(msg: Message, context: Context) -> Message:
        current = record_to_tensors(msg.content.array_records["arrays"])
        trained = {k: current[k] + DELTA[k] for k in current}
        return _plain_reply(msg, trained, 10)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = context.node_config["partition-id"]
        if pid == 0:
            return osd_mod(msg, context, train_fn)
        if pid == 1:
            return train_fn(msg, context)
        raise RuntimeError("client crashed")

    return app


def test_start_runs_every_round_despite_bad_clients() -> None:
    strategy = OSDStrategy(
        FedAvg(fraction_evaluate=0.0, min_available_nodes=3), config=CompressionConfig(method="dense")
    )
    seen: list[dict[str, torch.Tensor]] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        seen.append(record_to_tensors(arrays))
        return MetricRecord({"round": server_round})

    result = strategy.start(
        grid=LocalGrid(_mixed_client_app(), 3),
        initial_arrays=tensors_to_record(GLOBAL),
        num_rounds=3,
        evaluate_fn=evaluate_fn,
    )
    for r in (1, 2, 3):
        m = result.train_metrics_clientapp[r]
        assert (m["accepted"], m["rejected"], m["failed"]) == (1, 1, 1)
        assert m["messages-down"] == 3 and m["messages-up"] == 3
        up, payload_up = m["bytes-up"], m["payload-bytes-up"]
        assert isinstance(up, int) and isinstance(payload_up, int) and up > payload_up > 0
    for r, state in enumerate(seen):  # only node 0's exact update was applied, every round
        _assert_state_close(state, {k: GLOBAL[k] + r * DELTA[k] for k in GLOBAL}, atol=1e-5)
    assert len(strategy.rejections) == 6
    assert sum(x.failed for x in strategy.rejections) == 3
    assert all("client crashed" in x.reason for x in strategy.rejections if x.failed)


def test_fedprox_inner_strategy_settings_reach_the_client() -> None:
    from flwr.serverapp.strategy import FedProx

    strategy = OSDStrategy(FedProx(proximal_mu=0.3), config=CFG)
    msg = _configure(strategy, 2)[0]
    config = msg.content.config_records["config"]
    assert config["proximal-mu"] == 0.3
    assert config["osd.rank"] == CFG.rank


def test_the_broadcast_config_carries_the_resolved_precision() -> None:
    """value_dtype='auto' goes out resolved (OSD: int8 within float32's budget), so a client on other defaults
    still compresses exactly what the server's conformance check expects."""
    for method, value, budget in (("osd", "int8", "float32"), ("truncsvd", "float32", "value")):
        strategy = OSDStrategy(FedAvg(), config=CompressionConfig(method=method, rank=2))
        (msg, *_) = _configure(strategy)
        sent = CompressionConfig.from_mapping(msg.content.config_records["config"], prefix="osd.", strict=True)
        assert (sent.value_dtype, sent.budget_dtype) == (value, budget)
    explicit = OSDStrategy(FedAvg(), config=CFG.replace(value_dtype="float16"))
    sent = CompressionConfig.from_mapping(_configure(explicit)[0].content["config"], prefix="osd.", strict=True)
    assert sent.value_dtype == "float16"
