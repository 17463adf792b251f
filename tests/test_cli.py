"""The interp command: generated from config dataclasses, clean errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from interp.cli import app
from interp.config import parse_count

runner = CliRunner()


def test_parse_count():
    assert parse_count("2M") == 2_000_000 and parse_count("500k") == 500_000 and parse_count("4096") == 4096
    with pytest.raises(Exception, match="not a count"):
        parse_count("lots")


def test_models_lists_the_embedded_model():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    assert "smollm2-135m" in result.output and "llama" in result.output


@pytest.mark.embedded
def test_sites_and_bad_site_pattern(embedded):
    result = runner.invoke(app, ["sites", "smollm2-135m", "--pattern", "blocks.29.*"])
    assert result.exit_code == 0, result.output
    assert "blocks.29.mlp.hook_post" in result.output and "1536" in result.output
    bad = runner.invoke(app, ["sites", "smollm2-135m", "--pattern", "blocks.30.*"])
    assert bad.exit_code == 2 and "matches no site" in bad.output
    assert "Traceback" not in bad.output


@pytest.mark.embedded
def test_cache_quick_look_writes_its_outputs(embedded, tmp_path):
    result = runner.invoke(app, ["cache", "--out", str(tmp_path), "--top-k", "3"])
    assert result.exit_code == 0, result.output
    assert "' Paris'" in result.output
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["top_k"] == 3 and config["model"] == "smollm2-135m"
    assert (tmp_path / "logit_lens.csv").read_text().count("\n") == 31


@pytest.mark.embedded
def test_patch_writes_cells_and_an_offline_heatmap(embedded, tmp_path):
    result = runner.invoke(app, ["patch", "--method", "relp", "--n", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "ioi[0]" in result.output and "cells in" in result.output
    cells = (tmp_path / "cells.csv").read_text().splitlines()
    assert cells[0].startswith("kind,layer,position") and len(cells) > 30 * 3
    assert (tmp_path / "plotly.min.js").exists() and "cdn.plot.ly" not in (tmp_path / "heatmap.html").read_text()
    bad = runner.invoke(app, ["patch", "--method", "exact", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--method" in bad.output and "Traceback" not in bad.output


@pytest.mark.embedded
def test_patch_runs_atp_star_on_a_held_out_template(embedded, tmp_path):
    result = runner.invoke(app, ["patch", "--method", "atpstar", "--task", "factual", "--split", "test", "--template", "2",
                                 "--n", "2", "--kinds", "resid_pre", "--no-per-position", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "factual[test 2]" in result.output
    assert len((tmp_path / "cells.csv").read_text().splitlines()) == 1 + 30
    bad = runner.invoke(app, ["patch", "--split", "train", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--split" in bad.output and "dev" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(app, ["patch", "--split", "dev", "--template", "99", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "0..7" in bad.output
