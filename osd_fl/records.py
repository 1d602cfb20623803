"""Flower records of osd-fl: shared key names and conversions.

This is the one module of :mod:`osd_fl` that imports Flower. The client mod
(:mod:`clients`) and the server strategy (:mod:`strategies`) both take their
record keys and metric names from here, so the two sides cannot drift apart.

What travels where
------------------
Server -> client (train instruction)
    The global model as Flower's usual ``ArrayRecord`` (dense, one ``Array``
    per tensor) and a ``ConfigRecord`` that holds every
    :class:`~osd_fl.config.CompressionConfig` field under the prefix
    :data:`CONFIG_PREFIX` (``"osd.rank"``, ``"osd.method"``, ...).
Client -> server (train reply)
    One ``ArrayRecord`` under :data:`PAYLOAD_RECORD_KEY` holding exactly one
    ``Array`` (:data:`PAYLOAD_ARRAY_KEY`) whose ``data`` *is* the payload
    bytes (``stype`` :data:`PAYLOAD_STYPE`, no ``.npy`` header), and the usual
    ``MetricRecord`` with ``num-examples`` plus the client's compression time
    and payload size. One flat array keeps Flower's framing to a few hundred
    bytes per reply, whatever the number of tensors.
Train function -> client mod (inside the client only)
    An optional ``ArrayRecord`` of importance maps under
    :data:`IMPORTANCE_RECORD_KEY`; the mod strips it before the reply leaves.
Server -> client, with a compressed downlink (``OSDStrategy(downlink=...)``)
    A ``ConfigRecord`` under :data:`DOWNLINK_RECORD_KEY` (the public model's
    ``version`` and ``digest``, the ``base`` version a chain applies to, and
    each step's digest) and either the public model as the usual dense
    ``ArrayRecord`` or, under :data:`BROADCAST_RECORD_KEY`, one payload
    ``Array`` per broadcast of the chain (see :mod:`osd_fl.downlink`). A
    client that cannot apply the chain replies with an error whose reason
    starts with :data:`RESYNC_REASON`; the server sends it the dense model next.
``context.state`` (per client, across rounds)
    The error-feedback residual under :data:`STATE_RESIDUAL_KEY`, the
    compressor's warm starts under :data:`STATE_COMPRESSOR_KEY` and, with a
    compressed downlink, the replica of the public model under
    :data:`STATE_REPLICA_KEY` (its version and digest in :data:`STATE_REPLICA_META_KEY`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from osd_fl.config import CompressionConfig
from osd_fl.downlink import Broadcast
from osd_fl.errors import ConfigError, PayloadError
from osd_fl.settings import option_name

__all__ = [
    "BROADCAST_RECORD_KEY",
    "CONFIG_PREFIX",
    "DOWNLINK_RECORD_KEY",
    "IMPORTANCE_RECORD_KEY",
    "METRIC_ACCEPTED",
    "METRIC_BYTES_DOWN",
    "METRIC_BYTES_UP",
    "METRIC_COMPRESS_SECONDS",
    "METRIC_DENSE_BYTES",
    "METRIC_FAILED",
    "METRIC_MESSAGES_DOWN",
    "METRIC_MESSAGES_UP",
    "METRIC_METRICS_DROPPED",
    "METRIC_NORM_MEDIAN",
    "METRIC_NORM_THRESHOLD",
    "METRIC_NO_REPLY",
    "METRIC_PAYLOAD_BYTES",
    "METRIC_PAYLOAD_BYTES_DOWN",
    "METRIC_PAYLOAD_BYTES_UP",
    "METRIC_REJECTED",
    "METRIC_REJECTED_NORM",
    "METRIC_REJECTED_RANGE",
    "METRIC_RESIDUAL_IN",
    "METRIC_RESIDUAL_OUT",
    "METRIC_ROUND_KEPT_OUT",
    "PAYLOAD_ARRAY_KEY",
    "PAYLOAD_RECORD_KEY",
    "PAYLOAD_STYPE",
    "RESYNC_REASON",
    "STATE_CLIENT_KEY",
    "STATE_COMPRESSOR_KEY",
    "STATE_REPLICA_KEY",
    "STATE_REPLICA_META_KEY",
    "STATE_RESIDUAL_KEY",
    "WEIGHT_KEY",
    "DownlinkInfo",
    "array_to_tensor",
    "config_from_record",
    "config_to_record",
    "downlink_records",
    "has_config",
    "numpy_to_record",
    "payload_to_record",
    "read_downlink",
    "record_specs",
    "record_to_numpy",
    "record_to_payload",
    "record_to_tensors",
    "tensors_to_record",
    "unknown_config_keys",
]

log = logging.getLogger(__name__)

# --- keys in messages ---------------------------------------------------------

CONFIG_PREFIX: Final = "osd."
"""Prefix of every compression setting in the train ``ConfigRecord``."""

PAYLOAD_RECORD_KEY: Final = "osd.payload"
"""RecordDict key of the reply's payload ``ArrayRecord``."""

