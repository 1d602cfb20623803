"""Per-tensor policy: which tensors are compressed, sent dense, or skipped.

Like PowerSGD's ``_should_compress``: 1-D tensors (biases, norms) and small
matrices travel dense, since their dense bytes are few and compressing them
saves little; a matrix whose rank-r budget is not below its dense size goes
dense too (dense is then cheaper *and* exact). Tensors whose name contains
``embedding_pattern`` follow ``embedding_policy``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import Enum

from osd_fl.config import CompressionConfig
from osd_fl.payload import matrix_dims
from osd_fl.sizes import matrix_budget, values_bytes

__all__ = ["Route", "plan_routes"]


class Route(Enum):
    """How one tensor travels."""

    COMPRESS = "compress"
    DENSE = "dense"
    SKIP = "skip"


def plan_routes(
    shapes: Mapping[str, Sequence[int]], config: CompressionConfig, *, all_dense: bool = False
) -> dict[str, Route]:
    """Decide the route of every tensor (in the mapping's order)."""
    routes: dict[str, Route] = {}
    for name, shape in shapes.items():
        is_embedding = bool(config.embedding_pattern) and config.embedding_pattern in name
        if is_embedding and config.embedding_policy == "skip":
            routes[name] = Route.SKIP
            continue
        if all_dense or (is_embedding and config.embedding_policy == "dense"):
            routes[name] = Route.DENSE
            continue
        n, d = matrix_dims(shape)
        small = len(shape) < 2 or n * d < max(config.min_numel, 1)
        if small or matrix_budget(n, d, config.rank, config.budget_value_dtype) >= values_bytes(
            n * d, config.value_dtype
        ):
            routes[name] = Route.DENSE
        else:
            routes[name] = Route.COMPRESS
    return routes
