"""Lenses: logit lens against the model's own logits, tuned and linear-map lenses, stores, files, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interp.errors import InputError
from interp.lens import (
    AffineLens, LensTrainConfig, NormalEquations, Readout, evaluate_lenses, fit_linear_lens, kl_and_grad, logit_lens,
    norm_info, train_tuned_lens,
)
from interp.lens import train as lens_train
from interp.models import tiny_model
from interp.store import HarvestConfig, harvest

PROMPTS = ["hello world, this is", "abc"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=3)


@pytest.fixture(scope="module")
def store(tmp_path_factory, model):
    """Every resid_pre site and the last resid_post of the tiny model, over a small corpus."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "quiet", "seven", "north"]
    corpus = tmp_path_factory.mktemp("corpus") / "text.txt"
    corpus.write_text(" ".join(rng.choice(words, size=8_000)))
    sites = ",".join([f"blocks.{i}.hook_resid_pre" for i in range(3)] + ["blocks.2.hook_resid_post"])
    config = HarvestConfig(out=tmp_path_factory.mktemp("store") / "s", model="tiny:llama", sites=sites, corpus=str(corpus),
                           tokens=31 * 48, context_len=32, batch_size=8, shard_contexts=16)
    return harvest(config, model=model, progress=False)


@pytest.mark.parametrize("family", ["llama", "gpt2", "transformer_lens", "olmo"])
def test_last_layer_equals_the_models_logits(family):
    model = tiny_model(family, n_layers=2)
    with torch.no_grad():
        logits = model(PROMPTS)  # the model's own forward (padded batch)
    real = model.tokenize(PROMPTS).real()
    result = logit_lens(model, PROMPTS, layers=[1], top_k=4, tokens=[7, 40])
    assert (result.table.kl.abs() < 1e-5).all()
    for row in result.table.itertuples():
        probs = logits[row.prompt, row.position].softmax(-1)
        top = probs.topk(4)
        assert [model.to_string([i]) for i in top.indices] == row.top_tokens
        np.testing.assert_allclose(row.top_probs, top.values.numpy(), atol=1e-5)
    for row in result.tokens.itertuples():
        scores = logits[row.prompt, row.position]
        assert row.rank == int((scores > scores[row.token_id]).sum()) + 1
        assert row.prob == pytest.approx(float(scores.softmax(-1)[row.token_id]), abs=1e-6)
    assert len(result.table) == int(real.sum())  # one row per real token: padding is skipped


def test_readout_formula_matches_the_norm_modules():
    for family in ["llama", "gpt2", "gpt_neox", "olmo", "transformer_lens"]:
        model = tiny_model(family, n_layers=1)
        info = norm_info(model.final_norm, model.cfg.d_model)
        x = torch.randn(5, model.cfg.d_model) * 4
        with torch.no_grad():
            torch.testing.assert_close(info(x), model.final_norm(x).float(), rtol=1e-4, atol=1e-5)
        assert info.kind == ("rms" if family == "llama" else "layer")
    llama = tiny_model("llama", n_layers=1)
    assert norm_info(llama.final_norm, 64).eps == pytest.approx(llama.module.config.rms_norm_eps, rel=1e-3)


def test_frozen_scale_reads_every_layer_with_the_last_layers_scale(model):
    cache = model.run_with_cache(PROMPTS[0], "blocks.*.hook_resid_post")
    result = logit_lens(model, PROMPTS[0], norm="frozen", top_k=3, positions=[-1])
    final = cache["resid_post", 2][0, -1]
    gain = model.final_norm.weight.detach()
    scale = (final.pow(2).mean() + model.module.config.rms_norm_eps).sqrt()
    W_U = model.module.lm_head.weight.detach()
    for row in result.table.itertuples():
        logits = W_U @ (gain * cache["resid_post", row.layer][0, -1] / scale)
        assert row.top_tokens == [model.to_string([i]) for i in logits.topk(3).indices]
    recomputed = logit_lens(model, PROMPTS[0], top_k=3, positions=[-1]).table
    assert recomputed.iloc[-1].top_probs == result.table.iloc[-1].top_probs  # same scale at the last layer
    assert recomputed.iloc[0].top_probs != result.table.iloc[0].top_probs


