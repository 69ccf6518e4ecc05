"""Chat templates: the model's own (tokenizer config, chat_template.jinja, GGUF metadata), else the
default of a known model family whose packages often ship without one.

The loader decides which template a model uses and records it in the serving profile; the
inference service only renders it.
"""

from __future__ import annotations

import json
from pathlib import Path

from modelplane.common.types import ModelCapabilities

# Gemma's turn format, as Google's own template writes it: `user` and `model` turns, a system
# message folded into the first user turn (Gemma has no system role). The base Gemma 3 GGUFs
# carry no template; the instruction-tuned ones use this exact format.
GEMMA = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] ~ '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' ~ ('model' if message['role'] == 'assistant' else message['role']) ~ '\n' }}"
    "{{ (first_user_prefix if loop.first else '') ~ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# Family defaults by architecture name (GGUF `general.architecture`, Hugging Face `model_type`).
_FAMILY_DEFAULTS = {"gemma": GEMMA, "gemma2": GEMMA, "gemma3": GEMMA, "gemma3_text": GEMMA}


def family_default(architecture: str) -> str:
    """The template of a known family, or "" when there is none."""
    return _FAMILY_DEFAULTS.get(architecture.lower(), "")


def from_tokenizer_files(folder: Path) -> str:
    """The template a Hugging Face tokenizer ships: transformers 5 writes chat_template.jinja,
    earlier versions a `chat_template` string (or a list of named templates) in tokenizer_config.json."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return ""
    template = json.loads(config.read_text()).get("chat_template") or ""
    if isinstance(template, list):
        named = {item.get("name"): item.get("template", "") for item in template if isinstance(item, dict)}
        template = named.get("default", "")
    return template if isinstance(template, str) else ""


def capabilities(template: str, constrained_decoding: bool) -> ModelCapabilities:
    """What a generation model served with this template can do. Tool calls need a template (a
    chat) and constrained decoding, so that their arguments always validate; they use the
    template's own Hermes form where it renders one, else modelplane's generic JSON form, which
    works with any template (the inference service decides which, from the template). No model
    served here reads images: vision needs a multimodal projector, which no model package
    modelplane knows ships."""
    return ModelCapabilities(
        tools=bool(template) and constrained_decoding,
        json_schema=constrained_decoding,
        reasoning="<think>" in template,
        vision=False,
    )
