"""Experiment files: parsing and errors, the CLI, and every experiments/*.toml run at its smoke size
(found by glob), with each kind's numbers checked against an independent computation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from interp.cli import app
from interp.errors import InputError
from interp.experiments import kinds, load_spec, run_experiment
from interp.experiments.benchmark import ratio_tables
from interp.viz.browser import browser_problem

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.toml"))


def test_every_experiment_file_parses_at_both_sizes():
    assert {"sae_pareto", "patching_correlation", "benchmark"} <= set(kinds())
    assert len(EXPERIMENTS) >= 4
    for path in EXPERIMENTS:
        full, smoke = load_spec(path), load_spec(path, smoke=True)
        assert full.kind is smoke.kind and full.description


def test_bad_files_fail_before_any_work(tmp_path):
    cases = {
        'kind = "nope"': "registered kinds: benchmark",
        'kind = "sae_pareto"\n[params]\nlatent = 3': "unknown parameters ['latent']",
        'kind = "sae_pareto"\n[params]\nks = ["8"]': "ks=['8'] should be of type",
        'kind = "sae_pareto"\nparam = 1': "unknown top-level keys",
        'kind = "benchmark"': "missing parameters ['script']",
        'kind = [': "not valid TOML",
    }
    for text, message in cases.items():
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
            load_spec(path)
    result = CliRunner().invoke(app, ["experiment", "run", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2 and "cannot read experiment file" in result.output and "Traceback" not in result.output


def test_smoke_values_override_params(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text('kind = "sae_pareto"\n[params]\nlatents = 512\nks = [8]\n[smoke]\nks = [2, 4]\n')
    assert load_spec(path).params.ks == [8] and load_spec(path, smoke=True).params.ks == [2, 4]
    assert load_spec(path, smoke=True).params.latents == 512


def test_ratio_tables_are_found_anywhere_in_a_benchmark_json():
    table = {"title": "t", "baseline": "a", "rows": [{"case": "a", "median_s": 1.0, "ratio": 1.0}]}
    raw = {"float32": {"median": {"a": 1.0}, "table": table}, "other": [1, {"nested": table}], "harvest": None}
    assert list(ratio_tables(raw)) == [table, table]


def test_benchmark_kind_names_the_scripts_it_knows(tmp_path):
    path = tmp_path / "b.toml"
    path.write_text('kind = "benchmark"\n[params]\nscript = "bench_nothing.py"\n')
    with pytest.raises(InputError, match="bench_sae_step.py"):
        run_experiment(path, out=tmp_path / "out")


@pytest.mark.embedded
@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_runs_at_smoke_size(path, tmp_path, embedded):
    out = run_experiment(path, smoke=True, out=tmp_path / path.stem)
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert config["smoke"] and config["params"] == json.loads(json.dumps(vars(load_spec(path, smoke=True).params), default=str))
    assert config["seconds"] > 0 and ("png_problems" not in metrics or browser_problem())
    figures = sorted(p.stem for p in (out / "figures").glob("*.html"))
    assert figures and (out / "figures" / "plotly.min.js").exists()
    if browser_problem() is None:  # kaleido renders PNGs with the system chromium
        assert all((out / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG" for name in figures)
    CHECKS[config["kind"]](out, metrics, config["params"])


@pytest.mark.embedded
def test_a_finished_sweep_is_reused_only_with_the_settings_it_ran_with(tmp_path, embedded):
    """Rerunning into the same folder reuses the finished sweep; other settings are refused, not mixed in."""
    source = Path(__file__).resolve().parents[1] / "experiments" / "sae_pareto.toml"
    text = source.read_text()
    same, other = tmp_path / "same.toml", tmp_path / "other.toml"
    same.write_text(text)
    other.write_text(text.replace("latents = 256", "latents = 128"))
    assert "latents = 128" in other.read_text()
    out = run_experiment(same, smoke=True, out=tmp_path / "out")
    first = json.loads((out / "metrics.json").read_text())
    weights = (out / "interp" / "checkpoint.json").read_text()
    run_experiment(same, smoke=True, out=tmp_path / "out")
    assert json.loads((out / "metrics.json").read_text())["table"] == first["table"]
    assert (out / "interp" / "checkpoint.json").read_text() == weights  # not retrained
    with pytest.raises(InputError, match="other settings"):
        run_experiment(other, smoke=True, out=tmp_path / "out")


def check_sae_pareto(out: Path, metrics: dict, params: dict) -> None:
    """Each row's FVU and L0, recomputed from the saved dictionary on the held-out store rows."""
    from interp.dictionary.io import load_dictionary
    from interp.store import ActivationStore

    store = ActivationStore(metrics["store"])
    rows = slice(*metrics["held_out_rows"])
    y = store.read(metrics["site"], rows).double()
    methods = {row["method"] for row in metrics["table"]}
    assert methods == ({"interp", "sparsify"} if "skipped" not in metrics["sparsify"] else {"interp"})
    for row in metrics["table"]:
        if row["method"] != "interp":
            continue
        d = load_dictionary(out / "interp" / f"sae-topk-k{row['k']}-{params['latents']}")
        with torch.no_grad():
            code = d.encode(y.float())
            y_hat = d.decode(code).double()
        fvu = float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        assert row["fvu"] == pytest.approx(fvu, rel=2e-3)
        assert row["l0"] == pytest.approx(float(code.l0().double().mean()), abs=1e-6)
        assert 0 <= row["dead_fraction"] <= 1 and row["ce_recovered"] < 1
    assert pd.read_csv(out / "pareto.csv").shape[0] == len(metrics["table"])


def check_patching_correlation(out: Path, metrics: dict, params: dict) -> None:
    """Correlations recomputed from the cell tables written beside them."""
    for template in params["templates"]:
        activation = pd.read_csv(out / f"t{template}" / "activation.csv")
        for name, method in (("attribution", "attribution patching"), ("relp", "RelP [ln,identity,half]")):
            other = pd.read_csv(out / f"t{template}" / f"{name}.csv")
            for kind in params["kinds"]:
                both = activation[activation.kind == kind].merge(other[other.kind == kind], on=["kind", "layer", "position", "head"])
                expected = np.corrcoef(both.score_x, both.score_y)[0, 1]  # nan where a column is constant: patching a
                # whole layer's resid_pre (smoke size, per_position false) restores the clean metric at every layer
                assert metrics["templates"][str(template)]["correlations"][method][kind] == pytest.approx(expected, abs=1e-9, nan_ok=True)


def check_benchmark(out: Path, metrics: dict, params: dict) -> None:
    """Every ratio is the case's median over the baseline's median, and the baseline's is 1."""
    assert metrics["tables"] and (out / "output.txt").read_text()
    for table in metrics["tables"]:
        medians = {row["case"]: row["median_s"] for row in table["rows"]}
        for row in table["rows"]:
            assert row["ratio"] == pytest.approx(row["median_s"] / medians[table["baseline"]])


CHECKS = {"sae_pareto": check_sae_pareto, "patching_correlation": check_patching_correlation, "benchmark": check_benchmark}
