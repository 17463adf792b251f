"""Loading, site naming and hooks: parity with plain HF / TransformerLens forwards."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import interp
from interp.errors import UnknownSiteError
from interp.models import TINY_FAMILIES, tiny_model
from interp.models.hooks import PatternHook

PROMPTS = ["The quick brown fox jumps", "hi there"]


def plain_logits(model, tokens):
    """The forward pass with nothing of ours attached."""
    if model.cfg.backend == "transformer_lens":
        return model.module(tokens.ids, attention_mask=tokens.mask)
    return model.module(input_ids=tokens.ids, attention_mask=tokens.mask).logits


def attach_identity_everywhere(model, copy: bool, calls: Counter):
    def identity(name):
        def fn(x):
            calls[name] += 1
            return x.clone() if copy else x

        return fn

    return [model.site_table.hook(name).attach(identity(name)) for name in model.site_names()]


def expected_calls(model, tokens) -> Counter:
    """Once per site for HF models; for TransformerLens, what TL's own hook API counts per hook point
    (TL calls ln1 once for each of the query, key and value inputs)."""
    if model.cfg.backend == "hf":
        return Counter({name: 1 for name in model.site_names()})
    counts: Counter = Counter()

    def count(_act, hook):
        counts[hook.name] += 1

    model.module.run_with_hooks(tokens.ids, attention_mask=tokens.mask, fwd_hooks=[(lambda _name: True, count)])
    return counts


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("copy", [False, True])
def test_identity_hooks_are_bit_exact_on_tiny_models(family, copy):
    model = tiny_model(family)
    tokens = model.tokenize(PROMPTS)  # unequal lengths: exercises the padding mask too
    reference = plain_logits(model, tokens)
    calls: Counter = Counter()
    handles = attach_identity_everywhere(model, copy, calls)
    try:
        hooked = model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(hooked, reference)
    expected = expected_calls(model, tokens)
    assert len(expected) >= 9 * model.cfg.n_layers
    assert calls == expected  # every hook ran, as often as the model reaches its site
    assert torch.equal(plain_logits(model, tokens), reference)  # hooks removed cleanly
    if model.cfg.backend == "hf":
        assert not model.module.config._attn_implementation.startswith("interp")


@pytest.mark.embedded
def test_identity_hooks_are_bit_exact_on_embedded_model(embedded):
    tokens = embedded.tokenize(PROMPTS)
    reference = plain_logits(embedded, tokens)
    assert torch.equal(embedded(tokens), reference)
    calls: Counter = Counter()
    handles = attach_identity_everywhere(embedded, True, calls)
    try:
        hooked = embedded(tokens)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(hooked, reference)
    assert calls == Counter({name: 1 for name in embedded.site_names()})
    assert len(calls) == 2 + 10 * embedded.cfg.n_layers


def test_editing_the_pattern_changes_the_output():
    model = tiny_model("llama")
    tokens = model.tokenize("abcdefgh")
    clean = model(tokens)

    def uniform(pattern):
        causal = torch.ones_like(pattern).tril()
        return causal / causal.sum(-1, keepdim=True)

    with model.intervene(interp.Apply("blocks.1.attn.hook_pattern", uniform)):
        edited = model(tokens)
    assert not torch.allclose(edited, clean)
    # Replacing the pattern by an equal tensor must not change a bit.
    with model.intervene(interp.Apply("blocks.1.attn.hook_pattern", lambda p: p * 1.0)):
        assert torch.equal(model(tokens), clean)


def test_resid_mid_write_reaches_mlp_and_residual():
    model = tiny_model("llama")
    tokens = model.tokenize("abcdef")
    shift = torch.randn(model.cfg.d_model)
    with model.intervene(interp.Add("blocks.0.hook_resid_mid", shift)):
        cache = model.run_with_cache(tokens, ["blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"])
    clean = model.run_with_cache(tokens, ["blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out"])
    torch.testing.assert_close(cache["resid_mid", 0], clean["resid_mid", 0] + shift)
    assert not torch.allclose(cache["mlp_out", 0], clean["mlp_out", 0])  # the MLP read the edited stream
    torch.testing.assert_close(cache["resid_post", 0], cache["resid_mid", 0] + cache["mlp_out", 0])


def test_transformer_lens_sites_equal_hf_hidden_states_of_the_converted_model():
    """A tiny HF GPT-2 converted to TransformerLens: TL's sites, read through interp, against HF's own tensors."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    hf = tiny_model("gpt2", n_layers=2)
    c = hf.module.config
    cfg = HookedTransformerConfig(n_layers=2, d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=4 * c.n_embd,
                                  n_ctx=c.n_positions, eps=c.layer_norm_epsilon, d_vocab=c.vocab_size, act_fn=c.activation_function,
                                  normalization_type="LN")
    tl_module = HookedTransformer(cfg)
    tl_module.load_state_dict(convert_gpt2_weights(hf.module, cfg), strict=False)
    tl = interp.load_model(tl_module, tokenizer=hf.tokenizer)
    ids = hf.tokenize(["The cat sat on the mat", "Dogs bark at the moon!"]).ids
    outputs = {}
    blocks = hf.module.transformer.h
    def keep(key):
        def hook(_m, _args, out):
            outputs[key] = (out[0] if isinstance(out, tuple) else out).detach().clone()

        return hook

    handles = [m.register_forward_hook(keep(key)) for i, block in enumerate(blocks)
               for key, m in ((f"attn{i}", block.attn), (f"mlp{i}", block.mlp), (f"block{i}", block))]
    try:
        with torch.no_grad():
            out = hf.module(input_ids=ids, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    cache = tl.run_with_cache(ids, stop_at_layer=None)

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    for layer in range(2):
        close(cache["resid_pre", layer], out.hidden_states[layer])
        close(cache["attn_out", layer], outputs[f"attn{layer}"])
        close(cache["mlp_out", layer], outputs[f"mlp{layer}"])
        close(cache["resid_post", layer], outputs[f"block{layer}"])
    # GPT-2's last hidden state is ln_f's output; TL's hook_normalized comes before the gain and bias.
    final = tl_module.ln_final
    close(cache["ln_final.hook_normalized"] * final.w + final.b, out.hidden_states[-1])
    close(cache.logits, out.logits)


def test_site_shapes_match_cached_tensors():
    for family in ("llama", "gpt2", "transformer_lens"):
        model = tiny_model(family)
        cache = model.run_with_cache("hello", stop_at_layer=None)
        for info in model.sites():
            if info.shape == ("...",):
                continue
            tensor = cache[info.name]
            for got, want in zip(tensor.shape, info.shape, strict=True):
                assert isinstance(want, str) or got == want, (info.name, tensor.shape, info.shape)


def test_generic_fallback_finds_the_same_components_as_the_tables():
    from interp.models.arch import ARCHS, discover_components

    for family in ("llama", "gpt2", "gpt_neox", "qwen3"):
        found = discover_components(tiny_model(family).module)
        for field in ("layers", "embed", "pos_embed", "attn", "attn_out_proj", "mlp", "mlp_out_proj"):
            assert getattr(found, field) == getattr(ARCHS[family], field), (family, field)
    phi3 = tiny_model("phi3").arch  # registers o_proj before its fused qkv_proj
    assert (phi3.attn_out_proj, phi3.mlp_out_proj) == ("self_attn.o_proj", "mlp.down_proj")


def test_unknown_site_lists_closest_names():
    model = tiny_model("llama")
    with pytest.raises(UnknownSiteError) as err:
        model.site_names("blocks.1.hook_resid_pots")
    assert "blocks.1.hook_resid_post" in str(err.value)
    with pytest.raises(UnknownSiteError, match="layer 7 is out of range.*layers 0-1"):
        model.run_with_cache("hi", "blocks.7.hook_resid_post")
    with pytest.raises(UnknownSiteError, match="valid kinds"):
        model.site("resid_postt", 1)


def test_gpt2_positional_embedding_site():
    model = tiny_model("gpt2")
    cache = model.run_with_cache("abc", ["hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre"])
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], cache["hook_embed"] + cache["hook_pos_embed"])


