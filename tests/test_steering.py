"""Steering vectors, generation with steering, evaluation and sweeps (checked against plain hooks)."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch

from interp.data.concepts import Concept, load_concept
from interp.dictionary import DictionaryConfig, SparseDictionary
from interp.errors import InputError
from interp.models import tiny_model
from interp.steering import (
    LexiconScorer, Steering, SteeringVector, VaderScorer, ablation, concept_latents, continuation_nll, diff_in_means,
    distinct_n, generate, latent_vector, perplexity, probe_vector, site_mean_norm, steering, sweep,
)

L = 1
SITE = f"blocks.{L}.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=3)


def capture_resid_post(model, layer):
    """A plain forward pre-hook on decoder layer ``layer + 1``: its input is layer ``layer``'s output, after any edit."""
    seen = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(hidden.detach().clone())

    handle = model.module.model.layers[layer + 1].register_forward_pre_hook(hook, with_kwargs=True)
    return seen, handle


def test_strength_zero_leaves_greedy_generation_identical(model):
    prompts = ["abc", "hello wor", "zz"]
    v = SteeringVector(SITE, torch.randn(model.cfg.d_model))
    plain = generate(model, prompts, max_new_tokens=12)
    zero = generate(model, prompts, steering(v, 0.0, units="absolute"), max_new_tokens=12)
    assert zero.new_ids == plain.new_ids and zero.texts == plain.texts
    assert plain.texts == model.generate(prompts, max_new_tokens=12)  # same as the model's own generate
    pushed = generate(model, prompts, steering(v, 30.0, units="absolute"), max_new_tokens=12)
    assert pushed.new_ids != plain.new_ids  # the hook really acts


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_added_vector_changes_the_residual_exactly_there(model, positions):
    prompt_len = 5
    tokens = model.tokenize(["abcdefghij", "klmnopqrst"])  # 10 tokens: 5 "prompt" + 5 "generated"
    vector = torch.randn(model.cfg.d_model)
    edit = Steering(SITE, vector, positions)
    seen, handle = capture_resid_post(model, L)
    before, before_handle = capture_resid_post(model, L - 1)
    try:
        model(tokens)
        with model.intervene(*edit.interventions(prompt_len)):
            model(tokens)
    finally:
        handle.remove()
        before_handle.remove()
    clean, steered = seen
    expected = torch.zeros(10, dtype=torch.bool)
    expected[{"all": slice(None), "prompt": slice(0, 5), "generated": slice(5, None)}[positions]] = True
    diff = steered - clean
    torch.testing.assert_close(diff[:, expected], vector.expand_as(diff[:, expected]), atol=1e-5, rtol=0)
    assert torch.equal(diff[:, ~expected], torch.zeros_like(diff[:, ~expected]))
    assert torch.equal(before[0], before[1])  # nothing below the steered layer moved


def test_steering_during_kv_cache_generation_matches_a_full_forward(model):
    vector = torch.randn(model.cfg.d_model) * 3
    prompts = ["abcd", "efghij"]  # unequal lengths: left padding
    edit = Steering(SITE, vector, "generated")
    tokens = model.tokenize(prompts, padding_side="left")
    seen, handle = capture_resid_post(model, L)
    try:
        _, new = model.generate_tokens(tokens, 6, interventions=edit.interventions(tokens.ids.shape[1]))
    finally:
        handle.remove()
    assert [s.shape[1] for s in seen] == [6, 1, 1, 1, 1, 1]  # one prompt pass, then one token per step with the cache
    stepwise = torch.cat(seen, dim=1)
    full_ids = torch.cat([tokens.ids, new], dim=1)
    mask = torch.cat([tokens.mask, torch.ones(2, 6, dtype=torch.long)], dim=1)
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)  # as generation numbers left-padded positions
    again, handle = capture_resid_post(model, L)
    try:
        with torch.no_grad(), model.intervene(*edit.interventions(tokens.ids.shape[1])):
            model.module(input_ids=full_ids, attention_mask=mask, position_ids=position_ids)
        with torch.no_grad():
            model.module(input_ids=full_ids, attention_mask=mask, position_ids=position_ids)
    finally:
        handle.remove()
    steered_full, clean_full = again
    real = mask.bool()
    torch.testing.assert_close(stepwise[:, :11][real[:, :11]], steered_full[:, :11][real[:, :11]], atol=1e-4, rtol=1e-4)
    diff = steered_full - clean_full
    assert diff[:, :6].abs().max() == 0  # prompt positions untouched
    torch.testing.assert_close(diff[:, 6:], vector.expand_as(diff[:, 6:]), atol=1e-5, rtol=0)


