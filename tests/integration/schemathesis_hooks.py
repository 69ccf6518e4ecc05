"""Schemathesis hooks (loaded through SCHEMATHESIS_HOOKS by test_schemathesis.py).

Random model names all end in 404 after one registry lookup; to reach the inference service and
Triton with generated inputs, two of every three generated bodies name a model the stack serves.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import schemathesis

_MODELS = itertools.cycle([*os.environ.get("MODELPLANE_TEST_MODELS", "").split(","), ""])


@schemathesis.hook
def map_body(context: schemathesis.HookContext, body: Any) -> Any:
    model = next(_MODELS)
    if model and isinstance(body, dict) and isinstance(body.get("model"), str):
        return {**body, "model": model}
    return body
