"""Exact byte metering of every message a ServerApp sends and receives.

Flower has no server-side mods, so the meter sits in a proxy around the
:class:`~flwr.serverapp.Grid`: :class:`MeteredGrid` forwards every call to the
real grid and hands each message that goes out (instructions) and each that
comes back (replies) to a :class:`ByteMeter`.

What is counted
---------------
``message_bytes``
    ``flwr.common.serde.message_to_proto(msg).ByteSize()``: the size of the
    message as one protobuf (metadata, content, error), after the grid has
    stamped its message id. This is Flower's own serialization; in a
    deployment the SuperLink ships the same records as content-addressed
    objects in chunks of 5 MiB, and HTTP/gRPC framing comes on top.
``payload_bytes``
    The ``Array.data`` bytes inside the message: the dense global model going
    down, the OSD payload coming up. ``message_bytes - payload_bytes`` is
    Flower's framing (metadata, record keys, array headers, metrics, config).
    This is how FlowerTune's leaderboard counts communication (the array
    bytes of the train instructions and replies), so ``payload-bytes-down``
    / ``payload-bytes-up`` compare with it directly.

Every message is counted once, per server round (set by the strategy with
:meth:`ByteMeter.begin_round`), per phase (the message type: ``train``,
``evaluate``, ``query``), per node and per direction (``down`` = server to
client, ``up`` = client to server).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from flwr.app import Message, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.common.serde_utils import error_to_proto, metadata_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from osd_fl.records import (
    METRIC_BYTES_DOWN,
    METRIC_BYTES_UP,
    METRIC_MESSAGES_DOWN,
    METRIC_MESSAGES_UP,
    METRIC_PAYLOAD_BYTES_DOWN,
    METRIC_PAYLOAD_BYTES_UP,
)

__all__ = ["ByteMeter", "ForwardingGrid", "MessageSize", "MeteredGrid", "TrafficRow", "message_size"]

Direction = Literal["down", "up"]


@dataclass(frozen=True)
class MessageSize:
    """Serialized size of one message and the array bytes inside it."""

    message_bytes: int
    payload_bytes: int


def _content_size(content: RecordDict) -> MessageSize:
    # Bytes that the ``content`` field adds to a ``Message`` proto (tag, length
    # prefix and body): protobuf sizes add up field by field, so the message
    # size is exactly header + this.
    field_bytes = ProtoMessage(content=recorddict_to_proto(content)).ByteSize()
    arrays = sum(len(arr.data) for rec in content.array_records.values() for arr in rec.values())
    return MessageSize(field_bytes, arrays)


def message_size(msg: Message, cache: dict[int, MessageSize] | None = None) -> MessageSize:
    """Exact ``message_to_proto(msg).ByteSize()`` and the array bytes it carries.

    Parameters
    ----------
    msg
        Any Flower message (with content or with an error).
    cache
        Optional ``{id(content): size}`` for one batch of messages: a strategy
        sends the *same* ``RecordDict`` to every sampled node, and serializing
        a large model once instead of once per node saves time. Use a cache
        only while the contents cannot change.

    Returns
    -------
    MessageSize
        ``message_bytes`` equals ``message_to_proto(msg).ByteSize()``.
    """
    header = ProtoMessage(
        metadata=metadata_to_proto(msg.metadata),
        error=error_to_proto(msg.error) if msg.has_error() else None,
    ).ByteSize()
    if not msg.has_content():
        return MessageSize(header, 0)
    content = msg.content
    size = cache.get(id(content)) if cache is not None else None
    if size is None:
        size = _content_size(content)
        if cache is not None:
            cache[id(content)] = size
    return MessageSize(header + size.message_bytes, size.payload_bytes)


@dataclass(frozen=True)
class TrafficRow:
    """Traffic of one node in one round, phase and direction (a CSV row)."""

    round: int
    phase: str
    node_id: int
    direction: str
    messages: int
    message_bytes: int
    payload_bytes: int


class ByteMeter:
    """Counts every message by round, phase, node and direction.

    The strategy calls :meth:`begin_round`; the :class:`MeteredGrid` calls
    :meth:`count`. Read totals with :meth:`totals`, per-node rows with
    :meth:`rows`, and write them with :meth:`to_csv`.
    """

    def __init__(self) -> None:
        self.server_round = 0
        self._table: dict[tuple[int, str, int, str], list[int]] = {}

    def begin_round(self, server_round: int) -> None:
        """Attribute the messages that follow to ``server_round``."""
        self.server_round = int(server_round)

    def count(self, messages: Iterable[Message], direction: Direction) -> int:
        """Count ``messages`` (sent if ``direction == "down"``, received if ``"up"``).

        Returns
        -------
        int
            Total ``message_bytes`` of the messages counted.
        """
        cache: dict[int, MessageSize] = {}
        total = 0
        for msg in messages:
            size = message_size(msg, cache)
            meta = msg.metadata
            node = meta.dst_node_id if direction == "down" else meta.src_node_id
            phase = meta.message_type.split(".", 1)[0] or "unknown"
            cell = self._table.setdefault((self.server_round, phase, int(node), direction), [0, 0, 0])
            cell[0] += 1
            cell[1] += size.message_bytes
            cell[2] += size.payload_bytes
            total += size.message_bytes
        return total

    def rows(self) -> list[TrafficRow]:
        """One row per (round, phase, node, direction), sorted."""
        return [
            TrafficRow(r, phase, node, direction, n, b, p)
            for (r, phase, node, direction), (n, b, p) in sorted(self._table.items())
        ]

    def totals(self, server_round: int | None = None, phase: str | None = None) -> dict[str, int]:
        """Summed traffic, optionally of one round and/or one phase.

        Returns
        -------
        dict
            ``bytes-down``, ``bytes-up``, ``payload-bytes-down``,
            ``payload-bytes-up``, ``messages-down``, ``messages-up``.
        """
        out = dict.fromkeys(
            (
                METRIC_BYTES_DOWN,
                METRIC_BYTES_UP,
                METRIC_PAYLOAD_BYTES_DOWN,
                METRIC_PAYLOAD_BYTES_UP,
                METRIC_MESSAGES_DOWN,
                METRIC_MESSAGES_UP,
            ),
            0,
        )
        for row in self.rows():
            if server_round is not None and row.round != server_round:
                continue
            if phase is not None and row.phase != phase:
                continue
            down = row.direction == "down"
            out[METRIC_BYTES_DOWN if down else METRIC_BYTES_UP] += row.message_bytes
            out[METRIC_PAYLOAD_BYTES_DOWN if down else METRIC_PAYLOAD_BYTES_UP] += row.payload_bytes
            out[METRIC_MESSAGES_DOWN if down else METRIC_MESSAGES_UP] += row.messages
        return out

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`rows` to ``path`` (parent folders are created).

        Returns
        -------
        Path
            The file written.
        """
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=[f.name for f in fields(TrafficRow)])
            writer.writeheader()
            for row in self.rows():
                writer.writerow(asdict(row))
        return out


