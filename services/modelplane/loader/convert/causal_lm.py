"""Convert a Hugging Face causal LM to ONNX with a KV cache (onnxruntime-genai's model builder) and
prove it: greedy decoding of the export gives exactly the token ids of `transformers.generate`.

Runs in a subprocess of the loader (`python -m modelplane.loader.convert.causal_lm`): it imports
PyTorch and transformers, takes about twice the fp32 weights in memory, and the builder prints
freely (its output goes to stderr, so stdout carries only the report). Prints one JSON object (the
report, or {"error": ...}) on stdout.

The builder is driven through its Python API rather than its CLI so the Hugging Face config can be
adapted in memory first: with transformers 5 some configs carry a layout the builder (0.18) does not
read. Gemma 3 keeps one RoPE block per attention type (`rope_parameters = {"full_attention": ...,
"sliding_attention": ...}`) where the builder expects transformers 4's `rope_theta` and
`rope_local_base_freq`, and fails with `KeyError: 'rope_type'`; `_ADAPTERS` maps it back per
architecture, without touching the package's files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from modelplane.loader.convert.weights import PICKLE_SUFFIXES, UnsafeWeights, as_safetensors

CONVERTER_VERSION = "causal-lm-1"
# Architectures whose export has been checked token for token against transformers by tests with
# tiny random-weight models. The builder knows more; those convert too, and the parity check below
# is what decides whether they are served.
VERIFIED_ARCHITECTURES = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "Gemma3ForCausalLM"})
# Files serving needs beside model.onnx: the tokenizer (the Triton model tokenises with the
# `tokenizers` library), the chat template and the generation defaults (end-of-sequence ids).
SERVING_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
PARITY_PROMPTS = (
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. Once upon a time, there was a little girl who loved to read.",
    "Grüße aus München! 日本語のテキスト 🙂",
)
PARITY_NEW_TOKENS = 16


class ConversionError(Exception):
    """A conversion that cannot succeed; the message says what a person can do about it."""


@dataclass
class ParityRow:
    prompt: str
    prompt_tokens: int
    tokens_equal: bool
    generated: int
    max_abs_logit_diff: float


@dataclass
class CausalLmReport:
    converter_version: str
    architecture: str
    model_type: str
    context_length: int
    precision: str
    seconds: float
    verified_architecture: bool
    weights: str
    adapters_applied: list[str] = field(default_factory=list)
    parity: list[ParityRow] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)


def _adapt_gemma3_rope(config: Any) -> bool:
    rope = getattr(config, "rope_parameters", None)
    if not (isinstance(rope, dict) and "full_attention" in rope and "sliding_attention" in rope):
        return False
    full, local = rope["full_attention"], rope["sliding_attention"]
    if full.get("rope_type", "default") != "default" or local.get("rope_type", "default") != "default":
        # Gemma 3 4B and larger scale the global RoPE linearly; the builder would apply one scaling
        # to both caches and the local layers would come out wrong. Refuse rather than mis-convert.
        raise ConversionError(
            f"Gemma 3 with scaled RoPE ({full.get('rope_type')}/{local.get('rope_type')}) is not supported by this "
            "converter yet; serve this model as a GGUF instead."
        )
    config.rope_parameters = dict(full)
    config.rope_theta = full["rope_theta"]
    config.rope_local_base_freq = local["rope_theta"]
    return True


_ADAPTERS: dict[str, list[Callable[[Any], bool]]] = {"Gemma3ForCausalLM": [_adapt_gemma3_rope]}


def _preflight(source: Path) -> tuple[str, str]:
    config_path = source / "config.json"
    if not config_path.is_file():
        raise ConversionError("The package has no config.json: it is not a Hugging Face model directory.")
    if not (source / "tokenizer.json").is_file():
        raise ConversionError(
            "The package has no tokenizer.json; a causal LM is served with its own tokenizer, so save it beside "
            "the weights (tokenizer.save_pretrained) and register the package again."
        )
    config = json.loads(config_path.read_text())
    architectures = config.get("architectures") or []
    if not architectures or not architectures[0].endswith("ForCausalLM"):
        raise ConversionError(
            f"config.json names architectures {architectures}; a generation model must be a *ForCausalLM "
            "(text-only) architecture."
        )
    return architectures[0], str(config.get("model_type", ""))


def _versions() -> dict[str, str]:
    names = ("onnxruntime-genai", "onnxruntime", "transformers", "torch", "onnx", "onnx-ir", "tokenizers")
    found = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def _build(source: Path, output: Path, architecture: str, precision: str) -> list[str]:
    from onnxruntime_genai.models import builder  # noqa: PLC0415 - heavy; only the subprocess needs it

    cache = output.with_name(output.name + ".hf-cache")
    try:
        options = builder.parse_extra_options(None, str(source), str(output), precision, "cpu", str(cache), None)
        config = options["hf_details"]["hf_config"]
        applied = [adapt.__name__ for adapt in _ADAPTERS.get(architecture, []) if adapt(config)]
        builder.create_model(None, str(source), str(output), precision, "cpu", str(cache), **options)
    except NotImplementedError as error:
        raise ConversionError(f"onnxruntime-genai's model builder cannot convert {architecture}: {error}") from None
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return applied


def _parity(source: Path, output: Path) -> list[ParityRow]:
    """Greedy ids of the export against transformers' generate, fed the same prompt ids."""
    import numpy as np  # noqa: PLC0415
    import onnxruntime_genai as og  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from tokenizers import Tokenizer  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    config = og.Config(str(output))
    config.clear_providers()
    exported = og.Model(config)
    decoder = json.loads((output / "genai_config.json").read_text())["model"]["decoder"]
    # onnxruntime-genai 0.18 refuses a KV cache shorter than a sliding window (see ortgenai/model.py).
    window = int(decoder.get("sliding_window", {}).get("window_size", 0))
    rows = []
    for prompt in PARITY_PROMPTS:
        ids = tokenizer.encode(prompt).ids
        with torch.no_grad():
            tensor = torch.tensor([ids])
            logits = reference(input_ids=tensor).logits[0, -1].numpy()
            out = reference.generate(
                input_ids=tensor,
                attention_mask=torch.ones_like(tensor),
                do_sample=False,
                max_new_tokens=PARITY_NEW_TOKENS,
            )
        expected = out[0, len(ids) :].tolist()
        params = og.GeneratorParams(exported)
        params.set_search_options(do_sample=False, max_length=max(len(ids) + PARITY_NEW_TOKENS, window))
        generator = og.Generator(exported, params)
        generator.append_tokens(ids)
        first_logits = generator.get_logits()[0, -1].copy()
        got: list[int] = []
        while not generator.is_done() and len(got) < len(expected):
            generator.generate_next_token()
            got.append(int(generator.get_next_tokens()[0]))
        rows.append(
            ParityRow(
                prompt=prompt,
                prompt_tokens=len(ids),
                tokens_equal=got == expected,
                generated=len(expected),
                max_abs_logit_diff=float(np.abs(logits - first_logits).max()),
            )
        )
    return rows


