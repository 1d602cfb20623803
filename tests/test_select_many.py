"""The batched paths for matrices of one shape: ``select_many`` and ``SparseLowRank.encode_matrices``.

Both must give exactly what their one-matrix references give
(``select`` on each pair, ``encode_matrix`` on each matrix); the tests
also check that the batched code, not the fallback, produced the result.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from osd_fl import selection
from osd_fl.compressor import CompressorState, MatrixItem, get_compressor
from osd_fl.config import CompressionConfig
from osd_fl.methods import sparse_lowrank
from osd_fl.selection import affordable_prefix, select, select_many
from osd_fl.sizes import matrix_budget, selection_bytes


def _pairs(seed: int, count: int, slots_a: int, slots_b: int, levels: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Score pairs; ``levels > 0`` draws from that many values (ties), with a NaN, an inf, zeros and -0.0."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        a, b = torch.rand(slots_a, generator=gen), torch.rand(slots_b, generator=gen)
        if levels:
            a, b = (torch.floor(t * levels) / levels for t in (a, b))
            a[0], b[-1] = float("nan"), float("inf")
            a[1 : slots_a // 2 : 2] = -0.0  # equal to 0.0: ties by position, as select breaks them
        out.append((a, b))
    return out


def _near_full(slots_a: int, slots_b: int, value_bytes: int, budget: int) -> bool:
    """Whether ``select`` takes its near-full path (the one ``select_many`` batches) for this budget."""
    total = slots_a + slots_b
    everything = (
        total <= budget // value_bytes
        and selection_bytes([slots_a, slots_b], [slots_a, slots_b], value_bytes) <= budget
    )
    return affordable_prefix([slots_a, slots_b], value_bytes, budget) > 0 and not everything


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    count=st.integers(1, 6),
    slots_a=st.integers(1, 700),
    slots_b=st.integers(1, 700),
    value_bytes=st.sampled_from([1, 2, 4]),
    share=st.floats(0.0, 1.3),
    levels=st.sampled_from([0, 0, 3, 50]),
)
def test_select_many_equals_select_on_each_pair(
    seed: int, count: int, slots_a: int, slots_b: int, value_bytes: int, share: float, levels: int
) -> None:
    pairs = _pairs(seed, count, slots_a, slots_b, levels)
    budget = int(share * (slots_a + slots_b) * value_bytes)
    want = [select([a, b], value_bytes, budget) for a, b in pairs]
    got = select_many(pairs, value_bytes, budget)
    assert len(got) == count
    for (wa, wb), (ga, gb) in zip(want, got, strict=True):
        assert ga.dtype == np.int64 and gb.dtype == np.int64
        assert np.array_equal(wa, ga) and np.array_equal(wb, gb)


@pytest.mark.parametrize(("slots_a", "slots_b", "value_bytes", "share"), [(1536, 1536, 1, 0.8), (400, 90, 4, 0.5)])
@pytest.mark.parametrize("levels", [0, 4])
def test_select_many_batches_without_calling_select(
    monkeypatch: pytest.MonkeyPatch, slots_a: int, slots_b: int, value_bytes: int, share: float, levels: int
) -> None:
    pairs = _pairs(7, 5, slots_a, slots_b, levels)
    budget = int(share * (slots_a + slots_b) * value_bytes)
    assert _near_full(slots_a, slots_b, value_bytes, budget)
    want = [select([a, b], value_bytes, budget) for a, b in pairs]

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("select_many fell back to select on a batch it should rank itself")

    monkeypatch.setattr(selection, "select", refuse)
    got = select_many(pairs, value_bytes, budget)
    for (wa, wb), (ga, gb) in zip(want, got, strict=True):
        assert np.array_equal(wa, ga) and np.array_equal(wb, gb)
    assert all(selection_bytes([a.size, b.size], [slots_a, slots_b], value_bytes) <= budget for a, b in got)


def test_select_many_falls_back_for_mixed_shapes_and_empty_input() -> None:
    pairs = _pairs(1, 2, 30, 20, 0) + _pairs(2, 1, 20, 30, 0)
    got = select_many(pairs, 4, 150)
    for (a, b), (ga, gb) in zip(pairs, got, strict=True):
        wa, wb = select([a, b], 4, 150)
        assert np.array_equal(wa, ga) and np.array_equal(wb, gb)
    assert select_many([], 4, 100) == []


def _items(seed: int) -> list[MatrixItem]:
    """Equal 48 x 40 matrices (low rank plus noise, one zero), two of another shape, three with a map."""
    gen = torch.Generator().manual_seed(seed)
    mats = [
        torch.randn(48, 3, generator=gen) @ torch.randn(3, 40, generator=gen) + 0.3 * torch.randn(48, 40, generator=gen)
        for _ in range(6)
    ]
    mats[2] = torch.zeros(48, 40)
    mats += [torch.randn(40, 48, generator=gen) for _ in range(2)]
    items = [MatrixItem(f"m{i}", tuple(m.shape), "float32", m) for i, m in enumerate(mats)]
    for j in range(3):
        z = torch.rand(48, 40, generator=gen)
        items.append(MatrixItem(f"z{j}", (48, 40), "float32", mats[j].clone(), z))
    return items


def _same_record(x: Any, y: Any) -> bool:
    if (x.name, x.kind, x.rank, len(x.sections)) != (y.name, y.kind, y.rank, len(y.sections)):
        return False
    for sx, sy in zip(x.sections, y.sections, strict=True):
        px = None if sx.positions is None else sx.positions.tolist()
        py = None if sy.positions is None else sy.positions.tolist()
        if sx.slots != sy.slots or px != py or not np.array_equal(sx.values, sy.values):
            return False
    return True


@pytest.mark.parametrize(
    "options",
    [
        {"method": "osd", "rank": 1},  # the default: int8 values, adaptive c, one sparse contender
        {"method": "osd", "rank": 1, "value_dtype": "float32"},  # three sparse contenders and a dense one
        {"method": "osd", "rank": 2, "value_dtype": "float32", "relax": 2},
        {"method": "osd", "rank": 1, "adaptive": False},
        {"method": "osd", "rank": 1, "second_pass": True},
        {"method": "magtruncsvd", "rank": 2},
    ],
)
def test_encode_matrices_gives_encode_matrix_records(options: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    comp = get_compressor(CompressionConfig(**options))
    items = _items(3)
    cfg = comp.config
    budgets = [matrix_budget(it.n, it.d, cfg.rank, cfg.budget_value_dtype) for it in items]
    want = [comp.encode_matrix(it, b, CompressorState()) for it, b in zip(items, budgets, strict=True)]
    seen: list[int] = []
    real = selection.select_many

    def spy(pairs: Any, value_bytes: int, budget: int) -> Any:
        seen.append(len(pairs))
        return real(pairs, value_bytes, budget)

    monkeypatch.setattr(sparse_lowrank, "select_many", spy)
    got = comp.encode_matrices(items, budgets, CompressorState())
    assert [r.name for r in got] == [it.name for it in items]
    assert all(_same_record(w, g) for w, g in zip(want, got, strict=True))
    assert max(seen) == 6  # the six equal matrices without a map were selected as one batch
    # the three with a map as another (with a second pass they are selected one by one, B after A)
    assert (3 in seen) == (not cfg.second_pass)


def test_batched_candidate_errors_equal_one_by_one() -> None:
    gen = torch.Generator().manual_seed(5)
    mats = [torch.randn(30, 20, generator=gen) for _ in range(4)]
    cands = [[(torch.randn(30, k, generator=gen), torch.randn(k, 20, generator=gen)) for k in (1, 3)] for _ in mats]
    batched = sparse_lowrank.unweighted_errors(mats, cands)
    for m, c, errs in zip(mats, cands, batched, strict=True):
        direct = [float(((m.double() - a.double() @ b.double()) ** 2).sum()) for a, b in c]
        assert errs == pytest.approx(direct, rel=1e-5)
        assert errs == sparse_lowrank.candidate_errors(m, None, c)