def test_projecting_out_leaves_activations_orthogonal(model):
    direction = torch.randn(model.cfg.d_model)
    edit = ablation(SteeringVector(SITE, direction))
    seen, handle = capture_resid_post(model, L)
    tokens = model.tokenize(["some text here", "more text"])
    try:
        model(tokens)
        with model.intervene(*edit.interventions(tokens.ids.shape[1])):
            model(tokens)
    finally:
        handle.remove()
    unit = direction / direction.norm()
    clean, projected = seen
    assert (clean @ unit).abs().max() > 1e-2  # the component was there before
    assert (projected @ unit).abs().max() < 1e-5
    torch.testing.assert_close(projected, clean - (clean @ unit).unsqueeze(-1) * unit, atol=1e-5, rtol=1e-5)


def test_diff_in_means_matches_plain_hooks(model):
    concept = Concept("c", ["abc de", "fgh", "ijkl mn", "opq", "rs tu", "vwx", "yz ab", "cd"], [1, 0, 1, 0, 1, 0, 1, 0])
    captured = []
    handle = model.module.model.layers[L].register_forward_hook(lambda _m, _i, out: captured.append((out[0] if isinstance(out, tuple) else out).detach()))
    try:
        for text in concept.texts:
            model.module(input_ids=model.tokenize(text).ids)
    finally:
        handle.remove()
    last = torch.stack([act[0, -1] for act in captured])
    labels = torch.tensor(concept.labels)
    expected = last[labels == 1].mean(0) - last[labels == 0].mean(0)
    v = diff_in_means(model, concept, SITE)
    torch.testing.assert_close(v.vector, expected, atol=1e-5, rtol=1e-5)
    assert v.site == SITE and v.info["norm"] == pytest.approx(float(expected.norm()), rel=1e-5)
    pairs = Concept("p", ["abc de", "ijkl mn", "fgh", "opq"], [1, 1, 0, 0], pairs=[("abc de", "fgh"), ("ijkl mn", "opq")])
    pair_v = diff_in_means(model, pairs, SITE)
    torch.testing.assert_close(pair_v.vector, ((last[0] - last[1]) + (last[2] - last[3])) / 2, atol=1e-5, rtol=1e-5)
    norms = torch.cat([act[0, 1:].norm(dim=-1) for act in captured])  # first token of each text left out
    assert site_mean_norm(model, SITE, concept.texts, batch_size=3) == pytest.approx(float(norms.mean()), rel=1e-5)


