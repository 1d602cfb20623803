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

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from osd_fl.positions import best_coding
from osd_fl.sizes import selection_bytes

__all__ = ["affordable_prefix", "key_order", "rank_prefix", "select"]

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
    u = (np.asarray(vals, dtype=np.float32) + np.float32(0.0)).view(np.uint32)  # + 0.0 makes -0.0 equal to 0.0
    ordered = np.where(u >> 31, ~u, u | np.uint32(0x80000000))  # the IEEE order as unsigned integers
    keys = ((~ordered).astype(np.uint64) << np.uint64(32)) | np.arange(u.size, dtype=np.uint64)
    return (np.sort(keys) & np.uint64(0xFFFFFFFF)).astype(np.int64)


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
