"""Probes and concept files: planted concepts, activations against plain hooks, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from interp.data.concepts import Concept, concept_words, load_concept, load_prompts
from interp.errors import InputError
from interp.models import tiny_model
from interp.probes import concept_activations, fit_probe, load_probes, probe_metrics, save_probes, train_probes, train_probes_from_store
from interp.steering import LexiconScorer


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=3)


def planted(n: int, d: int, seed: int, margin: float = 1.0):
    """Gaussian points whose label is the side of a random hyperplane, kept ``margin`` away from it."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    w /= w.norm()
    x = torch.randn(n, d, generator=g) * 2 + 3.0  # off-centre, so the bias matters
    side = (x - 3.0) @ w
    y = (side > 0).long()
    x = x + (margin * (2 * y - 1)).unsqueeze(1) * w  # push each class away from the boundary
    return x, y, w


@pytest.mark.parametrize("method", ["logistic", "diff-means"])
def test_probe_finds_a_planted_linear_concept(method):
    x, y, w = planted(600, 32, seed=1)
    probe = fit_probe(x[:400], y[:400], method)
    metrics = probe_metrics(probe, x[400:], y[400:])
    assert metrics["accuracy"] >= 0.97 and metrics["auroc"] >= 0.99
    assert float(probe.direction @ w) > 0.8  # it recovered the planted direction, with the right sign
    assert torch.isclose(probe.direction.norm(), torch.tensor(1.0))


