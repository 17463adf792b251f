"""The short-budget schedule rule (interp.dictionary.schedule) and its use by the trainer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from interp.dictionary import TrainConfig, train
from interp.dictionary.schedule import MASSIVE_SHARE, massive_share, massive_share_in, resolve_schedule
from interp.dictionary.train import Trainer
from interp.errors import InputError
from interp.store import write_arrays


def documented_lr(steps: int, latents: int) -> float:
    """The README's rule, written out with its numbers: 2e-4/sqrt(latents/16384) x sqrt(max(1, 28000/steps)), at most 4.5e-3."""
    return min(4.5e-3, 2e-4 / math.sqrt(latents / 16384) * math.sqrt(max(1.0, 28000 / steps)))


@pytest.mark.parametrize("tokens, batch, steps, warmup", [
    (200_000, 1024, 195, 9), (400_000, 1024, 390, 19), (2_000_000, 2048, 976, 48), (10_000_000, 4096, 2441, 50),
])
def test_rule_matches_the_documented_table(tokens, batch, steps, warmup):
    s = resolve_schedule(tokens, 8192)
    assert (s.batch_size, s.steps, s.warmup_steps) == (batch, steps, warmup)
    assert s.lr == pytest.approx(documented_lr(steps, 8192), rel=1e-9)
    assert all(how.startswith("rule") for how in s.rule.values())


def test_short_budget_rate_lies_in_the_flat_part_of_the_development_sweep():
    # layer 3, 200k tokens: FVU 0.0802 at 2.26e-3, 0.0782 at 4.53e-3, 0.0847 at 1.13e-3 (README)
    assert 2.26e-3 <= resolve_schedule(200_000, 8192).lr <= 4.53e-3


def test_long_runs_keep_the_long_run_rate_and_width_scaling():
    for latents in (4096, 16384, 65536):
        s = resolve_schedule(1_000_000_000, latents)
        assert s.lr == pytest.approx(2e-4 / math.sqrt(latents / 16384), rel=1e-12)
        assert (s.batch_size, s.warmup_steps) == (4096, 50)
    assert resolve_schedule(400_000, 4 * 8192).lr == pytest.approx(resolve_schedule(400_000, 8192).lr / 2, rel=1e-12)


def test_narrow_dictionaries_on_few_steps_are_capped_at_the_largest_tested_rate():
    s = resolve_schedule(20 * 1024, 128)  # 20 steps, 128 latents: the uncapped rule gives 0.085
    assert s.steps == 20 and s.lr == 4.5e-3 and "at most 0.0045" in s.rule["lr"]


def test_rate_falls_and_batch_grows_with_the_budget():
    budgets = [50_000, 200_000, 400_000, 2_000_000, 10_000_000, 100_000_000]
    schedules = [resolve_schedule(t, 8192) for t in budgets]
    assert all(a.lr > b.lr for a, b in zip(schedules, schedules[1:]))
    assert all(a.batch_size <= b.batch_size for a, b in zip(schedules, schedules[1:]))
    for s in schedules:
        assert s.batch_size in (1024, 2048, 4096) and 1 <= s.warmup_steps < s.steps


def test_explicit_settings_override_the_rule():
    s = resolve_schedule(400_000, 8192, batch_size=512, lr=1e-3, warmup_steps=0)
    assert (s.batch_size, s.steps, s.lr, s.warmup_steps) == (512, 781, 1e-3, 0)
    assert s.rule == {"batch_size": "given", "lr": "given", "warmup_steps": "given"}
    # a given batch size changes the step count, and so the rule's rate
    assert resolve_schedule(400_000, 8192, batch_size=4096).lr == pytest.approx(documented_lr(97, 8192), rel=1e-9)


def test_bad_settings_are_refused_with_the_valid_choices():
    with pytest.raises(InputError, match="0 for batch_size and lr, -1 for warmup_steps"):
        resolve_schedule(400_000, 8192, lr=-1e-3)
    with pytest.raises(InputError, match="less than one batch of 1024"):
        resolve_schedule(1000, 8192)


