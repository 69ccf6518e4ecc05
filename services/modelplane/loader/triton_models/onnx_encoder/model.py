"""Triton python-backend model: an ONNX encoder (embeddings or cross-encoder logits) on onnxruntime.

This is the embedded target; a production Triton serves the same model.onnx with its onnxruntime
or TensorRT backend instead. Triton hands `execute` every request its dynamic batcher collected,
each padded only to its own longest row. Every row of every request is sorted into a
sequence-length bucket (the `length_buckets` parameter), and each bucket runs as one onnxruntime
batch cut to its own longest row: padding every row to the longest of all would make the short
texts pay for the long ones. But every onnxruntime call also reads all of the model's weights,
which costs about as much as a few tokens (`bucket_merge_tokens`), so neighbouring buckets are
merged while padding the shorter one's rows costs less than the call it saves: a small batch spread
over many buckets runs as two or three calls, not one per bucket. Padding is masked, so a text's
result does not depend on what it was batched with.

With `parallel_runs` above 1, the calls of one execution run that many at a time, each on its
share of the cores (one thread each on two cores), instead of one after another on all of them: a
run on two threads costs about 4 ms more CPU than on one before its first token (the threads wake
and wait for each other at every operator; benchmarks/bench_onnx_calls.py), which small executions
pay on every call. A call large enough to leave the other runs idle is split by rows first.
"""

import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        model_dir = os.path.join(args["model_repository"], args["model_version"])
        options = ort.SessionOptions()
        threads = int(parameters.get("intra_op_threads", "0"))
        self.parallel_runs = max(1, int(parameters.get("parallel_runs", "1")))
        self.pool = None
        if self.parallel_runs > 1:
            # The runs share the cores: each gets its part of them (of all, when threads is 0).
            threads = max(1, (threads or len(os.sched_getaffinity(0))) // self.parallel_runs)
            self.pool = ThreadPoolExecutor(self.parallel_runs, thread_name_prefix="onnx-run")
        options.intra_op_num_threads = threads
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
        self.pad_values = {"input_ids": int(parameters.get("pad_token_id", "0"))}
        self.length_buckets = np.array(
            sorted(int(bound) for bound in parameters.get("length_buckets", "").split(",") if bound.strip()),
            dtype=np.int64,
        )
        self.bucket_merge_tokens = int(parameters.get("bucket_merge_tokens", "0"))
        pb_utils.Logger.log_info(
            f"{args['model_name']}: onnxruntime providers {self.session.get_providers()}, inputs {self.input_names}, "
            f"length buckets {self.length_buckets.tolist()} (merged below {self.bucket_merge_tokens} tokens), "
            f"spinning threads {spinning}, parallel runs {self.parallel_runs}"
        )

    def execute(self, requests):
        arrays = [
            {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}
            for request in requests
        ]
        width = max(batch["input_ids"].shape[1] for batch in arrays)
        feed = {
            name: np.concatenate([self._pad(batch[name], width, self.pad_values.get(name, 0)) for batch in arrays])
            for name in self.input_names
        }
        outputs = self._run_bucketed(feed)
        responses = []
        offset = 0
        for batch in arrays:
            rows = batch["input_ids"].shape[0]
            tensor = pb_utils.Tensor(self.output_name, outputs[offset : offset + rows])
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            offset += rows
        return responses

    def _run_bucketed(self, feed):
        """One onnxruntime batch per length bucket, cut to that bucket's longest row; outputs in
        the original row order."""
        mask = feed["attention_mask"]
        # A row's length is one past its last attended position (padding is on the right).
        lengths = np.where(mask.any(axis=1), mask.shape[1] - np.argmax(mask[:, ::-1] != 0, axis=1), 1)
        buckets = np.searchsorted(self.length_buckets, lengths, side="left")
        calls = self._merged([np.flatnonzero(buckets == bucket) for bucket in np.unique(buckets)], lengths)

        def run(rows):
            width = int(lengths[rows].max())
            return self.session.run([self.output_name], {name: array[rows, :width] for name, array in feed.items()})[0]

        if self.pool is None:
            parts = [run(rows) for rows in calls]
        else:
            calls = self._spread(calls, lengths)
            parts = list(self.pool.map(run, calls)) if len(calls) > 1 else [run(calls[0])]
        outputs = np.empty((mask.shape[0], *parts[0].shape[1:]), dtype=np.float32)
        for rows, part in zip(calls, parts, strict=True):
            outputs[rows] = part
        return outputs

    def _spread(self, calls, lengths):
        """The calls, largest first (the pool starts them in this order), after splitting the
        largest by rows while there are fewer calls than parallel runs and the split pays: each
        half must still cost several times what a call costs beyond its tokens."""

        def cost(rows):
            return len(rows) * int(lengths[rows].max())

        calls = sorted(calls, key=cost, reverse=True)
        floor = 8 * max(self.bucket_merge_tokens, 1)
        while len(calls) < self.parallel_runs and len(calls[0]) > 1 and cost(calls[0]) >= 2 * floor:
            rows = calls.pop(0)
            rows = rows[np.argsort(lengths[rows], kind="stable")]
            half = int(np.searchsorted(np.cumsum(lengths[rows]), lengths[rows].sum() / 2)) + 1
            half = min(max(half, 1), len(rows) - 1)
            calls = sorted([*calls, rows[:half], rows[half:]], key=cost, reverse=True)
        return calls

    def _merged(self, groups, lengths):
        """Merges neighbouring groups (in length order) while padding the shorter group's rows to
        the longer one's width costs fewer tokens than the call saved, best merge first."""
        groups = [(rows, int(lengths[rows].max())) for rows in groups]
        while len(groups) > 1:
            savings = [
                self.bucket_merge_tokens - len(short) * (long_width - short_width)
                for (short, short_width), (_, long_width) in itertools.pairwise(groups)
            ]
            best = int(np.argmax(savings))
            if savings[best] <= 0:
                break
            (short, _), (long, long_width) = groups[best], groups[best + 1]
            groups[best : best + 2] = [(np.concatenate([short, long]), long_width)]
        return [rows for rows, _ in groups]

    @staticmethod
    def _pad(array, width, value):
        array = array.astype(np.int64, copy=False)
        if array.shape[1] == width:
            return array
        padded = np.full((array.shape[0], width), value, dtype=np.int64)
        padded[:, : array.shape[1]] = array
        return padded

    def finalize(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.session = None
