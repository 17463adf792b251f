"""interp lens / lens train / dla / neurons decode|clamp on a tiny model: outputs written, clean errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from interp.cli import app
from interp.store import HarvestConfig, harvest

runner = CliRunner()
TINY = ["--model", "tiny:llama"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    corpus = tmp_path_factory.mktemp("corpus") / "text.txt"
    corpus.write_text(" ".join(rng.choice(["alpha", "beta", "gamma", "river", "stone", "light"], size=4_000)))
    sites = "blocks.0.hook_resid_pre,blocks.1.hook_resid_pre,blocks.1.hook_resid_post"
    config = HarvestConfig(out=tmp_path_factory.mktemp("store") / "s", model="tiny:llama", sites=sites, corpus=str(corpus),
                           tokens=31 * 24, context_len=32, batch_size=8, shard_contexts=8)
    return harvest(config, progress=False)


def run(*args):
    result = runner.invoke(app, list(args))
    return result


def test_lens_prompt_writes_figures(tmp_path):
    result = run("lens", "hello world", *TINY, "--token", "a", "--html", str(tmp_path / "lens.html"))
    assert result.exit_code == 0, result.output
    assert "logit lens" in result.output and "p('a')" in result.output
    page = (tmp_path / "lens.html").read_text()
    assert page.count("plotly-graph-div") == 3 and (tmp_path / "plotly.min.js").exists()
    bad = run("lens", "hello", *TINY, "--lens", "magic")
    assert bad.exit_code == 2 and "--lens 'magic'" in bad.output and "Traceback" not in bad.output
    missing = run("lens", "hello", *TINY, "--lens", "tuned", "--lens-path", str(tmp_path / "none"))
    assert missing.exit_code == 2 and "not a saved lens" in missing.output


def test_lens_train_then_read_with_it(store, tmp_path):
    out = tmp_path / "tuned"
    result = run("lens", "train", "--store", str(store.root), *TINY, "--out", str(out), "--holdout", "62", "--steps", "3",
                 "--batch-size", "62", "--no-compile", "--compute-dtype", "float32")
    assert result.exit_code == 0, result.output
    assert "held-out KL" in result.output and (out / "lens" / "lens.safetensors").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert {m["lens"] for m in metrics} == {"logit", "tuned"} and json.loads((out / "config.json").read_text())["steps"] == 3
    shown = run("lens", "hello", *TINY, "--lens", "tuned", "--lens-path", str(out / "lens"))
    assert shown.exit_code == 0 and "tuned lens" in shown.output
    again = run("lens", "train", "--store", str(store.root), *TINY, "--out", str(out), "--holdout", "62", "--steps", "3")
    assert again.exit_code == 2 and "already holds a lens" in again.output
    linear = run("lens", "train", "--lens", "linear", "--store", str(store.root), *TINY, "--out", str(tmp_path / "lin"), "--holdout", "62")
    assert linear.exit_code == 0, linear.output
    other = run("lens", "train", "--store", str(store.root), "--model", "tiny:qwen2", "--out", str(tmp_path / "x"))
    assert other.exit_code == 2 and "harvested from" in other.output


def test_dla_on_a_prompt(tmp_path):
    result = run("dla", "--task", "prompt", "--prompt", "hello world", "--answer", "a", "--wrong", "b", *TINY, "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "max |residual|" in result.output and "L1.H" in result.output
    table = pd.read_csv(tmp_path / "components.csv")
    assert set(table.kind) == {"embed", "head", "mlp"} and (tmp_path / "dla.html").exists()
    bad = run("dla", "--task", "prompt", *TINY, "--out", str(tmp_path / "bad"))
    assert bad.exit_code == 2 and "--prompt and --answer" in bad.output


def test_neurons_decode_and_clamp(tmp_path):
    result = run("neurons", "decode", *TINY, "--layers", "1", "--variant", "final_gain", "--out", str(tmp_path / "dec"))
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(tmp_path / "dec" / "neurons.parquet")
    assert len(table) == 3 * 128 and set(table.weight) == {"gate", "up", "down"}
    assert (tmp_path / "dec" / "neurons.html").exists()
    bad = run("neurons", "decode", *TINY, "--layers", "0,7")
    assert bad.exit_code == 2 and "out of range" in bad.output
    clamp = run("neurons", "clamp", *TINY, "--layer", "1", "--neuron", "3", "--value", "5", "--prompts", "abc|hello",
                "--max-new-tokens", "3", "--out", str(tmp_path / "cl"))
    assert clamp.exit_code == 0, clamp.output
    record = json.loads((tmp_path / "cl" / "clamp.json").read_text())
    assert record["neuron"] == 3 and record["value"] == 5.0 and len(record["generations"]) == 2
