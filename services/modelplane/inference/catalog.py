"""Which models exist, where their copies are, and how to serve them.

The catalogue follows the registry's WatchModels stream (models, nodes and placements, kept in the
RoutingTable), so a request costs no registry call; tokenizers are fetched once per digest. A
request for a model that has no READY copy asks for one (`OnDemand`) and waits, within its
deadline, instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from modelplane.common.errors import Cancelled, DeadlineExceeded, ModelplaneError
from modelplane.common.request_context import current_request_id
from modelplane.common.types import Model, ModelState, ServingProfile
from modelplane.inference.errors import ModelLoading, ModelNotServable
from modelplane.inference.routing import RoutingTable
from modelplane.inference.tokenization import EncoderTokenizer
from modelplane.loader.client import LoaderClient
from modelplane.registry.client import RegistryClient
from modelplane.registry.watch import Change, ChangeType, ModelChange, NodeChange, PlacementChange

log = structlog.get_logger()

# Time kept back from a request's deadline to run the model and answer once it is loaded, so a
# load that is late ends in 503 with Retry-After rather than in the caller's deadline expiring.
ANSWER_MARGIN_SECONDS = 1.0
# What a first load is assumed to take when the model has never been loaded.
_FIRST_LOAD_SECONDS = 30.0
# Longest an on-demand load waits for a READY copy after asking; the next request asks again.
COPY_WAIT_SECONDS = 600.0


class OnDemand(Protocol):
    """Asks for a copy of a model that has none READY: the one place the on-demand path lives."""

    async def request_copy(self, name: str, request_id: str) -> Model | None:
        """Returns once the copy is asked for, or made (then with the model as it now is)."""
        ...


class FleetOnDemand:
    """Until a node has registered (one node: `make run`, or loaders not yet in the fleet), the
    loader loads the model into the configured Triton and answers once it is READY, as before the
    fleet. Once the registry knows nodes, its placer picks one (EnsurePlacement: RESOURCE_EXHAUSTED
    with why when none fits); that node's loader makes the copy and the watch shows it READY."""

    def __init__(self, registry: RegistryClient, loader: LoaderClient, table: RoutingTable) -> None:
        self.registry = registry
        self.loader = loader
        self.table = table

    async def request_copy(self, name: str, request_id: str) -> Model | None:
        if not self.table.nodes:
            return await self.loader.ensure_loaded(name, reason="on-demand", timeout_seconds=None)  # type: ignore[arg-type]
        placements, node_id = await self.registry.ensure_placement(name, request_id)
        for placement in placements:
            self.table.remember_placement(placement)
        log.info("asked the placer for a copy", model=name, node=node_id)
        return None


@dataclass(frozen=True)
class _OnDemandLoad:
    task: asyncio.Task[Model]
    started: float
    expected_seconds: float


def _expected_load_seconds(model: Model) -> float:
    """How long loading the model should take, from its previous load: only the Triton load when
    its files are staged, every phase otherwise."""
    durations = model.status.phase_durations
    if not durations:
        return _FIRST_LOAD_SECONDS
    staged = model.state in (ModelState.STAGED, ModelState.UNLOADING, ModelState.READY, ModelState.LOADING)
    phases = [d for d in durations if d.phase == ModelState.LOADING] if staged else durations
    return sum(d.duration.total_seconds() for d in phases) or _FIRST_LOAD_SECONDS


@dataclass(frozen=True)
class ServingModel:
    model: Model
    profile: ServingProfile
    tokenizer: EncoderTokenizer | None
    cold_start: bool = False

    @property
    def name(self) -> str:
        return self.model.name


@dataclass
class _Snapshot:
    """What the first changes of a (re)connected watch held, to forget what it no longer does."""

    models: set[str] = field(default_factory=set)
    nodes: set[str] = field(default_factory=set)
    placements: set[tuple[str, str]] = field(default_factory=set)

    def add(self, change: Change) -> None:
        if isinstance(change, ModelChange):
            self.models.add(change.model.name)
        elif isinstance(change, NodeChange):
            self.nodes.add(change.node.node_id)
        elif isinstance(change, PlacementChange):
            self.placements.add(change.placement.key)


