"""Which node's Triton answers a request.

The registry's watch tells the inference service where every model's copies are (nodes and
placements, `RoutingTable`). Each request goes to a node holding a READY copy, chosen by the power
of two choices on requests in flight (`choose`): two copies drawn at random, the less busy one
taken. That keeps the load even without a shared counter, and a slow node gets fewer requests
without being measured. One Triton client per node is kept and reused (`Router`); it is closed
once the node is gone and its last request has ended.

A node that fails under a request (it cannot be reached, its connection breaks, or it no longer
holds the model) is set aside for a moment and the request goes once to another copy, unless part
of its answer was already sent: a stream that started is never replayed, its caller gets
StreamInterrupted. A failure of the request itself (bad input, a model error) is never retried.

One node needs no configuration: while the registry knows no placement of a model, a READY model
is served by the configured Triton (`node-0`), as before the fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import structlog
from prometheus_client import Counter, Gauge

from modelplane.common.types import Model, ModelState
from modelplane.inference.errors import ModelLoading, ModelNotOnNode, NodeUnreachable, StreamInterrupted
from modelplane.inference.triton import GeneratedChunk, TritonInferer
from modelplane.registry.fleet import Node, NodeState, Placement
from modelplane.registry.watch import Change, ChangeType, ModelChange, NodeChange, PlacementChange
from modelplane.triton.client import TritonTls

log = structlog.get_logger()

# The id of the configured Triton (MODELPLANE_TRITON_GRPC_ADDRESS) when the registry knows no node.
DEFAULT_NODE_ID = "node-0"
# After a node fails a call, how long it gets no requests while another copy can take them.
SET_ASIDE_SECONDS = 2.0

NODE_REQUESTS = Counter(
    "modelplane_inference_node_requests_total",
    "Calls sent to each node's Triton (a request, or one chunk of a large embedding request).",
    ["node"],
)
NODE_IN_FLIGHT = Gauge("modelplane_inference_node_in_flight", "Calls under way at each node's Triton.", ["node"])
NODE_FAILURES = Counter(
    "modelplane_inference_node_failures_total",
    "Calls that failed because the node could not be reached or did not hold the model; `retried` is "
    "whether another copy then took the call.",
    ["node", "retried"],
)

T = TypeVar("T")
R = TypeVar("R")


def choose(candidates: Sequence[T], in_flight: Callable[[T], int], rng: random.Random) -> T:
    """The power of two choices: of two candidates drawn at random, the one with fewer calls in
    flight (the first drawn on a tie). With two candidates that is the less busy one."""
    count = len(candidates)
    if count == 1:
        return candidates[0]
    # Two distinct indices drawn uniformly, as rng.sample would, at a tenth of its cost.
    i = int(rng.random() * count)
    j = int(rng.random() * (count - 1))
    first, second = candidates[i], candidates[j + 1 if j >= i else j]
    return second if in_flight(second) < in_flight(first) else first


def retryable(error: BaseException) -> bool:
    """Whether a call that failed may go to another copy: only when the node failed (unreachable,
    connection broken, model not held there), never for a failure of the request itself."""
    return isinstance(error, NodeUnreachable | ModelNotOnNode)


@dataclass(frozen=True)
class Route:
    """A node that holds a READY copy of a model, and where its Triton listens."""

    node_id: str
    address: str


class RoutingTable:
    """The fleet as the registry's watch shows it: models, nodes and placements, and from them
    the routes of each model (cached until the next change)."""

    def __init__(self, default_address: str) -> None:
        self.default_address = default_address
        self.models: dict[str, Model] = {}
        self.nodes: dict[str, Node] = {}
        self.placements: dict[str, dict[str, Placement]] = {}
        # Bumped whenever a node changes, so the router drops clients of nodes that are gone.
        self.nodes_generation = 0
        self._routes: dict[str, list[Route]] = {}
        self._changed: dict[str, asyncio.Event] = {}

    def apply(self, change: Change) -> None:
        """One change from the watch."""
        if isinstance(change, ModelChange):
            if change.change_type == ChangeType.DELETED:
                self.models.pop(change.model.name, None)
                self.placements.pop(change.model.name, None)
                self._touched(change.model.name)
            else:
                self.remember(change.model)
        elif isinstance(change, NodeChange):
            if change.change_type == ChangeType.DELETED:
                self.nodes.pop(change.node.node_id, None)
            else:
                self.nodes[change.node.node_id] = change.node
            self.nodes_generation += 1
            self._touched()
        elif isinstance(change, PlacementChange):
            if change.change_type == ChangeType.DELETED:
                self.forget_placement(change.placement)
            else:
                self.remember_placement(change.placement)

    def remember(self, model: Model) -> None:
        """Keeps the newer of what the table holds and `model` (a load's answer may overtake the watch)."""
        known = self.models.get(model.name)
        newer = known is None or known.version < model.version
        if not newer and known is not None:
            known_time, new_time = known.status.update_time, model.status.update_time
            newer = known_time is None or (new_time is not None and new_time >= known_time)
        if newer:
            self.models[model.name] = model
            self._touched(model.name)

    def remember_placement(self, placement: Placement) -> None:
        known = self.placements.get(placement.model_name, {}).get(placement.node_id)
        if known is not None and _stamp(known) > _stamp(placement):
            return
        self.placements.setdefault(placement.model_name, {})[placement.node_id] = placement
        self._touched(placement.model_name)

    def forget_placement(self, placement: Placement) -> None:
        placed = self.placements.get(placement.model_name, {})
        placed.pop(placement.node_id, None)
        if not placed:
            self.placements.pop(placement.model_name, None)
        self._touched(placement.model_name)

    def keep_only(
        self, models: Collection[str], nodes: Collection[str], placements: Collection[tuple[str, str]]
    ) -> None:
        """Forgets what a fresh snapshot of the watch no longer holds (changes missed while it was down)."""
        for name in set(self.models) - set(models):
            del self.models[name]
        for node_id in set(self.nodes) - set(nodes):
            del self.nodes[node_id]
        kept = set(placements)
        for name, placed in list(self.placements.items()):
            for node_id in [n for n in placed if (name, n) not in kept]:
                del placed[node_id]
            if not placed:
                del self.placements[name]
        self.nodes_generation += 1
        self._touched()

    def routes(self, name: str) -> list[Route]:
        """The nodes holding a READY copy of the model's current version, written by the node's
        current process, on a node that is live or draining (registry/fleet.py `counts`). A model
        the registry has placed nowhere is served by the configured Triton while it is READY."""
        cached = self._routes.get(name)
        if cached is None:
            cached = self._routes[name] = self._find_routes(name)
        return cached

    def _find_routes(self, name: str) -> list[Route]:
        model = self.models.get(name)
        if model is None:
            return []
        placed = self.placements.get(name)
        if not placed:
            return [self.default_route()] if model.state == ModelState.READY else []
        routes = []
        for node_id, placement in placed.items():
            node = self.nodes.get(node_id)
            status = placement.status
            if (
                node is not None
                and node.triton_address
                and node.state in (NodeState.LIVE, NodeState.DRAINING)
                and status.state == ModelState.READY
                and status.incarnation == node.incarnation
                and status.version == model.version
            ):
                routes.append(Route(node_id, node.triton_address))
        return sorted(routes, key=lambda route: route.node_id)

    def default_route(self) -> Route:
        """The configured Triton, under the id of the registered node-0 when there is one."""
        node = self.nodes.get(DEFAULT_NODE_ID)
        address = node.triton_address if node is not None and node.triton_address else self.default_address
        return Route(DEFAULT_NODE_ID, address)

    def addresses(self) -> dict[str, str]:
        """Where each node that may still serve listens (live or draining nodes, and node-0)."""
        live = {
            node.node_id: node.triton_address
            for node in self.nodes.values()
            if node.triton_address and node.state in (NodeState.LIVE, NodeState.DRAINING)
        }
        default = self.default_route()
        live.setdefault(default.node_id, default.address)
        return live

    async def changed(self, name: str) -> None:
        """Returns at the next change of the model, its placements, or any node."""
        event = self._changed.setdefault(name, asyncio.Event())
        await event.wait()

    def _touched(self, name: str | None = None) -> None:
        if name is None:
            self._routes.clear()
            events, self._changed = list(self._changed.values()), {}
        else:
            self._routes.pop(name, None)
            event = self._changed.pop(name, None)
            events = [event] if event is not None else []
        for event in events:
            event.set()


def _stamp(placement: Placement) -> tuple[int, float]:
    """Orders two reports of one placement: a later generation, then a later status write."""
    written = placement.status.update_time or placement.update_time
    return placement.generation, written.timestamp() if written is not None else 0.0


@dataclass(eq=False)
class NodeLink:
    """The client of one node's Triton and the calls under way there."""

    node_id: str
    address: str
    triton: TritonInferer
    in_flight: int = 0
    set_aside_until: float = 0.0
    retired: bool = False
    _requests: Any = field(default=None, repr=False)
    _gauge: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._requests = NODE_REQUESTS.labels(self.node_id)
        self._gauge = NODE_IN_FLIGHT.labels(self.node_id)

    def begin(self) -> None:
        self.in_flight += 1
        self._requests.inc()
        self._gauge.inc()

    def end(self) -> None:
        self.in_flight -= 1
        self._gauge.dec()


class Router:
    """Sends each call for a model to a node holding a READY copy (`RoutingTable`), retrying a
    node's failure once on another copy. Offers the calls of one Triton (TritonInferer)."""

    def __init__(
        self,
        table: RoutingTable,
        tls: TritonTls | None = None,
        *,
        rng: random.Random | None = None,
        connect: Callable[[str], TritonInferer] | None = None,
    ) -> None:
        self.table = table
        self.connect = connect or (lambda address: TritonInferer(address, tls))
        self.rng = rng or random.Random()  # noqa: S311 - load spreading, not security
        self.links: dict[str, NodeLink] = {}
        self._nodes_seen = -1
        self._closing: set[asyncio.Task[None]] = set()

    def pick(self, model: str, exclude: Collection[str] = ()) -> NodeLink:
        """A node for the next call of `model`, not one of `exclude`; nodes set aside after a
        failure only when no other copy is left."""
        if self._nodes_seen != self.table.nodes_generation:
            self._drop_gone_nodes()
        routes = self.table.routes(model)
        if exclude:
            routes = [route for route in routes if route.node_id not in exclude]
        if not routes:
            raise ModelLoading(
                f"Model '{model}' has no ready copy on any node right now; retry shortly.",
                retry_after_seconds=1.0,
                metadata={"model": model},
            )
        links = [self._link(route) for route in routes]
        now = time.monotonic()
        healthy = [link for link in links if link.set_aside_until <= now] or links
        return choose(healthy, _in_flight, self.rng)

    async def call(self, model: str, call: Callable[[NodeLink], Awaitable[R]], *, retry: bool = True) -> R:
        """`call` on a node holding the model; once more on another copy if that node fails."""
        link = self.pick(model)
        try:
            return await self._on(link, call)
        except Exception as error:
            if not retryable(error):
                raise
            if not retry:
                self._failed(link, retried=False)
                raise
            other = self._other(model, link, error)
        log.warning("node failed a call; trying another copy", node=link.node_id, other=other.node_id)
        try:
            return await self._on(other, call)
        except Exception as error:
            if retryable(error):
                self._failed(other, retried=False)
            raise

    async def infer(
        self,
        model: str,
        arrays: Mapping[str, np.ndarray],
        output: str,
        *,
        request_id: str = "",
        timeout_seconds: float | None = None,
    ) -> np.ndarray:
        return await self.call(
            model,
            lambda link: link.triton.infer(
                model, arrays, output, request_id=request_id, timeout_seconds=timeout_seconds
            ),
        )

    def generate(
        self, model: str, prompt: str, sampling: Mapping[str, Any], *, stream: bool, request_id: str = ""
    ) -> AsyncIterator[GeneratedChunk]:
        return self.stream(
            model, lambda link: link.triton.generate(model, prompt, sampling, stream=stream, request_id=request_id)
        )

    def synthesize(
        self, model: str, text: str, *, speaker: str, speed: float, request_id: str = ""
    ) -> AsyncIterator[tuple[np.ndarray, int]]:
        return self.stream(
            model, lambda link: link.triton.synthesize(model, text, speaker=speaker, speed=speed, request_id=request_id)
        )

    async def stream(self, model: str, open_stream: Callable[[NodeLink], AsyncIterator[T]]) -> AsyncIterator[T]:
        """The items of a streamed call. A node that fails before the first item is replaced
        once by another copy; after it, the stream ends with StreamInterrupted, never replayed."""
        link = self.pick(model)
        retried = False
        while True:
            current, started = link, False
            current.begin()
            try:
                async with contextlib.aclosing(open_stream(current)) as items:
                    async for item in items:
                        started = True
                        yield item
                return
            except Exception as error:
                if not retryable(error):
                    raise
                if started or retried:
                    self._failed(current, retried=False)
                    if not started:
                        raise
                    raise StreamInterrupted(
                        f"The node serving model '{model}' failed after the answer had started; what was sent is "
                        "all there is, and it is not generated again. Send the request again for a whole answer.",
                        retry_after_seconds=1.0,
                        metadata={"model": model},
                    ) from None
                link, retried = self._other(model, current, error), True
                log.warning("node failed before its stream started; trying another copy", node=current.node_id)
            finally:
                self._end(current)

    async def close(self) -> None:
        for link in self.links.values():
            await link.triton.close()
        self.links.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)

    async def _on(self, link: NodeLink, call: Callable[[NodeLink], Awaitable[R]]) -> R:
        link.begin()
        try:
            return await call(link)
        finally:
            self._end(link)

    def _other(self, model: str, failed: NodeLink, error: Exception) -> NodeLink:
        """Another copy for a call `failed` could not serve; the node's error when there is none."""
        try:
            other = self.pick(model, exclude=(failed.node_id,))
        except ModelLoading:
            self._failed(failed, retried=False)
            raise error from None
        self._failed(failed, retried=True)
        return other

    def _failed(self, link: NodeLink, *, retried: bool) -> None:
        link.set_aside_until = time.monotonic() + SET_ASIDE_SECONDS
        NODE_FAILURES.labels(link.node_id, "true" if retried else "false").inc()

    def _end(self, link: NodeLink) -> None:
        link.end()
        if link.retired and link.in_flight == 0:
            self._close_later(link)

    def _link(self, route: Route) -> NodeLink:
        link = self.links.get(route.node_id)
        if link is None or link.address != route.address:
            if link is not None:
                self._retire(link)
            link = self.links[route.node_id] = NodeLink(route.node_id, route.address, self.connect(route.address))
        return link

    def _drop_gone_nodes(self) -> None:
        self._nodes_seen = self.table.nodes_generation
        addresses = self.table.addresses()
        for node_id, link in list(self.links.items()):
            if addresses.get(node_id) != link.address:
                self._retire(link)

    def _retire(self, link: NodeLink) -> None:
        """Stops routing to the node; its client is closed once its last call has ended."""
        if self.links.get(link.node_id) is link:
            del self.links[link.node_id]
        link.retired = True
        if link.in_flight == 0:
            self._close_later(link)

    def _close_later(self, link: NodeLink) -> None:
        task = asyncio.get_running_loop().create_task(link.triton.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


def _in_flight(link: NodeLink) -> int:
    return link.in_flight
