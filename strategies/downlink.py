"""Server side of the compressed downlink: publish the global model as broadcasts, send each node what it lacks.

:class:`Downlink` is what :class:`~strategies.OSDStrategy` holds when built
with ``downlink=CompressionConfig(...)``. Each time the global model ``x``
goes down (train or evaluate), the public model ``w`` is moved towards it by
one compressed broadcast (:class:`osd_fl.downlink.BroadcastServer`); then
every sampled node gets the chain of broadcasts since the version it holds,
or the dense public model when it holds none (new node, lost state, resync
asked) or the chain is gone from the history or would cost more.

Server-side error feedback: with ``error_feedback=True`` (default) the
strategy aggregates onto its own ``x`` and ``x - w`` is carried into later
broadcasts. With ``False`` the model the round aggregates onto is the public
``w`` itself: what a broadcast left out is dropped (the ablation).

Central evaluation (Flower's ``evaluate_fn``) sees ``x``, the server's
model; clients train and evaluate on ``w``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, Message, RecordDict

from osd_fl import CompressionConfig
from osd_fl.downlink import BroadcastServer
from osd_fl.records import (
    BROADCAST_RECORD_KEY,
    DOWNLINK_RECORD_KEY,
    RESYNC_REASON,
    downlink_records,
    record_to_tensors,
    tensors_to_record,
)

__all__ = ["Downlink", "DownlinkCounts", "is_resync_request"]

log = logging.getLogger("flwr.osd.downlink")


def is_resync_request(reply: Message) -> bool:
    """True for an error reply whose reason is the client mod's request for a dense resync."""
    return reply.has_error() and (reply.error.reason or "").startswith(RESYNC_REASON)


@dataclass
class DownlinkCounts:
    """Per-round counts of what went down (dense copies, chains and their broadcasts) and resyncs asked."""

    by_round: dict[int, dict[str, int]] = field(default_factory=dict)

    def round(self, server_round: int) -> dict[str, int]:
        """The counts of ``server_round`` (created empty)."""
        return self.by_round.setdefault(
            server_round, {"down-dense": 0, "down-chains": 0, "down-broadcasts": 0, "resyncs": 0}
        )

    def _total(self, key: str) -> int:
        return sum(counts[key] for counts in self.by_round.values())

    @property
    def dense(self) -> int:
        """Dense copies sent, all rounds."""
        return self._total("down-dense")

    @property
    def chains(self) -> int:
        """Chains sent, all rounds."""
        return self._total("down-chains")

    @property
    def broadcasts(self) -> int:
        """Broadcasts sent in chains, all rounds."""
        return self._total("down-broadcasts")

    @property
    def resyncs(self) -> int:
        """Resyncs asked, all rounds."""
        return self._total("resyncs")


class Downlink:
    """The public model, what each node holds, and the rewriting of outgoing messages.

    Parameters
    ----------
    config
        How a broadcast is compressed (its own method and rank).
    error_feedback
        Keep ``x - w`` on the server and send it later (default), or aggregate onto ``w``.
    history_bytes
        Bytes of recent broadcasts kept for catch-up chains (0 = one dense model).
    clients_hold_initial
        Nodes already hold the initial model (e.g. the pretrained checkpoint shipped
        with the app): a node the server has never served gets the chain from
        version 0 instead of the dense model. The client mod needs
        ``make_osd_mod(initial_model=...)``; a node whose initial model does not
        match the digest asks for a resync and gets the dense model.
    """

    def __init__(
        self,
        config: CompressionConfig,
        *,
        error_feedback: bool = True,
        history_bytes: int = 0,
        clients_hold_initial: bool = False,
    ) -> None:
        self.config = config
        self.error_feedback = error_feedback
        self.history_bytes = history_bytes
        self.clients_hold_initial = clients_hold_initial
        self._served: set[int] = set()
        self.server: BroadcastServer | None = None
        self.held: dict[int, int] = {}
        self.counts = DownlinkCounts()
        self._source: ArrayRecord | None = None
        self._public_record: ArrayRecord | None = None
        self._sent_version: dict[int, int] = {}

    def prepare(self, arrays: ArrayRecord) -> ArrayRecord:
        """Publish ``arrays`` (the global ``x``) if it changed; return the record the round aggregates onto."""
        if self.server is None:
            self.server = BroadcastServer(record_to_tensors(arrays), self.config, history_bytes=self.history_bytes)
            self._public_record = tensors_to_record(self.server.public)
        elif arrays is not self._source:
            self.server.publish(record_to_tensors(arrays))
            self._public_record = tensors_to_record(self.server.public)
        self._source = arrays
        if self.error_feedback:
            return arrays
        assert self._public_record is not None
        return self._public_record

    def rewrite(self, server_round: int, arrays: ArrayRecord, messages: Iterable[Message]) -> list[Message]:
        """Replace each message's dense model (``arrays``) by what its node needs; remember the version sent."""
        self.prepare(arrays)  # publishes only if ``arrays`` changed since the last call
        assert self.server is not None and self._public_record is not None
        counts = self.counts.round(server_round)
        out = []
        for msg in messages:
            node = int(msg.metadata.dst_node_id)
            held = self.held.get(node)
            if held is None and self.clients_hold_initial and node not in self._served:
                held = 0  # first contact: the node holds w_0 already
            self._served.add(node)
            chain = self.server.catch_up(held)
            if chain is not None and any(b.exact for b in chain):
                chain = None  # integer buffers changed: send them with the dense model
            # Flower's strategies give every message the same RecordDict: give each its own
            names = list(msg.content.array_records)
            content = RecordDict({k: v for k, v in msg.content.items() if k not in names})
            msg.content = content
            meta, broadcasts = downlink_records(self.server.version, self.server.digest, chain)
            content[DOWNLINK_RECORD_KEY] = meta
            if chain is None or broadcasts is None:
                content[names[0] if names else "arrays"] = self._public_record
                counts["down-dense"] += 1
            else:
                content[BROADCAST_RECORD_KEY] = broadcasts
                counts["down-chains"] += 1
                counts["down-broadcasts"] += len(chain)
            self._sent_version[node] = self.server.version
            out.append(msg)
        return out

    def observe(self, server_round: int, sent: Iterable[Message], replies: Iterable[Message]) -> None:
        """Learn what each node of ``sent`` holds now from its reply.

        A node that replied with content holds the version it was sent. One
        that asked for a resync, failed or did not reply holds nothing the
        server can vouch for: it gets the dense model next time.
        """
        sent_to = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in sent}
        for node in sent_to.values():
            self.held.pop(node, None)
        for reply in replies:
            found = sent_to.get(reply.metadata.reply_to_message_id)
            if found is None:
                continue
            node = found
            if reply.has_error():
                if is_resync_request(reply):
                    self.counts.round(server_round)["resyncs"] += 1
                    log.info("round %d: node %d asks for a dense resync (%s)", server_round, node, reply.error.reason)
                continue
            if node in self._sent_version:
                self.held[node] = self._sent_version[node]