def test_chunked_unembedding_gives_the_same_table(model):
    whole = logit_lens(model, PROMPTS, top_k=5, tokens=["a"])
    chunked = logit_lens(model, PROMPTS, top_k=5, tokens=["a"], chunk_elements=3 * model.cfg.d_vocab)
    exact = ["prompt", "layer", "position", "top_tokens"]
    assert whole.table[exact].equals(chunked.table[exact]) and len(chunked.table) == 3 * 23
    np.testing.assert_allclose(np.stack(whole.table.top_probs), np.stack(chunked.table.top_probs), atol=2e-5)
    np.testing.assert_allclose(whole.table.kl, chunked.table.kl, atol=1e-6)
    assert whole.tokens[["prompt", "layer", "position", "rank"]].equals(chunked.tokens[["prompt", "layer", "position", "rank"]])
    np.testing.assert_allclose(whole.tokens.prob, chunked.tokens.prob, rtol=1e-5)


def test_identity_tuned_lens_equals_the_logit_lens(model, store):
    sites = [f"blocks.{i}.hook_resid_pre" for i in range(3)]
    lens = AffineLens.identity(model, sites)
    plain = logit_lens(model, PROMPTS, site="resid_pre", top_k=3)
    tuned = logit_lens(model, PROMPTS, lens=lens, top_k=3)
    assert tuned.lens == "tuned" and plain.table.equals(tuned.table)
    table = evaluate_lenses(model, store, {"logit": None, "tuned": lens}, sites, (0, 200), progress=False)
    wide = table.pivot(index="site", columns="lens", values="kl")
    np.testing.assert_allclose(wide["logit"], wide["tuned"], rtol=1e-6)


def test_a_trained_lens_is_applied_before_the_readout(model):
    """A non-identity translator: the lens table is h + hA^T + b read through the HF final norm and lm_head."""
    torch.manual_seed(0)
    sites = [f"blocks.{i}.hook_resid_pre" for i in range(3)]
    lens = AffineLens.identity(model, sites)
    d = model.cfg.d_model
    A, b = torch.randn(d, d) / d**0.5, torch.randn(d) * 2
    with torch.no_grad():
        lens.weight[1].copy_(A)
        lens.bias[1].copy_(b)
    result = logit_lens(model, PROMPTS[0], lens=lens, top_k=3, positions=[-1]).table.set_index("layer")
    captured = {}
    layer = model.module.model.layers[1]
    handle = layer.register_forward_pre_hook(lambda _m, args, kwargs: captured.__setitem__("h", (args or (kwargs["hidden_states"],))[0].detach()),
                                             with_kwargs=True)
    with torch.no_grad():
        final = model(PROMPTS[0])[0, -1].log_softmax(-1)
        handle.remove()
        h = captured["h"][0, -1]
        logq = model.module.lm_head(model.final_norm(h + h @ A.T + b)).log_softmax(-1)
    assert result.loc[1, "top_tokens"] == [model.to_string([i]) for i in logq.topk(3).indices]
    assert result.loc[1, "kl"] == pytest.approx(float((final.exp() * (final - logq)).sum()), rel=1e-4)
    assert result.loc[1, "kl"] != pytest.approx(result.loc[0, "kl"])


def test_evaluation_matches_a_direct_computation(model, store):
    sites = ["blocks.1.hook_resid_pre"]
    table = evaluate_lenses(model, store, {"logit": None}, sites, (10, 70), progress=False)
    h, final = store.read(sites[0], slice(10, 70)), store.read("blocks.2.hook_resid_post", slice(10, 70))
    with torch.no_grad():
        p = model.module.lm_head(model.final_norm(final)).log_softmax(-1)
        q = model.module.lm_head(model.final_norm(h)).log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    row = table.iloc[0]
    assert row.kl == pytest.approx(float(kl), rel=1e-5)
    assert row.precision_at_1 == pytest.approx(float((p.argmax(-1) == q.argmax(-1)).float().mean()))
    assert row.surprisal == pytest.approx(float(-q.gather(-1, p.argmax(-1, keepdim=True)).mean()), rel=1e-5)


