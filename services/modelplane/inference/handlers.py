"""The inference service's core: embeddings (and, as they land, rerank and generation) through Triton.

Works on domain types; the servicer converts. Every request runs against a model the catalogue
made ready (loading it on demand), in chunks Triton accepts, with exact token counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import numpy as np
import structlog

from modelplane.common.request_context import current_request_id
from modelplane.common.types import ModelCapabilities, Task, Usage
from modelplane.inference import audio, generation, speech, structured, tool_calls
from modelplane.inference import rerank as reranking
from modelplane.inference.audio import AudioFormat
from modelplane.inference.catalog import ModelCatalog, ServingModel
from modelplane.inference.coalescing import EncoderModel, RoutedEncoderCalls
from modelplane.inference.errors import InputTooLong, InvalidRequest, WrongTask
from modelplane.inference.routing import Router
from modelplane.inference.settings import InferenceSettings
from modelplane.inference.stats import RequestStatistics
from modelplane.inference.tokenization import EncodedBatch, EncoderTokenizer

log = structlog.get_logger()


class Truncation(enum.IntEnum):
    UNSPECIFIED = 0
    END = 1
    NONE = 2


@dataclass(frozen=True)
class EmbedInput:
    """A text, or token ids already produced by the model's tokenizer (without special tokens)."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Embedding:
    index: int
    values: np.ndarray
    num_tokens: int
    truncated: bool


@dataclass(frozen=True)
class EmbedResult:
    model: str
    embeddings: list[Embedding]
    usage: Usage


