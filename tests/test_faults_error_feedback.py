"""Error-feedback state lost (SuperNode restart) or stale (skipped rounds): the client keeps working.

What happens to the residual (also in ``docs/security.md``):

* lost: the client restarts from ``e = 0`` and sends exactly what a new client
  would; the residual it held at the restart is the only thing lost;
* stale: the residual is carried in full into the next round the client
  trains, however many rounds it missed;
* unusable (another model's shapes, NaN/Inf, unreadable): dropped with a
  warning, the client goes on as if it had been lost.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from clients import osd_mod
from osd_fl import CompressionConfig, ErrorFeedback, compress, decompress
from osd_fl.records import (
    METRIC_RESIDUAL_IN,
    PAYLOAD_RECORD_KEY,
    STATE_COMPRESSOR_KEY,
    STATE_RESIDUAL_KEY,
    config_to_record,
    record_to_payload,
    record_to_tensors,
    tensors_to_record,
)
from strategies import OSDStrategy
from strategies.local_grid import LocalGrid, make_context, train_message

SHAPES = {"fc1.weight": (40, 32), "fc1.bias": (40,), "fc2.weight": (6, 40)}
CFG = CompressionConfig(method="osd", rank=1, min_numel=128, importance="ones", error_feedback=True)


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g) for k, s in SHAPES.items()}


def _instruction(global_model: Mapping[str, torch.Tensor], server_round: int, cfg: CompressionConfig = CFG) -> Message:
    config = ConfigRecord({"server-round": server_round})
    for k, v in config_to_record(cfg).items():
        config[k] = v
    return train_message(RecordDict({"arrays": tensors_to_record(dict(global_model)), "config": config}), dst_node_id=7)


def _client_round(
    ctx: Context,
    global_model: Mapping[str, torch.Tensor],
    dw: Mapping[str, torch.Tensor],
    server_round: int,
    cfg: CompressionConfig = CFG,
) -> tuple[bytes, float]:
    """One train round of a client that moves the model by ``dw``; returns (payload, residual-in norm)."""

    def train(msg: Message, context: Context) -> Message:
        trained = {k: global_model[k] + dw[k] for k in global_model}
        content = RecordDict({"arrays": tensors_to_record(trained), "metrics": MetricRecord({"num-examples": 8})})
        return Message(content, reply_to=msg)

    reply = osd_mod(_instruction(global_model, server_round, cfg), ctx, train)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content.metric_records["metrics"]
    return record_to_payload(reply.content[PAYLOAD_RECORD_KEY]), float(metrics[METRIC_RESIDUAL_IN])  # type: ignore[arg-type]


def _actual(model: Mapping[str, torch.Tensor], dw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The update the client really forms: (W + dW) - W, which differs from dW by rounding."""
    return {k: (model[k] + dw[k]) - model[k] for k in model}


def _residual(ctx: Context) -> dict[str, torch.Tensor]:
    return record_to_tensors(ctx.state.array_records[STATE_RESIDUAL_KEY])


def _updates(n: int) -> list[dict[str, torch.Tensor]]:
    return [_state(50 + i, 0.05) for i in range(n)]


def test_lost_state_restarts_from_zero_and_only_the_held_residual_is_lost() -> None:
    ctx = make_context(7)
    model = _state(0)
    dws = _updates(4)
    sent: list[dict[str, torch.Tensor]] = []
    lost: dict[str, torch.Tensor] = {}
    actual: list[dict[str, torch.Tensor]] = []
    for r, dw in enumerate(dws, start=1):
        if r == 3:  # the SuperNode restarts before round 3: context.state is empty again
            lost = _residual(ctx)
            ctx.state = RecordDict()
        blob, residual_in = _client_round(ctx, model, dw, r)
        actual.append(_actual(model, dw))
        if r == 3:
            assert residual_in == 0.0
            assert blob == compress(actual[-1], config=CFG)  # byte for byte what a brand-new client sends
            for name, e in _residual(ctx).items():
                torch.testing.assert_close(e, actual[-1][name] - decompress(blob)[name])
        else:
            assert (residual_in > 0.0) == (r > 1)
        sent.append(decompress(blob))
        model = {k: model[k] + sent[-1][k] for k in model}
    # Telescoping with a restart: sent + final residual + what was lost = every true update.
    final = _residual(ctx)
    for name in SHAPES:
        total = sum(a[name] for a in actual)
        torch.testing.assert_close(sum(s[name] for s in sent) + final[name] + lost[name], total, atol=1e-5, rtol=1e-5)
    assert float(sum(v.square().sum() for v in lost.values())) > 0  # something really was lost


def test_stale_residual_is_carried_in_full_into_the_next_round_the_client_trains() -> None:
    ctx = make_context(7)
    model = _state(0)
    dw1, dw4 = _updates(2)
    blob1, _ = _client_round(ctx, model, dw1, 1)
    e1 = _residual(ctx)
    # Rounds 2 and 3 happen without this client: the global model moves on.
    model = {k: v + 0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(3)) for k, v in model.items()}
    blob4, residual_in = _client_round(ctx, model, dw4, 4)
    assert residual_in == pytest.approx(ErrorFeedback(e1).norm())
    fb = ErrorFeedback({k: v.clone() for k, v in e1.items()})
    dw4 = _actual(model, dw4)
    assert blob4 == compress(dw4, config=CFG, feedback=fb)  # dW4 + e1, compressed
    for name, e in _residual(ctx).items():
        torch.testing.assert_close(e, dw4[name] + e1[name] - decompress(blob4)[name], atol=1e-6, rtol=0)
    del blob1


