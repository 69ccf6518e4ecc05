"""The loader's core: one load per model at a time, bounded concurrency, cancellation, timeouts,
and reconciliation of the registry's desired state with what Triton holds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog

from modelplane.common.errors import Internal, ModelplaneError
from modelplane.common.types import (
    WORKING_STATES,
    DesiredState,
    LoadProgress,
    Model,
    ModelState,
)
from modelplane.loader.errors import LoadCancelled, LoadTimedOut, TritonUnavailable
from modelplane.loader.pipeline import LoadPipeline, ModelTracker
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.triton_control import TritonControl
from modelplane.loader.triton_repo import ModelRepository
from modelplane.loader.types import LoadUpdate
from modelplane.registry.client import RegistryClient
from modelplane.registry.watch import ChangeType

log = structlog.get_logger()

_END = object()


@dataclass(frozen=True)
class ReconcileResult:
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class LoadJob:
    """A load in flight. Every caller asking for the same model follows this one job."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.task: asyncio.Task[Model] | None = None
        self.last = LoadProgress(phase=ModelState.REGISTERED, message="waiting for a load slot")
        self._followers: set[asyncio.Queue[object]] = set()

    def publish(self, progress: LoadProgress) -> None:
        self.last = progress
        for queue in self._followers:
            queue.put_nowait(progress)

    def finish(self) -> None:
        for queue in self._followers:
            queue.put_nowait(_END)

    async def follow(self) -> AsyncIterator[LoadProgress]:
        queue: asyncio.Queue[object] = asyncio.Queue()
        self._followers.add(queue)
        try:
            yield self.last
            if self.task is not None and self.task.done():
                return
            while (item := await queue.get()) is not _END:
                assert isinstance(item, LoadProgress)
                yield item
        finally:
            self._followers.discard(queue)


