"""Differential privacy with osd-fl, end to end on the in-process grid.

Supported: Flower's DP mods *inside* osd_mod on the client (they clip, and
LocalDpMod noises, the dense update that osd_mod then compresses), and
Flower's client-side fixed-clipping wrapper *inside* OSDStrategy on the
server (it adds its noise to the decoded mean). Everything else is refused
with an error that names this order.

Flower's DP code draws its noise from NumPy's global generator (and FedAvg
samples nodes with Python's): every run here goes through :func:`_rngs`,
which seeds them when asked and always puts the caller's states back.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod, adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import Mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    Result,
    Strategy,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM as FLOWER_KEY_CLIPPING_NORM
from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyAccountant, PrivacyConfig, SamplingMethod

from clients import osd_mod
from clients.privacy import enclosing_privacy_mod
from osd_fl import CompressionConfig, ConfigError, compress, decompress
from osd_fl.records import PAYLOAD_RECORD_KEY, record_to_payload, record_to_tensors, tensors_to_record
from strategies import ByteMeter, MeteredGrid, OSDStrategy
from strategies.local_grid import LocalGrid
from strategies.privacy import KEY_CLIPPING_NORM, check_inner_strategy_privacy, check_train_config_privacy

SHAPES = {"fc.weight": (48, 40), "fc.bias": (48,)}  # 1968 values: enough for a noise scale within a few %
NUMEL = sum(math.prod(s) for s in SHAPES.values())
CLIP = 1.0
#: Raw update norm per node: two above the clipping norm, one below; and each node's weight.
RAW_NORM = {1001: 4.0, 1002: 2.5, 1003: 0.5}
WEIGHT = {1001: 10, 1002: 20, 1003: 30}
NODES = len(RAW_NORM)


def _randn(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


GLOBAL = _randn(0)


def _raw_update(node: int) -> dict[str, torch.Tensor]:
    """Node ``node``'s update before any clipping, with norm ``RAW_NORM[node]``."""
    d = _randn(node)
    scale = RAW_NORM[node] / _norm(d)
    return {k: v * scale for k, v in d.items()}


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().square().sum()) for v in tensors.values()))


@contextmanager
def _rngs(seed: int | None = None) -> Iterator[None]:
    """Seed NumPy's and Python's global generators if ``seed`` is given; always restore both."""
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    if seed is not None:
        np.random.seed(seed)  # noqa: NPY002 (Flower's DP noise comes from the global generator)
        random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)


class _SpyGrid(LocalGrid):
    """The in-process grid, keeping every train reply the strategy pulls."""

    def __init__(self, app: ClientApp, num_nodes: int) -> None:
        super().__init__(app, num_nodes)
        self.replies: list[Message] = []

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = list(super().pull_messages(message_ids))
        self.replies.extend(m for m in out if m.metadata.message_type == MessageType.TRAIN)
        return out


def _app(app_mods: list[Mod], train_mods: list[Mod] | None = None, calls: list[int] | None = None) -> ClientApp:
    """A ClientApp whose train function adds the node's raw update to the model it received."""
    app = ClientApp(mods=app_mods)

    @app.train(mods=train_mods)
    def train(msg: Message, context: Context) -> Message:
        if calls is not None:
            calls.append(context.node_id)
        received = record_to_tensors(msg.content.array_records["arrays"])
        delta = _raw_update(context.node_id)
        trained = {k: received[k] + delta[k] for k in received}
        content = RecordDict(
            {
                "arrays": tensors_to_record(trained),
                "metrics": MetricRecord({"num-examples": WEIGHT[context.node_id], "loss": 0.5}),
            }
        )
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        metrics = MetricRecord({"num-examples": WEIGHT[context.node_id], "acc": 0.5})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def _fedavg(evaluate: bool = False, nodes: int = NODES) -> FedAvg:
    return FedAvg(
        fraction_evaluate=1.0 if evaluate else 0.0,
        min_available_nodes=nodes,
        min_train_nodes=nodes,
        min_evaluate_nodes=nodes,
    )


