"""The loader's core: one load per model at a time, bounded concurrency, loads admitted into the
memory budget, cancellation, timeouts, unloads that count until their memory is back, and
reconciliation of the registry's desired state with what Triton holds.

Admission (`memory.py`) and the periodic budget work (`maintenance.py`) return their decisions
(evict these, preload that); `carry_out` acts on them, so every load and every unload runs here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
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
from modelplane.loader import metrics
from modelplane.loader.budget import effective
from modelplane.loader.decisions import Decision, Preload, Unload
from modelplane.loader.errors import BudgetExceeded, LoadCancelled, LoadTimedOut, TritonUnavailable
from modelplane.loader.maintenance import BudgetMaintenance
from modelplane.loader.memory import DeviceReport, MemoryManager
from modelplane.loader.pipeline import LoadPipeline, ModelTracker
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.triton_control import TritonControl
from modelplane.loader.triton_repo import ModelRepository
from modelplane.loader.types import LoadUpdate
from modelplane.registry.client import RegistryClient
from modelplane.registry.errors import StaleTransition
from modelplane.registry.watch import ChangeType

log = structlog.get_logger()

_END = object()
_UNLOAD_MESSAGES = {
    "operator": "unloaded by an operator",
    "eviction": "evicted to make room for '{detail}'; it loads again on its next request",
    "idle": "unloaded after its idle TTL; it loads again on its next request",
    "quota": "unloaded: {detail}",
    "reconcile": "unloaded by reconciliation",
}


@dataclass(frozen=True)
class ReconcileResult:
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class LoadJob:
    """A load in flight. Every caller asking for the same model follows this one job."""

    def __init__(self, name: str, reason: str, version: int) -> None:
        self.name = name
        self.reason = reason
        self.version = version  # the model version the load started with
        self.task: asyncio.Task[Model] | None = None
        self.last = LoadProgress(phase=ModelState.REGISTERED, message="waiting for a load slot")
        self._followers: set[asyncio.Queue[object]] = set()

    def publish(self, progress: LoadProgress) -> None:
        self.last = progress
        for queue in self._followers:
            queue.put_nowait(progress)

    def say(self, message: str) -> None:
        """A progress line within the current phase (waiting for a slot or for memory)."""
        self.publish(self.last.model_copy(update={"message": message}))

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
        memory: MemoryManager | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.pipeline = pipeline
        self.triton = triton
        self.repository = repository
        # Without a way to see the backends' processes or GPUs: host memory, estimated footprints.
        self.memory = memory = memory or MemoryManager(settings, repository, processes=None, gpus=None)
        self.maintenance = BudgetMaintenance(settings, memory)
        self.jobs: dict[str, LoadJob] = {}
        self.unloads: dict[str, asyncio.Task[Model]] = {}
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
        resident = name not in self.unloads and name not in self.jobs
        if resident and model.state == ModelState.READY and not refresh and await self.triton.is_ready(name):
            yield LoadUpdate(LoadProgress(phase=ModelState.READY, message="already loaded"), done=True, model=model)
            return
        timeout = timeout_seconds or self.settings.load_timeout_seconds
        job = self._start_job(model, timeout, refresh, reason, request_id)
        while True:
            async for progress in job.follow():
                yield LoadUpdate(progress)
            assert job.task is not None
            try:
                loaded = await asyncio.shield(job.task)
                break
            except ModelplaneError as error:
                if error.reason != StaleTransition.reason or job.version >= model.version:
                    raise
                # The load this caller joined was of an older version, superseded by the one it read
                # (registered while a reconciliation or preload loaded the old one): load that one.
                log.info("load superseded; loading the new version", model=name, version=model.version)
                job = self._start_job(model, timeout, refresh, reason, request_id)
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
        job = LoadJob(model.name, reason, model.version)
        self.jobs[model.name] = job
        job.task = asyncio.create_task(self._run_job(job, model, timeout, refresh, request_id))
        job.task.add_done_callback(lambda _: self._end_job(job))
        return job

    def _start_preload(self, name: str) -> None:
        async def preload() -> None:
            try:
                async for _ in self.load(name, reason="preload"):
                    pass
            except ModelplaneError as error:
                log.info("preload not done", model=name, error=error.message)
            finally:
                await self.memory.drop_claim(name)

        task = asyncio.create_task(preload(), name=f"preload-{name}")
        self._background.append(task)
        task.add_done_callback(self._background.remove)

    def _end_job(self, job: LoadJob) -> None:
        if self.jobs.get(job.name) is job:
            del self.jobs[job.name]
        job.finish()
        if job.task is not None and not job.task.cancelled():
            job.task.exception()  # mark it retrieved: the callers that follow the job re-raise it

    async def _run_job(self, job: LoadJob, model: Model, limit_seconds: float, refresh: bool, request_id: str) -> Model:
        log.info("load started", model=model.name, reason=job.reason)
        tracker = ModelTracker(self.registry, model, request_id, job.publish)
        result = "failed"
        try:
            loaded = await self._attempts(job, tracker, limit_seconds, refresh)
            result = "loaded"
        except asyncio.CancelledError:
            result = "cancelled"
            await self._settle(tracker, "load cancelled")
            raise LoadCancelled(f"The load of '{model.name}' was cancelled.", metadata={"model": model.name}) from None
        except (TritonUnavailable, BudgetExceeded) as transient:
            # Not the package's fault: leave the model where it was; a later request, preload or
            # reconciliation tries again.
            result = "refused" if isinstance(transient, BudgetExceeded) else "failed"
            await self._settle(tracker, f"load stopped: {transient.message}")
            raise transient from None
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
        finally:
            metrics.LOADS.labels(job.reason, result).inc()
        _observe_phases(loaded)
        log.info("load finished", model=model.name, state=loaded.state.name)
        return loaded

    async def _attempts(self, job: LoadJob, tracker: ModelTracker, limit_seconds: float, refresh: bool) -> Model:
        """Runs the load, again after a timeout while the retry policy allows."""
        attempts = 1 + max(0, self.settings.load_timeout_retries)
        for attempt in range(1, attempts + 1):
            try:
                async with asyncio.timeout(limit_seconds):
                    return await self._load_once(job, tracker, refresh)
            except TimeoutError:
                if attempt < attempts:
                    log.warning("load timed out; retrying", model=job.name, attempt=attempt, of=attempts)
                    continue
                raise LoadTimedOut(
                    f"Loading '{job.name}' took longer than {limit_seconds:.0f} s"
                    + (f" in each of {attempts} attempts" if attempts > 1 else "")
                    + " and was stopped; the partial load was undone. Raise the load timeout "
                    "(MODELPLANE_LOADER_LOAD_TIMEOUT_SECONDS) for very large packages.",
                    metadata={"model": job.name},
                ) from None
        raise AssertionError("unreachable")

    async def _load_once(self, job: LoadJob, tracker: ModelTracker, refresh: bool) -> Model:
        started = time.perf_counter()
        self.memory.note_waiting(+1)
        in_slot = False
        try:
            async with self._slots:
                in_slot = True
                self.memory.note_waiting(-1)
                metrics.PHASE_SECONDS.labels("waiting").observe(time.perf_counter() - started)
                return await self._load_in_slot(job, tracker, refresh)
        finally:
            if not in_slot:
                self.memory.note_waiting(-1)

    async def _load_in_slot(self, job: LoadJob, tracker: ModelTracker, refresh: bool) -> Model:
        name = job.name
        unloading = self.unloads.get(name)
        if unloading is not None:
            job.say("waiting for the model's unload to finish")
            with contextlib.suppress(ModelplaneError):
                await asyncio.shield(unloading)
        tracker.model = await self.registry.get_model(name)
        await self.pipeline.stage(tracker, refresh=refresh)
        reservation = await self.memory.reserve(tracker.model, job.say)
        self.carry_out(reservation.evictions)
        holder = await self.memory.admit(reservation, tracker.model, job.say)
        try:
            await self.pipeline.load(tracker, measure=lambda model: self.memory.measure(holder, model))
        except BaseException:
            # The pipeline unloaded the partial load; its memory counts until the process is gone.
            holder.state = ModelState.UNLOADING
            await asyncio.shield(self._release_after_exit(name))
            raise
        await self.memory.loaded(holder)
        return tracker.model

    async def _release_after_exit(self, name: str) -> None:
        await self.memory.wait_released(name)
        await self.memory.release(name)

    async def _record_failure(self, tracker: ModelTracker, error: ModelplaneError) -> None:
        log.warning("load failed", model=tracker.model.name, reason=error.reason, error=error.message)
        try:
            tracker.model = await self.registry.transition(
                tracker.model,
                ModelState.FAILED,
                error.message,
                request_id=tracker.request_id,
                footprint_bytes=int(error.metadata.get("measured_bytes", 0)),
            )
        except ModelplaneError as stale:
            log.warning("failure not recorded", model=tracker.model.name, error=stale.message)

    async def _settle(self, tracker: ModelTracker, message: str) -> None:
        """A load that stopped short goes back to the last resting state its files support."""
        model = tracker.model
        staged = model.status.profile is not None and self.repository.entry_path(model.name).exists()
        target = (
            ModelState.STAGED
            if staged and model.state in (ModelState.LOADING, ModelState.STAGED)
            else ModelState.REGISTERED
        )
        with contextlib.suppress(ModelplaneError):
            tracker.model = await self.registry.transition(model, target, message)

    async def cancel(self, name: str) -> bool:
        job = self.jobs.get(name)
        if job is None or job.task is None or job.task.done():
            return False
        job.task.cancel()
        with contextlib.suppress(BaseException):
            await job.task
        # A cancelled load is not wanted now: reconciliation must not start it again.
        with contextlib.suppress(ModelplaneError):
            await self.registry.set_desired_state(name, DesiredState.UNLOADED)
        return True

    def carry_out(self, decisions: Sequence[Decision]) -> None:
        """Starts what admission or the periodic budget work decided."""
        for decision in decisions:
            if isinstance(decision, Unload):
                self._start_unload(decision.name, decision.reason, decision.detail)
            elif isinstance(decision, Preload):
                self._start_preload(decision.name)

    # Unloading ----------------------------------------------------------------------------

    async def unload(self, name: str, *, reason: str = "operator") -> Model:
        await self.cancel(name)
        return await asyncio.shield(self._start_unload(name, reason, ""))

    def _start_unload(self, name: str, reason: str, detail: str) -> asyncio.Task[Model]:
        """One unload per model at a time; its memory stays counted until it is released."""
        task = self.unloads.get(name)
        if task is not None and not task.done():
            return task
        self.memory.unloading(name)
        task = asyncio.create_task(self._unload(name, reason, detail), name=f"unload-{name}")
        self.unloads[name] = task
        task.add_done_callback(lambda t: self.unloads.pop(name, None) if self.unloads.get(name) is t else None)
        task.add_done_callback(lambda t: None if t.cancelled() else t.exception())
        return task

    async def _unload(self, name: str, reason: str, detail: str) -> Model:
        message = _UNLOAD_MESSAGES.get(reason, reason).format(detail=detail)
        holder = self.memory.budget.holders.get(name)
        try:
            model = await self.registry.get_model(name)
            if model.desired_state != DesiredState.UNLOADED:
                # Whatever unloaded it, the loader no longer keeps it resident: reconciliation
                # must not load it back; a request or a preload may.
                model = await self.registry.set_desired_state(name, DesiredState.UNLOADED)
            if model.state in (ModelState.READY, ModelState.LOADING):
                model = await self.registry.transition(
                    model, ModelState.UNLOADING, f"unloading: {message}", begins_operation=True
                )
                # The inference service stops routing to an UNLOADING model; requests already on
                # their way get this long to reach Triton, which finishes what it has received.
                await asyncio.sleep(self.settings.eviction_grace_seconds)
                await self.triton.unload(name)
                await self.memory.wait_released(name)
                footprint = holder.bytes if holder is not None and holder.measured else 0
                model = await self.registry.transition(model, ModelState.STAGED, message, footprint_bytes=footprint)
                if reason == "quota":
                    model = await self.registry.transition(model, ModelState.FAILED, detail)
            elif await self.triton.is_ready(name):
                await self.triton.unload(name)
                await self.memory.wait_released(name)
        finally:
            await self.memory.release(name)
        metrics.UNLOADS.labels(reason).inc()
        log.info("model unloaded", model=name, reason=reason)
        return model

    # Reconciliation ------------------------------------------------------------------------

    async def reconcile(self) -> ReconcileResult:
        """Converges Triton with the registry: loads what is wanted, unloads what is not, corrects
        states a crash or a Triton restart left untrue, and rebuilds the budget from Triton."""
        result = ReconcileResult()
        in_triton = {m.name: m for m in await self.triton.index()}
        models = {m.name: m for m in await self.registry.list_models()}
        ready = {n: models[n] for n, s in in_triton.items() if s.state == "READY" and n in models}
        await self.memory.sync_with_triton(ready, busy=set(self.jobs) | set(self.unloads))
        to_load = []
        for name, model in models.items():
            if name in self.jobs or name in self.unloads:
                continue
            stale = model.state in WORKING_STATES or (model.state == ModelState.READY and name not in ready)
            wanted = model.desired_state == DesiredState.LOADED
            if model.state in WORKING_STATES or (stale and not wanted):
                # Work that no job of this loader is doing was cut off (this loader or Triton was
                # killed): back to where its files allow, so a new load starts from a true state.
                target = ModelState.STAGED if model.status.profile is not None else ModelState.REGISTERED
                cut = f"{model.state.name.lower()} was interrupted" if model.state in WORKING_STATES else ""
                with contextlib.suppress(ModelplaneError):
                    model = await self.registry.transition(
                        model, target, f"{cut or 'not loaded in Triton'} (found by reconciliation)"
                    )
            if wanted and (model.state != ModelState.READY or stale):
                if model.state == ModelState.FAILED:
                    continue  # a failure needs a person; an explicit load retries it
                to_load.append(model)
        # Most important first, so a smaller budget after a restart keeps what matters.
        for model in sorted(to_load, key=self._restore_order):
            self._start_job(model, self.settings.load_timeout_seconds, False, "reconcile", "")
            result.loaded.append(model.name)
        for name, state in in_triton.items():
            wanted = models.get(name)
            unwanted = wanted is None or wanted.desired_state != DesiredState.LOADED
            if state.state == "READY" and unwanted and name not in self.jobs and name not in self.unloads:
                if wanted is None:  # not in the catalogue at all: nothing to record
                    await self.triton.unload(name)
                else:
                    await self._start_unload(name, "reconcile", "")
                result.unloaded.append(name)
            if wanted is None:
                self.repository.remove(name)
        if result.loaded or result.unloaded:
            log.info("reconciled", loaded=result.loaded, unloaded=result.unloaded)
        return result

    def _restore_order(self, model: Model) -> tuple[int, float]:
        stats = self.memory.statistics.get(model.name)
        last = stats.last_request_time.timestamp() if stats and stats.last_request_time else 0.0
        return (int(effective(model.spec.priority)), -last)

    async def _reconcile_quietly(self) -> None:
        try:
            await self.reconcile()
        except ModelplaneError as error:
            log.warning("reconciliation postponed", error=error.message)

    # Budget ---------------------------------------------------------------------------------

    async def budget(self) -> tuple[list[DeviceReport], int]:
        if not self.memory.budget.devices:
            await self.memory.refresh_devices()
        return self.memory.report(), self.memory.waiting

    async def _maintain_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.statistics_interval_seconds)
            try:
                statistics = await self.registry.statistics()
                models = await self.registry.list_models() if self.settings.preload else []
                decisions = await self.maintenance.decide(
                    statistics,
                    models,
                    loads_running=len(self.jobs),
                    preloading=any(job.reason == "preload" for job in self.jobs.values()),
                )
                self.carry_out(decisions)
            except ModelplaneError as error:
                log.warning("budget maintenance postponed", error=error.message)

    # Background work -----------------------------------------------------------------------

    def start_background(self) -> None:
        self._background = [
            asyncio.create_task(self._watch_registry(), name="watch-registry"),
            asyncio.create_task(self._watch_triton(), name="watch-triton"),
            asyncio.create_task(self._maintain_forever(), name="maintain-budget"),
        ]

    async def stop_background(self) -> None:
        tasks = [*self._background, *(j.task for j in self.jobs.values() if j.task), *self.unloads.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

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
            return
        self.memory.update_spec(model)
        if (
            change_type == ChangeType.REGISTERED
            and model.desired_state == DesiredState.LOADED
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


def _observe_phases(model: Model) -> None:
    phases = {d.phase for d in model.status.phase_durations}
    for duration in model.status.phase_durations:
        metrics.PHASE_SECONDS.labels(duration.phase.name.lower()).observe(duration.duration.total_seconds())
    metrics.CACHE_LOOKUPS.labels("package", "miss" if ModelState.FETCHING in phases else "hit").inc()
    metrics.CACHE_LOOKUPS.labels("artifact", "miss" if ModelState.CONVERTING in phases else "hit").inc()
