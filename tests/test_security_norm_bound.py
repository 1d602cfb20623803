"""The optional norm bound of OSDStrategy: absolute, relative to the round's median, off by default."""

from __future__ import annotations

import logging
import math
import statistics

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg

import osd_fl.codec
from osd_fl import ConfigError, compress, decompress
from strategies import OSDStrategy
from tests.helpers import AddTracker
from tests.test_faults_strategy import (
    CFG,
    SHAPES,
    assert_model,
    blob,
    configure,
    counts,
    delta,
    payload_reply,
    reference,
)

#: Replies 0..4 are ordinary updates; reply 5 is 40 times larger (a scaled, well-formed update).
OUTLIER = compress({k: 40.0 * v for k, v in delta(5).items()}, config=CFG)
BLOBS = [blob(i) for i in range(5)] + [OUTLIER]
WEIGHTS = [10, 20, 30, 40, 50, 60]


def norm(payload: bytes) -> float:
    """Independent: the L2 norm of the decoded update over all tensors."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in decompress(payload).values()))


NORMS = [norm(b) for b in BLOBS]


def _round(strategy: OSDStrategy, which: list[int]) -> tuple[ArrayRecord | None, MetricRecord | None]:
    msgs = configure(strategy, len(which))
    replies = [payload_reply(m, BLOBS[i], WEIGHTS[i]) for m, i in zip(msgs, which, strict=True)]
    return strategy.aggregate_train(1, replies)


def test_off_by_default_a_large_well_formed_update_is_aggregated() -> None:
    strategy = OSDStrategy(FedAvg(), config=CFG)
    assert strategy.norm_bound is None and strategy.norm_bound_relative is None and not strategy.bounds_norm
    arrays, metrics = _round(strategy, [0, 1, 5])
    assert_model(arrays, reference([(BLOBS[i], WEIGHTS[i]) for i in (0, 1, 5)]))
    assert counts(metrics) == (3, 0, 0, 0)
    assert "rejected-norm" not in metrics  # type: ignore[operator]


def test_absolute_bound_rejects_the_outlier_exactly_as_if_it_never_replied(caplog: pytest.LogCaptureFixture) -> None:
    bound = 2 * max(NORMS[:5])
    assert NORMS[5] > bound
    strategy = OSDStrategy(FedAvg(), config=CFG, norm_bound=bound)
    with caplog.at_level(logging.WARNING, logger="flwr.osd.strategy"):
        arrays, metrics = _round(strategy, [0, 5, 1, 2])
    assert_model(arrays, reference([(BLOBS[i], WEIGHTS[i]) for i in (0, 1, 2)]))
    assert counts(metrics) == (3, 1, 0, 0)
    assert metrics["rejected-norm"] == 1  # type: ignore[index]
    (rejection,) = strategy.rejections
    assert rejection.kind == "norm" and "exceeds the bound" in rejection.reason
    assert f"{NORMS[5]:.6g}" in rejection.reason
    assert any("exceeds the bound" in r.getMessage() for r in caplog.records)


def test_absolute_bound_is_the_l2_norm_of_the_whole_decoded_update() -> None:
    # NORMS is the float32 rebuild's norm; the strategy's is the exact product's: they differ by
    # float32 rounding of the rebuilt entries (~1e-7 relative), so the margins are 1e-5 either side.
    for bound, accepted in ((NORMS[0] * (1 + 1e-5), True), (NORMS[0] * (1 - 1e-5), False)):
        inner = FedAvg(min_available_nodes=1, min_train_nodes=1)  # FedAvg's default waits for 2 nodes
        strategy = OSDStrategy(inner, config=CFG, norm_bound=bound)
        _, metrics = _round(strategy, [0])
        assert counts(metrics)[0] == int(accepted)


def test_relative_bound_rejects_outliers_against_the_round_median() -> None:
    strategy = OSDStrategy(FedAvg(), config=CFG, norm_bound_relative=3.0)
    arrays, metrics = _round(strategy, [0, 1, 2, 5, 3, 4])
    assert_model(arrays, reference([(BLOBS[i], WEIGHTS[i]) for i in range(5)]))
    assert counts(metrics) == (5, 1, 0, 0)
    median = sorted(NORMS)[2:4]
    assert metrics["update-norm-median"] == pytest.approx(sum(median) / 2)  # type: ignore[index]
    ref = sorted(NORMS)[3]  # the median of the five norms above the smallest
    assert metrics["norm-threshold"] == pytest.approx(3.0 * ref)  # type: ignore[index]
    (rejection,) = strategy.rejections
    assert rejection.kind == "norm" and "median" in rejection.reason


def test_relative_median_ignores_replies_that_failed_validation() -> None:
    """The median is over valid replies only: garbage cannot move the threshold."""
    strategy = OSDStrategy(FedAvg(), config=CFG, norm_bound_relative=2.0)
    msgs = configure(strategy, 5)
    replies = [
        payload_reply(msgs[0], BLOBS[0], 10),
        payload_reply(msgs[1], b"junk", 10),
        payload_reply(msgs[2], BLOBS[1], 20),
        payload_reply(msgs[3], BLOBS[2], 30),
        payload_reply(msgs[4], OUTLIER, 60),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics is not None
    assert metrics["update-norm-median"] == pytest.approx(statistics.median([*NORMS[:3], NORMS[5]]))
    assert_model(arrays, reference([(BLOBS[0], 10), (BLOBS[1], 20), (BLOBS[2], 30)]))
    assert counts(metrics) == (3, 2, 0, 0)


def test_absolute_then_relative() -> None:
    """The absolute bound applies first; the median is over what passed it."""
    strategy = OSDStrategy(FedAvg(), config=CFG, norm_bound=NORMS[5] / 2, norm_bound_relative=3.0)
    arrays, metrics = _round(strategy, [0, 1, 2, 3, 4, 5])
    assert counts(metrics) == (5, 1, 0, 0)
    assert metrics["rejected-norm"] == 1  # type: ignore[index]
    assert metrics["update-norm-median"] == pytest.approx(statistics.median(NORMS[:5]))  # type: ignore[index]
    assert "exceeds the bound" in strategy.rejections[0].reason
    assert_model(arrays, reference([(BLOBS[i], WEIGHTS[i]) for i in range(5)]))


def test_bounds_cost_no_rebuild_and_keep_one_tensor_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Norms come from the factors: each tensor of a kept reply is rebuilt once (to be added), one alive at a time."""
    track = AddTracker(monkeypatch)
    leaked, factored = track.leaked, track.factored
    tensors = len(SHAPES)
    strategy = OSDStrategy(FedAvg(), config=CFG, norm_bound_relative=3.0)
    arrays, _ = _round(strategy, [0, 1, 2, 3, 4, 5])
    assert arrays is not None
    # the five within the bound, added once each (low-rank tensors from their factors, no rebuild)
    assert len(leaked) + sum(factored) == 5 * tensors and sum(factored) > 0
    assert leaked == [0] * len(leaked)
    for kwargs in ({"norm_bound": 1e9}, {}):
        track.clear()
        strategy = OSDStrategy(FedAvg(), config=CFG, **kwargs)  # type: ignore[arg-type]
        _round(strategy, [0, 1, 2])
        assert len(leaked) + sum(factored) == 3 * tensors
        assert leaked == [0] * len(leaked)