def massive_documented_lr(steps: int, latents: int) -> float:
    """The README's massive-activation rate: the rule's rate x 0.5 x min(1, 195/steps)^0.3, not below 2e-4/sqrt(latents/16384)."""
    return max(2e-4 / math.sqrt(latents / 16384), documented_lr(steps, latents) * 0.5 * min(1.0, 195 / steps) ** 0.3)


@pytest.mark.parametrize("tokens, steps, factor", [
    (100_000, 97, 0.5), (200_000, 195, 0.5), (400_000, 390, 0.4061), (2_000_000, 976, 0.3084),
])
def test_massive_activations_scale_the_rule_rate_only(tokens, steps, factor):
    plain, massive = resolve_schedule(tokens, 8192), resolve_schedule(tokens, 8192, massive=True)
    assert massive.steps == steps and massive.lr == pytest.approx(massive_documented_lr(steps, 8192), rel=1e-12)
    assert massive.lr == pytest.approx(plain.lr * factor, rel=2e-4)  # the factors of the rule, written out
    assert (massive.batch_size, massive.steps, massive.warmup_steps) == (plain.batch_size, plain.steps, plain.warmup_steps)
    written = f"x 0.5*min(1, 195/steps)^0.3 = {0.5 * min(1.0, 195 / steps) ** 0.3:.3g} but not below the long-run rate"
    assert written in massive.rule["lr"] and "(massive activations" in massive.rule["lr"]
    assert "massive" not in plain.rule["lr"] and "(the long-run rate here)" not in massive.rule["lr"]
    assert resolve_schedule(tokens, 8192, massive=True, lr=1e-3).lr == 1e-3  # a given rate is kept


@pytest.mark.parametrize("tokens, plain_steps", [(200_000, 195), (2_000_000, 976), (10_000_000, 2441), (4096 * 7080, 7080)])
def test_massive_activations_train_the_rate_and_twice_it_but_never_above_the_plain_rule(tokens, plain_steps):
    s = resolve_schedule(tokens, 8192, massive=True)
    assert s.lr_candidates == [s.lr, pytest.approx(min(2 * s.lr, documented_lr(plain_steps, 8192)), rel=1e-12)]
    assert "train in lockstep" in s.rule["lr"] and f"lr {s.lr:.3g} or {s.lr_candidates[1]:.3g} (rule:" in s.describe()
    # from 12,445 steps on the plain rule is under 1.5x the long-run floor r (x sqrt(28000/steps)): one candidate
    for steps in (12_500, 20_000, 28_000):
        long = resolve_schedule(steps * 4096, 8192, massive=True)
        assert long.lr_candidates == [long.lr] and "lockstep" not in long.rule["lr"]
    assert resolve_schedule(7080 * 4096, 8192, massive=True).lr_candidates[1] < 2 * resolve_schedule(7080 * 4096, 8192, massive=True).lr
    assert resolve_schedule(tokens, 8192, massive=True, two_rates=False).lr_candidates == [s.lr]  # L1 / L0 architectures
    assert resolve_schedule(tokens, 8192).lr_candidates == [resolve_schedule(tokens, 8192).lr]  # without massive rows
    assert resolve_schedule(tokens, 8192, massive=True, lr=1e-3).lr_candidates == [1e-3]  # a given rate


def test_a_given_batch_size_sets_the_steps_the_massive_factor_follows():
    s = resolve_schedule(400_000, 8192, massive=True, batch_size=4096)  # 97 steps, not the rule's 390
    assert s.steps == 97 and s.lr == pytest.approx(documented_lr(97, 8192) * 0.5, rel=1e-12)
    s = resolve_schedule(400_000, 8192, massive=True, batch_size=128)  # 3,125 steps: the long-run floor
    assert s.steps == 3125 and s.lr == pytest.approx(2e-4 / math.sqrt(0.5), rel=1e-12)


