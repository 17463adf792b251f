"""SNMF: recovery of planted features, the algorithm's invariants, streaming, resuming, files, reports, steering, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment, nnls
from typer.testing import CliRunner

import interp.snmf.core as core
from interp.cli import app
from interp.errors import InputError
from interp.snmf import (
    SNMF, SNMFConfig, StoreActivations, TensorActivations, evaluate, feature_reports, feature_table, fit, fit_recursive,
    fit_snmf, hierarchy_table, output_directions, steer, steering_vector, write_feature_page,
)
from interp.store import HarvestConfig, harvest, write_arrays


def planted(seed: int = 0, *, d: int = 128, k: int = 8, n: int = 3000, m: int = 4, density: float = 0.1):
    """A = Y*·Z*ᵀ with Z* [d, k] of m neurons per column (disjoint supports, signed) and sparse Y* ≥ 0."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.zeros(d, k)
    perm = torch.randperm(d, generator=g)
    for j in range(k):
        signs = torch.where(torch.rand(m, generator=g) < 0.5, -1.0, 1.0)
        Z[perm[j * m : (j + 1) * m], j] = signs * (1 + torch.rand(m, generator=g))
    Y = torch.rand(n, k, generator=g) * (torch.rand(n, k, generator=g) < density)
    return Y @ Z.T, Z, Y


def matched_cosines(Z: torch.Tensor, Z_true: torch.Tensor) -> np.ndarray:
    """Cosine of each true column with the fitted column it is matched to (Hungarian matching)."""
    cos = (torch.nn.functional.normalize(Z, dim=0).T @ torch.nn.functional.normalize(Z_true, dim=0)).numpy()
    rows, cols = linear_sum_assignment(-cos)
    return cos[rows, cols]


def direct_error(A: torch.Tensor, Y: torch.Tensor, Z: torch.Tensor) -> float:
    return float(((A.double() - Y.double() @ Z.double().T) ** 2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_planted_features(seed):
    A, Z_true, _ = planted(seed)
    result = fit(TensorActivations(A), SNMFConfig(k=8, sparsity=4 / 128, init="svd", max_iter=300, patience=30),
                 progress=False)
    assert matched_cosines(result.Z, Z_true).min() > 0.9
    assert result.info["relative_error"] < 1e-3


def test_nonnegative_y_and_exact_sparsity(tmp_path):
    A, _, _ = planted(3, d=200, k=6, density=0.3)
    A = A + 0.05 * torch.randn(A.shape, generator=torch.Generator().manual_seed(0))  # no exact structure
    config = SNMFConfig(k=6, sparsity=0.013, init="random", max_iter=25, chunk_size=700)  # ceil(0.013 * 200) = 3
    for result in (fit(TensorActivations(A), config, progress=False),
                   fit(TensorActivations(A), config, workdir=tmp_path / "w", progress=False)):
        Y = result.Y if result.Y is not None else torch.from_numpy(np.load(result.y_path))
        assert Y.shape == (3000, 6) and bool((Y >= 0).all()) and bool((Y > 0).any())
        assert (result.Z != 0).sum(0).tolist() == [3] * 6
        np.testing.assert_allclose(Y.norm(dim=0).numpy(), 1.0, rtol=1e-4)  # unit columns, scale in Z
        assert result.info["neurons_per_feature"] == 3


def test_multiplicative_update_follows_the_float64_formula_where_float32_would_cancel():
    """Y <- Y * sqrt((P+ + Y Q-) / (P- + Y Q+)) (Ding, Li and Jordan), computed plainly in float64. The rows with a
    large positive P and a tiny Y make (Y Q+ + P+) - P cancel to 0 in float32: the update must still follow the formula."""
    g = torch.Generator().manual_seed(0)
    Y = torch.rand(64, 6, generator=g) + 0.05
    Y[:8] = 1e-6  # tiny coefficients
    Z = torch.randn(40, 6, generator=g)
    P, Q = torch.randn(64, 6, generator=g), Z.T @ Z
    P[:8] = 1e4  # P+ dwarfs Y Q+
    Yd, Pd, Qd = Y.double(), P.double(), Q.double()
    expected = Yd * ((Pd.clamp(min=0) + Yd @ (-Qd).clamp(min=0)) / ((-Pd).clamp(min=0) + Yd @ Qd.clamp(min=0))).sqrt()
    got = core.multiplicative_update(Y.clone(), P, Q.clone()).double()
    torch.testing.assert_close(got[8:], expected[8:], rtol=1e-4, atol=1e-8)
    assert torch.isfinite(got).all() and (got >= 0).all()
    # where the denominator is only Y Q+ (~1e-6) the ratio is huge but finite: no factor beyond what float64 gives
    assert float((got[:8] / expected[:8]).max()) < 1.01


def test_winner_take_all_keeps_exactly_the_largest():
    Z = torch.tensor([[3.0, -1.0], [-4.0, 2.0], [1.0, 2.0], [0.5, -5.0]])
    kept = core.winner_take_all(Z, 2)
    assert kept.tolist() == [[3.0, 0.0], [-4.0, 0.0], [0.0, 2.0], [0.0, -5.0]]  # ties (2, 2) broken to exactly 2


def test_best_iterate_error_is_non_increasing_and_true():
    """The fit stopped after t iterations returns the best of its first t iterates: its error,
    recomputed from the returned factors, never rises with t and equals the best recorded error."""
    A, _, _ = planted(4, density=0.3)
    A = A + 0.2 * torch.randn(A.shape, generator=torch.Generator().manual_seed(1))
    errors, histories = [], []
    for t in range(1, 16):
        result = fit(TensorActivations(A), SNMFConfig(k=8, sparsity=4 / 128, max_iter=t, patience=100), progress=False)
        errors.append(direct_error(A, result.Y, result.Z))
        histories.append(result.info["history"])
        assert errors[-1] / float((A.double() ** 2).sum()) == pytest.approx(min(result.info["history"]), rel=1e-4)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errors, errors[1:], strict=False))
    assert histories[-1][: len(histories[5])] == pytest.approx(histories[5], rel=1e-6)  # one trajectory


