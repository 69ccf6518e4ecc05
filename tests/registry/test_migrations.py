"""Schema migrations: a registry created by the first release upgrades in place, data intact."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from modelplane.common.types import ModelSpec, ModelState, ModelStatus, Task
from modelplane.registry import schema
from modelplane.registry.handlers import RegistryHandler
from modelplane.registry.store import RegistryStore, upgrade_schema
from modelplane.registry.watch import ChangeType

WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


async def _create_first_schema_with_data(url: str) -> None:
    """What a registry of the first schema (revision 0001) holds after serving for a while."""
    engine = create_async_engine(url)
    spec = ModelSpec(name="minilm", task=Task.EMBEDDING, source_uri="/models/minilm", expected_sha256="ab" * 32)
    status = ModelStatus(state=ModelState.STAGED, reason="staged", update_time=WHEN)
    async with engine.begin() as connection:
        await connection.run_sync(upgrade_schema, "0001")
        statements = [
            (
                "INSERT INTO models VALUES (:name, 2, :task, :state, 1, :spec, :status, :t, :t)",
                {"name": "minilm", "task": 1, "state": 5, "spec": spec.model_dump_json(),
                 "status": status.model_dump_json()},
            ),
            ("INSERT INTO model_versions VALUES ('minilm', 1, :spec, :t)", {"spec": spec.model_dump_json()}),
            ("INSERT INTO model_versions VALUES ('minilm', 2, :spec, :t)", {"spec": spec.model_dump_json()}),
            ("INSERT INTO model_events (model_name, version, from_state, to_state, message, request_id, create_time) "
             "VALUES ('minilm', 2, 4, 5, 'converted', 'req-1', :t)", {}),
            ("INSERT INTO assets VALUES (:sha, :content)", {"sha": "3" * 64, "content": b'{"vocab": {}}'}),
            ("INSERT INTO model_assets VALUES ('minilm', 'tokenizer.json', :sha)", {"sha": "3" * 64}),
            ("INSERT INTO model_request_stats VALUES ('minilm', 40, 1, 0.1, 0.01, :epoch, :hours, :t)",
             {"epoch": WHEN.timestamp(), "hours": json.dumps([1] * 24)}),
        ]  # fmt: skip
        for statement, values in statements:
            await connection.execute(sa.text(statement), {"t": WHEN, **values})
    await engine.dispose()


async def test_a_first_schema_database_upgrades_to_head_with_its_data(database_url: str) -> None:
    await _create_first_schema_with_data(database_url)

    store = await RegistryStore.open(database_url)  # migrates on start, as every service start does
    try:
        model = await store.get_model("minilm")
        assert model is not None
        assert (model.version, model.state, model.spec.expected_sha256) == (2, ModelState.STAGED, "ab" * 32)
        assert model.create_time == WHEN
        [event] = await store.list_events(name="minilm", limit=10)
        assert (event.from_state, event.to_state, event.message, event.request_id, event.node_id) == (
            ModelState.CONVERTING,
            ModelState.STAGED,
            "converted",
            "req-1",
            "",  # the event of the model as a whole, from before nodes existed
        )
        [asset] = await store.get_assets("minilm")
        assert (asset.name, asset.content) == ("tokenizer.json", b'{"vocab": {}}')
        [stats] = await store.statistics(["minilm"])
        assert (stats.total_requests, stats.cold_starts, stats.hour_of_day_counts) == (40, 1, [1] * 24)

        # The upgraded registry works: a new registration is stored and announced to watchers.
        handler = RegistryHandler(store)
        changes = handler.watch(include_initial=True)
        assert (await anext(changes)).change_type == ChangeType.INITIAL  # subscribed from here on
        model, created = await handler.register(
            ModelSpec(name="minilm", task=Task.EMBEDDING, source_uri="/models/minilm-v3"), load=False
        )
        assert created and model.version == 3
        change = await asyncio.wait_for(anext(changes), timeout=10)
        assert (change.change_type, change.model.version) == (ChangeType.REGISTERED, 3)
        await changes.aclose()
    finally:
        await store.close()


async def test_the_migrations_create_exactly_the_tables_the_code_uses(database_url: str) -> None:
    """A column added to schema.py without a migration would fail here, not in production."""
    store = await RegistryStore.open(database_url)
    try:
        async with store.engine.connect() as connection:
            differences = await connection.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), schema.metadata)
            )
    finally:
        await store.close()
    assert differences == []


async def test_credentials_stored_before_they_were_refused_are_masked_in_the_database(database_url: str) -> None:
    """A registry of an earlier release accepted a source URI with a password; after the upgrade no
    row holds it, and the model reads back with the credential masked."""
    leaky = ModelSpec(
        name="private", task=Task.EMBEDDING, source_uri="https://deploy:hunter2@models.internal/minilm/?rev=3"
    )
    engine = create_async_engine(database_url)
    async with engine.begin() as connection:
        await connection.run_sync(upgrade_schema, "0003")
        await connection.execute(
            sa.text("INSERT INTO models VALUES ('private', 1, 1, 1, 2, :spec, :status, :t, :t)"),
            {"spec": leaky.model_dump_json(), "status": ModelStatus().model_dump_json(), "t": WHEN},
        )
        await connection.execute(
            sa.text("INSERT INTO model_versions VALUES ('private', 1, :spec, :t)"),
            {"spec": leaky.model_dump_json(), "t": WHEN},
        )
    await engine.dispose()

    store = await RegistryStore.open(database_url)
    try:
        async with store.engine.connect() as connection:
            rows = [
                *(await connection.execute(sa.text("SELECT spec_json FROM models"))).scalars(),
                *(await connection.execute(sa.text("SELECT spec_json FROM model_versions"))).scalars(),
            ]
        assert len(rows) == 2 and not any("hunter2" in row or "deploy" in row for row in rows)
        model = await store.get_model("private")
        assert model is not None and model.spec.source_uri == "https://***@models.internal/minilm/?rev=3"
    finally:
        await store.close()