class ModelCatalog:
    def __init__(
        self,
        registry: RegistryClient,
        on_demand: OnDemand,
        table: RoutingTable,
        *,
        copy_wait_seconds: float = COPY_WAIT_SECONDS,
    ) -> None:
        self.registry = registry
        self.on_demand = on_demand
        self.table = table
        self.models = table.models
        self.copy_wait_seconds = copy_wait_seconds
        self._tokenizers: dict[str, EncoderTokenizer] = {}
        self._loads: dict[str, _OnDemandLoad] = {}
        self._watch: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()

    def start(self) -> None:
        self._watch = asyncio.create_task(self._follow_registry(), name="watch-registry")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for load in self._loads.values():
            load.task.cancel()

    async def _follow_registry(self) -> None:
        backoff = 0.5
        while True:
            snapshot: _Snapshot | None = _Snapshot()
            try:
                async for change in self.registry.watch_fleet(include_initial=True):
                    backoff = 0.5
                    if change.change_type == ChangeType.INITIAL and snapshot is not None:
                        snapshot.add(change)
                    elif snapshot is not None:
                        # The snapshot is over: what it did not hold was removed while the watch was down.
                        self.table.keep_only(snapshot.models, snapshot.nodes, snapshot.placements)
                        snapshot = None
                    self.table.apply(change)
                    self._synced.set()
            except ModelplaneError as error:
                log.warning("registry watch interrupted; reconnecting", error=error.message, in_seconds=backoff)
            self._synced.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _current(self, name: str) -> Model:
        if self._synced.is_set() and name in self.models:
            return self.models[name]
        model = await self.registry.get_model(name)  # raises ModelNotFound
        self.table.remember(model)
        return self.models.get(name, model)

    async def acquire(self, name: str, *, wait_seconds: float) -> ServingModel:
        """The model ready to serve, loading it on demand within `wait_seconds` (the request's
        remaining deadline, or the service's bound on waiting for a load)."""
        model = await self._current(name)
        cold = False
        if not self.table.routes(name):
            _refuse_failed(model)
            model = await self._wait_for_load(model, wait_seconds)
            cold = True
        profile = model.status.profile
        if profile is None:
            raise ModelLoading(f"Model '{name}' has no serving profile yet; retry shortly.", retry_after_seconds=1.0)
        return ServingModel(model, profile, await self._tokenizer(name, profile), cold_start=cold)

    async def _wait_for_load(self, model: Model, wait_seconds: float) -> Model:
        """Asks for a copy of the model (one load shared by every request that waits for it) and
        waits for it, giving up early enough to answer 503 with Retry-After before the deadline."""
        name = model.name
        load = self._loads.get(name)
        if load is None or load.task.done():
            # The load is not this request's: it goes on when the request gives up, so the retry
            # finds the model ready.
            task = asyncio.create_task(self._copy(name, current_request_id.get()), name=f"on-demand-{name}")
            load = _OnDemandLoad(task, time.monotonic(), _expected_load_seconds(model))
            self._loads[name] = load
            task.add_done_callback(lambda _: self._loads.pop(name, None) if self._loads.get(name) is load else None)
            task.add_done_callback(lambda t: None if t.cancelled() else t.exception())
        budget = wait_seconds - ANSWER_MARGIN_SECONDS
        try:
            if budget <= 0:
                raise TimeoutError
            loaded = await asyncio.wait_for(asyncio.shield(load.task), timeout=budget)
        except TimeoutError:
            retry_after = max(1.0, load.expected_seconds - (time.monotonic() - load.started))
            raise ModelLoading(
                f"Model '{name}' is loading and was not ready within this request's deadline "
                f"({max(0.0, wait_seconds):.0f} s); retry in about {retry_after:.0f} s.",
                retry_after_seconds=retry_after,
                metadata={"model": name},
            ) from None
        except (DeadlineExceeded, Cancelled) as error:
            raise ModelLoading(error.message, retry_after_seconds=5.0, metadata={"model": name}) from None
        return loaded

    async def _copy(self, name: str, request_id: str) -> Model:
        """Asks for a copy and waits until the watch (or the answer) shows one READY."""
        made = await self.on_demand.request_copy(name, request_id)
        if made is not None:
            self.table.remember(made)
        try:
            async with asyncio.timeout(self.copy_wait_seconds):
                while not self.table.routes(name):
                    model = self.models.get(name)
                    if model is not None:
                        _refuse_failed(model)
                    await self.table.changed(name)
        except TimeoutError:
            raise ModelLoading(
                f"Model '{name}' has no ready copy {self.copy_wait_seconds:.0f} s after it was asked for; retry "
                "shortly, and see `modelplane models ls` for where it is.",
                retry_after_seconds=5.0,
                metadata={"model": name},
            ) from None
        return self.models[name]

    async def _tokenizer(self, name: str, profile: ServingProfile) -> EncoderTokenizer | None:
        digest = profile.tokenizer_sha256
        if not digest:
            return None
        key = f"{digest}:{profile.max_input_tokens}:{profile.special_tokens.get('pad_token')}"
        tokenizer = self._tokenizers.get(key)
        if tokenizer is None:
            _, assets = await self.registry.get_assets(name)
            content = next((a.content for a in assets if a.sha256 == digest), None)
            if content is None:
                raise ModelLoading(f"Tokenizer of model '{name}' is not in the registry yet.", retry_after_seconds=1.0)
            tokenizer = EncoderTokenizer(
                content, max_tokens=profile.max_input_tokens, pad_token=profile.special_tokens.get("pad_token")
            )
            self._tokenizers[key] = tokenizer
        return tokenizer


def _refuse_failed(model: Model) -> None:
    """A model whose load failed everywhere needs a person, not a wait."""
    if model.state == ModelState.FAILED:
        raise ModelNotServable(
            f"Model '{model.name}' failed to load: {model.status.reason} Fix the cause, then load it again with "
            f"`modelplane models load {model.name}`.",
            metadata={"model": model.name, "state": model.state.name},
        )