def test_fused_kl_and_gradient_match_autograd():
    torch.manual_seed(0)
    z = torch.randn(6, 50, requires_grad=True)
    target = torch.randn(6, 50).log_softmax(-1)
    p = target.exp()
    kl_ref = (p * (target - z.log_softmax(-1))).sum(-1)
    kl_ref.sum().backward()
    for compile in (False, True):
        kl, grad = kl_and_grad(z.detach(), p, (p * target).sum(-1), compile=compile)
        torch.testing.assert_close(kl, kl_ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, z.grad, rtol=1e-5, atol=1e-6)


def test_linear_lens_recovers_a_planted_map(model):
    torch.manual_seed(0)
    d = model.cfg.d_model
    A, b = torch.randn(d, d) / d**0.5, torch.randn(d)
    equations = NormalEquations(model, ["blocks.0.hook_resid_pre"])
    for _ in range(4):
        x = torch.randn(500, d) * 3
        equations.add({"blocks.0.hook_resid_pre": x, "blocks.2.hook_resid_post": x @ A.T + b})
    lens = equations.solve(0.0)
    torch.testing.assert_close(lens.weight[0], A, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lens.bias[0], b, atol=1e-4, rtol=1e-4)
    x = torch.randn(3, d)
    torch.testing.assert_close(lens.translate(x, "blocks.0.hook_resid_pre"), x @ A.T + b, atol=1e-4, rtol=1e-4)


def test_linear_lens_from_a_store_is_least_squares(model, store, tmp_path):
    config = LensTrainConfig(store=store.root, lens="linear", out=tmp_path / "lin", model="tiny:llama", holdout=31 * 8, ridge=0.0)
    lens = fit_linear_lens(config, model=model, progress=False)
    train_rows = slice(0, store.n_rows - 31 * 8)
    x = store.read("blocks.1.hook_resid_pre", train_rows).double().numpy()
    y = store.read("blocks.2.hook_resid_post", train_rows).double().numpy()
    solution = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y, rcond=None)[0]
    np.testing.assert_allclose(lens.weight[1].detach().numpy(), solution[:-1].T, atol=2e-3)
    np.testing.assert_allclose(lens.bias[1].detach().numpy(), solution[-1], atol=2e-3)
    assert AffineLens.load(tmp_path / "lin" / "lens", model).kind == "linear"
    assert not list((tmp_path / "lin").rglob("*.pt")) and not list((tmp_path / "lin").rglob("*.pkl"))


def tuned_config(store, out, **kw):
    base = dict(store=store.root, lens="tuned", out=out, model="tiny:llama", holdout=31 * 8, steps=12, batch_size=64,
                lr=3e-3, warmup=2, checkpoint_every=4, compile=False, compute_dtype="float32")
    return LensTrainConfig(**{**base, **kw})


