"""Joint selection of factor entries under an exact byte budget.

All sparse methods (OSD, MagTruncSVD, top-k; per matrix or globally) reduce
to one problem: given scores for the slots of several sections, keep the
highest-scoring entries such that the encoded sections fit ``budget`` bytes.
The cost of a section is exact (:func:`osd_fl.sizes.selection_bytes`), and
it grows with the number of kept entries, so the longest score-ordered
prefix that fits is found by bisection; a bounded greedy pass then keeps
scanning past the first entry that did not fit, since entries of another
section can still be cheaper.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from osd_fl.positions import best_coding
from osd_fl.sizes import selection_bytes

__all__ = ["BATCH_SLOTS", "affordable_prefix", "key_order", "rank_prefix", "select", "select_many"]

#: Entries scanned past the prefix by the greedy fill.
GREEDY_SCAN = 1024


def _greedy_fill(
    fid: npt.NDArray[np.integer[Any]],
    start: int,
    end: int,
    counts: list[int],
    slots: Sequence[int],
    value_bytes: int,
    room: int,
) -> list[int]:
    """Scan ranks ``start..end-1`` in order and keep each entry whose extra bytes still fit ``room``.

    The extra cost of the next entry of section ``f`` depends only on
    ``counts[f]``, which changes only when an entry is kept. So instead of
    testing every rank, jump straight to the next rank whose section can
    still afford one entry; stop when none can. Keeps exactly the entries a
    rank-by-rank scan keeps. ``counts`` is updated in place.
    """
    keep: list[int] = []
    if start >= end:
        return keep
    nf = len(counts)
    pos_now = [best_coding(counts[f], slots[f])[2] for f in range(nf)]

    def extra_of(f: int) -> int:
        return best_coding(counts[f] + 1, slots[f])[2] - pos_now[f] + value_bytes

    extra = [extra_of(f) for f in range(nf)]
    scan = fid[start:end]
    j = start
    while j < end:
        fits = [f for f in range(nf) if extra[f] <= room]
        if not fits:
            break
        if len(fits) < nf:
            hits = np.flatnonzero(np.isin(scan[j - start :], fits))
            if hits.size == 0:
                break
            j += int(hits[0])
        f = int(fid[j])
        counts[f] += 1
        room -= extra[f]
        pos_now[f] += extra[f] - value_bytes
        extra[f] = extra_of(f)
        keep.append(j)
        j += 1
    return keep


def affordable_prefix(slots: Sequence[int], value_bytes: int, budget: int) -> int:
    """How many best-first entries fit ``budget`` whatever sections they fall in (at most ``budget // value_bytes``).

    No position coding costs more than a bitmask, so ``(budget - sum of the
    sections' bitmask bytes) / value_bytes`` entries always fit; clipped to
    ``[0, min(sum(slots), budget // value_bytes)]``.
    """
    max_count = min(sum(slots), budget // value_bytes)
    return min(max_count, max(0, (budget - sum((m + 7) // 8 for m in slots)) // value_bytes))


def rank_prefix(
    flat: npt.NDArray[np.float32], count: int, known: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The ``count`` best slots of ``flat`` in the order ``(-score, position)``, sorted only past ``known``.

    One order statistic (``np.partition``) splits off the slots above rank
    ``known``, so only the slots below it are sorted; where most slots lie
    below the ``count``-th score too, a second one leaves those out of the
    sort. :func:`select` calls it with the prefix every coding affords.

    Parameters
    ----------
    flat
        Finite scores, one per slot.
    count
        How many of the best slots to return, ``known <= count <= flat.size``.
    known
        A rank, ``1 <= known``, whose prefix the caller needs only as a set.

    Returns
    -------
    head, tail : numpy.ndarray
        ``head``: the best ``len(head) < known`` slots, in position order
        (every prefix of ``known`` or more ranks contains them); ``tail``:
        the slots of ranks ``len(head) .. count - 1``, in rank order.

    """
    total = flat.size
    if total - count > count - known:  # many slots below the kept ones: a second order statistic bounds them
        part = np.partition(flat, (total - count, total - known))
        low, high = part[total - count], part[total - known]
        above = flat > high
        rest = np.flatnonzero(~above & (flat >= low))
    else:
        high = np.partition(flat, total - known)[total - known]  # the known-th best score
        above = flat > high
        rest = np.flatnonzero(~above)
    head = np.flatnonzero(above)
    tail = rest[_order(flat[rest])][: count - head.size]
    return head, tail


#: Below this many slots :func:`_order` takes a stable argsort, from it :func:`key_order`: the faster of
#: the two on either side (``python -m simulations.bench.ranking``, docs/performance.md section 1b).
KEY_SORT_FROM = 2048


def _order(vals: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    """``argsort(-vals, kind="stable")`` (best first, ties by index), by whichever is faster at this size.

    Below :data:`KEY_SORT_FROM` slots the two calls of the argsort cost less
    than the dozen of :func:`key_order`; above it the one vectorised sort of
    :func:`key_order` wins. Both give the same order.
    """
    if vals.size < KEY_SORT_FROM:
        return np.argsort(-vals, kind="stable")
    return key_order(vals)


def key_order(vals: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    """``argsort(-vals, kind="stable")`` (best first, ties by index), as one sort of 64-bit keys.

    The float32 bits, mapped to unsigned integers in the same order and
    inverted, are the high half of each key and the index its low half
    (NaN is not expected: :func:`select` cleans the scores first): a
    plain ``np.sort`` of the keys (vectorised) then orders by score and
    breaks ties by index, in about half the time of a stable argsort on
    long arrays.

    Parameters
    ----------
    vals
        Finite scores.

    Returns
    -------
    numpy.ndarray
        The indices of ``vals``, best first.
    """
    keys = (_descending_bits(vals).astype(np.uint64) << np.uint64(32)) | np.arange(np.size(vals), dtype=np.uint64)
    return (np.sort(keys) & np.uint64(0xFFFFFFFF)).astype(np.int64)


def _descending_bits(vals: npt.NDArray[np.float32]) -> npt.NDArray[np.uint32]:
    """Unsigned integers whose ascending order is the scores' descending order (-0.0 equal to 0.0)."""
    u = (np.asarray(vals, dtype=np.float32) + np.float32(0.0)).view(np.uint32)  # + 0.0 makes -0.0 equal to 0.0
    return ~np.where(u >> 31, ~u, u | np.uint32(0x80000000))  # the IEEE order as unsigned integers, inverted


def _top(flat: torch.Tensor, count: int) -> npt.NDArray[np.int64]:
    """The ``count`` best slots of ``flat`` in the order ``(-score, position)``, by ``torch.topk``.

    ``torch.topk`` orders equal scores arbitrarily. One more score than
    needed tells whether the last kept score is tied with a slot left out;
    only then are the slots holding it taken in position order from a pass
    over ``flat``. Ties among the kept slots re-sort them (by score, then
    position).
    """
    wanted = min(count + 1, flat.numel())
    vals, idx = torch.topk(flat, wanted, sorted=True)
    last = vals[count - 1]
    tied: npt.NDArray[np.int64] | None = None
    above = count
    if wanted > count and bool(vals[count] == last):  # a tie across the boundary
        above = int(torch.count_nonzero(vals[:count] > last))
        tied = torch.nonzero(flat == last).reshape(-1)[: count - above].cpu().numpy()
    head = idx[:above].cpu().numpy()
    if above > 1 and bool((vals[1:above] == vals[: above - 1]).any()):
        head = head[np.lexsort((head, -vals[:above].cpu().numpy()))]
    return head if tied is None else np.concatenate([head, tied])


def select(scores: Sequence[torch.Tensor], value_bytes: int, budget: int) -> list[npt.NDArray[np.int64]]:
    """Pick entries of several sections jointly, best score first, within ``budget`` bytes.

    Parameters
    ----------
    scores
        One flat tensor of non-negative scores per section (its slots).
    value_bytes
        Bytes of one kept value.
    budget
        Bytes available for the positions and values of all sections.

    Returns
    -------
    list of numpy.ndarray
        Sorted kept positions of each section. Ties in score are broken by
        position (deterministic).

    Notes
    -----
    Any prefix of ``known = (budget - sum(bitmask bytes)) / value_bytes``
    entries fits, whatever the sections it falls in (no coding costs more
    than a bitmask), so the bisection starts there and only the ranks past
    it are sorted (:func:`rank_prefix`): with int8 values near-full factors
    are the common case, where a sorted top-k of every kept entry cost
    several times more (docs/performance.md, section 1b).
    """
    slots = [int(s.numel()) for s in scores]
    total = sum(slots)
    if budget <= 0 or total == 0:
        return [np.zeros(0, dtype=np.int64) for _ in scores]
    max_count = min(total, budget // value_bytes)
    if max_count <= 0:
        return [np.zeros(0, dtype=np.int64) for _ in scores]
    if max_count == total and selection_bytes(slots, slots, value_bytes) <= budget:
        # everything fits (coding ALL needs no positions): no scores need ranking
        return [np.arange(m, dtype=np.int64) for m in slots]
    known = affordable_prefix(slots, value_bytes, budget)
    if known > 0:  # near-full sections: partition, sort only past ``known``
        parts = [s.detach().reshape(-1) for s in scores]
        flat = (torch.cat(parts) if len(parts) > 1 else parts[0]).to(device="cpu", dtype=torch.float32).numpy()
        if not np.isfinite(flat).all():  # a cleaned copy: the caller's scores stay as they are
            flat = np.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
        head, tail = rank_prefix(flat, max_count, known)
    else:  # a few entries of many (top-k of a matrix): torch.topk is the faster
        parts = [s.reshape(-1).to(torch.float32) for s in scores]
        # one section needs no concatenated copy: nan_to_num makes its own
        flat_t = torch.nan_to_num(parts[0] if len(parts) == 1 else torch.cat(parts), nan=0.0, posinf=0.0, neginf=0.0)
        head, tail = np.zeros(0, dtype=np.int64), _top(flat_t, max_count)
    nf = len(slots)
    h = head.size
    fid: npt.NDArray[np.integer[Any]]  # section of each ranked slot past the head
    if nf == 2:  # A and B of one matrix (the common case): fewer, cheaper calls than the general path
        slots_a, slots_b = slots
        head_a = int(np.searchsorted(head, slots_a))  # head is sorted: its count in A
        head_counts = np.array([head_a, h - head_a])
        fid = (tail >= slots_a).view(np.uint8)  # 0: A, 1: B
        in_b = np.zeros(tail.size + 1, dtype=np.int64)
        np.cumsum(fid, out=in_b[1:])  # entries of B among the first ranks past the head

        def cost(t: int) -> int:
            ca = head_a + (t - h) - int(in_b[t - h])
            return best_coding(ca, slots_a)[2] + best_coding(t - ca, slots_b)[2] + t * value_bytes

    else:
        offsets = np.cumsum([0, *slots])
        head_counts = np.diff(np.searchsorted(head, offsets))  # head is sorted: its count in each section
        fid = np.searchsorted(offsets, tail, side="right") - 1

        def cost(t: int) -> int:
            counts = head_counts + np.bincount(fid[: t - h], minlength=nf)
            return selection_bytes([int(c) for c in counts], slots, value_bytes)

    lo, hi = max(h, known), max_count  # every prefix up to ``known`` fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    counts = [int(c) for c in head_counts + np.bincount(fid[: lo - h], minlength=nf)]
    spent = selection_bytes(counts, slots, value_bytes)
    scan_end = min(tail.size, lo - h + GREEDY_SCAN)
    extra_keep = _greedy_fill(fid, lo - h, scan_end, counts, slots, value_bytes, budget - spent)
    kept = np.zeros(total, dtype=bool)  # a mask of the flat slots: each section's positions come out sorted
    kept[head] = True
    kept[tail[: lo - h]] = True
    if extra_keep:
        kept[tail[np.asarray(extra_keep, dtype=np.int64)]] = True
    ends = list(itertools.accumulate(slots))
    return [np.flatnonzero(kept[end - m : end]) for end, m in zip(ends, slots, strict=True)]


#: Bits of a slot index in :func:`_rank_rows`'s sort keys.
_SLOT_BITS = 13
#: Most slots (entries of ``A`` and ``B``) per matrix that :func:`select_many` ranks as one batch (a
#: slot index must fit :data:`_SLOT_BITS`); larger matrices have few calls per flop and go one by one.
BATCH_SLOTS = 1 << _SLOT_BITS


@functools.lru_cache(maxsize=32)
def _coding_table(slots: int) -> npt.NDArray[np.int64]:
    """Position bytes of ``best_coding(count, slots)`` for every ``count`` in ``0..slots`` (one per shape)."""
    return np.array([best_coding(c, slots)[2] for c in range(slots + 1)], dtype=np.int64)


def _rank_rows(
    flat: npt.NDArray[np.float32], count: int, known: int
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
    """:func:`rank_prefix` of every row of ``flat`` (rows of one length, at most :data:`BATCH_SLOTS`).

    Returns the head as a mask (the slots above each row's ``known``-th best
    score) and, per row, the slots of ranks ``h .. count - 1`` in rank order,
    left-aligned in a ``g x width`` array (``h`` = that row's head size; what
    lies past ``count - h`` in a row is not to be read). The slots between
    the two order statistics of all rows are ordered by one sort of 64-bit
    keys: row, then the score bits of :func:`key_order`, then slot.
    """
    g, total = flat.shape
    part = np.partition(flat, (total - count, total - known), axis=1)
    low, high = part[:, total - count : total - count + 1], part[:, total - known : total - known + 1]
    above = flat > high
    r_idx, c_idx = np.nonzero(~above & (flat >= low))  # row by row: at least count - h slots per row
    keys = (r_idx.astype(np.uint64) << np.uint64(32 + _SLOT_BITS)) | (
        _descending_bits(flat[r_idx, c_idx]).astype(np.uint64) << np.uint64(_SLOT_BITS)
    )
    keys = np.sort(keys | c_idx.astype(np.uint64))
    cols = (keys & np.uint64(BATCH_SLOTS - 1)).astype(np.int64)
    lengths = np.bincount(r_idx, minlength=g)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    width = int(count - above.sum(axis=1).min())
    rank_in_row = np.arange(keys.size) - np.repeat(starts, lengths)
    inside = rank_in_row < width
    tail = np.zeros((g, width), dtype=np.int64)
    tail[r_idx[inside], rank_in_row[inside]] = cols[inside]
    return above, tail


def select_many(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], value_bytes: int, budget: int
) -> list[list[npt.NDArray[np.int64]]]:
    """:func:`select` on the two sections ``(A, B)`` of each of several matrices of one shape, as one batch.

    Returns exactly what ``select([s_a, s_b], value_bytes, budget)``
    returns for each pair (``tests/test_select_many.py``): the same ranks
    ``(-score, position)``, the same bisection (run for all matrices at
    once, from the same start) and the same greedy fill, which is the one
    step still taken matrix by matrix. It exists for models with many small
    matrices of one shape (MiniLM's 384 x 384), where :func:`select`'s
    cost is its few dozen numpy calls per matrix, not arithmetic: here they
    are made once per batch. Pairs of other shapes, batches of one, more
    than :data:`BATCH_SLOTS` slots per matrix, or a budget off the
    near-full path (everything fits, or no prefix is affordable) go through
    :func:`select` one by one.
    """
    if not pairs:
        return []
    slots_a, slots_b = int(pairs[0][0].numel()), int(pairs[0][1].numel())
    slots, total = [slots_a, slots_b], slots_a + slots_b
    max_count = min(total, budget // value_bytes) if budget > 0 else 0
    known = affordable_prefix(slots, value_bytes, budget) if max_count > 0 else 0
    everything = max_count == total and selection_bytes(slots, slots, value_bytes) <= budget
    same = all(int(a.numel()) == slots_a and int(b.numel()) == slots_b for a, b in pairs)
    if len(pairs) < 2 or not same or total > BATCH_SLOTS or known <= 0 or everything:
        return [select([a, b], value_bytes, budget) for a, b in pairs]
    g = len(pairs)
    stacked = torch.cat(
        [
            torch.stack([a.detach().reshape(-1) for a, _ in pairs]),
            torch.stack([b.detach().reshape(-1) for _, b in pairs]),
        ],
        dim=1,
    )
    flat = stacked.to(device="cpu", dtype=torch.float32).numpy()
    if not np.isfinite(flat).all():
        flat = np.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
    above, tail = _rank_rows(flat, max_count, known)  # rank_prefix for every row at once
    h = above.sum(axis=1)
    width = tail.shape[1]
    fid = (tail >= slots_a).view(np.uint8)  # section of each rank past the head: 0 A, 1 B
    count_b = np.zeros((g, width + 1), dtype=np.int64)  # entries of B among the first t ranks past the head
    np.cumsum(fid, axis=1, out=count_b[:, 1:])
    head_b = above[:, slots_a:].sum(axis=1)
    table_a, table_b = _coding_table(slots_a), _coding_table(slots_b)
    rows = np.arange(g)
    lo, hi = np.full(g, known, dtype=np.int64), np.full(g, max_count, dtype=np.int64)
    while (active := lo < hi).any():  # select's bisection, every matrix in step
        mid = (lo + hi + 1) // 2
        nb = head_b + count_b[rows, mid - h]
        fits = table_a[mid - nb] + table_b[nb] + mid * value_bytes <= budget
        lo = np.where(active & fits, mid, lo)
        hi = np.where(active & ~fits, mid - 1, hi)
    kept = above.copy()
    r_in, p_in = np.nonzero(np.arange(width)[None, :] < (lo - h)[:, None])
    kept[r_in, tail[r_in, p_in]] = True
    nb_lo = head_b + count_b[rows, lo - h]
    for j in range(g):
        t, start = int(lo[j]), int(lo[j] - h[j])
        counts = [t - int(nb_lo[j]), int(nb_lo[j])]
        spent = int(table_a[counts[0]] + table_b[counts[1]]) + t * value_bytes
        end = min(max_count - int(h[j]), start + GREEDY_SCAN)
        extra = _greedy_fill(fid[j], start, end, counts, slots, value_bytes, budget - spent)
        if extra:
            kept[j, tail[j, np.asarray(extra, dtype=np.int64)]] = True
    return [[np.flatnonzero(row[:slots_a]), np.flatnonzero(row[slots_a:])] for row in kept]
