"""This loader as a node of the fleet: its registration in the registry and the lease it renews.

At start the loader registers its node (id, addresses, labels, devices and budgets) and gets a new
incarnation: the fencing number every placement write carries. It renews the lease every third of
its duration, carrying its budgets. A second process claiming a live id is refused (NodeIdInUse):
in fleet mode it does not start. A lease lost (the registry answers NODE_LEASE_LOST: it lapsed
while this process could not renew, or another process took the id) means this process holds
nothing any more: it registers again under a new incarnation and reconciles (`on_lost`).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from datetime import timedelta

import structlog

from modelplane.common.errors import InvalidArgument, ModelplaneError
from modelplane.loader.memory import MemoryManager
from modelplane.loader.settings import LoaderSettings
from modelplane.registry.client import RegistryClient
from modelplane.registry.errors import NodeLeaseLost, NodeNotFound
from modelplane.registry.fleet import Node, NodeDevice, label_problem, new_holder

log = structlog.get_logger()


def parse_labels(text: str) -> dict[str, str]:
    """`gpu=h100,zone=a` as a dict; a malformed entry is refused with what to write instead."""
    labels: dict[str, str] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        key, sep, value = entry.partition("=")
        key, value = key.strip(), value.strip()
        problem = None if sep and key else f"{entry!r} is not key=value"
        problem = problem or label_problem(key, value)
        if problem:
            raise InvalidArgument(
                f"MODELPLANE_NODE_LABELS={text!r} is not valid: {problem}. Write comma-separated key=value "
                "pairs, e.g. gpu=h100,zone=a."
            )
        labels[key] = value
    return labels


class NodeAgent:
    """Registers this node, renews its lease, and says which incarnation holds it now."""

    def __init__(
        self,
        settings: LoaderSettings,
        registry: RegistryClient,
        memory: MemoryManager,
        *,
        triton_address: str,
        loader_port: Callable[[], int],
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.memory = memory
        self.triton_address = triton_address
        self.loader_port = loader_port
        self.labels = parse_labels(settings.node_labels)
        self.lease = timedelta(seconds=settings.node_lease_seconds)
        self.node: Node | None = None
        self.registered = False  # once registered, a registration again means the lease was lost
        self.on_lost: Callable[[], Awaitable[None]] | None = None

    @property
    def node_id(self) -> str:
        return self.settings.node_id

    @property
    def incarnation(self) -> int:
        """The incarnation this process holds the node under; 0 while it holds none."""
        return self.node.incarnation if self.node is not None else 0

    def loader_address(self) -> str:
        host = self.settings.advertise_host or self.settings.host
        if host in ("", "0.0.0.0", "::", "[::]"):  # noqa: S104 - an address to advertise, not to bind
            host = socket.gethostname()
        return f"{host}:{self.loader_port()}"

    async def devices(self) -> list[NodeDevice]:
        if not self.memory.budget.devices:
            await self.memory.refresh_devices()
        return [
            NodeDevice(
                device=r.device, capacity_bytes=r.capacity_bytes, used_bytes=r.used_bytes, total_bytes=r.total_bytes
            )
            for r in self.memory.report()
        ]

    async def register(self, *, wait: bool = True) -> Node:
        """Registers under a new incarnation. With `wait`, a crashed predecessor's lease is waited
        out; a process that keeps renewing the id is refused (NodeIdInUse) all the same."""
        node = Node(
            node_id=self.node_id,
            loader_address=self.loader_address(),
            triton_address=self.triton_address,
            labels=self.labels,
            devices=await self.devices(),
            holder=new_holder("loader"),
        )
        wait_seconds = self.lease.total_seconds() + 1.0 if wait else 0.0
        self.node = await self.registry.register_node(node, lease_duration=self.lease, wait_seconds=wait_seconds)
        self.registered = True
        log.info(
            "node registered",
            node=self.node_id,
            incarnation=self.node.incarnation,
            loader=node.loader_address,
            triton=node.triton_address,
            labels=self.labels,
        )
        return self.node

    async def keep_lease(self) -> None:
        """Renews the lease every third of its duration, for as long as the loader runs; once it is
        lost, registers again (each second until the registry accepts) and reconciles."""
        interval = self.lease.total_seconds() / 3
        while True:
            await asyncio.sleep(interval if self.node is not None else 1.0)
            try:
                if self.node is None:
                    again = self.registered
                    await self.register(wait=False)
                    if again:
                        await self._lost()
                else:
                    devices = await self.devices()
                    self.node = await self.registry.renew_node_lease(self.node_id, self.incarnation, devices)
            except ModelplaneError as error:
                if error.reason in (NodeLeaseLost.reason, NodeNotFound.reason):
                    log.warning("node lease lost; registering again", node=self.node_id, error=error.message)
                    self.node = None
                    continue
                log.warning("node lease not renewed", node=self.node_id, error=error.message)

    async def _lost(self) -> None:
        if self.on_lost is not None:
            await self.on_lost()