PAYLOAD_ARRAY_KEY: Final = "payload"
"""Name of the single ``Array`` inside the payload record."""

PAYLOAD_STYPE: Final = "osd-fl.payload"
"""``Array.stype`` of the payload: ``data`` is the raw payload, no header."""

IMPORTANCE_RECORD_KEY: Final = "osd.importance"
"""RecordDict key under which a train function hands importance maps to the mod."""

STATE_RESIDUAL_KEY: Final = "osd.residual"
"""``context.state`` key of the error-feedback residual (``ArrayRecord``)."""

STATE_COMPRESSOR_KEY: Final = "osd.compressor-state"
"""``context.state`` key of the compressor's warm starts (``ArrayRecord``)."""

BROADCAST_RECORD_KEY: Final = "osd.broadcast"
"""RecordDict key of a catch-up chain: one payload ``Array`` per broadcast, named by its version."""

DOWNLINK_RECORD_KEY: Final = "osd.downlink"
"""RecordDict key of the downlink's ``ConfigRecord`` (version, digest, base, step digests)."""

RESYNC_REASON: Final = "osd_mod: resync:"
"""Start of the error reason with which a client asks for the dense public model."""

STATE_REPLICA_KEY: Final = "osd.replica"
"""``context.state`` key of the client's replica of the public model (``ArrayRecord``)."""

STATE_REPLICA_META_KEY: Final = "osd.replica-meta"
"""``context.state`` key of the replica's ``version`` and ``digest`` (``ConfigRecord``)."""

STATE_CLIENT_KEY: Final = "osd.client"
"""``context.state`` key of the mod's own flags (``ConfigRecord``)."""

WEIGHT_KEY: Final = "num-examples"
"""Metric that weights a client's update (Flower's convention)."""

# --- metrics a client adds to its train reply ------------------------------------

METRIC_COMPRESS_SECONDS: Final = "osd-compress-s"
"""Seconds the client spent in ``compress`` (measured on the client)."""

METRIC_PAYLOAD_BYTES: Final = "osd-payload-bytes"
"""``len(payload)`` as the client produced it."""

METRIC_DENSE_BYTES: Final = "osd-dense-bytes"
"""Bytes the same update would take as dense float32 arrays."""

METRIC_RESIDUAL_IN: Final = "osd-residual-in-norm"
"""Error feedback only: norm of the residual carried into this round (0 = none kept)."""

METRIC_RESIDUAL_OUT: Final = "osd-residual-norm"
"""Error feedback only: norm of the residual kept for the next round."""

# --- metrics the server strategy adds per round ----------------------------------

METRIC_ACCEPTED: Final = "accepted"
"""Replies that passed validation and were aggregated."""

METRIC_REJECTED: Final = "rejected"
"""Replies with content that failed validation (excluded, reason logged)."""

METRIC_FAILED: Final = "failed"
"""Sampled nodes whose reply carried a Flower ``Error`` instead of content, or never came."""

METRIC_NO_REPLY: Final = "no-reply"
"""Of ``failed``: sampled nodes that sent nothing before the timeout."""

METRIC_REJECTED_NORM: Final = "rejected-norm"
"""Of ``rejected``: updates outside the norm bound (only when a bound is set)."""

METRIC_NORM_MEDIAN: Final = "update-norm-median"
"""With a relative norm bound: median update norm of the round's valid replies."""

METRIC_NORM_THRESHOLD: Final = "norm-threshold"
"""With a relative norm bound: the round's threshold (factor x median)."""

