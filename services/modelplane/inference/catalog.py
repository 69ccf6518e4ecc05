"""Which models exist, what state they are in, and how to serve them.

The catalogue follows the registry's WatchModels stream, so a request costs no registry call;
tokenizers are fetched once per digest. A request for a model that is registered but not loaded
asks the loader for it and waits, within its deadline, instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import structlog

from modelplane.common.errors import DeadlineExceeded, ModelplaneError
from modelplane.common.types import Model, ModelState, ServingProfile
from modelplane.inference.errors import ModelLoading, ModelNotServable
from modelplane.inference.tokenization import EncoderTokenizer
from modelplane.loader.client import LoaderClient
from modelplane.registry.client import RegistryClient
from modelplane.registry.watch import ChangeType

log = structlog.get_logger()


@dataclass(frozen=True)
class ServingModel:
    model: Model
    profile: ServingProfile
    tokenizer: EncoderTokenizer | None
    cold_start: bool = False

    @property
    def name(self) -> str:
        return self.model.name


class ModelCatalog:
    def __init__(self, registry: RegistryClient, loader: LoaderClient) -> None:
        self.registry = registry
        self.loader = loader
        self.models: dict[str, Model] = {}
        self._tokenizers: dict[str, EncoderTokenizer] = {}
        self._loads: dict[str, asyncio.Task[Model]] = {}
        self._watch: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()

    def start(self) -> None:
        self._watch = asyncio.create_task(self._follow_registry(), name="watch-registry")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for task in self._loads.values():
            task.cancel()

    async def _follow_registry(self) -> None:
        backoff = 0.5
        while True:
            try:
                async for change in self.registry.watch(include_initial=True):
                    backoff = 0.5
                    if change.change_type == ChangeType.DELETED:
                        self.models.pop(change.model.name, None)
                    else:
                        self.models[change.model.name] = change.model
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
        self.models[name] = model
        return model

    async def acquire(self, name: str, *, wait_seconds: float) -> ServingModel:
        """The model ready to serve, loading it on demand within `wait_seconds`."""
        model = await self._current(name)
        cold = False
        if model.state != ModelState.READY:
            if model.state == ModelState.FAILED:
                raise ModelNotServable(
                    f"Model '{name}' failed to load: {model.status.reason} Fix the cause, then load it again with "
                    f"`modelplane models load {name}`.",
                    metadata={"model": name, "state": model.state.name},
                )
            model = await self._wait_for_load(name, wait_seconds)
            cold = True
        profile = model.status.profile
        if profile is None:
            raise ModelLoading(f"Model '{name}' has no serving profile yet; retry shortly.", retry_after_seconds=1.0)
        return ServingModel(model, profile, await self._tokenizer(name, profile), cold_start=cold)

    async def _wait_for_load(self, name: str, wait_seconds: float) -> Model:
        task = self._loads.get(name)
        if task is None or task.done():
            task = asyncio.create_task(
                self.loader.ensure_loaded(name, reason="on-demand", timeout_seconds=max(wait_seconds, 60.0))
            )
            self._loads[name] = task
            task.add_done_callback(lambda _: self._loads.pop(name, None) if self._loads.get(name) is task else None)
        try:
            model = await asyncio.wait_for(asyncio.shield(task), timeout=wait_seconds)
        except TimeoutError:
            raise ModelLoading(
                f"Model '{name}' is loading and was not ready within {wait_seconds:.0f} s; retry shortly.",
                retry_after_seconds=5.0,
                metadata={"model": name},
            ) from None
        except DeadlineExceeded as error:
            raise ModelLoading(error.message, retry_after_seconds=5.0, metadata={"model": name}) from None
        self.models[name] = model
        return model

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
