"""run_with_cache: early stopping, dtype/device, TL-style indexing, accumulated residuals."""

from __future__ import annotations

import pytest
import torch

from interp.errors import InputError, UnknownSiteError
from interp.models import tiny_model


def count_layer_calls(model):
    calls = []
    layers = model.module.get_submodule(model.arch.layers)
    handles = [layer.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    return calls, handles


def test_auto_stop_runs_only_the_layers_needed():
    model = tiny_model("llama", n_layers=6)
    calls, handles = count_layer_calls(model)
    cache = model.run_with_cache("hello world", "blocks.2.hook_mlp_out")
    for handle in handles:
        handle.remove()
    assert calls == [0, 1]  # block 2 started (its MLP ran) but never finished, blocks 3-5 never ran
    assert cache.logits is None
    full = model.run_with_cache("hello world", "blocks.2.hook_mlp_out", stop_at_layer=None)
    assert torch.equal(cache["mlp_out", 2], full["mlp_out", 2])
    assert full.logits is not None


def test_integer_stop_at_layer_follows_transformer_lens():
    model = tiny_model("llama", n_layers=4)
    calls, handles = count_layer_calls(model)
    model.run_with_cache("abc", "blocks.0.hook_resid_post", stop_at_layer=2)
    for handle in handles:
        handle.remove()
    assert calls == [0, 1]
    with pytest.raises(InputError, match="beyond"):
        model.run_with_cache("abc", "blocks.3.hook_resid_post", stop_at_layer=2)
    with pytest.raises(InputError, match="stop_at_layer"):
        model.run_with_cache("abc", "blocks.0.hook_resid_post", stop_at_layer=9)


@pytest.mark.embedded
def test_embedded_layer_12_residual_equals_full_run(embedded):
    text = ["To be, or not to be, that is the question", "Whether 'tis nobler in the mind"]
    early = embedded.run_with_cache(text, "blocks.12.hook_resid_post")
    full = embedded.run_with_cache(text, "blocks.12.hook_resid_post", stop_at_layer=None)
    assert early.logits is None and full.logits is not None
    assert torch.equal(early["resid_post", 12], full["resid_post", 12])
    calls = []
    layers = embedded.module.get_submodule(embedded.arch.layers)
    handles = [layer.register_forward_pre_hook(lambda *_, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    try:
        embedded.run_with_cache(text, "blocks.12.hook_resid_post")
    finally:
        for handle in handles:
            handle.remove()
    assert calls == list(range(13))  # 13 of 30 blocks ran


def test_dtype_device_and_indexing():
    model = tiny_model("gpt2", n_layers=3)
    cache = model.run_with_cache(["ab", "abcd"], "blocks.*.hook_resid_post", dtype=torch.bfloat16, device="cpu")
    assert cache["resid_post", 1].dtype == torch.bfloat16
    assert cache["blocks.1.hook_resid_post"] is cache["resid_post", 1]
    assert cache.attention_mask is not None and cache.attention_mask.tolist()[0] == [1, 1, 0, 0]
    assert ("resid_post", 2) in cache and "blocks.0.hook_mlp_out" not in cache
    with pytest.raises(UnknownSiteError, match="was not cached"):
        cache["blocks.0.hook_mlp_out"]
    with pytest.raises(UnknownSiteError, match="closest"):
        cache["blocks.0.hook_mlp_outt"]
    assert cache.stack("resid_post").shape == (3, 2, 4, model.cfg.d_model)


def test_accumulated_resid_and_final_norm():
    model = tiny_model("llama", n_layers=3)
    cache = model.run_with_cache("hello", "blocks.*.hook_resid_*", stop_at_layer=None)
    stacked, labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre", "2_mid", "final_post"]
    assert torch.equal(stacked[1], cache["resid_mid", 0])
    normed = cache.accumulated_resid(apply_ln=True)
    torch.testing.assert_close(model.lm_head(normed[-1]), cache.logits)


def test_cached_resid_mid_is_not_changed_by_later_edits():
    import interp

    model = tiny_model("llama")
    tokens = model.tokenize("abcdef")
    cache = model.run_with_cache(tokens, "blocks.0.hook_resid_mid")
    before = cache["resid_mid", 0].clone()
    with model.intervene(interp.Add("blocks.0.hook_resid_mid", torch.ones(model.cfg.d_model))):
        model(tokens)
    assert torch.equal(cache["resid_mid", 0], before)