class ForwardingGrid(Grid):
    """A :class:`~flwr.serverapp.Grid` proxy that forwards everything to the grid it wraps.

    Subclass it to observe a grid: override what you watch (``send_and_receive``,
    ``push_messages``, ``pull_messages``) and call ``super()``. Anything the
    :class:`Grid` interface does not name (``close``, ``state``, ...) also
    comes from the wrapped grid.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    @property
    def wrapped(self) -> Grid:
        """The real grid."""
        return self._grid

    def set_run(self, run: Run) -> None:
        """Forward to the wrapped grid."""
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        """Run information of the wrapped grid."""
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Forward to the wrapped grid (deprecated in Flower; use ``Message``)."""
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Forward to the wrapped grid."""
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        """Forward to the wrapped grid."""
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Forward to the wrapped grid."""
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Forward to the wrapped grid."""
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self,
        messages: Iterable[Message],
        *,
        timeout: float | None = None,
    ) -> Iterable[Message]:
        """Forward to the wrapped grid."""
        return self._grid.send_and_receive(messages, timeout=timeout)

    def __getattr__(self, name: str) -> Any:
        """Anything else (``close``, ``state``, ...) comes from the wrapped grid."""
        if name == "_grid":  # not yet set (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self._grid, name)


class MeteredGrid(ForwardingGrid):
    """A :class:`~flwr.serverapp.Grid` proxy that meters every message.

    Parameters
    ----------
    grid
        The grid Flower handed to the ServerApp.
    meter
        Where counts go.

    Notes
    -----
    ``send_and_receive`` is forwarded to the wrapped grid's own
    ``send_and_receive`` (which keeps its polling behaviour); the messages
    handed to it are counted as sent once it returns, when the grid has
    stamped their message ids, and every reply it returns is counted as
    received. ``push_messages`` / ``pull_messages`` are metered the same way.
    """

    def __init__(self, grid: Grid, meter: ByteMeter) -> None:
        super().__init__(grid)
        self.meter = meter

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push through the wrapped grid and count the messages as sent."""
        batch = list(messages)
        ids = list(self._grid.push_messages(batch))
        self.meter.count(batch, "down")
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull through the wrapped grid and count the replies as received."""
        replies = list(self._grid.pull_messages(message_ids))
        self.meter.count(replies, "up")
        return replies

    def send_and_receive(
        self,
        messages: Iterable[Message],
        *,
        timeout: float | None = None,
    ) -> Iterable[Message]:
        """Forward to the wrapped grid; count what went out and what came back."""
        batch = list(messages)
        replies = list(self._grid.send_and_receive(batch, timeout=timeout))
        self.meter.count(batch, "down")
        self.meter.count(replies, "up")
        return replies
