"""Tiny random-weight models of many families, for fast tests (no downloads).

Each comes with a byte-level tokenizer built in memory, so text inputs work too. Norm gains and
biases are drawn at random rather than left at their initial ones and zeros, so that two norms of
a block differ, and a norm's gain convention (``w`` or Gemma's ``1 + w``) matters.

Families transformers builds from a config here that interp refuses, and why (tests check each
refusal): ``bloom`` (attention and MLP add the residual inside their modules), ``opt`` (no MLP
module: fc1 / fc2 sit in the block), ``mixtral`` (mixture of experts: no single MLP output
projection), ``granite`` with ``residual_multiplier != 1`` (what the branches add is scaled).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from interp.errors import InputError
from interp.models.model import Model

TINY_VOCAB = 320  # 256 byte symbols + specials, rounded up


def _decoder(tf: Any, name: str, n_layers: int, d: int, **extra: Any) -> Any:
    common = dict(vocab_size=TINY_VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2, hidden_size=d,
                  intermediate_size=2 * d, num_hidden_layers=n_layers, num_attention_heads=4, max_position_embeddings=256)
    return getattr(tf, name)(**{**common, **extra})


def _gpt_style(tf: Any, name: str, n_layers: int, d: int, **extra: Any) -> Any:
    common = dict(vocab_size=TINY_VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2, n_embd=d, n_layer=n_layers, n_head=4)
    return getattr(tf, name)(**{**common, **extra})


# family -> (transformers config class, how to build it). What each one adds to the tests is noted.
_CONFIGS: dict[str, Callable[[Any, int, int], Any]] = {
    "llama": lambda tf, n, d: _decoder(tf, "LlamaConfig", n, d, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2": lambda tf, n, d: _decoder(tf, "Qwen2Config", n, d, num_key_value_heads=2),  # q/k/v biases
    "qwen3": lambda tf, n, d: _decoder(tf, "Qwen3Config", n, d, num_key_value_heads=2, head_dim=16),  # q/k norms
    "mistral": lambda tf, n, d: _decoder(tf, "MistralConfig", n, d, num_key_value_heads=2, sliding_window=8),
    "gpt2": lambda tf, n, d: _gpt_style(tf, "GPT2Config", n, d, n_positions=256),
    "gpt_neox": lambda tf, n, d: _decoder(tf, "GPTNeoXConfig", n, d, rotary_pct=0.25, use_parallel_residual=True),
    "gpt_neox_sequential": lambda tf, n, d: _decoder(tf, "GPTNeoXConfig", n, d, rotary_pct=0.25, use_parallel_residual=False),
    "olmo": lambda tf, n, d: _decoder(tf, "OlmoConfig", n, d),  # norms without parameters
    "olmo2": lambda tf, n, d: _decoder(tf, "Olmo2Config", n, d),  # post-norms only: no ln1 / ln2
    "phi3": lambda tf, n, d: _decoder(tf, "Phi3Config", n, d, num_key_value_heads=4),  # fused qkv and gate_up
    "gemma": lambda tf, n, d: _decoder(tf, "GemmaConfig", n, d, num_key_value_heads=2, head_dim=16),  # (1 + w) gains
    "gemma2": lambda tf, n, d: _decoder(tf, "Gemma2Config", n, d, num_key_value_heads=2, head_dim=16, sliding_window=8),
    "gemma3": lambda tf, n, d: _decoder(tf, "Gemma3TextConfig", n, d, num_key_value_heads=2, head_dim=16, sliding_window=8),
    "glm4": lambda tf, n, d: _decoder(tf, "Glm4Config", n, d, num_key_value_heads=2),  # sandwich norms, other names
    "granite": lambda tf, n, d: _decoder(tf, "GraniteConfig", n, d, num_key_value_heads=2, attention_multiplier=0.5,
                                         embedding_multiplier=2.0, logits_scaling=2.0),
    "cohere": lambda tf, n, d: _decoder(tf, "CohereConfig", n, d, num_key_value_heads=2),  # one norm, parallel; logit scale
    "stablelm": lambda tf, n, d: _decoder(tf, "StableLmConfig", n, d, num_key_value_heads=4),
    "starcoder2": lambda tf, n, d: _decoder(tf, "Starcoder2Config", n, d, num_key_value_heads=2),
    "nemotron": lambda tf, n, d: _decoder(tf, "NemotronConfig", n, d, num_key_value_heads=2, head_dim=16),  # LayerNorm (1 + w), relu^2
    "phi": lambda tf, n, d: _decoder(tf, "PhiConfig", n, d),  # one norm feeds both, parallel
    "gptj": lambda tf, n, d: _gpt_style(tf, "GPTJConfig", n, d, n_positions=256, rotary_dim=8),
    "falcon": lambda tf, n, d: tf.FalconConfig(vocab_size=TINY_VOCAB, hidden_size=d, num_hidden_layers=n, num_attention_heads=4,
                                              new_decoder_architecture=True, num_kv_heads=2, bos_token_id=0, eos_token_id=1),
    "gpt_bigcode": lambda tf, n, d: _gpt_style(tf, "GPTBigCodeConfig", n, d, n_positions=256),  # multi-query attention
    "codegen": lambda tf, n, d: _gpt_style(tf, "CodeGenConfig", n, d, n_positions=256, rotary_dim=8),
    "persimmon": lambda tf, n, d: _decoder(tf, "PersimmonConfig", n, d, qk_layernorm=True),
    "glm": lambda tf, n, d: _decoder(tf, "GlmConfig", n, d, num_key_value_heads=2),  # fused gate_up
    "exaone4": lambda tf, n, d: _decoder(tf, "Exaone4Config", n, d, num_key_value_heads=2, head_dim=16, sliding_window=8),
    "olmo3": lambda tf, n, d: _decoder(tf, "Olmo3Config", n, d, sliding_window=8),
    "arcee": lambda tf, n, d: _decoder(tf, "ArceeConfig", n, d, num_key_value_heads=2),  # relu^2, not gated
    "smollm3": lambda tf, n, d: _decoder(tf, "SmolLM3Config", n, d, num_key_value_heads=2),
    "helium": lambda tf, n, d: _decoder(tf, "HeliumConfig", n, d, num_key_value_heads=2, head_dim=16),
    "seed_oss": lambda tf, n, d: _decoder(tf, "SeedOssConfig", n, d, num_key_value_heads=2, head_dim=16),
}
TINY_FAMILIES = (*_CONFIGS, "transformer_lens")


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
    import transformers
    from transformers import AutoModelForCausalLM

    module = AutoModelForCausalLM.from_config(_CONFIGS[family](transformers, n_layers, d_model), dtype=torch.float32)
    _randomise_norms(module)
    return wrap_module(module, tokenizer, name=f"tiny-{family}")


def _randomise_norms(module: torch.nn.Module) -> None:
    """Norm gains and biases off their initial values (see module docstring)."""
    from interp.models.structure import is_norm

    with torch.no_grad():
        for norm in module.modules():
            if is_norm(norm):
                for name, param in norm.named_parameters():
                    param.add_(torch.randn_like(param) * (0.3 if name == "weight" else 0.1))
