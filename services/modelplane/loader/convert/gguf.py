"""Read what serving a GGUF needs from its metadata: architecture, trained context, chat template,
special tokens and the KV cache's size per token. A GGUF is served as it is (no conversion).

Runs in a subprocess of the loader (`python -m modelplane.loader.convert.gguf`), because llama.cpp
is a C library that may abort on a malformed file: the loader must survive that. Reads only the
vocabulary and metadata (`vocab_only`), not the weights: about half a second for Gemma 3 270M.
Prints one JSON object (the report, or {"error": ...}) on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

CONVERTER_VERSION = "gguf-1"
# llama.cpp keeps the KV cache in fp16 unless told otherwise.
_KV_BYTES_PER_VALUE = 2


def _number(values: dict[str, str], key: str, default: int = 0) -> int:
    try:
        return int(float(values.get(key, default)))
    except ValueError:
        return default


def inspect_gguf(path: Path) -> dict[str, Any]:
    from llama_cpp import Llama  # noqa: PLC0415 - only in the subprocess

    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        values = dict(llm.metadata)
        arch = values.get("general.architecture", "")
        layers = _number(values, f"{arch}.block_count")
        heads = _number(values, f"{arch}.attention.head_count")
        kv_heads = _number(values, f"{arch}.attention.head_count_kv", heads)
        width = _number(values, f"{arch}.embedding_length")
        key_length = _number(values, f"{arch}.attention.key_length", width // heads if heads else 0)
        value_length = _number(values, f"{arch}.attention.value_length", key_length)

        def text(token: int) -> str:
            return llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

        return {
            "gguf_file": path.name,
            "architecture": arch,
            "name": values.get("general.name", ""),
            "context_length": _number(values, f"{arch}.context_length"),
            "chat_template": values.get("tokenizer.chat_template", ""),
            "bos_token": text(llm.token_bos()),
            "eos_token": text(llm.token_eos()),
            "kv_bytes_per_token": layers * kv_heads * (key_length + value_length) * _KV_BYTES_PER_VALUE,
            "versions": {"llama_cpp_python": metadata.version("llama_cpp_python")},
        }
    finally:
        llm.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="the package directory")
    args = parser.parse_args(argv)
    ggufs = sorted(p for p in args.source.iterdir() if p.suffix == ".gguf" and p.is_file())
    if len(ggufs) != 1:
        found = ", ".join(p.name for p in ggufs) or "none"
        print(json.dumps({"error": f"a GGUF package must hold exactly one .gguf file (found: {found})"}))
        return 1
    try:
        report = inspect_gguf(ggufs[0])
    except (ValueError, RuntimeError) as error:
        print(json.dumps({"error": f"llama.cpp could not read {ggufs[0].name}: {error}"}))
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
