"""Products of a large matrix with a thin one, in the layout BLAS runs fastest.

Every SVD sketch, power step, damage score and candidate error multiplies a
large ``n x d`` matrix ``M`` by a matrix of a few columns. Written the
obvious way, ``M @ X`` and ``M.T @ Q``, these hit slow GEMM kernels in MKL
on some CPUs: on the project's AMD EPYC machine (torch 2.13.0, MKL 2024.2)
``M.T @ Q`` with 2 to 11 columns took 4-20x longer than the same product as
``(Q.T @ M).T`` (264 against 11 ms on a 4096 x 4096 matrix with 11 columns,
the width of TruncSVD's sketch at rank 1), and ``M @ X`` up to 3x longer than
``(X.T @ M.T).T``. The thin-operand-first forms were never slower by more
than run-to-run noise at any width from 1 to 24, with 1 or 2 threads
(``python -m simulations.bench.thin`` prints the comparison).

Both return a transposed view (not contiguous); the values equal the plain
product up to float32 summation order.
"""

from __future__ import annotations

import torch

__all__ = ["t_times_thin", "times_thin"]


def times_thin(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``m @ x`` for a thin ``x`` (``d x w``, ``w`` small), computed as ``(x.T @ m.T).T``."""
    return (x.T @ m.T).T


def t_times_thin(m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``m.T @ q`` for a thin ``q`` (``n x w``, ``w`` small), computed as ``(q.T @ m).T``."""
    return (q.T @ m).T
