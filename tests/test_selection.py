"""The joint entry selection (``osd_fl.selection.select``): exact budget, best scores first, both code paths."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from osd_fl.selection import select
from osd_fl.sizes import selection_bytes


def _cases(test: Callable[..., None]) -> Callable[..., None]:
    """Two sections of 1-600 slots, any value width, a budget of 1% to 120% of every entry's value bytes."""
    return settings(max_examples=60, deadline=None)(
        given(
            seed=st.integers(0, 10_000),
            slots_a=st.integers(1, 600),
            slots_b=st.integers(1, 600),
            value_bytes=st.sampled_from([1, 2, 4]),
            share=st.floats(0.01, 1.2),
        )(test)
    )


def _scores(seed: int, sizes: list[int]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # distinct scores (continuous draws): the order has no ties, so "best first" is one set
    return [torch.rand(m, generator=gen) for m in sizes]


@_cases
def test_two_sections_fit_the_budget_and_keep_the_best_prefix(
    seed: int, slots_a: int, slots_b: int, value_bytes: int, share: float
) -> None:
    scores = _scores(seed, [slots_a, slots_b])
    budget = int(share * (slots_a + slots_b) * value_bytes)
    pos_a, pos_b = select(scores, value_bytes, budget)
    assert selection_bytes([pos_a.size, pos_b.size], [slots_a, slots_b], value_bytes) <= budget
    for pos, m in ((pos_a, slots_a), (pos_b, slots_b)):
        assert np.all(np.diff(pos) > 0) and (pos.size == 0 or (pos[0] >= 0 and pos[-1] < m))
    # the kept entries contain the longest best-first prefix that fits (the greedy pass only adds)
    flat = torch.cat(scores)
    order = torch.argsort(flat, descending=True).numpy()
    kept = set(pos_a.tolist()) | {slots_a + p for p in pos_b.tolist()}
    t = 0
    while t < order.size:
        in_a = int(np.sum(order[: t + 1] < slots_a))
        if selection_bytes([in_a, t + 1 - in_a], [slots_a, slots_b], value_bytes) > budget:
            break
        t += 1
    assert set(order[:t].tolist()) <= kept


@_cases
def test_the_two_section_path_equals_the_general_one(
    seed: int, slots_a: int, slots_b: int, value_bytes: int, share: float
) -> None:
    # an empty third section changes no cost (ALL of 0 slots is 0 bytes) but takes the general path
    scores = _scores(seed, [slots_a, slots_b])
    budget = int(share * (slots_a + slots_b) * value_bytes)
    two = select(scores, value_bytes, budget)
    three = select([*scores, torch.zeros(0)], value_bytes, budget)
    assert three[2].size == 0
    for x, y in zip(two, three[:2], strict=True):
        assert x.dtype == y.dtype == np.int64
        np.testing.assert_array_equal(x, y)


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    sizes=st.lists(st.integers(1, 1500), min_size=1, max_size=3),
    value_bytes=st.sampled_from([1, 2, 4]),
    share=st.floats(0.01, 1.2),
    levels=st.sampled_from([2, 5, 16]),
)
def test_ties_are_broken_by_position(seed: int, sizes: list[int], value_bytes: int, share: float, levels: int) -> None:
    # scores on a few levels (many ties) select exactly what the same scores do once every tie is
    # broken by a position-decreasing nudge smaller than the gap between levels (exact in float32)
    gen = torch.Generator().manual_seed(seed)
    tied = [torch.randint(0, levels, (m,), generator=gen).to(torch.float32) / 16 for m in sizes]
    flat_pos = torch.arange(sum(sizes), dtype=torch.float32)
    nudged_flat = torch.cat(tied) + (sum(sizes) - flat_pos) * 2.0**-20
    nudged = list(torch.split(nudged_flat, sizes))
    assert len(set(nudged_flat.tolist())) == sum(sizes)  # the nudge leaves no tie
    budget = int(share * sum(sizes) * value_bytes)
    for x, y in zip(select(tied, value_bytes, budget), select(nudged, value_bytes, budget), strict=True):
        np.testing.assert_array_equal(x, y)


def test_order_is_a_stable_descending_argsort() -> None:
    """Both ways of ordering (the argsort below KEY_SORT_FROM slots, the key sort from it) give the same order."""
    from osd_fl.selection import KEY_SORT_FROM, _order, key_order

    gen = np.random.default_rng(3)
    for normal in (500, KEY_SORT_FROM + 100):
        vals = np.concatenate(
            [
                gen.standard_normal(normal),
                np.zeros(50),
                -np.zeros(20),
                np.full(30, 2.5),
                [np.inf, -np.inf, 1e-45, -1e-45],
            ]
        ).astype(np.float32)
        gen.shuffle(vals)
        expected = np.argsort(-vals, kind="stable")
        np.testing.assert_array_equal(key_order(vals), expected)
        np.testing.assert_array_equal(_order(vals), expected)


def test_rank_prefix_is_the_stable_order_past_its_head() -> None:
    from osd_fl.selection import rank_prefix

    gen = np.random.default_rng(5)
    for total, count, known in [
        (3072, 2883, 2499),
        (3072, 750, 654),
        (100, 100, 1),
        (50, 10, 10),
        (20000, 15000, 9000),
    ]:
        flat = np.round(gen.random(total) * 40).astype(np.float32)  # many ties
        order = np.argsort(-flat, kind="stable")
        head, tail = rank_prefix(flat, count, known)
        assert head.size < known and np.all(np.diff(head) > 0)
        np.testing.assert_array_equal(np.sort(order[: head.size]), head)
        np.testing.assert_array_equal(order[head.size : count], tail)