def test_massive_activations_never_go_below_the_long_run_rate():
    # the factor's rate, long-run rate x 0.5 x sqrt(28000) x 195^0.3 / steps^0.8, meets the long-run rate at 1,828 steps
    long_run = 2e-4 / math.sqrt(0.5)
    expected = long_run * 0.5 * math.sqrt(28000) * 195**0.3 / 1800**0.8
    assert long_run < expected < 1.02 * long_run
    assert resolve_schedule(1800 * 4096, 8192, massive=True).lr == pytest.approx(expected, rel=1e-12)
    for steps in (1850, 2441, 8000, 244_140):
        s = resolve_schedule(steps * 4096, 8192, massive=True)
        assert s.lr == pytest.approx(long_run, rel=1e-12) and "(the long-run rate here)" in s.rule["lr"]


def test_massive_rows_count_when_they_hold_a_quarter_of_the_variance():
    def has_massive_rows(rows):
        return massive_share(rows) >= MASSIVE_SHARE

    rows = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0))  # norms about 2.8, variance about 16,000
    assert not has_massive_rows(rows)
    rows[:2] = 0.0
    rows[:2, 3] = 40.0  # two rows above 10x the median norm, but 3,200 of about 19,200: under a quarter
    assert not has_massive_rows(rows)
    rows[:6] = 0.0
    rows[:6, 3] = 40.0  # six: 9,600 of about 25,600, over a quarter
    assert has_massive_rows(rows)
    rows[:6, 3] = 20.0  # a large share again, but under 10x the median norm (about 2.7): not massive
    assert not has_massive_rows(rows)


def test_massive_share_read_in_chunks_is_the_share_over_all_rows():
    x = torch.randn(5000, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 3.0  # off-centre
    x[[7, 1235, 4999]] = 150.0 * torch.eye(8, dtype=torch.float64)[2] + 3.0
    centred = (x - x.mean(0)).pow(2).sum(-1)
    norms = x.norm(dim=-1)
    expected = float(centred[norms > 10 * norms.median()].sum() / centred.sum())
    assert 0.5 < expected < 0.9
    reads = []

    def read(rows):
        reads.append(len(rows))
        return x[torch.from_numpy(rows)].float()

    rows = np.arange(5000)
    assert massive_share_in(read, rows, chunk=700) == pytest.approx(expected, rel=1e-5)
    assert max(reads) <= 700 and reads[-1] == 3  # chunks of at most 700 rows, then the three massive rows again
    assert massive_share_in(read, rows[8:1235], chunk=700) == 0.0  # none among these rows
    odd = np.arange(1, 5000, 2)  # row ids are not positions: the massive rows 7, 1235 and 4999 are at 3, 617 and 2499
    kept = x[torch.from_numpy(odd)]
    centred = (kept - kept.mean(0)).pow(2).sum(-1)
    assert massive_share_in(read, odd, chunk=333) == pytest.approx(float(centred[[3, 617, 2499]].sum() / centred.sum()), rel=1e-5)


def massive_store(tmp_path, massive_rows: int, norm: float):
    """Gaussian rows (norm about 4; 9,952 training rows hold about 159,000 of variance) with
    ``massive_rows`` of them replaced by rows of ``norm`` along one direction."""
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((12_000, 16)).astype(np.float32)
    acts[rng.choice(9_000, massive_rows, replace=False)] = norm * np.eye(16, dtype=np.float32)[3]
    return write_arrays(tmp_path / f"store-{massive_rows}", {"acts": acts})


@pytest.mark.parametrize("massive_rows, norm, drop_outliers, lr, lowered", [
    (0, 0, 0.0, 0.0, False),
    (60, 400, 0.0, 0.0, True),  # about 98% of the variance
    (1, 400, 0.0, 0.0, True),  # about 50%
    (1, 150, 0.0, 0.0, False),  # about 12%: above 10x the median norm, but not a quarter of the variance
    (60, 400, 10.0, 0.0, False),  # --drop-outliers: not trained on
    (60, 400, 0.0, 1e-3, False),  # a given rate
])
def test_trainer_lowers_the_rule_rate_where_its_training_rows_have_massive_rows(tmp_path, massive_rows, norm, drop_outliers, lr, lowered):
    store = massive_store(tmp_path, massive_rows, norm)  # the initialisation sample is every training row
    config = TrainConfig(model="none", store=store.root, site="acts", k="2", latents=4096, tokens=8192, lr=lr,
                         drop_outliers=drop_outliers, eval_tokens=2048, eval_contexts=0, out=tmp_path / "run")
    trainer = Trainer(config, progress=False)
    expected = lr or documented_lr(8, 4096) * (0.5 if lowered else 1.0)  # 4.5e-3 (the cap) or half: 8 steps
    assert trainer.lr == pytest.approx(expected, rel=1e-9)
    assert trainer.optimizers[next(iter(trainer.optimizers))].param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9)
    assert ("massive" in trainer.schedule.rule["lr"]) == lowered


