"""Gradients at every site: attribution patching against autograd through an independent forward,
and RelP's relevance against the conservation it promises.

The independent forward replaces one tensor by a leaf with a plain PyTorch hook on the HF module
named in test_sites.EXPECT (or with TransformerLens's own hook API), runs the task metric and
back-propagates: that leaf's gradient is the definition of the gradient at the site.
"""

from __future__ import annotations

import pytest
import torch
from test_sites import EXPECT

from interp.models import tiny_model
from interp.patching import Cell, Rules, attribution_patching, gradients_at, pairs_task


def toy_task(model):
    clean = ["The cat sat on the mat", "The dog ran to the bar"]  # byte tokens: 22 each
    corrupt = ["The cat sat in the hat", "The dog ran by the sea"]
    return pairs_task(model, clean, corrupt, ["x", "y"], ["q", "z"])


def location(model, family: str, site: str):
    """(module, "in" | "out") that site means, from the family's expectations (not interp's mapping)."""
    e = EXPECT[family]
    info = model.site_table.info(site)
    root = model.module
    if info.layer is None:
        if info.kind == "ln_final":
            return root.get_output_embeddings(), "in"
        return (root.get_input_embeddings(), "out") if info.kind == "embed" else (root.get_submodule("transformer.wpe"), "out")
    block = root.get_submodule(f"{e.layers}.{info.layer}")
    attn, mlp = block.get_submodule(e.attn), block.get_submodule(e.mlp)
    post_attn = block.get_submodule(e.post_attn) if e.post_attn else None
    post_mlp = block.get_submodule(e.post_mlp) if e.post_mlp else None
    return {
        "resid_pre": (block, "in"), "resid_post": (block, "out"), "ln1": (attn, "in"), "ln2": (mlp, "in"),
        "z": (attn.get_submodule(e.o_proj), "in"), "mlp_post": (mlp.get_submodule(e.down), "in"),
        "attn_out": (post_attn or attn, "out"), "ln1_post": (post_attn, "out"),
        "mlp_out": (post_mlp or mlp, "out"), "ln2_post": (post_mlp, "out"),
    }[info.kind]


