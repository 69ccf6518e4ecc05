"""The registry's rules: what may be registered, which transitions are legal, who is told.

Used by the gRPC servicer; works on domain types only, so it is tested without a network.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath
from urllib.parse import urlsplit

import structlog

from modelplane.common.redact import CREDENTIALS_BELONG, credentials_in_uri, redact_uri
from modelplane.common.types import (
    RESIDENT_STATES,
    WORKING_STATES,
    DesiredState,
    LoadProgress,
    Model,
    ModelAsset,
    ModelEvent,
    ModelSpec,
    ModelState,
    ModelStatus,
    PackageManifest,
    RequestCount,
    ServingProfile,
    Task,
    is_valid_model_name,
)
from modelplane.registry.errors import InvalidModelSpec, ModelBusy, ModelNotFound, ModelPlaced, StaleTransition
from modelplane.registry.fleet import placement_policy_problems
from modelplane.registry.lifecycle import advance, check_step, with_package_facts
from modelplane.registry.statistics import ModelStatistics
from modelplane.registry.store import RegistryStore
from modelplane.registry.watch import Change, ChangeType, ModelChange, NodeChange, PlacementChange

log = structlog.get_logger()

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MAX_PAGE = 1000
_DEFAULT_PAGE = 100

# Spec fields that can change without a new version.
MUTABLE_SPEC_FIELDS = frozenset(
    {
        "priority",
        "idle_ttl",
        "memory_quota_bytes",
        "memory_estimate_bytes",
        "runtime_hints",
        "labels",
        "description",
        "placement",
    }
)


@dataclass(frozen=True)
class Transition:
    """What the loader asks the registry to record."""

    name: str
    version: int
    to_state: ModelState
    expected_from_state: ModelState = ModelState.UNSPECIFIED
    message: str = ""
    progress: LoadProgress | None = None
    manifest: PackageManifest | None = None
    profile: ServingProfile | None = None
    assets: Sequence[ModelAsset] | None = None
    footprint_bytes: int = 0
    request_id: str = ""
    progress_only: bool = False
    begins_operation: bool = False


def _identity(spec: ModelSpec) -> tuple[object, ...]:
    """What makes two specs the same package; a change of any of these is a new version, except
    a new source for the same content (see `_moved`)."""
    return (spec.task, spec.format, spec.source_uri, spec.expected_sha256, spec.manifest)


def _moved(existing: Model, spec: ModelSpec) -> bool:
    """The same content, proven by the same expected digest, registered from another location
    (a second checkout, a recreated virtual environment, a mirror): the version stays. The loader
    verifies the digest at the next fetch from the new location, as at any fetch. A FAILED model
    gets a new version instead, so that the new location is loaded afresh."""
    before = existing.spec
    return (
        bool(spec.expected_sha256)
        and existing.state != ModelState.FAILED
        and (before.task, before.format, before.expected_sha256, before.manifest)
        == (spec.task, spec.format, spec.expected_sha256, spec.manifest)
    )


def _manifest_still_valid(manifest: PackageManifest | None, source_uri: str) -> bool:
    """A recorded manifest names the files; a directory's names are part of its digest, but a
    single file's name is not, so the file's manifest holds at a new location only under the same name."""
    if manifest is None or len(manifest.files) != 1 or "/" in manifest.files[0].path:
        return True
    return PurePosixPath(urlsplit(source_uri).path).name == manifest.files[0].path


def _move(existing: Model, spec: ModelSpec, desired: DesiredState, request_id: str) -> tuple[Model, ModelEvent]:
    """The current version's source moves to `spec.source_uri`; its state and cache stay."""
    status = existing.status
    if not _manifest_still_valid(status.manifest, spec.source_uri):
        status = status.model_copy(update={"manifest": None})  # the next load fetches and records it again
    updated = existing.model_copy(update={"spec": spec, "desired_state": desired, "status": status})
    event = ModelEvent(
        model_name=spec.name,
        version=existing.version,
        from_state=existing.state,
        to_state=existing.state,
        message=(
            f"source moved to {redact_uri(spec.source_uri)}: the same content (SHA-256 {spec.expected_sha256}), "
            f"so version {existing.version} is kept"
        ),
        request_id=request_id,
    )
    return updated, event


