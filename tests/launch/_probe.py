"""A model-free actor for placement tests of the generic launch machinery (imports only launch.cluster)."""

from __future__ import annotations

from launch.cluster import node_address


class Probe:
    """Reports where its rank was placed."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def where(self) -> dict:
        ip, node_id, pid = node_address()
        return {"rank": self.rank, "ip": ip, "node_id": node_id, "pid": pid}
