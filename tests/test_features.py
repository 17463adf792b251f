"""Top-activating examples and the feature page; the train/eval/features commands on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from interp.cli import app
from interp.dictionary import DictionaryConfig, SparseDictionary
from interp.dictionary.features import latent_examples, top_activations
from interp.models.tiny import byte_tokenizer
from interp.store import HarvestConfig, harvest
from interp.viz import latent_section, write_dashboard


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
    return harvest(HarvestConfig(out=out, model="tiny:llama", sites="blocks.1.hook_resid_post", corpus=str(corpus),
                                 tokens=6000, context_len=32, batch_size=8, shard_contexts=64),
                   model=tiny_model("llama"), progress=False)


def test_top_activations_match_brute_force(store):
    d = SparseDictionary(DictionaryConfig(d_in=64, n_latents=32, k=4, input_site="blocks.1.hook_resid_post"), seed=2)
    top = top_activations(d, store, [3, 7], n=5, batch_size=1000)
    with torch.no_grad():
        dense = d.encode(store.read("blocks.1.hook_resid_post")).to_dense(32)
    for latent in (3, 7):
        mine = top[top.latent == latent].sort_values("rank")
        expected = dense[:, latent].topk(5)
        np.testing.assert_allclose(mine.activation.to_numpy(), expected.values.numpy(), rtol=1e-5)
        assert (store.rows(mine.row.to_numpy())[:, 2] == mine.token.to_numpy()).all()
    examples = latent_examples(d, store, byte_tokenizer(), 3, top=top)
    first = examples.iloc[0]
    assert first["tokens"][first["index"]] == first["token"]
    assert max(first["activations"]) == pytest.approx(first["activation"], rel=1e-5)
    page = write_dashboard(store.root.parent / "page.html", [latent_section(3, examples)], "test")
    assert "Latent 3" in page.read_text() and "peak" in page.read_text()


def test_train_eval_and_features_commands(tmp_path, corpus):
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["train-sae", "--model", "tiny:llama", "--layer", "1", "--k", "4", "--latents", "64",
                                 "--tokens", "8k", "--batch-size", "1024", "--eval-tokens", "2048", "--eval-contexts", "2",
                                 "--corpus", str(corpus), "--context-len", "32", "--store", str(tmp_path / "store"),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "ce_recovered" in result.output and "fvu" in result.output
    folder = out / "sae-topk-k4-64"
    assert json.loads((folder / "metrics.json").read_text())["l0"] == pytest.approx(4.0)
    evaluated = runner.invoke(app, ["eval-sae", str(folder), "--eval-contexts", "2"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads((folder / "eval.json").read_text())["fvu"] == pytest.approx(json.loads((folder / "metrics.json").read_text())["fvu"])
    shown = runner.invoke(app, ["features", str(folder), "--latents", "0,1", "--n", "3"])
    assert shown.exit_code == 0, shown.output
    assert (folder / "features.html").exists()
    again = runner.invoke(app, ["train-sae", "--model", "tiny:llama", "--layer", "1", "--out", str(out), "--store", str(tmp_path / "store"),
                                "--tokens", "8k", "--latents", "64", "--k", "4", "--eval-tokens", "2048", "--batch-size", "1024"])
    assert again.exit_code == 2 and "--resume" in again.output
