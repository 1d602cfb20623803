"""osd_fl.sizes is the one home of every byte size, and its sizes are what the codec writes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from osd_fl import REGISTRY, compress, payload_budget, payload_limit, record_bytes
from osd_fl.codec import decode, encode
from osd_fl.payload import Kind, Payload, Section, TensorRecord
from osd_fl.sizes import (
    CRC,
    header_bytes,
    record_body_bytes,
    record_header_bytes,
    section_bytes,
    total_dense_bytes,
    unbudgeted_limit,
    value_bytes,
)

ROOT = Path(__file__).resolve().parent.parent
#: The two modules allowed to spell out a byte size.
HOMES = {"osd_fl/sizes.py", "osd_fl/dtypes.py"}
#: Size literals that belong in osd_fl/sizes.py (or the dtype tables), never next to the code that uses them.
SIZE_LITERALS = [
    (re.compile(r"\b[24]\s+if\b[^\n]*float(16|32)"), "a value size picked by dtype name"),
    (re.compile(r"(numel\(\)|numel|prod\([^)]*\))\s*\*\s*[248]\b"), "elements times a literal item size"),
    (re.compile(r"\b[248]\s*\*\s*[\w.]*(numel|prod\()"), "a literal item size times elements"),
    (re.compile(r"struct\.calcsize"), "a field size computed outside the layout"),
    (
        re.compile(r"\bLOWRANK_OVERHEAD\b|\bSPARSE_OVERHEAD\b|\bSECTION_HEADER\b"),
        "a record overhead subtracted by hand",
    ),
]


def _source_files() -> list[Path]:
    return [p for pkg in ("osd_fl", "clients", "strategies") for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_scan_finds_the_old_literals() -> None:
    """The scan catches what the code used to hold (guards the patterns themselves)."""
    old = [
        'size = 2 if value_dtype == "float16" else 4',
        "metrics[X] = sum(t.numel() * 4 for t in update.values())",
        "return sum(math.prod(s) * 4 for s in shapes.values())",
        "self.take(struct.calcsize(fmt), field)",
        "budget - LOWRANK_OVERHEAD",
    ]
    for line in old:
        assert any(p.search(line) for p, _ in SIZE_LITERALS), line


def test_no_size_literal_outside_sizes() -> None:
    found = []
    for path in _source_files():
        rel = str(path.relative_to(ROOT))
        if rel in HOMES:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for pattern, why in SIZE_LITERALS:
                if pattern.search(line):
                    found.append(f"{rel}:{number}: {why}: {line.strip()}")
    assert not found, "byte sizes outside osd_fl/sizes.py:\n" + "\n".join(found)


def _records() -> list[TensorRecord]:
    g = np.random.default_rng(0)
    vals = g.standard_normal(40).astype(np.float32)
    return [
        TensorRecord("zero", (3, 4), "float32", Kind.ZERO),
        TensorRecord("dense.ü", (5,), "bfloat16", Kind.DENSE, [Section(5, vals[:5])]),
        TensorRecord(
            "lr",
            (6, 7),
            "float16",
            Kind.LOWRANK,
            [Section(12, vals[:12]), Section(14, vals[:3], np.array([0, 5, 13], dtype=np.int64))],
            rank=2,
        ),
        TensorRecord("sp", (4, 2, 5), "float64", Kind.SPARSE, [Section(40, vals[:7], np.arange(0, 35, 5))]),
        TensorRecord(
            "q8",
            (10,),
            "float32",
            Kind.QUANT8,
            block=4,
            scales=np.ones(3, dtype=np.float32),
            qvalues=np.arange(10, dtype=np.int8),
        ),
    ]


@pytest.mark.parametrize("value_dtype", ["float32", "float16", "int8"])
def test_record_bytes_equal_what_the_codec_writes(value_dtype: str) -> None:
    records = _records()
    empty = encode(Payload("m", value_dtype, []))
    assert len(empty) == header_bytes("m")
    for rec in records:
        one = encode(Payload("m", value_dtype, [rec]))
        assert len(one) - len(empty) == record_bytes(rec, value_dtype)
        assert record_bytes(rec, value_dtype) == record_header_bytes(rec.name, len(rec.shape)) + record_body_bytes(
            rec, value_dtype
        )
    whole = encode(Payload("method", value_dtype, records))
    assert len(whole) == header_bytes("method") + sum(record_bytes(r, value_dtype) for r in records)
    assert decode(whole).records[2].sections[1].count == 3


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_record_bytes_of_real_payloads(method: str) -> None:
    g = torch.Generator().manual_seed(1)
    update = {"w": torch.randn(64, 48, generator=g), "b": torch.randn(48, generator=g)}
    for value_dtype in ("float32", "float16", "int8"):
        blob = compress(update, method=method, rank=2, min_numel=0, value_dtype=value_dtype)
        payload = decode(blob)
        total = header_bytes(payload.method) + sum(record_bytes(r, payload.value_dtype) for r in payload.records)
        assert total == len(blob)
        if REGISTRY[method].budgeted:
            shapes = {"w": (64, 48), "b": (48,)}
            assert len(blob) <= payload_budget(shapes, method=method, rank=2, min_numel=0, value_dtype=value_dtype)


def test_section_and_value_sizes() -> None:
    assert value_bytes("float32") == 4 and value_bytes("float16") == 2 and value_bytes("int8") == 1
    full = Section(10, np.zeros(10, dtype=np.float32))
    assert section_bytes(full, "float16") == 6 + 20
    assert section_bytes(full, "int8") == 6 + 4 + 10  # one block: one float32 scale, ten int8 values
    assert section_bytes(Section(65, np.zeros(65, dtype=np.float32)), "int8") == 6 + 2 * 4 + 65
    assert CRC.size == 4
    shapes = {"a": (3, 4), "b": (5,)}
    assert total_dense_bytes(shapes) == 68 and total_dense_bytes(shapes, 2) == 34
    assert unbudgeted_limit(shapes) == payload_limit(shapes, method="dense") == 2 * 68 + 64 * 1024
