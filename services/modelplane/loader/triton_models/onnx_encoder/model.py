"""Triton python-backend model: an ONNX encoder (embeddings or cross-encoder logits) on onnxruntime.

This is the embedded target; a production Triton serves the same model.onnx with its onnxruntime
or TensorRT backend instead. Triton hands `execute` every request its dynamic batcher collected.
The inference service sends one request per sequence-length bucket, each padded only to its own
longest sequence (see modelplane/inference/batching.py), so requests of equal width run together
as one onnxruntime batch and requests of different widths run apart: padding every row to the
longest would make the short texts pay for the long ones. Padding is masked, so a text's result
does not depend on what it was batched with.
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
        # Spinning threads burn the cores the other processes (Triton, the services) need between
        # batches; on a shared CPU that costs more than the wake-up latency it saves.
        spinning = parameters.get("allow_spinning", "0")
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
        providers = json.loads(parameters.get("providers", '["CPUExecutionProvider"]'))
        self.session = ort.InferenceSession(
            os.path.join(model_dir, parameters.get("onnx_file", "model.onnx")), options, providers=providers
        )
        self.input_names = [item.name for item in self.session.get_inputs()]
        self.output_name = config["output"][0]["name"]
        pb_utils.Logger.log_info(
            f"{args['model_name']}: onnxruntime providers {self.session.get_providers()}, inputs {self.input_names}, "
            f"spinning threads {spinning}"
        )

    def execute(self, requests):
        arrays = [
            {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}
            for request in requests
        ]
        outputs = [None] * len(arrays)
        by_width = {}
        for position, batch in enumerate(arrays):
            by_width.setdefault(batch["input_ids"].shape[1], []).append(position)
        for positions in by_width.values():
            feed = {
                name: np.concatenate([arrays[p][name] for p in positions]).astype(np.int64, copy=False)
                for name in self.input_names
            }
            result = self.session.run([self.output_name], feed)[0].astype(np.float32, copy=False)
            offset = 0
            for p in positions:
                rows = arrays[p]["input_ids"].shape[0]
                outputs[p] = result[offset : offset + rows]
                offset += rows
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, output)]) for output in outputs
        ]

    def finalize(self):
        self.session = None