METRIC_REJECTED_RANGE: Final = "rejected-range"
"""Of ``rejected``: replies whose update would take the model (or the inner strategy's step)
out of the dtype's safe range (:func:`osd_fl.checks.value_limit`); found and left out."""

METRIC_ROUND_KEPT_OUT: Final = "round-kept-out"
"""1 when the round's replies were valid but no new model could be formed within the safe range."""

METRIC_METRICS_DROPPED: Final = "metrics-dropped"
"""Client metric entries dropped this phase (not a finite number, a reserved or an over-long name)."""

METRIC_BYTES_DOWN: Final = "bytes-down"
"""Serialized bytes of every message the server sent in the phase."""

METRIC_BYTES_UP: Final = "bytes-up"
"""Serialized bytes of every reply the server received in the phase."""

METRIC_PAYLOAD_BYTES_DOWN: Final = "payload-bytes-down"
"""Array bytes (``Array.data``) inside the messages sent."""

METRIC_PAYLOAD_BYTES_UP: Final = "payload-bytes-up"
"""Array bytes (``Array.data``) inside the replies received."""

METRIC_MESSAGES_DOWN: Final = "messages-down"
"""Number of messages sent in the phase."""

METRIC_MESSAGES_UP: Final = "messages-up"
"""Number of replies received in the phase."""


# --- payload <-> ArrayRecord ------------------------------------------------------


def payload_to_record(blob: bytes) -> ArrayRecord:
    """Wrap payload bytes in a one-array ``ArrayRecord`` without copying them twice.

    Parameters
    ----------
    blob
        The output of :func:`osd_fl.compress`.

    Returns
    -------
    ArrayRecord
        ``{PAYLOAD_ARRAY_KEY: Array(dtype="uint8", shape=(len(blob),), stype=PAYLOAD_STYPE)}``.
    """
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes, got {type(blob).__name__}")
    data = bytes(blob)
    array = Array(dtype="uint8", shape=(len(data),), stype=PAYLOAD_STYPE, data=data)
    return ArrayRecord({PAYLOAD_ARRAY_KEY: array})


def record_to_payload(record: Any, *, max_bytes: int | None = None) -> bytes:
    """Extract payload bytes from a reply's record, checking its framing.

    Parameters
    ----------
    record
        What the reply holds under :data:`PAYLOAD_RECORD_KEY` (anything: it
        comes from the wire).
    max_bytes
        Reject a payload longer than this, before anything is decoded.

    Returns
    -------
    bytes
        The payload, ready for :func:`osd_fl.decompress`.

    Raises
    ------
    PayloadError
        Naming the field that is wrong (record type, array name, dtype,
        shape, stype, declared versus actual length, size limit).
    """
    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"record {PAYLOAD_RECORD_KEY!r}: expected an ArrayRecord, got {type(record).__name__}")
    keys = list(record.keys())
    if keys != [PAYLOAD_ARRAY_KEY]:
        raise PayloadError(
            f"record {PAYLOAD_RECORD_KEY!r}: expected exactly one array {PAYLOAD_ARRAY_KEY!r}, got {keys}"
        )
    array = record[PAYLOAD_ARRAY_KEY]
    if array.stype != PAYLOAD_STYPE:
        raise PayloadError(f"array {PAYLOAD_ARRAY_KEY!r}: stype {array.stype!r}, expected {PAYLOAD_STYPE!r}")
    if array.dtype != "uint8":
        raise PayloadError(f"array {PAYLOAD_ARRAY_KEY!r}: dtype {array.dtype!r}, expected 'uint8'")
    shape = tuple(array.shape)
    data = array.data
    if not isinstance(data, bytes):
        raise PayloadError(f"array {PAYLOAD_ARRAY_KEY!r}: data is {type(data).__name__}, expected bytes")
    if len(shape) != 1 or shape[0] != len(data):
        raise PayloadError(
            f"array {PAYLOAD_ARRAY_KEY!r}: shape {shape} does not match the {len(data)} bytes it carries"
        )
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadError(f"array {PAYLOAD_ARRAY_KEY!r}: {len(data)} bytes exceed the limit of {max_bytes} bytes")
    return data


# --- CompressionConfig <-> ConfigRecord ---------------------------------------------