def test_trainer_applies_the_factor_for_its_step_count(tmp_path):
    store = massive_store(tmp_path, 60, 400)
    config = TrainConfig(model="none", store=store.root, site="acts", k="2", latents=512, tokens=400 * 1024,
                         eval_tokens=2048, eval_contexts=0, out=tmp_path / "run")
    trainer = Trainer(config, progress=False)  # 400 steps over 9,952 training rows: further epochs
    assert trainer.steps == 400
    assert trainer.lr == pytest.approx(documented_lr(400, 512) * 0.5 * (195 / 400) ** 0.3, rel=1e-9)


def test_trainer_uses_prints_and_records_the_rule(tmp_path, capsys):
    rng = np.random.default_rng(0)
    store = write_arrays(tmp_path / "store", {"acts": rng.standard_normal((12_000, 16)).astype(np.float32)})
    config = TrainConfig(model="none", store=store.root, site="acts", k="2", latents=64, tokens=8192,
                         eval_tokens=2048, eval_contexts=0, checkpoint_every=10**9, out=tmp_path / "run")
    trainer = Trainer(config, progress=False)
    assert (trainer.batch_size, trainer.steps, trainer.lr) == (1024, 8, pytest.approx(documented_lr(8, 64), rel=1e-9))
    assert trainer.lr_at(0) == pytest.approx(trainer.lr / trainer.schedule.warmup_steps)

    config.lr = 1e-3  # the rule's rate for 64 latents and 8 steps is too large to train stably
    train(config, progress=True)
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert (resolved["batch_size"], resolved["steps"], resolved["lr"], resolved["warmup_steps"]) == (1024, 8, 1e-3, 1)
    printed = capsys.readouterr().out
    assert "schedule: batch 1024 x 8 steps (rule: power of 2 nearest tokens/1000" in printed
    assert "lr 0.001 (given)" in printed and "warm-up 1 steps (rule: steps/20" in printed


