"""The safe-range rule of a new global model (strategies.safety.out_of_range), checked block by block."""

from __future__ import annotations

import pytest
import torch

from strategies.safety import MAX_POSITIONS, RANGE_BLOCK, out_of_range


def _reference(new: torch.Tensor, old: torch.Tensor, limit: float) -> torch.Tensor:
    """Every bad flat position, computed on the whole tensor at once."""
    n64, o64 = new.to(torch.float64).reshape(-1), old.to(torch.float64).reshape(-1)
    return (~torch.isfinite(n64) | ((n64.abs() > limit) & (n64.abs() > o64.abs()))).nonzero().reshape(-1)


def test_a_tensor_within_range_passes() -> None:
    g = torch.Generator().manual_seed(0)
    old = torch.randn(3 * RANGE_BLOCK + 7, generator=g)
    assert out_of_range("w", old * 2, old) is None


@pytest.mark.parametrize("where", [[0], [RANGE_BLOCK - 1, RANGE_BLOCK], [5, 2 * RANGE_BLOCK + 3, 3 * RANGE_BLOCK + 6]])
def test_bad_entries_in_any_block_are_found_with_their_direction(where: list[int]) -> None:
    old = torch.zeros(3 * RANGE_BLOCK + 7)
    new = old.clone()
    values = [float("nan"), float("inf"), -1e30][: len(where)]
    for pos, value in zip(where, values, strict=True):
        new[pos] = value
    found = out_of_range("w", new, old)
    assert found is not None
    assert found.positions.tolist() == where
    signs = {0: 0.0, 1: 1.0, 2: -1.0}
    assert found.signs.tolist() == [signs[i] for i in range(len(where))]


def test_the_first_positions_in_order_are_named_across_blocks() -> None:
    old = torch.zeros(2 * RANGE_BLOCK + 100)
    new = old.clone()
    bad = torch.cat([torch.arange(RANGE_BLOCK - 40, RANGE_BLOCK), torch.arange(2 * RANGE_BLOCK, 2 * RANGE_BLOCK + 90)])
    new[bad] = 1e30  # above float32's limit (2**62) and above the old value
    new[RANGE_BLOCK + 5] = 2e30  # the largest, inside the first 64
    found = out_of_range("w", new, old)
    assert found is not None
    want = _reference(new, old, 2.0**62)[:MAX_POSITIONS]
    assert torch.equal(found.positions, want)
    assert found.largest == pytest.approx(2e30)


def test_a_large_value_that_was_already_there_may_stay() -> None:
    old = torch.full((10,), 1e30)
    assert out_of_range("w", old * 0.5, old) is None
    assert out_of_range("w", old * 2, old) is not None
