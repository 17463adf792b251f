"""What every site means, checked on every family against plain PyTorch hooks on the HF modules.

The expectations below come from reading each family's transformers source, not from interp's
mapping: which child of a decoder layer is the attention, its output projection, the MLP, its down
projection, the norms after attention and MLP ("sandwich" norms), whether the block is parallel and
whether attention and MLP read a norm's output at all. The captures are plain forward / forward-pre
hooks on those modules, never interp's own hooks.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import pytest
import torch
from typer.testing import CliRunner

import interp
from interp.errors import ArchitectureError, InputError
from interp.models import TINY_FAMILIES, tiny_model


@dataclass(frozen=True)
class Expect:
    layers: str = "model.layers"
    attn: str = "self_attn"
    o_proj: str = "o_proj"
    mlp: str = "mlp"
    down: str = "down_proj"
    post_attn: str | None = None  # the norm applied to the attention output
    post_mlp: str | None = None  # the norm applied to the MLP output
    parallel: bool = False
    pre_norms: bool = True  # attention and MLP read a norm's output (not the residual stream)
    pattern: bool = True  # the attention runs through transformers' attention interface


LLAMA_LIKE = Expect()
SANDWICH = Expect(post_attn="post_attention_layernorm", post_mlp="post_feedforward_layernorm")
POST_ONLY = Expect(post_attn="post_attention_layernorm", post_mlp="post_feedforward_layernorm", pre_norms=False)
EXPECT = {
    "llama": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "qwen3": LLAMA_LIKE, "mistral": LLAMA_LIKE, "olmo": LLAMA_LIKE,
    "phi3": LLAMA_LIKE, "gemma": LLAMA_LIKE, "granite": LLAMA_LIKE, "stablelm": LLAMA_LIKE, "nemotron": LLAMA_LIKE,
    "glm": LLAMA_LIKE, "arcee": LLAMA_LIKE, "smollm3": LLAMA_LIKE, "helium": LLAMA_LIKE, "seed_oss": LLAMA_LIKE,
    "starcoder2": Expect(down="c_proj"),
    "gpt2": Expect(layers="transformer.h", attn="attn", o_proj="c_proj", down="c_proj"),
    "gpt_bigcode": Expect(layers="transformer.h", attn="attn", o_proj="c_proj", down="c_proj"),
    "gpt_neox": Expect(layers="gpt_neox.layers", attn="attention", o_proj="dense", down="dense_4h_to_h", parallel=True),
    "gpt_neox_sequential": Expect(layers="gpt_neox.layers", attn="attention", o_proj="dense", down="dense_4h_to_h"),
    "persimmon": Expect(o_proj="dense", down="dense_4h_to_h"),
    "gemma2": SANDWICH, "gemma3": SANDWICH,
    "glm4": Expect(post_attn="post_self_attn_layernorm", post_mlp="post_mlp_layernorm"),
    "olmo2": POST_ONLY, "olmo3": POST_ONLY, "exaone4": POST_ONLY,
    "cohere": Expect(parallel=True),
    "phi": Expect(o_proj="dense", down="fc2", parallel=True),
    "gptj": Expect(layers="transformer.h", attn="attn", o_proj="out_proj", down="fc_out", parallel=True),
    "codegen": Expect(layers="transformer.h", attn="attn", o_proj="out_proj", down="fc_out", parallel=True),
    "falcon": Expect(layers="transformer.h", attn="self_attention", o_proj="dense", down="dense_4h_to_h", parallel=True,
                     pattern=False),
}
HF_FAMILIES = [f for f in TINY_FAMILIES if f != "transformer_lens"]


def test_every_tiny_family_has_expectations():
    assert set(EXPECT) == set(HF_FAMILIES)


def plain_capture(module, expect: Expect, ids: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Inputs and outputs of the modules named in ``expect``, by plain hooks (values cloned when seen)."""
    got: dict[str, dict] = defaultdict(dict)

    def tensor(value):
        return value[0] if isinstance(value, tuple) else value

    def take_input(key, layer):
        def hook(_m, args, kwargs):
            got[key][layer] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    def take_output(key, layer):
        def hook(_m, _args, out):
            got[key][layer] = tensor(out).detach().clone()
        return hook

    handles = []
    for layer, block in enumerate(module.get_submodule(expect.layers)):
        attn, mlp = block.get_submodule(expect.attn), block.get_submodule(expect.mlp)
        hooks = [(block, "block"), (attn, "attn"), (mlp, "mlp")]
        for mod, key in hooks:
            handles += [mod.register_forward_pre_hook(take_input(f"{key}_in", layer), with_kwargs=True),
                        mod.register_forward_hook(take_output(f"{key}_out", layer))]
        handles += [attn.get_submodule(expect.o_proj).register_forward_pre_hook(take_input("o_proj_in", layer), with_kwargs=True),
                    mlp.get_submodule(expect.down).register_forward_pre_hook(take_input("down_in", layer), with_kwargs=True)]
        for key, name in (("post_attn", expect.post_attn), ("post_mlp", expect.post_mlp)):
            if name:
                handles.append(block.get_submodule(name).register_forward_hook(take_output(key, layer)))
    handles += [module.get_input_embeddings().register_forward_hook(take_output("embed", 0)),
                module.get_output_embeddings().register_forward_pre_hook(take_input("unembed_in", 0), with_kwargs=True)]
    try:
        with torch.no_grad():
            logits = module(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return got, logits


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_sites_mean_what_they_say(family):
    expect = EXPECT[family]
    model = tiny_model(family, n_layers=2)
    ids = model.tokenize(["The cat sat on the mat.", "Dogs bark at the moon"]).ids[:, :20]
    got, logits = plain_capture(model.module, expect, ids)
    cache = model.run_with_cache(ids, stop_at_layer=None)
    assert torch.equal(cache.logits, logits)  # caching every site leaves the forward pass as it was
    has = {kind: model.site_table.has(kind, 0) for kind in ("ln1", "ln2", "ln1_post", "ln2_post", "resid_mid", "pattern")}
    assert has == {"ln1": expect.pre_norms, "ln2": expect.pre_norms, "ln1_post": expect.post_attn is not None,
                   "ln2_post": expect.post_mlp is not None, "resid_mid": not expect.parallel, "pattern": expect.pattern}
    n_heads = model.cfg.n_heads
    for layer in range(2):
        site = {kind: model.site(kind, layer) for kind in
                ("resid_pre", "z", "attn_out", "mlp_post", "mlp_out", "resid_post", *[k for k, v in has.items() if v])}
        assert torch.equal(cache[site["resid_pre"]], got["block_in"][layer])
        assert torch.equal(cache[site["resid_post"]], got["block_out"][layer])
        assert torch.equal(cache[site["z"]], got["o_proj_in"][layer].unflatten(-1, (n_heads, -1)))
        assert torch.equal(cache[site["mlp_post"]], got["down_in"][layer])
        attn_added = got["post_attn"][layer] if expect.post_attn else got["attn_out"][layer]
        mlp_added = got["post_mlp"][layer] if expect.post_mlp else got["mlp_out"][layer]
        assert torch.equal(cache[site["attn_out"]], attn_added)
        assert torch.equal(cache[site["mlp_out"]], mlp_added)
        if expect.pre_norms:  # what attention and MLP read
            assert torch.equal(cache[site["ln1"]], got["attn_in"][layer])
            assert torch.equal(cache[site["ln2"]], got["mlp_in"][layer])
        if expect.post_attn:
            assert torch.equal(cache[site["ln1_post"]], got["post_attn"][layer])
            assert torch.equal(cache[site["ln2_post"]], got["post_mlp"][layer])
        pre, post = cache[site["resid_pre"]], cache[site["resid_post"]]
        if expect.parallel:
            close(pre + cache[site["attn_out"]] + cache[site["mlp_out"]], post)
        else:
            mid = cache[site["resid_mid"]]
            close(pre + cache[site["attn_out"]], mid)
            close(mid + cache[site["mlp_out"]], post)
            if not expect.pre_norms:  # the MLP reads the residual stream itself
                assert torch.equal(mid, got["mlp_in"][layer])
    assert torch.equal(cache["hook_embed"], got["embed"][0])
    assert torch.equal(cache["ln_final.hook_normalized"], got["unembed_in"][0])
    close(model.unembed(cache["resid_post", 1]), logits)  # logit scaling / soft-capping included


@pytest.mark.parametrize("family", [f for f in HF_FAMILIES if EXPECT[f].pattern])
def test_pattern_site_equals_hf_eager_attentions(family):
    model = tiny_model(family)
    tokens = model.tokenize(["The quick brown fox jumps over", "hi there"])  # padded: the mask matters
    cache = model.run_with_cache(tokens, "blocks.*.attn.hook_pattern", stop_at_layer=None)
    config = model.module.config
    saved = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = model.module(input_ids=tokens.ids, attention_mask=tokens.mask, output_attentions=True)
    finally:
        config._attn_implementation = saved
    assert len(out.attentions) == model.cfg.n_layers
    for layer, expected in enumerate(out.attentions):
        torch.testing.assert_close(cache["pattern", layer], expected, rtol=0, atol=1e-6)


def test_resid_mid_write_reaches_mlp_and_residual_where_the_mlp_reads_the_stream():
    """OLMo 2: no norm in front of the MLP, so resid_mid is the MLP's own input."""
    model = tiny_model("olmo2")
    tokens = model.tokenize("abcdef")
    shift = torch.randn(model.cfg.d_model)
    sites = ["blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"]
    with model.intervene(interp.Add("blocks.0.hook_resid_mid", shift)):
        edited = model.run_with_cache(tokens, sites)
    clean = model.run_with_cache(tokens, sites)
    close(edited["resid_mid", 0], clean["resid_mid", 0] + shift)
    assert not torch.allclose(edited["mlp_out", 0], clean["mlp_out", 0])  # the MLP read the edited stream
    close(edited["resid_post", 0], edited["resid_mid", 0] + edited["mlp_out", 0])  # and so did the residual


def test_shared_norm_sites_are_edited_apart():
    """GPT-J: one norm feeds attention and MLP; editing ln2 must not change what attention reads."""
    model = tiny_model("gptj")
    tokens = model.tokenize("abcdef")
    sites = ["blocks.0.ln1.hook_normalized", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"]
    clean = model.run_with_cache(tokens, sites)
    with model.intervene(interp.Ablate("blocks.0.ln2.hook_normalized")):
        edited = model.run_with_cache(tokens, sites)
    assert torch.equal(edited["blocks.0.ln1.hook_normalized"], clean["blocks.0.ln1.hook_normalized"])
    assert torch.equal(edited["attn_out", 0], clean["attn_out", 0])
    assert not torch.allclose(edited["mlp_out", 0], clean["mlp_out", 0])


def tiny_hf(config_name: str, **kwargs):
    import transformers

    config = getattr(transformers, config_name)(vocab_size=320, num_hidden_layers=2, **kwargs)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("build, message", [
    (lambda: tiny_hf("BloomConfig", hidden_size=64, n_head=4), r"post_attention_layernorm \(LayerNorm\) reads what the attention returns"),
    (lambda: tiny_hf("OPTConfig", hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64), "no MLP module found"),
    (lambda: tiny_hf("MixtralConfig", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                     num_local_experts=4, num_experts_per_tok=2), "mixture-of-experts"),
    (lambda: tiny_hf("GraniteConfig", hidden_size=64, intermediate_size=128, num_attention_heads=4, residual_multiplier=0.5),
     "residual_multiplier=0.5"),
    (lambda: tiny_hf("Qwen2MoeConfig", hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
                     num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0]),
     r"model\.layers\.1\.mlp \(Qwen2MoeSparseMoeBlock\) differs from block 0"),
])
def test_structures_that_cannot_be_mapped_are_refused(build, message):
    with pytest.raises(ArchitectureError, match=message):
        interp.load_model(build())


def test_pattern_sites_are_refused_beside_a_flash_kernel():
    """Flash / flex kernels get no 4-D mask, so a pattern recomputed beside them would be wrong."""
    model = tiny_model("llama")
    model.module.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ArchitectureError, match="attn_implementation='sdpa'"):
        model.run_with_cache("The cat sat", [model.site("pattern", 0)])
    assert model.module.config._attn_implementation == "flash_attention_2"  # nothing left switched