def test_latent_and_probe_vectors(model):
    d = model.cfg.d_model
    config = DictionaryConfig(d_in=d, n_latents=32, architecture="topk", k=4, input_site=SITE)
    dictionary = SparseDictionary(config, seed=0)
    v = latent_vector(dictionary, 7)
    assert v.site == SITE and torch.equal(v.vector, dictionary.W_dec[7].detach())
    with pytest.raises(InputError, match="latent 32 out of range 0..31"):
        latent_vector(dictionary, 32)
    concept = Concept("c", ["abc de", "fgh", "ijkl mn", "opq", "rs tu", "vwx", "yz ab", "cd"], [1, 0, 1, 0, 1, 0, 1, 0])
    ranking = concept_latents(model, dictionary, concept, reduce="last", by="difference", top=3)
    by_effect = concept_latents(model, dictionary, concept, reduce="last", top=32)
    # Independent: encode each text's last-token activation from a plain hook, average per class.
    captured = []
    handle = model.module.model.layers[L].register_forward_hook(lambda _m, _i, out: captured.append((out[0] if isinstance(out, tuple) else out).detach()))
    try:
        for text in concept.texts:
            model.module(input_ids=model.tokenize(text).ids)
    finally:
        handle.remove()
    codes = dictionary.encode(torch.stack([a[0, -1] for a in captured])).to_dense(32).detach()
    labels = torch.tensor(concept.labels)
    diff = codes[labels == 1].mean(0) - codes[labels == 0].mean(0)
    assert ranking["latent"].tolist() == diff.argsort(descending=True)[:3].tolist()
    np.testing.assert_allclose(ranking["difference"], diff.sort(descending=True).values[:3].numpy(), rtol=1e-4, atol=1e-6)
    pos, neg = codes[labels == 1], codes[labels == 0]
    effect = diff / ((pos.var(0) + neg.var(0)) / 2).sqrt().clamp_min(1e-6)
    # A latent firing on one text of one class has effect size 1/sqrt(2) whatever its value, so ties
    # are common: check each latent's reported effect size, and that the whole order follows it.
    ordered = effect[by_effect["latent"].tolist()]
    np.testing.assert_allclose(by_effect["effect_size"], ordered.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ordered.numpy(), effect.sort(descending=True).values.numpy(), rtol=1e-4, atol=1e-6)
    from interp.probes import fit_probe

    probe = fit_probe(torch.randn(40, d), [0, 1] * 20, "diff-means", site=SITE)
    assert torch.equal(probe_vector(probe).vector, probe.weight)


def test_strength_units_and_bad_values(tmp_path):
    v = SteeringVector(SITE, torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(v.scaled(2.0, "absolute"), torch.tensor([1.2, 1.6]))
    torch.testing.assert_close(v.scaled(0.5, "norm", mean_norm=10.0), torch.tensor([3.0, 4.0]))
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(InputError, match="not a finite number"):
            v.scaled(bad, "absolute")
    with pytest.raises(InputError, match="units='norm' needs"):
        v.scaled(1.0, "norm")
    with pytest.raises(InputError, match="choose one of norm, absolute"):
        v.scaled(1.0, "percent")
    with pytest.raises(InputError, match="zero or not finite"):
        SteeringVector(SITE, torch.zeros(2))
    with pytest.raises(InputError, match="positions='middle'"):
        Steering(SITE, torch.ones(2), "middle")  # type: ignore[arg-type]
    v.save(tmp_path / "v.safetensors")
    loaded = SteeringVector.load(tmp_path / "v.safetensors")
    assert loaded.site == SITE and torch.equal(loaded.vector, v.vector)


def test_scorers_and_fluency(model):
    vader = VaderScorer()
    scores = vader(["What a wonderful, happy day!", "The table is in the room.", "This is awful and I hate it."])
    assert scores[0] > 0.5 and scores[1] == 0 and scores[2] < -0.5
    words = LexiconScorer(["wedding*", "bride", "best man"], name="wedding")
    np.testing.assert_allclose(words(["The bride and the best man at weddings", "No match here", ""]), [300 / 8, 0, 0])
    assert distinct_n("a b a b a b") == pytest.approx(2 / 5) and np.isnan(distinct_n("one"))
    gens = generate(model, ["abc", "hello there"], max_new_tokens=5)
    sums, counts = continuation_nll(model, gens, batch_size=1)
    for row, (prompt, new) in enumerate(zip(gens.prompt_ids, gens.new_ids, strict=True)):  # an independent loop
        ids = torch.tensor([prompt + new])
        with torch.no_grad():
            logprobs = torch.log_softmax(model.module(input_ids=ids).logits[0].float(), -1)
        expected = -sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(new))
        assert sums[row] == pytest.approx(expected, rel=1e-4) and counts[row] == len(new)
    assert perplexity(sums, counts) == pytest.approx(np.exp(sums.sum() / counts.sum()))