class LoaderHandler:
    def __init__(
        self,
        settings: LoaderSettings,
        registry: RegistryClient,
        pipeline: LoadPipeline,
        triton: TritonControl,
        repository: ModelRepository,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.pipeline = pipeline
        self.triton = triton
        self.repository = repository
        self.jobs: dict[str, LoadJob] = {}
        self._slots = asyncio.Semaphore(settings.max_concurrent_loads)
        self._background: list[asyncio.Task[None]] = []

    # Loading ------------------------------------------------------------------------------

    async def load(
        self,
        name: str,
        *,
        timeout_seconds: float | None = None,
        refresh: bool = False,
        reason: str = "operator",
        request_id: str = "",
    ) -> AsyncIterator[LoadUpdate]:
        """Progress of the model's load, ending with a done update; raises what the load raised."""
        model = await self.registry.get_model(name)
        if model.desired_state != DesiredState.LOADED:
            model = await self.registry.set_desired_state(name, DesiredState.LOADED)
        if model.state == ModelState.READY and not refresh and await self.triton.is_ready(name):
            yield LoadUpdate(LoadProgress(phase=ModelState.READY, message="already loaded"), done=True, model=model)
            return
        job = self._start_job(model, timeout_seconds or self.settings.load_timeout_seconds, refresh, reason, request_id)
        async for progress in job.follow():
            yield LoadUpdate(progress)
        assert job.task is not None
        loaded = await asyncio.shield(job.task)
        yield LoadUpdate(
            LoadProgress(phase=loaded.state, message=loaded.status.reason),
            done=True,
            model=loaded,
            phase_durations=loaded.status.phase_durations,
        )

    def _start_job(self, model: Model, timeout: float, refresh: bool, reason: str, request_id: str) -> LoadJob:
        job = self.jobs.get(model.name)
        if job is not None:
            return job
        job = LoadJob(model.name)
        self.jobs[model.name] = job
        job.task = asyncio.create_task(self._run_job(job, model, timeout, refresh, reason, request_id))
        job.task.add_done_callback(lambda _: self._end_job(job))
        return job

    def _end_job(self, job: LoadJob) -> None:
        if self.jobs.get(job.name) is job:
            del self.jobs[job.name]
        job.finish()
        if job.task is not None and not job.task.cancelled():
            job.task.exception()  # mark it retrieved: the callers that follow the job re-raise it

    async def _run_job(
        self, job: LoadJob, model: Model, limit_seconds: float, refresh: bool, reason: str, request_id: str
    ) -> Model:
        log.info("load started", model=model.name, reason=reason)
        tracker = ModelTracker(self.registry, model, request_id, job.publish)
        try:
            async with asyncio.timeout(limit_seconds):
                async with self._slots:
                    tracker.model = await self.registry.get_model(model.name)
                    loaded = await self.pipeline.run(tracker, refresh=refresh)
        except TimeoutError:
            error: ModelplaneError = LoadTimedOut(
                f"Loading '{model.name}' took longer than {limit_seconds:.0f} s and was stopped; the partial load was "
                "undone. Raise the load timeout (MODELPLANE_LOADER_LOAD_TIMEOUT_SECONDS) for very large packages.",
                metadata={"model": model.name},
            )
            await self._record_failure(tracker, error)
            raise error from None
        except asyncio.CancelledError:
            await self._settle_cancelled(tracker)
            raise LoadCancelled(f"The load of '{model.name}' was cancelled.", metadata={"model": model.name}) from None
        except TritonUnavailable as unavailable:
            # Not the package's fault: leave the model where it was; reconciliation retries.
            await self._settle_cancelled(tracker)
            raise unavailable from None
        except ModelplaneError as refused:
            await self._record_failure(tracker, refused)
            raise
        except Exception as crash:
            log.exception("load crashed", model=model.name)
            error = Internal(
                f"Loading '{model.name}' failed unexpectedly ({type(crash).__name__}); see the loader log."
            )
            await self._record_failure(tracker, error)
            raise error from crash
        log.info("load finished", model=model.name, state=loaded.state.name)
        return loaded

    async def _record_failure(self, tracker: ModelTracker, error: ModelplaneError) -> None:
        log.warning("load failed", model=tracker.model.name, reason=error.reason, error=error.message)
        try:
            tracker.model = await self.registry.transition(
                tracker.model, ModelState.FAILED, error.message, request_id=tracker.request_id
            )
        except ModelplaneError as stale:
            log.warning("failure not recorded", model=tracker.model.name, error=stale.message)

    async def _settle_cancelled(self, tracker: ModelTracker) -> None:
        """A cancelled load goes back to the last resting state its files support."""
        model = tracker.model
        staged = model.status.profile is not None and self.repository.entry_path(model.name).exists()
        target = (
            ModelState.STAGED
            if staged and model.state in (ModelState.LOADING, ModelState.STAGED)
            else ModelState.REGISTERED
        )
        if model.state == target:
            return
        with contextlib.suppress(ModelplaneError):
            tracker.model = await self.registry.transition(model, target, "load cancelled")

    async def cancel(self, name: str) -> bool:
        job = self.jobs.get(name)
        if job is None or job.task is None or job.task.done():
            return False
        job.task.cancel()
        with contextlib.suppress(BaseException):
            await job.task
        return True

    # Unloading ----------------------------------------------------------------------------

    async def unload(self, name: str, *, reason: str = "operator") -> Model:
        await self.cancel(name)
        model = await self.registry.get_model(name)
        if reason == "operator" and model.desired_state != DesiredState.UNLOADED:
            model = await self.registry.set_desired_state(name, DesiredState.UNLOADED)
        if model.state in (ModelState.READY, ModelState.LOADING):
            model = await self.registry.transition(
                model, ModelState.UNLOADING, f"unloading ({reason})", begins_operation=True
            )
            await self.triton.unload(name)
            model = await self.registry.transition(model, ModelState.STAGED, f"unloaded ({reason})")
        elif await self.triton.is_ready(name):
            await self.triton.unload(name)
        log.info("model unloaded", model=name, reason=reason)
        return model

    # Reconciliation ------------------------------------------------------------------------

    async def reconcile(self) -> ReconcileResult:
        """Converges Triton with the registry: loads what is wanted, unloads what is not, and
        corrects states a crash or a Triton restart left untrue."""
        result = ReconcileResult()
        in_triton = {m.name: m for m in await self.triton.index()}
        models = {m.name: m for m in await self.registry.list_models()}
        for name, model in models.items():
            if name in self.jobs:
                continue
            ready_in_triton = in_triton.get(name) is not None and in_triton[name].state == "READY"
            stale = model.state in WORKING_STATES or (model.state == ModelState.READY and not ready_in_triton)
            if model.desired_state == DesiredState.LOADED and (model.state != ModelState.READY or stale):
                if model.state == ModelState.FAILED:
                    continue  # a failure needs a person; an explicit load retries it
                self._start_job(model, self.settings.load_timeout_seconds, False, "reconcile", "")
                result.loaded.append(name)
            elif stale:
                target = ModelState.STAGED if model.status.profile is not None else ModelState.REGISTERED
                with contextlib.suppress(ModelplaneError):
                    await self.registry.transition(model, target, "not loaded in Triton (found by reconciliation)")
        for name, state in in_triton.items():
            wanted = models.get(name)
            unwanted = wanted is None or wanted.desired_state != DesiredState.LOADED
            if state.state == "READY" and unwanted and name not in self.jobs:
                await self.triton.unload(name)
                result.unloaded.append(name)
            if wanted is None:
                self.repository.remove(name)
        if result.loaded or result.unloaded:
            log.info("reconciled", loaded=result.loaded, unloaded=result.unloaded)
        return result

    async def _reconcile_quietly(self) -> None:
        try:
            await self.reconcile()
        except ModelplaneError as error:
            log.warning("reconciliation postponed", error=error.message)

    # Background work -----------------------------------------------------------------------

    def start_background(self) -> None:
        self._background = [
            asyncio.create_task(self._watch_registry(), name="watch-registry"),
            asyncio.create_task(self._watch_triton(), name="watch-triton"),
        ]

    async def stop_background(self) -> None:
        for task in self._background:
            task.cancel()
        for job in list(self.jobs.values()):
            if job.task is not None:
                job.task.cancel()
        await asyncio.gather(*self._background, *(j.task for j in self.jobs.values() if j.task), return_exceptions=True)

    async def _watch_registry(self) -> None:
        backoff = 0.5
        while True:
            try:
                async for change in self.registry.watch(include_initial=False):
                    backoff = 0.5
                    await self._on_change(change.change_type, change.model)
            except ModelplaneError as error:
                log.warning("registry watch interrupted; reconnecting", error=error.message, in_seconds=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
            await self._reconcile_quietly()

    async def _on_change(self, change_type: ChangeType, model: Model) -> None:
        if change_type == ChangeType.DELETED:
            with contextlib.suppress(ModelplaneError):
                await self.triton.unload(model.name)
            await asyncio.to_thread(self.repository.remove, model.name)
        elif (
            model.desired_state == DesiredState.LOADED
            and model.state == ModelState.REGISTERED
            and model.name not in self.jobs
        ):
            self._start_job(model, self.settings.load_timeout_seconds, False, "registered", "")

    async def _watch_triton(self) -> None:
        """Reconciles at start, whenever Triton comes back after being gone, and periodically."""
        was_live = False
        since_reconcile = float("inf")
        while True:
            live = await self.triton.is_live()
            if live and (not was_live or since_reconcile >= self.settings.reconcile_interval_seconds):
                if not was_live:
                    log.info("triton is live; reconciling")
                await self._reconcile_quietly()
                since_reconcile = 0.0
            if was_live and not live:
                log.warning("triton is gone; models will be reloaded when it is back")
            was_live = live
            await asyncio.sleep(1.0)
            since_reconcile += 1.0
