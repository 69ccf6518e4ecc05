"""Small random-weight BERT encoders of the real architecture, saved as a user would save them.

They stand in for the many embedding models of a real deployment: several copies (each with its
own seed, so its own digest) make a memory budget tight enough to force evictions in seconds.
The tokenizer is all-MiniLM-L6-v2's, from the bundled package.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def save_tiny_bert(path: Path, minilm: Path, *, seed: int, hidden: int = 32, layers: int = 2) -> Path:
    """Writes a sentence-transformers BERT embedding model (mean pooling) to `path`."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    vocab = json.loads((minilm / "config.json").read_text())["vocab_size"]
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
    )
    BertModel(config).eval().save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm / name, path / name)
    (path / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": hidden, "pooling_mode_mean_tokens": True})
    )
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    return path