def test_chunked_store_fit_matches_in_memory(tmp_path):
    A, _, _ = planted(5, density=0.2)
    A = A + 0.05 * torch.randn(A.shape, generator=torch.Generator().manual_seed(2))
    store = write_arrays(tmp_path / "store", {"blocks.0.mlp.hook_post": A}, rows_per_shard=700)
    for init in ("random", "svd", "kmeans"):
        config = SNMFConfig(k=8, sparsity=4 / 128, init=init, max_iter=30, chunk_size=3000, init_rows=2000)
        memory = fit(TensorActivations(A), config, progress=False)
        chunked = fit(StoreActivations(store, "blocks.0.mlp.hook_post"), SNMFConfig(**{**config.__dict__, "chunk_size": 256}),
                      workdir=tmp_path / init, progress=False)
        Y = torch.from_numpy(np.load(chunked.y_path))
        assert chunked.info["iterations"] == memory.info["iterations"]
        np.testing.assert_allclose(chunked.info["history"], memory.info["history"], rtol=1e-4)
        torch.testing.assert_close(chunked.Z, memory.Z, rtol=1e-3, atol=1e-3 * float(memory.Z.abs().max()))
        torch.testing.assert_close(Y, memory.Y, rtol=1e-3, atol=1e-4)
        assert (chunked.top_rows[:, :5] == memory.top_rows[:, :5]).float().mean() > 0.95


