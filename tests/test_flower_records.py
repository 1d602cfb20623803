"""osd_fl.records: payload and config records, tensor helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto

from osd_fl import CompressionConfig, ConfigError, PayloadError, compress, decompress
from osd_fl.records import (
    CONFIG_PREFIX,
    PAYLOAD_ARRAY_KEY,
    PAYLOAD_RECORD_KEY,
    PAYLOAD_STYPE,
    config_from_record,
    config_to_record,
    has_config,
    payload_to_record,
    record_specs,
    record_to_payload,
    record_to_tensors,
    tensors_to_record,
    unknown_config_keys,
)
from strategies.local_grid import train_message

# test code here draws from torch's global generator: seeded per test and restored afterwards
pytestmark = pytest.mark.usefixtures("global_rng")


def _blob() -> bytes:
    torch.manual_seed(0)
    update = {"fc.weight": torch.randn(64, 80), "fc.bias": torch.randn(64)}
    return compress(update, method="osd", rank=2, min_numel=16)


def test_payload_roundtrip_through_flower_serialization() -> None:
    blob = _blob()
    record = payload_to_record(blob)
    msg = train_message(RecordDict({PAYLOAD_RECORD_KEY: record}), dst_node_id=7)
    wire = message_to_proto(msg)
    back = message_from_proto(wire)
    got = record_to_payload(back.content.array_records[PAYLOAD_RECORD_KEY])
    assert got == blob
    assert decompress(got)["fc.weight"].shape == (64, 80)


def test_payload_framing_overhead_is_small() -> None:
    """One flat array: the whole reply costs the payload plus a few hundred bytes."""
    blob = _blob()
    content = RecordDict({PAYLOAD_RECORD_KEY: payload_to_record(blob), "metrics": MetricRecord({"num-examples": 10})})
    size = message_to_proto(train_message(content, dst_node_id=7)).ByteSize()
    assert len(blob) < size < len(blob) + 400
    # The raw stype carries no .npy header: the Array's data is exactly the payload.
    assert content.array_records[PAYLOAD_RECORD_KEY][PAYLOAD_ARRAY_KEY].data == blob


@pytest.mark.parametrize(
    ("record", "field"),
    [
        (ConfigRecord({"a": 1}), "expected an ArrayRecord"),
        ("not a record", "expected an ArrayRecord"),
        (ArrayRecord(), "exactly one array"),
        (ArrayRecord({"other": Array(np.zeros(3, np.uint8))}), "exactly one array"),
        (
            ArrayRecord({PAYLOAD_ARRAY_KEY: Array(np.zeros(3, np.uint8)), "x": Array(np.zeros(1, np.uint8))}),
            "exactly one array",
        ),
        (ArrayRecord({PAYLOAD_ARRAY_KEY: Array(np.zeros(3, np.uint8))}), "stype"),
        (
            ArrayRecord({PAYLOAD_ARRAY_KEY: Array(dtype="float32", shape=(3,), stype=PAYLOAD_STYPE, data=b"abc")}),
            "dtype",
        ),
        (
            ArrayRecord({PAYLOAD_ARRAY_KEY: Array(dtype="uint8", shape=(4,), stype=PAYLOAD_STYPE, data=b"abc")}),
            "shape",
        ),
        (
            ArrayRecord({PAYLOAD_ARRAY_KEY: Array(dtype="uint8", shape=(3, 1), stype=PAYLOAD_STYPE, data=b"abc")}),
            "shape",
        ),
    ],
)
def test_record_to_payload_rejects_bad_framing(record: object, field: str) -> None:
    with pytest.raises(PayloadError, match=field):
        record_to_payload(record)


def test_record_to_payload_enforces_the_size_limit() -> None:
    record = payload_to_record(b"x" * 100)
    assert record_to_payload(record, max_bytes=100) == b"x" * 100
    with pytest.raises(PayloadError, match="exceed the limit of 99 bytes"):
        record_to_payload(record, max_bytes=99)


def test_config_roundtrip_and_prefix() -> None:
    cfg = CompressionConfig(method="truncsvd", rank=3, value_dtype="float16", error_feedback=True)
    record = config_to_record(cfg)
    assert all(k.startswith(CONFIG_PREFIX) for k in record)
    assert record["osd.rank"] == 3
    assert has_config(record)
    assert not has_config({"lr": 0.1})
    assert config_from_record(record) == cfg


def test_config_from_record_uses_defaults_for_missing_fields_and_ignores_other_keys() -> None:
    defaults = CompressionConfig(rank=4, importance="ones")
    got = config_from_record({"osd.method": "topk", "osd.value-dtype": "float16", "lr": 0.5}, defaults=defaults)
    assert got == defaults.replace(method="topk", value_dtype="float16")
    assert config_from_record({"lr": 0.5}, defaults=defaults) is defaults


def test_config_from_record_unknown_and_invalid_keys() -> None:
    values = {"osd.rank": "2", "osd.future-knob": 1}
    assert unknown_config_keys(values) == ["osd.future-knob"]
    assert config_from_record(values).rank == 2  # lenient by default: an older client serves a newer server
    with pytest.raises(ConfigError, match="future-knob"):
        config_from_record(values, strict=True)
    with pytest.raises(ConfigError, match="rank"):
        config_from_record({"osd.rank": 0})
    with pytest.raises(ConfigError, match="value_dtype"):
        config_from_record({"osd.value-dtype": "int4"})


def test_tensors_record_roundtrip_and_specs() -> None:
    state = {
        "w": torch.randn(3, 4),
        "h": torch.randn(5, dtype=torch.float16),
        "b": torch.randn(2, dtype=torch.bfloat16),
        "n": torch.tensor(7, dtype=torch.int64),
    }
    record = tensors_to_record(state)
    specs = record_specs(record)
    assert specs == {
        "w": ((3, 4), torch.float32),
        "h": ((5,), torch.float16),
        "b": ((2,), torch.float32),  # bfloat16 travels as float32 (Flower's Array has no bfloat16)
        "n": ((), torch.int64),
    }
    back = record_to_tensors(record)
    assert torch.equal(back["w"], state["w"])
    assert torch.equal(back["b"], state["b"].float())
    back["w"].add_(1)  # writable, and a copy
    assert not torch.equal(record_to_tensors(record)["w"], back["w"])