def test_the_massive_test_reads_beyond_the_initialisation_sample(tmp_path):
    """At SmolLM2's layer 12 massive rows are 3 in 10,000: the 16,384-row initialisation sample can miss them all."""
    from interp.dictionary.train import init_sample_rows

    rng = np.random.default_rng(0)
    acts = rng.standard_normal((40_000, 16)).astype(np.float32)
    n_train = 40_000 - 2048
    outside = np.setdiff1d(np.arange(n_train), init_sample_rows(n_train, 0))
    acts[outside[:: len(outside) // 12][:12]] = 400 * np.eye(16, dtype=np.float32)[3]  # about 75% of the variance
    store = write_arrays(tmp_path / "store", {"acts": acts})
    config = TrainConfig(model="none", store=store.root, site="acts", k="2", latents=4096, tokens=8192,
                         eval_tokens=2048, eval_contexts=0, out=tmp_path / "run")
    trainer = Trainer(config, progress=False)
    assert trainer.lr == pytest.approx(documented_lr(8, 4096) * 0.5, rel=1e-9)


@pytest.mark.parametrize("massive_site, lowered", [("target", True), ("source", False)])
def test_transcoders_look_for_massive_rows_in_their_target(tmp_path, massive_site, lowered):
    rng = np.random.default_rng(0)
    acts = {name: rng.standard_normal((12_000, 16)).astype(np.float32) for name in ("source", "target")}
    acts[massive_site][rng.choice(9_000, 60, replace=False)] = 400 * np.eye(16, dtype=np.float32)[3]
    store = write_arrays(tmp_path / "store", acts)
    config = TrainConfig(model="none", store=store.root, site="source", output_site="target", k="2", latents=4096,
                         tokens=8192, eval_tokens=2048, eval_contexts=0, out=tmp_path / "run")
    trainer = Trainer(config, progress=False)
    assert trainer.out_site == "target"
    assert trainer.lr == pytest.approx(documented_lr(8, 4096) * (0.5 if lowered else 1.0), rel=1e-9)


def short_budget_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "short_budget.py"
    spec = importlib.util.spec_from_file_location("short_budget", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_budget_goal_compares_seed_means_with_the_default():
    module = short_budget_module()
    fvu = {"rule": 0.04, "rule,seed=1": 0.02, "rule*0.5": 0.027, "rule*0.5,seed=1": 0.026, "rule*2": 0.05, "old": 0.001}
    results = {f"L12/200k/{v}": {"fvu": f} for v, f in fvu.items()} | {"L12/2M/rule": {"fvu": 0.02}, "L12/2M/rule*2": {"fvu": 0.0181},
                                                                      "L12/2M/rule*0.5": None, "L12/2M/rule,seed=1": None,
                                                                      "L12/2M/rule*0.5,seed=1": None, "L12/2M/old": None}
    lines = module.goal_lines(results, [12], ["200k", "2M"], list(fvu))
    # 200k: rule*0.5's mean 0.0265 against the default's 0.03 (old, the schedule before the rule, does not count)
    assert "rule*0.5 (mean FVU 0.0265 ± 0.0005 s.e., 2 seeds), is 11.7% below rule (mean FVU 0.0300 ± 0.0100 s.e., 2 seeds)" \
        in lines[1] and "goal missed" in lines[1]
    assert "rule*2 (FVU 0.0181, 1 seed), is 9.5% below rule (FVU 0.0200, 1 seed): goal met" in lines[2]
    assert module.standard_error([0.04, 0.02]) == pytest.approx(0.01)


def test_short_budget_variants_name_the_rates_they_train_at():
    module = short_budget_module()
    plain_lr = documented_lr(195, 8192)  # 200k tokens: batch 1024 x 195 steps
    settings, lr = module.variant_settings("rule", 200_000, 8192, massive=True)
    assert "lr" not in settings and lr == pytest.approx(plain_lr / 2, rel=1e-12)  # the trainer applies the rule
    assert module.variant_settings("rule*2", 200_000, 8192, massive=True)[1] == pytest.approx(plain_lr, rel=1e-12)
    assert module.variant_settings("plain", 200_000, 8192, massive=True) == ({"lr": pytest.approx(plain_lr, rel=1e-12)}, pytest.approx(plain_lr))
    assert module.variant_settings("rule*0.5", 200_000, 8192, massive=False)[1] == pytest.approx(plain_lr / 2, rel=1e-12)
    settings, lr = module.variant_settings("old,seed=3", 200_000, 8192, massive=True)
    assert settings == {"batch_size": 4096, "lr": pytest.approx(2e-4 / math.sqrt(0.5)), "warmup_steps": 50, "seed": 3}
    with pytest.raises(SystemExit, match="expected old, rule"):
        module.variant_settings("best", 200_000, 8192, massive=False)


@pytest.mark.parametrize("architecture, ks", [("topk", "2,3"), ("batchtopk", "2")])
def test_two_candidate_rates_train_in_lockstep_and_the_better_on_training_rows_is_kept(tmp_path, capsys, monkeypatch,
                                                                                      architecture, ks):
    """Each candidate trains exactly as a run given its rate would; per k, the one kept has the lower FVU,
    computed here with plain torch on the selection rows (4,096 training rows drawn by the seed), and is what
    the run saves (BatchTopK: with its inference threshold set before the choice)."""
    from interp.dictionary import load_dictionary

    import sys

    monkeypatch.setattr(sys.modules["interp.dictionary.train"], "SELECTION_ROWS", 4096)  # (the package's ``train`` is the function)
    store = massive_store(tmp_path, 60, 400)
    common = dict(model="none", store=store.root, site="acts", architecture=architecture, k=ks, latents=4096, tokens=8 * 1024,
                  eval_tokens=2048, eval_contexts=0, checkpoint_every=10**9, seed=3)
    lockstep = TrainConfig(**common, out=tmp_path / "lockstep")
    trainer = Trainer(lockstep, progress=False)
    rates = trainer.schedule.lr_candidates
    assert len(rates) == 2 and rates[1] == pytest.approx(2 * rates[0], rel=1e-12)
    assert len(trainer.dictionaries) == 2 * len(ks.split(","))
    results = train(lockstep, progress=True)
    assert capsys.readouterr().out.count("kept (FVU on 4,096 training rows") == len(results)

    rows = np.sort(np.random.default_rng(3).choice(9952, 4096, replace=False))  # the README's rows: drawn by the seed
    x = torch.from_numpy(np.asarray(store.read("acts", rows))).double()
    fvu, weights = {}, {}
    for rate in rates:
        single = TrainConfig(**common, lr=rate, out=tmp_path / f"lr{rate:.3g}")
        for name in train(single, progress=False):
            d = load_dictionary(single.out / name).eval()  # BatchTopK: the inference threshold
            with torch.no_grad():
                error = (x - d.decode(d.encode(x.float())).double()).pow(2).sum()
            fvu[name, rate] = float(error / (x - x.mean(0)).pow(2).sum())
            weights[name, rate] = d.W_dec.detach().clone()
    for name, metrics in results.items():
        assert fvu[name, rates[0]] != pytest.approx(fvu[name, rates[1]], rel=1e-3)  # the two rates really differ here
        kept = min(rates, key=lambda rate: fvu[name, rate])
        assert metrics["lr"] == kept
        assert metrics["lr_selection"] == {f"{r:.6g}": pytest.approx(fvu[name, r], rel=1e-6) for r in rates}
        saved = load_dictionary(tmp_path / "lockstep" / name)
        assert torch.equal(saved.W_dec, weights[name, kept])  # bit for bit the single run at the kept rate
        assert json.loads((tmp_path / "lockstep" / name / "dictionary.json").read_text())["training"]["lr"] == kept


def test_l1_dictionaries_keep_one_rate_on_massive_rows(tmp_path):
    """A ReLU (L1) dictionary's sparsity depends on the rate, so the FVU alone cannot choose: one candidate."""
    store = massive_store(tmp_path, 60, 400)
    config = TrainConfig(model="none", store=store.root, site="acts", architecture="relu", latents=4096, tokens=8192,
                         eval_tokens=2048, eval_contexts=0, out=tmp_path / "run")
    trainer = Trainer(config, progress=False)
    assert trainer.schedule.lr_candidates == [trainer.lr] and len(trainer.dictionaries) == 1
    assert trainer.lr == pytest.approx(documented_lr(8, 4096) * 0.5, rel=1e-9) and "lockstep" not in trainer.schedule.rule["lr"]


def test_an_interrupted_lockstep_run_resumes_both_candidates_exactly(tmp_path, run_until_killed):
    from interp.dictionary import checkpoint, load_dictionary

    store = massive_store(tmp_path, 60, 400)
    settings = dict(model="none", store=store.root, site="acts", k="2", latents=4096, tokens=8 * 1024, eval_tokens=2048,
                    eval_contexts=0, checkpoint_every=4)
    full = next(iter(train(TrainConfig(**settings, out=tmp_path / "full"), progress=False).values()))
    run_until_killed(Trainer(TrainConfig(**settings, out=tmp_path / "cut"), progress=False), 6)  # a checkpoint at step 4
    assert checkpoint.load(tmp_path / "cut")[1]["step"] == 4
    resumed = next(iter(train(TrainConfig(**settings, out=tmp_path / "cut", resume=True), progress=False).values()))
    assert resumed["lr_selection"] == full["lr_selection"] and resumed["lr"] == full["lr"]  # both candidates as uninterrupted
    a, b = (load_dictionary(tmp_path / run / "sae-topk-k2-4096") for run in ("full", "cut"))
    assert all(torch.equal(value, b.state_dict()[key]) for key, value in a.state_dict().items())