def _expected_without(name: str, dw: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor]) -> bytes:
    kept = {k: v.clone() for k, v in residual.items() if k != name}
    return compress(dw, config=CFG, feedback=ErrorFeedback(kept))


def test_a_residual_of_another_shape_is_dropped() -> None:
    ctx = make_context(7)
    model = _state(0)
    dw = _updates(1)[0]
    residual = {k: 0.01 * torch.ones(s) for k, s in SHAPES.items()}
    residual["fc1.weight"] = torch.ones(32, 40)  # the model changed shape since
    ctx.state[STATE_RESIDUAL_KEY] = tensors_to_record(residual)
    blob, _ = _client_round(ctx, model, dw, 5)
    assert blob == _expected_without("fc1.weight", _actual(model, dw), residual)
    assert tuple(_residual(ctx)["fc1.weight"].shape) == (40, 32)


def test_a_non_finite_residual_is_dropped_instead_of_failing_every_round(caplog: pytest.LogCaptureFixture) -> None:
    ctx = make_context(7)
    model = _state(0)
    dw = _updates(1)[0]
    residual = {k: 0.01 * torch.ones(s) for k, s in SHAPES.items()}
    residual["fc2.weight"][0, 0] = float("nan")
    ctx.state[STATE_RESIDUAL_KEY] = tensors_to_record(residual)
    with caplog.at_level(logging.WARNING, logger="flwr.osd.client"):
        blob, _ = _client_round(ctx, model, dw, 2)  # used to become an error reply, every round
    assert any("non-finite" in r.getMessage() for r in caplog.records)
    assert blob == _expected_without("fc2.weight", _actual(model, dw), residual)
    assert all(bool(torch.isfinite(v).all()) for v in _residual(ctx).values())
    _client_round(ctx, model, dw, 3)  # and the next round is fine too


def test_unreadable_state_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    ctx = make_context(7)
    raw = Array(dtype="float32", shape=(3,), stype="not-numpy", data=b"\x00" * 12)
    ctx.state[STATE_RESIDUAL_KEY] = ArrayRecord({"fc1.bias": raw})
    ctx.state[STATE_COMPRESSOR_KEY] = ArrayRecord({"x": raw})
    dw = _updates(1)[0]
    with caplog.at_level(logging.WARNING, logger="flwr.osd.client"):
        blob, residual_in = _client_round(ctx, _state(0), dw, 2)
    assert residual_in == 0.0 and blob == compress(_actual(_state(0), dw), config=CFG)
    assert any("cannot read" in r.getMessage() for r in caplog.records)


def test_powersgd_warm_start_lost_starts_cold() -> None:
    cfg = CFG.replace(method="powersgd")
    ctx = make_context(7)
    model = _state(0)
    dw1, dw2 = _updates(2)
    _client_round(ctx, model, dw1, 1, cfg)
    assert STATE_COMPRESSOR_KEY in ctx.state
    ctx.state = RecordDict()
    blob, _ = _client_round(ctx, model, dw2, 2, cfg)
    assert blob == compress(_actual(model, dw2), config=cfg)  # cold start: as a new client


def test_restarts_and_skipped_rounds_in_a_whole_run() -> None:
    """LocalGrid + OSDStrategy with EF: a node restarts, another is not sampled every round; all replies pass."""
    nodes, rounds = 4, 5
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        server_round = int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
        pid = int(context.node_config["partition-id"])
        if pid == 0 and server_round == 3:
            context.state = RecordDict()  # restart (LocalGrid keeps the Context object)
        current = record_to_tensors(msg.content.array_records["arrays"])
        dw = _state(1000 * server_round + pid, 0.05)
        trained = {k: current[k] + dw[k] for k in current}
        content = RecordDict({"arrays": tensors_to_record(trained), "metrics": MetricRecord({"num-examples": 4 + pid})})
        return osd_mod(msg, context, lambda m, c: Message(content, reply_to=m))

    grid = LocalGrid(app, nodes)
    strategy = OSDStrategy(FedAvg(fraction_train=0.5, min_train_nodes=2, fraction_evaluate=0.0), config=CFG)
    models: list[dict[str, torch.Tensor]] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        models.append(record_to_tensors(arrays))
        return MetricRecord({})

    result = strategy.start(
        grid=grid, initial_arrays=tensors_to_record(_state(0)), num_rounds=rounds, evaluate_fn=evaluate_fn
    )
    for r in range(1, rounds + 1):
        m = result.train_metrics_clientapp[r]
        assert (m["accepted"], m["rejected"], m["failed"]) == (2, 0, 0)
    assert strategy.rejections == [] and strategy.missing == []
    assert len(models) == rounds + 1
    assert all(bool(torch.isfinite(t).all()) for t in models[-1].values())
    assert any(not torch.equal(models[-1][k], models[0][k]) for k in SHAPES)