def config_to_record(config: CompressionConfig, *, prefix: str = CONFIG_PREFIX) -> ConfigRecord:
    """Every field of ``config`` as ``{prefix + field: value}``.

    Parameters
    ----------
    config
        The settings to send.
    prefix
        Key prefix; the client reads the same prefix.

    Returns
    -------
    ConfigRecord
        Values are str, int or bool, as Flower's ``ConfigRecord`` requires.
    """
    return ConfigRecord({f"{prefix}{name}": value for name, value in config.to_dict().items()})


def has_config(values: Mapping[str, Any], *, prefix: str = CONFIG_PREFIX) -> bool:
    """Whether any key of ``values`` carries the compression prefix."""
    return any(isinstance(k, str) and k.startswith(prefix) for k in values)


def unknown_config_keys(values: Mapping[str, Any], *, prefix: str = CONFIG_PREFIX) -> list[str]:
    """Keys with ``prefix`` that name no :class:`CompressionConfig` field."""
    known = set(CompressionConfig.help())
    return sorted(key for key in values if isinstance(key, str) and option_name(key, prefix) not in (None, *known))


def config_from_record(
    values: Mapping[str, Any],
    *,
    defaults: CompressionConfig | None = None,
    prefix: str = CONFIG_PREFIX,
    strict: bool = False,
) -> CompressionConfig:
    """Read the compression settings a server sent, over client-side defaults.

    Parameters
    ----------
    values
        A ``ConfigRecord`` (or any mapping); only keys starting with
        ``prefix`` are read, other keys (``lr``, ``server-round``) are ignored.
    defaults
        Settings for the fields the server did not send.
    prefix
        Key prefix.
    strict
        If True, an unknown ``prefix`` key raises :class:`ConfigError`; if
        False (the client's choice, so an older client can serve a newer
        server) it is ignored with a warning.

    Returns
    -------
    CompressionConfig
        ``defaults`` with the sent fields replaced (values coerced and validated).

    Raises
    ------
    ConfigError
        A sent value is invalid (or, with ``strict``, a key is unknown).
    """
    unknown = unknown_config_keys(values, prefix=prefix)
    if unknown:
        if strict:
            raise ConfigError(f"unknown compression settings {unknown}; known: {sorted(CompressionConfig.help())}")
        log.warning("ignoring unknown compression settings %s", unknown)
    sent = {
        name: v
        for k, v in values.items()
        if isinstance(k, str) and k not in unknown and (name := option_name(k, prefix)) is not None
    }
    base = defaults if defaults is not None else CompressionConfig()
    if not sent:
        return base
    merged = base.to_dict()
    merged.update(sent)
    return CompressionConfig.from_mapping(merged)


# --- tensors / arrays <-> ArrayRecord -----------------------------------------------


def _torch_dtype(numpy_dtype: str) -> torch.dtype:
    try:
        return torch.from_numpy(np.empty(0, dtype=np.dtype(numpy_dtype))).dtype
    except (TypeError, ValueError) as exc:
        raise ValueError(f"dtype {numpy_dtype!r} has no torch equivalent") from exc