def test_a_norm_that_feeds_nothing_known_is_refused():
    """A norm whose output neither attention nor MLP reads (here: applied to the block input and thrown away)."""
    model = tiny_model("llama").module
    for every in model.model.layers:  # built alike (else the uniformity check refuses first)
        every.stray_norm = torch.nn.LayerNorm(64)
    block = model.model.layers[0]
    forward = block.forward

    def patched(hidden_states, *args, **kwargs):
        block.stray_norm(hidden_states)
        return forward(hidden_states, *args, **kwargs)

    block.forward = patched
    with pytest.raises(ArchitectureError, match=r"cannot tell what model\.layers\.0\.stray_norm \(LayerNorm\) normalises"):
        interp.load_model(model)


def test_attention_rule_is_refused_where_there_is_no_pattern_site():
    from interp.patching import Rules, relevance_rules

    model = tiny_model("falcon")
    with pytest.raises(InputError, match="attention rule"):
        with relevance_rules(model, Rules.parse("all")):
            pass


def test_sites_command_prints_the_mapping():
    from interp.cli import app

    result = CliRunner().invoke(app, ["sites", "tiny:gemma2", "--pattern", "blocks.1.*"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split("<- ")[1] for line in result.output.splitlines() if "<- " in line}
    assert lines["blocks.1.ln2.hook_normalized"] == "output of model.layers.1.pre_feedforward_layernorm"
    assert lines["blocks.1.ln1_post.hook_normalized"] == "output of model.layers.1.post_attention_layernorm"
    assert lines["blocks.1.hook_mlp_out"] == "output of model.layers.1.post_feedforward_layernorm"
    assert lines["blocks.1.mlp.hook_post"] == "input of model.layers.1.mlp.down_proj"
    assert lines["blocks.1.hook_resid_mid"].startswith("input of model.layers.1.pre_feedforward_layernorm")
    assert len(lines) == 12
