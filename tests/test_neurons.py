"""LM-head neuron decoding (weights, variants, the exact bfloat16 screen) and neuron clamping."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from interp.errors import InputError
from interp.models import tiny_model
from interp.neurons import (
    ScreenedUnembedding, clamp_effect, decode_neurons, neuron_weights, top_and_bottom, write_neuron_table,
)


def test_weights_are_the_modules_rows_and_columns():
    llama = tiny_model("llama", n_layers=2)
    mlp = llama.module.model.layers[1].mlp
    w = neuron_weights(llama, 1)
    assert torch.equal(w["up"], mlp.up_proj.weight) and torch.equal(w["gate"], mlp.gate_proj.weight)
    assert torch.equal(w["down"], mlp.down_proj.weight.T)
    gpt2 = tiny_model("gpt2", n_layers=1)
    w = neuron_weights(gpt2, 0)
    assert torch.equal(w["up"], gpt2.module.transformer.h[0].mlp.c_fc.weight.T) and "gate" not in w
    # "down" rows are what each neuron writes: hidden activations times them give the MLP output
    cache = gpt2.run_with_cache("hello", ["blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out"])
    bias = gpt2.module.transformer.h[0].mlp.c_proj.bias
    torch.testing.assert_close(cache["mlp_post", 0] @ w["down"] + bias, cache["mlp_out", 0], rtol=1e-5, atol=1e-5)
    phi3 = tiny_model("phi3", n_layers=1)
    fused = phi3.module.model.layers[0].mlp.gate_up_proj.weight
    w = neuron_weights(phi3, 0)
    assert torch.equal(w["gate"], fused[:128]) and torch.equal(w["up"], fused[128:])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_neuron_planted_on_a_token_decodes_to_it(dtype):
    model = tiny_model("llama", n_layers=2)
    W_U = model.module.lm_head.weight.detach()
    token = int(W_U.norm(dim=1).argmax())
    with torch.no_grad():
        model.module.model.layers[1].mlp.up_proj.weight[5] = W_U[token] * 3
        model.module.model.layers[1].mlp.down_proj.weight[:, 7] = -W_U[token]
    table = decode_neurons(model, [1], variant="raw", k=3, compute_dtype=dtype, progress=False).set_index(["weight", "neuron"])
    assert table.loc[("up", 5), "top_ids"][0] == token
    assert table.loc[("down", 7), "bottom_ids"][0] == token
    assert table.loc[("up", 5), "top_tokens"][0] == model.tokenizer.decode([token])


def test_variants_fold_in_the_norm_gains():
    model = tiny_model("llama", n_layers=2)
    with torch.no_grad():
        model.final_norm.weight.uniform_(0.2, 3.0)
        model.module.model.layers[0].post_attention_layernorm.weight.uniform_(0.2, 3.0)
    W_U = model.module.lm_head.weight.detach()
    up = model.module.model.layers[0].mlp.up_proj.weight.detach()
    gains = {"raw": torch.ones(64), "final_gain": model.final_norm.weight.detach(),
             "input_gain": model.module.model.layers[0].post_attention_layernorm.weight.detach()}
    for variant, gain in gains.items():
        table = decode_neurons(model, [0], weights=["up"], variant=variant, k=4, compute_dtype="float32", progress=False)
        expected = ((up * gain) @ W_U.T).topk(4, dim=1).indices
        assert torch.equal(torch.from_numpy(np.stack(table.top_ids)), expected), variant


def test_bfloat16_screen_returns_float32s_top_k_even_for_near_ties():
    torch.manual_seed(0)
    W_U = torch.randn(3000, 48)
    W_U[1000:1040] = W_U[7] + 3e-3 * torch.randn(40, 48)  # near-duplicates of one row: bfloat16 cannot order them, float32 can
    vectors = torch.randn(200, 48)
    vectors[:20] = W_U[7] * 2 + 1e-3 * torch.randn(20, 48)  # these rows' top k sit among the near-duplicates
    screen = ScreenedUnembedding(W_U)
    got = top_and_bottom(W_U, vectors, 10, screen=screen)
    scores = vectors.double() @ W_U.double().T
    top, bottom = scores.topk(10, dim=1), scores.topk(10, dim=1, largest=False)
    # the chosen tokens' exact (float64) scores are the k best, up to float32 rounding of ties
    torch.testing.assert_close(scores.gather(1, got[1]), top.values, rtol=0, atol=1e-4)
    torch.testing.assert_close(scores.gather(1, got[3]), bottom.values, rtol=0, atol=1e-4)
    assert (got[1] == top.indices).float().mean() > 0.99
    assert screen.unsafe_rows > 0  # the near-tie rows went through the float32 fallback


def test_clamping_sets_the_neuron_and_measures_the_token():
    model = tiny_model("llama", n_layers=2)
    prompts = ["hello there", "abc", "xyz"]
    result = clamp_effect(model, 1, 3, 6.0, prompts, token="a", max_new_tokens=5)
    # independent reading: a plain torch hook on down_proj's input sets neuron 3, teacher-forced on the clean text
    a = model.tokenizer("a")["input_ids"][-1]
    down = model.module.model.layers[1].mlp.down_proj

    def clamp(_module, args):
        x = args[0].clone()
        x[..., 3] = 6.0
        return (x,)

    clean = [model.tokenize(p).ids[0] for p in prompts]
    forced = []
    with torch.no_grad():
        for ids in clean:  # greedy continuation without the clamp
            for _ in range(5):
                ids = torch.cat([ids, model(ids[None])[0, -1].argmax()[None]])
            handle = down.register_forward_pre_hook(clamp)
            forced.append(model(ids[None, :-1])[0, -5:].softmax(-1)[:, a])
            handle.remove()
    assert result.p_clamped == pytest.approx(float(torch.cat(forced).mean()), rel=1e-5)
    assert result.token == "a" and result.p_clamped != pytest.approx(result.p_clean)
    assert list(result.generations.columns) == ["prompt", "clean", "clamped"]


def test_table_files_and_bad_input(tmp_path):
    model = tiny_model("llama", n_layers=2)
    table = decode_neurons(model, variant="final_gain", k=3, progress=False)
    assert len(table) == 2 * 3 * model.cfg.d_mlp
    parquet, page = write_neuron_table(table, tmp_path)
    back = pd.read_parquet(parquet)
    assert back.shape == table.shape and list(back.top_ids[5]) == list(table.top_ids[5])
    assert '"rows"' in page.read_text() and "<input" in page.read_text()
    with pytest.raises(InputError, match="out of range"):
        decode_neurons(model, [2], progress=False)
    with pytest.raises(InputError, match="variant"):
        decode_neurons(model, variant="softmax", progress=False)
    with pytest.raises(InputError, match="weights"):
        decode_neurons(model, weights=["query"], progress=False)
    with pytest.raises(InputError, match="out of range"):
        clamp_effect(model, 1, 500, 1.0, ["abc"])