def test_killed_fit_resumes_to_the_same_result(tmp_path, monkeypatch):
    A, _, _ = planted(6, density=0.3)
    store = write_arrays(tmp_path / "store", {"blocks.0.mlp.hook_post": A + 0.1})
    source = StoreActivations(store, "blocks.0.mlp.hook_post")
    config = SNMFConfig(k=8, sparsity=4 / 128, max_iter=12, patience=100, chunk_size=500)
    whole = fit(source, config, workdir=tmp_path / "whole", progress=False)

    real_pass, calls = core._update_pass, []

    def dying_pass(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # die in the middle of the 7th iteration, after some chunks were written
            source_, config_, device, slots, Z, read, write, scale = args
            slots.write(write, 0, torch.full((500, config_.k), 123.0))
            raise KeyboardInterrupt
        return real_pass(*args, **kwargs)

    monkeypatch.setattr(core, "_update_pass", dying_pass)
    with pytest.raises(KeyboardInterrupt):
        fit(source, config, workdir=tmp_path / "killed", progress=False)
    monkeypatch.setattr(core, "_update_pass", real_pass)
    with pytest.raises(InputError, match="other settings sparsity"):
        fit(source, SNMFConfig(**{**config.__dict__, "sparsity": 0.05}), workdir=tmp_path / "killed", resume=True, progress=False)
    resumed = fit(source, config, workdir=tmp_path / "killed", resume=True, progress=False)
    assert resumed.info["history"] == whole.info["history"]
    assert torch.equal(resumed.Z, whole.Z)
    assert np.array_equal(np.load(resumed.y_path), np.load(whole.y_path))
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == ["Y.npy"]  # slots and state cleaned up


def test_coefficients_solve_nonnegative_least_squares():
    A, _, _ = planted(7, density=0.3)
    A = A + 0.1 * torch.randn(A.shape, generator=torch.Generator().manual_seed(3))
    result = fit(TensorActivations(A[:2000]), SNMFConfig(k=8, sparsity=4 / 128, max_iter=40), progress=False)
    snmf = SNMF.from_fit(result, SNMFConfig(k=8), {"source": "tensor", "n": 2000, "d": 128})
    held_out = A[2000:2100]
    Y = snmf.coefficients(held_out)
    assert bool((Y >= 0).all())
    Zd = snmf.Z.double().numpy()
    for row in range(0, 100, 10):  # scipy's active-set NNLS is the reference optimum
        _, best = nnls(Zd, held_out[row].double().numpy())
        mine = float(np.linalg.norm(Zd @ Y[row].double().numpy() - held_out[row].double().numpy()))
        assert mine <= best * 1.001 + 1e-6
    scores = evaluate(snmf, TensorActivations(held_out))
    expected = direct_error(held_out, Y, snmf.Z) / float((held_out.double() ** 2).sum())
    assert scores["relative_error"] == pytest.approx(expected, rel=1e-3)


def test_recursive_snmf_groups_fine_features_under_their_parents():
    """Three groups of three fine features; the features of a group share 4 core neurons (and have
    2 of their own), as features of one concept share neurons. Level 1 (k = 3) must put each group
    under one parent."""
    g = torch.Generator().manual_seed(0)
    d, n = 128, 3000
    fine = torch.zeros(d, 9)
    perm = torch.randperm(d, generator=g)
    for c in range(3):
        core_neurons, core_weights = perm[10 * c : 10 * c + 4], torch.tensor([2.0, -2.0, 1.5, 1.5])
        for i in range(3):
            j = 3 * c + i
            fine[core_neurons, j] = core_weights * (1 + 0.2 * torch.rand(4, generator=g))
            fine[perm[10 * c + 4 + 2 * i : 10 * c + 6 + 2 * i], j] = 1 + torch.rand(2, generator=g)
    Y = torch.rand(n, 9, generator=g) * (torch.rand(n, 9, generator=g) < 0.1)
    A = Y @ fine.T
    levels = fit_recursive(TensorActivations(A), [9, 3], SNMFConfig(init="random", max_iter=200, patience=30),
                           sparsities=[6 / 128, 10 / 128], progress=False)
    assert [level.k for level in levels] == [9, 3] and levels[0].info["relative_error"] < 0.05
    # (within a group, other bases of shared-neuron features fit as well: no unique fine features)
    block = torch.zeros(d, dtype=torch.long)
    for c in range(3):
        block[perm[10 * c : 10 * c + 10]] = c
    weight = torch.stack([levels[0].Z.abs()[block == c].sum(0) for c in range(3)])  # [group, fitted feature]
    assert bool((weight.max(0).values > 0.99 * weight.sum(0)).all())  # each fitted feature stays in one group
    true_group = weight.argmax(0)
    parents = torch.tensor(hierarchy_table(levels).parent.tolist())
    for c in range(3):
        assert len(set(parents[true_group == c].tolist())) == 1
    assert sorted(set(parents.tolist())) == [0, 1, 2]
    assert bool((levels[1].loadings >= 0).all())
    torch.testing.assert_close(levels[1].y(slice(0, 50)), levels[0].y(slice(0, 50)) @ levels[1].loadings)
    with pytest.raises(InputError, match="decreasing"):
        fit_recursive(TensorActivations(A), [3, 9], SNMFConfig(), progress=False)


def test_save_and_load_round_trip(tmp_path):
    A, _, _ = planted(9, density=0.3)
    levels = fit_recursive(TensorActivations(A), [8, 3], SNMFConfig(sparsity=4 / 128, max_iter=15), progress=False)
    for i, level in enumerate(levels):
        level.save(tmp_path / f"level{i}")
    assert sorted(p.name for p in (tmp_path / "level0").iterdir()) == ["Y.npy", "snmf.json", "snmf.safetensors"]
    base, coarse = SNMF.load(tmp_path / "level0"), SNMF.load(tmp_path / "level1")
    assert torch.equal(base.Z, levels[0].Z) and torch.equal(base.y(), levels[0].y())
    assert torch.equal(base.top_rows, levels[0].top_rows) and base.info == json.loads(json.dumps(levels[0].info))
    assert torch.equal(coarse.Z, levels[1].Z) and coarse.level == 1 and coarse.base is not None
    torch.testing.assert_close(coarse.y(np.array([5, 1, 9])), levels[1].y(np.array([5, 1, 9])))
    with pytest.raises(InputError, match="not an interp SNMF|no readable"):
        SNMF.load(tmp_path)


def test_bad_input_is_refused_before_work(tmp_path):
    A, _, _ = planted(10)
    with pytest.raises(InputError, match="k must not exceed the number of tokens"):
        fit(TensorActivations(A[:50]), SNMFConfig(k=60), progress=False)
    with pytest.raises(InputError, match="init='pca'"):
        fit(TensorActivations(A), SNMFConfig(k=4, init="pca"), progress=False)
    with pytest.raises(InputError, match="sparsity"):
        fit(TensorActivations(A), SNMFConfig(k=4, sparsity=0), progress=False)
    A[1234, 7] = float("nan")
    store = write_arrays(tmp_path / "store", {"blocks.0.mlp.hook_post": A}, rows_per_shard=1000)
    work = tmp_path / "work"
    with pytest.raises(InputError, match="NaN or inf in the activations at store row 1234"):
        fit(StoreActivations(store, "blocks.0.mlp.hook_post"), SNMFConfig(k=4), workdir=work, progress=False)
    assert not work.exists()  # nothing written


# ----------------------------------------------------------------------- a tiny model

@pytest.fixture(scope="module")
def tiny():
    from interp.models import tiny_model

    return tiny_model("llama")


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("c") / "text.txt"
    rng = np.random.default_rng(1)
    path.write_text(" ".join(rng.choice(["north", "south", "east", "west", "rain", "snow", "wind", "sun"], 20_000)))
    out = tmp_path_factory.mktemp("s") / "store"
    return harvest(HarvestConfig(out=out, model="tiny:llama", sites="blocks.1.mlp.hook_post,blocks.1.hook_resid_post",
                                 corpus=str(path), tokens=4000, context_len=32, batch_size=8, shard_contexts=64),
                   model=tiny, progress=False)


@pytest.fixture(scope="module")
def tiny_snmf(tiny_store, tmp_path_factory):
    source = StoreActivations(tiny_store, "blocks.1.mlp.hook_post", (0, 3000))
    return fit_snmf(source, SNMFConfig(k=6, sparsity=0.05, max_iter=30, chunk_size=1000),
                    workdir=tmp_path_factory.mktemp("fit"), progress=False)


def test_feature_reports_match_brute_force(tiny, tiny_store, tiny_snmf, tmp_path):
    reports = feature_reports(tiny_snmf, tiny_store, tiny, [0, 3], n_examples=4)
    Y = tiny_snmf.y()
    layer = tiny.module.model.layers[1]
    for report in reports:
        f = report.feature
        best = Y[:, f].topk(4)
        np.testing.assert_allclose(report.examples.activation.to_numpy(), best.values.numpy(), rtol=1e-6)
        rows = tiny_store.rows(best.indices.numpy())
        first = report.examples.iloc[0]
        assert first.token == tiny.tokenizer.decode([int(rows[0, 2])]) and first.position == rows[0, 1]
        assert first.tokens[first["index"]] == first.token
        assert first.activations[first["index"]] == pytest.approx(first.activation, rel=1e-5)
        # the vocabulary projection, from the HF modules' weights
        direction = layer.mlp.down_proj.weight @ tiny_snmf.Z[:, f]
        logits = tiny.module.lm_head(tiny.module.model.norm(direction))
        assert report.promotes == [tiny.to_string([i]) for i in logits.topk(8).indices.tolist()]
        assert report.suppresses == [tiny.to_string([i]) for i in (-logits).topk(8).indices.tolist()]
        assert [i for i, _ in report.neurons] == tiny_snmf.Z[:, f].nonzero().flatten()[
            tiny_snmf.Z[tiny_snmf.Z[:, f] != 0, f].abs().argsort(descending=True)].tolist()
    table = feature_table(reports)
    assert list(table.feature) == [0, 3] and "[" in table["top contexts"].iloc[0]
    page = write_feature_page(reports, tmp_path / "f.html", "test").read_text()
    assert "Feature 3" in page and "promotes" in page and "neurons" in page


@pytest.mark.parametrize("family", ["llama", "gpt2", "transformer_lens"])
def test_output_directions_are_the_down_projection(family):
    from interp.models import tiny_model

    model = tiny_model(family)
    Z = torch.randn(model.cfg.d_mlp, 5)
    snmf = SNMF(Z, SNMFConfig(k=5), {}, {"site": model.site("mlp_post", 1), "n": 1})
    if family == "llama":
        expected = (model.module.model.layers[1].mlp.down_proj.weight @ Z).T
    elif family == "gpt2":
        expected = (Z.T @ model.module.transformer.h[1].mlp.c_proj.weight)  # Conv1D: [d_mlp, d_model]
    else:
        expected = Z.T @ model.module.blocks[1].mlp.W_out
    torch.testing.assert_close(output_directions(snmf, model), expected.detach(), rtol=1e-5, atol=1e-5)


def test_steering_interventions_act_as_plain_hooks(tiny, tiny_snmf):
    text = "north rain wind"
    with torch.no_grad():
        clean = tiny(text)
        with tiny.intervene(steer(tiny_snmf, tiny, 2, 5.0, how="mlp_out")):
            via_out = tiny(text)
        with tiny.intervene(steer(tiny_snmf, tiny, 2, 5.0 * float(tiny_snmf.Z[:, 2].norm()) / float(
                output_directions(tiny_snmf, tiny)[2].norm()), how="mlp_post")):
            via_post = tiny(text)
    assert (via_out - clean).abs().max() > 1e-3
    torch.testing.assert_close(via_out, via_post, rtol=1e-4, atol=1e-4)  # the same direction through W_down

    # adding at mlp_out == a plain forward hook adding the vector to the MLP module's output
    site, vector = steering_vector(tiny_snmf, tiny, 2)
    assert site == "blocks.1.hook_mlp_out" and float(vector.norm()) == pytest.approx(1.0)
    mlp = tiny.module.model.layers[1].mlp
    handle = mlp.register_forward_hook(lambda _m, _i, out: out + 5.0 * vector)
    with torch.no_grad():
        plain = tiny(text)
    handle.remove()
    torch.testing.assert_close(via_out, plain)

    # scaling the feature's neurons == a plain pre-hook on the down projection
    neurons = [i for i, _ in tiny_snmf.neurons(2)]
    with torch.no_grad(), tiny.intervene(steer(tiny_snmf, tiny, 2, 3.0, how="scale_neurons")):
        scaled = tiny(text)

    def pre(_m, args):
        h = args[0].clone()
        h[..., neurons] *= 3.0
        return (h,)

    handle = mlp.down_proj.register_forward_pre_hook(pre)
    with torch.no_grad():
        plain = tiny(text)
    handle.remove()
    assert (scaled - clean).abs().max() > 1e-4
    torch.testing.assert_close(scaled, plain)
    with pytest.raises(InputError, match="how="):
        steer(tiny_snmf, tiny, 2, 1.0, how="resid")


def test_snmf_command(tmp_path, tiny_store):
    runner = CliRunner()
    common = ["--model", "tiny:llama", "--layer", "1", "--store", str(tiny_store.root), "--tokens", "3000",
              "--eval-tokens", "800", "--max-iter", "15", "--sparsity", "0.05", "--chunk-size", "1024", "--report", "3"]
    out = tmp_path / "run"
    result = runner.invoke(app, ["snmf", "--k", "8,3", "--out", str(out), *common])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [level["k"] for level in metrics["levels"]] == [8, 3]
    assert all(0 < level["heldout_relative_error"] < 1 for level in metrics["levels"])
    assert (out / "level0-k8" / "Y.npy").exists() and (out / "level1-k3" / "snmf.json").exists()
    assert (out / "features.html").exists() and (out / "features-level1.html").exists() and (out / "hierarchy.csv").exists()
    assert json.loads((out / "config.json").read_text())["k"] == "8,3"
    again = runner.invoke(app, ["snmf", "--k", "8,3", "--out", str(out), *common])
    assert again.exit_code == 2 and "already holds a fit" in again.output
    assert runner.invoke(app, ["snmf", "--k", "8,3", "--out", str(out), "--resume", *common]).exit_code == 0

    # the feature dashboard takes an SNMF level: coefficients by NNLS with Z fixed (checked against scipy)
    dash = runner.invoke(app, ["dashboard", str(out / "level0-k8"), "--out", str(tmp_path / "dash"), "--tokens", "800", "--n", "5",
                               "--model", "tiny:llama"])
    assert dash.exit_code == 0, dash.output
    page = (tmp_path / "dash" / "level0-k8.html").read_text()
    assert '"kind":"snmf"' in page and '"name":"level0-k8"' in page
    from interp.models import load_model
    from interp.snmf.report import SNMFFeatures

    snmf = SNMF.load(out / "level0-k8")
    x = tiny_store.read("blocks.1.mlp.hook_post", np.arange(tiny_store.n_rows - 20, tiny_store.n_rows))
    rows, features, values = SNMFFeatures(snmf, load_model("tiny:llama")).activations(x)
    dense = torch.zeros(20, 8)
    dense[rows, features] = values
    for row in range(20):
        expected, _ = nnls(snmf.Z.double().numpy(), x[row].double().numpy())
        np.testing.assert_allclose(dense[row].numpy(), expected, rtol=1e-3, atol=1e-3 * max(1.0, expected.max()))

    bad_site = runner.invoke(app, ["snmf", "--site", "resid_post", "--k", "4", "--out", str(tmp_path / "b"), *common])
    assert bad_site.exit_code == 2 and "not one" in bad_site.output and "blocks.1.mlp.hook_post" in bad_site.output
    too_many = runner.invoke(app, ["snmf", "--k", "5000", "--out", str(tmp_path / "c"), *common])
    assert too_many.exit_code == 2 and "k must not exceed the number of tokens" in too_many.output
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fit_matches_cpu(tmp_path):
    A, _, _ = planted(12, density=0.2)
    A = A + 0.05 * torch.randn(A.shape, generator=torch.Generator().manual_seed(4))
    store = write_arrays(tmp_path / "store", {"blocks.0.mlp.hook_post": A}, rows_per_shard=1000)
    config = SNMFConfig(k=8, sparsity=4 / 128, max_iter=20, chunk_size=700)
    cpu = fit(StoreActivations(store, "blocks.0.mlp.hook_post"), config, progress=False)
    gpu = fit(StoreActivations(store, "blocks.0.mlp.hook_post", cache=True), SNMFConfig(**{**config.__dict__, "device": "cuda"}),
              workdir=tmp_path / "w", progress=False)
    np.testing.assert_allclose(gpu.info["history"], cpu.info["history"], rtol=1e-3)
    torch.testing.assert_close(gpu.Z, cpu.Z, rtol=1e-3, atol=1e-3 * float(cpu.Z.abs().max()))
