"""Reproducible client sampling.

Flower's strategies sample with ``random.sample(grid.get_node_ids(), k)``, and the loop seeds ``random`` per round;
but node ids are random at every launch of a simulation (and of a SuperNode), so the same seed picks other devices
in another launch or after ``--resume``. :class:`PartitionOrderedGrid` asks every node once for the partition id
it holds (a QUERY message; the reply is one integer) and lists node ids in partition order, so a seeded round
samples the same devices in every launch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from shared_model.records import CONFIG, METRICS, PARTITION_ID

log = logging.getLogger(__name__)
UNKNOWN = 1 << 62  # nodes that did not say: after the known ones, by node id


class PartitionOrderedGrid(Grid):
    """A Grid whose ``get_node_ids`` lists nodes by partition id; everything else goes to the wrapped grid."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.partition_of: dict[int, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def learn_partitions(self, timeout: float | None = None) -> dict[int, int]:
        """Ask the nodes not asked yet for their partition id; returns the node -> partition map."""
        ids = [n for n in self._grid.get_node_ids() if n not in self.partition_of]
        if not ids:
            return self.partition_of
        msgs = [Message(RecordDict({CONFIG: ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY)
                for n in ids]
        for reply in self._grid.send_and_receive(msgs, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error() or METRICS not in reply.content.metric_records:
                log.warning("node %s did not report its partition id; it is sampled in node-id order", node)
                continue
            pid = reply.content.metric_records[METRICS].get(PARTITION_ID)
            if isinstance(pid, int):
                self.partition_of[node] = pid
        return self.partition_of

    def get_node_ids(self) -> Iterable[int]:
        ids = list(self._grid.get_node_ids())
        return sorted(ids, key=lambda n: (self.partition_of.get(n, UNKNOWN), n))

    # the rest of Grid's interface: the wrapped grid's, unchanged
    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)