def _dp(noise_multiplier: float, evaluate: bool = False) -> DifferentialPrivacyClientSideFixedClipping:
    return DifferentialPrivacyClientSideFixedClipping(_fedavg(evaluate), noise_multiplier, CLIP, NODES)


def _cfg(method: str, **options: Any) -> CompressionConfig:
    return CompressionConfig(method=method, rank=1, min_numel=256, **options)


def _run(strategy: Strategy, app: ClientApp, nodes: int = NODES, seed: int | None = None) -> tuple[Result, _SpyGrid]:
    grid = _SpyGrid(app, nodes)
    with _rngs(seed):
        result = strategy.start(grid=grid, initial_arrays=tensors_to_record(GLOBAL), num_rounds=1)
    return result, grid


def _decoded(grid: _SpyGrid) -> dict[int, dict[str, torch.Tensor]]:
    """Each node's update as the server decodes it, from the replies it received."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for reply in grid.replies:
        assert not reply.has_error(), reply.error.reason
        out[int(reply.metadata.src_node_id)] = decompress(record_to_payload(reply.content[PAYLOAD_RECORD_KEY]))
    assert sorted(out) == sorted(RAW_NORM)
    return out


def _payloads(grid: _SpyGrid) -> dict[int, bytes]:
    return {int(r.metadata.src_node_id): record_to_payload(r.content[PAYLOAD_RECORD_KEY]) for r in grid.replies}


def _mean_model(grid: _SpyGrid) -> dict[str, torch.Tensor]:
    """``W + sum_i(n_i dW_i) / sum_i(n_i)`` from the decoded replies, as OSDStrategy computes it (float64)."""
    acc = {k: torch.zeros(s, dtype=torch.float64) for k, s in SHAPES.items()}
    total = 0.0
    for reply in grid.replies:
        node = int(reply.metadata.src_node_id)
        for name, delta in decompress(record_to_payload(reply.content[PAYLOAD_RECORD_KEY])).items():
            acc[name].add_(delta, alpha=float(WEIGHT[node]))
        total += WEIGHT[node]
    return {k: acc[k].mul_(1.0 / total).add_(GLOBAL[k]).to(GLOBAL[k].dtype) for k in SHAPES}


def _model(result: Result) -> dict[str, torch.Tensor]:
    return record_to_tensors(result.arrays)


def _accepted(strategy: OSDStrategy) -> None:
    assert [r for r in strategy.rejections if r.kind != "evaluate"] == []
    assert strategy.missing == []


# --- (a) client-side fixed clipping: fixedclipping_mod inside osd_mod, the DP wrapper inside OSDStrategy -------


@pytest.mark.parametrize(("method", "rtol"), [("dense", 1e-6), ("fp16", 1e-3)])
def test_fixed_clipping_clips_the_dense_update_that_is_compressed(method: str, rtol: float) -> None:
    """ClientApp(mods=[osd_mod, fixedclipping_mod]): the payload is the update clipped to clipping_norm."""
    strategy = OSDStrategy(_dp(noise_multiplier=0.0), config=_cfg(method))
    result, grid = _run(strategy, _app([osd_mod, fixedclipping_mod]))
    _accepted(strategy)
    for node, update in _decoded(grid).items():
        raw = _raw_update(node)
        factor = min(1.0, CLIP / RAW_NORM[node])  # Flower's flat clipping: scale the whole update
        assert _norm(update) == pytest.approx(RAW_NORM[node] * factor, rel=rtol)
        for name, value in update.items():
            torch.testing.assert_close(value, raw[name] * factor, rtol=rtol, atol=1e-6)
    # No noise (noise_multiplier=0): the new model is exactly OSDStrategy's decoded weighted mean.
    new, expected = _model(result), _mean_model(grid)
    assert all(torch.equal(new[k], expected[k]) for k in SHAPES)
    assert result.train_metrics_clientapp[1]["accepted"] == NODES


@pytest.mark.parametrize("method", ["truncsvd", "osd"])
def test_fixed_clipping_with_a_low_rank_method(method: str) -> None:
    """Per-function mods (evaluate keeps working): the compressed update is the clipped one, norm <= clip."""
    dense_strategy = OSDStrategy(_dp(0.0, evaluate=True), config=_cfg("dense"))
    _, dense_grid = _run(dense_strategy, _app([osd_mod], [fixedclipping_mod]))
    clipped = _decoded(dense_grid)  # exactly the tensors osd_mod compresses after fixedclipping_mod

    cfg = _cfg(method)
    strategy = OSDStrategy(_dp(0.0, evaluate=True), config=cfg)
    result, grid = _run(strategy, _app([osd_mod], [fixedclipping_mod]))
    _accepted(strategy)
    payloads = _payloads(grid)
    for node, update in _decoded(grid).items():
        assert _norm(update) <= CLIP * (1 + 1e-6)
        assert payloads[node] == compress(clipped[node], config=cfg)  # compression of the clipped update, byte for byte
    assert result.evaluate_metrics_clientapp[1]["acc"] == pytest.approx(0.5)  # fixedclipping_mod only on train


def test_fixed_clipping_noise_is_added_to_the_decoded_mean() -> None:
    """The wrapper adds N(0, (z * C / m)^2) to every value of the new model, once, after the mean."""
    z = 1.5
    strategy = OSDStrategy(_dp(noise_multiplier=z), config=_cfg("dense"))
    result, grid = _run(strategy, _app([osd_mod, fixedclipping_mod]))
    _accepted(strategy)
    new, mean = _model(result), _mean_model(grid)
    noise = torch.cat([(new[k].double() - mean[k].double()).reshape(-1) for k in SHAPES])
    expected_std = z * CLIP / NODES
    assert noise.numel() == NUMEL
    assert float(noise.std()) == pytest.approx(expected_std, rel=0.12)  # 6 standard errors of the estimate
    assert abs(float(noise.mean())) < 5 * expected_std / math.sqrt(NUMEL)
    # The clients' updates carry no noise: only the clipping (norms as without noise).
    for node, update in _decoded(grid).items():
        assert _norm(update) == pytest.approx(min(RAW_NORM[node], CLIP), rel=1e-6)


# --- (b) LocalDpMod inside osd_mod: clipping and local noise before compression -----------------------------


def _local_dp(sensitivity: float) -> LocalDpMod:
    return LocalDpMod(clipping_norm=CLIP, sensitivity=sensitivity, epsilon=2.0, delta=1e-5)


def _local_std(sensitivity: float) -> float:
    return sensitivity * math.sqrt(2 * math.log(1.25 / 1e-5)) / 2.0  # LocalDpMod's Gaussian mechanism


def test_local_dp_clips_and_noises_the_dense_update_before_compression() -> None:
    clean_strategy = OSDStrategy(_fedavg(), config=_cfg("dense"))
    _, clean_grid = _run(clean_strategy, _app([osd_mod], [_local_dp(sensitivity=0.0)]))
    clipped = _decoded(clean_grid)
    for node, update in clipped.items():  # sensitivity 0: clipping only
        assert _norm(update) == pytest.approx(min(RAW_NORM[node], CLIP), rel=1e-6)

    sensitivity = 0.01
    strategy = OSDStrategy(_fedavg(), config=_cfg("dense"))
    _, grid = _run(strategy, _app([osd_mod, _local_dp(sensitivity)]), seed=3)
    _accepted(strategy)
    for node, update in _decoded(grid).items():
        noise = torch.cat([(update[k] - clipped[node][k]).reshape(-1) for k in SHAPES]).double()
        assert float(noise.std()) == pytest.approx(_local_std(sensitivity), rel=0.12)


def test_local_dp_then_low_rank_compresses_the_noised_update() -> None:
    """Same seed, same noise: the truncsvd payload is the compression of the dense run's clipped, noised update."""
    app = _app([osd_mod], [_local_dp(sensitivity=0.01)])
    strategy = OSDStrategy(_fedavg(nodes=1), config=_cfg("dense"))
    _, dense_grid = _run(strategy, app, nodes=1, seed=5)
    noised = decompress(record_to_payload(dense_grid.replies[0].content[PAYLOAD_RECORD_KEY]))

    cfg = _cfg("truncsvd")
    strategy = OSDStrategy(_fedavg(nodes=1), config=cfg)
    _, grid = _run(strategy, app, nodes=1, seed=5)
    _accepted(strategy)
    payload = record_to_payload(grid.replies[0].content[PAYLOAD_RECORD_KEY])
    assert payload == compress(noised, config=cfg)
    raw = _raw_update(1001)
    clipped_only = {k: v * (CLIP / RAW_NORM[1001]) for k, v in raw.items()}
    assert payload != compress(clipped_only, config=cfg)  # the noise was there before compression