def validate_spec(spec: ModelSpec) -> ModelSpec:
    """Returns the spec normalised (lowercase digests), or raises with what to fix."""
    if not is_valid_model_name(spec.name):
        raise InvalidModelSpec(
            f"Model name {spec.name!r} is not valid: use 1 to 64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit."
        )
    if spec.task == Task.UNSPECIFIED:
        raise InvalidModelSpec(
            f"Model '{spec.name}' has no task: say embedding, rerank, generation, speech2text or tts."
        )
    if not spec.source_uri.strip():
        raise InvalidModelSpec(f"Model '{spec.name}' has no source URI: give a path, s3:// or http(s):// URI.")
    secret = credentials_in_uri(spec.source_uri)
    if secret:
        # Refused before anything is stored: the registry, its events and every reader would keep it.
        raise InvalidModelSpec(
            f"The source URI of model '{spec.name}' ({redact_uri(spec.source_uri)}) carries credentials ({secret}); "
            f"nothing was registered. {CREDENTIALS_BELONG}"
        )
    expected = spec.expected_sha256.strip().lower()
    if expected and not _SHA256.match(expected):
        raise InvalidModelSpec(
            f"Expected SHA-256 of model '{spec.name}' must be 64 hexadecimal characters, got {spec.expected_sha256!r}."
        )
    if spec.manifest:
        for entry in spec.manifest.files:
            if entry.path.startswith("/") or ".." in entry.path.split("/") or "\\" in entry.path:
                raise InvalidModelSpec(
                    f"Manifest of model '{spec.name}' lists {entry.path!r}, which escapes the package: "
                    "paths must be relative and must not contain '..'."
                )
    _check_placement_policy(spec)
    return spec.model_copy(update={"expected_sha256": expected})


def _check_placement_policy(spec: ModelSpec) -> None:
    problems = placement_policy_problems(spec.placement) if spec.placement else []
    if problems:
        raise InvalidModelSpec(f"Model '{spec.name}' has a bad placement policy: {'; '.join(problems)}.")


def _encode_page_token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode()


def _decode_page_token(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError) as error:
        raise InvalidModelSpec("page_token is not one this registry issued; start from the first page.") from error


