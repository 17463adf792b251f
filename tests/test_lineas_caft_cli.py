"""interp lineas fit|apply and interp caft on a tiny model: outputs, resuming, bad input before any work."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from interp.cli import app
from interp.models import tiny_model
from interp.steering import AffineMaps, generate
from interp.steering.caft import load_task

runner = CliRunner()


def test_lineas_fit_then_apply(tmp_path):
    out = tmp_path / "maps"
    fit = runner.invoke(app, ["lineas", "fit", "--model", "tiny:llama", "--layers", "0-1", "--steps", "3", "--n-texts", "6",
                              "--out", str(out)])
    assert fit.exit_code == 0, fit.output
    assert "units changed" in fit.output and json.loads((out / "config.json").read_text())["steps"] == 3
    maps = AffineMaps.load(out)
    assert maps.method == "lineas" and maps.sites == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert maps.info["n_source"] == 6 and maps.info["n_target"] == 6
    shown = runner.invoke(app, ["lineas", "apply", "--model", "tiny:llama", "--maps", str(out), "--prompt", "abc",
                                "--max-new-tokens", "4", "--scorer", "none", "--out", str(tmp_path / "apply")])
    assert shown.exit_code == 0, shown.output
    row = json.loads((tmp_path / "apply" / "generations.jsonl").read_text().splitlines()[0])
    model = tiny_model("llama")
    assert row["steered"] == generate(model, ["abc"], maps.steering(1.0), max_new_tokens=4).texts[0]
    assert row["unsteered"] == generate(model, ["abc"], max_new_tokens=4).texts[0]
    swept = runner.invoke(app, ["lineas", "apply", "--model", "tiny:llama", "--maps", str(out), "--prompt", "abc",
                                "--max-new-tokens", "4", "--scorer", "none", "--sweep", "0.5,1", "--out", str(tmp_path / "sweep")])
    assert swept.exit_code == 0, swept.output
    assert (tmp_path / "sweep" / "table.csv").read_text().count("\n") == 4  # header, unsteered, two strengths


def test_lineas_fit_refuses_an_interrupted_fit_without_resume_and_continues_it_with(tmp_path):
    from interp.steering import fit_lineas
    from interp.steering.lineas_job import LineasFitConfig

    out = tmp_path / "maps"
    config = LineasFitConfig(n_texts=6, out=out)
    source, target = config.texts()
    model, sites = tiny_model("llama"), ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    kwargs = dict(lr=config.lr, l1=config.l1, group=config.group, seed=config.seed, progress=False)
    fit_lineas(model, source, target, sites, steps=2, checkpoint=out / "fit-state.safetensors", checkpoint_every=1, **kwargs)
    args = ["lineas", "fit", "--model", "tiny:llama", "--layers", "0-1", "--steps", "3", "--n-texts", "6", "--out", str(out)]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "--resume" in refused.output and not (out / "maps.safetensors").exists()
    resumed = runner.invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    maps, full = AffineMaps.load(out), fit_lineas(model, source, target, sites, steps=3, **kwargs)
    assert maps.info["resumed"] and not (out / "fit-state.safetensors").exists()
    for site in sites:
        assert torch.equal(maps.weight[site], full.weight[site]) and torch.equal(maps.bias[site], full.bias[site])


def test_lineas_bad_input_is_refused_before_loading(tmp_path):
    for args, message in [
        (["fit", "--n-texts", "3"], "at least 4"),
        (["fit", "--method", "act"], "choose one of lineas, mean-act, linear-act"),
        (["fit", "--source", "a.txt"], "both --source and --target"),
        (["apply", "--strength", "1.5", "--prompt", "x"], r"outside [0, 1]"),
        (["apply", "--sweep", "0.5,2", "--prompt", "x"], r"outside [0, 1]"),
        (["apply", "--maps", str(tmp_path / "none"), "--prompt", "x"], "no such affine-map file"),
    ]:
        result = runner.invoke(app, ["lineas", *args, "--model", "no-such-model"] if args[0] == "apply" else ["lineas", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "none").exists()


def test_caft_command_runs_the_three_conditions_and_resumes(tmp_path):
    spec = json.loads(open(load_task().info["file"]).read())
    spec["answers"] = ["B", "A"]  # single tokens for the byte tokenizer
    task = tmp_path / "task.json"
    task.write_text(json.dumps(spec))
    args = ["caft", "--model", "tiny:llama", "--task", str(task), "--seeds", "0", "--steps", "2", "--batch-size", "4",
            "--n-train", "16", "--layers", "1", "--n-components", "2", "--min-effect", "0", "--out", str(tmp_path / "caft")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "caft" / "results.jsonl").read_text().splitlines()]
    assert [(r["seed"], r["condition"]) for r in rows] == [("base", "base"), (0, "plain"), (0, "caft"), (0, "random")]
    assert rows[2]["directions"] == rows[3]["directions"] == 2
    directions = (tmp_path / "caft" / "directions-seed0.safetensors")
    assert directions.is_file()
    again = runner.invoke(app, args)  # everything is there: nothing runs again
    assert again.exit_code == 0 and len((tmp_path / "caft" / "results.jsonl").read_text().splitlines()) == 4
    changed = runner.invoke(app, [*args[:-2], "--steps", "3", "--out", str(tmp_path / "caft")])
    assert changed.exit_code == 2 and "other settings (steps differ)" in changed.output
    wrong = tmp_path / "wrong.safetensors"
    save_file({"blocks.1.hook_resid_post": torch.randn(2, 63)}, str(wrong))
    refused = runner.invoke(app, ["caft", "--directions", str(wrong), "--model", "tiny:llama", "--layers", "1", "--task", str(task),
                                  "--out", str(tmp_path / "caft-wrong")])
    assert refused.exit_code == 2 and "expected [k, 64]" in refused.output
    assert not (tmp_path / "caft-wrong" / "results.jsonl").exists()
