"""An in-process stand-in for Flower's Grid for unit tests of our server loop: it hands each message to a
ClientApp with that node's Context and returns the replies. End-to-end tests use Flower's simulation engine."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto


class LocalGrid:
    def __init__(self, num_nodes: int, app_for: Callable[[int], ClientApp], node_ids: list[int] | None = None) -> None:
        self.node_ids = node_ids or [1000 + 37 * i for i in range(num_nodes)]
        self.pid = {nid: i for i, nid in enumerate(self.node_ids)}
        self.app_for = app_for
        self.contexts = {
            nid: Context(run_id=1, node_id=nid, node_config={"partition-id": i, "num-partitions": num_nodes},
                         state=RecordDict(), run_config={})
            for i, nid in enumerate(self.node_ids)
        }

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for m in messages:
            nid = m.metadata.dst_node_id
            reply = self.app_for(self.pid[nid])(m, self.contexts[nid])
            replies.append(reply)
        return replies


class WireGrid(LocalGrid):
    """LocalGrid whose messages travel through Flower's protobuf serde both ways, with message ids as Flower's
    grids assign them; a ClientApp exception becomes an error reply, as in Flower's simulation worker."""

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            nid = m.metadata.dst_node_id
            inbound = message_from_proto(message_to_proto(m))
            try:
                reply = self.app_for(self.pid[nid])(inbound, self.contexts[nid])
            except Exception as e:  # noqa: BLE001 -- what Flower's simulation worker does
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=inbound)
            replies.append(message_from_proto(message_to_proto(reply)))
        return replies
