"""Read what serving a GGUF needs from its metadata: architecture, trained context, chat template,
special tokens and the KV cache's size per token. A GGUF is served as it is (no conversion).

The metadata is read by this module itself (GGUF's header is a list of typed key-value pairs,
github.com/ggml-org/ggml docs/gguf.md), not by llama.cpp: no weights are touched, and a malformed
file fails with a reason instead of aborting a C library. Still run as a subprocess of the loader
(`python -m modelplane.loader.convert.gguf`) like every converter, printing one JSON object (the
report, or {"error": ...}) on stdout.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path
from typing import Any, BinaryIO

CONVERTER_VERSION = "gguf-2"
# llama.cpp keeps the KV cache in fp16 unless told otherwise.
_KV_BYTES_PER_VALUE = 2
# GGUF value types: struct formats of the scalars; 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Arrays kept whole; the others (merges, scores, token types: megabytes) are skipped.
_KEPT_ARRAYS = {"tokenizer.ggml.tokens"}


class GgufError(ValueError):
    pass


def _read(stream: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = stream.read(size)
    if len(data) != size:
        raise GgufError("the file ends inside its metadata")
    return struct.unpack(fmt, data)[0]


def _string(stream: BinaryIO) -> str:
    length = _read(stream, "<Q")
    if length > 1 << 26:
        raise GgufError(f"a metadata string claims {length} bytes")
    data = stream.read(length)
    if len(data) != length:
        raise GgufError("the file ends inside its metadata")
    return data.decode("utf-8", errors="replace")


def _value(stream: BinaryIO, kind: int, keep: bool = True) -> Any:
    if kind in _SCALARS:
        return _read(stream, _SCALARS[kind])
    if kind == _STRING:
        return _string(stream)
    if kind == _ARRAY:
        item_kind, count = _read(stream, "<I"), _read(stream, "<Q")
        if not keep and item_kind in _SCALARS:
            stream.seek(count * struct.calcsize(_SCALARS[item_kind]), 1)
            return None
        items = [_value(stream, item_kind) for _ in range(count)]
        return items if keep else None
    raise GgufError(f"unknown metadata value type {kind}")


def read_metadata(path: Path) -> dict[str, Any]:
    """The GGUF's key-value metadata (large arrays other than the token list left out)."""
    with path.open("rb") as stream:
        if stream.read(4) != b"GGUF":
            raise GgufError("it does not start with the GGUF magic bytes")
        version = _read(stream, "<I")
        if version not in (2, 3):
            raise GgufError(f"GGUF version {version} is not supported (2 and 3 are)")
        _read(stream, "<Q")  # tensor count
        pairs = _read(stream, "<Q")
        if pairs > 1 << 20:
            raise GgufError(f"it claims {pairs} metadata entries")
        values: dict[str, Any] = {}
        for _ in range(pairs):
            key = _string(stream)
            kind = _read(stream, "<I")
            value = _value(stream, kind, keep=kind != _ARRAY or key in _KEPT_ARRAYS)
            if value is not None:
                values[key] = value
        return values


def _number(values: dict[str, Any], key: str, default: int = 0) -> int:
    value = values.get(key, default)
    return int(value) if isinstance(value, int | float) else default


def inspect_gguf(path: Path) -> dict[str, Any]:
    values = read_metadata(path)
    arch = values.get("general.architecture", "")
    layers = _number(values, f"{arch}.block_count")
    heads = _number(values, f"{arch}.attention.head_count")
    kv_heads = _number(values, f"{arch}.attention.head_count_kv", heads)
    width = _number(values, f"{arch}.embedding_length")
    key_length = _number(values, f"{arch}.attention.key_length", width // heads if heads else 0)
    value_length = _number(values, f"{arch}.attention.value_length", key_length)
    tokens = values.get("tokenizer.ggml.tokens") or []

    def text(key: str) -> str:
        token = values.get(key)
        return tokens[token] if isinstance(token, int) and 0 <= token < len(tokens) else ""

    return {
        "gguf_file": path.name,
        "architecture": arch,
        "name": values.get("general.name", ""),
        "context_length": _number(values, f"{arch}.context_length"),
        "chat_template": values.get("tokenizer.chat_template", ""),
        "bos_token": text("tokenizer.ggml.bos_token_id"),
        "eos_token": text("tokenizer.ggml.eos_token_id"),
        # llama.cpp adds the BOS token to every prompt unless the file says not to.
        "adds_bos_token": bool(values.get("tokenizer.ggml.add_bos_token", True)),
        "kv_bytes_per_token": layers * kv_heads * (key_length + value_length) * _KV_BYTES_PER_VALUE,
    }


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
    except (GgufError, OSError) as error:
        print(json.dumps({"error": f"{ggufs[0].name} is not a readable GGUF file: {error}"}))
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
