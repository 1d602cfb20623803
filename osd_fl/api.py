"""The public entry points: :func:`compress`, :func:`decompress`, :func:`payload_budget`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from osd_fl import sizes
from osd_fl.codec import MAX_ELEMENTS, TensorSpec, decode, encode, iter_tensors
from osd_fl.compressor import (
    REGISTRY,
    Compressor,
    CompressorState,
    MatrixItem,
    dense_record,
    get_compressor,
    with_method_precision,
)
from osd_fl.config import CompressionConfig
from osd_fl.dtypes import TORCH_NAMES
from osd_fl.errors import ConfigError, UpdateError
from osd_fl.feedback import ErrorFeedback
from osd_fl.payload import Kind, Payload, TensorRecord, matrix_dims
from osd_fl.policy import Route, plan_routes

__all__ = ["compress", "decompress", "describe", "payload_budget", "payload_limit", "resolve_config"]


_PLAIN = (str, int, float, bool, type(None))
#: Resolved configs by :func:`_config_key`: building a CompressionConfig re-reads every
#: field's type hints (tens of milliseconds), and a client resolves the same one each call.
_RESOLVED: dict[tuple[Any, ...], CompressionConfig] = {}


def _config_key(
    config: CompressionConfig | None, method: str | None, rank: int | None, options: Mapping[str, Any]
) -> tuple[Any, ...] | None:
    """A key that determines :func:`resolve_config`'s outcome, or ``None`` if it cannot be cached.

    Every value enters with its type, so ``True`` and ``1`` (equal and of
    equal hash, but coerced differently) never share an entry; anything but
    plain str/int/float/bool/None values is not cached.
    """
    parts: list[tuple[str, type, Any]] = []
    if config is not None:
        parts += [(f.name, type(v), v) for f in dataclasses.fields(config) for v in (getattr(config, f.name),)]
    parts += [("\0method", type(method), method), ("\0rank", type(rank), rank)]
    parts += [("\0opt." + k, type(v), v) for k, v in sorted(options.items())]
    if not all(isinstance(v, _PLAIN) for _, _, v in parts):
        return None
    # the method's class supplies the overrides: a changed registry must not hit an old entry
    return (config is None, tuple(REGISTRY.items()), *parts)


def resolve_config(
    config: CompressionConfig | None = None, method: str | None = None, rank: int | None = None, **options: Any
) -> CompressionConfig:
    """Merge a base config, explicit ``method``/``rank`` and loose options; apply method overrides.

    ``value_dtype="auto"`` becomes the method's measured precision
    (:attr:`~osd_fl.compressor.Compressor.auto_precision`: int8 values within
    float32 TruncSVD's bytes for OSD, float32 for the others).
    """
    key = _config_key(config, method, rank, options)
    if key is not None and (hit := _RESOLVED.get(key)) is not None:
        return hit
    cfg = _resolve_config(config, method, rank, options)
    if key is not None:
        if len(_RESOLVED) >= 256:
            _RESOLVED.clear()
        _RESOLVED[key] = cfg
    return cfg


def _resolve_config(
    config: CompressionConfig | None, method: str | None, rank: int | None, options: Mapping[str, Any]
) -> CompressionConfig:
    cfg = config or CompressionConfig()
    changes: dict[str, Any] = dict(options)
    if method is not None:
        changes["method"] = method
    if rank is not None:
        changes["rank"] = rank
    if changes:
        cfg = cfg.replace(**changes)
    return with_method_precision(type(get_compressor(cfg)), cfg)


def _fixed_and_matrix_bytes(
    shapes: Mapping[str, Sequence[int]], cfg: CompressionConfig, routes: Mapping[str, Route]
) -> tuple[int, int]:
    return sizes.payload_parts(
        shapes,
        cfg.method,
        cfg.rank,
        cfg.value_dtype,
        budget_dtype=cfg.budget_value_dtype,
        dense={k for k, r in routes.items() if r == Route.DENSE},
        compressed={k for k, r in routes.items() if r == Route.COMPRESS},
    )


def payload_budget(shapes: Mapping[str, Sequence[int]], config: CompressionConfig | None = None, **options: Any) -> int:
    """Bytes a budgeted method's payload never exceeds for tensors of ``shapes``.

    That is ``budget_bytes`` when set, otherwise the header, every record's
    fixed fields, dense tensors at ``value_dtype`` and, per compressed matrix,
    exactly what dense rank-r TruncSVD factors cost at ``budget_dtype``
    (``value_dtype`` unless set).
    """
    cfg = resolve_config(config, **options)
    if cfg.budget_bytes:
        return cfg.budget_bytes
    comp = get_compressor(cfg)
    routes = plan_routes(shapes, cfg, all_dense=comp.all_dense)
    fixed, matrices = _fixed_and_matrix_bytes(shapes, cfg, routes)
    return fixed + matrices


def payload_limit(shapes: Mapping[str, Sequence[int]], config: CompressionConfig | None = None, **options: Any) -> int:
    """Largest payload (bytes) a server accepts from an honest client for tensors of ``shapes``.

    For a budgeted method (or an explicit ``budget_bytes``) it is
    :func:`payload_budget`; for an unbudgeted one (dense, fp16, int8) twice the
    float32 model plus 64 KiB of framing.
    """
    cfg = resolve_config(config, **options)
    if get_compressor(cfg).budgeted or cfg.budget_bytes:
        return payload_budget(shapes, cfg)
    return sizes.unbudgeted_limit(shapes)


def _finite_and_zero(t: torch.Tensor) -> tuple[bool, bool]:
    """``(every entry finite, every entry zero)`` of ``t`` from one reduction.

    ``aminmax`` propagates NaN and returns the infinities themselves, so both
    ends are finite exactly when every entry is, and both are zero exactly
    when every entry is: one fused pass instead of ``isfinite(t).all()``
    (an elementwise pass, a full-size boolean temporary and a reduction)
    plus a second pass for ``t.any()``. An empty tensor is finite and zero.
    """
    if t.numel() == 0:
        return True, True
    lo, hi = torch.aminmax(t)
    finite = bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
    return finite, finite and not (bool(lo) or bool(hi))


def _check_update(update: Mapping[str, torch.Tensor]) -> set[str]:
    """Check every tensor of ``update``; return the names of the all-zero ones (unchanged tensors)."""
    if not update:
        raise UpdateError("update is empty: pass a mapping of tensor names to tensors")
    zero: set[str] = set()
    for name, t in update.items():
        if not isinstance(t, torch.Tensor):
            raise UpdateError(f"update[{name!r}] is a {type(t).__name__}, expected a torch.Tensor")
        if t.dtype not in TORCH_NAMES:
            raise UpdateError(f"update[{name!r}] has dtype {t.dtype}; floating tensors only ({list(TORCH_NAMES)})")
        finite, all_zero = _finite_and_zero(t.detach())
        if not finite:
            raise UpdateError(f"update[{name!r}] has NaN or Inf values (did local training diverge?)")
        if all_zero:
            zero.add(name)
    return zero


def _importance_for(
    name: str, shape: tuple[int, ...], importance: Mapping[str, torch.Tensor] | None, mat: torch.Tensor
) -> torch.Tensor | None:
    if importance is None or name not in importance:
        return None
    z = importance[name]
    if tuple(z.shape) != shape:
        raise UpdateError(f"importance[{name!r}] has shape {tuple(z.shape)}, the update has {shape}")
    z32 = z.detach().to(mat.device, torch.float32).reshape(mat.shape)
    if z32.numel():  # same test as ``not isfinite(z).all() or (z < 0).any()``, in one reduction
        lo, hi = torch.aminmax(z32)
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))) or bool(lo < 0):
            raise UpdateError(f"importance[{name!r}] must be finite and non-negative")
    return z32


def compress(
    update: Mapping[str, torch.Tensor],
    method: str | None = None,
    rank: int | None = None,
    importance: Mapping[str, torch.Tensor] | None = None,
    *,
    config: CompressionConfig | None = None,
    feedback: ErrorFeedback | None = None,
    state: CompressorState | None = None,
    **options: Any,
) -> bytes:
    """Compress a model update into the bytes that travel.

    Parameters
    ----------
    update
        ``{name: dW}``, a state-dict-like mapping of floating tensors (any
        device; computed in float32).
    method, rank
        Shortcuts for ``config.method`` (default ``"osd"``) and ``config.rank``
        (default 1).
    importance
        ``{name: Z}`` non-negative maps of the same shapes (from
        :func:`osd_fl.importance.compute_importance`); ``None`` or a missing
        name means Z = ones.
    config
        Base :class:`~osd_fl.config.CompressionConfig`; ``options`` override
        its fields (e.g. ``relax=3, value_dtype="float16"``).
    feedback
        If given, ``dW + e`` is compressed and the residual ``e`` is updated
        in place to what the receiver did not get.
    state
        Cross-round compressor state (PowerSGD warm starts), updated in place.
    **options
        Any :class:`~osd_fl.config.CompressionConfig` field.

    Returns
    -------
    bytes
        The payload; ``len(blob)`` is its exact cost and, for budgeted methods
        (all but dense, fp16, int8) or with ``budget_bytes``, never exceeds
        :func:`payload_budget`.

    """
    cfg = resolve_config(config, method, rank, **options)
    zero = _check_update(update)
    comp = get_compressor(cfg)
    state = state if state is not None else CompressorState()
    tensors = (
        feedback.corrected(update)
        if feedback is not None
        else {k: v.detach().to(torch.float32) for k, v in update.items()}
    )
    shapes = {k: tuple(int(s) for s in v.shape) for k, v in tensors.items()}
    routes = plan_routes(shapes, cfg, all_dense=comp.all_dense)
    # without feedback the tensors are the update's (in float32, which keeps zero exactly zero)
    records, items = _route_tensors(update, tensors, shapes, routes, importance, zero if feedback is None else None)
    fixed, matrices = _fixed_and_matrix_bytes(shapes, cfg, routes)
    limit = cfg.budget_bytes or fixed + matrices
    records.update(_encode_matrices(comp, items, limit, fixed, state))
    payload = Payload(method=cfg.method, value_dtype=cfg.value_dtype, records=[records[k] for k in tensors])
    blob = encode(payload)
    if (comp.budgeted or cfg.budget_bytes) and len(blob) > limit:
        raise ConfigError(
            f"method {cfg.method!r} needs {len(blob)} bytes, over the budget of {limit}; "
            "raise rank/budget_bytes or pick a budgeted method"
        )
    if feedback is not None:
        _keep_residual(feedback, tensors, payload, blob)
    return blob


def _route_tensors(
    update: Mapping[str, torch.Tensor],
    tensors: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    routes: Mapping[str, Route],
    importance: Mapping[str, torch.Tensor] | None,
    zero: set[str] | None = None,
) -> tuple[dict[str, TensorRecord], list[MatrixItem]]:
    """Records of the skipped, unchanged and dense tensors, and the matrices left to compress.

    A tensor whose (corrected) update is exactly zero, such as a frozen
    layer's, travels as a ZERO record whatever its route: it costs its name
    and shape, not its values. ``zero``: the names already known to be all
    zero (``None``: test every tensor here).
    """
    records: dict[str, TensorRecord] = {}
    items: list[MatrixItem] = []
    for name, t in tensors.items():
        dtype = TORCH_NAMES[update[name].dtype]
        unchanged = name in zero if zero is not None else not bool(t.any())
        if routes[name] == Route.SKIP or unchanged:
            # skipped by policy, or unchanged (a frozen layer): a ZERO record, a few bytes
            records[name] = TensorRecord(name=name, shape=shapes[name], dtype=dtype, kind=Kind.ZERO)
        elif routes[name] == Route.DENSE:
            records[name] = dense_record(name, t, dtype)
        else:
            n, d = matrix_dims(shapes[name])
            mat = t.reshape(n, d)
            items.append(
                MatrixItem(name, shapes[name], dtype, mat, _importance_for(name, shapes[name], importance, mat))
            )
    return records, items


def _encode_matrices(
    comp: Compressor, items: list[MatrixItem], limit: int, fixed: int, state: CompressorState
) -> dict[str, TensorRecord]:
    """The compressed matrices' records: one shared budget (``budget="global"``) or each its own."""
    cfg = comp.config
    if cfg.budget == "global" and comp.supports_global and items:
        if limit - fixed <= 0:
            raise ConfigError(f"budget_bytes={limit} is below the payload's fixed part of {fixed} bytes")
        return {rec.name: rec for rec in comp.encode_global(items, limit - fixed, state)}
    budgets = [sizes.matrix_budget(item.n, item.d, cfg.rank, cfg.budget_value_dtype) for item in items]
    return {rec.name: rec for rec in comp.encode_matrices(items, budgets, state)}


def _keep_residual(feedback: ErrorFeedback, tensors: Mapping[str, torch.Tensor], payload: Payload, blob: bytes) -> None:
    """Error feedback: keep what the receiver did not get (nothing for a tensor skipped by policy)."""
    feedback.update(tensors, decompress(blob))
    for rec in payload.records:
        if rec.kind == Kind.ZERO:  # skipped by policy: nothing to carry over
            feedback.residuals[rec.name] = torch.zeros_like(feedback.residuals[rec.name])


def decompress(
    blob: bytes | bytearray | memoryview,
    *,
    expected: Mapping[str, TensorSpec] | None = None,
    max_bytes: int | None = None,
    device: torch.device | str | None = None,
    max_elements: int = MAX_ELEMENTS,
) -> dict[str, torch.Tensor]:
    """Validate and rebuild an update from a payload.

    Parameters
    ----------
    blob
        Bytes from :func:`compress` (or from the wire).
    expected
        ``{name: (shape, dtype)}`` of the model; when given, the payload must
        match it exactly (checked before anything is allocated).
    max_bytes
        Reject larger payloads without parsing them.
    device
        Where to build the tensors (default CPU).
    max_elements
        Without ``expected``: the most elements all tensors together may
        claim (default 2**26), which bounds what is allocated.

    Raises
    ------
    osd_fl.errors.PayloadError
        Anything malformed, inconsistent or hostile; the message names the field.

    """
    payload = decode(blob, expected=expected, max_bytes=max_bytes, max_elements=max_elements)
    return dict(iter_tensors(payload, device))


def describe(blob: bytes | bytearray | memoryview) -> dict[str, Any]:
    """A summary of a payload: method, bytes, and per tensor its kind, rank and kept values."""
    payload = decode(blob)
    return {
        "method": payload.method,
        "value_dtype": payload.value_dtype,
        "bytes": len(blob),
        "tensors": {
            r.name: {"kind": r.kind.name.lower(), "shape": r.shape, "rank": r.rank, "kept": r.kept}
            for r in payload.records
        },
    }
