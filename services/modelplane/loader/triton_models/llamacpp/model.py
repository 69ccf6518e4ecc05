"""Triton python-backend model that serves one GGUF file with llama.cpp's own C++ server engine,
run in-process by xllamacpp: continuous batching over `engine_slots` slots, llama.cpp's sampling,
stop strings and grammar-constrained decoding (JSON schemas through LLGuidance).

Tensor contract: the one of Triton's own LLM backends (vLLM, TensorRT-LLM), so the inference
service can talk to this model and to a production vLLM/TensorRT-LLM model the same way.

  inputs   text_input (BYTES [1]); stream (BOOL [1], optional);
           sampling_parameters (BYTES [1], optional: one JSON object, see SamplingParams; vLLM's
           `guided_decoding` {"json": schema} or {"json_object": true} constrains the output);
           exclude_input_in_output, return_finish_reason, return_num_input_tokens,
           return_num_output_tokens (BOOL [1], optional)
  outputs  text_output (BYTES), finish_reason (BYTES), num_input_tokens (UINT32),
           num_output_tokens (UINT32)

Streaming responses carry the text generated since the previous one; the token counts come on the
final response (intermediate responses count 0, so the counts add up to the total, as vLLM's do);
`finish_reason` is sent only on the final response. A request that is not streamed gets one
response with everything. An error's message starts with its code (`[INVALID_ARG] ...`): over a
gRPC stream Triton delivers only the message of a response's error, not its code.

Model configuration (config.pbtxt `parameters`, all string values):
  gguf_path        GGUF file; a relative path is resolved against the model version folder
  n_ctx            context length of each engine slot, prompt plus completion (default 4096)
  engine_slots     how many requests generate at the same time (default 1); llama.cpp batches
                   their tokens into one decode per step
  n_threads        CPU threads of the engine (default: usable CPUs)
  n_threads_batch  CPU threads while reading prompts (default: n_threads)
  n_batch          prompt tokens decoded per step (default 512)
  n_gpu_layers     layers offloaded to a GPU by a GPU build of llama.cpp (default 0)
  max_queue_size   requests allowed to wait for a slot before new ones are refused (default 64)
  prefix_cache     "true" reuses a slot's KV cache when a prompt shares a prefix with an earlier
                   one: faster chat turns, but the logits of the first new token then come from a
                   different batch shape, so equal seeds may not give equal outputs; default "false"
  strip_prefix     text removed from the start of a prompt because llama.cpp adds it itself (the
                   BOS token of a model that adds one, when a chat template writes it too: two BOS
                   tokens degrade every answer)
"""

import json
import os
import queue
import secrets
import threading
import time
import traceback
from dataclasses import dataclass, field

# llama.cpp's CPU backend runs its threads as an OpenMP team, and libgomp reads its wait policy
# once, when the library loads. With libgomp's default (spin, then sleep) a decode on a busy
# 2-core machine cost 5-10x the CPU of PASSIVE. An operator may still override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import triton_python_backend_utils as pb_utils
import xllamacpp
from llama_text import MAX_SEED, SamplingParams, gguf_longest_token_bytes
from llm_protocol import (
    INPUTS,
    OUTPUTS,
    RequestError,
    complete_config,
    error,
    read_prompt,
    refuse_unfittable_prompt,
    scalar,
    send_error,
)

# Asking Triton whether a request was cancelled is an IPC round trip to the server process;
# once every 50 ms bounds both its cost and the tokens generated after a client has gone.
_CANCEL_POLL_S = 0.05
# llama.cpp's error types that mean the request itself is wrong.
_CALLER_ERRORS = {"invalid_request_error", "exceed_context_size_error", "not_supported_error"}


