"""Feature scans (density, histograms, top examples, window activations, decoded tokens) against a
brute-force dense encoding; the train/eval/features commands on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from interp.cli import app
from interp.dictionary import DictionaryConfig, SparseDictionary
from interp.dictionary.features import DictionaryFeatures, decoded_tokens, scan_features, top_activations, whole_contexts
from interp.models.tiny import byte_tokenizer
from interp.store import HarvestConfig, harvest

SITE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("c") / "text.txt"
    rng = np.random.default_rng(1)
    path.write_text(" ".join(rng.choice(["north", "south", "east", "west", "rain", "snow", "wind"], 30_000)))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory, corpus):
    from interp.models import tiny_model

    out = tmp_path_factory.mktemp("s") / "store"
    return harvest(HarvestConfig(out=out, model="tiny:llama", sites=SITE, corpus=str(corpus),
                                 tokens=6000, context_len=32, batch_size=8, shard_contexts=64),
                   model=tiny_model("llama"), progress=False)


@pytest.fixture(scope="module", params=["topk", "relu"])
def dictionary(request):
    return SparseDictionary(DictionaryConfig(d_in=64, n_latents=32, k=4, input_site=SITE, architecture=request.param), seed=2)


def dense_codes(d, store) -> np.ndarray:
    with torch.no_grad():
        return d.encode(store.read(SITE)).to_dense(d.config.n_latents).numpy()


def test_scan_matches_brute_force(store, dictionary):
    scan = scan_features(DictionaryFeatures(dictionary), store, n=5, bins=8, batch_size=1000, progress=False)
    dense = dense_codes(dictionary, store)
    assert scan.first_row == 0 and scan.n_rows == store.n_rows
    np.testing.assert_array_equal(scan.fire_counts, (dense > 0).sum(0))
    for latent in range(32):
        column = dense[:, latent]
        fired = column[column > 0]
        expected = np.sort(fired)[::-1][:5]
        np.testing.assert_allclose(scan.top_values[latent][: len(expected)], expected, rtol=1e-5)
        rows = scan.top_rows[latent][: len(expected)]
        np.testing.assert_allclose(column[rows], expected, rtol=1e-5)  # the rows hold those values
        assert (scan.top_rows[latent][len(expected):] == -1).all()
        if len(fired):
            counts, _ = np.histogram(fired, bins=8, range=(0, fired.max()))
            np.testing.assert_array_equal(scan.histograms[latent], counts)
    rng = np.random.default_rng(0)
    latents, rows = rng.integers(0, 32, 500), rng.integers(0, store.n_rows, 500)
    np.testing.assert_allclose(scan.activation_at(latents, rows), dense[rows, latents], rtol=1e-5)


def test_scan_reads_whole_contexts_and_a_subset_of_latents(store, dictionary):
    table = store.rows()
    start, stop = whole_contexts(store, (100, 900))
    assert start <= 100 and stop >= 900
    assert table[start, 1] == table[:, 1].min() and (start == 0 or table[start - 1, 0] != table[start, 0])
    assert stop == store.n_rows or table[stop, 0] != table[stop - 1, 0]
    scan = scan_features(DictionaryFeatures(dictionary), store, rows=(100, 900), latents=[7, 3], n=4, progress=False)
    dense = dense_codes(dictionary, store)[start:stop]
    assert scan.latent_ids.tolist() == [3, 7] and scan.first_row == start
    np.testing.assert_array_equal(scan.fire_counts, (dense[:, [3, 7]] > 0).sum(0))
    top = scan.top(7)
    np.testing.assert_allclose(top.activation, np.sort(dense[:, 7])[::-1][: len(top)], rtol=1e-5)
    assert (store.rows(top.row.to_numpy())[:, 2] == top.token.to_numpy()).all()


def test_examples_show_the_latent_on_every_token_of_the_window(store, dictionary):
    scan = scan_features(DictionaryFeatures(dictionary), store, n=3, progress=False)
    dense = dense_codes(dictionary, store)
    table = store.rows()
    latent = int(np.argmax(scan.fire_counts))
    examples = scan.examples(latent, byte_tokenizer(), left=5, right=2)
    assert len(examples) == 3
    for example, row in zip(examples.itertuples(), scan.top(latent).row, strict=True):
        at = example.index
        assert example.tokens[at] == example.token and example.activations[at] == pytest.approx(example.activation, rel=1e-5)
        rows = np.arange(row - at, row - at + len(example.tokens))
        assert (table[rows, 0] == table[row, 0]).all()  # never crosses into another context
        np.testing.assert_allclose(example.activations, dense[rows, latent], rtol=1e-5)
        assert example.tokens == [byte_tokenizer().decode([int(t)]) for t in table[rows, 2]]


def test_top_activations_table(store, dictionary):
    top = top_activations(dictionary, store, [3, 7], n=5, batch_size=1000)
    dense = dense_codes(dictionary, store)
    for latent in (3, 7):
        mine = top[top.latent == latent].sort_values("rank")
        np.testing.assert_allclose(mine.activation, np.sort(dense[:, latent])[::-1][: len(mine)], rtol=1e-5)


def test_decoded_tokens_read_the_direction_through_final_norm_and_unembedding():
    from interp.models import tiny_model

    model = tiny_model("llama")
    directions = torch.randn(6, model.cfg.d_model)
    decoded = decoded_tokens(model, directions, k=4, chunk=4)
    norm = model.module.model.norm  # RMSNorm: x / rms(x) * weight
    for i, direction in enumerate(directions):
        normed = direction / direction.pow(2).mean().add(norm.variance_epsilon).sqrt() * norm.weight
        logits = model.module.lm_head.weight @ normed
        assert decoded["promoted"][i].tolist() == logits.topk(4).indices.tolist()
        assert decoded["suppressed"][i].tolist() == (-logits).topk(4).indices.tolist()
        np.testing.assert_allclose(decoded["promoted_logits"][i], logits.topk(4).values.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert decoded_tokens(model, torch.randn(3, model.cfg.d_model + 1)) is None  # not a residual-stream direction


def test_train_eval_and_features_commands(tmp_path, corpus):
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["train-sae", "--model", "tiny:llama", "--layer", "1", "--k", "4", "--latents", "64",
                                 "--tokens", "8k", "--batch-size", "1024", "--eval-tokens", "2048", "--eval-contexts", "2",
                                 "--corpus", str(corpus), "--context-len", "32", "--store", str(tmp_path / "store"),
                                 "--out", str(out), "--compute-dtype", "float32"])  # eval-sae encodes in float32 too
    assert result.exit_code == 0, result.output
    assert "ce_recovered" in result.output and "fvu" in result.output
    folder = out / "sae-topk-k4-64"
    assert json.loads((folder / "metrics.json").read_text())["l0"] == pytest.approx(4.0)
    evaluated = runner.invoke(app, ["eval-sae", str(folder), "--eval-contexts", "2"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads((folder / "eval.json").read_text())["fvu"] == pytest.approx(json.loads((folder / "metrics.json").read_text())["fvu"])
    shown = runner.invoke(app, ["features", str(folder), "--latents", "0,1", "--n", "3"])
    assert shown.exit_code == 0, shown.output
    assert "latent 0" in shown.output and "latent 1" in shown.output and "promotes" in shown.output
    assert (folder / "features.html").exists()
    again = runner.invoke(app, ["train-sae", "--model", "tiny:llama", "--layer", "1", "--out", str(out), "--store", str(tmp_path / "store"),
                                "--tokens", "8k", "--latents", "64", "--k", "4", "--eval-tokens", "2048", "--batch-size", "1024"])
    assert again.exit_code == 2 and "--resume" in again.output
