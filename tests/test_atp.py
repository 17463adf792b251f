"""AtP*: the QK fix against real patched attention patterns, on a tiny model whose softmax saturates."""

from __future__ import annotations

import pytest
import torch

import interp
import interp.patching.atp as atp
from interp.errors import InputError
from interp.models import tiny_model
from interp.models.hooks import tap_attention
from interp.patching import Cell, activation_patching, atp_star, attribution_patching, pairs_task
from interp.patching.attribution import gradients_at


@pytest.fixture(scope="module")
def saturated():
    """Two tiny Llama layers; layer 1's queries and keys scaled up so its softmax saturates."""
    model = tiny_model("llama", n_layers=2)
    attn = model.module.model.layers[1].self_attn
    with torch.no_grad():
        attn.q_proj.weight.mul_(12.0)
        attn.k_proj.weight.mul_(12.0)
    task = pairs_task(model, ["The cat sat on the mat", "The dog ran to the bar"],
                      ["The cat sat in the hat", "The dog ran by the sea"], ["x", "y"], ["q", "z"])
    return model, task


def test_qk_fix_equals_patching_the_attention_pattern(saturated):
    """The QK fix's pattern term is sum(dM/dA * (A_patched - A)), with A_patched the pattern of a real
    forward whose residual is patched: one position at a time, and every position at once."""
    model, task = saturated
    resid, pattern = model.site("resid_pre", 1), model.site("pattern", 1)
    with torch.no_grad():
        base = model.run_with_cache(task.corrupt, [pattern])
        source = model.run_with_cache(task.clean, [resid])
    assert float(base[pattern].max(-1).values.mean()) > 0.7  # saturated on average
    qk: dict = {}
    with atp._capture_qk(model, [1], qk):
        acts, grads = gradients_at(model, task, task.corrupt, [resid, pattern], None)
    [[fix]] = atp._qk_fix([qk[1]], [[atp._patched_qk(model, {resid: 1}, acts, source, qk)[resid]]], [grads[pattern]])

    def through_pattern(positions):
        with torch.no_grad(), model.intervene(interp.Replace(resid, source[resid], positions=positions)):
            patched = model.run_with_cache(task.corrupt, [pattern])[pattern]
        return float((grads[pattern] * (patched - base[pattern])).sum())

    expected = torch.tensor([through_pattern([p]) for p in range(task.clean.ids.shape[1])], dtype=torch.float64)
    torch.testing.assert_close(fix["each"].double(), expected, rtol=1e-4, atol=1e-6)
    assert float(fix["all"]) == pytest.approx(through_pattern(None), rel=1e-4, abs=1e-6)
    # Saturation makes the linear estimate through queries and keys wrong by a lot somewhere.
    assert float((fix["linear each"] - expected).abs().max()) > 0.5 * float(expected.abs().max())


