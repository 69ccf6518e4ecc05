"""Triton python-backend model: an ONNX encoder (embeddings or cross-encoder logits) on onnxruntime.

This is the embedded target; a production Triton serves the same model.onnx with its onnxruntime
or TensorRT backend instead. Triton hands `execute` every request its dynamic batcher collected;
their inputs are ragged (each request is padded only to its own longest text), so they are padded
to a common length here and run as one batch. Padding is masked, so a text's result does not
depend on what it was batched with.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        model_dir = os.path.join(args["model_repository"], args["model_version"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_threads", "0"))
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = json.loads(parameters.get("providers", '["CPUExecutionProvider"]'))
        self.session = ort.InferenceSession(
            os.path.join(model_dir, parameters.get("onnx_file", "model.onnx")), options, providers=providers
        )
        self.input_names = [item.name for item in self.session.get_inputs()]
        self.output_name = config["output"][0]["name"]
        self.pad_ids = {"input_ids": int(parameters.get("pad_token_id", "0"))}
        pb_utils.Logger.log_info(
            f"{args['model_name']}: onnxruntime providers {self.session.get_providers()}, inputs {self.input_names}"
        )

    def execute(self, requests):
        arrays = [
            {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}
            for request in requests
        ]
        length = max(batch["input_ids"].shape[1] for batch in arrays)
        feed = {
            name: np.concatenate([self._pad(batch[name], length, self.pad_ids.get(name, 0)) for batch in arrays])
            for name in self.input_names
        }
        outputs = self.session.run([self.output_name], feed)[0]
        responses = []
        offset = 0
        for batch in arrays:
            rows = batch["input_ids"].shape[0]
            tensor = pb_utils.Tensor(self.output_name, outputs[offset : offset + rows].astype(np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            offset += rows
        return responses

    @staticmethod
    def _pad(array, length, value):
        if array.shape[1] == length:
            return array.astype(np.int64, copy=False)
        padded = np.full((array.shape[0], length), value, dtype=np.int64)
        padded[:, : array.shape[1]] = array
        return padded

    def finalize(self):
        self.session = None
