"""`modelplane up` loads the bundled models at once: what serves is announced as soon as it is
READY, what is still coming with an estimate, and a last line when all are. The loader here is
scripted (its real streams are exercised by tests/integration, whose stack starts this way)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

from modelplane.common.errors import ModelplaneError
from modelplane.common.types import LoadProgress, Model, ModelFormat, ModelSpec, ModelState, PhaseDuration, Task
from modelplane.loader.types import LoadUpdate
from modelplane.startup import FIRST_TRITON_LOAD_SECONDS, BundledLoad, BundledLoads

EMBEDDER = Model(spec=ModelSpec(name="embedder", task=Task.EMBEDDING))
CHAT = Model(spec=ModelSpec(name="chat", task=Task.GENERATION, format=ModelFormat.GGUF))


class ScriptedLoader:
    """Each model's load: (phase, seconds in it) in turn, then READY or a failure."""

    def __init__(self, script: dict[str, list[tuple[ModelState, float]]], failing: set[str] = frozenset()) -> None:
        self.script = script
        self.failing = failing

    async def load(self, name: str, **_: object) -> AsyncIterator[LoadUpdate]:
        for phase, seconds in self.script[name]:
            yield LoadUpdate(progress=LoadProgress(phase=phase))
            await asyncio.sleep(seconds)
        if name in self.failing:
            raise ModelplaneError(f"Model '{name}' could not be converted.")
        model = Model(spec=ModelSpec(name=name), status={"state": ModelState.READY})
        yield LoadUpdate(progress=LoadProgress(phase=ModelState.READY), done=True, model=model)


async def test_the_first_ready_model_is_announced_while_the_slow_one_is_still_coming() -> None:
    lines: list[str] = []
    announced: list[list[str]] = []
    coming: list[str] = []

    def on_serving(loads: list[BundledLoad]) -> None:
        lines.append("SERVING")
        announced.append([load.name for load in loads if load.ready_after is not None])
        coming.extend(load.describe(0.0) for load in loads if load.coming)

    loader = ScriptedLoader(
        {
            "embedder": [(ModelState.FETCHING, 0.01), (ModelState.LOADING, 0.01)],
            "chat": [(ModelState.FETCHING, 0.01), (ModelState.CONVERTING, 0.3)],
        }
    )
    loads = await BundledLoads(loader, lines.append, on_serving).run([EMBEDDER, CHAT])  # type: ignore[arg-type]

    assert announced == [["embedder"]]
    ready_embedder = next(i for i, line in enumerate(lines) if line.startswith("  ready:  embedder"))
    assert lines[ready_embedder + 1] == "SERVING"
    assert len(coming) == 1 and coming[0].startswith("chat (chat and completions): converting, about ")
    assert lines[-1].startswith("  ready:  chat (chat and completions): ready, ")
    assert "embedder (embeddings and rerank): ready, " in lines[ready_embedder]
    assert [load.ready_after is not None for load in loads] == [True, True]


async def test_a_failed_load_is_reported_and_does_not_stop_the_others() -> None:
    lines: list[str] = []
    loader = ScriptedLoader(
        {"embedder": [(ModelState.LOADING, 0.01)], "chat": [(ModelState.CONVERTING, 0.01)]}, failing={"chat"}
    )
    loads = await BundledLoads(loader, lines.append, lambda _: lines.append("SERVING")).run([EMBEDDER, CHAT])  # type: ignore[arg-type]
    assert "  failed: chat (chat and completions): FAILED: Model 'chat' could not be converted." in lines
    assert lines.count("SERVING") == 1
    assert loads[0].ready_after is not None and loads[1].failure


def test_an_estimate_comes_from_the_previous_load_and_counts_down() -> None:
    previous = Model(
        spec=EMBEDDER.spec,
        status={
            "phase_durations": [
                PhaseDuration(phase=ModelState.FETCHING, duration=timedelta(seconds=4)),
                PhaseDuration(phase=ModelState.CONVERTING, duration=timedelta(seconds=40)),
                PhaseDuration(phase=ModelState.LOADING, duration=timedelta(seconds=6)),
            ]
        },
    )
    load = BundledLoad(previous, started=0.0, phase=ModelState.CONVERTING, phase_since=10.0)
    assert load.remaining_seconds(now=25.0) == 25.0 + 6.0  # 15 of 40 s converting done, then loading
    assert load.remaining_seconds(now=100.0) == 1.0 + 6.0  # late: at least a second of this phase left
    assert load.describe(25.0) == "embedder (embeddings and rerank): converting, about 31 s more"


def test_a_first_load_is_estimated_from_the_package_size_and_its_format() -> None:
    fetching = LoadProgress(phase=ModelState.FETCHING, bytes_done=50_000_000, bytes_total=200_000_000)
    load = BundledLoad(CHAT, started=0.0, phase=ModelState.FETCHING, phase_since=0.0, progress=fetching)
    # A quarter fetched in 2 s: 6 s more of it; a GGUF is not converted; then Triton's load.
    assert load.remaining_seconds(now=2.0) == 6.0 + FIRST_TRITON_LOAD_SECONDS


class ScriptedRegistry:
    """On a fleet the placer places and the registry derives each model's state over its copies:
    each model's states in turn, one per poll, the last one repeated."""

    def __init__(self, script: dict[str, list[Model]]) -> None:
        self.script = script

    async def get_model(self, name: str) -> Model:
        states = self.script[name]
        return states.pop(0) if len(states) > 1 else states[0]


def _in(model: Model, state: ModelState, reason: str = "") -> Model:
    return Model(spec=model.spec, status={"state": state, "reason": reason})


async def test_on_a_fleet_the_loads_are_followed_in_the_registry_not_asked_of_one_loader() -> None:
    lines: list[str] = []
    registry = ScriptedRegistry(
        {
            "embedder": [
                _in(EMBEDDER, ModelState.REGISTERED),
                _in(EMBEDDER, ModelState.LOADING),
                _in(EMBEDDER, ModelState.READY),
            ],
            "chat": [_in(CHAT, ModelState.FETCHING), _in(CHAT, ModelState.FAILED, "does not fit on node node-1")],
        }
    )
    loader = ScriptedLoader({})  # asked nothing: a KeyError if it were
    loads = await BundledLoads(
        loader,  # type: ignore[arg-type]
        lines.append,
        lambda _: lines.append("SERVING"),
        registry=registry,  # type: ignore[arg-type]
        poll_seconds=0.01,
    ).run([EMBEDDER, CHAT])
    assert loads[0].ready_after is not None
    assert loads[1].failure == "does not fit on node node-1"
    assert lines.count("SERVING") == 1


async def test_on_a_fleet_a_model_never_ready_is_reported_at_the_limit() -> None:
    registry = ScriptedRegistry({"embedder": [_in(EMBEDDER, ModelState.LOADING)]})
    (load,) = await BundledLoads(
        ScriptedLoader({}),  # type: ignore[arg-type]
        lambda _: None,
        lambda _: None,
        registry=registry,  # type: ignore[arg-type]
        poll_seconds=0.01,
        limit_seconds=0.05,
    ).run([EMBEDDER])
    assert load.failure.startswith("not READY on any node within 0 s")
