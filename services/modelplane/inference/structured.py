"""Structured output: the JSON schemas a request constrains the output with (response_format, and
the tools' parameter schemas), checked before they become a grammar, and the `guided_decoding`
sampling parameter of Triton's vLLM convention that carries them to the model.

llama.cpp compiles a schema with LLGuidance while it samples; a schema it cannot compile is then
ignored without an error (measured with xllamacpp 2026.10: a `$ref` that resolves nowhere, an
unknown type, a lookbehind pattern each gave unconstrained text). So every schema is checked
here first, and a constrained answer is validated once more when it is complete: a model never
answers unconstrained while the caller believes otherwise.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError

from modelplane.inference.errors import InvalidRequest

# Lookaround and backreferences: LLGuidance's regular expressions (those of Rust's regex crate)
# have neither, and a pattern that uses them cannot be enforced token by token.
_UNENFORCEABLE_PATTERN = re.compile(r"\(\?<?[=!]|\\[1-9]|\\k<")
# Where a JSON schema holds other schemas: maps of them, lists of them, or one.
_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
_SCHEMA_LISTS = {"anyOf", "oneOf", "allOf", "prefixItems"}
_SCHEMAS = {"items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames"}
_BOUNDS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
_INTEGER_LIMIT = 2**53 - 1
_NUMBER_LIMIT = 1e15


class ResponseFormatType(enum.IntEnum):
    UNSPECIFIED = 0
    TEXT = 1
    JSON_OBJECT = 2
    JSON_SCHEMA = 3


@dataclass(frozen=True)
class ResponseFormat:
    type: ResponseFormatType = ResponseFormatType.UNSPECIFIED
    schema_json: str = ""
    name: str = ""

    @property
    def constrained(self) -> bool:
        return self.type in (ResponseFormatType.JSON_OBJECT, ResponseFormatType.JSON_SCHEMA)


def response_schema(response_format: ResponseFormat, param: str = "response_format") -> dict[str, Any] | None:
    """The checked JSON schema the answer must satisfy, or None for free text."""
    if response_format.type == ResponseFormatType.JSON_OBJECT:
        return {"type": "object"}
    if response_format.type != ResponseFormatType.JSON_SCHEMA:
        return None
    label = f"response_format.json_schema '{response_format.name}'" if response_format.name else param
    return parse_schema(response_format.schema_json, label, f"{param}.json_schema.schema")


def parse_schema(text: str, label: str, param: str) -> dict[str, Any]:
    """A JSON schema given as JSON text, checked (see check_schema)."""
    try:
        schema = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as error:
        raise InvalidRequest(f"The {label} is not valid JSON: {error}.", metadata={"param": param}) from None
    check_schema(schema, label, param)
    return schema


def check_schema(schema: Any, label: str, param: str) -> None:
    """Refuses, naming the problem, a schema that is not a valid JSON schema (Draft 2020-12) or
    that constrained decoding cannot enforce."""

    def refuse(problem: str) -> InvalidRequest:
        return InvalidRequest(f"The {label} cannot be used: {problem}", metadata={"param": param})

    if not isinstance(schema, dict):
        raise refuse(f"a JSON schema is a JSON object, not {type(schema).__name__}.")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except SchemaError as error:
        where = "/".join(str(p) for p in error.absolute_path) or "the top level"
        raise refuse(f"it is not a valid JSON schema ({error.message} at {where}).") from None
    for path, node in _nodes(schema, ""):
        ref = node.get("$ref")
        if isinstance(ref, str) and _resolve(schema, ref) is None:
            raise refuse(
                f"its $ref '{ref}' at {path or '/'} does not point inside the schema; define what it refers to "
                "under $defs and refer to it as '#/$defs/NAME'."
            )
        pattern = node.get("pattern")
        patterns = [pattern] if isinstance(pattern, str) else []
        if isinstance(node.get("patternProperties"), dict):
            patterns.extend(node["patternProperties"])
        for expression in patterns:
            if _UNENFORCEABLE_PATTERN.search(expression):
                raise refuse(
                    f"the pattern '{expression}' at {path or '/'} uses lookaround or a backreference, which output "
                    "constrained token by token cannot enforce; rewrite it without them."
                )


def validate_output(text: str, schema: dict[str, Any]) -> str | None:
    """Why a complete constrained answer fails its schema, or None when it is valid."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return f"it is not JSON ({error})"
    try:
        jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator)
    except jsonschema.ValidationError as error:
        return error.message
    return None


def guided_decoding(schema: dict[str, Any]) -> dict[str, Any]:
    """The `guided_decoding` sampling parameter (vLLM's GuidedDecodingParams) for a schema."""
    return {"json": schema}


def finite(schema: Any) -> Any:
    """The schema with every object that lists its properties closed to others
    (`additionalProperties: false` where the schema says nothing about them) and every number
    bounded (|n| < 2^53 for integers, 1e15 for numbers, where the schema sets no bound). Whatever
    this schema accepts, the original accepts too; but a small model constrained by the original
    never finished (measured with SmolLM2-135M: it filled a tool's open arguments object with
    invented properties, and wrote the digits of an unbounded integer, until max_tokens)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: finite(item) for name, item in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [finite(item) for item in value]
        elif key in _SCHEMAS:
            out[key] = finite(value)
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    kinds = out.get("type") if isinstance(out.get("type"), list) else [out.get("type")]
    if ("integer" in kinds or "number" in kinds) and not _BOUNDS & set(out):
        limit = _INTEGER_LIMIT if "number" not in kinds else _NUMBER_LIMIT
        out["minimum"], out["maximum"] = -limit, limit
    return out


def _nodes(value: Any, path: str):
    if isinstance(value, dict):
        yield path, value
        for key, item in value.items():
            yield from _nodes(item, f"{path}/{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _nodes(item, f"{path}/{index}")


def _resolve(schema: dict[str, Any], ref: str) -> Any:
    if not ref.startswith("#"):
        return None  # remote documents are never fetched
    node: Any = schema
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node
