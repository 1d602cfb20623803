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
from osd_fl.selection import select
from osd_fl.svd import split_factors, truncated_svd
from osd_fl.thin import times_thin

__all__ = ["BLOCK_BYTES", "Positions", "SparseLowRank", "candidate_errors", "masked"]

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
    dtype = candidates[0][0].dtype
    m = mat.to(dtype)
    ks = tuple(int(b.shape[0]) for _, b in candidates)
    offsets = [0, *itertools.accumulate(ks)]
    # n x sum(k_c) and sum(k_c) x d; one candidate (adaptive c's common case with Z = ones) needs no copy
    a_all = candidates[0][0] if len(candidates) == 1 else torch.cat([a for a, _ in candidates], dim=1)
    b_all = candidates[0][1] if len(candidates) == 1 else torch.cat([b for _, b in candidates], dim=0)
    # the n x sum(k_c) and sum(k_c) x d terms in float64 numpy (small: fewer, cheaper calls than torch's)
    a64 = _numpy64(a_all)
    if z is None:
        base, proj, quads = _unweighted_terms(m, a64, b_all, ks, offsets, include_base)
    else:
        a64_t = torch.from_numpy(a64).to(a_all.device)  # on CPU the same memory: no second conversion
        base, proj_t, quads = _weighted_terms(m, z.to(dtype), a64_t, b_all, ks, include_base, block_bytes)
        proj = _numpy64(proj_t)
    per_col = (a64 * proj).sum(axis=0).tolist()  # sum_i A_ik ((Z M) B^T)_ik for every column k
    return [base - 2.0 * math.fsum(per_col[o : o + k]) + quad for o, k, quad in zip(offsets, ks, quads, strict=False)]


def _numpy64(t: torch.Tensor) -> npt.NDArray[np.float64]:
    """``t`` as a float64 numpy array on the CPU (no copy when it already is one)."""
    return t.detach().cpu().numpy().astype(np.float64, copy=False)


def _unweighted_terms(
    m: torch.Tensor,
    a64: npt.NDArray[np.float64],
    b_all: torch.Tensor,
    ks: tuple[int, ...],
    offsets: list[int],
    include_base: bool,
) -> tuple[float, npt.NDArray[np.float64], list[float]]:
    """``Z = ones``: ``sum M^2``, ``M B^T`` (float64) and each candidate's ``sum((A^T A) * (B B^T))``."""
    proj = _numpy64(times_thin(m, b_all.T))  # n x sum(k_c): one pass over M
    base = float(torch.dot(m.reshape(-1), m.reshape(-1))) if include_base else 0.0
    b64 = _numpy64(b_all)
    gram = (a64.T @ a64) * (b64 @ b64.T)  # the diagonal blocks are the candidates' last terms
    quads = [float(gram[o : o + k, o : o + k].sum()) for o, k in zip(offsets, ks, strict=False)]
    return base, proj, quads


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
        proj32[i0 : i0 + step] = times_thin(wb, b_all.T)  # (Z M) B^T in osd_fl.thin's layout
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

    def _sparse(self, item: MatrixItem, a: torch.Tensor, b: torch.Tensor, room: int, scored: Factors) -> Positions:
        """Kept positions of ``a`` and ``b`` within ``room`` bytes of positions and values."""
        vb = self.config.value_bytes
        s_a, s_b = scored
        pos_a, pos_b = select([s_a, s_b], vb, room)
        if self.config.second_pass and item.importance is not None:
            s_b2 = self.second_pass_scores(masked(a, pos_a), b, item.importance)
            if s_b2 is not None:
                spent_a = sizes.selection_bytes([pos_a.size], [a.numel()], vb)
                (pos_b,) = select([s_b2], vb, room - spent_a)
        return pos_a, pos_b

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
        item: MatrixItem,
        budget: int,
        cs: list[int],
        whole: list[bool],
        a_max: torch.Tensor,
        b_max: torch.Tensor,
    ) -> list[Candidate]:
        """``(A, B, kept positions or None when dense)`` of each relaxation in ``cs`` (``whole``: it fits whole)."""
        k_max = int(a_max.shape[1])
        ks = [min(self.config.rank + c, k_max) for c in cs]
        with timing.phase("scores"):
            scored = self.scores(a_max, b_max, item.importance) if not all(whole) else None
        chosen: list[Candidate] = []
        with timing.phase("select"):
            for c, k, fits in zip(cs, ks, whole, strict=True):
                a, b = a_max[:, :k].contiguous(), b_max[:k]
                if c == 0:
                    chosen.append((a, b, None))
                elif fits:  # what select keeps when everything fits
                    chosen.append((a, b, (np.arange(a.numel(), dtype=np.int64), np.arange(b.numel(), dtype=np.int64))))
                else:
                    assert scored is not None
                    sub = (scored[0][:, :k], scored[1][:k])
                    chosen.append(
                        (a, b, self._sparse(item, a, b, sizes.factor_room(budget, 1, self.config.value_dtype), sub))
                    )
        return chosen

    def encode_matrix(self, item: MatrixItem, budget: int, state: CompressorState) -> TensorRecord:
        """Compress one matrix; with adaptive c keep the candidate of least weighted error.

        Every score used here is column-local (entry ``(i, j)`` of ``A``
        depends on column ``j`` of ``A`` and row ``j`` of ``B`` only), so the
        scores of the largest candidate, sliced, are every candidate's scores:
        ``Z`` is read twice for all candidates, not twice per candidate.
        """
        r = self.config.rank
        cs_all = [c for c in self._relax_values() if r + c <= min(item.n, item.d)] or [0]
        with timing.phase("svd"):
            u, s, vh = self._svd(item, r + max(cs_all))
            k_max = min(r + max(cs_all), int(s.numel()))
            a_max, b_max = split_factors(u, s, vh, k_max)
        fits = {c: c == 0 or self._fits_whole(item, budget, min(r + c, k_max)) for c in cs_all}
        cs = _contenders(cs_all, list(fits.values()), weighted=item.importance is not None)
        chosen = self._candidates(item, budget, cs, [fits[c] for c in cs], a_max, b_max)
        best = 0
        if len(chosen) > 1:  # only the winner is encoded
            with timing.phase("candidates"):
                best = self._least_error(item, chosen, s)
        a, b, pos = chosen[best]
        with timing.phase("record"):
            return lowrank_record(item, a, b) if pos is None else lowrank_record(item, a, b, pos[0], pos[1])

    @staticmethod
    def _least_error(item: MatrixItem, chosen: Sequence[Candidate], s: torch.Tensor) -> int:
        """Index of the candidate of least ``Z``-weighted error.

        With ``Z = ones`` whole candidates are read off ``s`` (:func:`_whole_errors`);
        the rest, and every candidate with ``Z``, go through one
        :func:`candidate_errors` call.
        """
        errors: dict[int, float] = {}
        if item.importance is None:
            whole = [i for i, (a, b, pos) in enumerate(chosen) if pos is None or _is_whole(a, b, pos)]
            errors.update(zip(whole, _whole_errors(s, [int(chosen[i][1].shape[0]) for i in whole]), strict=True))
        rest = [i for i in range(len(chosen)) if i not in errors]
        approx = [chosen[i][:2] if chosen[i][2] is None else _masked_pair(chosen[i]) for i in rest]
        errors.update(zip(rest, candidate_errors(item.mat, item.importance, approx, include_base=False), strict=True))
        return min(range(len(chosen)), key=errors.__getitem__)

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
