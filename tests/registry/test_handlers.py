"""The registry's rules, against real SQLite and PostgreSQL databases, without a gRPC server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from modelplane.common.types import (
    DesiredState,
    FileDigest,
    LoadProgress,
    ModelAsset,
    ModelSpec,
    ModelState,
    PackageManifest,
    RequestCount,
    ServingProfile,
    Task,
)
from modelplane.registry.errors import InvalidModelSpec, ModelBusy, ModelNotFound, StaleTransition
from modelplane.registry.handlers import RegistryHandler, Transition
from modelplane.registry.store import RegistryStore
from modelplane.registry.watch import ChangeType


@pytest.fixture
async def handler(database_url: str) -> AsyncIterator[RegistryHandler]:
    store = await RegistryStore.open(database_url)
    yield RegistryHandler(store)
    await store.close()


def spec(name: str = "minilm", source: str = "/models/minilm", **fields: object) -> ModelSpec:
    return ModelSpec(name=name, task=Task.EMBEDDING, source_uri=source, **fields)


async def walk(handler: RegistryHandler, name: str, *states: ModelState) -> None:
    for state in states:
        model = await handler.get(name)
        await handler.transition(Transition(name=name, version=model.version, to_state=state, message=state.name))


async def test_register_creates_version_one_and_records_the_event(handler: RegistryHandler) -> None:
    model, created = await handler.register(spec(), load=True)
    assert created
    assert (model.version, model.state, model.desired_state) == (1, ModelState.REGISTERED, DesiredState.LOADED)
    events = await handler.events(name="minilm")
    assert [(e.from_state, e.to_state) for e in events] == [(ModelState.UNSPECIFIED, ModelState.REGISTERED)]
    assert "registered version 1 from /models/minilm" in events[0].message


async def test_registering_the_same_package_again_keeps_the_version(handler: RegistryHandler) -> None:
    await handler.register(spec(), load=False)
    model, created = await handler.register(spec(description="now described"), load=False)
    assert not created
    assert model.version == 1
    assert model.spec.description == "now described"


async def test_a_new_source_is_a_new_version(handler: RegistryHandler) -> None:
    await handler.register(spec(), load=False)
    model, created = await handler.register(spec(source="/models/minilm-v2"), load=False)
    assert created and model.version == 2 and model.state == ModelState.REGISTERED


DIGEST = "ab" * 32


async def _ready(handler: RegistryHandler, name: str, manifest: PackageManifest) -> None:
    await walk(handler, name, ModelState.FETCHING, ModelState.VERIFYING)
    await handler.transition(Transition(name, 1, ModelState.STAGED, manifest=manifest))
    await walk(handler, name, ModelState.LOADING, ModelState.READY)


async def test_the_same_content_from_another_location_keeps_its_version_and_state(handler: RegistryHandler) -> None:
    """A second checkout registers the bundled package again from its own install path."""
    manifest = PackageManifest(files=[FileDigest(path="1_Pooling/config.json", sha256="1" * 64)], sha256=DIGEST)
    await handler.register(spec(source="/clone-a/.venv/minilm", expected_sha256=DIGEST), load=True)
    await _ready(handler, "minilm", manifest)
    model, created = await handler.register(spec(source="/clone-b/.venv/minilm", expected_sha256=DIGEST), load=True)
    assert not created
    assert (model.version, model.state, model.spec.source_uri) == (1, ModelState.READY, "/clone-b/.venv/minilm")
    assert model.status.manifest == manifest  # still proves the cached package: no fetch, no conversion
    assert (await handler.get("minilm")).spec.source_uri == "/clone-b/.venv/minilm"
    last = (await handler.events(name="minilm"))[-1]
    assert "source moved to /clone-b/.venv/minilm" in last.message and "version 1 is kept" in last.message


async def test_a_single_file_renamed_at_its_new_location_is_fetched_again(handler: RegistryHandler) -> None:
    manifest = PackageManifest(files=[FileDigest(path="model.gguf", sha256=DIGEST)], sha256="9" * 64)
    await handler.register(spec(source="/a/model.gguf", expected_sha256=DIGEST), load=True)
    await _ready(handler, "minilm", manifest)
    same_name, _ = await handler.register(spec(source="/b/model.gguf", expected_sha256=DIGEST), load=True)
    assert same_name.status.manifest == manifest
    renamed, created = await handler.register(spec(source="/c/renamed.gguf", expected_sha256=DIGEST), load=True)
    assert not created and renamed.version == 1
    assert renamed.status.manifest is None  # its file names changed: the next load records them again


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ({"expected_sha256": ""}, {"expected_sha256": ""}),  # nothing proves the content is the same
        ({"expected_sha256": DIGEST}, {"expected_sha256": "cd" * 32}),
        ({"expected_sha256": DIGEST}, {"expected_sha256": DIGEST, "task": Task.RERANK}),
    ],
    ids=["no-digest", "other-digest", "other-task"],
)
async def test_another_location_without_the_same_content_is_a_new_version(
    handler: RegistryHandler, before: dict, after: dict
) -> None:
    await handler.register(spec(source="/a", **before), load=False)
    model, created = await handler.register(spec(source="/b").model_copy(update=after), load=False)
    assert created and model.version == 2 and model.state == ModelState.REGISTERED


async def test_a_failed_model_moved_to_another_location_gets_a_new_version(handler: RegistryHandler) -> None:
    await handler.register(spec(source="/a", expected_sha256=DIGEST), load=True)
    await handler.transition(Transition("minilm", 1, ModelState.FAILED, message="Source path /a does not exist."))
    model, created = await handler.register(spec(source="/b", expected_sha256=DIGEST), load=True)
    assert created and (model.version, model.state) == (2, ModelState.REGISTERED)


@pytest.mark.parametrize(
    ("uri", "what"),
    [
        ("http://user:secret@models.internal/pkg/", "a user name or password"),
        ("s3://AKIAEXAMPLE:secret@bucket/minilm", "a user name or password"),
        ("https://token-only@models.internal/pkg/", "a user name or password"),
        (
            "https://bucket.s3.amazonaws.com/m.gguf?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=secret",
            "the query parameter 'X-Amz-Credential'",
        ),
        ("https://models.internal/m.gguf?access_token=secret", "the query parameter 'access_token'"),
    ],
)
async def test_credentials_in_the_source_are_refused_and_never_stored(
    handler: RegistryHandler, uri: str, what: str
) -> None:
    with pytest.raises(InvalidModelSpec) as refused:
        await handler.register(spec(source=uri), load=False)
    message = refused.value.message
    assert f"carries credentials ({what}); nothing was registered" in message
    assert "MODELPLANE_LOADER_HTTP_BEARER_TOKEN" in message and "MODELPLANE_LOADER_S3_ACCESS_KEY_ID" in message
    assert "secret" not in message and "AKIA" not in message
    with pytest.raises(ModelNotFound):
        await handler.get("minilm")
    with pytest.raises(ModelNotFound):
        await handler.events(name="minilm")


async def test_a_query_without_secrets_and_a_path_with_an_at_sign_are_accepted(handler: RegistryHandler) -> None:
    model, _ = await handler.register(spec(source="https://models.internal/pkg/?rev=3"), load=False)
    assert model.spec.source_uri == "https://models.internal/pkg/?rev=3"
    model, _ = await handler.register(spec(name="local", source="/data/team@site/minilm"), load=False)
    assert model.spec.source_uri == "/data/team@site/minilm"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (spec(name="../etc"), "is not valid"),
        (spec(name="UPPER"), "is not valid"),
        (ModelSpec(name="x", source_uri="/m"), "has no task"),
        (spec(source=" "), "has no source URI"),
        (spec(expected_sha256="abc"), "must be 64 hexadecimal characters"),
        (spec(manifest=PackageManifest(files=[FileDigest(path="../../etc/passwd", sha256="0" * 64)])), "escapes"),
    ],
)
async def test_malformed_specs_are_refused_with_what_to_fix(
    handler: RegistryHandler, bad: ModelSpec, message: str
) -> None:
    with pytest.raises(InvalidModelSpec, match=message):
        await handler.register(bad, load=False)


async def test_expected_digest_is_normalised_to_lowercase(handler: RegistryHandler) -> None:
    model, _ = await handler.register(spec(expected_sha256="AB" * 32), load=False)
    assert model.spec.expected_sha256 == "ab" * 32


async def test_unknown_model_is_not_found(handler: RegistryHandler) -> None:
    with pytest.raises(ModelNotFound, match="Model 'ghost' is not registered"):
        await handler.get("ghost")
    # A mistyped name in `modelplane models events` is an error, not an empty history.
    with pytest.raises(ModelNotFound, match="Model 'ghost' is not registered"):
        await handler.events(name="ghost")


async def test_lifecycle_records_phases_and_their_durations(handler: RegistryHandler) -> None:
    await handler.register(spec(), load=True)
    model = await handler.get("minilm")
    await handler.transition(Transition("minilm", model.version, ModelState.FETCHING, begins_operation=True))
    await walk(handler, "minilm", ModelState.VERIFYING, ModelState.CONVERTING)
    manifest = PackageManifest(
        files=[FileDigest(path="model.safetensors", size_bytes=3, sha256="1" * 64)], sha256="2" * 64
    )
    profile = ServingProfile(triton_model_name="minilm", embedding_dimension=384)
    asset = ModelAsset(name="tokenizer.json", sha256="3" * 64, content=b"{}")
    await handler.transition(
        Transition("minilm", 1, ModelState.STAGED, manifest=manifest, profile=profile, assets=[asset])
    )
    await walk(handler, "minilm", ModelState.LOADING, ModelState.READY)
    model = await handler.get("minilm")
    assert model.state == ModelState.READY
    assert model.status.manifest == manifest
    assert [d.phase for d in model.status.phase_durations] == [
        ModelState.FETCHING,
        ModelState.VERIFYING,
        ModelState.CONVERTING,
        ModelState.LOADING,
    ]
    served_profile, assets = await handler.assets("minilm")
    assert served_profile.embedding_dimension == 384
    assert assets == [asset]


async def test_illegal_and_stale_transitions_are_refused(handler: RegistryHandler) -> None:
    await handler.register(spec(), load=False)
    with pytest.raises(StaleTransition, match="cannot go from REGISTERED to READY"):
        await handler.transition(Transition("minilm", 1, ModelState.READY))
    with pytest.raises(StaleTransition, match="version 2 is stale"):
        await handler.transition(Transition("minilm", 2, ModelState.FETCHING))
    with pytest.raises(StaleTransition, match="is REGISTERED, not LOADING"):
        await handler.transition(Transition("minilm", 1, ModelState.FETCHING, expected_from_state=ModelState.LOADING))


async def test_progress_updates_change_no_state_and_record_no_event(handler: RegistryHandler) -> None:
    await handler.register(spec(), load=False)
    await walk(handler, "minilm", ModelState.FETCHING)
    progress = LoadProgress(phase=ModelState.FETCHING, bytes_done=10, bytes_total=100)
    model, event = await handler.transition(
        Transition("minilm", 1, ModelState.FETCHING, progress=progress, progress_only=True)
    )
    assert event is None
    assert model.status.progress == progress
    assert len(await handler.events(name="minilm")) == 2


async def test_a_loaded_model_cannot_be_deleted(handler: RegistryHandler) -> None:
    await handler.register(spec(), load=False)
    await walk(handler, "minilm", ModelState.FETCHING, ModelState.VERIFYING, ModelState.STAGED, ModelState.LOADING)
    with pytest.raises(ModelBusy, match="unload it"):
        await handler.delete("minilm")
    await handler.transition(Transition("minilm", 1, ModelState.FAILED, message="gone"))
    await handler.delete("minilm")
    with pytest.raises(ModelNotFound):
        await handler.get("minilm")


async def test_listing_pages_and_filters(handler: RegistryHandler) -> None:
    for index in range(5):
        await handler.register(spec(name=f"model-{index}"), load=False)
    await handler.register(ModelSpec(name="reranker", task=Task.RERANK, source_uri="/r"), load=False)
    first, token = await handler.list(page_size=4)
    rest, last = await handler.list(page_size=4, page_token=token)
    assert [m.name for m in first + rest] == [*(f"model-{i}" for i in range(5)), "reranker"]
    assert last == ""
    rerankers, _ = await handler.list(task=Task.RERANK)
    assert [m.name for m in rerankers] == ["reranker"]


async def test_watchers_see_the_snapshot_then_every_change(handler: RegistryHandler) -> None:
    await handler.register(spec(name="first"), load=False)
    changes = handler.watch(include_initial=True)
    initial = await anext(changes)
    assert (initial.change_type, initial.model.name) == (ChangeType.INITIAL, "first")
    await handler.register(spec(name="second"), load=False)
    registered = await anext(changes)
    assert (registered.change_type, registered.model.name) == (ChangeType.REGISTERED, "second")
    await walk(handler, "second", ModelState.FETCHING)
    updated = await anext(changes)
    assert updated.event is not None and updated.event.to_state == ModelState.FETCHING
    await changes.aclose()


async def test_request_statistics_accumulate(handler: RegistryHandler) -> None:
    now = datetime.now(UTC)
    await handler.record_requests([RequestCount(model_name="minilm", count=30, last_request_time=now, cold_starts=1)])
    await handler.record_requests([RequestCount(model_name="minilm", count=10, last_request_time=now)])
    [stats] = await handler.statistics(["minilm"])
    assert stats.total_requests == 40 and stats.cold_starts == 1
    assert stats.hour_of_day_counts[now.hour] == 40
    assert 0.12 < stats.rate_5m <= 40 / 300