def convert(source: Path, output: Path, precision: str = "fp32") -> CausalLmReport:
    started = time.perf_counter()
    architecture, model_type = _preflight(source)
    if precision != "fp32":
        raise ConversionError(
            f"Precision {precision} is not offered for causal LMs on the embedded CPU target: only fp32 exports are "
            "proven token for token against PyTorch. Register the model without a precision hint (or serve a "
            "quantised GGUF)."
        )
    weights = "safetensors"
    if not any(source.glob("*.safetensors")):
        if not any(source.glob(f"*{suffix}") for suffix in PICKLE_SUFFIXES):
            raise ConversionError("The package has no *.safetensors (or PyTorch .bin) weights.")
        try:
            source = as_safetensors(source, output.parent / f".{output.name}-weights")
        except UnsafeWeights as error:
            raise ConversionError(str(error)) from None
        weights = "pytorch pickle (weights_only=True) → safetensors"
    try:
        applied = _build(source, output, architecture, precision)
        for name in SERVING_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, output / name)
        parity = _parity(source, output)
    finally:
        if weights != "safetensors":
            shutil.rmtree(source, ignore_errors=True)
    failed = [row for row in parity if not row.tokens_equal]
    if failed:
        raise ConversionError(
            f"The ONNX export of this {architecture} does not decode like PyTorch: greedy tokens differ for "
            f"{len(failed)} of {len(parity)} test prompts (largest first-step logit difference "
            f"{max(r.max_abs_logit_diff for r in failed):.2e}). The architecture is not served correctly by "
            "onnxruntime-genai's builder; serve it as a GGUF instead."
        )
    genai = json.loads((output / "genai_config.json").read_text())["model"]
    return CausalLmReport(
        converter_version=CONVERTER_VERSION,
        architecture=architecture,
        model_type=model_type,
        context_length=int(genai["context_length"]),
        precision=precision,
        seconds=round(time.perf_counter() - started, 2),
        verified_architecture=architecture in VERIFIED_ARCHITECTURES,
        weights=weights,
        adapters_applied=applied,
        parity=parity,
        files=sorted(p.name for p in output.iterdir() if p.is_file()),
        versions=_versions(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args(argv)
    stdout = sys.stdout
    sys.stdout = sys.stderr  # the builder prints progress; stdout carries only the report
    try:
        report = convert(args.source, args.output, args.precision)
    except ConversionError as error:
        print(json.dumps({"error": str(error)}), file=stdout)
        return 1
    finally:
        sys.stdout = stdout
    print(json.dumps(asdict(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
