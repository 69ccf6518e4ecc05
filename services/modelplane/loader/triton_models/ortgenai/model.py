"""Triton python-backend model: a causal LM exported by onnxruntime-genai, streamed per token.

Tensors follow Triton's vLLM backend, so a production Triton running vLLM or TensorRT-LLM can
stand behind the same client: `text_input`, `stream`, `sampling_parameters` (one JSON string),
optional `exclude_input_in_output` and `return_*` flags in; `text_output`, `finish_reason`,
`num_input_tokens`, `num_output_tokens` out. One extra optional pair, `return_output_token_ids`
→ `output_token_ids`, exposes the generated ids so parity with PyTorch can be checked exactly.

Config `parameters` (string values):
  model_path             folder written by the converter; a relative path is taken from the
                         model's version folder (default ".": the files sit beside model.py)
  intra_op_num_threads   onnxruntime threads per forward pass (0: onnxruntime's default)
  max_active_requests    requests decoded concurrently; more wait in arrival order (default 4)

Threads: `execute` only validates and queues, so it returns at once. One engine thread owns
every onnxruntime-genai object (they are never touched from two threads) and advances the
active requests round-robin, one token each per turn, so a long generation never starves a
short one. A response thread sends what the engine produced and reads back cancellation, so a
slow client never stalls decoding. This is the vLLM backend's shape with our own scheduler in
place of vLLM's engine.

Tokenisation uses the Hugging Face `tokenizers` library on the packaged tokenizer.json, not
onnxruntime-genai's tokenizer: with 0.18 the latter skipped the BOS that transformers adds and
cut decoded text at the first invalid UTF-8 sequence (NOTES.md), and exact token counts and
text parity with transformers are the contract here.
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
import triton_python_backend_utils as pb_utils
from genai_text import (  # the modules beside this one in the version folder
    GeneratedText,
    SamplingParameters,
    byte_fallback_ids,
    encode_prompt,
    parse_sampling_parameters,
    special_ids,
)
from llm_protocol import (
    INPUTS,
    OUTPUTS,
    RequestError,
    complete_config,
    error,
    longest_token_bytes,
    read_prompt,
    refuse_unfittable_prompt,
    scalar,
    send_error,
)
from tokenizers import Tokenizer

# One extra optional pair: the generated ids, so parity with PyTorch can be checked exactly.
_INPUTS = [*INPUTS, {"name": "return_output_token_ids", "data_type": "TYPE_BOOL", "dims": [1], "optional": True}]
_OUTPUTS = [*OUTPUTS, {"name": "output_token_ids", "data_type": "TYPE_INT32", "dims": [-1]}]
_RETURN_FLAGS = (
    "return_finish_reason",
    "return_num_input_tokens",
    "return_num_output_tokens",
    "return_output_token_ids",
)
_SHUTDOWN = object()


@dataclass
class _Job:
    """One request from arrival to its final response."""

    sender: object
    prompt: str
    prompt_ids: list[int]
    params: SamplingParameters
    max_tokens: int  # after clamping to the context length
    min_tokens: int
    stream: bool
    echo_prompt: bool
    returns: dict[str, bool]
    text: GeneratedText
    generator: og.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    reported: int = 0  # output ids already sent: num_output_tokens is a delta when streaming
    cancelled: bool = False  # written by the response thread
    done: bool = False


class TritonPythonModel:
    @classmethod
    def auto_complete_config(cls, auto_complete_model_config):
        return complete_config(auto_complete_model_config, _INPUTS, _OUTPUTS)

    def initialize(self, args):
        self._log = pb_utils.Logger
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("this model streams: its config must be decoupled")
        params = {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        model_dir = version_dir / params.get("model_path", ".")  # an absolute path wins

        genai_config = json.loads((model_dir / "genai_config.json").read_text())["model"]
        self._context_length = int(genai_config["context_length"])
        eos = genai_config.get("eos_token_id", [])
        self._eos_ids = frozenset(eos if isinstance(eos, list) else [eos])
        self._bos_id = genai_config.get("bos_token_id")
        # onnxruntime-genai 0.18 sizes a sliding-window layer's KV ring from the search's
        # max_length and refuses one shorter than the window ("KV cache capacity (43) must be
        # at least local_window_size (512)"), so every search is allowed at least the window
        # and max_tokens is enforced here instead of by the search.
        window = genai_config["decoder"].get("sliding_window", {}).get("window_size", 0)
        self._min_search_length = min(int(window), self._context_length)
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._byte_tokens = byte_fallback_ids(self._tokenizer)
        self._special_tokens = special_ids(self._tokenizer)
        self._longest_token = longest_token_bytes(self._tokenizer.get_vocab(with_added_tokens=True))

        og_config = og.Config(str(model_dir))
        threads = int(params.get("intra_op_num_threads", "0"))
        if threads > 0:
            session = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
            og_config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        og_config.clear_providers()  # CPU; a GPU deployment would append "cuda" here
        self._model = og.Model(og_config)

        self._max_active = int(params.get("max_active_requests", "4"))
        self._pending: queue.Queue = queue.Queue()
        self._responses: queue.Queue = queue.Queue()
        self._engine_thread = threading.Thread(target=self._engine_loop, name="genai-engine", daemon=True)
        self._response_thread = threading.Thread(target=self._response_loop, name="genai-responses", daemon=True)
        self._engine_thread.start()
        self._response_thread.start()
        self._log.log_info(
            f"[genai] loaded {model_dir} (context {self._context_length}, eos {sorted(self._eos_ids)}, "
            f"threads {threads or 'default'}, max_active_requests {self._max_active})"
        )

    # -- Triton's thread: validate and queue, never decode --------------------------------

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._pending.put(self._parse(request, sender))
            except RequestError as exc:
                send_error(sender, str(exc), pb_utils.TritonError.INVALID_ARG)
        return None

    def _parse(self, request, sender) -> _Job:
        prompt = read_prompt(request)
        stream = bool(scalar(request, "stream", False))
        exclude = scalar(request, "exclude_input_in_output")
        # vLLM's rule: the prompt is echoed unless excluded, and never when streaming.
        echo_prompt = not bool(exclude) if exclude is not None else not stream
        if stream and echo_prompt:
            raise RequestError("when streaming, exclude_input_in_output=false is not allowed")
        params = parse_sampling_parameters(scalar(request, "sampling_parameters"))

        refuse_unfittable_prompt(prompt, self._context_length, self._longest_token)
        prompt_ids = encode_prompt(self._tokenizer, prompt, self._bos_id)
        if not prompt_ids:
            raise RequestError("text_input is empty and this tokenizer adds no BOS: nothing to continue from")
        room = self._context_length - len(prompt_ids)
        if room < 1:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {self._context_length}"
            )
        return _Job(
            sender=sender,
            prompt=prompt,
            prompt_ids=prompt_ids,
            params=params,
            max_tokens=min(params.max_tokens, room),
            min_tokens=min(params.min_tokens, room),
            stream=stream,
            echo_prompt=echo_prompt,
            returns={flag: bool(scalar(request, flag, False)) for flag in _RETURN_FLAGS},
            text=GeneratedText(
                self._tokenizer,
                self._byte_tokens,
                self._special_tokens,
                stop=params.stop,
                include_stop=params.include_stop_str_in_output,
                skip_special_tokens=params.skip_special_tokens,
            ),
        )

    # -- engine thread: the only one that touches onnxruntime-genai ----------------------

    def _engine_loop(self):
        active: list[_Job] = []
        while True:
            while len(active) < self._max_active:
                try:
                    job = self._pending.get(block=not active)
                except queue.Empty:
                    break
                if job is _SHUTDOWN:
                    for leftover in active + _drain(self._pending):
                        self._fail(leftover, "the model is being unloaded", pb_utils.TritonError.UNAVAILABLE)
                    self._responses.put(_SHUTDOWN)
                    return
                if self._start(job):
                    active.append(job)
            for job in active:
                self._advance(job)
            active = [job for job in active if not job.done]

    def _start(self, job: _Job) -> bool:
        p = job.params
        try:
            search = {
                "max_length": max(len(job.prompt_ids) + job.max_tokens, self._min_search_length),
                "min_length": len(job.prompt_ids) + job.min_tokens,
                "do_sample": not p.greedy,
                "repetition_penalty": p.repetition_penalty,
                # Without a seed vLLM is nondeterministic; draw one so each request still
                # gets its own reproducible stream inside onnxruntime-genai.
                "random_seed": p.seed if p.seed is not None else secrets.randbits(31),
            }
            if not p.greedy:
                search.update(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k)
            gen_params = og.GeneratorParams(self._model)
            gen_params.set_search_options(**search)
            job.generator = og.Generator(self._model, gen_params)
            job.generator.append_tokens(job.prompt_ids)  # the prefill runs here
            return True
        except Exception as exc:  # noqa: BLE001 - any engine failure is this request's, not the model's
            self._log.log_error(f"[genai] could not start a request: {traceback.format_exc()}")
            self._fail(job, f"generation failed to start: {exc}", pb_utils.TritonError.INTERNAL)
            return False

    def _advance(self, job: _Job) -> None:
        """Generate one token for the job and queue what it makes sendable."""
        if job.cancelled or (not job.stream and job.sender.is_cancelled()):
            self._log.log_info(f"[genai] request cancelled after {len(job.output_ids)} of {job.max_tokens} tokens")
            self._fail(job, "request was cancelled", pb_utils.TritonError.CANCELLED)
            return
        try:
            job.generator.generate_next_token()
            token = int(job.generator.get_next_tokens()[0])
        except Exception as exc:  # noqa: BLE001
            self._log.log_error(f"[genai] generation failed: {traceback.format_exc()}")
            self._fail(job, f"generation failed: {exc}", pb_utils.TritonError.INTERNAL)
            return
        job.output_ids.append(token)

        # vLLM counts a stop token among the output tokens but never shows its text.
        stop_token = token in job.params.stop_token_ids
        finish = None
        if stop_token or job.text.append(token):
            finish = "stop"
        elif job.generator.is_done() or len(job.output_ids) >= job.max_tokens:
            # The tail of the text is final only now; it may still complete a stop string.
            finish = "stop" if token in self._eos_ids or job.text.finish() else "length"

        if finish is not None:
            job.done = True
            job.generator = None  # frees the KV cache now, not when the list is rebuilt
            job.text.finish()
        if job.stream:
            # One response per token, as vLLM's backend sends, even when the text is held
            # back: clients count tokens as they come, and the response thread notices a
            # cancellation at the next token.
            self._queue_response(job, job.text.release(), finish)
        elif finish is not None:
            text = (job.prompt if job.echo_prompt else "") + job.text.text
            self._queue_response(job, text, finish)

    def _queue_response(self, job: _Job, text: str, finish: str | None) -> None:
        tensors = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]
        if job.returns["return_finish_reason"]:
            # str(None) for an unfinished stream, as vLLM's backend sends.
            tensors.append(pb_utils.Tensor("finish_reason", np.array([str(finish)], dtype=np.object_)))
        if job.returns["return_num_input_tokens"]:
            tensors.append(pb_utils.Tensor("num_input_tokens", np.array([len(job.prompt_ids)], dtype=np.uint32)))
        new_ids = job.output_ids[job.reported :]
        job.reported = len(job.output_ids)
        if job.returns["return_num_output_tokens"]:
            tensors.append(pb_utils.Tensor("num_output_tokens", np.array([len(new_ids)], dtype=np.uint32)))
        if job.returns["return_output_token_ids"]:
            tensors.append(pb_utils.Tensor("output_token_ids", np.array(new_ids, dtype=np.int32)))
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if finish is not None else 0
        self._responses.put((job, pb_utils.InferenceResponse(output_tensors=tensors), flags))

    def _fail(self, job: _Job, message: str, code) -> None:
        job.done = True
        job.generator = None
        response = pb_utils.InferenceResponse(error=error(message, code))
        self._responses.put((job, response, pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL))

    # -- response thread: sending, and noticing cancellation -----------------------------

    def _response_loop(self):
        while True:
            item = self._responses.get()
            if item is _SHUTDOWN:
                return
            job, response, flags = item
            try:
                job.sender.send(response, flags=flags)
                if not flags:
                    job.cancelled = job.sender.is_cancelled()
            except Exception:  # noqa: BLE001 - a vanished client must not stop the others
                self._log.log_error(f"[genai] could not send a response: {traceback.format_exc()}")
                job.cancelled = True

    def finalize(self):
        self._pending.put(_SHUTDOWN)
        self._engine_thread.join()
        self._response_thread.join()
        self._model = None
        self._log.log_info("[genai] unloaded")


def _drain(q: queue.Queue) -> list:
    items = []
    while True:
        try:
            item = q.get_nowait()
        except queue.Empty:
            return items
        if item is not _SHUTDOWN:
            items.append(item)