def test_patched_queries_and_keys_of_several_sites_at_once_equal_a_real_patched_forward():
    """_patched_qk stacks a layer's sites along the batch (masks and positions repeated): each site's
    queries and keys must equal those of a real forward whose layer-1 residual carries that site's
    change alone (AtP*'s definition; later components stay linear), on padded prompts."""
    model = tiny_model("llama", n_layers=2)
    base = model.tokenize(["The cat sat on the mat today", "A dog ran"])
    source_tokens = model.tokenize(["The cow sat in the hat today", "A cow ran"])
    assert base.mask is not None and not bool(base.mask.all())  # padded: the mask must be repeated too
    sites = [model.site("attn_out", 0), model.site("mlp_out", 0), model.site("resid_mid", 0)]
    qk: dict = {}
    with torch.no_grad():
        source = model.run_with_cache(source_tokens, sites)
        with atp._capture_qk(model, [1], qk):
            acts = model.run_with_cache(base, sites + [model.site("resid_pre", 1), model.site("pattern", 1)])
    patched = atp._patched_qk(model, dict.fromkeys(sites, 1), acts, source, qk)
    for site in sites:
        real: dict = {}
        changed = acts[model.site("resid_pre", 1)] + source[site] - acts[site]
        with torch.no_grad(), atp._capture_qk(model, [1], real), model.intervene(interp.Replace(model.site("resid_pre", 1), changed)):
            model(base)
        torch.testing.assert_close(patched[site]["q"], real[1]["q"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(patched[site]["k"], real[1]["k"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(patched[sites[0]]["q"], patched[sites[1]]["q"])  # the sites' changes differ


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_attention_tap_sees_the_kernel_inputs_and_changes_nothing(family):
    """A tap runs no eager attention: the forward stays the model's own. Its score functions must
    rebuild the pattern the kernel used: softmax(masked(transform(q k^T))) @ values equals the heads'
    outputs (z) on padded prompts (gemma2: soft-capped scores, sliding window, eager kernel)."""
    model = tiny_model(family, n_layers=2)
    tokens = model.tokenize(["The cat sat on the mat today and then", "A dog ran"])
    assert tokens.mask is not None and not bool(tokens.mask.all())
    seen: list = []
    with torch.no_grad():
        plain = model(tokens)
        handle = tap_attention(atp._attention(model, 1), model.module.config, seen.append)
        try:
            tapped, z = model(tokens), model.run_with_cache(tokens, [model.site("z", 1)])[model.site("z", 1)]
        finally:
            handle.remove()
    assert torch.equal(plain, tapped) and len(seen) == 2
    inputs = seen[0]
    groups = inputs.query.shape[1] // inputs.key.shape[1]
    assert groups > 1  # grouped-query attention: keys come unrepeated
    keys, values = (t.repeat_interleave(groups, dim=1) for t in (inputs.key, inputs.value))
    pattern = torch.softmax(inputs.masked(inputs.transform(inputs.query @ keys.transpose(-1, -2))), dim=-1)
    real = tokens.mask.bool()  # padded query rows are fully masked: what the kernel puts there is its own business
    torch.testing.assert_close((pattern @ values).transpose(1, 2)[real], z[real], rtol=1e-5, atol=1e-6)


def test_pattern_gradient_from_head_outputs_equals_the_pattern_sites_gradient(saturated):
    model, task = saturated
    pattern, z = model.site("pattern", 1), model.site("z", 1)
    qk: dict = {}
    with atp._capture_qk(model, [1], qk):
        _, grads = gradients_at(model, task, task.corrupt, [pattern, z], None)
    assert float(grads[pattern].abs().max()) > 0
    torch.testing.assert_close(atp._pattern_gradient(qk[1], grads[z]), grads[pattern], rtol=1e-5, atol=1e-7)


def test_atp_star_is_closer_to_activation_patching_where_softmax_saturates(saturated):
    model, task = saturated
    cells = [Cell(model.site("resid_pre", 1), p) for p in range(task.clean.ids.shape[1])]
    truth = activation_patching(model, task, cells=cells, progress=False).table.metric.to_numpy()
    plain = attribution_patching(model, task, cells=cells).table.metric.to_numpy()
    star = atp_star(model, task, cells=cells).table.metric.to_numpy()
    assert ((star - truth) ** 2).sum() < 0.2 * ((plain - truth) ** 2).sum()


def test_queries_and_keys_from_the_source_run_equal_those_recomputed_from_the_patched_residual(saturated):
    """A resid_pre cell's patched queries and keys are read off the source run when that run reaches
    their attention (a later site is asked for), else recomputed by calling the block: same estimates."""
    model, task = saturated
    resid = [Cell(model.site("resid_pre", 1), p) for p in range(task.clean.ids.shape[1])]
    recomputed_for: list[set] = []
    real = atp._patched_qk

    def spy(model, readers, *args):
        recomputed_for.append(set(readers))
        return real(model, readers, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(atp, "_patched_qk", spy)
        recomputed = atp_star(model, task, cells=resid).table.metric.to_numpy()
        read_off = atp_star(model, task, cells=resid + [Cell(model.site("mlp_out", 1), 3)]).table.metric.to_numpy()[:-1]
    assert recomputed_for == [{model.site("resid_pre", 1)}, set()]  # the second call read them off the source run
    plain = attribution_patching(model, task, cells=resid).table.metric.to_numpy()
    assert abs(recomputed - plain).max() > 1e-2  # the fix matters on these cells
    assert read_off == pytest.approx(recomputed, rel=1e-5, abs=1e-6)


def test_cells_without_a_query_key_path_keep_the_attribution_estimate(saturated):
    model, task = saturated
    cells = [Cell(model.site("z", 0), 5, 1), Cell(model.site("mlp_post", 1), 7), Cell(model.site("mlp_out", 1), 9)]
    star = atp_star(model, task, cells=cells).table.metric.to_numpy()
    plain = attribution_patching(model, task, cells=cells).table.metric.to_numpy()
    assert star == pytest.approx(plain, rel=1e-6, abs=1e-9)


def test_grad_drop_averages_the_estimates_with_each_layer_gradient_cut(saturated):
    model, task = saturated
    cells = [Cell(model.site("resid_pre", 0), p) for p in (12, 21)] + [Cell(model.site("attn_out", 0), 21)]
    dropped = atp_star(model, task, cells=cells, grad_drop=True).table.metric.to_numpy() - task.corrupt_value
    per_layer = []
    for layer in range(model.cfg.n_layers):
        cut = [interp.Apply(model.site(kind, layer), lambda a: a.detach()) for kind in ("attn_out", "mlp_out")]
        with model.intervene(*cut):
            per_layer.append(atp_star(model, task, cells=cells).table.metric.to_numpy() - task.corrupt_value)
    expected = sum(abs(e) for e in per_layer) / len(per_layer)
    assert dropped == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert not (per_layer[0] == pytest.approx(per_layer[1], rel=1e-3))  # cutting a layer changes the estimate


def test_atp_star_refuses_transformer_lens_models():
    model = tiny_model("transformer_lens", n_layers=1)
    task = pairs_task(model, ["ab"], ["ac"], ["x"], ["y"])
    with pytest.raises(InputError, match="attention interface"):
        atp_star(model, task)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_layers_fixed_together_give_the_same_estimates_as_one_at_a_time(family, monkeypatch):
    """The QK fixes of several reading layers are computed stacked (gemma2: sliding-window and global
    layers share a stack, each with its own mask); stacking must not change any estimate."""
    model = tiny_model(family, n_layers=4)
    task = pairs_task(model, ["The cat sat on the mat, then the cat ran off", "The bee sat on the log, then the bee flew up"],
                      ["The dog sat on the rug, then the dog ran off", "The ant sat on the log, then the ant flew up"],
                      ["x", "y"], ["q", "z"])  # 44 tokens: past gemma2's sliding window of 8
    together = atp_star(model, task).table.metric.to_numpy()
    monkeypatch.setattr(atp, "_LAYERS_AT_ONCE", 1)
    alone = atp_star(model, task).table.metric.to_numpy()
    plain = attribution_patching(model, task).table.metric.to_numpy()
    assert abs(alone - plain).max() > 1e-5  # the fix does something here (100x the tolerance below)
    assert together == pytest.approx(alone, rel=1e-5, abs=1e-7)
