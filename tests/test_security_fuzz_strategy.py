"""Property-based fuzzing of the server's reply validation (``OSDStrategy.aggregate_train``).

Each case is one round with two sampled nodes: an honest reply and a hostile
one. The hostile reply is any case of ``test_security_fuzz_decoder`` (random
bytes, flips, truncations, edited headers with a recomputed CRC, wrong
shapes, bad positions, NaN/Inf, size bombs) derived from a valid payload of
the strategy's own method, wrapped in a reply whose framing
(``ArrayRecord``/``Array`` metadata, extra or missing records) and weight
(``num-examples``: zero, negative, NaN, Inf, huge, a list) may be broken too.

The oracle: ``aggregate_train`` never raises; every reply is counted once
(``accepted + rejected + failed == 2``); the hostile reply is rejected
whenever it is invalid by construction; and the new global model is exactly
the honest update alone when the hostile reply was rejected, or the weighted
average of both *decoded independently* (``osd_fl.decompress``) when it was
accepted, i.e. a reply that gets through is one a correct client could have
sent.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from osd_fl import CompressionConfig, PayloadError, compress, decompress
from osd_fl.records import PAYLOAD_ARRAY_KEY, PAYLOAD_RECORD_KEY, PAYLOAD_STYPE, payload_to_record, tensors_to_record
from strategies import OSDStrategy
from strategies.local_grid import LocalGrid
from tests.test_security_fuzz_decoder import Case, Specs, draw_case

FAST_EXAMPLES = 100
LONG_EXAMPLES = 10_000

SHAPES = {"fc1.weight": (24, 20), "fc1.bias": (24,), "fc2.weight": (6, 24)}
SPECS: Specs = {k: (s, "float32") for k, s in SHAPES.items()}
METHODS = ["osd", "truncsvd", "magtruncsvd", "topk", "powersgd", "dense", "fp16", "int8"]


def _state(seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g) for k, s in SHAPES.items()}


GLOBAL = _state(0, 1.0)
GLOBAL_RECORD = tensors_to_record(GLOBAL)


CONFIGS = {m: CompressionConfig(method=m, rank=2, min_numel=64, importance="ones") for m in METHODS}


def _cfg(method: str) -> CompressionConfig:
    return CONFIGS[method]  # built once: CompressionConfig validation is slow next to a round


GOOD = {m: compress(_state(1, 0.05), config=_cfg(m)) for m in METHODS}
#: Valid payloads of each method that the hostile cases are derived from.
SOURCES = {
    m: [
        compress(_state(2 + i, 0.05), config=_cfg(m).replace(value_dtype=v))
        for i, v in enumerate(("float32", "float16"))
    ]
    for m in METHODS
}
GOOD_WEIGHT = 10.0

_GRID = LocalGrid(ClientApp(), 2)


def _reply(ins: Message, records: dict[str, ArrayRecord], metrics: list[MetricRecord]) -> Message:
    content = RecordDict({**records, **{f"m{i}": m for i, m in enumerate(metrics)}})
    return Message(content, reply_to=ins)


FRAMINGS = [
    "ok",
    "stype",
    "dtype",
    "shape",
    "extra array",
    "other array name",
    "no payload record",
    "payload under another key",
    "extra record",
    "two metric records",
    "no metric record",
]
WEIGHTS: list[int | float | list[int]] = [
    0,
    -1,
    -7.5,
    float("nan"),
    float("inf"),
    -float("inf"),
    2**53 + 1,
    2**62,
    1e300,
    [1, 2],
]


def _framed(framing: str, blob: bytes) -> dict[str, ArrayRecord]:
    good = payload_to_record(blob)
    if framing == "ok":
        return {PAYLOAD_RECORD_KEY: good}
    if framing == "stype":
        return {PAYLOAD_RECORD_KEY: ArrayRecord({PAYLOAD_ARRAY_KEY: Array(np.frombuffer(blob, np.uint8).copy())})}
    if framing == "dtype":
        arr = Array(dtype="int8", shape=(len(blob),), stype=PAYLOAD_STYPE, data=blob)
        return {PAYLOAD_RECORD_KEY: ArrayRecord({PAYLOAD_ARRAY_KEY: arr})}
    if framing == "shape":
        arr = Array(dtype="uint8", shape=(len(blob) + 1,), stype=PAYLOAD_STYPE, data=blob)
        return {PAYLOAD_RECORD_KEY: ArrayRecord({PAYLOAD_ARRAY_KEY: arr})}
    if framing == "extra array":
        extra = Array(dtype="uint8", shape=(1,), stype=PAYLOAD_STYPE, data=b"\x00")
        return {PAYLOAD_RECORD_KEY: ArrayRecord({PAYLOAD_ARRAY_KEY: good[PAYLOAD_ARRAY_KEY], "more": extra})}
    if framing == "other array name":
        return {PAYLOAD_RECORD_KEY: ArrayRecord({"blob": good[PAYLOAD_ARRAY_KEY]})}
    if framing == "no payload record":
        return {}
    if framing == "payload under another key":
        return {"arrays": good}
    assert framing in ("extra record", "two metric records", "no metric record")
    return (
        {PAYLOAD_RECORD_KEY: good, "arrays": GLOBAL_RECORD} if framing == "extra record" else {PAYLOAD_RECORD_KEY: good}
    )


def _reference(pairs: Iterable[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """``W + sum_i n_i dW_i / sum_i n_i`` in float64, from independently decoded updates."""
    items = list(pairs)
    total = sum(w for _, w in items)
    return {
        name: (w0.double() + sum(w * upd[name].double() for upd, w in items) / total).float()
        for name, w0 in GLOBAL.items()
    }


GOOD_ONLY = {m: _reference([(decompress(GOOD[m]), GOOD_WEIGHT)]) for m in METHODS}

_COUNTS: dict[str, int] = {}


def check_round(method: str, case: Case, framing: str, weight: int | float | list[int], bad_first: bool) -> None:
    max_payload = None
    must_reject = case.must_reject
    if case.max_bytes is not None:  # the decoder's max_bytes becomes the server's max_payload_bytes
        max_payload = max(case.max_bytes, len(GOOD[method]))
        must_reject = len(case.blob) > max_payload
    inner = FedAvg(min_available_nodes=2, min_train_nodes=2, fraction_evaluate=0.0)
    strategy = OSDStrategy(inner, config=_cfg(method), max_payload_bytes=max_payload)
    ins = sorted(
        strategy.configure_train(1, GLOBAL_RECORD, ConfigRecord(), _GRID), key=lambda m: m.metadata.dst_node_id
    )
    good = _reply(ins[0], {PAYLOAD_RECORD_KEY: payload_to_record(GOOD[method])}, [MetricRecord({"num-examples": 10})])
    metrics = [MetricRecord({"num-examples": weight})]
    if framing == "two metric records":
        metrics.append(MetricRecord({"num-examples": 1}))
    elif framing == "no metric record":
        metrics = []
    bad = _reply(ins[1], _framed(framing, case.blob), metrics)
    replies = [bad, good] if bad_first else [good, bad]

    arrays, result = strategy.aggregate_train(1, replies)  # must never raise

    assert result is not None
    counts = (result["accepted"], result["rejected"], result["failed"])
    assert counts in ((1, 1, 0), (2, 0, 0)) and result["no-reply"] == 0  # each reply counted once, none failed
    bad_node = ins[1].metadata.dst_node_id
    rejected = [r for r in strategy.rejections if r.node_id == bad_node]
    assert all(r.node_id == bad_node and r.reason for r in strategy.rejections)  # the honest reply always passes
    # Rejections come from the validators, not from an unexpected exception caught as a last resort.
    assert not any(r.reason.startswith("validation raised") for r in rejected), rejected
    limit = strategy.payload_limit(GLOBAL_RECORD)
    weight_ok = not isinstance(weight, (bool, list)) and math.isfinite(float(weight)) and 0 < float(weight) <= 2**53
    invalid = must_reject or framing != "ok" or not weight_ok
    if rejected:
        assert counts == (1, 1, 0)
        want = GOOD_ONLY[method]
    else:
        assert not invalid, f"accepted a hostile reply: {case.label}, framing {framing}, weight {weight!r}"
        assert counts == (2, 0, 0)
        try:  # what got through must be a payload a correct client could send
            update = decompress(case.blob, expected=SPECS, max_bytes=limit)
        except PayloadError as exc:
            raise AssertionError(f"the strategy accepted what the decoder rejects: {exc}") from None
        want = _reference([(decompress(GOOD[method]), GOOD_WEIGHT), (update, float(weight))])  # type: ignore[arg-type]
    if arrays is None:  # only when the average left float32 (huge but finite accepted values)
        assert not rejected and not all(bool(torch.isfinite(t).all()) for t in want.values())
        return
    got = {k: torch.from_numpy(v.numpy().copy()) for k, v in arrays.items()}
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6)


def _strategy_property(max_examples: int) -> Callable[[], None]:
    @settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def prop(data: st.DataObject) -> None:
        _COUNTS["strategy"] = _COUNTS.get("strategy", 0) + 1
        method = data.draw(st.sampled_from(METHODS), label="method")
        case = draw_case(data, SOURCES[method], SPECS, strict=True)
        framing = data.draw(st.sampled_from(FRAMINGS) if data.draw(st.integers(0, 3)) == 0 else st.just("ok"))
        weight: int | float | list[int] = data.draw(
            st.one_of(st.integers(1, 10**6), st.sampled_from(WEIGHTS))
            if data.draw(st.integers(0, 3)) == 0
            else st.integers(1, 1000),
            label="weight",
        )
        check_round(method, case, framing, weight, data.draw(st.booleans(), label="bad first"))

    return prop


@pytest.fixture(autouse=True)
def _quiet_strategy_logs() -> Iterator[None]:
    """Thousands of rejections: keep the warnings out of the captured log."""
    loggers = [logging.getLogger(n) for n in ("flwr", "flwr.osd.strategy")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


def test_fuzz_strategy_validation() -> None:
    """Default suite: a few dozen hostile rounds."""
    _strategy_property(FAST_EXAMPLES)()


@pytest.mark.slow
def test_fuzz_strategy_validation_long(capsys: pytest.CaptureFixture[str]) -> None:
    """Long run (``-m slow``): prints count and time."""
    _COUNTS["strategy"] = 0
    start = time.perf_counter()
    _strategy_property(LONG_EXAMPLES)()
    seconds = time.perf_counter() - start
    cases = _COUNTS["strategy"]
    assert cases >= LONG_EXAMPLES
    with capsys.disabled():
        print(f"\n[fuzz] strategy validation: {cases} cases in {seconds:.1f} s, 0 failures")