def _norm_exact(payload: bytes) -> float:
    """Independent of the strategy's Gram-matrix route: rebuild every tensor in float64 and sum squares."""
    from osd_fl import decode
    from osd_fl.payload import Kind

    total = 0.0
    for rec in decode(payload).records:
        if rec.kind == Kind.LOWRANK:
            n, d = rec.matrix_shape
            a = rec.sections[0].dense().astype("float64").reshape(n, rec.rank)
            b = rec.sections[1].dense().astype("float64").reshape(rec.rank, d)
            total += float(((a @ b) ** 2).sum())
        else:
            total += float((rec.sections[0].values.astype("float64") ** 2).sum())
    return math.sqrt(total)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_norm_decision_does_not_depend_on_the_thread_count(threads: int) -> None:
    """The deciding norm is float64 NumPy from the factors: bit-identical under any torch thread count.

    Tolerance from its arithmetic: it equals the float64 rebuild's norm to about (n + d + k) * 2**-53
    relative (< 1e-13 here), so a bound 1e-9 above the exact norm accepts and 1e-9 below rejects.
    """
    from strategies.replies import update_norm

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        norms = [update_norm(osd_fl.codec.decode(b)) for b in BLOBS]
    finally:
        torch.set_num_threads(before)
    torch.set_num_threads(1 if before != 1 else 2)
    try:
        again = [update_norm(osd_fl.codec.decode(b)) for b in BLOBS]
    finally:
        torch.set_num_threads(before)
    assert norms == again  # bit for bit
    exact = _norm_exact(BLOBS[0])
    assert abs(norms[0] - exact) <= 1e-13 * exact
    for bound, accepted in ((exact * (1 + 1e-9), True), (exact * (1 - 1e-9), False)):
        inner = FedAvg(min_available_nodes=1, min_train_nodes=1)
        strategy = OSDStrategy(inner, config=CFG, norm_bound=bound)
        _, metrics = _round(strategy, [0])
        assert counts(metrics)[0] == int(accepted)


def test_one_reply_cannot_lower_the_relative_reference() -> None:
    """The attack: a zero update with weight 5e-324 shifted the plain median and got an honest reply excluded."""
    zero = compress({k: torch.zeros_like(v) for k, v in delta(0).items()}, config=CFG)
    honest = [0, 1, 2]
    factor = 1.05  # reply 3 (norm 1.040) is just inside factor x the honest median (0.992)
    honest_norms = [NORMS[i] for i in (*honest, 3)]
    assert NORMS[3] <= factor * statistics.median(honest_norms)
    strategy = OSDStrategy(FedAvg(), config=CFG, norm_bound_relative=factor)
    msgs = configure(strategy, 5)
    replies = [payload_reply(msgs[j], BLOBS[i], WEIGHTS[i]) for j, i in enumerate((*honest, 3))]
    replies.append(payload_reply(msgs[4], zero, 5e-324))
    _, metrics = strategy.aggregate_train(1, replies)
    # the plain median of the five would be NORMS[1] = 0.979 and 1.05 x 0.979 < 1.040: reply 3 excluded
    assert factor * statistics.median([*honest_norms, 0.0]) < NORMS[3]
    assert counts(metrics)[0] == 5 and not strategy.rejections


def test_reference_is_at_least_the_honest_median_whatever_one_reply_sends() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from strategies.norm_bound import reference_norm

    floats = st.floats(0, 1e6, allow_nan=False)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(floats, min_size=1, max_size=12), floats)
    def check(honest: list[float], extra: float) -> None:
        assert reference_norm([*honest, extra]) >= statistics.median(honest)

    check()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"norm_bound": 0.0},
        {"norm_bound": -1.0},
        {"norm_bound": float("inf")},
        {"norm_bound": float("nan")},
        {"norm_bound_relative": 0.5},
        {"norm_bound_relative": float("nan")},
    ],
)
def test_bounds_are_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="norm_bound"):
        OSDStrategy(config=CFG, **kwargs)  # type: ignore[arg-type]