@dataclass
class _Generation:
    """One request on its way through the queue and an engine slot."""

    request: object
    sender: object
    request_id: str
    prompt: str
    params: SamplingParams
    seed: int
    stream: bool
    include_prompt: bool
    return_finish_reason: bool
    return_num_input_tokens: bool
    return_num_output_tokens: bool
    queued_at: float = field(default_factory=time.monotonic)


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        return complete_config(auto_complete_model_config, INPUTS, OUTPUTS)

    def initialize(self, args):
        self._log = pb_utils.Logger
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("the llama.cpp model needs a decoupled transaction policy")
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])

        gguf = params.get("gguf_path", "")
        if not gguf:
            raise pb_utils.TritonModelException("parameter gguf_path is required")
        gguf = gguf if os.path.isabs(gguf) else os.path.join(version_dir, gguf)
        if not os.path.isfile(gguf):
            raise pb_utils.TritonModelException(f"GGUF file not found: {gguf}")

        slots = int(params.get("engine_slots", "1"))
        # The CPUs this process may run on (a container's quota), not the host's count.
        threads = int(params.get("n_threads", "0")) or len(os.sched_getaffinity(0))
        self._n_ctx = int(params.get("n_ctx", "4096"))
        engine = xllamacpp.CommonParams()
        engine.model.path = gguf
        engine.n_parallel = slots
        engine.n_ctx = self._n_ctx * slots  # llama.cpp splits the context evenly between the slots
        engine.n_batch = int(params.get("n_batch", "512"))
        engine.n_gpu_layers = int(params.get("n_gpu_layers", "0"))
        engine.cpuparams.n_threads = threads
        engine.cpuparams_batch.n_threads = int(params.get("n_threads_batch", "0")) or threads
        engine.warmup = False
        engine.verbosity = -1
        self._prefix_cache = params.get("prefix_cache", "false").lower() == "true"
        self._strip_prefix = params.get("strip_prefix", "")
        self._jobs = queue.Queue(maxsize=int(params.get("max_queue_size", "64")))
        self._stopping = threading.Event()

        started = time.monotonic()
        self._server = xllamacpp.Server(engine)
        self._longest_token = gguf_longest_token_bytes(gguf)
        # Sending is an IPC call to the server; one thread does it in order so a slot never
        # waits on it, and responses of one request keep their order.
        self._responses = queue.Queue()
        self._response_thread = threading.Thread(target=self._response_loop, name="llama-responses", daemon=True)
        self._response_thread.start()
        # One thread per slot hands requests to the engine: llama.cpp then sees at most `slots`
        # requests, and the rest wait here in arrival order, within max_queue_size.
        self._workers = [threading.Thread(target=self._work, name=f"llama-slot-{i}", daemon=True) for i in range(slots)]
        for worker in self._workers:
            worker.start()
        self._log.log_info(
            f"[llama] loaded {gguf} in {time.monotonic() - started:.1f} s: {slots} slot(s), n_ctx {self._n_ctx} "
            f"per slot, {threads} thread(s), prefix_cache {self._prefix_cache}, xllamacpp {xllamacpp.__version__}"
        )

    def execute(self, requests):
        for request in requests:
            try:
                job = self._parse(request)
            except (RequestError, UnicodeDecodeError) as err:
                send_error(request.get_response_sender(), str(err), pb_utils.TritonError.INVALID_ARG)
                continue
            except Exception as err:  # noqa: BLE001 - one bad request must not fail the others
                self._log.log_error(f"[llama] could not read a request: {traceback.format_exc()}")
                send_error(request.get_response_sender(), f"bad request: {err}", pb_utils.TritonError.INTERNAL)
                continue
            try:
                self._jobs.put_nowait(job)
            except queue.Full:
                send_error(
                    job.sender,
                    f"{self._jobs.maxsize} requests are already waiting for this model; retry later",
                    pb_utils.TritonError.UNAVAILABLE,
                )
        return None

    def _parse(self, request) -> _Generation:
        prompt = read_prompt(request)
        raw_params = scalar(request, "sampling_parameters", b"{}")
        params = SamplingParams.from_json(raw_params.decode("utf-8") if isinstance(raw_params, bytes) else raw_params)
        stream = bool(scalar(request, "stream", False))
        # vLLM's rule: the prompt is echoed unless excluded, and a stream cannot echo it.
        exclude = scalar(request, "exclude_input_in_output", None)
        include_prompt = not bool(exclude) if exclude is not None else not stream
        if include_prompt and stream:
            raise RequestError("exclude_input_in_output=false is not supported with stream=true")
        if not prompt:
            raise RequestError("text_input is empty")
        # llama.cpp tokenises the whole prompt before it finds it too long; a prompt that cannot
        # fit is refused here, in milliseconds, whatever its size.
        refuse_unfittable_prompt(prompt, self._n_ctx, self._longest_token)
        return _Generation(
            request=request,
            sender=request.get_response_sender(),
            request_id=request.request_id() or hex(id(request)),
            prompt=prompt,
            params=params,
            seed=params.seed if params.seed is not None else secrets.randbelow(MAX_SEED + 1),
            stream=stream,
            include_prompt=include_prompt,
            return_finish_reason=bool(scalar(request, "return_finish_reason", False)),
            return_num_input_tokens=bool(scalar(request, "return_num_input_tokens", False)),
            return_num_output_tokens=bool(scalar(request, "return_num_output_tokens", False)),
        )

    def _work(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._generate(job)
            except Exception as err:  # noqa: BLE001 - a failure of one request must not kill the slot
                self._log.log_error(f"[llama] request {job.request_id} failed: {traceback.format_exc()}")
                self._send_error(job, f"generation failed: {err}", pb_utils.TritonError.INTERNAL)

    def _body(self, job: _Generation) -> dict:
        prompt = job.prompt
        if self._strip_prefix and prompt.startswith(self._strip_prefix):
            prompt = prompt[len(self._strip_prefix) :]
        body = job.params.engine_request(prompt, job.seed)
        body["cache_prompt"] = self._prefix_cache
        body["n_predict"] = job.params.max_tokens or self._n_ctx
        return body

    def _generate(self, job: _Generation):
        if job.request.is_cancelled():
            self._send_cancelled(job, generated=0)
            return
        waited = time.monotonic() - job.queued_at
        started = time.monotonic()
        state = {"next_poll": started + _CANCEL_POLL_S, "stopped": None, "first": None, "final": None, "error": None}
        tokens = [0]  # llama.cpp streams one chunk per generated token
        texts = [job.prompt] if job.include_prompt else []

        def on_chunk(chunk: dict) -> bool:
            if "error" in chunk:
                state["error"] = chunk["error"]
                return True
            choice = (chunk.get("choices") or [{}])[0]
            text = choice.get("text") or ""
            tokens[0] += 1
            if text and state["first"] is None:
                state["first"] = time.monotonic()
            if choice.get("finish_reason"):
                state["final"] = (choice["finish_reason"], chunk.get("usage") or {})
                texts.append(text)
                return False
            if job.stream:
                if text:
                    self._send_chunk(job, text, 0, 0, final=False)
            else:
                texts.append(text)
            now = time.monotonic()
            if now >= state["next_poll"]:
                state["next_poll"] = now + _CANCEL_POLL_S
                if job.request.is_cancelled():
                    state["stopped"] = "cancelled"
                    return True
                if self._stopping.is_set():
                    state["stopped"] = "unloading"
                    return True
            return False

        self._server.handle_completions(self._body(job), on_chunk)

        if state["error"] is not None:
            self._send_engine_error(job, state["error"])
            return
        if state["stopped"] == "cancelled":
            self._send_cancelled(job, generated=tokens[0])
            return
        if state["stopped"] == "unloading" or state["final"] is None:
            self._send_error(job, "the model is being unloaded", pb_utils.TritonError.UNAVAILABLE)
            return
        finish_reason, usage = state["final"]
        prompt_tokens, generated = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        # Streamed: only the final chunk's text is left here; otherwise everything, in order.
        reason = "length" if finish_reason == "length" else "stop"
        self._send_chunk(job, "".join(texts), prompt_tokens, generated, final=True, finish_reason=reason)
        elapsed = time.monotonic() - started
        ttft = (state["first"] or time.monotonic()) - started
        self._log.log_info(
            f"[llama] request {job.request_id}: {prompt_tokens} prompt + {generated} generated tokens, "
            f"finish={finish_reason}, queued {waited * 1e3:.0f} ms, first token {ttft * 1e3:.0f} ms, "
            f"{generated / max(elapsed, 1e-9):.1f} tokens/s"
        )

    def _send_chunk(
        self, job: _Generation, text: str, prompt_tokens: int, new_tokens: int, final: bool, finish_reason: str = ""
    ):
        tensors = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]
        if final and job.return_finish_reason:
            tensors.append(pb_utils.Tensor("finish_reason", np.array([finish_reason.encode()], dtype=np.object_)))
        if job.return_num_input_tokens:
            tensors.append(pb_utils.Tensor("num_input_tokens", np.array([prompt_tokens], dtype=np.uint32)))
        if job.return_num_output_tokens:
            tensors.append(pb_utils.Tensor("num_output_tokens", np.array([new_tokens], dtype=np.uint32)))
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        self._responses.put((job.sender, pb_utils.InferenceResponse(output_tensors=tensors), flags))

    def _send_engine_error(self, job: _Generation, failure: dict):
        if failure.get("type") == "exceed_context_size_error":
            message = f"the prompt has {failure.get('n_prompt_tokens')} tokens; the context holds {self._n_ctx}"
        else:
            message = str(failure.get("message", failure))
        caller = failure.get("type") in _CALLER_ERRORS
        self._send_error(job, message, pb_utils.TritonError.INVALID_ARG if caller else pb_utils.TritonError.INTERNAL)

    def _send_cancelled(self, job: _Generation, generated: int):
        self._log.log_info(f"[llama] request {job.request_id} cancelled after {generated} generated tokens; slot freed")
        self._send_error(job, "request was cancelled", pb_utils.TritonError.CANCELLED)

    def _send_error(self, job: _Generation, message: str, code):
        response = pb_utils.InferenceResponse(error=error(message, code))
        self._responses.put((job.sender, response, pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL))

    def _response_loop(self):
        while True:
            item = self._responses.get()
            if item is None:
                return
            sender, response, flags = item
            try:
                sender.send(response, flags=flags)
            except Exception:  # noqa: BLE001 - the client may be gone; nothing else depends on this send
                self._log.log_warn(f"[llama] could not send a response: {traceback.format_exc()}")

    def finalize(self):
        # Triton calls this once no request is in flight; the flag only matters if one still is.
        self._stopping.set()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._send_error(job, "the model is being unloaded", pb_utils.TritonError.UNAVAILABLE)
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            worker.join()
        self._responses.put(None)
        self._response_thread.join()
        del self._server  # stops llama.cpp's main loop and frees the model
        self._log.log_info("[llama] finalized")
