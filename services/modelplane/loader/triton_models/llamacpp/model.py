"""Triton python-backend model that serves one GGUF file with llama.cpp (llama-cpp-python).

Tensor contract: the one of Triton's own LLM backends (vLLM, TensorRT-LLM), so the inference
service can talk to this model and to a production vLLM/TensorRT-LLM model the same way.

  inputs   text_input (BYTES [1]); stream (BOOL [1], optional);
           sampling_parameters (BYTES [1], optional: one JSON object, see SamplingParams);
           exclude_input_in_output, return_finish_reason, return_num_input_tokens,
           return_num_output_tokens (BOOL [1], optional)
  outputs  text_output (BYTES), finish_reason (BYTES), num_input_tokens (UINT32),
           num_output_tokens (UINT32)

Streaming responses carry the text and the number of tokens generated since the previous
response (as vLLM's backend does: they add up to the total); `finish_reason` is sent only on
the final response. A request that is not streamed gets one response with everything. An error's
message starts with its code (`[INVALID_ARG] ...`): over a gRPC stream Triton delivers only the
message of a response's error, not its code.

Model configuration (config.pbtxt `parameters`, all string values):
  gguf_path        GGUF file; a relative path is resolved against the model version folder
  n_ctx            context length of each engine slot, prompt plus completion (default 4096)
  engine_slots     how many requests generate at the same time in this instance (default 1)
  n_threads        CPU threads per slot while generating (default: usable CPUs // slots, >= 1)
  n_threads_batch  CPU threads per slot while reading the prompt (default: n_threads)
  n_batch          prompt tokens decoded per llama_decode call (default 512)
  n_gpu_layers     layers offloaded to a GPU by a GPU build of llama.cpp (default 0)
  max_queue_size   requests allowed to wait for a slot before new ones are refused (default 64)
  prefix_cache     "true" reuses a slot's KV cache when a prompt shares a prefix with the
                   previous one: faster chat turns, but the last prompt token's logits then come
                   from a different batch shape, and greedy output differed from a cold run for
                   4 of 17 test prompts; default "false", so equal seeds give equal outputs
  parse_special_tokens  "true" (default) reads `<start_of_turn>`-style text in the prompt as
                   control tokens, which chat templates rendered upstream need
"""

import codecs
import ctypes
import json
import os
import queue
import secrets
import threading
import time
import traceback
from dataclasses import dataclass, field

# llama.cpp's CPU backend runs its threads as an OpenMP team, and libgomp reads its wait policy
# once, when `import llama_cpp` loads it. With libgomp's default (spin, then sleep) a 2-thread
# slot inside the Triton stub on a busy 2-core machine spent 89-161 ms of CPU per token instead
# of ~16 ms; with PASSIVE it matches llama-cpp-python in-process. An operator may still override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import llama_cpp
import numpy as np
import triton_python_backend_utils as pb_utils
from llama_cpp import Llama
from llama_text import MAX_SEED, SamplingParams, StopStringFilter
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

# Asking Triton whether a request was cancelled is an IPC round trip to the server process;
# once every 50 ms bounds both its cost and the tokens generated after a client has gone.
_CANCEL_POLL_S = 0.05


@dataclass
class _Generation:
    """One request on its way through the queue and an engine slot."""

    request: object
    sender: object
    request_id: str
    prompt: str
    prompt_tokens: list[int]
    params: SamplingParams
    max_new_tokens: int
    seed: int
    stream: bool
    include_prompt: bool
    return_finish_reason: bool
    return_num_input_tokens: bool
    return_num_output_tokens: bool
    queued_at: float = field(default_factory=time.monotonic)


