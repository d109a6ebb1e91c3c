"""An in-process stand-in for Flower's Grid for unit tests of our server loop: it hands each message to a
ClientApp with that node's Context and returns the replies. End-to-end tests use Flower's simulation engine."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp


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