class RegistryHandler:
    """Watchers are told of every change by the store when it commits (see `store.subscribe`)."""

    def __init__(self, store: RegistryStore) -> None:
        self.store = store

    async def get(self, name: str) -> Model:
        model = await self.store.get_model(name)
        if model is None:
            raise ModelNotFound(name)
        return model

    async def list(
        self,
        *,
        task: Task = Task.UNSPECIFIED,
        states: Sequence[ModelState] = (),
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[Model], str]:
        limit = min(page_size or _DEFAULT_PAGE, _MAX_PAGE)
        after = _decode_page_token(page_token) if page_token else ""
        models = await self.store.list_models(task=task, states=states, after_name=after, limit=limit + 1)
        more = len(models) > limit
        models = models[:limit]
        return models, _encode_page_token(models[-1].name) if more else ""

    async def register(self, spec: ModelSpec, *, load: bool, request_id: str = "") -> tuple[Model, bool]:
        spec = validate_spec(spec)
        now = datetime.now(UTC)
        outcome = {"moved": False}

        def decide(existing: Model | None) -> tuple[Model, bool, ModelEvent | None, ChangeType] | None:
            # Runs inside the store's transaction, serialised per name across replicas: the version
            # read here is the one the new version follows, whoever registers at the same time.
            desired = DesiredState.LOADED if load else (existing.desired_state if existing else DesiredState.UNLOADED)
            if existing and _identity(existing.spec) == _identity(spec):
                # The same package again: keep its version and state, take the new mutable fields.
                updated = existing.model_copy(update={"spec": spec, "desired_state": desired or DesiredState.UNLOADED})
                return None if updated == existing else (updated, False, None, ChangeType.UPDATED)
            if existing and _moved(existing, spec):
                moved, event = _move(existing, spec, desired or DesiredState.UNLOADED, request_id)
                outcome["moved"] = True
                return moved, False, event, ChangeType.UPDATED
            version = existing.version + 1 if existing else 1
            model = Model(
                spec=spec,
                version=version,
                desired_state=desired,
                status=ModelStatus(state=ModelState.REGISTERED, update_time=now),
            )
            event = ModelEvent(
                model_name=spec.name,
                version=version,
                from_state=existing.state if existing else ModelState.UNSPECIFIED,
                to_state=ModelState.REGISTERED,
                message=f"registered version {version} from {redact_uri(spec.source_uri)}",
                request_id=request_id,
            )
            return model, True, event, ChangeType.REGISTERED

        model, event, written = await self.store.register_model(spec.name, decide)
        if outcome["moved"]:
            log.info("model source moved", model=spec.name, version=model.version)
        created = written and event is not None and not outcome["moved"]
        if created:
            log.info("model registered", model=spec.name, version=model.version)
        return model, created

    async def update(self, spec: ModelSpec, fields: Sequence[str]) -> Model:
        unknown = set(fields) - MUTABLE_SPEC_FIELDS
        if unknown:
            raise InvalidModelSpec(
                f"Fields {sorted(unknown)} cannot change in place; register the model again to make a new "
                f"version. Changeable: {sorted(MUTABLE_SPEC_FIELDS)}."
            )

        def apply(current: Model | None) -> Model:
            if current is None:
                raise ModelNotFound(spec.name)
            changes = {name: getattr(spec, name) for name in fields}
            updated = current.spec.model_copy(update=changes)
            _check_placement_policy(updated)
            return current.model_copy(update={"spec": updated})

        model, _ = await self.store.transition(spec.name, apply)
        return model

    async def set_desired_state(self, name: str, desired: DesiredState) -> Model:
        def apply(current: Model | None) -> Model:
            if current is None:
                raise ModelNotFound(name)
            return current.model_copy(update={"desired_state": desired})

        model, _ = await self.store.transition(name, apply)
        return model

    async def delete(self, name: str) -> None:
        model = await self.get(name)
        if model.state in RESIDENT_STATES or model.state in WORKING_STATES:
            raise ModelBusy(
                f"Model '{name}' is {model.state.name}; unload it (`modelplane models unload {name}`) before "
                "deleting it.",
                metadata={"model": name, "state": model.state.name},
            )
        await self.store.delete_model(name)
        log.info("model deleted", model=name)

    async def transition(self, request: Transition) -> tuple[Model, ModelEvent | None]:
        if request.to_state == ModelState.UNSPECIFIED:
            raise InvalidModelSpec("to_state is required.")
        now = datetime.now(UTC)

        def apply(current: Model | None) -> Model:
            if current is None:
                raise ModelNotFound(request.name)
            _check_transition(current, request)
            return _apply_transition(current, request, now)

        def describe(before: Model, after: Model) -> ModelEvent | None:
            if request.progress_only:
                return None
            return ModelEvent(
                model_name=request.name,
                version=request.version,
                from_state=before.state,
                to_state=after.state,
                message=request.message,
                request_id=request.request_id,
            )

        def unplaced(model: Model, node_ids: list[str]) -> None:
            # A placed model's state is derived from its copies; only their nodes' loaders move them.
            if node_ids:
                raise ModelPlaced(
                    f"Model '{model.name}' is placed on {', '.join(node_ids)}; its state is derived from its copies "
                    "there. Report a copy's transition with TransitionPlacement (node id and incarnation) instead.",
                    metadata={"model": model.name, "nodes": ",".join(node_ids)},
                )

        model, event = await self.store.transition(
            request.name, apply, describe=describe, assets=request.assets, placed_check=unplaced
        )
        if event is not None:
            log.info(
                "model transition",
                model=request.name,
                version=request.version,
                from_state=event.from_state.name,
                to_state=event.to_state.name,
                message=event.message,
            )
        return model, event

    async def events(self, *, name: str = "", after_id: int = 0, page_size: int = 0) -> list[ModelEvent]:
        if name:
            await self.get(name)  # a mistyped name is not found, not a model without history
        return await self.store.list_events(
            name=name, after_id=after_id, limit=min(page_size or _DEFAULT_PAGE, _MAX_PAGE)
        )

    async def assets(self, name: str) -> tuple[ServingProfile, list[ModelAsset]]:
        model = await self.get(name)
        if model.status.profile is None:
            raise ModelBusy(
                f"Model '{name}' is {model.state.name} and has not been staged yet, so there is nothing to "
                "serve it with; load it first.",
                metadata={"model": name, "state": model.state.name},
            )
        return model.status.profile, await self.store.get_assets(name)

    async def record_requests(self, counts: Sequence[RequestCount]) -> None:
        for item in counts:
            if item.count > 0 or item.cold_starts > 0:
                await self.store.record_requests(item.model_name, item.count, item.cold_starts, item.last_request_time)

    async def statistics(self, names: Sequence[str] = ()) -> list[ModelStatistics]:
        return await self.store.statistics(names)

    async def watch(
        self,
        *,
        names: Sequence[str] = (),
        include_initial: bool = False,
        include_nodes: bool = False,
        include_placements: bool = False,
        node_ids: Sequence[str] = (),
    ) -> AsyncIterator[Change]:
        """Every change from now on (after the current state, with include_initial): models, and
        nodes and placements for a watcher that asks for them, filtered by model and node."""
        wanted = _WatchFilter(set(names), set(node_ids), include_nodes, include_placements)
        # Subscribe before reading the snapshot, so no change falls between the two.
        with await self.store.subscribe() as subscription:
            if include_initial:
                async for change in self._snapshot(wanted):
                    yield change
            async for change in subscription.changes():
                if wanted.admits(change):
                    yield change

    async def _snapshot(self, wanted: _WatchFilter) -> AsyncIterator[Change]:
        """The current state as INITIAL changes: nodes, then models, then placements."""
        if wanted.nodes:
            for node in await self.store.fleet.list_nodes(sorted(wanted.node_ids)):
                yield NodeChange(ChangeType.INITIAL, node)
        models, token = await self.list(page_size=_MAX_PAGE)
        while True:
            for model in models:
                if wanted.admits_model(model.name):
                    yield ModelChange(ChangeType.INITIAL, model)
            if not token:
                break
            models, token = await self.list(page_size=_MAX_PAGE, page_token=token)
        if wanted.placements:
            for placement in await self.store.fleet.list_placements(sorted(wanted.names), sorted(wanted.node_ids)):
                yield PlacementChange(ChangeType.INITIAL, placement)