class _Engine:
    """One llama.cpp context and the thread that owns it.

    A llama.cpp context is not thread-safe, and one decode loop serves one sequence; each slot
    therefore has its own `Llama` and only its own thread touches it. The weights are mmapped,
    so slots in one process share them through the page cache: a slot costs its KV cache and
    compute buffers, not another copy of the model."""

    def __init__(self, model: "TritonPythonModel", index: int, llm: Llama):
        self._model = model
        self._llm = llm
        self._vocab = llm._model.vocab
        self.thread = threading.Thread(target=self._run, name=f"llama-slot-{index}", daemon=True)

    def _run(self):
        while True:
            job = self._model._jobs.get()
            if job is None:
                return
            try:
                self._generate(job)
            except Exception as err:  # noqa: BLE001 - a failure of one request must not kill the slot
                self._model._log.log_error(f"[llama] request {job.request_id} failed: {traceback.format_exc()}")
                self._model._send_error(job, f"generation failed: {err}", pb_utils.TritonError.INTERNAL)

    def _generate(self, job: _Generation):
        model, llm, p = self._model, self._llm, job.params
        waited = time.monotonic() - job.queued_at
        if job.request.is_cancelled():
            model._send_cancelled(job, generated=0)
            return
        if not model._prefix_cache:
            llm.reset()  # forget the previous prompt, so no KV prefix is reused
        llm.set_seed(job.seed)  # generate() seeds its sampler chain from this
        tokens = llm.generate(
            job.prompt_tokens,
            temp=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            min_p=p.min_p,
            typical_p=1.0,
            repeat_penalty=p.repetition_penalty,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
        )
        # Tokens are bytes, not characters; the incremental decoder holds back a multi-byte
        # character split across tokens until its last byte arrives.
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopStringFilter(p.stop)
        started = time.monotonic()
        first_token_at = None
        next_cancel_poll = started + _CANCEL_POLL_S
        generated = unsent_tokens = 0
        text_parts = [job.prompt] if job.include_prompt else []
        finish_reason = "length"
        hit_stop = False
        try:
            for token in tokens:
                if first_token_at is None:
                    first_token_at = time.monotonic()
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    finish_reason = "stop"
                    break
                generated += 1
                unsent_tokens += 1
                text, hit_stop = stops.push(utf8.decode(self.piece(token)))
                if hit_stop or generated >= job.max_new_tokens:
                    finish_reason = "stop" if hit_stop else "length"
                    text_parts.append(text)
                    break
                if not job.stream:
                    text_parts.append(text)
                elif text:
                    model._send_chunk(job, text, unsent_tokens, final=False)
                    unsent_tokens = 0
                now = time.monotonic()
                if now >= next_cancel_poll:
                    next_cancel_poll = now + _CANCEL_POLL_S
                    if job.request.is_cancelled():
                        model._send_cancelled(job, generated)
                        return
                    if model._stopping.is_set():
                        model._send_error(job, "the model is being unloaded", pb_utils.TritonError.UNAVAILABLE)
                        return
        finally:
            tokens.close()
        if not hit_stop:
            # Held-back text turned out not to start a stop string; a dangling partial UTF-8
            # sequence becomes U+FFFD rather than vanishing.
            text_parts.append(stops.flush() + utf8.decode(b"", final=True))
        model._send_chunk(
            job,
            "".join(text_parts),
            unsent_tokens if job.stream else generated,
            final=True,
            finish_reason=finish_reason,
        )
        elapsed = time.monotonic() - started
        ttft = (first_token_at or time.monotonic()) - started
        model._log.log_info(
            f"[llama] request {job.request_id}: {len(job.prompt_tokens)} prompt + {generated} "
            f"generated tokens, finish={finish_reason}, queued {waited * 1e3:.0f} ms, "
            f"first token {ttft * 1e3:.0f} ms, {generated / max(elapsed, 1e-9):.1f} tokens/s"
        )

    def close(self):
        """Frees the context and model; only after the slot's thread has stopped."""
        self._llm.close()

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes a token stands for; a control token's own text only with `special`."""
        # llama-cpp-python's detokenize() uses a 32-byte buffer and silently returns b"" for
        # longer pieces; Gemma has 379 such tokens (whole words in Indic scripts, up to 48 bytes).
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]


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
        cpus = len(os.sched_getaffinity(0))
        threads = int(params.get("n_threads", "0")) or max(1, cpus // slots)
        llama_args = dict(
            n_ctx=int(params.get("n_ctx", "4096")),
            n_batch=int(params.get("n_batch", "512")),
            n_threads=threads,
            n_threads_batch=int(params.get("n_threads_batch", "0")) or threads,
            n_gpu_layers=int(params.get("n_gpu_layers", "0")),
            use_mmap=True,
            verbose=False,
        )
        self._prefix_cache = params.get("prefix_cache", "false").lower() == "true"
        self._parse_special = params.get("parse_special_tokens", "true").lower() == "true"
        self._jobs = queue.Queue(maxsize=int(params.get("max_queue_size", "64")))
        self._stopping = threading.Event()

        started = time.monotonic()
        llms = [Llama(model_path=gguf, **llama_args) for _ in range(slots)]
        # Tokenising only reads the vocabulary, which llama.cpp never changes after loading, so
        # execute() may tokenise with slot 0's model while slot 0 is decoding.
        self._tokenizer = llms[0]
        self._n_ctx = llms[0].n_ctx()
        self._bos = llms[0].token_bos()
        self._engines = [_Engine(self, i, llm) for i, llm in enumerate(llms)]
        engine = self._engines[0]
        self._longest_token = longest_token_bytes(engine.piece(t, special=True) for t in range(llms[0].n_vocab()))

        # Sending is an IPC call to the server; one thread does it in order so a slot never
        # waits on it, and responses of one request keep their order.
        self._responses = queue.Queue()
        self._response_thread = threading.Thread(target=self._response_loop, name="llama-responses", daemon=True)
        self._response_thread.start()
        for engine in self._engines:
            engine.thread.start()
        self._log.log_info(
            f"[llama] loaded {gguf} in {time.monotonic() - started:.1f} s: {slots} slot(s), "
            f"n_ctx {self._n_ctx}, {threads} thread(s) per slot, prefix_cache {self._prefix_cache}, "
            f"llama-cpp-python {llama_cpp.__version__}"
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

        refuse_unfittable_prompt(prompt, self._n_ctx, self._longest_token)
        tokens = self._tokenizer.tokenize(prompt.encode("utf-8"), add_bos=True, special=self._parse_special)
        # A template that writes "<bos>" itself plus the BOS the model adds gives two of them,
        # which degrades every answer.
        if tokens[:2] == [self._bos, self._bos]:
            tokens = tokens[1:]
        room = self._n_ctx - len(tokens)
        if room < 1:
            raise RequestError(f"the prompt has {len(tokens)} tokens; the context holds {self._n_ctx}")
        return _Generation(
            request=request,
            sender=request.get_response_sender(),
            request_id=request.request_id() or hex(id(request)),
            prompt=prompt,
            prompt_tokens=tokens,
            params=params,
            max_new_tokens=min(params.max_tokens or room, room),
            seed=params.seed if params.seed is not None else secrets.randbelow(MAX_SEED + 1),
            stream=stream,
            include_prompt=include_prompt,
            return_finish_reason=bool(scalar(request, "return_finish_reason", False)),
            return_num_input_tokens=bool(scalar(request, "return_num_input_tokens", False)),
            return_num_output_tokens=bool(scalar(request, "return_num_output_tokens", False)),
        )

    def _send_chunk(self, job: _Generation, text: str, new_tokens: int, final: bool, finish_reason: str = ""):
        tensors = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]
        if final and job.return_finish_reason:
            tensors.append(pb_utils.Tensor("finish_reason", np.array([finish_reason.encode()], dtype=np.object_)))
        if job.return_num_input_tokens:
            tensors.append(pb_utils.Tensor("num_input_tokens", np.array([len(job.prompt_tokens)], dtype=np.uint32)))
        if job.return_num_output_tokens:
            tensors.append(pb_utils.Tensor("num_output_tokens", np.array([new_tokens], dtype=np.uint32)))
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        self._responses.put((job.sender, pb_utils.InferenceResponse(output_tensors=tensors), flags))

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
        for _ in self._engines:
            self._jobs.put(None)
        for engine in self._engines:
            engine.thread.join()
        self._responses.put(None)
        self._response_thread.join()
        for engine in self._engines:
            engine.close()
        self._log.log_info("[llama] finalized")