# --- wrong order on the client: a Flower DP mod outside osd_mod ------------------------------------------------


@pytest.mark.parametrize(
    ("outer", "name", "server_dp"),
    [
        (fixedclipping_mod, "fixedclipping_mod", True),
        (adaptiveclipping_mod, "adaptiveclipping_mod", True),
        (_local_dp(0.0), "LocalDpMod", False),
    ],
)
@pytest.mark.parametrize("per_function", [False, True])
def test_privacy_mod_outside_osd_mod_is_an_error_naming_the_order(
    outer: Mod, name: str, server_dp: bool, per_function: bool
) -> None:
    calls: list[int] = []
    # per_function: the privacy mod app-wide, osd_mod on train only; still outside it
    app = _app([outer], [osd_mod], calls=calls) if per_function else _app([outer, osd_mod], calls=calls)
    inner: Strategy = _dp(0.0) if server_dp else _fedavg()
    strategy = OSDStrategy(inner, config=_cfg("dense"))
    result, _ = _run(strategy, app)
    assert calls == []  # refused before training
    assert strategy.missing == []  # the error reply reached the server as this node's answer
    assert sorted(r.node_id for r in strategy.rejections) == sorted(RAW_NORM)
    for rejection in strategy.rejections:
        assert rejection.kind == "error"
        assert f"{name} runs outside osd_mod" in rejection.reason
        assert f"ClientApp(mods=[osd_mod, {name}])" in rejection.reason
    assert result.train_metrics_clientapp[1]["accepted"] == 0
    assert len(result.arrays) == 0  # no round changed the model


