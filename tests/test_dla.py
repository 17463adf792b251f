"""Direct logit attribution: components add up, each head's number is its direct effect with the norm scale frozen."""

from __future__ import annotations

import pytest
import torch

from interp.dictionary import DictionaryConfig, SparseDictionary
from interp.dla import direct_logit_attribution, dla_task
from interp.errors import ArchitectureError, InputError
from interp.models import tiny_model

PROMPTS = ["hello world, this is", "abc def ghi"]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "transformer_lens", "phi3"])
def test_components_sum_to_the_models_logit_difference(family):
    model = tiny_model(family, n_layers=2)
    result = direct_logit_attribution(model, PROMPTS, "a", "b")
    with torch.no_grad():
        logits = model(PROMPTS)  # the model's own output, right-padded batch
    ends = model.tokenize(PROMPTS).real().sum(1) - 1
    a, b = model.tokenizer("a")["input_ids"][-1], model.tokenizer("b")["input_ids"][-1]
    expected = logits[torch.arange(2), ends, a] - logits[torch.arange(2), ends, b]
    torch.testing.assert_close(result.logit_diff, expected, rtol=1e-4, atol=1e-5)
    total = torch.tensor(result.per_prompt.to_numpy()).sum(1)
    torch.testing.assert_close(total, expected, rtol=1e-4, atol=1e-5)
    assert result.residual.abs().max() < 1e-4
    assert (result.table.kind == "head").sum() == 2 * model.cfg.n_heads


def test_each_head_is_its_direct_effect_under_a_frozen_norm_scale():
    """Independent check with plain torch hooks on the HF modules: remove one head's output from the
    last residual stream while the final norm keeps the clean run's scale; the logit difference
    drops by exactly the head's attribution."""
    model = tiny_model("llama", n_layers=2)
    hf = model.module
    prompt, answer, wrong = PROMPTS[0], "a", "b"
    result = direct_logit_attribution(model, prompt, answer, wrong)
    ids = model.tokenize(prompt).ids
    a, b = model.tokenizer(answer)["input_ids"][-1], model.tokenizer(wrong)["input_ids"][-1]
    captured = {}
    o_proj = hf.model.layers[0].self_attn.o_proj
    handles = [o_proj.register_forward_pre_hook(lambda _m, args: captured.__setitem__("z", args[0].detach())),
               hf.model.norm.register_forward_pre_hook(lambda _m, args: captured.__setitem__("final", args[0].detach()))]
    with torch.no_grad():
        hf(ids)
    for handle in handles:
        handle.remove()
    final = captured["final"][0, -1]
    eps, gain = hf.config.rms_norm_eps, hf.model.norm.weight.detach()
    o_weight = o_proj.weight.detach()
    scale = (final.pow(2).mean() + eps).sqrt()
    W_U = hf.lm_head.weight.detach()
    d_head = model.cfg.d_head
    for head in range(model.cfg.n_heads):
        out = captured["z"][0, -1, head * d_head : (head + 1) * d_head] @ o_weight[:, head * d_head : (head + 1) * d_head].T
        without = gain * (final - out) / scale  # the head's direct path removed, the scale frozen
        drop = float(((gain * final / scale) - without) @ (W_U[a] - W_U[b]))
        attributed = float(result.table.set_index("component").loc[f"L0.H{head}", "mean"])
        assert attributed == pytest.approx(drop, rel=1e-4, abs=1e-6)


def test_a_dictionary_splits_its_component_into_latents():
    model = tiny_model("llama", n_layers=2)
    d = model.cfg.d_model
    sae = SparseDictionary(DictionaryConfig(d_in=d, n_latents=96, k=8, input_site="blocks.1.hook_mlp_out"), seed=0)
    with torch.no_grad():
        sae.b_dec.normal_()
    result = direct_logit_attribution(model, PROMPTS, "a", "b", dictionary=sae)
    mlp = float(result.table.set_index("component").loc["L1.mlp", "mean"])
    assert result.latents["mean"].sum() == pytest.approx(mlp, rel=1e-4, abs=1e-6)
    assert (result.latents.component.str.startswith("latent")).sum() > 0


def test_bad_input_and_unsupported_structure():
    model = tiny_model("llama", n_layers=2)
    with pytest.raises(InputError, match="not one"):
        direct_logit_attribution(model, PROMPTS, "two tokens")
    with pytest.raises(InputError, match="3 tokens for 2 prompts"):
        direct_logit_attribution(model, PROMPTS, [1, 2, 3])
    with pytest.raises(InputError, match="outside"):
        direct_logit_attribution(model, PROMPTS, "a", position=40)
    # a block that rescales its MLP output before adding it: the sum no longer holds, so DLA refuses
    block = model.module.model.layers[1]
    original = block.mlp.forward
    handle = block.register_forward_hook(lambda _m, _a, out: (out[0] * 1.5,) + tuple(out[1:]) if isinstance(out, tuple) else out * 1.5)
    try:
        with pytest.raises(ArchitectureError, match="do not add up"):
            direct_logit_attribution(model, PROMPTS, "a")
    finally:
        handle.remove()
        block.mlp.forward = original


@pytest.mark.embedded
def test_embedded_ioi_heads(embedded):
    from interp.patching import ioi_task

    task = ioi_task(embedded, 4)
    result = dla_task(embedded, task)
    with torch.no_grad():
        logits = embedded(task.clean)[:, -1]
    expected = logits[torch.arange(len(task)), task.answer] - logits[torch.arange(len(task)), task.wrong]
    torch.testing.assert_close(result.logit_diff, expected, rtol=1e-4, atol=1e-4)
    assert result.residual.abs().max() < 1e-3
    assert len(result.top_heads(5)) == 5 and (result.table.kind == "head").sum() == 30 * 9
