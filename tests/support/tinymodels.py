"""Tiny random-weight host models of every layout the service claims (built from each architecture's config
class, no download), shared by the hook and the downstream-metrics tests."""

from __future__ import annotations

import torch
import transformers as tf

_SMALL = dict(num_hidden_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=101)
CONFIGS = {
    "gpt2": lambda: tf.GPT2Config(
        n_layer=3, n_embd=64, n_head=4, vocab_size=101, n_positions=64, bos_token_id=0, eos_token_id=0
    ),
    "llama": lambda: tf.LlamaConfig(**_SMALL, num_key_value_heads=2),
    "gemma2": lambda: tf.Gemma2Config(**_SMALL, num_key_value_heads=2, head_dim=24, sliding_window=4),
    "gemma3": lambda: tf.Gemma3TextConfig(**_SMALL, num_key_value_heads=2, head_dim=24, sliding_window=4),
    "qwen2": lambda: tf.Qwen2Config(**_SMALL, num_key_value_heads=2),
    "qwen3": lambda: tf.Qwen3Config(**_SMALL, num_key_value_heads=2, head_dim=24),
    "gpt_neox": lambda: tf.GPTNeoXConfig(**_SMALL),
    "mistral": lambda: tf.MistralConfig(**_SMALL, num_key_value_heads=2, sliding_window=4),
}
"""Each layout the service claims, as a 3-block model of width 64 (Gemma/Qwen-3: head_dim 24, so z is 96 wide;
Gemma-3 and Mistral with a 4-token sliding window, shorter than the 12-token inputs)."""

_MODELS: dict[str, torch.nn.Module] = {}


def tiny(arch: str):
    """The tiny random model of ``arch`` (built once per session, eval mode, float32, seed 0)."""
    if arch not in _MODELS:
        torch.manual_seed(0)
        _MODELS[arch] = tf.AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()
    return _MODELS[arch]


def ids(seed: int = 1, n: int = 2, length: int = 12) -> torch.Tensor:
    """``n`` sequences of ``length`` random ids (vocabulary 101)."""
    return torch.randint(0, 101, (n, length), generator=torch.Generator().manual_seed(seed))