def leaf_gradient(model, task, tokens, module, side: str):
    """(value, d mean-metric / d value) of one module's input or output, by a plain hook and autograd."""
    kept = {}

    def make_leaf(value):
        kept["leaf"] = value.detach().clone().requires_grad_()
        return kept["leaf"].clone()  # a copy for the model: some blocks add into it in place (Falcon)

    def pre(_m, args, kwargs):
        if args:
            return (make_leaf(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": make_leaf(kwargs["hidden_states"])}

    def post(_m, _args, out):
        return (make_leaf(out[0]), *out[1:]) if isinstance(out, tuple) else make_leaf(out)

    handle = module.register_forward_pre_hook(pre, with_kwargs=True) if side == "in" else module.register_forward_hook(post)
    try:
        logits = model.module(input_ids=tokens.ids).logits
    finally:
        handle.remove()
    task.metric(logits[:, -1], torch.arange(len(task))).mean().backward()
    return kept["leaf"].detach(), kept["leaf"].grad


def pattern_gradient(model, family, task, tokens, layer):
    """d metric / d pattern = d metric / d z . V (z = pattern @ V per head), from plain hooks on v_proj and o_proj."""
    e = EXPECT[family]
    attn = model.module.get_submodule(f"{e.layers}.{layer}.{e.attn}")
    kept = {}
    handle = attn.v_proj.register_forward_hook(lambda _m, _a, out: kept.setdefault("v", out.detach()))
    try:
        _, grad_z = leaf_gradient(model, task, tokens, attn.get_submodule(e.o_proj), "in")
    finally:
        handle.remove()
    heads, kv_heads = model.cfg.n_heads, model.cfg.n_kv_heads
    values = kept["v"].unflatten(-1, (kv_heads, -1)).repeat_interleave(heads // kv_heads, dim=2)  # [b, key, head, d]
    return torch.einsum("bqhd,bkhd->bhqk", grad_z.unflatten(-1, (heads, -1)), values)


HF_PLAIN = ["llama", "gemma2", "gpt2", "gpt_neox", "olmo2", "falcon", "phi"]


@pytest.mark.parametrize("family", HF_PLAIN)
def test_gradient_at_every_site_equals_autograd_through_an_independent_forward(family):
    torch.manual_seed(0)
    model = tiny_model(family, n_layers=2)
    task = toy_task(model)
    base = task.corrupt
    sites = [s for s in model.site_names() if model.site_table.info(s).kind != "pattern"]
    acts, grads = gradients_at(model, task, base, sites, None)
    for site in sites:
        info = model.site_table.info(site)
        if info.kind == "resid_mid":  # no module computes it; it flows on exactly as attn_out does
            value = acts[model.site("resid_pre", info.layer)] + acts[model.site("attn_out", info.layer)]
            _, grad = leaf_gradient(model, task, base, *location(model, family, model.site("attn_out", info.layer)))
            torch.testing.assert_close(acts[site], value, rtol=1e-5, atol=1e-5)
        else:
            value, grad = leaf_gradient(model, task, base, *location(model, family, site))
            if info.kind == "z":
                value, grad = value.unflatten(-1, (model.cfg.n_heads, -1)), grad.unflatten(-1, (model.cfg.n_heads, -1))
            assert torch.equal(acts[site], value), site
        assert grad.abs().max() > 0, site
        torch.testing.assert_close(grads[site], grad, rtol=1e-4, atol=1e-6, msg=site)


def test_gradient_at_every_site_of_a_transformer_lens_model():
    """TransformerLens runs some hook points more than once per forward (``ln1`` for the query, key
    and value inputs): the site's gradient is that of the one activation every call reads. The
    reference replaces the activation by one leaf through TransformerLens's own hook API."""
    torch.manual_seed(0)
    model = tiny_model("transformer_lens", n_layers=2)
    task = toy_task(model)
    base = task.corrupt
    _, fired = model.module.run_with_cache(base.ids)  # optional hook points (hook_result, ...) stay off
    sites = [s for s in model.site_names() if s in fired and model.site_table.info(s).kind != "pattern"]
    assert len(sites) > 20
    acts, grads = gradients_at(model, task, base, sites, None)
    checked_repeated = False
    for site in sites:
        kept, calls = {}, []

        def swap(act, hook):
            calls.append(1)
            kept.setdefault("leaf", act.detach().clone().requires_grad_())
            return kept["leaf"]

        logits = model.module.run_with_hooks(base.ids, fwd_hooks=[(site, swap)])
        task.metric(logits[:, -1], torch.arange(len(task))).mean().backward()
        checked_repeated |= len(calls) > 1
        assert torch.equal(acts[site], kept["leaf"].detach()), site
        assert kept["leaf"].grad.abs().max() > 0, site
        torch.testing.assert_close(grads[site], kept["leaf"].grad, rtol=1e-4, atol=1e-6, msg=site)
    assert checked_repeated  # some hook point did fire several times (else this test checks nothing new)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_gradient_at_the_attention_pattern(family):
    model = tiny_model(family, n_layers=2)
    task = toy_task(model)
    sites = [model.site("pattern", layer) for layer in range(2)]
    _, grads = gradients_at(model, task, task.corrupt, sites, None)
    for layer, site in enumerate(sites):
        expected = pattern_gradient(model, family, task, task.corrupt, layer)
        assert expected.abs().max() > 0
        torch.testing.assert_close(grads[site], expected, rtol=1e-4, atol=1e-7)


def test_attribution_estimates_equal_independent_gradient_times_difference():
    """Attribution patching's table, cell by cell, from independent activations and gradients."""
    family = "gemma2"
    model = tiny_model(family, n_layers=2)
    task = toy_task(model)
    n = task.clean.ids.shape[1]
    kinds = ["resid_pre", "ln1", "z", "ln1_post", "attn_out", "ln2", "mlp_post", "ln2_post", "mlp_out", "resid_post"]
    cells = [Cell(model.site(kind, layer), position) for kind in kinds for layer in range(2) for position in (9, 14, n - 1, None)]
    cells += [Cell(model.site("z", 1), position, head) for position in (14, None) for head in (0, 3)]
    result = attribution_patching(model, task, cells=cells)
    differences = []
    for cell, estimate in zip(cells, result.table.metric, strict=True):
        module, side = location(model, family, cell.site)
        base, grad = leaf_gradient(model, task, task.corrupt, module, side)
        source, _ = leaf_gradient(model, task, task.clean, module, side)
        contribution = (source - base) * grad
        if model.site_table.info(cell.site).kind == "z":
            contribution = contribution.unflatten(-1, (model.cfg.n_heads, -1))
        if cell.position is not None:
            contribution = contribution[:, cell.position]
        if cell.head is not None:
            contribution = contribution[..., cell.head, :]
        expected = task.corrupt_value + float(contribution.sum())
        differences.append(expected - task.corrupt_value)
        assert estimate == pytest.approx(expected, rel=1e-4, abs=1e-6), cell
    assert sum(abs(d) > 1e-3 for d in differences) > len(cells) // 2  # the activations really differ


def relevance(model, task, rules):
    sites = [s for s in model.site_names() if model.site_table.info(s).kind in KINDS]
    acts, grads = gradients_at(model, task, task.corrupt, sites, rules)
    with torch.no_grad():
        metric = float(task.metric(model(task.corrupt)[:, -1], torch.arange(len(task))).mean())
    return {s: float((acts[s] * grads[s]).sum()) for s in sites}, metric


KINDS = {"embed", "pos_embed", "ln_final", "resid_pre", "ln1", "pattern", "z", "ln1_post", "attn_out", "resid_mid", "ln2", "mlp_post",
         "ln2_post", "mlp_out", "resid_post"}
BIAS_FREE = ["llama", "mistral", "qwen3", "gemma", "gemma2", "gemma3", "olmo", "olmo2", "phi3", "granite", "arcee",
             "exaone4", "transformer_lens"]


@pytest.mark.parametrize("family", BIAS_FREE)
def test_relevance_is_conserved_at_every_site(family):
    """All four rules on a bias-free network: relevance (activation x gradient) at every cut of the
    network sums to the metric, and each branch's sites carry the same relevance."""
    model = tiny_model(family, n_layers=2)
    if family != "transformer_lens":
        assert not any(n.endswith("bias") for n, _ in model.module.named_parameters() if "norm" not in n)
        model.module.config.final_logit_softcapping = None  # Gemma 2: a soft-cap after the unembedding is not linear
    task = toy_task(model)
    r, metric = relevance(model, task, Rules.parse("all"))
    assert all(torch.isfinite(torch.tensor(v)) for v in r.values())

    def same(a, b):
        assert a == pytest.approx(b, rel=2e-3, abs=1e-4 * max(1.0, abs(metric)))

    same(r["hook_embed"] + r.get("hook_pos_embed", 0.0), metric)  # TransformerLens adds position embeddings
    same(r["ln_final.hook_normalized"], metric)
    for layer in range(2):
        for kind in ("resid_pre", "resid_mid", "resid_post"):
            if model.site_table.has(kind, layer):
                same(r[model.site(kind, layer)], metric)
        for branch in (("ln1", "pattern", "z", "ln1_post", "attn_out"), ("ln2", "mlp_post", "ln2_post", "mlp_out")):
            present = [model.site(kind, layer) for kind in branch if model.site_table.has(kind, layer)]
            assert abs(r[present[-1]]) > 1e-6
            for site in present[:-1]:
                same(r[site], r[present[-1]])
    plain, _ = relevance(model, task, None)
    assert abs(plain["hook_embed"] - metric) > 1e-3 * max(1.0, abs(metric))  # without the rules it is not conserved


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "gpt_neox", "cohere", "falcon", "nemotron", "glm", "glm4", "starcoder2"])
def test_relevance_reaches_every_site_in_families_with_biases(family):
    model = tiny_model(family, n_layers=2)
    task = toy_task(model)
    rules = Rules.parse("ln,identity,half" if family == "falcon" else "all")  # falcon has no pattern site
    r, _ = relevance(model, task, rules)
    assert all(torch.isfinite(torch.tensor(v)) for v in r.values())
    for layer in range(2):
        for kind in ("ln1", "ln2", "mlp_post", "z", "attn_out", "mlp_out"):
            assert abs(r[model.site(kind, layer)]) > 0, (kind, layer)