def record_specs(record: ArrayRecord) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and torch dtypes of a record's arrays, read from metadata only.

    Parameters
    ----------
    record
        A Flower ``ArrayRecord`` (e.g. the global model the server broadcast).

    Returns
    -------
    dict
        ``{name: (shape, dtype)}``, the ``expected`` argument of
        :func:`osd_fl.decompress`. No array data is decoded.
    """
    return {name: (tuple(int(s) for s in arr.shape), _torch_dtype(arr.dtype)) for name, arr in record.items()}


def numpy_to_record(arrays: Mapping[str, npt.NDArray[Any]]) -> ArrayRecord:
    """``{name: ndarray}`` as an ``ArrayRecord`` (order kept)."""
    return ArrayRecord({name: Array(np.asarray(arr)) for name, arr in arrays.items()})


def record_to_numpy(record: ArrayRecord) -> dict[str, npt.NDArray[Any]]:
    """Inverse of :func:`numpy_to_record` (arrays must have Flower's numpy stype)."""
    return {name: arr.numpy() for name, arr in record.items()}


def tensors_to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A torch state dict as an ``ArrayRecord`` (detached CPU copies).

    Unlike ``ArrayRecord.from_torch_state_dict`` this works in any process
    (it imports torch itself), and bfloat16 tensors, which Flower's ``Array``
    cannot hold, are sent as float32.
    """
    out: dict[str, npt.NDArray[Any]] = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.to(torch.float32)
        out[name] = t.numpy()
    return numpy_to_record(out)


def array_to_tensor(array: Array) -> torch.Tensor:
    """One Flower ``Array`` as a writable tensor of its own.

    ``Array.numpy()`` already deserializes into a new array, so this copies
    only where numpy handed back a read-only one.
    """
    arr = array.numpy()
    return torch.from_numpy(arr if arr.flags.writeable else np.array(arr, copy=True))


def record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ``ArrayRecord`` as ``{name: torch.Tensor}`` (writable copies, one tensor deserialized at a time)."""
    return {name: array_to_tensor(array) for name, array in record.items()}


# --- compressed downlink ------------------------------------------------------------


@dataclass(frozen=True)
class DownlinkInfo:
    """What a downlink message says: the public model's version and digest, and the chain (None = dense)."""

    version: int
    digest: str
    base: int
    chain: list[Broadcast] | None


def downlink_records(
    version: int, digest: str, chain: list[Broadcast] | None
) -> tuple[ConfigRecord, ArrayRecord | None]:
    """The records of one downlink message: its ``ConfigRecord`` and, for a chain, the broadcasts' record."""
    base = chain[0].version - 1 if chain else (version if chain is not None else -1)
    meta = ConfigRecord(
        {
            "version": int(version),
            "digest": digest,
            "base": int(base),
            "digests": [b.digest for b in chain] if chain else [],
        }
    )
    if chain is None:
        return meta, None
    arrays = {
        str(b.version): Array(dtype="uint8", shape=(len(b.blob),), stype=PAYLOAD_STYPE, data=bytes(b.blob))
        for b in chain
    }
    return meta, ArrayRecord(arrays)


def read_downlink(content: Any, *, max_bytes: int | None = None) -> DownlinkInfo | None:
    """The downlink part of a message's content, checked; None when the message has none.

    Raises
    ------
    PayloadError
        Naming what is malformed: a missing or mistyped field, versions that
        do not follow each other, a payload array with the wrong framing.
    """
    if DOWNLINK_RECORD_KEY not in content:
        return None
    meta = content[DOWNLINK_RECORD_KEY]
    if not isinstance(meta, ConfigRecord):
        raise PayloadError(f"record {DOWNLINK_RECORD_KEY!r}: expected a ConfigRecord, got {type(meta).__name__}")
    fields = {"version": int, "digest": str, "base": int, "digests": list}
    for name, kind in fields.items():
        if not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool):
            raise PayloadError(f"record {DOWNLINK_RECORD_KEY!r}: field {name!r} missing or not {kind.__name__}")
    version, digest, base = int(meta["version"]), str(meta["digest"]), int(meta["base"])  # type: ignore[arg-type]
    digests = list(meta["digests"])  # type: ignore[arg-type]
    if BROADCAST_RECORD_KEY not in content:
        if base != -1 or digests:
            raise PayloadError(f"record {DOWNLINK_RECORD_KEY!r}: a chain from version {base} but no broadcasts")
        return DownlinkInfo(version, digest, base, None)
    record = content[BROADCAST_RECORD_KEY]
    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"record {BROADCAST_RECORD_KEY!r}: expected an ArrayRecord, got {type(record).__name__}")
    names = list(record.keys())
    expected = [str(v) for v in range(base + 1, version + 1)]
    if base < 0 or names != expected or len(digests) != len(names):
        raise PayloadError(
            f"record {BROADCAST_RECORD_KEY!r}: broadcasts {names} with {len(digests)} digests do not lead "
            f"from version {base} to {version}"
        )
    chain = []
    for name, step_digest in zip(names, digests, strict=True):
        blob = record_to_payload(ArrayRecord({PAYLOAD_ARRAY_KEY: record[name]}), max_bytes=max_bytes)
        chain.append(Broadcast(int(name), blob, str(step_digest)))
    if chain and chain[-1].digest != digest:
        raise PayloadError(f"record {DOWNLINK_RECORD_KEY!r}: the last step's digest is not the model's")
    return DownlinkInfo(version, digest, base, chain)
