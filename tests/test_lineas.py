"""LinEAS and the AcT baselines: the loss against scipy, the proximal step against a plain loop,
maps against plain hooks, generation, save / load and bad input."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from interp.errors import InputError
from interp.intervene import Affine
from interp.models import tiny_model
from interp.steering import (
    AffineMaps, fit_act, fit_lineas, generate, prox_sparse_group_lasso, sweep, token_activations, wasserstein_1d,
)
from interp.steering.lineas import prox_thresholds

SOURCE = ["abc def", "hello there", "zzz yy", "qq rr ss", "mm nn oo"]
TARGET = ["xyz uvw", "wow wow", "ok ok ok", "tt uu vv", "pp"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=3)


def sites(model, layers=(0, 1)):
    return [model.site("resid_post", layer) for layer in layers]


def identity(model, layers=(0, 1)):
    d = model.cfg.d_model
    return AffineMaps("identity", {s: torch.ones(d) for s in sites(model, layers)}, {s: torch.zeros(d) for s in sites(model, layers)})


def test_w1_is_zero_on_identical_samples_and_matches_scipy():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 5, generator=gen, dtype=torch.float64)
    assert torch.equal(wasserstein_1d(x, x), torch.zeros(5, dtype=torch.float64))
    assert torch.equal(wasserstein_1d(x, x[torch.randperm(37, generator=gen)]), torch.zeros(5, dtype=torch.float64))
    for n, m in [(37, 37), (37, 23), (10, 64), (1, 7)]:
        a = torch.randn(n, 5, generator=gen, dtype=torch.float64)
        b = 2 * torch.rand(m, 5, generator=gen, dtype=torch.float64) + 0.5
        ours = wasserstein_1d(a, b)
        for j in range(5):
            assert ours[j].item() == pytest.approx(wasserstein_distance(a[:, j].numpy(), b[:, j].numpy()), rel=1e-10, abs=1e-12)
    assert wasserstein_1d(a[:, 0], b[:, 0]).item() == pytest.approx(wasserstein_distance(a[:, 0].numpy(), b[:, 0].numpy()))


def test_w1_gradient_moves_samples_towards_each_other():
    x = torch.tensor([[0.0], [1.0], [2.0]], requires_grad=True)
    wasserstein_1d(x, torch.tensor([[5.0], [6.0], [7.0], [8.0]])).sum().backward()
    assert (x.grad < 0).all()  # every source value is below its matched target quantile


def test_proximal_step_zeroes_exactly_the_groups_under_the_threshold():
    gen = torch.Generator().manual_seed(1)
    groups = torch.randn(200, 2, generator=gen) * torch.rand(200, 1, generator=gen)
    l1, group = 0.05, 0.3
    out = prox_sparse_group_lasso(groups, l1, group)
    for j in range(200):  # a plain loop, entry by entry
        soft = [math.copysign(max(abs(v) - l1, 0.0), v) for v in groups[j].tolist()]
        norm = math.hypot(*soft)
        if norm <= group:
            assert out[j].tolist() == [0.0, 0.0]
        else:
            assert out[j].tolist() == pytest.approx([v * (1 - group / norm) for v in soft], rel=1e-5)
            assert (out[j] != 0).any()
    zeroed = (out == 0).all(1)
    assert 0 < int(zeroed.sum()) < 200  # both kinds of groups occur


def test_prox_thresholds_are_in_adams_metric():
    """After one Adam step Adam's second moment, bias-corrected, is g**2: thresholds lr * strength / (|g| + eps)."""
    g_w, g_b = torch.tensor([0.5, -2.0, 1e-3]), torch.tensor([4.0, 0.25, -1e-2])
    w, b = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.1, eps=1e-8)
    w.grad, b.grad = g_w.clone(), g_b.clone()
    opt.step()
    l1_t, group_t = prox_thresholds(opt, (w, b), 0.3, 0.7)
    for j in range(3):
        scale = [0.1 / (abs(float(g)) + 1e-8) for g in (g_w[j], g_b[j])]
        assert l1_t[j].tolist() == pytest.approx([0.3 * v for v in scale], rel=1e-5)
        assert float(group_t[j, 0]) == pytest.approx(0.7 * (scale[0] + scale[1]) / 2, rel=1e-5)


