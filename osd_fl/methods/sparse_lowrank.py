"""The sparse low-rank engine that OSD and MagTruncSVD share.

For one matrix ``M`` (n x d) with importance ``Z`` and budget rank ``r``:

1. SVD at the relaxed rank ``k = r + c``; fold ``sqrt(S)`` into both factors,
   ``A = U sqrt(S)`` (n x k) and ``B = sqrt(S) Vh`` (k x d).
2. Score every entry of ``A`` and ``B`` (the method's :meth:`SparseLowRank.scores`).
3. Rank all entries of ``A`` and ``B`` together by score and keep them while
   the *encoded* sections fit the bytes dense rank-``r`` factors would take
   (:func:`osd_fl.selection.select`); optionally re-select ``B`` after ``A``
   is masked, with the method's :meth:`SparseLowRank.second_pass_scores`.
4. Adaptive ``c`` (a method's choice): try ``c = 0`` (dense TruncSVD) and
   ``c = 1..relax`` and keep the one with the least
   ``||sqrt(Z) * (M - A_hat B_hat)||_F^2`` (:func:`candidate_errors`).
"""

from __future__ import annotations

import functools
import itertools
import math
from abc import abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import numpy.typing as npt
import torch

from osd_fl import sizes, timing
from osd_fl.compressor import Compressor, CompressorState, MatrixItem, RecordForm, item_generator, lowrank_record
from osd_fl.payload import Kind, TensorRecord
from osd_fl.selection import select, select_many
from osd_fl.svd import split_factors, truncated_svd
from osd_fl.thin import times_rows_t

__all__ = ["BLOCK_BYTES", "Positions", "SparseLowRank", "candidate_errors", "masked", "unweighted_errors"]

#: Kept positions of ``A`` and of ``B`` (flat, sorted).
Positions = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]
#: Factors ``A`` (n x k) and ``B`` (k x d).
Factors = tuple[torch.Tensor, torch.Tensor]

#: Bytes of one row block of ``M`` in :func:`candidate_errors` with ``Z`` on CPU: the blocks of ``M``,
#: ``Z`` and ``Z * M`` stay in cache while both products read them, so each is read from memory once.
BLOCK_BYTES = 1 << 21


def masked(f: torch.Tensor, pos: npt.NDArray[np.int64]) -> torch.Tensor:
    """``f`` with every entry outside the flat positions ``pos`` (sorted, distinct) set to zero."""
    if pos.size == f.numel():  # every entry kept
        return f
    # built in numpy (factors are small: n x k): fewer and cheaper calls than torch's index ops on CPU
    flat = f.detach().reshape(-1).cpu().numpy()
    out = np.zeros_like(flat)
    out[pos] = flat[pos]
    return torch.from_numpy(out).to(f.device).reshape(f.shape)