class InferenceHandler:
    def __init__(
        self, settings: InferenceSettings, catalog: ModelCatalog, triton: Router, stats: RequestStatistics
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.triton = triton
        self.stats = stats
        self.encoder_calls = RoutedEncoderCalls(triton, settings.encoder_calls_in_flight)

    def _wait_seconds(self, deadline_seconds: float | None) -> float:
        if deadline_seconds is None:
            return self.settings.load_wait_seconds
        return max(0.0, min(deadline_seconds, self.settings.load_wait_seconds))

    def _truncates(self, truncation: Truncation) -> bool:
        if truncation == Truncation.UNSPECIFIED:
            return self.settings.truncation == "truncate"
        return truncation == Truncation.END

    async def _serving(self, model: str, task: Task | tuple[Task, ...], deadline_seconds: float | None) -> ServingModel:
        structlog.contextvars.bind_contextvars(model=model)
        serving = await self.catalog.acquire(model, wait_seconds=self._wait_seconds(deadline_seconds))
        accepted = task if isinstance(task, tuple) else (task,)
        if serving.model.spec.task not in accepted:
            wanted = " or ".join(t.name.lower() for t in accepted)
            raise WrongTask(
                f"Model '{model}' serves {serving.model.spec.task.name.lower()}, not {wanted}; "
                "pick a model of the right type (GET /v1/models lists each model's task).",
                metadata={"model": model, "task": serving.model.spec.task.name},
            )
        self.stats.record(model, cold_start=serving.cold_start)
        return serving

    async def embed(
        self,
        model: str,
        inputs: Sequence[EmbedInput],
        *,
        truncation: Truncation = Truncation.UNSPECIFIED,
        deadline_seconds: float | None = None,
    ) -> EmbedResult:
        if not inputs:
            raise InvalidRequest("The request has no input; send at least one text.")
        if len(inputs) > self.settings.max_inputs_per_request:
            raise InvalidRequest(
                f"The request has {len(inputs)} inputs; at most {self.settings.max_inputs_per_request} are accepted "
                "per request. Split it into smaller batches."
            )
        serving = await self._serving(model, Task.EMBEDDING, deadline_seconds)
        tokenizer = serving.tokenizer
        if tokenizer is None:
            raise InvalidRequest(f"Model '{model}' has no tokenizer, so it cannot embed text.")
        texts = [item.text or "" for item in inputs if item.token_ids is None]
        encoded = iter(tokenizer.encode_texts(texts)) if texts else iter(())
        sequences: list[tuple[list[int], list[int]]] = []
        for index, item in enumerate(inputs):
            if item.token_ids is not None:
                _check_vocabulary(item.token_ids, tokenizer, model, index)
                ids = tokenizer.frame_token_ids(item.token_ids)
                sequences.append((ids, [0] * len(ids)))
            else:
                encoding = next(encoded)
                sequences.append((encoding.ids, encoding.type_ids))
        if not self._truncates(truncation):
            for index, (ids, _) in enumerate(sequences):
                if len(ids) > tokenizer.max_tokens:
                    length = tokenizer.length_of(len(ids), inputs[index].text or "")
                    raise InputTooLong(
                        f"Input {index} has {length}; model '{model}' accepts at most {tokenizer.max_tokens}. "
                        "Shorten it, or allow truncation.",
                        metadata={"model": model, "index": str(index)},
                    )
        vectors, batch_facts = await self._run_encoder(serving, sequences)
        if serving.profile.normalize_embeddings:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        embeddings = [
            Embedding(index=i, values=vectors[i], num_tokens=count, truncated=cut)
            for i, (count, cut) in enumerate(zip(batch_facts.token_counts, batch_facts.truncated, strict=True))
        ]
        prompt_tokens = sum(batch_facts.token_counts)
        return EmbedResult(model=model, embeddings=embeddings, usage=Usage(prompt_tokens=prompt_tokens))

    async def rerank(
        self,
        model: str,
        query: str,
        documents: Sequence[str],
        *,
        top_n: int | None = None,
        return_documents: bool = False,
        truncation: Truncation = Truncation.UNSPECIFIED,
        deadline_seconds: float | None = None,
    ) -> reranking.RerankResult:
        """Scores documents against the query with a cross-encoder or an embedding model (rerank.py)."""
        if not documents:
            raise InvalidRequest("The request has no documents; send at least one.")
        if len(documents) > self.settings.max_inputs_per_request:
            raise InvalidRequest(
                f"The request has {len(documents)} documents; at most {self.settings.max_inputs_per_request} are "
                "accepted per request. Split it into smaller batches."
            )
        serving = await self._serving(model, (Task.RERANK, Task.EMBEDDING), deadline_seconds)
        return await reranking.rerank(
            serving,
            query,
            documents,
            top_n=top_n,
            return_documents=return_documents,
            truncate=self._truncates(truncation),
            run_encoder=self._run_encoder,
        )

    async def generate(
        self,
        model: str,
        prompt: str,
        parameters: generation.SamplingParameters,
        *,
        response_format: structured.ResponseFormat = structured.ResponseFormat(),  # noqa: B008 - immutable
        deadline_seconds: float | None = None,
    ) -> AsyncIterator[generation.GenerationChunk]:
        """Completes the prompt as it is, streaming the text as it is generated."""
        serving = await self._serving(model, Task.GENERATION, deadline_seconds)
        schema = _response_schema(serving, response_format)
        chunks = generation.generate(
            self.triton, serving, prompt, parameters, schema=schema, request_id=current_request_id.get()
        )
        if schema is not None:
            chunks = generation.structured_answer(chunks, schema, model)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield chunk

    async def chat(
        self,
        model: str,
        messages: Sequence[generation.ChatMessage],
        parameters: generation.SamplingParameters,
        *,
        tools: Sequence[tool_calls.Tool] = (),
        tool_choice: tool_calls.ToolChoice = tool_calls.ToolChoice(),  # noqa: B008 - immutable
        response_format: structured.ResponseFormat = structured.ResponseFormat(),  # noqa: B008 - immutable
        parallel_tool_calls: bool | None = None,
        deadline_seconds: float | None = None,
    ) -> AsyncIterator[generation.GenerationChunk]:
        """Answers the conversation, rendered with the model's chat template, streaming the text;
        with tools, the answer is either complete tool calls (several only when
        `parallel_tool_calls` is True) or text; with a response format, text constrained to it; a
        model that thinks has its thought returned apart."""
        serving = await self._serving(model, Task.GENERATION, deadline_seconds)
        capabilities = serving.profile.capabilities or ModelCapabilities()
        response = _response_schema(serving, response_format)
        plan = tool_calls.plan_tools(tools, tool_choice, response, parallel_tool_calls)
        if plan is not None and not capabilities.tools:
            raise InvalidRequest(
                f"Model '{model}' cannot call tools: it needs a chat template and an engine that constrains its output "
                "(a GGUF model). Send the request without tools, or use a model whose capabilities in GET /v1/models "
                "include tools.",
                metadata={"model": model, "param": "tools"},
            )
        form = generation.tool_form(serving.profile.chat_template, plan) if plan is not None else None
        prompt = generation.render_chat(serving, messages, form)
        schema, grammar = response, None
        if form is not None:
            prompt += form.prefill()
            schema, grammar = form.engine_schema(), form.engine_grammar()
        chunks = generation.generate(
            self.triton,
            serving,
            prompt,
            parameters,
            schema=schema,
            grammar=grammar,
            request_id=current_request_id.get(),
        )
        if form is not None:
            chunks = generation.tool_answer(chunks, form, model)
        elif schema is not None:
            chunks = generation.structured_answer(chunks, schema, model)
        elif capabilities.reasoning:
            chunks = generation.split_reasoning(chunks, prompt)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield chunk

    async def transcribe(
        self,
        model: str,
        data: bytes,
        *,
        filename: str = "",
        language: str = "",
        prompt: str = "",
        temperature: float | None = None,
        deadline_seconds: float | None = None,
    ) -> speech.Transcript:
        """The transcript of an audio file of any container FFmpeg reads, long ones in chunks."""
        audio.require_voice()
        serving = await self._serving(model, Task.SPEECH2TEXT, deadline_seconds)
        return await speech.transcribe(
            self.triton,
            serving,
            data,
            filename=filename,
            language=language,
            prompt=prompt,
            temperature=temperature,
            max_seconds=self.settings.max_audio_seconds,
            chunk_seconds=self.settings.transcribe_chunk_seconds,
            request_id=current_request_id.get(),
            timeout_seconds=deadline_seconds,
        )

    async def synthesize(
        self,
        model: str,
        text: str,
        *,
        voice: str = "",
        audio_format: AudioFormat = AudioFormat.MP3,
        speed: float | None = None,
        deadline_seconds: float | None = None,
    ) -> AsyncIterator[speech.SpeechPiece]:
        """Speaks the text, streaming the encoded audio sentence by sentence."""
        audio.require_voice()
        serving = await self._serving(model, Task.TTS, deadline_seconds)
        async for piece in speech.synthesize(
            self.triton,
            serving,
            text,
            voice=voice,
            audio_format=audio_format,
            speed=speed,
            max_chars=self.settings.max_speech_input_chars,
            request_id=current_request_id.get(),
        ):
            yield piece

    async def _run_encoder(
        self, serving: ServingModel, sequences: list[tuple[list[int], list[int]]]
    ) -> tuple[np.ndarray, EncodedBatch]:
        """Runs the sequences through Triton in chunks the model accepts, concurrently, in order
        (chunks of concurrent requests may share a Triton call: coalescing.py)."""
        tokenizer = serving.tokenizer
        assert tokenizer is not None
        profile = serving.profile
        model = EncoderModel(
            triton_name=profile.triton_model_name,
            output=profile.output_name,
            max_rows=max(1, profile.max_batch_size or 32),
            pad_id=tokenizer.pad_id,
        )
        chunks = [
            tokenizer.batch(sequences[i : i + model.max_rows], profile.input_names)
            for i in range(0, len(sequences), model.max_rows)
        ]
        request_id = current_request_id.get()
        if len(chunks) == 1:  # the common case, without a task for the chunk
            outputs = [await self.encoder_calls.run(model, chunks[0].arrays, request_id=request_id)]
        else:
            outputs = await asyncio.gather(
                *(self.encoder_calls.run(model, chunk.arrays, request_id=request_id) for chunk in chunks)
            )
        facts = EncodedBatch(
            arrays={},
            token_counts=[count for chunk in chunks for count in chunk.token_counts],
            truncated=[cut for chunk in chunks for cut in chunk.truncated],
        )
        vectors = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
        return vectors.astype(np.float32, copy=False), facts


def _response_schema(serving: ServingModel, response_format: structured.ResponseFormat) -> dict | None:
    """The checked schema the answer must satisfy, refused for a model that cannot constrain its output."""
    schema = structured.response_schema(response_format)
    schema = structured.finite(schema) if schema is not None else None
    capabilities = serving.profile.capabilities or ModelCapabilities()
    if schema is not None and not capabilities.json_schema:
        raise InvalidRequest(
            f"Model '{serving.name}' cannot constrain its output to JSON (its engine has no grammar support), so "
            "response_format cannot be honoured; use a GGUF model, whose capabilities in GET /v1/models include "
            "json_schema, or drop response_format.",
            metadata={"model": serving.name, "param": "response_format"},
        )
    return schema


def _check_vocabulary(ids: Sequence[int], tokenizer: EncoderTokenizer, model: str, index: int) -> None:
    """Token ids outside the vocabulary would fail inside the model; refuse them by name instead."""
    size = tokenizer.vocabulary_size
    bad = next((token for token in ids if not 0 <= token < size), None)
    if bad is not None:
        raise InvalidRequest(
            f"Input {index} has token id {bad}, outside model '{model}''s vocabulary of {size} tokens; "
            "token ids must come from this model's own tokenizer.",
            metadata={"model": model, "index": str(index)},
        )
