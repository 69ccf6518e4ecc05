"""Small random-weight causal LMs of real architectures, saved as a user would save them.

No model hub is reachable, so each model gets a byte-level BPE tokenizer trained here on a few
sentences, saved beside the weights with its chat template. Weights are drawn wider than the usual
0.02, so next-token logits have clear winners and greedy parity between two runtimes tests the
export rather than float rounding. RoPE bases are the architectures' real ones (not 10000), so an
exporter that ignored them would fail parity.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Once upon a time, there was a little girl who loved to read books about the sea.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Triton serves models over gRPC; the loader converts them and the gateway speaks HTTP.",
    "Grüße aus München! Ça va? 日本語のテキストも少し。",
    "def add(a, b):\n    return a + b\n",
] * 4
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ARCHITECTURES = ("llama", "qwen2")


def build_causal_lm(architecture: str, target: Path, seed: int = 0) -> Path:
    """Saves a 2-layer random `architecture` ("llama" or "qwen2") with its tokenizer into `target`."""
    import torch  # heavy: only the tests that build models import it
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
    )

    torch.manual_seed(seed)
    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS, trainer)
    if architecture == "llama":  # Llama prepends <bos>; Qwen2 does not
        raw.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", special_tokens=[("<|bos|>", raw.token_to_id("<|bos|>"))]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>", model_max_length=256
    )
    tokenizer.chat_template = CHATML
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in ("bos", "eos", "pad")}
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        tie_word_embeddings=False,
    )
    if architecture == "llama":
        config = LlamaConfig(
            **common,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            architectures=["LlamaForCausalLM"],
        )
    elif architecture == "qwen2":
        rope = {"rope_type": "default", "rope_theta": 1e6}
        config = Qwen2Config(**common, rope_parameters=rope, architectures=["Qwen2ForCausalLM"])
    else:
        raise ValueError(f"unknown architecture {architecture!r}")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def greedy_reference(model_dir: Path, prompt: str, max_new_tokens: int) -> tuple[list[int], list[int], str]:
    """(prompt ids, generated ids, generated text) from transformers.generate, greedy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    prompt_ids = inputs["input_ids"][0].tolist()
    generated = output[0][len(prompt_ids) :].tolist()
    return prompt_ids, generated, tokenizer.decode(generated, skip_special_tokens=True)