def test_tuned_lens_lowers_held_out_kl_and_resumes_exactly(model, store, tmp_path, monkeypatch):
    lens = train_tuned_lens(tuned_config(store, tmp_path / "a"), model=model, progress=False)
    held = (store.n_rows - 31 * 8, store.n_rows)
    table = evaluate_lenses(model, store, {"logit": None, "tuned": lens}, lens.sites, held, progress=False)
    wide = table.pivot(index="layer", columns="lens", values="kl")
    assert (wide["tuned"] < wide["logit"]).all(), wide

    calls = {"n": 0}
    real_step = lens_train.train_step

    def crash_after_six(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(lens_train, "train_step", crash_after_six)
    with pytest.raises(KeyboardInterrupt):
        train_tuned_lens(tuned_config(store, tmp_path / "b"), model=model, progress=False)
    monkeypatch.setattr(lens_train, "train_step", real_step)
    with pytest.raises(InputError, match="other settings"):
        train_tuned_lens(tuned_config(store, tmp_path / "b", lr=1e-2, resume=True), model=model, progress=False)
    resumed = train_tuned_lens(tuned_config(store, tmp_path / "b", resume=True), model=model, progress=False)
    torch.testing.assert_close(resumed.weight, lens.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(resumed.bias, lens.bias, rtol=0, atol=1e-6)
    with pytest.raises(InputError, match="already holds a lens"):
        train_tuned_lens(tuned_config(store, tmp_path / "a"), model=model, progress=False)


def test_bfloat16_training_follows_float32_training(model, store, tmp_path):
    """The default on CPUs with native bfloat16 (``compute_dtype="auto"``) runs the unembedding matmuls in bfloat16:
    the lens it trains must be the float32 one up to bfloat16 rounding, and both must move off the identity."""
    full = train_tuned_lens(tuned_config(store, tmp_path / "f32"), model=model, progress=False)
    half = train_tuned_lens(tuned_config(store, tmp_path / "bf16", compute_dtype="bfloat16"), model=model, progress=False)
    moved = (full.weight - torch.eye(full.weight.shape[-1])).abs().max()
    assert moved > 1e-3
    assert (half.weight - full.weight).abs().max() < 0.1 * moved
    assert (half.bias - full.bias).abs().max() < 0.1 * full.bias.abs().max()
    held = (store.n_rows - 31 * 8, store.n_rows)
    table = evaluate_lenses(model, store, {"f32": full, "bf16": half}, full.sites, held, progress=False)
    kl = table.groupby("lens")["kl"].mean()
    assert kl["bf16"] == pytest.approx(kl["f32"], rel=0.05), kl


def test_bad_input_is_refused_with_clear_errors(model, store, tmp_path):
    with pytest.raises(InputError, match="out of range.*0..2"):
        logit_lens(model, "abc", layers=[3])
    with pytest.raises(InputError, match="residual stream"):
        logit_lens(model, "abc", site="mlp_out")
    with pytest.raises(InputError, match="attn_out site"):
        logit_lens(model, "abc", site="blocks.0.hook_attn_out")
    with pytest.raises(InputError, match="norm="):
        logit_lens(model, "abc", norm="sometimes")
    with pytest.raises(InputError, match="not one"):
        logit_lens(model, "abc", tokens="two tokens")
    other = tiny_model("llama", n_layers=3, seed=1)
    with pytest.raises(InputError, match="harvested from"):
        evaluate_lenses(other, store, {"logit": None}, ["blocks.0.hook_resid_pre"], (0, 10), progress=False)
    with pytest.raises(InputError, match="harvested from"):
        train_tuned_lens(tuned_config(store, tmp_path / "x"), model=other, progress=False)
    folder = AffineLens.identity(model, ["blocks.0.hook_resid_pre"]).save(tmp_path / "lens")
    with pytest.raises(InputError, match="made for"):
        AffineLens.load(folder, other)
    with pytest.raises(InputError, match="made for"):
        logit_lens(other, "abc", lens=AffineLens.load(folder))
    with pytest.raises(InputError, match="not a saved lens"):
        AffineLens.load(tmp_path)
    with pytest.raises(InputError, match="no translator"):
        logit_lens(model, "abc", site="resid_pre", layers=[1], lens=AffineLens.load(folder))
    with pytest.raises(InputError, match="holds no resid_mid"):
        train_tuned_lens(tuned_config(store, tmp_path / "y", site="resid_mid"), model=model, progress=False)
    with pytest.raises(InputError, match="--lens"):
        LensTrainConfig(store=store.root, lens="logit")


def test_readout_uses_the_unembedding_bias():
    model = tiny_model("transformer_lens", n_layers=1)
    with torch.no_grad():
        model.module.unembed.b_U.add_(torch.linspace(-1, 1, model.cfg.d_vocab))
        logits = model("abc")
    cache = model.run_with_cache("abc", "blocks.0.hook_resid_post")
    torch.testing.assert_close(Readout(model).logits(cache["resid_post", 0]), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.embedded
def test_embedded_logit_lens_ends_on_paris(embedded):
    result = logit_lens(embedded, "The capital of France is", tokens=" Paris", positions=[-1])
    with torch.no_grad():
        p = embedded("The capital of France is")[0, -1].softmax(-1)
    last = result.tokens.iloc[-1]
    assert last.layer == 29 and last["rank"] == 1 and last.prob == pytest.approx(float(p.max()), abs=1e-5)
    assert result.tokens.iloc[0]["rank"] > 100  # nowhere near the top in layer 0
