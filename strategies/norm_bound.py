"""The norm-bound policy: which valid replies are too large to aggregate.

Two bounds, either or both (:class:`NormBound`):

* absolute: a reply whose decoded update norm exceeds ``absolute`` is
  rejected as it is validated;
* relative: after the whole round is validated, a reply whose norm exceeds
  ``relative x`` :func:`reference_norm` of the round's valid norms is
  rejected, and the round is summed from the replies within it.

Norms are float64 from the factors (:func:`strategies.replies.update_norm`,
``||A B||_F^2 = sum((A^T A) * (B B^T))``), the same with any torch thread
count and without rebuilding anything, so a decision never hinges on BLAS
rounding. The relative bound needs the round's reference before any update
can be added: the first pass keeps only each reply's norm (a float per
reply), a second pass parses the replies within the bound again and adds
them; memory stays O(model) plus O(1) per reply. The round's metrics carry
``update-norm-median`` (the plain median) and ``norm-threshold``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np

from osd_fl import ConfigError
from osd_fl.records import METRIC_NORM_MEDIAN, METRIC_NORM_THRESHOLD
from strategies.aggregation import Valid

__all__ = ["NormBound", "reference_norm"]


def reference_norm(norms: Sequence[float]) -> float:
    """The relative norm bound's reference: the median of the norms without the smallest one.

    Why not the plain median: one reply added to a set of honest replies
    shifts the plain median down by half a position whatever its weight (a
    zero update with weight 5e-324 is enough), so an honest reply near the
    threshold could be excluded by someone else's reply. Dropping the
    smallest norm first makes the reference the largest median of the
    replies with any one of them removed, so with honest replies ``H`` and
    any single other reply it is at least ``median(H)``: an honest reply
    within ``factor x median(H)`` stays accepted, and a large extra reply
    can raise the reference by at most one order statistic of ``H``. The
    cost is detection power with very few replies: with two, both are
    always within the bound (nobody can tell which one is the outlier);
    with three, an outlier is caught only above ``factor`` times the mean
    of the two larger norms. With one reply, the reference is its own norm.
    """
    ordered = sorted(norms)
    if not ordered:
        raise ValueError("reference_norm of no norms")
    return float(statistics.median(ordered[1:] or ordered))


class NormBound:
    """An absolute and/or a relative bound on the update norm.

    Parameters
    ----------
    absolute
        Reject a reply whose update norm exceeds this (``None``: no bound).
    relative
        Reject a reply whose norm exceeds this factor (>= 1) times the
        round's :func:`reference_norm` (``None``: no bound).
    """

    def __init__(self, absolute: float | None = None, relative: float | None = None) -> None:
        if absolute is not None and not (math.isfinite(absolute) and absolute > 0):
            raise ConfigError(f"norm_bound={absolute} must be a positive finite number (or None)")
        if relative is not None and not (math.isfinite(relative) and relative >= 1):
            raise ConfigError(f"norm_bound_relative={relative} must be a finite number >= 1 (or None)")
        self.absolute = None if absolute is None else float(absolute)
        self.relative = None if relative is None else float(relative)

    @property
    def active(self) -> bool:
        """Whether any bound is set (then every reply's norm is computed)."""
        return self.absolute is not None or self.relative is not None

    def absolute_reason(self, norm: float) -> str | None:
        """Why a reply of this norm is rejected by the absolute bound, or ``None``."""
        if self.absolute is not None and norm > self.absolute:
            return f"update norm {norm:.6g} exceeds the bound {self.absolute:g}"
        return None

    def split_relative(self, kept: list[Valid]) -> tuple[list[Valid], list[tuple[Valid, str]], dict[str, float]]:
        """Apply the relative bound to the round's valid replies.

        Returns
        -------
        tuple
            The replies within the bound, the rejected ones with their
            reasons, and the round's norm statistics (median, threshold).
        """
        assert self.relative is not None
        norms = [v.norm for v in kept]
        reference = reference_norm(norms)
        threshold = self.relative * reference
        stats = {METRIC_NORM_MEDIAN: float(np.median(norms)), METRIC_NORM_THRESHOLD: threshold}
        within: list[Valid] = []
        rejected: list[tuple[Valid, str]] = []
        for valid in kept:
            if valid.norm > threshold:
                reason = (
                    f"update norm {valid.norm:.6g} exceeds {self.relative:g} x the round's reference "
                    f"{reference:.6g} (median without the smallest norm) = {threshold:.6g}"
                )
                rejected.append((valid, reason))
            else:
                within.append(valid)
        return within, rejected, stats
