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

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from osd_fl.positions import best_coding
from osd_fl.sizes import selection_bytes

__all__ = ["select"]

#: Entries scanned past the prefix by the greedy fill.
GREEDY_SCAN = 1024


def _greedy_fill(
    fid: npt.NDArray[np.int64],
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
    parts = [s.reshape(-1).to(torch.float32) for s in scores]
    # one section (top-k of a whole matrix) needs no concatenated copy: nan_to_num makes its own
    flat = parts[0] if len(parts) == 1 else torch.cat(parts)
    flat = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
    if max_count >= total:
        order = torch.sort(flat, descending=True, stable=True).indices
    else:
        order = torch.topk(flat, max_count, sorted=True).indices
    order_np = np.asarray(order.cpu().numpy(), dtype=np.int64)
    offsets = np.cumsum([0, *slots])
    nf = len(slots)
    if nf == 2:  # A and B of one matrix (the common case): section ids and prefix counts in one pass each
        fid = (order_np >= slots[0]).astype(np.int64)
        in_a = np.concatenate([[0], np.cumsum(fid == 0)])
        slots_a, slots_b = slots

        def cost(t: int) -> int:
            ca = int(in_a[t])
            return best_coding(ca, slots_a)[2] + best_coding(t - ca, slots_b)[2] + t * value_bytes

    else:
        fid = np.searchsorted(offsets, order_np, side="right") - 1

        def cost(t: int) -> int:
            counts = np.bincount(fid[:t], minlength=nf)
            return selection_bytes([int(c) for c in counts], slots, value_bytes)

    lo, hi = 0, len(order_np)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    counts = [int(c) for c in np.bincount(fid[:lo], minlength=nf)]
    spent = selection_bytes(counts, slots, value_bytes)
    extra_keep = _greedy_fill(fid, lo, min(len(order_np), lo + GREEDY_SCAN), counts, slots, value_bytes, budget - spent)
    kept = np.zeros(total, dtype=bool)  # a mask of the flat slots: each section's positions come out sorted
    kept[order_np[:lo]] = True
    if extra_keep:
        kept[order_np[np.asarray(extra_keep, dtype=np.int64)]] = True
    return [np.flatnonzero(kept[offsets[f] : offsets[f + 1]]) for f in range(nf)]