def candidate_errors(
    mat: torch.Tensor,
    z: torch.Tensor | None,
    candidates: Sequence[Factors],
    *,
    include_base: bool = True,
    block_bytes: int = BLOCK_BYTES,
) -> list[float]:
    """Z-weighted squared error ``sum Z * (M - A_c B_c)^2`` of every candidate, without forming ``A_c B_c``.

    Adaptive c compares a handful of rank-``k_c`` approximations of one
    matrix. Forming each ``n x d`` product and its error costs about five
    passes over ``n x d`` memory per candidate, which dominated OSD's time.
    Here the error is expanded,

    ``sum Z (M - AB)^2 = sum Z M^2 - 2 sum(A * ((Z M) B^T)) + sum_{k,l} sum_i A_ik A_il (Z (B_k * B_l)^T)_i``,

    and one product ``(Z M) [B_1; ...; B_m]^T`` plus one product of ``Z``
    with every candidate's row pairs ``B_k * B_l`` serve all candidates,
    computed block by block of rows so that ``M`` and ``Z`` are each read
    from memory once (``Z = None``: the last term is
    ``sum((A^T A) * (B B^T))``, no pass at all). The small terms are summed
    in float64; the first term is the same for every candidate, so the
    comparison carries only the float32 rounding of the two products
    (relative ~1e-6 of the terms).

    Parameters
    ----------
    mat
        The matrix ``M`` (``n x d``).
    z
        Its importance map (``n x d``) or ``None`` for ones.
    candidates
        ``(A_c, B_c)`` pairs, ``n x k_c`` and ``k_c x d`` (masked factors).
    include_base
        Add ``sum Z M^2`` (the same for every candidate); ``False`` saves a
        pass when only the ranking is needed.
    block_bytes
        Bytes of one row block of ``M`` when ``Z`` is on the CPU (on CUDA the
        whole matrix is one block).

    Returns
    -------
    list of float
        One error per candidate, in order.

    """
    if not candidates:
        return []
    if z is None:
        return unweighted_errors([mat], [candidates], include_base=include_base)[0]
    dtype = candidates[0][0].dtype
    m = mat.to(dtype)
    ks = tuple(int(b.shape[0]) for _, b in candidates)
    offsets = [0, *itertools.accumulate(ks)]
    # n x sum(k_c) and sum(k_c) x d; one candidate (adaptive c's common case with Z = ones) needs no copy
    a_all = candidates[0][0] if len(candidates) == 1 else torch.cat([a for a, _ in candidates], dim=1)
    b_all = candidates[0][1] if len(candidates) == 1 else torch.cat([b for _, b in candidates], dim=0)
    # the n x sum(k_c) and sum(k_c) x d terms in float64 numpy (small: fewer, cheaper calls than torch's)
    a64 = _numpy64(a_all)
    a64_t = torch.from_numpy(a64).to(a_all.device)  # on CPU the same memory: no second conversion
    base, proj_t, quads = _weighted_terms(m, z.to(dtype), a64_t, b_all, ks, include_base, block_bytes)
    proj = _numpy64(proj_t)
    per_col = (a64 * proj).sum(axis=0).tolist()  # sum_i A_ik ((Z M) B^T)_ik for every column k
    return [base - 2.0 * math.fsum(per_col[o : o + k]) + quad for o, k, quad in zip(offsets, ks, quads, strict=False)]


def _numpy64(t: torch.Tensor) -> npt.NDArray[np.float64]:
    """``t`` as a float64 numpy array on the CPU (no copy when it already is one)."""
    return t.detach().cpu().numpy().astype(np.float64, copy=False)


def unweighted_errors(
    mats: Sequence[torch.Tensor], candidates: Sequence[Sequence[Factors]], *, include_base: bool = True
) -> list[list[float]]:
    """:func:`candidate_errors` with ``Z = ones`` for several matrices of one shape at once.

    ``candidates[j]`` are matrix ``j``'s ``(A_c, B_c)`` pairs, the same ranks
    for every matrix. One product ``M_j B_j^T`` per matrix (one pass over
    it); the float64 terms ``sum(A * (M B^T))`` and ``sum((A^T A) * (B B^T))``
    of all matrices are formed together, in a handful of numpy calls
    whatever their number (the sparse low-rank engine's batch of equal
    shapes; :func:`candidate_errors` calls it with one matrix).
    """
    ks = tuple(int(b.shape[0]) for _, b in candidates[0])
    offsets = [0, *itertools.accumulate(ks)]
    dtype = candidates[0][0][0].dtype
    ms = [m.to(dtype) for m in mats]
    a_all = torch.stack([c[0][0] if len(c) == 1 else torch.cat([a for a, _ in c], dim=1) for c in candidates])
    b_all = torch.stack([c[0][1] if len(c) == 1 else torch.cat([b for _, b in c], dim=0) for c in candidates])
    proj = _numpy64(torch.stack([times_rows_t(m, b) for m, b in zip(ms, b_all, strict=True)]))  # g x n x K
    a64, b64 = _numpy64(a_all), _numpy64(b_all)
    gram = (a64.transpose(0, 2, 1) @ a64) * (b64 @ b64.transpose(0, 2, 1))  # diagonal blocks: the last terms
    quads = np.stack([gram[:, o : o + k, o : o + k].sum(axis=(1, 2)) for o, k in zip(offsets, ks, strict=False)], 1)
    per_col = (a64 * proj).sum(axis=1).tolist()  # sum_i A_ik (M B^T)_ik for every column k of every matrix
    bases = [float(torch.dot(m.reshape(-1), m.reshape(-1))) if include_base else 0.0 for m in ms]
    return [
        [base - 2.0 * math.fsum(cols[o : o + k]) + q for o, k, q in zip(offsets, ks, qs, strict=False)]
        for base, cols, qs in zip(bases, per_col, quads.tolist(), strict=True)
    ]


