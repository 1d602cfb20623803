"""The attack classes found by the external attack suite (issue: "a server that one client cannot stop").

Each test here failed on the code before the fix it names:

1. a valid reply that poisons an inner server optimizer (FedYogi) into a NaN model;
2. one valid reply that vetoes the round (float16 model), at once or by walking an entry up;
3. replies no correct client of the configured method could send;
4. (tests/test_security_norm_bound.py) the relative bound's reference steered by one reply;
5. one reply's metrics spoiling everyone's;
6. the client trusting every number the server sends;
7. failures that stay silent: a run in which nothing succeeds, and robust inner strategies.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import (
    Bulyan,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)

from clients import osd_mod
from osd_fl import CompressionConfig, ConfigError, compress, encode
from osd_fl.payload import Kind, Payload, Section, TensorRecord
from osd_fl.records import config_to_record, record_to_tensors, tensors_to_record
from strategies import FederationStalled, OSDStrategy
from strategies.local_grid import LocalGrid
from tests.test_faults_strategy import CFG, GLOBAL, SHAPES, blob, configure, counts, error_reply, payload_reply

# --- building hostile payloads by hand ------------------------------------------------------------


def _lowrank(name: str, shape: tuple[int, ...], rank: int, spike: float = 0.0, dtype: str = "float32") -> TensorRecord:
    """Rank-``rank`` sparse factors; with ``spike`` one entry of each factor is ``spike`` (product spike**2)."""
    n = shape[0]
    d = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    a_pos = np.array([0], dtype=np.int64)
    b_pos = np.array([0], dtype=np.int64)
    value = np.array([spike or 1e-3], dtype=np.float32)
    return TensorRecord(
        name=name,
        shape=shape,
        dtype=dtype,
        kind=Kind.LOWRANK,
        rank=rank,
        sections=[Section(n * rank, value, a_pos), Section(rank * d, value.copy(), b_pos)],
    )


def _dense(name: str, values: torch.Tensor, dtype: str = "float32") -> TensorRecord:
    flat = values.reshape(-1).to(torch.float32).numpy()
    return TensorRecord(
        name=name, shape=tuple(values.shape), dtype=dtype, kind=Kind.DENSE, sections=[Section(flat.size, flat)]
    )


def _osd_payload(records: dict[str, TensorRecord], value_dtype: str = "float32") -> bytes:
    """A payload of method osd: the given records, small honest dense records for the rest of SHAPES."""
    out = []
    for name, shape in SHAPES.items():
        if name in records:
            out.append(records[name])
        elif len(shape) == 1:
            out.append(_dense(name, torch.full(shape, 1e-3)))
        else:
            out.append(_lowrank(name, shape, 2))
    return encode(Payload(method="osd", value_dtype=value_dtype, records=out))


def _finite(record: object) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in record_to_tensors(record).values())  # type: ignore[arg-type]


# --- 1. non-finite global model through the inner strategy ------------------------------------------


def test_class1_a_reply_of_2_to_the_96_cannot_poison_fedyogi() -> None:
    """Factor entries of 2**48 (the decoder's bound) make one product of 2**96, within the rank-2 budget.

    Before: FedYogi's second moment overflowed float32 and the model was NaN two rounds later.
    Now: the reply is rejected (2**96 > 2**62, float32's safe magnitude); FedYogi's state stays finite.
    """
    hostile = _osd_payload({"fc1.weight": _lowrank("fc1.weight", SHAPES["fc1.weight"], 1, spike=2.0**48)})
    inner = FedYogi(eta=0.01, min_available_nodes=2, min_train_nodes=2)
    strategy = OSDStrategy(inner, config=CFG)
    model = tensors_to_record(GLOBAL)
    for server_round in (1, 2, 3):
        grid = LocalGrid(ClientApp(), 3)
        msgs = sorted(
            strategy.configure_train(server_round, model, ConfigRecord(), grid), key=lambda m: m.metadata.dst_node_id
        )
        replies = [payload_reply(msgs[0], hostile), payload_reply(msgs[1], blob(1)), payload_reply(msgs[2], blob(2))]
        arrays, metrics = strategy.aggregate_train(server_round, replies)
        assert arrays is not None and _finite(arrays)
        assert counts(metrics)[:2] == (2, 1)
        assert "exceeds" in strategy.rejections[-1].reason and "float32" in strategy.rejections[-1].reason
        assert inner.v_t is not None and all(np.isfinite(v).all() for v in inner.v_t.values())
        model = arrays


def test_class1_a_rejected_inner_step_is_rolled_back() -> None:
    """FedAvgM on a float16 model: momentum carries an entry up. The model returned is always finite and
    within float16's safe range, and a rejected step never stays in FedAvgM's momentum."""
    base = {"w": torch.zeros(8, 8, dtype=torch.float16)}
    cfg = CompressionConfig(method="dense")
    inner = FedAvgM(server_momentum=0.9, min_available_nodes=2, min_train_nodes=2)
    strategy = OSDStrategy(inner, config=cfg, max_stalled_rounds=0)
    model = tensors_to_record(base)
    push = torch.zeros(8, 8)
    push[0, 0] = 60.0  # below float16's safe magnitude of 64 per reply
    honest = compress({"w": torch.full((8, 8), 1e-3, dtype=torch.float16)}, config=cfg)
    kept_out = 0
    for server_round in range(1, 9):
        grid = LocalGrid(ClientApp(), 2)
        msgs = sorted(
            strategy.configure_train(server_round, model, ConfigRecord(), grid), key=lambda m: m.metadata.dst_node_id
        )
        attack = compress({"w": push.to(torch.float16)}, config=cfg)
        arrays, metrics = strategy.aggregate_train(
            server_round, [payload_reply(msgs[0], attack), payload_reply(msgs[1], honest)]
        )
        assert metrics is not None
        if arrays is None:
            kept_out += 1
            continue
        w = record_to_tensors(arrays)["w"]
        assert bool(torch.isfinite(w).all()) and float(w.abs().max()) <= 64
        momentum = inner.momentum_vector
        assert momentum is None or all(np.isfinite(np.asarray(v)).all() for v in momentum)
        model = arrays
    assert any(r.kind == "range" for r in strategy.rejections)  # the attacker was found and left out


# --- 2. one valid reply vetoes the round -------------------------------------------------------------


def _float16_round(
    strategy: OSDStrategy, model: dict[str, torch.Tensor], server_round: int, ups: list[bytes], weights: list[float]
) -> tuple[object, MetricRecord | None]:
    grid = LocalGrid(ClientApp(), len(ups))
    record = tensors_to_record(model)
    msgs = sorted(
        strategy.configure_train(server_round, record, ConfigRecord(), grid), key=lambda m: m.metadata.dst_node_id
    )
    return strategy.aggregate_train(
        server_round, [payload_reply(m, u, w) for m, u, w in zip(msgs, ups, weights, strict=True)]
    )


def test_class2_a_max_float16_entry_with_weight_2_to_the_53_does_not_cost_the_round() -> None:
    cfg = CompressionConfig(method="dense")
    model = {"w": torch.zeros(4, 4, dtype=torch.float16)}
    spike = torch.zeros(4, 4)
    spike[1, 2] = 65504.0
    hostile = compress({"w": spike.to(torch.float16)}, config=cfg)
    honest = compress({"w": torch.full((4, 4), 0.5, dtype=torch.float16)}, config=cfg)
    strategy = OSDStrategy(FedAvg(), config=cfg)
    arrays, metrics = _float16_round(strategy, model, 1, [hostile, honest, honest], [2.0**53, 10, 10])
    assert counts(metrics)[:2] == (2, 1)
    assert torch.equal(record_to_tensors(arrays)["w"], torch.full((4, 4), 0.5, dtype=torch.float16))  # type: ignore[arg-type]


def test_class2_walking_an_entry_up_never_stops_honest_training() -> None:
    """Equal weights; the attacker sends +63 on one entry every round (each reply within float16's safe 64).
    Before: from round 4 every round was discarded. Now: the attacker is left out once the mean would leave
    the safe range, and every round aggregates the honest replies."""
    cfg = CompressionConfig(method="dense")
    model = {"w": torch.zeros(4, 4, dtype=torch.float16)}
    spike = torch.zeros(4, 4)
    spike[0, 0] = 63.0
    hostile = compress({"w": spike.to(torch.float16)}, config=cfg)
    honest = compress({"w": torch.full((4, 4), -0.25, dtype=torch.float16)}, config=cfg)
    strategy = OSDStrategy(FedAvg(), config=cfg)
    for server_round in range(1, 13):
        arrays, _metrics = _float16_round(strategy, model, server_round, [hostile, honest, honest], [10, 10, 10])
        assert arrays is not None, f"round {server_round} was discarded"
        new = record_to_tensors(arrays)["w"]  # type: ignore[arg-type]
        assert bool(torch.isfinite(new).all()) and float(new.abs().max()) <= 64
        assert float(new[1, 1]) < float(model["w"][1, 1])  # the honest step was taken
        model = {"w": new}
    assert sum(r.kind == "range" for r in strategy.rejections) >= 3


# --- 3. replies no correct client could send ----------------------------------------------------------


@pytest.mark.parametrize(
    ("records", "value_dtype", "reason"),
    [
        ({"fc1.weight": _dense("fc1.weight", torch.zeros(32, 24))}, "float32", "DENSE record"),
        ({"fc1.weight": _lowrank("fc1.weight", (32, 24), 6)}, "float32", "rank 6"),
        ({"fc1.weight": _lowrank("fc1.weight", (32, 24), 24)}, "float32", "rank 24"),
        (
            {
                "fc2.weight": TensorRecord(
                    "fc2.weight",
                    (5, 32),
                    "float32",
                    Kind.SPARSE,
                    [Section(160, np.ones(3, np.float32), np.array([0, 7, 9], dtype=np.int64))],
                )
            },
            "float32",
            "SPARSE record",
        ),
        ({}, "float16", "value_dtype='float32'"),
    ],
)
def test_class3_only_what_a_correct_client_produces_is_accepted(
    records: dict[str, TensorRecord], value_dtype: str, reason: str
) -> None:
    hostile = _osd_payload(records, value_dtype)
    # osd, rank 2, relax 3: ranks 1..5; a generous byte limit, so that the form, not the size, decides
    strategy = OSDStrategy(FedAvg(), config=CFG, max_payload_bytes=10**6)
    msgs = configure(strategy, 2)
    _arrays, metrics = strategy.aggregate_train(1, [payload_reply(msgs[0], hostile), payload_reply(msgs[1], blob(1))])
    assert counts(metrics)[:2] == (1, 1)
    assert reason in strategy.rejections[0].reason


def test_class3_float32_values_when_float16_is_configured() -> None:
    cfg = CFG.replace(value_dtype="float16")
    strategy = OSDStrategy(FedAvg(), config=cfg, max_payload_bytes=10**6)
    msgs = configure(strategy, 2)
    big = compress({k: 1e4 * v for k, v in GLOBAL.items()}, config=CFG)  # float32 values
    _arrays, metrics = strategy.aggregate_train(
        1, [payload_reply(msgs[0], big), payload_reply(msgs[1], blob(1, config=cfg))]
    )
    assert counts(metrics)[:2] == (1, 1)
    assert "float16" in strategy.rejections[0].reason


def test_class3_every_registered_method_accepts_its_own_replies() -> None:
    """The conformance check must never refuse an honest client (each method, matrix and global budget)."""
    from osd_fl import REGISTRY

    for method in sorted(REGISTRY):
        for budget in ("matrix", "global"):
            cfg = CFG.replace(method=method, budget=budget)
            strategy = OSDStrategy(FedAvg(), config=cfg)
            msgs = configure(strategy, 2)
            replies = [payload_reply(m, blob(i, config=cfg)) for i, m in enumerate(msgs)]
            _, metrics = strategy.aggregate_train(1, replies)
            assert counts(metrics)[:2] == (2, 0), (method, budget, strategy.rejections)


# --- 5. one reply's metrics spoil everyone's ---------------------------------------------------------


def _metric_reply(ins: Message, payload: bytes, metrics: dict[str, object]) -> Message:
    reply = payload_reply(ins, payload)
    record = next(iter(reply.content.metric_records.values()))
    for key, value in metrics.items():
        record[key] = value  # type: ignore[assignment]
    return reply


def test_class5_metrics_are_validated_per_reply(caplog: pytest.LogCaptureFixture) -> None:
    strategy = OSDStrategy(FedAvg(), config=CFG)
    msgs = configure(strategy, 4)
    huge_key = "k" * 1_000_000
    replies = [
        _metric_reply(msgs[0], blob(0), {"loss": 1.0}),
        _metric_reply(msgs[1], blob(1), {"loss": 3.0}),
        _metric_reply(msgs[2], blob(2), {"loss": [1.0, 2.0], "round": 999, huge_key: 1.0}),  # list, reserved, long
        _metric_reply(msgs[3], blob(3), {"loss": 2.0, "accepted": 10**6}),
    ]
    with caplog.at_level(logging.INFO):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    assert counts(metrics)[:2] == (4, 0)  # every update counts
    assert metrics["accepted"] == 4  # the strategy's own name, not a client's
    assert metrics["metrics-dropped"] == 4
    assert metrics["loss"] == pytest.approx(2.0)  # the mean of the three replies that carry a number
    assert strategy.history[-1]["round"] == 1
    assert all(huge_key not in r.getMessage() for r in caplog.records)
    assert all(len(r.getMessage()) < 20_000 for r in caplog.records)


# --- 6. the client trusts every number the server sends -----------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [("osd.niter", 10**9), ("osd.oversample", 10**9), ("osd.rank", 10**9), ("osd.importance-batches", 10**9)],
)
def test_class6_settings_beyond_what_can_run_are_refused_by_the_client(key: str, value: int) -> None:
    from tests.test_client_mod import _instruction, _trainer

    msg = _instruction(CFG)
    msg.content.config_records["config"][key] = value
    called: list[int] = []

    def train(m: Message, c: Context) -> Message:
        called.append(1)
        return _trainer()(m, c)

    from strategies.local_grid import make_context

    reply = osd_mod(msg, make_context(5), train)
    field = key.removeprefix("osd.").replace("-", "_")
    assert reply.has_error() and field in str(reply.error.reason) and "must be in" in str(reply.error.reason)
    assert not called


def test_class6_the_server_cannot_be_configured_beyond_the_limits_either() -> None:
    with pytest.raises(ConfigError, match="niter"):
        CompressionConfig(niter=10**9)
    assert "osd.niter" in config_to_record(CompressionConfig(niter=64))


# --- 7. failures that stay silent ----------------------------------------------------------------------


def test_class7_a_run_where_nothing_succeeds_stops_with_the_most_frequent_reason() -> None:
    strategy = OSDStrategy(FedAvg(), config=CFG, max_stalled_rounds=3)
    why = "ValueError: expected loss_fn(model, batch), got CrossEntropyLoss()"
    for server_round in (1, 2):
        msgs = configure(strategy, 3, server_round)
        arrays, metrics = strategy.aggregate_train(server_round, [error_reply(m, why) for m in msgs])
        assert arrays is None and counts(metrics)[2] == 3
    msgs = configure(strategy, 3, 3)
    with pytest.raises(FederationStalled, match="3 rounds in a row") as info:
        strategy.aggregate_train(3, [error_reply(m, why) for m in msgs])
    assert "CrossEntropyLoss" in str(info.value) and "9 times" in str(info.value)


def test_class7_one_good_round_resets_the_count() -> None:
    strategy = OSDStrategy(FedAvg(), config=CFG, max_stalled_rounds=2)
    for server_round, good in ((1, False), (2, True), (3, False), (4, True)):
        msgs = configure(strategy, 2, server_round)
        replies = [payload_reply(m, blob(i)) if good else error_reply(m) for i, m in enumerate(msgs)]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        assert (arrays is not None) == good


@pytest.mark.parametrize(
    "inner",
    [FedMedian(), FedTrimmedAvg(), Krum(), MultiKrum(), Bulyan(), QFedAvg(client_learning_rate=0.1)],
    ids=lambda s: type(s).__name__,
)
def test_class7_robust_inner_strategies_are_refused(inner: Strategy) -> None:
    with pytest.raises(ConfigError, match=type(inner).__name__):
        OSDStrategy(inner, config=CFG)


def test_class7_the_stall_reaches_the_engine_as_an_error() -> None:
    """Through Flower's own round loop (``Strategy.start``): the error propagates out of ``start``."""
    strategy = OSDStrategy(FedAvg(min_available_nodes=2), config=CFG, max_stalled_rounds=2)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        raise ValueError("the train function is broken")

    with pytest.raises(FederationStalled, match="error reply"):
        strategy.start(grid=LocalGrid(app, 2), initial_arrays=tensors_to_record(GLOBAL), num_rounds=5)