def test_nnsight_sees_the_same_activations():
    model = tiny_model("llama")
    tokens = model.tokenize("hello world")
    cache = model.run_with_cache(tokens, ["blocks.0.mlp.hook_post", "blocks.1.hook_resid_post"])
    lm = model.nnsight
    with lm.trace(tokens.ids):
        post = lm.model.layers[0].mlp.down_proj.input.save()
        resid = lm.model.layers[1].output.save()
    assert torch.equal(post, cache["blocks.0.mlp.hook_post"])
    assert torch.equal(resid if isinstance(resid, torch.Tensor) else resid[0], cache["blocks.1.hook_resid_post"])
    assert model.tokenizer.padding_side == "right"  # nnsight got its own tokenizer copy


@pytest.mark.embedded
def test_embedded_model_knows_paris(embedded):
    with torch.no_grad():
        logits = embedded("The capital of France is")
    probs = logits[0, -1].softmax(-1)
    top = int(probs.argmax())
    assert embedded.to_string([top]) == " Paris"
    assert 0.70 < float(probs[top]) < 0.85


@pytest.mark.embedded
def test_embedded_loss_on_shakespeare_far_below_uniform(embedded, shakespeare):
    passage = shakespeare.documents[0].text[2000:3500]
    loss = float(embedded.loss(passage).detach())
    uniform = math.log(embedded.cfg.d_vocab)
    assert loss < 0.5 * uniform, (loss, uniform)


@pytest.mark.embedded
def test_embedded_model_dimensions(embedded):
    c = embedded.cfg
    assert (c.n_layers, c.d_model, c.d_mlp, c.n_heads, c.n_kv_heads, c.d_head, c.d_vocab) == (30, 576, 1536, 9, 3, 64, 49152)
    assert c.family == "llama"


def test_pattern_hook_restores_attention_implementation_after_errors():
    model = tiny_model("llama")
    hook = model.site_table.hook("blocks.0.attn.hook_pattern")
    assert isinstance(hook, PatternHook)

    def boom(_):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_cache("abc", "blocks.0.hook_resid_post", interventions=[interp.Apply("blocks.0.attn.hook_pattern", boom)])
    assert model.module.config._attn_implementation == "sdpa"
