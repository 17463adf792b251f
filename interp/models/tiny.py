"""Tiny random-weight models of every supported family, for fast tests (no downloads).

Each comes with a byte-level tokenizer built in memory, so text inputs work too.
"""

from __future__ import annotations

from typing import Any

import torch

from interp.errors import InputError
from interp.models.model import Model

TINY_FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "gpt_neox", "gpt_neox_sequential", "olmo", "phi3", "transformer_lens")
TINY_VOCAB = 320  # 256 byte symbols + specials, rounded up


def byte_tokenizer() -> Any:
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<bos>", "<eos>", "<pad>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_model(family: str = "llama", *, n_layers: int = 2, seed: int = 0, d_model: int = 64) -> Model:
    """A randomly initialised model of ``family`` (one of ``TINY_FAMILIES``), float32, eval mode."""
    from interp.models.loading import wrap_module

    if family not in TINY_FAMILIES:
        raise InputError(f"unknown tiny family {family!r}; choose from {', '.join(TINY_FAMILIES)}")
    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    if family == "transformer_lens":
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig(
            n_layers=n_layers, d_model=d_model, n_ctx=256, d_head=16, n_heads=d_model // 16, d_mlp=2 * d_model,
            d_vocab=TINY_VOCAB, act_fn="gelu", normalization_type="LN", seed=seed, model_name="tiny-tl",
        )
        module = HookedTransformer(cfg)
        return wrap_module(module, tokenizer, name="tiny-transformer_lens")
    from transformers import AutoModelForCausalLM

    module = AutoModelForCausalLM.from_config(_hf_config(family, n_layers, d_model), dtype=torch.float32)
    return wrap_module(module, tokenizer, name=f"tiny-{family}")


def _hf_config(family: str, n_layers: int, d: int) -> Any:
    import transformers as tf

    common = dict(vocab_size=TINY_VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    decoder = dict(
        hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n_layers, num_attention_heads=4,
        max_position_embeddings=256, **common,
    )
    if family == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **decoder)
    if family == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, **decoder)
    if family == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, sliding_window=32, **decoder)
    if family == "olmo":
        return tf.OlmoConfig(**decoder)
    if family == "phi3":
        return tf.Phi3Config(num_key_value_heads=4, **decoder)
    if family.startswith("gpt_neox"):
        return tf.GPTNeoXConfig(
            rotary_pct=0.25, use_parallel_residual=family == "gpt_neox", **decoder,
        )
    return tf.GPT2Config(n_positions=256, n_embd=d, n_layer=n_layers, n_head=4, **common)
