"""`modelplane up` loads the bundled models all at once and says, as it goes, what serves already
and what is still coming, with an estimate: embeddings serve as soon as their model is READY,
while a slower model (a conversion, a large file) finishes in the background.

An estimate comes from the model's previous load (the registry keeps each phase's duration), and
before any load from what a first load takes on a two-core machine, scaled by the package's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from modelplane.common.errors import ModelplaneError
from modelplane.common.types import LoadProgress, Model, ModelFormat, ModelState, Task
from modelplane.loader.client import LoaderClient
from modelplane.registry.client import RegistryClient

# What the phases of a first load take on a two-core machine (scripts/first_run.sh measures them),
# until a model's own previous load says better.
FIRST_FETCH_BYTES_PER_SECOND = 200e6
FIRST_CONVERT_SECONDS = 60.0  # a Hugging Face encoder exported to ONNX and checked against PyTorch
FIRST_TRITON_LOAD_SECONDS = 10.0
PHASES = (ModelState.FETCHING, ModelState.VERIFYING, ModelState.CONVERTING, ModelState.LOADING)
TASK_NAMES = {
    Task.EMBEDDING: "embeddings",
    Task.RERANK: "rerank",
    Task.GENERATION: "chat and completions",
}
REPORT_EVERY_SECONDS = 30.0


@dataclass
class BundledLoad:
    """One bundled model on its way to READY."""

    model: Model  # as registered: its previous load's phase durations, if any
    started: float
    phase: ModelState = ModelState.REGISTERED
    phase_since: float = 0.0
    progress: LoadProgress | None = None
    ready_after: float | None = None
    failure: str = ""

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def what(self) -> str:
        serves = TASK_NAMES.get(self.model.spec.task, self.model.spec.task.name.lower())
        return f"{serves} and rerank" if self.model.spec.task == Task.EMBEDDING else serves

    @property
    def coming(self) -> bool:
        return self.ready_after is None and not self.failure

    def expected_seconds(self) -> dict[ModelState, float]:
        """How long each phase should take: as last time, or as a first load does."""
        previous = {d.phase: d.duration.total_seconds() for d in self.model.status.phase_durations}
        if previous:
            return previous
        size = self.progress.bytes_total if self.progress and self.progress.bytes_total else 0
        converts = self.model.spec.format not in (ModelFormat.GGUF, ModelFormat.ONNX, ModelFormat.TENSORRT_PLAN)
        return {
            ModelState.FETCHING: size / FIRST_FETCH_BYTES_PER_SECOND,
            ModelState.CONVERTING: FIRST_CONVERT_SECONDS if converts else 0.0,
            ModelState.LOADING: FIRST_TRITON_LOAD_SECONDS,
        }

    def remaining_seconds(self, now: float) -> float:
        """Seconds until READY: what is left of this phase (at least a second) and the phases after."""
        expected = self.expected_seconds()
        current = self.phase if self.phase in PHASES else ModelState.FETCHING
        later = PHASES[PHASES.index(current) + 1 :]
        if self.phase not in PHASES:  # not started: every phase is still to come
            return sum(expected.get(p, 0.0) for p in PHASES)
        left = max(1.0, expected.get(current, 0.0) - (now - self.phase_since))
        if current == ModelState.FETCHING and self.progress and self.progress.bytes_total:
            done = self.progress.bytes_done / self.progress.bytes_total
            elapsed = now - self.phase_since
            if 0 < done < 1:
                left = max(1.0, elapsed / done - elapsed)
        return left + sum(expected.get(p, 0.0) for p in later)

    def describe(self, now: float) -> str:
        if self.failure:
            return f"{self.name} ({self.what}): FAILED: {self.failure}"
        if self.ready_after is not None:
            return f"{self.name} ({self.what}): ready, {self.ready_after:.0f} s after start"
        phase = self.phase.name.lower() if self.phase in PHASES else "waiting for a load slot"
        return f"{self.name} ({self.what}): {phase}, about {self.remaining_seconds(now):.0f} s more"


@dataclass
class BundledLoads:
    """Loads every bundled model at once through the loader, and reports. `on_serving` is called
    once, when the first model is READY (or when every load has ended without one)."""

    loader: LoaderClient
    say: Callable[[str], None]
    on_serving: Callable[[list[BundledLoad]], None]
    clock: Callable[[], float] = time.monotonic
    # On a fleet the placer decides where each model runs: the loads are followed in the registry
    # (the model's state over its copies) instead of asked of one loader.
    registry: RegistryClient | None = None
    poll_seconds: float = 0.5
    limit_seconds: float = 1800.0
    loads: list[BundledLoad] = field(default_factory=list)
    _serving: bool = False

    async def run(self, models: list[Model], started: float | None = None) -> list[BundledLoad]:
        """Loads `models`; times are counted from `started` (the stack's start), or from now."""
        started = self.clock() if started is None else started
        now = self.clock()
        self.loads = [BundledLoad(model, started, phase_since=now) for model in models]
        reporter = asyncio.create_task(self._report_periodically())
        try:
            await asyncio.gather(*(self._load(load) for load in self.loads))
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        self._serve()
        return self.loads

    async def _load(self, load: BundledLoad) -> None:
        try:
            if self.registry is None:
                await self._load_here(load)
            else:
                await self._follow_placement(load, self.registry)
        except ModelplaneError as error:
            load.failure = error.message
        if load.ready_after is None and not load.failure:
            load.failure = "the load ended without the model READY; see `modelplane models events " + load.name + "`"
        now = self.clock()
        self.say(f"  {'failed:' if load.failure else 'ready: '} {load.describe(now)}")
        if load.failure or not self._serve():  # the first to serve prints what is coming with the URL
            self._say_coming(now)

    async def _load_here(self, load: BundledLoad) -> None:
        async for update in self.loader.load(load.name, reason="bundled", timeout_seconds=self.limit_seconds):
            load.progress = update.progress
            self._enter(load, update.progress.phase)
            if update.done and update.model is not None and update.model.state == ModelState.READY:
                load.ready_after = self.clock() - load.started

    async def _follow_placement(self, load: BundledLoad, registry: RegistryClient) -> None:
        deadline = self.clock() + self.limit_seconds
        while self.clock() < deadline:
            model = await registry.get_model(load.name)
            self._enter(load, model.state)
            if model.state == ModelState.READY:
                load.ready_after = self.clock() - load.started
                return
            if model.state == ModelState.FAILED:
                load.failure = model.status.reason or "FAILED on every node it was placed on"
                return
            await asyncio.sleep(self.poll_seconds)
        load.failure = f"not READY on any node within {self.limit_seconds:.0f} s; see `modelplane models ls`"

    def _enter(self, load: BundledLoad, phase: ModelState) -> None:
        if phase != load.phase and phase in PHASES:
            load.phase, load.phase_since = phase, self.clock()

    def _serve(self) -> bool:
        """Announces that the stack serves, once; True when this call did."""
        if self._serving:
            return False
        self._serving = True
        self.on_serving(self.loads)
        return True

    def _say_coming(self, now: float) -> None:
        for load in self.loads:
            if load.coming:
                self.say(f"  coming: {load.describe(now)}")

    async def _report_periodically(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY_SECONDS)
            self._say_coming(self.clock())