def _weighted_terms(
    m: torch.Tensor,
    zc: torch.Tensor,
    a64: torch.Tensor,
    b_all: torch.Tensor,
    ks: tuple[int, ...],
    include_base: bool,
    block_bytes: int,
) -> tuple[float, torch.Tensor, list[float]]:
    """``sum Z M^2``, ``(Z M) B^T`` (float64) and each candidate's last term, reading ``M`` and ``Z`` once."""
    n, d = m.shape
    dtype = m.dtype
    ki, li, weight, owner = _pair_index(ks, a64.device)
    pairs_t = (b_all[ki] * b_all[li]).T.contiguous()  # d x (pairs of every candidate)
    proj32 = torch.empty(n, b_all.shape[0], dtype=dtype, device=m.device)
    pair32 = torch.empty(n, pairs_t.shape[1], dtype=dtype, device=m.device)
    step = n if m.is_cuda else max(1, min(n, block_bytes // max(1, d * m.element_size())))
    wbuf = torch.empty(step, d, dtype=dtype, device=m.device)
    base_t = torch.zeros((), dtype=torch.float64, device=m.device)
    for i0 in range(0, n, step):
        mb, zb = m[i0 : i0 + step], zc[i0 : i0 + step]
        wb = torch.mul(mb, zb, out=wbuf[: mb.shape[0]])
        proj32[i0 : i0 + step] = times_rows_t(wb, b_all)  # (Z M) B^T in osd_fl.thin's layout
        torch.matmul(zb, pairs_t, out=pair32[i0 : i0 + step])
        if include_base:
            base_t += torch.dot(wb.reshape(-1), mb.reshape(-1)).to(torch.float64)
    per_pair = (a64[:, ki] * a64[:, li] * pair32.to(torch.float64)).sum(dim=0) * weight
    quad_t = torch.zeros(len(ks), dtype=torch.float64, device=m.device).index_add_(0, owner, per_pair)
    return float(base_t), proj32.to(torch.float64), quad_t.tolist()


@functools.lru_cache(maxsize=64)
def _pair_index_cpu(ks: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ki_parts, li_parts, owner_parts = [], [], []
    offset = 0
    for j, k in enumerate(ks):
        ki, li = torch.triu_indices(k, k)
        ki_parts.append(ki + offset)
        li_parts.append(li + offset)
        owner_parts.append(torch.full((ki.numel(),), j, dtype=torch.long))
        offset += k
    ki_all, li_all = torch.cat(ki_parts), torch.cat(li_parts)
    weight = torch.where(ki_all == li_all, 1.0, 2.0).to(torch.float64)
    return ki_all, li_all, weight, torch.cat(owner_parts)


def _pair_index(
    ks: tuple[int, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row pairs ``k <= l`` of every candidate in the stacked factors: indices, weight (1 or 2), candidate."""
    parts = _pair_index_cpu(ks)
    return parts if device.type == "cpu" else tuple(t.to(device) for t in parts)  # type: ignore[return-value]


#: A candidate of adaptive c: factors ``A``, ``B`` and their kept positions (``None``: dense factors).
Candidate = tuple[torch.Tensor, torch.Tensor, Positions | None]


def _is_whole(a: torch.Tensor, b: torch.Tensor, pos: Positions) -> bool:
    return pos[0].size == a.numel() and pos[1].size == b.numel()


def _masked_pair(cand: Candidate) -> Factors:
    a, b, pos = cand
    assert pos is not None
    return masked(a, pos[0]), masked(b, pos[1])


def _contenders(cs: Sequence[int], whole: Sequence[bool], *, weighted: bool) -> list[int]:
    """The relaxations adaptive c must compare, of ``cs`` (increasing) whose factors fit whole where ``whole``.

    Without an importance map a candidate whose factors are kept whole is the
    truncated SVD at its rank, whose error ``||M||^2 - sum_{i<=k} s_i^2``
    (``U^T M V = S`` holds for the exact and the randomized SVD alike) falls
    with the rank: of the whole candidates only the largest can win, so the
    others are neither built nor compared. With int8 values at ``r = 1`` the
    ranks ``r + 1`` and ``r + 2`` fit whole, so two of the four candidates
    (``c = 0, 1``) are dropped. With ``Z`` the weighted error need not fall
    with the rank, and all are compared.
    """
    if weighted:
        return list(cs)
    largest_whole = max((c for c, w in zip(cs, whole, strict=True) if w), default=None)
    return [c for c, w in zip(cs, whole, strict=True) if not w or c == largest_whole]


def _whole_errors(s: torch.Tensor, ks: Sequence[int]) -> list[float]:
    """``-sum_{i<=k} s_i^2`` for each rank ``k``: a whole candidate's error without ``Z``, less ``||M||^2``.

    The same quantity :func:`candidate_errors` returns with ``include_base=False``
    (``-2 sum(A * (M B^T)) + sum((A^T A) * (B B^T)) = -2 sum s^2 + sum s^2``
    since ``U^T M V = S``), read from the singular values without a pass over ``M``.
    """
    cum = list(itertools.accumulate(x * x for x in s.detach().to(torch.float64).tolist()))
    return [-cum[k - 1] for k in ks]


class SparseLowRank(Compressor):
    """Relaxed-rank SVD factors sparsified jointly by a score (the engine of OSD and MagTruncSVD).

    A method supplies :meth:`scores` (the first pass) and, to support
    ``second_pass``, :meth:`second_pass_scores`.
    """

    supports_global: ClassVar[bool] = True
    #: Whether to try c = 0..relax and keep the least weighted error.
    adaptive_c: ClassVar[bool] = False

    @abstractmethod
    def scores(self, a: torch.Tensor, b: torch.Tensor, z: torch.Tensor | None) -> Factors:
        """Score every entry of ``a`` and ``b`` (higher = keep first)."""

    def second_pass_scores(self, a_kept: torch.Tensor, b: torch.Tensor, z: torch.Tensor) -> torch.Tensor | None:
        """Scores of ``b``'s entries once ``a`` is masked to its kept entries, or ``None`` for no second pass.

        Called only with ``second_pass=True`` and an importance map; the
        engine then re-selects ``B`` in the bytes ``A`` left.
        """
        return None

    def _svd(self, item: MatrixItem, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        return truncated_svd(
            item.mat, k, mode=cfg.svd, oversample=cfg.oversample, niter=cfg.niter, generator=item_generator(cfg, item)
        )

    def _sparse(
        self, items: Sequence[MatrixItem], cut: Sequence[Factors], room: int, scored: Sequence[Factors]
    ) -> list[Positions]:
        """Kept positions of each matrix's ``a`` and ``b`` within ``room`` bytes of positions and values.

        Matrices without a second pass are selected as one batch
        (:func:`osd_fl.selection.select_many`, the same positions as
        :func:`osd_fl.selection.select` on each).
        """
        vb = self.config.value_bytes
        if not (self.config.second_pass and any(item.importance is not None for item in items)):
            return [(pa, pb) for pa, pb in select_many(scored, vb, room)]
        out: list[Positions] = []
        for item, (a, b), (s_a, s_b) in zip(items, cut, scored, strict=True):
            pos_a, pos_b = select([s_a, s_b], vb, room)
            if item.importance is not None:
                s_b2 = self.second_pass_scores(masked(a, pos_a), b, item.importance)
                if s_b2 is not None:
                    spent_a = sizes.selection_bytes([pos_a.size], [a.numel()], vb)
                    (pos_b,) = select([s_b2], vb, room - spent_a)
            out.append((pos_a, pos_b))
        return out

    def _relax_values(self) -> list[int]:
        cfg = self.config
        if self.adaptive_c and cfg.adaptive:
            return list(range(0, cfg.relax + 1))
        return [cfg.relax]

    def _fits_whole(self, item: MatrixItem, budget: int, k: int) -> bool:
        """Whether rank-``k`` factors fit the budget whole (then :func:`select` keeps every entry)."""
        return (item.n + item.d) * k * self.config.value_bytes <= sizes.factor_room(budget, 1, self.config.value_dtype)

    def _candidates(
        self,
        items: Sequence[MatrixItem],
        budget: int,
        cs: list[int],
        whole: list[bool],
        factors: Sequence[Factors],
    ) -> list[list[Candidate]]:
        """Each matrix's ``(A, B, kept positions or None when dense)`` of every relaxation in ``cs``.

        ``whole``: the relaxation fits whole; ``factors``: each matrix's
        factors at the largest rank. The matrices share shape and budget.
        """
        k_max = int(factors[0][0].shape[1])
        ks = [min(self.config.rank + c, k_max) for c in cs]
        scored: list[Factors] = []
        with timing.phase("scores"):
            if not all(whole):
                scored = [self.scores(a, b, item.importance) for item, (a, b) in zip(items, factors, strict=True)]
        chosen: list[list[Candidate]] = [[] for _ in items]
        room = sizes.factor_room(budget, 1, self.config.value_dtype)
        with timing.phase("select"):
            for c, k, fits in zip(cs, ks, whole, strict=True):
                cut = [(a[:, :k].contiguous(), b[:k]) for a, b in factors]
                if c == 0:
                    for row, (a, b) in zip(chosen, cut, strict=True):
                        row.append((a, b, None))
                elif fits:  # what select keeps when everything fits
                    for row, (a, b) in zip(chosen, cut, strict=True):
                        row.append((a, b, (np.arange(a.numel(), dtype=np.int64), np.arange(b.numel(), dtype=np.int64))))
                else:
                    subs = [(s_a[:, :k], s_b[:k]) for s_a, s_b in scored]
                    for row, (a, b), pos in zip(chosen, cut, self._sparse(items, cut, room, subs), strict=True):
                        row.append((a, b, pos))
        return chosen

    def _prepare(self, item: MatrixItem, budget: int) -> tuple[Factors, torch.Tensor, list[int], list[bool]]:
        """The SVD at the largest relaxed rank: factors, singular values, contenders and which fit whole."""
        r = self.config.rank
        cs_all = [c for c in self._relax_values() if r + c <= min(item.n, item.d)] or [0]
        with timing.phase("svd"):
            u, s, vh = self._svd(item, r + max(cs_all))
            k_max = min(r + max(cs_all), int(s.numel()))
            factors = split_factors(u, s, vh, k_max)
        fits = {c: c == 0 or self._fits_whole(item, budget, min(r + c, k_max)) for c in cs_all}
        cs = _contenders(cs_all, list(fits.values()), weighted=item.importance is not None)
        return factors, s, cs, [fits[c] for c in cs]

    def encode_matrix(self, item: MatrixItem, budget: int, state: CompressorState) -> TensorRecord:
        """Compress one matrix; with adaptive c keep the candidate of least weighted error.

        Every score used here is column-local (entry ``(i, j)`` of ``A``
        depends on column ``j`` of ``A`` and row ``j`` of ``B`` only), so the
        scores of the largest candidate, sliced, are every candidate's scores:
        ``Z`` is read twice for all candidates, not twice per candidate.
        """
        return self._encode_batch([item], budget, [self._prepare(item, budget)])[0]

    def encode_matrices(
        self, items: Sequence[MatrixItem], budgets: Sequence[int], state: CompressorState
    ) -> list[TensorRecord]:
        """:meth:`encode_matrix` on each matrix, matrices of one shape, budget and kind of ``Z`` as one batch.

        Each matrix has its own SVD; the selection of the whole batch is
        then made at once (:func:`osd_fl.selection.select_many`) and, without
        ``Z``, so is the comparison of adaptive c's candidates
        (:func:`unweighted_errors`; with ``Z`` it stays per matrix). This
        cuts the fixed cost of many small calls per matrix on models with
        many small matrices of one shape (docs/performance.md, section 1b).
        The records are those of :meth:`encode_matrix`.
        """
        groups: dict[object, list[int]] = {}
        for i, (item, budget) in enumerate(zip(items, budgets, strict=True)):
            key = (item.n, item.d, budget, item.mat.device, item.mat.dtype, item.importance is None)
            groups.setdefault(key, []).append(i)
        out: dict[int, TensorRecord] = {}
        for idx in groups.values():
            batch, budget = [items[i] for i in idx], budgets[idx[0]]
            preps = [self._prepare(item, budget) for item in batch]
            shape = (preps[0][0][0].shape, preps[0][2], preps[0][3])
            if all((p[0][0].shape, p[2], p[3]) == shape for p in preps):
                out.update(zip(idx, self._encode_batch(batch, budget, preps), strict=True))
            else:  # a rank-deficient SVD among them: each alone
                for i, item, prep in zip(idx, batch, preps, strict=True):
                    out[i] = self._encode_batch([item], budget, [prep])[0]
        return [out[i] for i in range(len(items))]

    def _encode_batch(
        self,
        items: Sequence[MatrixItem],
        budget: int,
        preps: Sequence[tuple[Factors, torch.Tensor, list[int], list[bool]]],
    ) -> list[TensorRecord]:
        """Records of matrices of one shape and budget whose contenders (``preps[j][2:]``) agree."""
        _, _, cs, whole = preps[0]
        chosen = self._candidates(items, budget, cs, whole, [p[0] for p in preps])
        best = [0] * len(items)
        if len(cs) > 1:  # only the winner is encoded
            with timing.phase("candidates"):
                best = self._least_errors(items, chosen, [p[1] for p in preps])
        records = []
        with timing.phase("record"):
            for item, row, k in zip(items, chosen, best, strict=True):
                a, b, pos = row[k]
                records.append(lowrank_record(item, a, b) if pos is None else lowrank_record(item, a, b, *pos))
        return records

    @staticmethod
    def _least_errors(
        items: Sequence[MatrixItem], chosen: Sequence[Sequence[Candidate]], ss: Sequence[torch.Tensor]
    ) -> list[int]:
        """Index of each matrix's candidate of least ``Z``-weighted error.

        With ``Z = ones`` whole candidates are read off ``s`` (:func:`_whole_errors`)
        and the rest of all matrices go through one :func:`unweighted_errors`
        call; with ``Z``, one :func:`candidate_errors` call per matrix.
        """
        errors: list[dict[int, float]] = [{} for _ in items]
        for item, row, s, err in zip(items, chosen, ss, errors):  # equal lengths by construction
            if item.importance is None:
                whole = [i for i, (a, b, pos) in enumerate(row) if pos is None or _is_whole(a, b, pos)]
                err.update(zip(whole, _whole_errors(s, [int(row[i][1].shape[0]) for i in whole]), strict=True))
        rest = [[i for i in range(len(row)) if i not in err] for row, err in zip(chosen, errors, strict=True)]
        approx = [
            [row[i][:2] if row[i][2] is None else _masked_pair(row[i]) for i in r]
            for row, r in zip(chosen, rest, strict=True)
        ]
        if len(items) > 1 and rest[0] and all(r == rest[0] for r in rest) and all(i.importance is None for i in items):
            found = unweighted_errors([item.mat for item in items], approx, include_base=False)
        else:
            found = [
                candidate_errors(item.mat, item.importance, ap, include_base=False)
                for item, ap in zip(items, approx, strict=True)
            ]
        for err, r, e in zip(errors, rest, found, strict=True):
            err.update(zip(r, e, strict=True))
        return [min(range(len(row)), key=err.__getitem__) for row, err in zip(chosen, errors, strict=True)]

    def record_form(self, n: int, d: int) -> RecordForm:
        """Factors at rank ``r + relax`` at most (``r + max(relax, 1)`` with a global budget), sparse or whole."""
        cfg = self.config
        relax = max(cfg.relax, 1) if cfg.budget == "global" else cfg.relax
        return RecordForm(Kind.LOWRANK, max_rank=min(cfg.rank + relax, n, d))

    def encode_global(self, items: list[MatrixItem], budget: int, state: CompressorState) -> list[TensorRecord]:
        """One budget for all matrices: every factor entry of every matrix ranked together.

        The relaxation is fixed at ``relax`` (adaptive c is per matrix only).
        """
        r, c = self.config.rank, max(self.config.relax, 1)
        factors: list[tuple[MatrixItem, torch.Tensor, torch.Tensor]] = []
        scores: list[torch.Tensor] = []
        for item in items:
            k = min(r + c, item.n, item.d)
            u, s, vh = self._svd(item, k)
            a, b = split_factors(u, s, vh, k)
            s_a, s_b = self.scores(a, b, item.importance)
            factors.append((item, a, b))
            scores += [s_a, s_b]
        positions = select(
            scores, self.config.value_bytes, sizes.factor_room(budget, len(items), self.config.value_dtype)
        )
        return [
            lowrank_record(item, a, b, positions[2 * i], positions[2 * i + 1]) for i, (item, a, b) in enumerate(factors)
        ]
