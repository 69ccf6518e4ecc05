"""Causal language models for chat and completion: GGUF files served by llama.cpp (xllamacpp), and Hugging Face
causal LMs exported to ONNX with a KV cache and served by onnxruntime-genai. Both run in Triton as
decoupled python-backend models with the tensors of Triton's own LLM backends (`text_input`,
`sampling_parameters` in; `text_output` streamed out with token counts), so the inference service
speaks to either, or to a production vLLM/TensorRT-LLM model, the same way."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from modelplane.common.types import Model, ModelFormat, ServingProfile, Task
from modelplane.loader import chat_templates
from modelplane.loader.builders import ArtifactBuilder, RepositoryEntry, read_assets
from modelplane.loader.conversion import run_converter
from modelplane.loader.convert import causal_lm, gguf
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.triton_repo import TritonModelConfig, python_model_source

_LLAMA_CONTEXT_STEP = 256


def _llm_config(name: str, parameters: dict[str, str]) -> TritonModelConfig:
    # The tensors and the decoupled policy come from the model's auto_complete_config. One instance:
    # concurrency lives inside it (engine slots), since more instances would each hold the weights and
    # Triton would not balance decoupled requests between them by load.
    return TritonModelConfig(name=name, inputs=[], outputs=[], backend="python", parameters=parameters)


def _model_files(kind: str, helper: str) -> dict[str, Path]:
    # A python-backend model imports only from its own version folder, so the module the LLM
    # models share is copied there too.
    source = python_model_source(kind)
    shared = source.parent.with_name("llm_protocol.py")
    return {"model.py": source, helper: source.with_name(helper), shared.name: shared}


def _template(model: Model, own: str, architecture: str) -> str:
    return model.spec.runtime_hints.chat_template or own or chat_templates.family_default(architecture)


class GgufBuilder(ArtifactBuilder):
    converter_version = gguf.CONVERTER_VERSION

    def accepts(self, model_format: ModelFormat, task: Task) -> bool:
        return model_format == ModelFormat.GGUF and task == Task.GENERATION

    async def build(self, model: Model, package: Path, artifact: Path, settings: LoaderSettings) -> dict[str, Any]:
        command = [sys.executable, "-m", "modelplane.loader.convert.gguf", "--source", str(package)]
        return await run_converter(command, settings.load_timeout_seconds)

    def describe(self, report: dict[str, Any]) -> str:
        template = "its own chat template" if report.get("chat_template") else "no chat template of its own"
        return f"staged; GGUF {report['architecture']} ({report['name'] or report['gguf_file']}), {template}"

    def entry(
        self, model: Model, package: Path, artifact: Path, report: dict[str, Any], settings: LoaderSettings
    ) -> RepositoryEntry:
        trained = int(report.get("context_length") or 0)
        context = model.spec.runtime_hints.context_length or settings.llm_context_length
        if trained:
            context = min(context, trained)
        # llama.cpp rounds a context up to a multiple of 256 tokens; the profile says what it really holds.
        context = -(-context // _LLAMA_CONTEXT_STEP) * _LLAMA_CONTEXT_STEP
        parameters = {
            "gguf_path": report["gguf_file"],
            "n_ctx": str(context),
            "engine_slots": str(settings.llm_engine_slots),
            "max_queue_size": str(settings.llm_max_queue_size),
        }
        if report.get("adds_bos_token", True) and report.get("bos_token"):
            # llama.cpp adds the BOS token itself; a template that writes it too would give two.
            parameters["strip_prefix"] = report["bos_token"]
        config = _llm_config(model.name, parameters)
        files = {**_model_files("llamacpp", "llama_text.py"), report["gguf_file"]: package / report["gguf_file"]}
        template = _template(model, report.get("chat_template", ""), report.get("architecture", ""))
        profile = ServingProfile(
            triton_model_name=model.name,
            chat_template=template,
            # llama.cpp constrains decoding to JSON schemas (LLGuidance).
            capabilities=chat_templates.capabilities(template, constrained_decoding=True),
            context_length=context,
            special_tokens={"bos_token": report.get("bos_token", ""), "eos_token": report.get("eos_token", "")},
            # Each slot allocates its KV cache for the whole context when it is created.
            runtime_memory_bytes=int(report.get("kv_bytes_per_token", 0)) * context * settings.llm_engine_slots,
        )
        return RepositoryEntry(config=config, files=files, profile=profile)


def _special_token(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _genai_kv_bytes(artifact: Path, requests: int) -> int:
    """The fp32 KV caches of `requests` generators at the full context: an upper bound (sliding-window
    layers need less), the same order as the weights for long contexts."""
    genai = json.loads((artifact / "genai_config.json").read_text())["model"]
    decoder = genai["decoder"]
    per_token = 2 * decoder["num_hidden_layers"] * decoder["num_key_value_heads"] * decoder["head_size"] * 4
    return per_token * int(genai["context_length"]) * requests


class CausalLmBuilder(ArtifactBuilder):
    converter_version = causal_lm.CONVERTER_VERSION

    def accepts(self, model_format: ModelFormat, task: Task) -> bool:
        return model_format in (ModelFormat.HUGGINGFACE, ModelFormat.PYTORCH) and task == Task.GENERATION

    async def build(self, model: Model, package: Path, artifact: Path, settings: LoaderSettings) -> dict[str, Any]:
        command = [
            sys.executable,
            "-m",
            "modelplane.loader.convert.causal_lm",
            "--source",
            str(package),
            "--output",
            str(artifact),
        ]
        return await run_converter(command, settings.load_timeout_seconds)

    def describe(self, report: dict[str, Any]) -> str:
        prompts = len(report["parity"])
        verified = "" if report["verified_architecture"] else " (an architecture not verified by modelplane's tests)"
        return (
            f"staged; {report['architecture']}{verified} exported to ONNX with a KV cache; greedy decoding equals "
            f"transformers.generate on {prompts} of {prompts} test prompts"
        )

    def entry(
        self, model: Model, package: Path, artifact: Path, report: dict[str, Any], settings: LoaderSettings
    ) -> RepositoryEntry:
        config = _llm_config(
            model.name,
            {
                "model_path": ".",
                "intra_op_num_threads": str(settings.onnx_intra_op_threads),
                "max_active_requests": str(settings.llm_engine_slots),
            },
        )
        files = {
            **_model_files("ortgenai", "genai_text.py"),
            **{name: artifact / name for name in report["files"]},
        }
        tokenizer_config = artifact / "tokenizer_config.json"
        special = json.loads(tokenizer_config.read_text()) if tokenizer_config.is_file() else {}
        context = min(model.spec.runtime_hints.context_length or report["context_length"], report["context_length"])
        template = _template(model, chat_templates.from_tokenizer_files(artifact), report["model_type"])
        profile = ServingProfile(
            triton_model_name=model.name,
            chat_template=template,
            # onnxruntime-genai's generator is not constrained here: no tools, no response_format.
            capabilities=chat_templates.capabilities(template, constrained_decoding=False),
            context_length=context,
            special_tokens={key: _special_token(special.get(key)) for key in ("bos_token", "eos_token")},
            runtime_memory_bytes=_genai_kv_bytes(artifact, settings.llm_engine_slots),
        )
        return RepositoryEntry(config=config, files=files, profile=profile, assets=read_assets(artifact))
