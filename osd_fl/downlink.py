"""Compressed broadcasts: a public model that moves only by decoded deltas.

The server keeps two models (``../shared/DOWNLINK.md``; EF21-P and
DoubleSqueeze keep the same memory): its own model ``x``, where aggregation
acts, and the **public model** ``w``, which every client can rebuild exactly
because it moves only by decoded broadcasts::

    w_{t+1} = w_t + D(C(x_{t+1} - w_t))

``x - w`` is the server-side error feedback: what one broadcast did not carry
stays in it and goes out in later rounds. :class:`BroadcastServer` holds
``w``, its version and a byte-capped history of recent broadcasts, so that a
client that skipped rounds gets the chain it missed (:meth:`~BroadcastServer.catch_up`),
or the dense model when that is cheaper or the chain is gone.

Agreement is exact, bit for bit, on any machine: both sides apply a broadcast
with :func:`apply_broadcast`, which decodes with the ordered low-rank product
(:func:`osd_fl.codec.reconstruct` with ``exact=True``) and adds in float32,
elementwise, in the tensors' order. Every broadcast carries
:func:`model_digest` of the model it produces; a replica that does not
match refuses it (:class:`ReplicaMismatch`) and is left as it was.

>>> import torch
>>> from osd_fl import CompressionConfig
>>> w0 = {"fc.weight": torch.zeros(32, 16), "fc.bias": torch.zeros(32)}
>>> server = BroadcastServer(w0, CompressionConfig(method="osd", rank=2))
>>> x1 = {"fc.weight": torch.randn(32, 16), "fc.bias": torch.randn(32)}
>>> b = server.publish(x1)
>>> replica = {k: v.clone() for k, v in w0.items()}
>>> apply_broadcast(replica, b)
>>> model_digest(replica) == server.digest
True
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from osd_fl.api import compress
from osd_fl.codec import decode, iter_tensors
from osd_fl.config import CompressionConfig
from osd_fl.errors import PayloadError

__all__ = [
    "Broadcast",
    "BroadcastServer",
    "ReplicaMismatch",
    "apply_broadcast",
    "apply_chain",
    "model_bytes",
    "model_digest",
]


class ReplicaMismatch(PayloadError):
    """A replica does not match the model a broadcast was made for: resync it densely."""


def model_digest(model: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of every tensor's name, dtype, shape and float bits, in the mapping's order."""
    h = hashlib.sha256()
    for name, t in model.items():
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_bytes(model: Mapping[str, torch.Tensor]) -> int:
    """Bytes of every tensor's values, as a dense copy sends them."""
    return sum(t.numel() * t.element_size() for t in model.values())