def test_no_privacy_mod_is_found_outside_a_plain_call() -> None:
    assert enclosing_privacy_mod() is None


# --- the server: what may run inside OSDStrategy ----------------------------------------------------------------


class _Accountant:
    """Enough of Flower's PrivacyAccountant for the wrapper's constructor."""

    config = PrivacyConfig(
        target_delta=1e-5,
        population_size=NODES,
        neighboring_relation=next(iter(NeighboringRelation)),
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
    )


def _server_side_fixed() -> Strategy:
    return DifferentialPrivacyServerSideFixedClipping(FedAvg(), 1.0, CLIP, NODES)


_REFUSALS: dict[str, tuple[Callable[[], Strategy], CompressionConfig | None, str]] = {
    "server-side fixed": (_server_side_fixed, None, "clip that average"),
    "server-side adaptive": (
        lambda: DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), 0.0, NODES),
        None,
        "clip that average",
    ),
    "client-side adaptive": (
        lambda: DifferentialPrivacyClientSideAdaptiveClipping(FedAvg(), 0.0, NODES),
        None,
        "'norm_bit'",
    ),
    "accountant": (
        lambda: DifferentialPrivacyClientSideFixedClipping(
            FedAvg(), 1.0, CLIP, NODES, accountant=cast(PrivacyAccountant, _Accountant())
        ),
        None,
        "every round would be skipped",
    ),
    "error feedback": (lambda: _dp(1.0), _cfg("osd", error_feedback=True), "error_feedback=True"),
    "nested server-side": (
        lambda: DifferentialPrivacyClientSideFixedClipping(_server_side_fixed(), 1.0, CLIP, NODES),
        None,
        "DifferentialPrivacyServerSideFixedClipping cannot run inside OSDStrategy",
    ),
}