@dataclass(frozen=True)
class _WatchFilter:
    names: set[str]
    node_ids: set[str]
    nodes: bool
    placements: bool

    def admits_model(self, name: str) -> bool:
        return not self.names or name in self.names

    def admits_node(self, node_id: str) -> bool:
        return not self.node_ids or node_id in self.node_ids

    def admits(self, change: Change) -> bool:
        if isinstance(change, ModelChange):
            return self.admits_model(change.model.name)
        if isinstance(change, NodeChange):
            return self.nodes and self.admits_node(change.node.node_id)
        placement = change.placement
        return self.placements and self.admits_model(placement.model_name) and self.admits_node(placement.node_id)


def _check_transition(current: Model, request: Transition) -> None:
    if request.version != current.version:
        raise StaleTransition(
            f"Model '{request.name}' is at version {current.version}; the transition for version "
            f"{request.version} is stale.",
            metadata={"model": request.name, "current_version": str(current.version)},
        )
    check_step(
        f"Model '{request.name}'",
        current.state,
        request.to_state,
        expected_from_state=request.expected_from_state,
        progress_only=request.progress_only,
        metadata={"model": request.name, "state": current.state.name},
    )


def _apply_transition(current: Model, request: Transition, now: datetime) -> Model:
    status = advance(
        current.status,
        request.to_state,
        message=request.message,
        progress=request.progress,
        progress_only=request.progress_only,
        begins_operation=request.begins_operation,
        now=now,
    )
    if not request.progress_only:
        status = with_package_facts(status, request.manifest, request.profile, request.footprint_bytes)
        if request.to_state == ModelState.REGISTERED:
            status.profile = None  # nothing staged any more
    return current.model_copy(update={"status": status})