@dataclass(frozen=True)
class Broadcast:
    """One step of the public model: ``w_version = w_{version-1} + decode(blob) (+ exact)``.

    Attributes
    ----------
    version
        The public model's version after applying this broadcast.
    blob
        :func:`osd_fl.compress` payload of the floating tensors' change (float32).
    digest
        :func:`model_digest` of the model this broadcast produces.
    exact
        Non-floating tensors that changed (integer buffers), sent whole.
    """

    version: int
    blob: bytes
    digest: str
    exact: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes this broadcast costs on the wire (payload, digest and whole tensors)."""
        return len(self.blob) + len(self.digest) + model_bytes(self.exact)


def _floating(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def _stepped(model: Mapping[str, torch.Tensor], broadcast: Broadcast) -> dict[str, torch.Tensor]:
    """The model after ``broadcast``, as new tensors (``model`` is not touched)."""
    floating = {k: v for k, v in model.items() if _floating(v)}
    expected = {k: (tuple(v.shape), "float32") for k, v in floating.items()}
    payload = decode(broadcast.blob, expected=expected)
    out = dict(model)
    for name, delta in iter_tensors(payload, exact=True):
        base = model[name]
        out[name] = (base.detach().to("cpu", torch.float32) + delta).to(base.dtype)
    for name, whole in broadcast.exact.items():
        if name not in model or _floating(model[name]):
            raise PayloadError(f"broadcast {broadcast.version}: {name!r} is not a non-floating tensor of the model")
        if whole.shape != model[name].shape or whole.dtype != model[name].dtype:
            raise PayloadError(
                f"broadcast {broadcast.version}: {name!r} is {whole.dtype} {tuple(whole.shape)}, "
                f"the model's is {model[name].dtype} {tuple(model[name].shape)}"
            )
        out[name] = whole.clone()
    return out


def apply_chain(model: dict[str, torch.Tensor], chain: Sequence[Broadcast]) -> None:
    """Apply ``chain`` in order to ``model`` in place, all or nothing.

    Raises
    ------
    ReplicaMismatch
        If the result of any step does not have that step's digest; ``model``
        is then unchanged (the caller asks for a dense resync).
    PayloadError
        If a broadcast is malformed or does not fit the model; ``model`` is unchanged.
    """
    current: dict[str, torch.Tensor] = dict(model)
    for broadcast in chain:
        current = _stepped(current, broadcast)
        got = model_digest(current)
        if got != broadcast.digest:
            raise ReplicaMismatch(
                f"after broadcast {broadcast.version} the replica's digest is {got[:12]}..., the server's "
                f"{broadcast.digest[:12]}...: the replica was not the model this broadcast was made for"
            )
    model.update(current)


def apply_broadcast(model: dict[str, torch.Tensor], broadcast: Broadcast) -> None:
    """Apply one broadcast in place (see :func:`apply_chain`)."""
    apply_chain(model, [broadcast])


class BroadcastServer:
    """The server's public model, its version and a byte-capped history of broadcasts.

    Parameters
    ----------
    initial
        The initial global model ``w_0`` (copied; CPU).
    config
        How each broadcast is compressed (any registered method; its own rank,
        independent of the uplink's). ``value_dtype="auto"`` means float32 here:
        the broadcasts were measured with float32 values, int8 only on the uplink.
    history_bytes
        Most bytes of recent broadcasts kept for catch-up chains (0 = as many as
        one dense model costs: a longer chain is never cheaper than the model).

    Notes
    -----
    Memory: the public model, plus at most ``history_bytes`` of broadcasts;
    the caller holds its own model ``x`` beside it. Per round the cost is one
    compression of ``x - w`` and one exact decode.
    """

    def __init__(
        self, initial: Mapping[str, torch.Tensor], config: CompressionConfig, *, history_bytes: int = 0
    ) -> None:
        self.public: dict[str, torch.Tensor] = {k: v.detach().to("cpu").clone() for k, v in initial.items()}
        self.config = config if config.value_dtype != "auto" else config.replace(value_dtype="float32")
        self.version = 0
        self.digest = model_digest(self.public)
        self.dense_bytes = model_bytes(self.public)
        self.history_bytes = history_bytes or self.dense_bytes
        self.history: deque[Broadcast] = deque()

    def residual(self, model: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``x - w`` for the floating tensors: what the clients have not received yet (float32)."""
        return {
            k: v.detach().to("cpu", torch.float32) - self.public[k].to(torch.float32)
            for k, v in model.items()
            if _floating(v)
        }

    def publish(self, model: Mapping[str, torch.Tensor]) -> Broadcast:
        """Compress ``model - public`` into the next broadcast and move the public model by it.

        Parameters
        ----------
        model
            The server's model ``x`` (same names, shapes and dtypes as the public one).

        Returns
        -------
        Broadcast
            What a client holding the previous version applies to reach this one.
        """
        if list(model) != list(self.public):
            raise ValueError("the model's tensors are not the public model's (names and order must match)")
        delta = self.residual(model)
        blob = compress(delta, config=self.config)
        exact = {
            k: v.detach().to("cpu").clone()
            for k, v in model.items()
            if not _floating(v) and not torch.equal(v.to("cpu"), self.public[k])
        }
        stepped = _stepped(self.public, Broadcast(self.version + 1, blob, "", exact))
        broadcast = Broadcast(self.version + 1, blob, model_digest(stepped), exact)
        self.public, self.version, self.digest = stepped, broadcast.version, broadcast.digest
        self.history.append(broadcast)
        while sum(b.nbytes for b in self.history) > self.history_bytes and self.history:
            self.history.popleft()
        return broadcast

    def catch_up(self, held: int | None) -> list[Broadcast] | None:
        """What a client holding version ``held`` needs: the chain it missed, or None for a dense copy.

        None when the client holds nothing (``held`` is None: new, or its state
        was lost), a version this server never published, one older than the
        history reaches, or when the chain costs at least the dense model.
        ``[]`` when it is up to date.
        """
        if held is None or not 0 <= held <= self.version:
            return None
        if held == self.version:
            return []
        chain = [b for b in self.history if b.version > held]
        if not chain or chain[0].version != held + 1:
            return None
        if sum(b.nbytes for b in chain) >= self.dense_bytes:
            return None
        return chain

    @property
    def memory_bytes(self) -> int:
        """Bytes this object holds: the public model and the history."""
        return self.dense_bytes + sum(b.nbytes for b in self.history)