def test_probe_on_a_planted_token_through_the_model(model):
    # Label 1 texts end in "z", label 0 texts in "q"; prefixes are random, so the last token carries the label.
    rng = np.random.default_rng(0)
    texts, labels = [], []
    for i in range(48):
        prefix = "".join(rng.choice(list("abcdefghij"), size=rng.integers(3, 9)))
        texts.append(prefix + ("z" if i % 2 else "q"))
        labels.append(i % 2)
    concept = Concept("planted", texts, labels)
    result = train_probes(model, concept, ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"], progress=False)
    assert len(result.table) == 4 and set(result.table["method"]) == {"logistic", "diff-means"}
    assert (result.table["test_accuracy"] >= 0.99).all(), result.table
    assert result.table["layer"].tolist() == [0, 0, 2, 2]
    fig = result.plot()
    assert len(fig.data) == 4  # accuracy and AUROC per method


def test_concept_activations_match_plain_hooks(model):
    texts = ["abc", "hello there", "xy"]
    site = "blocks.1.hook_resid_post"
    captured = []
    layer = model.module.model.layers[1]
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append((out[0] if isinstance(out, tuple) else out).detach()))
    try:
        for text in texts:  # one unpadded run per text
            model.module(input_ids=model.tokenize(text).ids)
    finally:
        handle.remove()
    last = concept_activations(model, texts, [site], reduce="last", batch_size=2)[site]
    mean = concept_activations(model, texts, [site], reduce="mean", batch_size=2)[site]
    for i, act in enumerate(captured):
        torch.testing.assert_close(last[i], act[0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mean[i], act[0, 1:].mean(0), atol=1e-5, rtol=1e-5)  # first token left out


def test_probes_from_a_store_hold_out_whole_contexts(tmp_path):
    from interp.store import write_arrays

    x, y, _ = planted(800, 16, seed=2)
    store = write_arrays(tmp_path / "store", {"site.a": x, "site.b": torch.randn(800, 16)})
    result = train_probes_from_store(store, ["site.a", "site.b"], y.numpy(), methods=["logistic"], progress=False)
    table = result.table.set_index("site")
    assert table.loc["site.a", "test_accuracy"] >= 0.97
    assert table.loc["site.b", "test_accuracy"] < 0.7  # noise: nothing to find
    assert table.loc["site.a", "n_test"] == 200 and table.loc["site.a", "n_train"] == 600
    with pytest.raises(InputError, match="one label per row"):
        train_probes_from_store(store, ["site.a"], y.numpy()[:10])


def test_probes_save_and_load(tmp_path):
    x, y, _ = planted(100, 8, seed=3)
    probes = [fit_probe(x, y, "logistic", site="s"), fit_probe(x, y, "diff-means", site="s")]
    save_probes(probes, tmp_path / "p.safetensors")
    loaded = load_probes(tmp_path / "p.safetensors")
    for a, b in zip(probes, loaded, strict=True):
        assert a.method == b.method and a.bias == b.bias and torch.equal(a.weight, b.weight)


def test_builtin_concepts_and_prompts():
    sentiment = load_concept("sentiment")
    assert sentiment.counts() == (100, 100) and sentiment.pairs is None
    for name in ("wedding", "space", "war"):
        concept = load_concept(name)
        n_pos, n_neg = concept.counts()
        assert n_pos >= 60 and n_neg >= 60
        words = LexiconScorer.from_file(concept_words(concept))  # the word list marks the topic's texts, not the others
        assert (words(concept.positives) > 0).mean() > 0.95 and (words(concept.negatives) == 0).all()
    pairs = load_concept("sentiment_pairs")
    assert pairs.pairs is not None and len(pairs.pairs) == 20 and pairs.labels == [1] * 20 + [0] * 20
    dev, test = load_prompts("neutral_dev"), load_prompts("neutral_test")
    assert len(test) >= 50 and len(dev) >= 20 and not set(dev) & set(test)
    train, held = sentiment.split(0.25, seed=0)
    assert len(held) == 50 and not set(train) & set(held)
    assert sum(sentiment.labels[i] for i in held) == 25  # stratified


def test_concept_file_errors_name_the_line(tmp_path):
    cases = {
        '{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\nnot json\n': "line 3: not valid JSON",
        '{"text": "good", "label": 1}\n{"text": "bad", "label": "neg"}\n': "line 2: label 'neg'",
        '{"text": "good", "label": 1}\n{"positive": "a", "negative": "b"}\n': "line 2: a pairs line in a file of labelled",
        '{"words": "x"}\n': "line 1: needs the keys text \\+ label",
        '{"text": "", "label": 1}\n': "line 1: 'text' must be a non-empty string",
        '{"text": "a", "label": 1, "split": "dev"}\n': "line 1: split 'dev'",
        '\n# only a comment\n': "holds no examples",
    }
    for i, (content, message) in enumerate(cases.items()):
        path = tmp_path / f"c{i}.jsonl"
        path.write_text(content)
        with pytest.raises(InputError, match=message):
            load_concept(path)
    with pytest.raises(InputError, match="built-in"):
        load_concept("no-such-concept")


def test_too_few_examples_states_the_minimum(model, tmp_path):
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in [("a b", 1), ("c d", 0), ("e f", 1), ("g h", 0)]))
    concept = load_concept(path)
    with pytest.raises(InputError, match="2 positive and 2 negative examples; a probe needs at least 8 of each"):
        train_probes(model, concept, "blocks.0.hook_resid_post")
    with pytest.raises(InputError, match="needs at least 4 of each"):
        concept.check()
    with pytest.raises(InputError, match="probe method 'svm'"):
        train_probes(model, load_concept("sentiment"), "blocks.0.hook_resid_post", methods=["svm"])


@pytest.mark.embedded
def test_probe_command_writes_table_and_plot(embedded, tmp_path):
    from typer.testing import CliRunner

    from interp.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["probe", "--concept", "space", "--layers", "2,8", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "table.csv").read_text().splitlines()
    assert table[0].startswith("site,layer,kind,method,train_accuracy,test_accuracy,test_auroc") and len(table) == 5
    assert (tmp_path / "accuracy.html").exists() and (tmp_path / "probes.safetensors").exists()
    assert "logistic held-out accuracy" in result.output
    bad = runner.invoke(app, ["probe", "--layers", "3,31", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "out of range; the model has layers 0-29" in bad.output and "Traceback" not in bad.output


def test_builtin_concept_files_ship_as_package_data():
    import fnmatch
    import tomllib
    from pathlib import Path

    import interp.data.concepts as concepts

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["interp.resources"]
    files = [p.relative_to(concepts.BUILTIN).as_posix() for kind in ("concepts", "prompts") for p in (concepts.BUILTIN / kind).iterdir()]
    assert len(files) >= 8
    assert all(any(fnmatch.fnmatch(f, pattern) for pattern in patterns) for f in files), files
