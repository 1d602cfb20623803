"""clients.osd_mod and clients.attach_importance with hand-built messages."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from torch import nn

from clients import attach_importance, make_osd_mod, osd_mod, read_compression_config
from osd_fl import CompressionConfig, ErrorFeedback, compress, compute_importance, decompress, payload_budget
from osd_fl.records import (
    IMPORTANCE_RECORD_KEY,
    METRIC_COMPRESS_SECONDS,
    METRIC_DENSE_BYTES,
    METRIC_PAYLOAD_BYTES,
    METRIC_RESIDUAL_IN,
    METRIC_RESIDUAL_OUT,
    PAYLOAD_RECORD_KEY,
    STATE_RESIDUAL_KEY,
    config_to_record,
    record_to_payload,
    record_to_tensors,
    tensors_to_record,
)
from strategies.local_grid import make_context, train_message

# test code here draws from torch's global generator: seeded per test and restored afterwards
pytestmark = pytest.mark.usefixtures("global_rng")

TrainFn = Callable[[Message, Context], Message]

SHAPES = {"fc1.weight": (48, 40), "fc1.bias": (48,), "fc2.weight": (10, 48)}


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


GLOBAL = _state(0)
TRAINED = {k: v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(9)) for k, v in GLOBAL.items()}
UPDATE = {k: TRAINED[k] - GLOBAL[k] for k in GLOBAL}


def _instruction(cfg: CompressionConfig | None, message_type: str = MessageType.TRAIN) -> Message:
    config = ConfigRecord({"lr": 0.1, "server-round": 1})
    if cfg is not None:
        for k, v in config_to_record(cfg).items():
            config[k] = v
    return train_message(
        RecordDict({"arrays": tensors_to_record(GLOBAL), "config": config}), dst_node_id=5, message_type=message_type
    )


def _trainer(
    trained: dict[str, torch.Tensor] | None = None,
    metrics: dict[str, int | float | list[int] | list[float]] | None = None,
    importance: dict[str, torch.Tensor] | None = None,
) -> TrainFn:
    def train(msg: Message, context: Context) -> Message:
        content = RecordDict(
            {
                "arrays": tensors_to_record(trained if trained is not None else TRAINED),
                "metrics": MetricRecord(metrics if metrics is not None else {"num-examples": 32, "loss": 0.5}),
            }
        )
        if importance is not None:
            content[IMPORTANCE_RECORD_KEY] = tensors_to_record(importance)
        return Message(content, reply_to=msg)

    return train


CFG = CompressionConfig(method="osd", rank=2, min_numel=256, importance="grad")


def test_train_reply_is_replaced_by_the_payload() -> None:
    ctx = make_context(5)
    reply = osd_mod(_instruction(CFG), ctx, _trainer())
    assert not reply.has_error()
    assert set(reply.content.array_records) == {PAYLOAD_RECORD_KEY}
    blob = record_to_payload(reply.content[PAYLOAD_RECORD_KEY])
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] == 32 and metrics["loss"] == 0.5  # the train function's metrics are kept
    assert metrics[METRIC_PAYLOAD_BYTES] == len(blob)
    assert metrics[METRIC_DENSE_BYTES] == 4 * sum(t.numel() for t in UPDATE.values())
    assert isinstance(metrics[METRIC_COMPRESS_SECONDS], float) and metrics[METRIC_COMPRESS_SECONDS] >= 0
    assert len(blob) <= payload_budget(SHAPES, CFG) < metrics[METRIC_DENSE_BYTES]
    # What travels is compress(trained - global) under the server's settings, bit for bit.
    assert blob == compress(UPDATE, config=CFG)
    restored = decompress(blob)
    # 1-D travels dense, as int8 under the default value_dtype="auto" (OSD): within half a step of its scale
    step = float(UPDATE["fc1.bias"].abs().max()) / 127
    assert float((restored["fc1.bias"] - UPDATE["fc1.bias"]).abs().max()) <= step / 2 * (1 + 1e-5)
    exact = decompress(compress(UPDATE, config=CFG.replace(value_dtype="float32")))
    assert torch.equal(exact["fc1.bias"], UPDATE["fc1.bias"])  # float32 values: exact


def test_dense_method_carries_the_exact_update() -> None:
    reply = osd_mod(_instruction(CompressionConfig(method="dense")), make_context(5), _trainer())
    restored = decompress(record_to_payload(reply.content[PAYLOAD_RECORD_KEY]))
    for name, delta in UPDATE.items():
        assert torch.equal(restored[name], delta)


def test_server_settings_override_client_defaults() -> None:
    mod = make_osd_mod(CompressionConfig(method="topk", rank=5))
    cfg = CompressionConfig(method="truncsvd", rank=1, min_numel=256)
    reply = mod(_instruction(cfg), make_context(5), _trainer())
    blob = record_to_payload(reply.content[PAYLOAD_RECORD_KEY])
    assert blob == compress(UPDATE, config=cfg)
    # Only some keys sent: the rest come from the client's defaults.
    msg = _instruction(None)
    msg.content.config_records["config"]["osd.rank"] = 1
    got = read_compression_config(msg, CompressionConfig(method="topk", min_numel=256))
    assert got == CompressionConfig(method="topk", rank=1, min_numel=256)


def test_importance_is_used_and_stripped() -> None:
    # float32 values: with int8 at relax 3 these small matrices' whole relaxed factors fit the budget,
    # so Z would only choose c and might leave the bytes unchanged
    cfg = CFG.replace(value_dtype="float32")
    g = torch.Generator().manual_seed(3)
    z = {"fc1.weight": torch.rand(SHAPES["fc1.weight"], generator=g) ** 4, "fc2.weight": torch.ones(10, 48)}
    with_z = osd_mod(_instruction(cfg), make_context(5), _trainer(importance=z))
    assert IMPORTANCE_RECORD_KEY not in with_z.content
    assert set(with_z.content.array_records) == {PAYLOAD_RECORD_KEY}
    blob = record_to_payload(with_z.content[PAYLOAD_RECORD_KEY])
    assert blob == compress(UPDATE, importance=z, config=cfg)
    without = record_to_payload(osd_mod(_instruction(cfg), make_context(5), _trainer()).content[PAYLOAD_RECORD_KEY])
    assert blob != without  # Z changed the selection, so it really reached compress


def test_missing_importance_is_logged_once_per_node(caplog: pytest.LogCaptureFixture) -> None:
    ctx = make_context(5)
    with caplog.at_level(logging.WARNING, logger="flwr.osd.client"):
        for _ in range(3):
            osd_mod(_instruction(CFG), ctx, _trainer())
        osd_mod(_instruction(CFG.replace(importance="ones")), make_context(6), _trainer())
    hits = [r for r in caplog.records if "no importance maps" in r.getMessage()]
    assert len(hits) == 1


def test_error_feedback_keeps_the_residual_in_context_state() -> None:
    cfg = CFG.replace(error_feedback=True, rank=1)
    ctx = make_context(5)
    first = osd_mod(_instruction(cfg), ctx, _trainer())
    assert STATE_RESIDUAL_KEY in ctx.state
    residual = record_to_tensors(ctx.state.array_records[STATE_RESIDUAL_KEY])
    sent = decompress(record_to_payload(first.content[PAYLOAD_RECORD_KEY]))
    for name, delta in UPDATE.items():
        torch.testing.assert_close(residual[name], delta - sent[name])
    first_metrics = first.content.metric_records["metrics"]
    assert first_metrics[METRIC_RESIDUAL_IN] == 0.0
    assert isinstance(first_metrics[METRIC_RESIDUAL_OUT], float) and first_metrics[METRIC_RESIDUAL_OUT] > 0.0

    # Round 2 compresses update + residual; reproduce it with the library directly.
    expected_fb = ErrorFeedback({k: v.clone() for k, v in residual.items()})
    expected = compress(UPDATE, config=cfg, feedback=expected_fb)
    second = osd_mod(_instruction(cfg), ctx, _trainer())
    assert record_to_payload(second.content[PAYLOAD_RECORD_KEY]) == expected
    assert second.content.metric_records["metrics"][METRIC_RESIDUAL_IN] == pytest.approx(ErrorFeedback(residual).norm())
    for name, value in record_to_tensors(ctx.state.array_records[STATE_RESIDUAL_KEY]).items():
        torch.testing.assert_close(value, expected_fb.residuals[name])

    # Switching EF off drops the stale residual.
    osd_mod(_instruction(cfg.replace(error_feedback=False)), ctx, _trainer())
    assert STATE_RESIDUAL_KEY not in ctx.state


def test_other_messages_pass_through_untouched() -> None:
    ctx = make_context(5)
    msg = _instruction(CFG, message_type=MessageType.EVALUATE)
    reply = osd_mod(msg, ctx, _trainer())
    assert set(reply.content.array_records) == {"arrays"}
    assert len(ctx.state) == 0


def test_without_server_settings_the_reply_stays_dense(caplog: pytest.LogCaptureFixture) -> None:
    z = {"fc1.weight": torch.ones(SHAPES["fc1.weight"])}
    with caplog.at_level(logging.WARNING, logger="flwr.osd.client"):
        reply = osd_mod(_instruction(None), make_context(5), _trainer(importance=z))
    assert set(reply.content.array_records) == {"arrays"}  # importance stripped, weights as sent
    assert torch.equal(record_to_tensors(reply.content.array_records["arrays"])["fc1.weight"], TRAINED["fc1.weight"])
    assert any("no 'osd.*' settings" in r.getMessage() for r in caplog.records)


def test_integer_buffers_are_not_sent() -> None:
    global_state = {**GLOBAL, "steps": torch.tensor(3, dtype=torch.int64)}
    trained = {**TRAINED, "steps": torch.tensor(9, dtype=torch.int64)}
    msg = train_message(
        RecordDict({"arrays": tensors_to_record(global_state), "config": config_to_record(CFG)}), dst_node_id=5
    )
    reply = osd_mod(msg, make_context(5), _trainer(trained=trained))
    restored = decompress(record_to_payload(reply.content[PAYLOAD_RECORD_KEY]))
    assert set(restored) == set(SHAPES)


@pytest.mark.parametrize(
    ("trainer", "reason"),
    [
        (_trainer(metrics={"loss": 1.0}), "num-examples"),
        (_trainer(trained={"fc1.weight": TRAINED["fc1.weight"]}), "missing"),
        (_trainer(trained={**TRAINED, "extra": torch.zeros(2)}), "extra"),
        (_trainer(trained={**TRAINED, "fc1.bias": torch.zeros(3)}), "trained shape"),
        (_trainer(trained={**TRAINED, "fc1.bias": torch.full((48,), float("nan"))}), "compression failed"),
    ],
)
def test_bad_train_replies_become_error_replies(trainer: TrainFn, reason: str) -> None:
    reply = osd_mod(_instruction(CFG), make_context(5), trainer)
    assert reply.has_error()
    assert reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert reason in str(reply.error.reason)


def test_invalid_server_settings_become_an_error_reply() -> None:
    msg = _instruction(CFG)
    msg.content.config_records["config"]["osd.rank"] = 0
    called = []

    def train(m: Message, c: Context) -> Message:
        called.append(1)
        return _trainer()(m, c)

    reply = osd_mod(msg, make_context(5), train)
    assert reply.has_error() and "rank" in str(reply.error.reason)
    assert not called  # no wasted training


def test_train_errors_pass_through() -> None:
    def failing(msg: Message, context: Context) -> Message:
        from flwr.app import Error

        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="oom"), reply_to=msg)

    reply = osd_mod(_instruction(CFG), make_context(5), failing)
    assert reply.has_error() and reply.error.reason == "oom"


def _model_and_data() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 48), nn.ReLU(), nn.Linear(48, 10))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 40, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]
    return model, batches


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_attach_importance_follows_the_server_settings() -> None:
    model, batches = _model_and_data()
    cfg = CFG.replace(importance="fisher", importance_batches=2)
    content = RecordDict()
    maps = attach_importance(content, _instruction(cfg), model, batches, _loss)
    assert maps is not None
    expected = compute_importance(model, batches, _loss, form="fisher", num_batches=2)
    assert set(maps) == set(expected) == {"0.weight", "2.weight"}
    stored = record_to_tensors(content.array_records[IMPORTANCE_RECORD_KEY])
    for name, z in expected.items():
        torch.testing.assert_close(stored[name], z)


@pytest.mark.parametrize(
    "cfg",
    [None, CFG.replace(importance="ones"), CFG.replace(method="truncsvd")],
)
def test_attach_importance_does_nothing_when_not_needed(cfg: CompressionConfig | None) -> None:
    model, batches = _model_and_data()
    content = RecordDict()
    assert attach_importance(content, _instruction(cfg), model, batches, _loss) is None
    assert IMPORTANCE_RECORD_KEY not in content