@pytest.mark.parametrize("case", sorted(_REFUSALS))
def test_check_refuses_what_cannot_be_correct_behind_one_synthetic_reply(case: str) -> None:
    make, cfg, why = _REFUSALS[case]
    with pytest.raises(ConfigError) as info:
        check_inner_strategy_privacy(make(), cfg)
    message = str(info.value)
    assert why in message
    if case == "error feedback":
        assert "error_feedback=False" in message
    elif case != "accountant":  # the others name the composition that works
        assert "OSDStrategy(DifferentialPrivacyClientSideFixedClipping(FedAvg(...)" in message
        assert "fixedclipping_mod" in message


@pytest.mark.parametrize(
    "inner",
    [
        FedAvg(),
        DifferentialPrivacyClientSideFixedClipping(FedAvg(), 1.0, CLIP, NODES),
        DifferentialPrivacyClientSideFixedClipping(FedAdam(), 1.0, CLIP, NODES),
    ],
)
def test_check_accepts_client_side_fixed_clipping(inner: Strategy) -> None:
    check_inner_strategy_privacy(inner, _cfg("osd"))
    check_inner_strategy_privacy(inner)


def test_osd_strategy_refuses_server_side_clipping_inside() -> None:
    """Needs ``check_inner_strategy_privacy(self.inner, self.config)`` in ``OSDStrategy.__init__``."""
    with pytest.raises(ConfigError, match="OSDStrategy\\(DifferentialPrivacyClientSideFixedClipping"):
        OSDStrategy(DifferentialPrivacyServerSideFixedClipping(FedAvg(), 1.0, CLIP, NODES), config=_cfg("osd"))


def test_clipping_norm_key_is_flowers() -> None:
    assert KEY_CLIPPING_NORM == FLOWER_KEY_CLIPPING_NORM


# --- wrong order on the server: a Flower DP wrapper around OSDStrategy ------------------------------------------


def test_train_config_check_detects_a_client_side_wrapper_outside() -> None:
    config = ConfigRecord({KEY_CLIPPING_NORM: CLIP})
    grid = LocalGrid(ClientApp(), 1)
    with pytest.raises(ConfigError, match="OSDStrategy\\(DifferentialPrivacyClientSideFixedClipping"):
        check_train_config_privacy(FedAvg(), config, grid)
    # Not when OSDStrategy.start metered the grid (a user's own key), nor when the wrapper is inside.
    check_train_config_privacy(FedAvg(), config, MeteredGrid(grid, ByteMeter()))
    check_train_config_privacy(_dp(1.0), config, grid)
    check_train_config_privacy(FedAvg(), ConfigRecord({"lr": 0.1}), grid)


def test_client_side_wrapper_around_osd_strategy_is_refused() -> None:
    """Needs ``check_train_config_privacy(self.inner, config, grid)`` at the top of ``OSDStrategy.configure_train``.

    Without it this order runs, with the noise right, but nothing is metered
    (start() is the wrapper's, so OSDStrategy never wraps the grid).
    """
    wrapped = DifferentialPrivacyClientSideFixedClipping(OSDStrategy(_fedavg(), config=_cfg("dense")), 0.0, CLIP, NODES)
    with pytest.raises(ConfigError, match="OSDStrategy is wrapped by a differential-privacy wrapper"):
        _run(wrapped, _app([osd_mod, fixedclipping_mod]))


def test_server_side_wrapper_around_osd_strategy_fails_in_flower() -> None:
    """Flower's own error: it clips each reply's arrays, and the reply holds the compressed payload."""
    wrapped = DifferentialPrivacyServerSideFixedClipping(OSDStrategy(_fedavg(), config=_cfg("dense")), 0.0, CLIP, NODES)
    with pytest.raises(TypeError, match=r"osd-fl\.payload"):
        _run(wrapped, _app([osd_mod]))
