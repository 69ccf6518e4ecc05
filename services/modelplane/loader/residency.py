"""One node's residency: which models this node's Triton holds, and the only place that changes it.

`NodeResidency` runs every load and every unload of this node, one operation per model at a time,
loads within a bounded number of slots, each admitted into the memory budget (the evictions that
admission names are carried out here too), with cancellation and timeouts, and unloads whose
memory counts until it is really back. It is the only writer of this node's model states, and it
writes them through one narrow interface, `StateWriter` (states.py): today the registry's model
transition; with placements (issue 17), this node's placement transition.

What the other parts decide (admission's evictions, the periodic budget work, reconciliation, the
registry watch) reaches it as decisions (decisions.py), carried out by `carry_out`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from datetime import timedelta

import structlog

from modelplane.common.errors import Internal, ModelplaneError
from modelplane.common.types import (
    DesiredState,
    LoadProgress,
    Model,
    ModelState,
    PhaseDuration,
)
from modelplane.loader import metrics
from modelplane.loader.decisions import Decision, Discard, Load, Preload, Reset, Unload
from modelplane.loader.errors import (
    BudgetExceeded,
    LoadCancelled,
    LoadTimedOut,
    PreloadStoodDown,
    TritonUnavailable,
)
from modelplane.loader.memory import MemoryManager
from modelplane.loader.pipeline import LoadPipeline, ModelTracker
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.states import ShadowStates, StateWriter
from modelplane.loader.triton_control import TritonControl
from modelplane.loader.triton_repo import BuiltEntry, ModelRepository
from modelplane.loader.types import LoadUpdate
from modelplane.registry.client import RegistryClient
from modelplane.registry.errors import StaleTransition

log = structlog.get_logger()

_END = object()
_UNLOAD_MESSAGES = {
    "operator": "unloaded by an operator",
    "eviction": "evicted to make room for '{detail}'; it loads again on its next request",
    "idle": "unloaded after its idle TTL; it loads again on its next request",
    "quota": "unloaded: {detail}",
    "reconcile": "unloaded by reconciliation",
}


class LoadJob:
    """A load in flight. Every caller asking for the same model follows this one job."""

    def __init__(self, name: str, reason: str, version: int, *, refresh: bool = False) -> None:
        self.name = name
        self.reason = reason
        self.version = version  # the model version the load started with
        self.refresh = refresh  # it fetches and verifies again, whatever the cache holds
        # The served model a refresh replaces while it stays in service (set once the job finds
        # Triton serving it): failures leave it as it is rather than reset it.
        self.served: Model | None = None
        self.phase_durations: list[PhaseDuration] = []  # of this load, when not the registry's
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


class NodeResidency:
    def __init__(
        self,
        settings: LoaderSettings,
        registry: RegistryClient,
        states: StateWriter,
        pipeline: LoadPipeline,
        triton: TritonControl,
        repository: ModelRepository,
        memory: MemoryManager,
    ) -> None:
        self.settings = settings
        self.registry = registry  # read only: every write goes through `states`
        self.states = states
        self.pipeline = pipeline
        self.triton = triton
        self.repository = repository
        self.memory = memory
        self.jobs: dict[str, LoadJob] = {}
        self.unloads: dict[str, asyncio.Task[Model]] = {}
        self._slots = asyncio.Semaphore(settings.max_concurrent_loads)
        self._chores: set[asyncio.Task[None]] = set()

    def busy(self) -> set[str]:
        """The models with a load or an unload in flight."""
        return set(self.jobs) | set(self.unloads)

    def preloading(self) -> bool:
        return any(job.reason == "preload" for job in self.jobs.values())

    # Decisions ------------------------------------------------------------------------------

    async def carry_out(self, decisions: Sequence[Decision]) -> list[asyncio.Task[Model]]:
        """Carries out decisions in order and returns the loads and unloads it started (each
        runs on its own). A Reset or a Discard is done before the next decision. What
        reconciliation decided stands down for a model whose load began since it looked."""
        started: list[asyncio.Task[Model]] = []
        reset: dict[str, Model] = {}  # what a Reset wrote, for a Load of the same model that follows
        for decision in decisions:
            if isinstance(decision, Unload):
                if decision.reason == "reconcile" and decision.name in self.jobs:
                    continue
                started.append(self._start_unload(decision.name, decision.reason, decision.detail))
            elif isinstance(decision, Load):
                model = reset.get(decision.model.name, decision.model)
                job = self._start_job(model, self.settings.load_timeout_seconds, False, decision.reason, "")
                assert job.task is not None
                started.append(job.task)
            elif isinstance(decision, Preload):
                self._start_preload(decision.name)
            elif isinstance(decision, Reset):
                if decision.model.name in self.busy():
                    continue
                with contextlib.suppress(ModelplaneError):
                    reset[decision.model.name] = await self.states.transition(
                        decision.model, decision.to_state, decision.message
                    )
            elif isinstance(decision, Discard):
                await self._discard(decision)
        return started

    async def _discard(self, discard: Discard) -> None:
        if discard.unload:
            try:
                await self.triton.unload(discard.name)
            except ModelplaneError as error:
                log.warning("unload of an unknown model failed", model=discard.name, error=error.message)
        if discard.remove_entry:
            await asyncio.to_thread(self.repository.remove, discard.name)

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
            model = await self.states.wish(name, DesiredState.LOADED)
        resident = name not in self.unloads and name not in self.jobs
        if resident and model.state == ModelState.READY and not refresh and await self.triton.is_ready(name):
            yield LoadUpdate(LoadProgress(phase=ModelState.READY, message="already loaded"), done=True, model=model)
            return
        timeout = timeout_seconds or self.settings.load_timeout_seconds
        while True:
            under_way = self.jobs.get(name)
            if refresh and under_way is not None and not under_way.refresh:
                # A refresh fetches again: it never rides on a load that takes the cached package.
                message = "waiting for the load under way to end, then refreshing"
                yield LoadUpdate(under_way.last.model_copy(update={"message": message}))
                assert under_way.task is not None
                await asyncio.wait([under_way.task])
                continue
            job = self._start_job(model, timeout, refresh, reason, request_id)
            async for progress in job.follow():
                yield LoadUpdate(progress)
            assert job.task is not None
            try:
                loaded = await asyncio.shield(job.task)
                break
            except ModelplaneError as error:
                if error.reason == PreloadStoodDown.reason and reason != "preload":
                    continue  # the preload this caller joined stood down; this caller's load goes on
                if error.reason != StaleTransition.reason or job.version >= model.version:
                    raise
                # The load this caller joined was of an older version, superseded by the one it read
                # (registered while a reconciliation or preload loaded the old one): load that one.
                log.info("load superseded; loading the new version", model=name, version=model.version)
        yield LoadUpdate(
            LoadProgress(phase=loaded.state, message=loaded.status.reason),
            done=True,
            model=loaded,
            phase_durations=job.phase_durations or loaded.status.phase_durations,
        )

    def _start_job(self, model: Model, timeout: float, refresh: bool, reason: str, request_id: str) -> LoadJob:
        job = self.jobs.get(model.name)
        if job is not None:
            return job
        job = LoadJob(model.name, reason, model.version, refresh=refresh)
        self._begin(job, self._run_job(job, model, timeout, refresh, request_id))
        return job

    def _begin(self, job: LoadJob, work: Coroutine[object, object, Model]) -> None:
        """Registers the job at once, so that every operation on the model sees it, then runs it."""
        self.jobs[job.name] = job
        job.task = asyncio.create_task(work, name=f"{job.reason}-{job.name}")
        job.task.add_done_callback(lambda _: self._end_job(job))

    def _start_preload(self, name: str) -> None:
        """A preload only takes an idle moment: it stands down for any load or unload of the model
        under way (an operator's unload among them), and for a model an operator holds unloaded."""
        if name in self.busy():
            self._chore(self.memory.drop_claim(name))
            return
        job = LoadJob(name, "preload", 0)
        self._begin(job, self._run_preload(job))

    async def _run_preload(self, job: LoadJob) -> Model:
        try:
            model = await self.registry.get_model(job.name)
            if model.desired_state == DesiredState.HELD_UNLOADED:
                raise PreloadStoodDown(
                    f"Model '{job.name}' was unloaded by an operator; it is not preloaded until an operator or a "
                    "request loads it again.",
                    metadata={"model": job.name},
                )
            if model.desired_state != DesiredState.LOADED:
                model = await self.states.wish(job.name, DesiredState.LOADED)
            job.version = model.version
            return await self._run_job(job, model, self.settings.load_timeout_seconds, False, "")
        except ModelplaneError as error:
            log.info("preload not done", model=job.name, error=error.message)
            raise
        finally:
            await self.memory.drop_claim(job.name)

    def _chore(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(work)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    def _end_job(self, job: LoadJob) -> None:
        if self.jobs.get(job.name) is job:
            del self.jobs[job.name]
        job.finish()
        if job.task is not None and not job.task.cancelled():
            job.task.exception()  # mark it retrieved: the callers that follow the job re-raise it

    async def _run_job(self, job: LoadJob, model: Model, limit_seconds: float, refresh: bool, request_id: str) -> Model:
        log.info("load started", model=model.name, reason=job.reason)
        tracker = ModelTracker(self.states, model, request_id, job.publish)
        result = "failed"
        try:
            loaded = await self._attempts(job, tracker, limit_seconds, refresh)
            result = "loaded"
        except asyncio.CancelledError:
            result = "cancelled"
            if job.served is not None:
                await self._refresh_not_applied(job, "the refresh was cancelled before it switched.")
                raise LoadCancelled(
                    f"The refresh of '{model.name}' was cancelled before it switched; the served copy was not "
                    "replaced.",
                    metadata={"model": model.name},
                ) from None
            await self._settle(tracker, "load cancelled")
            raise LoadCancelled(f"The load of '{model.name}' was cancelled.", metadata={"model": model.name}) from None
        except (TritonUnavailable, BudgetExceeded) as transient:
            # Not the package's fault: leave the model where it was; a later request, preload or
            # reconciliation tries again.
            result = "refused" if isinstance(transient, BudgetExceeded) else "failed"
            if job.served is not None:
                await self._refresh_not_applied(job, transient.message)
                raise _untouched(job.name, transient) from None
            await self._settle(tracker, f"load stopped: {transient.message}")
            raise transient from None
        except ModelplaneError as refused:
            if job.served is not None:
                await self._refresh_not_applied(job, refused.message)
                raise _untouched(job.name, refused) from None
            await self._record_failure(tracker, refused)
            raise
        except Exception as crash:
            log.exception("load crashed", model=model.name)
            error = Internal(
                f"Loading '{model.name}' failed unexpectedly ({type(crash).__name__}); see the loader log."
            )
            if job.served is not None:
                await self._refresh_not_applied(job, error.message)
                raise _untouched(job.name, error) from crash
            await self._record_failure(tracker, error)
            raise error from crash
        finally:
            metrics.LOADS.labels(job.reason, result).inc()
        _observe_phases(job.phase_durations or loaded.status.phase_durations)
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
        if refresh and tracker.model.state == ModelState.READY:
            if await self.triton.is_ready(name):
                return await self._refresh_beside(job, tracker)
            # Recorded READY but not in Triton: from the true state, a refresh is a load.
            tracker.model = await self.states.transition(
                tracker.model, ModelState.STAGED, "not loaded in Triton (found by a refresh)"
            )
        await self.pipeline.stage(tracker, refresh=refresh)
        reservation = await self.memory.reserve(tracker.model, job.say)
        await self.carry_out(reservation.evictions)
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

    async def _refresh_beside(self, job: LoadJob, tracker: ModelTracker) -> Model:
        """A refresh of a model Triton serves, which stays in service and stays READY throughout:
        the package is fetched and verified again, converted where the cache lacks it, and its
        entry built beside the served one; then, with room in the budget for both copies, the entry
        is swapped in and Triton reloads the model, which keeps serving the old copy until the new
        one is READY (and keeps it when the new one fails, its entry put back)."""
        name = job.name
        job.served = await self.states.transition(
            tracker.model,
            ModelState.READY,
            "refreshing: fetching and verifying a new copy beside the served one",
            request_id=tracker.request_id,
        )
        shadow = ShadowStates()
        beside = ModelTracker(shadow, job.served, tracker.request_id, job.publish)
        built = await self.pipeline.stage(beside, refresh=True, beside=True)
        assert built is not None
        switching = time.monotonic()
        try:
            try:
                # Room for the second copy, which runs beside the served one while Triton switches.
                reservation = await self.memory.reserve(beside.model, job.say)
                await self.carry_out(reservation.evictions)
                await self.memory.wait_for_room(reservation, job.say)
            except BudgetExceeded as short:
                short.message = f"Triton runs both copies while it switches, and the budget lacks room: {short.message}"
                short.args = (short.message,)
                raise
            job.publish(LoadProgress(phase=ModelState.LOADING, message="switching Triton to the new copy"))
            switch = asyncio.ensure_future(self._switch(name, built))
            try:
                await asyncio.shield(switch)
            except asyncio.CancelledError:
                # Triton finishes a reload it has begun whatever this caller does: the records
                # follow what Triton did.
                await switch
        finally:
            await self.memory.drop_claim(name)
            await asyncio.to_thread(self.repository.discard, built.path)
        took = time.monotonic() - switching
        job.phase_durations = [
            *shadow.phase_durations,
            PhaseDuration(phase=ModelState.LOADING, duration=timedelta(seconds=took)),
        ]
        staged = beside.model.status
        files = len(staged.manifest.files) if staged.manifest else 0
        return await self.states.transition(
            job.served,
            ModelState.READY,
            f"refreshed: {files} files fetched and verified again; Triton switched to the new copy in {took:.1f} s",
            manifest=staged.manifest,
            profile=staged.profile,
            assets=shadow.assets,
            request_id=tracker.request_id,
        )

    async def _switch(self, name: str, built: BuiltEntry) -> None:
        """Puts the new entry in place and has Triton reload the model; puts the served entry back
        when Triton refuses the new one (it then keeps serving the old copy)."""
        retired = await asyncio.to_thread(self.repository.swap_in, built)
        try:
            await self.triton.load(name, timeout_seconds=self.settings.triton_load_timeout_seconds)
        except BaseException:
            await asyncio.to_thread(self.repository.restore, name, retired)
            raise
        await asyncio.to_thread(self.repository.discard, retired)

    async def _refresh_not_applied(self, job: LoadJob, why: str) -> None:
        """Records why a refresh left the served copy as it was (the model stays READY)."""
        assert job.served is not None
        log.warning("refresh not applied", model=job.name, error=why)
        with contextlib.suppress(ModelplaneError):
            await self.states.transition(
                job.served, ModelState.READY, f"refresh not applied: {why} The served copy is untouched."
            )

    async def _release_after_exit(self, name: str) -> None:
        await self.memory.wait_released(name)
        await self.memory.release(name)

    async def _record_failure(self, tracker: ModelTracker, error: ModelplaneError) -> None:
        log.warning("load failed", model=tracker.model.name, reason=error.reason, error=error.message)
        try:
            tracker.model = await self.states.transition(
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
            tracker.model = await self.states.transition(model, target, message)

    async def cancel(self, name: str) -> bool:
        job = await self._stop_job(name)
        if job is None:
            return False
        if job.served is None:
            # A cancelled load is not wanted now: reconciliation must not start it again. (A
            # cancelled refresh leaves the served model as it was: wanted.)
            with contextlib.suppress(ModelplaneError):
                await self.states.wish(name, DesiredState.UNLOADED)
        return True

    async def _stop_job(self, name: str) -> LoadJob | None:
        """Cancels the model's load in flight and waits for it to have stopped."""
        job = self.jobs.get(name)
        if job is None or job.task is None or job.task.done():
            return None
        job.task.cancel()
        with contextlib.suppress(BaseException):
            await job.task
        return job

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
            refreshing = self.jobs.get(name)
            if refreshing is not None and refreshing.served is not None:
                await self._stop_job(name)  # no copy to switch from once the served one is gone
            model = await self.registry.get_model(name)
            # Whatever unloaded it, the loader no longer keeps it resident: reconciliation must not
            # load it back; a request or a preload may.
            if reason == "operator":
                if model.desired_state != DesiredState.HELD_UNLOADED:
                    # The operator's word holds: no preload brings it back (a request or a load may).
                    model = await self.states.wish(name, DesiredState.HELD_UNLOADED)
            else:
                model = await self.states.release(model, reason)
            if model.state in (ModelState.READY, ModelState.LOADING):
                model = await self.states.transition(
                    model, ModelState.UNLOADING, f"unloading: {message}", begins_operation=True
                )
                # The inference service stops routing to an UNLOADING model; requests already on
                # their way get this long to reach Triton, which finishes what it has received.
                await asyncio.sleep(self.settings.eviction_grace_seconds)
                await self.triton.unload(name)
                await self.memory.wait_released(name)
                footprint = holder.bytes if holder is not None and holder.measured else 0
                model = await self.states.transition(model, ModelState.STAGED, message, footprint_bytes=footprint)
                if reason == "quota":
                    model = await self.states.transition(model, ModelState.FAILED, detail)
            elif await self.triton.is_ready(name):
                await self.triton.unload(name)
                await self.memory.wait_released(name)
        finally:
            await self.memory.release(name)
        metrics.UNLOADS.labels(reason).inc()
        log.info("model unloaded", model=name, reason=reason)
        return model

    async def stop(self) -> None:
        tasks = [*self._chores, *(j.task for j in self.jobs.values() if j.task), *self.unloads.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _untouched(name: str, error: ModelplaneError) -> ModelplaneError:
    """The caller's error of a refresh that was not applied."""
    error.message = (
        f"Refreshing '{name}' was not applied; the served copy is untouched and still serving. {error.message}"
    )
    error.args = (error.message,)
    return error


def _observe_phases(durations: Sequence[PhaseDuration]) -> None:
    phases = {d.phase for d in durations}
    for duration in durations:
        metrics.PHASE_SECONDS.labels(duration.phase.name.lower()).observe(duration.duration.total_seconds())
    metrics.CACHE_LOOKUPS.labels("package", "miss" if ModelState.FETCHING in phases else "hit").inc()
    metrics.CACHE_LOOKUPS.labels("artifact", "miss" if ModelState.CONVERTING in phases else "hit").inc()
