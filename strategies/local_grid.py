"""An in-process :class:`~flwr.serverapp.Grid` for fast, deterministic runs and tests.

:class:`LocalGrid` delivers each message to a :class:`~flwr.clientapp.ClientApp`
in the same process, one node after another, with a persistent
``context.state`` per node, the way a SuperNode would. Messages and replies
go through Flower's protobuf serialization both ways, so what a ClientApp
receives and what the strategy gets back are copies, as over the wire.

It is a stand-in for Flower's simulation engine where Ray is too heavy (unit
tests, debugging a strategy step by step); use ``flwr run`` or
``run_simulation`` for real runs. The helpers :func:`train_message` and
:func:`make_context` build messages and contexts by hand, as Flower's own
tests do.
"""

from __future__ import annotations

import time
import traceback
import uuid
from collections.abc import Iterable
from typing import Any

from flwr.app import DEFAULT_TTL, Context, Error, Message, MessageType, Metadata, RecordDict
from flwr.app.message import make_message
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["LocalGrid", "make_context", "train_message"]

SERVER_NODE_ID = SUPERLINK_NODE_ID
"""``src_node_id`` of messages the server sends (Flower's SuperLink id)."""


def _roundtrip(msg: Message) -> Message:
    return message_from_proto(message_to_proto(msg))


def train_message(
    content: RecordDict, dst_node_id: int, *, run_id: int = 1, message_type: str = MessageType.TRAIN
) -> Message:
    """A server-to-client instruction with full metadata (no Flower runtime needed)."""
    return make_message(
        content=content,
        metadata=Metadata(
            run_id=run_id,
            message_id=uuid.uuid4().hex,
            src_node_id=SERVER_NODE_ID,
            dst_node_id=dst_node_id,
            reply_to_message_id="",
            group_id="",
            created_at=time.time(),
            ttl=DEFAULT_TTL,
            message_type=message_type,
        ),
    )


def make_context(node_id: int, *, node_config: dict[str, Any] | None = None, run_id: int = 1) -> Context:
    """A ClientApp ``Context`` with an empty, persistent ``state``."""
    return Context(
        run_id=run_id,
        node_id=node_id,
        node_config=dict(node_config or {}),
        state=RecordDict(),
        run_config={},
    )


class LocalGrid(Grid):
    """Run a ClientApp in-process for ``num_nodes`` nodes.

    Parameters
    ----------
    client_app
        The ClientApp every node runs.
    num_nodes
        Nodes 1001, 1002, ... with ``partition-id`` 0.. and ``num-partitions``.
    run_config
        The ``context.run_config`` every node sees.

    Notes
    -----
    Like Flower's ServerApp runtime, this sets the process-wide
    ``flwr.supercore.task_identity.TaskIdentity`` (run 1, the SuperLink's
    node id), which ``Message(content, dst_node_id, message_type)`` needs.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict[str, Any] | None = None) -> None:
        self.client_app = client_app
        self.contexts: dict[int, Context] = {}
        for i in range(num_nodes):
            node_id = 1001 + i
            ctx = make_context(node_id, node_config={"partition-id": i, "num-partitions": num_nodes})
            ctx.run_config = dict(run_config or {})
            self.contexts[node_id] = ctx
        self._run = Run.create_empty(run_id=1)
        self._pending: dict[str, Message] = {}
        TaskIdentity.run_id = self._run.run_id
        TaskIdentity.node_id = SERVER_NODE_ID
        TaskIdentity.task_id = 1

    def set_run(self, run: Run) -> None:
        """Set the run."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Build a message (prefer ``Message(...)``; kept for the Grid interface)."""
        return train_message(content, dst_node_id, run_id=self._run.run_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        """The node ids."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run the ClientApp for each message now; keep the replies for pulling."""
        ids: list[str] = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            msg.metadata.__dict__["_src_node_id"] = SERVER_NODE_ID
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            node = msg.metadata.dst_node_id
            if node not in self.contexts:
                continue
            delivered = _roundtrip(msg)
            try:
                reply = self.client_app(delivered, self.contexts[node])
            except Exception as exc:  # becomes an error reply, as in Flower
                reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=delivered)
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self._pending[msg.metadata.message_id] = _roundtrip(reply)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies to ``message_ids`` that have not been pulled yet."""
        return [self._pending.pop(i) for i in list(message_ids) if i in self._pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull every reply (all are ready at once)."""
        return list(self.pull_messages(list(self.push_messages(messages))))