def test_affine_intervention_edits_the_residual_exactly(model):
    d = model.cfg.d_model
    w, b = torch.randn(d), torch.randn(d)
    tokens = model.tokenize(["abcdefg"])
    seen = []
    handle = model.module.model.layers[1].register_forward_pre_hook(lambda _m, args, kw: seen.append((args[0] if args else kw["hidden_states"]).detach().clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            model(tokens)
            with model.intervene(Affine(model.site("resid_post", 0), w, b)):
                model(tokens)
    finally:
        handle.remove()
    plain, edited = seen
    torch.testing.assert_close(edited, plain * w + b)


def test_identity_map_and_strength_zero_leave_greedy_generation_identical(model):
    prompts = ["abc", "hello wor", "zz"]
    plain = generate(model, prompts, max_new_tokens=12)
    same = generate(model, prompts, identity(model).steering(1.0), max_new_tokens=12)
    assert same.new_ids == plain.new_ids
    maps = fit_lineas(model, SOURCE, TARGET, sites(model), steps=30, lr=0.05, group=0.0, progress=False)
    zero = generate(model, prompts, maps.steering(0.0), max_new_tokens=12)
    assert zero.new_ids == plain.new_ids
    pushed = AffineMaps("big", {s: torch.ones(model.cfg.d_model) * 3 for s in maps.sites}, {s: torch.ones(model.cfg.d_model) * 2 for s in maps.sites})
    assert generate(model, prompts, pushed.steering(1.0), max_new_tokens=12).new_ids != plain.new_ids  # the hooks act


def test_lineas_lowers_the_loss_end_to_end(model):
    s = sites(model)
    maps = fit_lineas(model, SOURCE, TARGET, s, steps=60, lr=0.05, group=0.0, progress=False)
    target = token_activations(model, TARGET, s)

    def loss(interventions):  # the summed W1, recomputed from plain activations
        source = token_activations(model, SOURCE, s, interventions=interventions)
        return sum(float(wasserstein_1d(source[x], target[x]).sum()) for x in s)

    before, after = loss([]), loss(maps.interventions(1.0))
    assert after < 0.7 * before
    assert maps.info["loss_first"] == pytest.approx(before, rel=1e-4)
    # maps from layer 1 on: the blocks below run once (cached), the loss is still the plain one
    later = sites(model, (1, 2))
    first = fit_lineas(model, SOURCE, TARGET, later, steps=1, lr=0.05, group=0.0, progress=False)
    plain = token_activations(model, SOURCE, later)
    target_later = token_activations(model, TARGET, later)
    expected = sum(float(wasserstein_1d(plain[x], target_later[x]).sum()) for x in later)
    assert first.info["loss_first"] == pytest.approx(expected, rel=1e-5)
    # end to end: the first map alone, fitted for both sites, differs from the map fitted for site 0 only
    alone = fit_lineas(model, SOURCE, TARGET, s[:1], steps=60, lr=0.05, group=0.0, progress=False)
    assert not torch.allclose(alone.weight[s[0]], maps.weight[s[0]])


def test_group_lasso_switches_whole_units_off(model):
    dense = fit_lineas(model, SOURCE, TARGET, sites(model), steps=30, lr=0.05, group=0.0, progress=False)
    sparse = fit_lineas(model, SOURCE, TARGET, sites(model), steps=30, lr=0.05, group=0.9, progress=False)
    d = model.cfg.d_model
    assert sum(dense.active_units().values()) == 2 * d
    assert sum(sparse.active_units().values()) < 1.5 * d  # of 2 * d
    for s in sparse.sites:  # a unit is off only as a whole: weight exactly 1 and bias exactly 0 together
        off = sparse.weight[s] == 1
        assert torch.equal(off, sparse.bias[s] == 0)


def test_mean_and_linear_act_against_plain_statistics(model):
    s = sites(model, (1,))
    source, target = token_activations(model, SOURCE, s)[s[0]], token_activations(model, TARGET, s)[s[0]]
    mean = fit_act(model, SOURCE, TARGET, s, kind="mean", progress=False)
    torch.testing.assert_close(mean.bias[s[0]], target.mean(0) - source.mean(0), atol=1e-5, rtol=1e-4)
    moved = token_activations(model, SOURCE, s, interventions=mean.interventions(1.0))[s[0]]
    torch.testing.assert_close(moved.mean(0), target.mean(0), atol=1e-4, rtol=1e-4)
    linear = fit_act(model, SOURCE, TARGET, s, kind="linear", progress=False)
    # scipy-free reference: the least-squares line through matched quantiles, on a fine common grid
    levels = (np.arange(4000) + 0.5) / 4000
    for j in range(0, model.cfg.d_model, 9):
        xq = np.sort(source[:, j].double().numpy())[np.floor(levels * len(source)).astype(int)]
        yq = np.sort(target[:, j].double().numpy())[np.floor(levels * len(target)).astype(int)]
        slope, intercept = np.polyfit(xq, yq, 1)
        assert linear.weight[s[0]][j].item() == pytest.approx(slope, rel=2e-2, abs=2e-3)
        assert linear.bias[s[0]][j].item() == pytest.approx(intercept, rel=2e-2, abs=2e-2)


def test_act_fits_layer_by_layer_on_mapped_activations(model):
    s = sites(model)
    maps = fit_act(model, SOURCE, TARGET, s, kind="mean", progress=False)
    first = [Affine(s[0], maps.weight[s[0]], maps.bias[s[0]])]
    source = token_activations(model, SOURCE, s[1:], interventions=first)[s[1]]
    target = token_activations(model, TARGET, s[1:])[s[1]]
    torch.testing.assert_close(maps.bias[s[1]], target.mean(0) - source.mean(0), atol=1e-5, rtol=1e-4)


def test_save_load_roundtrip_and_width_check(model, tmp_path):
    maps = fit_act(model, SOURCE, TARGET, sites(model), kind="linear", progress=False)
    path = maps.save(tmp_path / "maps.safetensors")
    assert (tmp_path / "maps.json").is_file()
    back = AffineMaps.load(tmp_path)
    assert back.method == "linear-act" and back.sites == maps.sites
    for s in maps.sites:
        assert torch.equal(back.weight[s], maps.weight[s]) and torch.equal(back.bias[s], maps.bias[s])
    back.check_model(model)
    wide = tiny_model("llama", n_layers=3, d_model=32)
    with pytest.raises(InputError, match="width 64"):
        back.check_model(wide)
    (tmp_path / "maps.json").write_text("{}")
    with pytest.raises(InputError, match="not an affine map"):
        AffineMaps.load(path)


def test_bad_input_is_refused(model):
    with pytest.raises(InputError, match="at least 4 source and 4 target"):
        fit_lineas(model, SOURCE[:3], TARGET, sites(model), progress=False)
    with pytest.raises(InputError, match="at least 4"):
        fit_act(model, SOURCE, TARGET[:2], sites(model), progress=False)
    maps = identity(model)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(InputError, match=r"outside \[0, 1\]"):
            maps.steering(bad)
    with pytest.raises(InputError, match=r"outside \[0, 1\]"):
        sweep(model, {"map": maps}, [0.5, 2.0], ["abc"], progress=False)
    with pytest.raises(InputError, match="choose one of"):
        maps.steering(0.5, positions="middle")
    with pytest.raises(Exception, match="hook_resid_postt"):
        fit_lineas(model, SOURCE, TARGET, ["blocks.0.hook_resid_postt"], progress=False)


def test_sweep_takes_maps(model, tmp_path):
    maps = fit_act(model, SOURCE, TARGET, sites(model), kind="mean", progress=False)
    result = sweep(model, {"mean-act": maps}, [0.5, 1.0], ["abc", "hel"], max_new_tokens=6, out=tmp_path, progress=False)
    table = result.table
    assert list(table["method"]) == ["unsteered", "mean-act", "mean-act"]
    again = sweep(model, {"mean-act": maps}, [0.5, 1.0], ["abc", "hel"], max_new_tokens=6, out=tmp_path, progress=False)
    assert again.generations["text"].tolist() == result.generations["text"].tolist()
    direct = generate(model, ["abc", "hel"], maps.steering(1.0), max_new_tokens=6).texts
    assert result.generations.query("strength == 1.0")["text"].tolist() == direct


KILLED_FIT = """
import sys
from interp.models import tiny_model
from interp.steering import fit_lineas
fit_lineas(tiny_model("llama", n_layers=3), {source!r}, {target!r}, ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"],
           steps=20, lr=0.05, group=0.02, batch_size=3, checkpoint=sys.argv[1], checkpoint_every=5, progress=False)
"""


def test_killed_fit_resumes_to_the_same_maps(model, tmp_path):
    state = tmp_path / "fit-state.safetensors"
    script = KILLED_FIT.format(source=SOURCE, target=TARGET)
    killed = subprocess.run([sys.executable, "-c", script, str(state)], env={**os.environ, "INTERP_FAULT": "lineas.checkpoint#2"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    s = sites(model, (1, 2))
    kwargs = dict(steps=20, lr=0.05, group=0.02, batch_size=3, progress=False)
    resumed = fit_lineas(model, SOURCE, TARGET, s, checkpoint=state, resume=True, **kwargs)
    assert resumed.info["resumed"]
    full = fit_lineas(model, SOURCE, TARGET, s, **kwargs)
    for site in s:
        assert torch.equal(resumed.weight[site], full.weight[site]) and torch.equal(resumed.bias[site], full.bias[site])
    assert 0 < sum(full.active_units().values()) < 2 * model.cfg.d_model  # the proximal step acted
    assert resumed.info["loss_last"] == full.info["loss_last"]
    with pytest.raises(InputError, match="lr differ"):  # other settings are refused, not silently mixed
        fit_lineas(model, SOURCE, TARGET, s, checkpoint=state, resume=True, **{**kwargs, "lr": 0.01})
