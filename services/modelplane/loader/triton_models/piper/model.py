"""Triton python-backend model: a Piper text-to-speech voice (an ONNX model) run by piper-tts.

Decoupled: one request streams one response per sentence as it is synthesized, so the caller
starts playing (or encoding) before the whole text is spoken.

  inputs   text_input (BYTES [1]): the text to speak
           speaker (BYTES [1], optional): one of the voice's speakers; absent: the first
           speed (FP32 [1], optional): speaking rate relative to the voice's own (default 1)
  outputs  audio (INT16 [-1]): the next sentence's mono samples
           sample_rate (INT32 [1]): their sample rate, in hertz

An error's message starts with its code (`[INVALID_ARG] ...`), as the LLM models' do: over a gRPC
stream Triton delivers only the message of a response's error. The plumbing of decoupled models
(llm_protocol.py) is copied beside this file, as for the LLM models.

Model configuration (config.pbtxt `parameters`, all string values):
  onnx_file      the voice's ONNX file (relative: the version folder); its config is <onnx_file>.json
  intra_op_threads  onnxruntime threads (default 0: onnxruntime's choice)
  max_queue_size requests allowed to wait before new ones are refused (default 32)
"""

import json
import os
import queue
import threading
import time
import traceback

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils
from llm_protocol import RequestError, complete_config, scalar, send_error
from piper import PiperVoice, SynthesisConfig
from piper.config import PiperConfig

INPUTS = [
    {"name": "text_input", "data_type": "TYPE_STRING", "dims": [1]},
    {"name": "speaker", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
    {"name": "speed", "data_type": "TYPE_FP32", "dims": [1], "optional": True},
]
OUTPUTS = [
    {"name": "audio", "data_type": "TYPE_INT16", "dims": [-1]},
    {"name": "sample_rate", "data_type": "TYPE_INT32", "dims": [1]},
]


def _text(value, default=None):
    return value.decode("utf-8") if isinstance(value, bytes) else (default if value is None else value)


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        return complete_config(auto_complete_model_config, INPUTS, OUTPUTS)

    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("the piper model needs a decoupled transaction policy")
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        onnx_file = os.path.join(version_dir, params.get("onnx_file", "model.onnx"))
        with open(f"{onnx_file}.json", encoding="utf-8") as handle:
            voice_config = PiperConfig.from_dict(json.load(handle))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        started = time.monotonic()
        session = onnxruntime.InferenceSession(onnx_file, sess_options=options, providers=["CPUExecutionProvider"])
        self._voice = PiperVoice(session=session, config=voice_config)
        self._speakers = dict(voice_config.speaker_id_map or {})
        self._sample_rate = voice_config.sample_rate
        self._jobs = queue.Queue(maxsize=int(params.get("max_queue_size", "32")))
        self._thread = threading.Thread(target=self._run, name="piper-synthesis", daemon=True)
        self._thread.start()
        pb_utils.Logger.log_info(
            f"[piper] loaded {onnx_file} in {time.monotonic() - started:.1f} s: {voice_config.sample_rate} Hz, "
            f"{max(1, len(self._speakers))} speaker(s), providers {session.get_providers()}"
        )

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                job = self._parse(request, sender)
            except (RequestError, UnicodeDecodeError) as err:
                send_error(sender, str(err), pb_utils.TritonError.INVALID_ARG)
                continue
            try:
                self._jobs.put_nowait(job)
            except queue.Full:
                message = f"{self._jobs.maxsize} requests are already waiting for this voice; retry later"
                send_error(sender, message, pb_utils.TritonError.UNAVAILABLE)
        return None

    def _parse(self, request, sender):
        text = _text(scalar(request, "text_input"), "")
        if not text.strip():
            raise RequestError("text_input is empty")
        speaker = _text(scalar(request, "speaker")) or None
        speaker_id = None
        if speaker is not None and self._speakers:
            if speaker not in self._speakers:
                raise RequestError(f"unknown speaker '{speaker}'; this voice has {', '.join(sorted(self._speakers))}")
            speaker_id = self._speakers[speaker]
        speed = float(scalar(request, "speed", 1.0) or 1.0)
        if not 0.25 <= speed <= 4.0:
            raise RequestError(f"speed {speed} is outside [0.25, 4]")
        length_scale = (self._voice.config.length_scale or 1.0) / speed
        return request, sender, str(text), SynthesisConfig(speaker_id=speaker_id, length_scale=length_scale)

    def _run(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._serve(*job)
            # Triton releases a request (and can unload the model) only once nothing refers to its
            # request and response sender: a job kept alive while this thread waits for the next
            # would hold the model loaded, and its backend process alive, forever.
            del job

    def _serve(self, request, sender, text, syn_config):
        try:
            self._synthesize(request, sender, text, syn_config)
        except Exception as err:  # noqa: BLE001 - a failure of one request must not stop the thread
            pb_utils.Logger.log_error(f"[piper] synthesis failed: {traceback.format_exc()}")
            send_error(sender, f"synthesis failed: {err}", pb_utils.TritonError.INTERNAL)

    def _synthesize(self, request, sender, text, syn_config):
        rate = np.array([self._sample_rate], dtype=np.int32)
        for chunk in self._voice.synthesize(text, syn_config=syn_config):
            if request.is_cancelled():
                send_error(sender, "request was cancelled", pb_utils.TritonError.CANCELLED)
                return
            samples = chunk.audio_int16_array.reshape(-1)
            tensors = [pb_utils.Tensor("audio", samples), pb_utils.Tensor("sample_rate", rate)]
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors))
        # The final response carries tensors (no samples): a flags-only one reaches a gRPC streaming
        # client only when the request asked for empty final responses.
        last = [pb_utils.Tensor("audio", np.zeros(0, dtype=np.int16)), pb_utils.Tensor("sample_rate", rate)]
        sender.send(
            pb_utils.InferenceResponse(output_tensors=last), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        )

    def finalize(self):
        self._jobs.put(None)
        self._thread.join()
        pb_utils.Logger.log_info("[piper] finalized")
