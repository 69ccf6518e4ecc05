"""The embedding contenders, each behind one call: `await embed(texts)` returns the vectors.

Over the network: the gateway and infinity-emb (HTTP, one keep-alive connection per client),
the inference service (gRPC), Triton itself (tritonclient gRPC, tokenised and normalised by the
caller, as a user of Triton alone must). In this process: onnxruntime on the very ONNX file the
stack serves, and sentence-transformers (PyTorch) on the package's files; their calls run on a
thread pool, one thread per client, so concurrent clients run concurrently as in a web app.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

# The python-backend model's bounds (loader setting length_buckets): the bucketed in-process
# contender runs the computation modelplane's model runs, without any service around it.
LENGTH_BUCKETS = (12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class HttpEmbedder:
    """POST /v1/embeddings in OpenAI's format, over raw keep-alive HTTP/1.1 connections: a
    minimal client, so the load generator takes little of the shared CPU."""

    def __init__(self, name: str, port: int, model: str, path: str = "/v1/embeddings") -> None:
        self.name, self.port, self.model, self.path = name, port, model, path
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        body = json.dumps({"model": self.model, "input": list(texts), "encoding_format": "float"}).encode()
        head = b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        request = head % (self.path.encode(), len(body)) + body
        while self._idle:
            reader, writer = self._idle.pop()
            writer.write(request)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                # The server closed a connection that sat idle past its keep-alive timeout (uvicorn's is
                # 5 s) while other contenders ran; a real client reconnects too.
                writer.close()
                continue
            return await self._answer(reader, writer, head)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(request)
        return await self._answer(reader, writer, await reader.readuntil(b"\r\n\r\n"))

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes
    ) -> list[list[float]]:
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        if length is None:
            raise RuntimeError(f"{self.name}: a response without Content-Length: {head[:200]!r}")
        payload = await reader.readexactly(int(length.group(1)))
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{self.name}: {head[:40]!r} {payload[:300]!r}")
        self._idle.append((reader, writer))
        return [item["embedding"] for item in json.loads(payload)["data"]]

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


class InferenceGrpcEmbedder:
    """The inference service's Embed RPC: what the gateway calls, without the HTTP hop."""

    def __init__(self, address: str, model: str) -> None:
        import grpc  # noqa: PLC0415

        from modelplane.inference.v1 import inference_service_pb2 as pb  # noqa: PLC0415
        from modelplane.inference.v1 import inference_service_pb2_grpc as pb_grpc  # noqa: PLC0415

        self.name, self.model, self._pb = "inference gRPC", model, pb
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.InferenceServiceStub(self.channel)

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        pb = self._pb
        request = pb.EmbedRequest(model=self.model, inputs=[pb.EmbedInput(text=t) for t in texts])
        response = await self.stub.Embed(request, timeout=60)
        return [list(e.values) for e in response.embeddings]

    async def close(self) -> None:
        await self.channel.close()


def _tokenizer(model_path: Path, max_tokens: int):
    from tokenizers import Tokenizer  # noqa: PLC0415

    tokenizer = Tokenizer.from_file(str(model_path / "tokenizer.json"))
    tokenizer.enable_truncation(max_tokens)
    tokenizer.enable_padding()
    return tokenizer


def _feed(tokenizer, texts: Sequence[str], names: Sequence[str]) -> dict[str, np.ndarray]:
    encodings = tokenizer.encode_batch(list(texts))
    columns = {
        "input_ids": [e.ids for e in encodings],
        "attention_mask": [e.attention_mask for e in encodings],
        "token_type_ids": [e.type_ids for e in encodings],
    }
    return {name: np.asarray(columns[name], dtype=np.int64) for name in names}


def _normalise(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


class TritonEmbedder:
    """Triton directly: the caller tokenises (the model's own tokenizer), calls Triton's gRPC
    API with tritonclient's asyncio client, and normalises, as the inference service does."""

    def __init__(self, address: str, model: str, model_path: Path, max_tokens: int) -> None:
        from tritonclient.grpc import aio  # noqa: PLC0415

        self.name, self.model = "Triton direct", model
        self.client = aio.InferenceServerClient(address)
        self.tokenizer = _tokenizer(model_path, max_tokens)
        self.inputs: list[str] = []
        self.output = ""

    async def start(self) -> None:
        metadata = await self.client.get_model_metadata(self.model, as_json=True)
        self.inputs = [item["name"] for item in metadata["inputs"]]
        self.output = metadata["outputs"][0]["name"]

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        from tritonclient.grpc import InferInput, InferRequestedOutput  # noqa: PLC0415

        tensors = []
        for name, array in _feed(self.tokenizer, texts, self.inputs).items():
            tensor = InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        result = await self.client.infer(self.model, tensors, outputs=[InferRequestedOutput(self.output)])
        return _normalise(result.as_numpy(self.output)).tolist()

    async def close(self) -> None:
        await self.client.close()


class _InProcess:
    """Runs a blocking embed on its own thread pool (one thread per concurrent client)."""

    name = ""

    def __init__(self, threads: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-embed")

    def embed_sync(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors = await asyncio.get_running_loop().run_in_executor(self.pool, self.embed_sync, texts)
        return vectors.tolist()

    async def close(self) -> None:
        self.pool.shutdown(wait=True)


class OnnxEmbedder(_InProcess):
    """onnxruntime in this process on the stack's own converted model.onnx (pooling in the graph),
    with the session options modelplane's model uses (all cores, threads that do not spin).
    `bucketed=False` pads each call to its longest text, as tokenizers and sentence-transformers
    do; `bucketed=True` runs each sequence-length bucket separately, as modelplane's model does."""

    def __init__(self, onnx_path: Path, model_path: Path, max_tokens: int, *, bucketed: bool, threads: int) -> None:
        import onnxruntime as ort  # noqa: PLC0415

        super().__init__(threads)
        self.name = "onnxruntime in-process" + (", bucketed" if bucketed else "")
        self.bucketed = bucketed
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.inputs = [item.name for item in self.session.get_inputs()]
        self.tokenizer = _tokenizer(model_path, max_tokens)

    def embed_sync(self, texts: Sequence[str]) -> np.ndarray:
        if not self.bucketed:
            return _normalise(self.session.run(None, _feed(self.tokenizer, texts, self.inputs))[0])
        # The tokenizer pads a batch to its longest text: a text's own length is its attended tokens.
        lengths = [sum(e.attention_mask) for e in self.tokenizer.encode_batch(list(texts))]
        buckets = np.searchsorted(LENGTH_BUCKETS, lengths, side="left")
        out: np.ndarray | None = None
        for bucket in np.unique(buckets):
            rows = np.flatnonzero(buckets == bucket)
            vectors = self.session.run(None, _feed(self.tokenizer, [texts[r] for r in rows], self.inputs))[0]
            if out is None:
                out = np.empty((len(texts), vectors.shape[1]), dtype=vectors.dtype)
            out[rows] = vectors
        assert out is not None
        return _normalise(out)


class SentenceTransformerEmbedder(_InProcess):
    """sentence-transformers (PyTorch, CPU) in this process: `SentenceTransformer(path).encode`."""

    def __init__(self, model_path: Path, *, threads: int) -> None:
        from sentence_transformers import SentenceTransformer  # noqa: PLC0415

        super().__init__(threads)
        self.name = "sentence-transformers in-process"
        self.model = SentenceTransformer(str(model_path), device="cpu")

    def embed_sync(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.encode(list(texts), batch_size=32, normalize_embeddings=True, show_progress_bar=False)
