"""Triton python-backend model: a Whisper speech-to-text model in CTranslate2 form, run by faster-whisper.

Tensor contract (one request at a time per instance; the inference service sends long audio in chunks):

  inputs   audio (FP32 [-1]): mono samples at 16 kHz in [-1, 1]
           language (BYTES [1], optional): ISO 639-1 code; absent or empty: detected
           initial_prompt (BYTES [1], optional): text the speech continues
           temperature (FP32 [1], optional): 0 decodes with Whisper's temperature fallback
  outputs  transcript (BYTES [1]): one JSON object {"language", "language_probability",
           "duration", "segments": [{"start", "end", "text", "avg_logprob", "no_speech_prob",
           "compression_ratio", "temperature"}]}, times in seconds from the start of `audio`

Model configuration (config.pbtxt `parameters`, all string values):
  model_dir      folder of model.bin, config.json, tokenizer.json (relative: the version folder)
  compute_type   CTranslate2 compute type (default "int8": 8-bit weights on the CPU)
  cpu_threads    threads for one transcription (default: the CPUs this process may use)
  beam_size      beam width (default 5, faster-whisper's)
"""

import json
import os
import time
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils
from faster_whisper import WhisperModel

# Whisper's own fallback schedule: a window whose output looks unreliable (too repetitive, too
# unlikely) is decoded again at the next temperature.
_FALLBACK = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def _scalar(request, name, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    value = tensor.as_numpy().reshape(-1)
    if value.size == 0:
        return default
    value = value[0]
    return value.decode("utf-8") if isinstance(value, bytes) else value


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        config = auto_complete_model_config.as_dict()
        inputs = [
            {"name": "audio", "data_type": "TYPE_FP32", "dims": [-1]},
            {"name": "language", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
            {"name": "initial_prompt", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
            {"name": "temperature", "data_type": "TYPE_FP32", "dims": [1], "optional": True},
        ]
        have = {t["name"] for t in config.get("input", [])}
        for tensor in inputs:
            if tensor["name"] not in have:
                auto_complete_model_config.add_input(tensor)
        if not config.get("output"):
            auto_complete_model_config.add_output({"name": "transcript", "data_type": "TYPE_STRING", "dims": [1]})
        auto_complete_model_config.set_max_batch_size(0)
        return auto_complete_model_config

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        model_dir = params.get("model_dir", ".")
        model_dir = model_dir if os.path.isabs(model_dir) else os.path.join(version_dir, model_dir)
        threads = int(params.get("cpu_threads", "0")) or len(os.sched_getaffinity(0))
        self._beam_size = int(params.get("beam_size", "5"))
        started = time.monotonic()
        self._model = WhisperModel(
            model_dir, device="cpu", compute_type=params.get("compute_type", "int8"), cpu_threads=threads
        )
        pb_utils.Logger.log_info(
            f"[whisper] loaded {model_dir} in {time.monotonic() - started:.1f} s: {threads} thread(s), "
            f"compute type {params.get('compute_type', 'int8')}, beam {self._beam_size}"
        )

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._transcribe(request))
            except ValueError as err:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err))))
            except Exception as err:  # noqa: BLE001 - one bad request must not fail the others
                pb_utils.Logger.log_error(f"[whisper] transcription failed: {traceback.format_exc()}")
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"transcription failed: {err}")))
        return responses

    def _transcribe(self, request):
        audio = pb_utils.get_input_tensor_by_name(request, "audio").as_numpy().reshape(-1).astype(np.float32)
        if audio.size == 0:
            raise ValueError("the audio has no samples")
        language = _scalar(request, "language") or None
        prompt = _scalar(request, "initial_prompt") or None
        temperature = float(_scalar(request, "temperature", 0.0) or 0.0)
        segments, info = self._model.transcribe(
            audio,
            language=language,
            initial_prompt=prompt,
            beam_size=self._beam_size,
            temperature=_FALLBACK if temperature == 0.0 else temperature,
        )
        result = {
            "language": info.language,
            "language_probability": info.language_probability,
            "duration": info.duration,
            "segments": [
                {
                    "start": s.start,
                    "end": s.end,
                    "text": s.text,
                    "avg_logprob": s.avg_logprob,
                    "no_speech_prob": s.no_speech_prob,
                    "compression_ratio": s.compression_ratio,
                    "temperature": s.temperature,
                }
                for s in segments
            ],
        }
        encoded = np.array([json.dumps(result).encode("utf-8")], dtype=np.object_)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("transcript", encoded)])

    def finalize(self):
        self._model = None