def test_sweep_writes_resumes_and_refuses_other_settings(model, tmp_path, monkeypatch):
    d = model.cfg.d_model
    vectors = {"a": SteeringVector(SITE, torch.randn(d)), "b": SteeringVector(SITE, torch.randn(d), "probe")}
    prompts = ["abc", "hello", "xyz"]
    args = dict(scorer=LexiconScorer(["a*"]), units="absolute", max_new_tokens=4, out=tmp_path / "s", progress=False)
    result = sweep(model, vectors, [0, 5, 10], prompts, **args)
    table = result.table
    assert table[["method", "strength"]].values.tolist() == [["unsteered", 0], ["a", 5], ["a", 10], ["b", 5], ["b", 10]]
    assert (table["n"] == 3).all() and table.loc[1, "added_norm"] == pytest.approx(5.0)
    for name in ("table.csv", "sweep.html", "plotly.min.js", "generations.jsonl", "sweep.json", "generations/a@10.jsonl"):
        assert (tmp_path / "s" / name).exists(), name
    lines = (tmp_path / "s" / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 15 and {"prompt", "text", "score", "nll", "tokens"} <= set(json.loads(lines[0]))
    steered = generate(model, prompts, Steering(SITE, vectors["a"].scaled(10, "absolute")), max_new_tokens=4)
    assert result.generations.query("method == 'a' and strength == 10")["text"].tolist() == steered.texts
    wide = result.side_by_side("a")
    assert wide.columns.tolist() == ["prompt_index", "prompt", "unsteered", "a 5", "a 10"]

    def fail(*_args, **_kwargs):
        raise AssertionError("a finished run was generated again")

    monkeypatch.setattr(importlib.import_module("interp.steering.sweep"), "generate", fail)
    again = sweep(model, vectors, [0, 5, 10], prompts, **args)  # everything is on disk: nothing regenerates
    assert again.table.equals(result.table)
    with pytest.raises(InputError, match="other settings \\(max_new_tokens differ\\)"):
        sweep(model, vectors, [5], prompts, **{**args, "max_new_tokens": 6})
    changed = {"a": SteeringVector(SITE, torch.randn(d))}
    with pytest.raises(InputError, match="vector 'a'"):
        sweep(model, changed, [5], prompts, **args)
    with pytest.raises(InputError, match="not a finite number"):
        sweep(model, vectors, [1, float("nan")], prompts, **args)


def test_sweep_resumes_across_float_noise_in_mean_norms(model, tmp_path):
    # A mean norm recomputed with another thread count differs in its last digits: resume anyway;
    # a really different norm changes what "strength 1" means: refuse.
    vector = {"a": SteeringVector(SITE, torch.randn(model.cfg.d_model))}
    args = dict(units="norm", max_new_tokens=2, out=tmp_path / "s", progress=False)
    sweep(model, vector, [0, 1], ["abc"], mean_norms={SITE: 10.0}, **args)
    again = sweep(model, vector, [0, 1], ["abc"], mean_norms={SITE: 10.0 * (1 + 1e-9)}, **args)
    assert len(again.table) == 2
    with pytest.raises(InputError, match="mean_norms differ"):
        sweep(model, vector, [1], ["abc"], mean_norms={SITE: 10.5}, **args)


def test_generate_rejects_bad_input_before_running(model):
    with pytest.raises(InputError, match="no prompts"):
        generate(model, [])
    with pytest.raises(Exception, match="out of range"):
        generate(model, ["abc"], Steering("blocks.9.hook_resid_post", torch.ones(model.cfg.d_model)))


@pytest.mark.embedded
def test_strength_zero_on_the_embedded_model(embedded):
    concept = load_concept("sentiment")
    site = embedded.site("resid_post", 6)
    v = diff_in_means(embedded, concept.subset(list(range(20))), site)
    prompts = ["The weather today is", "My neighbour told me that"]
    plain = generate(embedded, prompts, max_new_tokens=10)
    zero = generate(embedded, prompts, steering(v, 0.0, units="absolute"), max_new_tokens=10)
    assert zero.new_ids == plain.new_ids
    positive = generate(embedded, prompts, steering(v, 1.0, mean_norm=site_mean_norm(embedded, site, concept.texts[:20])), max_new_tokens=10)
    assert positive.new_ids != plain.new_ids


# ----------------------------------------------------------------------------- the command line


def test_steer_command_rejects_bad_input_before_loading_the_model(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import interp.models
    from interp.cli import app

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(interp.models, "load_model", no_model)
    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text('{"text": "fine", "label": 1}\n{"text": "also fine", "label": 0}\n{"text": "broken", "label": 1\n')
    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    cases = [
        (["--strength", "nan"], "strength nan is not a finite number"),
        (["--strength", "inf"], "strength inf is not a finite number"),
        (["--sweep", "0,1,inf"], "not a finite number"),
        (["--sweep", "0,lots"], "'lots' is not a finite number"),
        (["--concept", str(bad_file)], "line 3: not valid JSON"),
        (["--concept", str(small)], "has 1 positive and 1 negative examples; a steering vector needs at least 4 of each"),
        (["--concept", "happiness"], "neither a file nor a built-in concept"),
        (["--method", "magic"], "choose from diff-means, probe, sae"),
        (["--method", "diff-means,probe"], "add --sweep"),
        (["--method", "sae"], "--method sae needs --sae"),
        (["--positions", "middle"], "--positions 'middle': choose one of all, prompt, generated"),
        (["--units", "percent"], "--units 'percent': choose one of norm, absolute"),
        (["--scorer", "bleu"], "--scorer 'bleu'"),
    ]
    for extra, message in cases:
        result = CliRunner().invoke(app, ["steer", "--prompt", "Hello", *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert message in " ".join(result.output.split()), (extra, result.output)
        assert "Traceback" not in result.output
    missing = CliRunner().invoke(app, ["steer"])
    assert missing.exit_code == 2 and "give --prompt TEXT or --prompts FILE" in missing.output


@pytest.mark.embedded
def test_steer_command_side_by_side_and_sweep_folder(embedded, tmp_path):
    from typer.testing import CliRunner

    from interp.cli import app

    runner = CliRunner()
    single = runner.invoke(app, ["steer", "--prompt", "The weather today is", "--layer", "6", "--strength", "0.5",
                                 "--max-new-tokens", "8", "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    assert "unsteered" in single.output and "steered" in single.output and "perplexity" in single.output
    assert "diff-means: sentiment (100 vs 100 texts) at blocks.6.hook_resid_post" in single.output
    assert json.loads((tmp_path / "one" / "config.json").read_text())["strength"] == 0.5
    out = tmp_path / "sweep"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("My neighbour told me that\nThe meeting this morning was\n")
    swept = runner.invoke(app, ["steer", "--prompts", str(prompts), "--layer", "6", "--method", "diff-means,probe",
                                "--sweep=-0.5,0,0.5", "--max-new-tokens", "6", "--out", str(out)])
    assert swept.exit_code == 0, swept.output
    table = (out / "table.csv").read_text().splitlines()
    assert table[0].startswith("method,strength,added_norm,score,score_sem,perplexity") and len(table) == 1 + 1 + 2 * 2
    for name in ("sweep.html", "plotly.min.js", "generations.jsonl", "config.json", "vectors/diff-means.safetensors",
                 "vectors/probe.safetensors", "generations/probe@-0.5.jsonl"):
        assert (out / name).exists(), name
    assert "probe: logistic regression at blocks.6.hook_resid_post, held-out accuracy" in swept.output
    before = (out / "config.json").read_text()
    other = runner.invoke(app, ["steer", "--prompts", str(prompts), "--layer", "7", "--method", "diff-means,probe", "--sweep", "0.5",
                                "--max-new-tokens", "6", "--out", str(out)])
    assert other.exit_code == 2 and "other settings (layer differ)" in other.output
    assert (out / "config.json").read_text() == before  # nothing overwritten
    layer = runner.invoke(app, ["steer", "--prompt", "Hi", "--layer", "30"])
    assert layer.exit_code == 2 and "--layer 30 is out of range: smollm2-135m has layers 0-29" in layer.output
