"""What a receiver checks about a decoded payload beyond its framing.

:func:`osd_fl.codec.decode` proves a payload is well-formed. These checks
prove it is one a *correct client* of the configured method could have sent,
and measure what the receiver's decisions rest on, without rebuilding the
dense update where a cheaper exact route exists:

* :func:`check_conformance`: every record has the kind, rank, value dtype and
  block a correct client produces for that tensor under the configuration
  (the same routing, :func:`osd_fl.policy.plan_routes`, as the sender's).
* :func:`value_limit`: the largest magnitude an update value or a model value
  may take in a dtype, so that the model, its updates and the squares of its
  updates (a server optimizer's second moment) all stay finite.
* :func:`record_max_abs` and :func:`record_sq_norm`: a record's largest
  rebuilt magnitude and its squared L2 norm, in float64 NumPy, so that the
  result does not depend on torch's thread count (NumPy's ``einsum`` without
  ``optimize`` and its pairwise ``sum`` run in one thread in a fixed order).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import torch

from osd_fl.compressor import get_compressor
from osd_fl.config import CompressionConfig
from osd_fl.dtypes import dtype_name, finfo_max
from osd_fl.errors import PayloadError
from osd_fl.payload import Kind, Payload, TensorRecord, matrix_dims
from osd_fl.policy import Route, plan_routes

__all__ = ["check_conformance", "record_max_abs", "record_sq_norm", "value_limit"]

#: Elements of a rebuilt low-rank block at a time in :func:`record_max_abs` (2 MiB of float64).
_BLOCK_ELEMENTS = 1 << 18


def value_limit(dtype: str | torch.dtype) -> float:
    """``sqrt(finfo(dtype).max) / 4``: the largest accepted magnitude in ``dtype``.

    If every model value and every update value is at most this, a server
    step's difference ``delta`` is at most twice it and ``delta**2`` at most
    a quarter of the dtype's largest value, so a server optimizer's moments
    (FedAdam, FedYogi, FedAdagrad: convex combinations of ``delta`` and
    ``delta**2``) stay finite. float16: 64; bfloat16 and float32: about
    4.6e18 (2**62); float64: about 3.4e153.
    """
    name = dtype_name(dtype)
    try:
        return math.sqrt(finfo_max(name)) / 4
    except KeyError:
        raise PayloadError(f"no value limit for dtype {name!r}") from None


def check_conformance(payload: Payload, config: CompressionConfig) -> None:
    """Raise :class:`PayloadError` unless a correct client of ``config`` could have produced ``payload``.

    ``config`` is the *resolved* configuration (method overrides applied, as
    :func:`osd_fl.resolve_config` returns it). Per tensor, the route (skip,
    dense, compress) follows from its shape and name exactly as on the
    client; a compressed matrix must carry the kind the method produces, a
    rank no larger than the method's, whole factors where the method sends
    them whole, and int8's configured block; a ZERO record (an unchanged
    tensor) is accepted on any route. Every value travels in
    ``config.value_dtype``.

    Raises
    ------
    PayloadError
        Naming the tensor and what a correct client would have sent.
    """
    if payload.value_dtype != config.value_dtype:
        raise PayloadError(
            f"values travel as {payload.value_dtype}, but method {config.method!r} is configured "
            f"with value_dtype={config.value_dtype!r}"
        )
    comp = get_compressor(config)
    shapes = {rec.name: rec.shape for rec in payload.records}
    routes = plan_routes(shapes, config, all_dense=comp.all_dense)
    for rec in payload.records:
        route = routes[rec.name]
        if rec.kind == Kind.ZERO:
            continue  # an unchanged tensor travels as ZERO on any route (and adds nothing)
        if route == Route.SKIP:
            _expect_kind(rec, Kind.ZERO, "skipped by embedding_policy='skip'")
        elif route == Route.DENSE:
            _expect_kind(rec, Kind.DENSE, "sent dense by the tensor policy")
        else:
            n, d = matrix_dims(rec.shape)
            form = comp.record_form(n, d)
            _expect_kind(rec, form.kind, f"compressed by {config.method!r}")
            if form.kind == Kind.LOWRANK:
                if not 1 <= rec.rank <= form.max_rank:
                    raise PayloadError(
                        f"tensor {rec.name!r}: rank {rec.rank}, but {config.method!r} sends rank 1..{form.max_rank} "
                        f"for a {n}x{d} matrix"
                    )
                if form.full_factors and any(s.positions is not None for s in rec.sections):
                    raise PayloadError(f"tensor {rec.name!r}: sparse factors, but {config.method!r} sends them whole")
            if form.kind == Kind.QUANT8 and form.block and rec.block != form.block:
                raise PayloadError(f"tensor {rec.name!r}: int8 block {rec.block}, configured {form.block}")


def _expect_kind(rec: TensorRecord, kind: Kind, why: str) -> None:
    if rec.kind != kind:
        raise PayloadError(f"tensor {rec.name!r}: a {rec.kind.name} record, but it is {why} (expected {kind.name})")


def _factors(rec: TensorRecord) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    n, d = rec.matrix_shape
    a = rec.sections[0].dense().astype(np.float64).reshape(n, rec.rank)
    b = rec.sections[1].dense().astype(np.float64).reshape(rec.rank, d)
    return a, b


def _values(rec: TensorRecord) -> npt.NDArray[np.float64]:
    """The transmitted values of a DENSE, SPARSE or QUANT8 record (as float64)."""
    if rec.kind == Kind.QUANT8:
        assert rec.scales is not None and rec.qvalues is not None
        scales = np.repeat(rec.scales.astype(np.float64), rec.block)[: rec.numel]
        return rec.qvalues.astype(np.float64) * scales
    return rec.sections[0].values.astype(np.float64)


def record_sq_norm(rec: TensorRecord) -> float:
    """The squared L2 norm of the tensor ``rec`` rebuilds to, in float64, independent of thread counts.

    A low-rank record costs ``O((n + d) k^2)``, not a rebuild:
    ``||A B||_F^2 = sum((A^T A) * (B B^T))``. The result is the exact norm of
    the decoded factors' product up to float64 rounding (relative error about
    ``(n + d + k) * 2**-53`` of ``|| |A| |B| ||_F^2``); the float32 tensor the
    receiver adds differs from that product by float32 rounding.
    """
    if rec.kind == Kind.ZERO:
        return 0.0
    if rec.kind == Kind.LOWRANK:
        a, b = _factors(rec)
        gram_a = np.einsum("ik,il->kl", a, a)
        gram_b = np.einsum("kj,lj->kl", b, b)
        return float(np.sum(gram_a * gram_b))
    values = _values(rec)
    return float(np.sum(values * values))


def record_max_abs(rec: TensorRecord) -> float:
    """The largest magnitude among the values ``rec`` rebuilds to (float64, before any cast).

    Low-rank records are first bounded cheaply by ``max_i sum_k |A_ik| *
    max |B|``; only if that bound is not already small enough to be the
    answer's stand-in (see :func:`exceeds`) is the product formed, in row
    blocks of 2 MiB.
    """
    if rec.kind == Kind.ZERO:
        return 0.0
    if rec.kind != Kind.LOWRANK:
        values = _values(rec)
        return float(np.max(np.abs(values))) if values.size else 0.0
    a, b = _factors(rec)
    if a.size == 0 or b.size == 0:
        return 0.0
    rows = max(1, _BLOCK_ELEMENTS // max(b.shape[1], 1))
    best = 0.0
    for start in range(0, a.shape[0], rows):
        block = a[start : start + rows] @ b
        best = max(best, float(np.max(np.abs(block))) if block.size else 0.0)
    return best


def _product_bound(rec: TensorRecord) -> float:
    """``max_i sum_k |A_ik| * max |B|`` of a LOWRANK record: no value of ``A B`` is larger in magnitude.

    Read off the float32 sections (row sums accumulated in float64) without
    float64 copies of the factors; 0 when either factor has no kept value.
    """
    sec_a, sec_b = rec.sections
    if sec_a.values.size == 0 or sec_b.values.size == 0:
        return 0.0
    rows = np.abs(sec_a.dense()).reshape(rec.matrix_shape[0], rec.rank).sum(axis=1, dtype=np.float64)
    return float(rows.max()) * float(np.abs(sec_b.values).max())


def exceeds(rec: TensorRecord, limit: float) -> float | None:
    """``None`` if every rebuilt value of ``rec`` is at most ``limit`` in magnitude, else the largest one.

    The cheap bound decides honest records (whose values are far below any
    :func:`value_limit`) without forming a low-rank product.
    """
    if rec.kind == Kind.LOWRANK and _product_bound(rec) <= limit:
        return None
    largest = record_max_abs(rec)
    return largest if largest > limit else None
