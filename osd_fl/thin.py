"""Products of a large matrix with a thin one, in the layout BLAS runs fastest.

Every SVD sketch, power step, damage score and candidate error multiplies a
large ``n x d`` matrix ``M`` by a matrix of a few columns. Written the
obvious way, ``M @ X`` and ``M.T @ Q``, these hit slow GEMM kernels in MKL
on some CPUs. On the project's AMD EPYC machine (torch 2.13.0, MKL 2024.2,
``python -m simulations.bench.thin``, output in
``docs/results/bench_2026-12-04/thin.txt``), ``M.T @ Q`` with 2 to 11
columns took 2.3-16x as long as the same product written ``(Q.T @ M).T``
(88.4 against 13.9 ms on a 4096 x 4096 matrix with 11 columns, the width
of TruncSVD's sketch at rank 1, one thread). For ``M @ X`` the gain of
``(X.T @ M.T).T`` is smaller and not uniform: 0.62-5.4x at 2 to 11 columns;
with one thread it was faster at every such width, with two it was slower at
2, 3 and 7 columns on every shape (and at 6 and 11 on 4096 x 4096). At
one column, and at 16 and 24 columns with two threads, the plain forms were
as fast or faster (0.70-1.07x), so those widths keep them.

Both return the product or a transposed view of it (not necessarily
contiguous); the values equal the plain product up to float32 summation
order.
"""

from __future__ import annotations

import torch

__all__ = ["plain_is_fast", "t_times_thin", "thin_first", "thin_first_t", "times_rows_t", "times_thin"]


def plain_is_fast(width: int) -> bool:
    """Whether the plain layout is kept for ``width`` columns: one column, or 16, 24, 32, ... (measured above)."""
    return width == 1 or (width >= 16 and width % 8 == 0)


def thin_first(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``m @ x`` written ``(x.T @ m.T).T``, at any width (what :func:`times_thin` picks off the plain-fast widths)."""
    return (x.T @ m.T).T


def thin_first_t(m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``m.T @ q`` written ``(q.T @ m).T``, at any width (what :func:`t_times_thin` picks off the plain-fast widths)."""
    return (q.T @ m).T


def times_thin(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``m @ x`` for a thin ``x`` (``d x w``, ``w`` small): :func:`thin_first` but at plain-fast widths."""
    return m @ x if plain_is_fast(int(x.shape[-1])) else thin_first(m, x)


def t_times_thin(m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``m.T @ q`` for a thin ``q`` (``n x w``, ``w`` small): :func:`thin_first_t` but at plain-fast widths."""
    return m.T @ q if plain_is_fast(int(q.shape[-1])) else thin_first_t(m, q)


def times_rows_t(m: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``m @ rows.T`` for a thin ``rows`` (``w x d``, row-major): the plain product, an NT GEMM.

    When the thin operand comes as rows (the factor ``B`` of ``A B``), the
    plain form hands it to BLAS transposed; :func:`times_thin`'s layout,
    written for a ``d x w`` operand, turns it into the slow kind of product.
    On this project's AMD EPYC with 2 threads (``python -m
    simulations.bench.thin --rows --threads 2 --widths 2,4,9,10``,
    docs/performance.md section 1c) the plain form took 1/1.16 to 1/3.7 of
    the time at 2 and 4 rows on every shape (11008 x 4096, 4 rows: 16.8
    against 62.5 ms) and about half at 9 and 10 rows from 3072 x 768 up;
    it was slower (0.77-0.83x) only at 9-10 rows on MiniLM's shapes, a
    tenth of a millisecond.
    """
    return m @ rows.T
