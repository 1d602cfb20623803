"""The per-reply value bound: ``osd_fl.exceeds`` and the decoder's bound that lets the server skip it.

``strategies.replies.decode_payload`` skips ``exceeds`` for DENSE, SPARSE
and QUANT8 records where the model dtype's limit is at least
``MAX_DECODED_VALUE``; these tests pin both halves of that argument: no
decodable value of those kinds is larger, and ``exceeds`` on LOWRANK records
(cheap bound first, exact product only when the bound is not enough) answers
exactly as the rebuilt product does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from osd_fl import CompressionConfig, Kind, Payload, PayloadError, compress, decode, encode, exceeds, value_limit
from osd_fl.checks import record_max_abs
from osd_fl.codec import MAX_DECODED_VALUE, VALUE_LIMIT
from osd_fl.payload import Section, TensorRecord
from osd_fl.records import record_to_tensors, tensors_to_record
from strategies import OSDStrategy
from strategies.local_grid import LocalGrid
from tests.test_faults_strategy import payload_reply


def test_the_skip_holds_for_wide_dtypes_and_not_for_float16() -> None:
    for dtype in ("float32", "bfloat16", "float64"):
        assert value_limit(dtype) >= MAX_DECODED_VALUE
    assert value_limit("float16") < MAX_DECODED_VALUE  # float16 models are still checked value by value


def _extreme_records() -> list[tuple[str, TensorRecord]]:
    """Records whose values sit at the decoder's bound, of every kind the skip covers."""
    top = np.float32(VALUE_LIMIT)
    edge = np.array([top, -top, 1.0, 0.0], dtype=np.float32)
    return [
        ("float32", TensorRecord("d", (4,), "float32", Kind.DENSE, [Section(4, edge)])),
        ("int8", TensorRecord("d", (4,), "float32", Kind.DENSE, [Section(4, edge)])),
        ("float32", TensorRecord("s", (9,), "float32", Kind.SPARSE, [Section(9, edge, np.array([0, 2, 5, 8]))])),
        (
            "float32",
            TensorRecord(
                "q",
                (4,),
                "float32",
                Kind.QUANT8,
                block=2,
                scales=np.array([VALUE_LIMIT, VALUE_LIMIT], dtype=np.float32),
                qvalues=np.array([127, -127, 127, 1], dtype=np.int8),
            ),
        ),
    ]


@pytest.mark.parametrize("index", range(4))
def test_no_decoded_dense_sparse_or_quant8_value_exceeds_max_decoded_value(index: int) -> None:
    value_dtype, rec = _extreme_records()[index]
    blob = encode(Payload(method="dense", value_dtype=value_dtype, records=[rec]))
    try:
        (got,) = decode(blob).records
    except PayloadError:  # refusing a value at the bound is also safe
        return
    largest = record_max_abs(got)
    assert largest >= VALUE_LIMIT * 0.99  # the case does reach the bound
    assert largest <= MAX_DECODED_VALUE


def _lowrank(seed: int, n: int = 7, d: int = 5, k: int = 3, keep: float = 0.6) -> TensorRecord:
    rng = np.random.default_rng(seed)
    sections = []
    for slots in (n * k, k * d):
        pos = np.flatnonzero(rng.random(slots) < keep).astype(np.int64)
        values = rng.standard_normal(pos.size).astype(np.float32)
        sections.append(Section(slots, values, pos))
    return TensorRecord("w", (n, d), "float32", Kind.LOWRANK, sections, rank=k)


@pytest.mark.parametrize("seed", range(8))
def test_exceeds_on_lowrank_answers_as_the_rebuilt_product(seed: int) -> None:
    rec = _lowrank(seed)
    a = rec.sections[0].dense().astype(np.float64).reshape(7, 3)
    b = rec.sections[1].dense().astype(np.float64).reshape(3, 5)
    largest = float(np.abs(a @ b).max())
    bound = float(np.abs(a).sum(axis=1).max() * np.abs(b).max())
    assert exceeds(rec, largest * 1.001) is None
    assert exceeds(rec, largest * 0.999) == pytest.approx(largest, rel=1e-12)
    if bound > largest * 1.01:  # a limit the cheap bound cannot settle: the product decides
        assert exceeds(rec, (largest + bound) / 2) is None


def test_exceeds_on_a_lowrank_record_with_an_empty_factor_is_none() -> None:
    rec = _lowrank(0)
    rec.sections[1] = Section(15, np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64))
    assert exceeds(rec, 0.0) is None


def test_a_float16_model_still_rejects_a_dense_value_beyond_its_limit() -> None:
    """The skip must not reach float16 models: 100 > 64, float16's safe magnitude, is refused, the other kept."""
    cfg = CompressionConfig(method="dense")
    model = {"w": torch.zeros(4, 4, dtype=torch.float16)}
    strategy = OSDStrategy(FedAvg(min_available_nodes=2, min_train_nodes=2), config=cfg)
    msgs = list(strategy.configure_train(1, tensors_to_record(model), ConfigRecord(), LocalGrid(ClientApp(), 2)))
    bad = torch.zeros(4, 4, dtype=torch.float16)
    bad[1, 2] = 100.0
    fine = torch.full((4, 4), 60.0, dtype=torch.float16)
    replies = [
        payload_reply(msgs[0], compress({"w": bad}, config=cfg)),
        payload_reply(msgs[1], compress({"w": fine}, config=cfg)),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert torch.equal(record_to_tensors(arrays)["w"], fine)
    (rejection,) = strategy.rejections
    assert "exceeds 63.98" in rejection.reason and "float16" in rejection.reason
