"""SAEs and transcoders: learning, sparsity, AuxK, splicing, SAELens round trips, resume, bad input."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from interp.dictionary import DictionaryConfig, SparseDictionary, TrainConfig, checkpoint, export_saelens, import_saelens, train
from interp.dictionary.io import load_dictionary, save_dictionary
from interp.dictionary.metrics import reconstruction_metrics, splice_metrics
from interp.dictionary.train import Trainer, step_dictionary
from interp.errors import InputError
from interp.models import tiny_model
from interp.store import write_arrays


def sparse_data(n: int, d: int = 32, features: int = 64, active: int = 3, seed: int = 0):
    """x = sum of `active` random unit features with positive coefficients; returns (x, features)."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(features, d, generator=g)
    truth /= truth.norm(dim=1, keepdim=True)
    which = torch.rand(n, features, generator=g).argsort(-1)[:, :active]
    coef = torch.rand(n, active, generator=g) + 0.5
    return torch.einsum("na,nad->nd", coef, truth[which]), truth


def fit(d: SparseDictionary, x: torch.Tensor, steps: int, *, lr: float = 3e-3, auxk_dead: int = 10**9, batch: int = 512, seed: int = 0):
    optimizer = torch.optim.Adam(d.parameters(), lr=lr)
    since = torch.zeros(d.config.n_latents, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, x.shape[0], (batch,), generator=g)
        step_dictionary(d, optimizer, x[rows], x[rows], since, lr=lr, auxk_dead=auxk_dead, auxk_coefficient=1 / 32)
    return since


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_recovers_known_sparse_directions(architecture):
    x, truth = sparse_data(20_000)
    d = SparseDictionary(DictionaryConfig(d_in=32, n_latents=128, architecture=architecture, k=3), seed=1)
    d.b_dec.data.copy_(x.mean(0))
    fit(d, x, 1500, auxk_dead=2000)
    cos = (truth @ d.W_dec.detach().T).max(dim=1).values  # best decoder row for each true feature
    assert float((cos > 0.9).float().mean()) >= 0.95, cos.sort().values[:8]
    with torch.no_grad():
        fvu = (d(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert float(fvu) < 0.1


@pytest.mark.parametrize("architecture", ["relu", "jumprelu"])
def test_dense_architectures_learn(architecture):
    x, _ = sparse_data(10_000, seed=2)
    d = SparseDictionary(DictionaryConfig(d_in=32, n_latents=128, architecture=architecture, l1_coefficient=1e-3, l0_coefficient=1e-3), seed=1)
    d.b_dec.data.copy_(x.mean(0))
    with torch.no_grad():
        before = (d(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    fit(d, x, 600)
    with torch.no_grad():
        after = (d(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        l0 = float(d.encode(x).l0().float().mean())
    assert float(after) < 0.5 * float(before) and l0 < 128


def test_topk_gives_exactly_k_active_latents():
    d = SparseDictionary(DictionaryConfig(d_in=16, n_latents=200, k=7), seed=0)
    d.b_enc.data.fill_(5.0)  # every pre-activation positive: exactly k must survive
    code = d.encode(torch.randn(300, 16))
    assert (code.l0() == 7).all()
    d.b_enc.data.fill_(-100.0)  # nothing positive: none may fire
    assert (d.encode(torch.randn(10, 16)).l0() == 0).all()


def test_batchtopk_keeps_k_per_row_on_average_and_is_exact():
    torch.manual_seed(0)
    d = SparseDictionary(DictionaryConfig(d_in=16, n_latents=64, architecture="batchtopk", k=4), seed=0)
    d.train()
    x = torch.randn(50, 16)
    x[0] *= 20  # one row with far larger activations than the others
    code = d.encode(x)
    dense = code.to_dense(64)
    reference = torch.relu(d.pre_activations(d.encoder_input(x)))
    kth = reference.flatten().topk(50 * 4).values[-1]
    assert torch.equal(dense > 0, reference >= kth)
    assert int(code.l0()[0]) > 4 * 4  # the big row takes many more than k


def test_auxk_revives_dead_latents():
    """64 true features, 64 latents, half of them too weak to ever reach the top k: they are dead,
    and the live half cannot cover every feature. AuxK must bring most of them back."""
    x, _ = sparse_data(8_000, seed=3)

    def run(auxk_dead: int) -> tuple[int, float]:
        d = SparseDictionary(DictionaryConfig(d_in=32, n_latents=64, k=3), seed=4)
        d.b_dec.data.copy_(x.mean(0))
        with torch.no_grad():
            d.W_enc[:32] *= 0.01
        since = fit(d, x, 400, auxk_dead=auxk_dead)
        with torch.no_grad():
            fvu = float((d(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        return int((since >= 2000).sum()), fvu

    (dead_without, fvu_without), (dead_with, fvu_with) = run(10**9), run(1000)
    assert dead_without == 32 and dead_with <= 10, (dead_without, dead_with)
    assert fvu_with < 0.6 * fvu_without


@pytest.mark.parametrize("dense_limit", [1024, 0])  # the dense path, then the sparse kernels
@pytest.mark.parametrize("n_latents, n_dead", [(512, 1), (512, 70), (512, 200), (100, 70)])  # padded to 64, 128, 256, 100
def test_auxk_reconstruction_matches_a_plain_top_k_of_the_dead_latents(monkeypatch, dense_limit, n_latents, n_dead):
    """AuxK's reconstruction and its gradients (to the weights and to the encoder input, through
    which b_dec learns) against a per-row loop over the dead latents: the k_aux largest ReLU
    pre-activations, decoded with their decoder rows (the padding never fires)."""
    train_module = importlib.import_module("interp.dictionary.train")  # the package exports a function of that name
    monkeypatch.setattr(train_module, "AUXK_DENSE_LATENTS", dense_limit)
    d = SparseDictionary(DictionaryConfig(d_in=24, n_latents=n_latents, k=4), seed=1)
    d.compute_dtype = None  # float32: selection is exact, so the two can be compared latent for latent
    z = torch.randn(40, 24, generator=torch.Generator().manual_seed(2), requires_grad=True)
    dead = torch.randperm(n_latents, generator=torch.Generator().manual_seed(3))[:n_dead].sort().values
    k_aux = min(12, n_dead)
    got = train_module.auxk_reconstruction(d, z, dead, k_aux)
    got.pow(2).sum().backward()
    grads = [p.grad.clone() for p in (d.W_enc, d.b_enc, d.W_dec, z)]
    for p in [*d.parameters(), z]:
        p.grad = None
    rows = []
    for row in z:
        pre = torch.relu(d.W_enc[dead] @ row + d.b_enc[dead])
        top = torch.argsort(pre.detach(), descending=True)[:k_aux]
        rows.append(sum(pre[j] * d.W_dec[dead[j]] for j in top.tolist()))
    expected = torch.stack(rows)
    expected.pow(2).sum().backward()
    assert torch.allclose(got, expected, atol=1e-5)
    for mine, plain in zip(grads, (d.W_enc.grad, d.b_enc.grad, d.W_dec.grad, z.grad)):
        assert torch.allclose(mine, plain, atol=1e-4), float((mine - plain).abs().max())
    assert float(d.W_enc.grad.abs().sum()) > 0  # gradients reached the dead latents


def identity_dictionary(d_model: int) -> SparseDictionary:
    """x = relu(x) - relu(-x): an exact dictionary of 2d latents."""
    d = SparseDictionary(DictionaryConfig(d_in=d_model, n_latents=2 * d_model, architecture="relu"))
    eye = torch.eye(d_model)
    with torch.no_grad():
        d.W_enc.copy_(torch.cat([eye, -eye]))
        d.W_dec.copy_(torch.cat([eye, -eye]))
        d.b_enc.zero_()
        d.b_dec.zero_()
    return d


def plain_hook_losses(model, tokens, module, replace, first=1):
    """CE and KL against the clean run, with ``module``'s output at positions >= ``first`` replaced
    by ``replace(output, input)``, computed with a plain torch hook on the HF module (not interp's)."""

    def hook(mod, args, output):
        tensor = output[0] if isinstance(output, tuple) else output
        edited = tensor.clone()
        edited[:, first:] = replace(tensor, args[0])[:, first:]
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    with torch.no_grad():
        clean = model.module(input_ids=tokens).logits[:, first:-1].log_softmax(-1)
        handle = module.register_forward_hook(hook)
        try:
            edited = model.module(input_ids=tokens).logits[:, first:-1].log_softmax(-1)
        finally:
            handle.remove()
    target = tokens[:, first + 1 :, None]
    ce = float(-edited.gather(-1, target).mean())
    kl = float((clean.exp() * (clean - edited)).sum(-1).mean())
    return ce, kl


def counting_calls(d):
    calls = {"n": 0}
    d.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    return calls


def test_splicing_an_identity_dictionary_leaves_the_loss_unchanged():
    model = tiny_model("llama")
    site = "blocks.0.hook_resid_post"
    d = identity_dictionary(model.cfg.d_model)
    d.config.input_site = site
    calls = counting_calls(d)
    tokens = model.tokenize(["the quick brown fox jumps over", "a lazy dog sleeps in the sun"]).ids
    metrics = splice_metrics(model, d, tokens, first_position=1)
    assert calls["n"] == 1  # the splice really ran (one forward pass for the one batch of contexts)
    assert abs(metrics["ce_spliced"] - metrics["ce_clean"]) < 1e-5 and metrics["kl"] < 1e-6
    assert metrics["ce_recovered"] == pytest.approx(1.0, abs=1e-3)


def test_spliced_and_ablated_losses_match_a_plain_hook():
    model = tiny_model("llama")
    d = SparseDictionary(DictionaryConfig(d_in=model.cfg.d_model, n_latents=256, architecture="relu",
                                          input_site="blocks.0.hook_resid_post"), seed=5)
    calls = counting_calls(d)
    tokens = model.tokenize(["the quick brown fox jumps over", "a lazy dog sleeps in the sun"]).ids
    metrics = splice_metrics(model, d, tokens, first_position=1)
    layer = model.module.model.layers[0]
    with torch.no_grad():
        ce, kl = plain_hook_losses(model, tokens, layer, lambda out, _: d(out.reshape(-1, out.shape[-1])).reshape(out.shape))
        ce_zero, _ = plain_hook_losses(model, tokens, layer, lambda out, _: torch.zeros_like(out))
    assert calls["n"] == 2  # interp's splice and the plain hook
    assert metrics["ce_spliced"] == pytest.approx(ce, rel=1e-5) and metrics["kl"] == pytest.approx(kl, rel=1e-4)
    assert metrics["ce_zero"] == pytest.approx(ce_zero, rel=1e-5)
    assert metrics["kl"] > 1e-3  # a random dictionary does change the model


def test_transcoder_splice_replaces_the_mlp_output_from_its_input():
    model = tiny_model("llama")
    d = SparseDictionary(DictionaryConfig(d_in=model.cfg.d_model, d_out=model.cfg.d_model, n_latents=128, architecture="relu",
                                          input_site="blocks.0.ln2.hook_normalized", output_site="blocks.0.hook_mlp_out"), seed=6)
    calls = counting_calls(d)
    tokens = model.tokenize(["the quick brown fox jumps over", "a lazy dog sleeps in the sun"]).ids
    metrics = splice_metrics(model, d, tokens, first_position=1)
    mlp = model.module.model.layers[0].mlp  # reads ln2's output, writes mlp_out

    def transcode(out, mlp_input):
        return d(mlp_input.reshape(-1, mlp_input.shape[-1])).reshape(out.shape)

    with torch.no_grad():
        ce, kl = plain_hook_losses(model, tokens, mlp, transcode)
    assert calls["n"] == 2
    assert metrics["ce_spliced"] == pytest.approx(ce, rel=1e-5) and metrics["kl"] == pytest.approx(kl, rel=1e-4)
    assert metrics["kl"] > 1e-4


def assert_same_outputs(ours: SparseDictionary, sae_lens_sae, x: torch.Tensor):
    with torch.no_grad():
        torch.testing.assert_close(sae_lens_sae(x), ours(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ["topk", "relu", "jumprelu", "batchtopk"])
def test_saelens_round_trip(tmp_path, architecture):
    from sae_lens import SAE

    torch.manual_seed(0)
    config = DictionaryConfig(d_in=24, n_latents=96, architecture=architecture, k=5, input_site="blocks.0.hook_resid_post", model="tiny")
    d = SparseDictionary(config, seed=3)
    with torch.no_grad():
        d.b_dec.normal_()
        d.b_enc.normal_(0, 0.1)
        d.input_scale.fill_(1.7)
        d.output_scale.fill_(1.7)
        d.threshold.fill_(0.05)
    d.eval()
    x = torch.randn(40, 24) * 2
    folder = export_saelens(d, tmp_path / "export")
    loaded = SAE.load_from_disk(str(folder))
    assert_same_outputs(d, loaded, x)
    back = import_saelens(folder)
    with torch.no_grad():
        torch.testing.assert_close(back(x), d(x), rtol=1e-5, atol=1e-5)


def saelens_own_export(d: SparseDictionary, folder):
    """The reference: the same weights written by SAELens's own config and SAE classes."""
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
    from sae_lens.saes.transcoder import JumpReLUTranscoder, JumpReLUTranscoderConfig, Transcoder, TranscoderConfig

    c = d.config
    metadata = SAEMetadata(model_name=c.model, hook_name=c.input_site, hook_name_out=c.output_site or c.input_site,
                           exported_by="interp")
    common = dict(d_in=c.d_in, d_sae=c.n_latents, dtype="float32", device="cpu", metadata=metadata)
    kinds = {("topk", False): (TopKSAE, TopKSAEConfig, dict(k=c.k, apply_b_dec_to_input=True)),
             ("relu", False): (StandardSAE, StandardSAEConfig, dict(apply_b_dec_to_input=True)),
             ("relu", True): (Transcoder, TranscoderConfig, dict(d_out=c.out_dim, apply_b_dec_to_input=False)),
             ("jumprelu", False): (JumpReLUSAE, JumpReLUSAEConfig, dict(apply_b_dec_to_input=True)),
             ("batchtopk", False): (JumpReLUSAE, JumpReLUSAEConfig, dict(apply_b_dec_to_input=True)),
             ("jumprelu", True): (JumpReLUTranscoder, JumpReLUTranscoderConfig, dict(d_out=c.out_dim, apply_b_dec_to_input=False))}
    sae_class, config_class, extra = kinds[(c.architecture, c.is_transcoder)]
    sae = sae_class(config_class(**extra, **common))
    sae.load_state_dict(load_file(folder / "sae_weights.safetensors"))  # ours, so only the writing is compared
    sae.save_model(folder.with_name(folder.name + "-saelens"))
    return folder.with_name(folder.name + "-saelens")


@pytest.mark.parametrize("architecture, transcoder", [("topk", False), ("relu", False), ("relu", True), ("jumprelu", False),
                                                      ("jumprelu", True), ("batchtopk", False)])
def test_saelens_export_writes_what_saelens_writes(tmp_path, architecture, transcoder):
    """cfg.json and the weights file's layout, written without importing SAELens, against SAELens's own writer."""
    config = DictionaryConfig(d_in=12, n_latents=40, architecture=architecture, k=5, input_site="blocks.1.hook_resid_mid",
                              model="tiny", **(dict(d_out=10, output_site="blocks.1.hook_mlp_out") if transcoder else {}))
    d = SparseDictionary(config, seed=2)
    with torch.no_grad():
        d.input_scale.fill_(1.3)
        d.threshold.fill_(0.2)
    ours = export_saelens(d, tmp_path / "ours")
    theirs = saelens_own_export(d, ours)
    assert json.loads((ours / "cfg.json").read_text()) == json.loads((theirs / "cfg.json").read_text())
    # byte for byte: fields and their order, tensor names, dtypes, layout (the values are ours, loaded into
    # SAELens's classes: they are tested through SAELens's loader in test_saelens_loads_every_export_kind)
    for name in ("cfg.json", "sae_weights.safetensors"):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name


@pytest.mark.parametrize("architecture, d_out, subtract_b_dec", [
    ("topk", None, False), ("relu", None, False), ("relu", 10, None), ("relu", 12, True), ("jumprelu", 10, None),
    ("jumprelu", 12, True), ("batchtopk", None, False)])
def test_saelens_loads_every_export_kind(tmp_path, architecture, d_out, subtract_b_dec):
    """SAEs that keep b_dec out of the encoder, and transcoders with and without a subtracted b_dec (folded into
    b_enc on export), with biases and input/output scales that are not trivial: SAELens's outputs are ours."""
    from sae_lens import SAE

    sites = dict(d_out=d_out, output_site="blocks.1.hook_mlp_out") if d_out else {}
    config = DictionaryConfig(d_in=12, n_latents=40, architecture=architecture, k=5, input_site="blocks.1.hook_resid_mid",
                              subtract_b_dec=subtract_b_dec, **sites)
    d = SparseDictionary(config, seed=4)
    with torch.no_grad():
        d.b_dec.normal_()
        d.b_enc.normal_(0, 0.1)
        d.input_scale.fill_(1.7)
        d.output_scale.fill_(0.6 if d_out else 1.7)
        d.threshold.fill_(0.05)
        if architecture == "jumprelu":
            d.log_threshold.fill_(-3.0)
    d.eval()
    x = torch.randn(30, 12) * 2
    folder = export_saelens(d, tmp_path / "export")
    assert_same_outputs(d, SAE.load_from_disk(str(folder)), x)
    with torch.no_grad():
        torch.testing.assert_close(import_saelens(folder)(x), d(x), rtol=1e-5, atol=1e-5)


def test_transcoder_export_and_own_format(tmp_path):
    from sae_lens import SAE

    config = DictionaryConfig(d_in=16, d_out=20, n_latents=48, architecture="relu", input_site="a", output_site="b")
    d = SparseDictionary(config, seed=1)
    x = torch.randn(9, 16)
    assert_same_outputs(d, SAE.load_from_disk(str(export_saelens(d, tmp_path / "tc"))), x)
    save_dictionary(d, tmp_path / "own", note="hello")
    again = load_dictionary(tmp_path / "own")
    with torch.no_grad():
        assert torch.equal(again(x), d(x))
    with pytest.raises(InputError, match="width 16, but the site has width 32"):
        load_dictionary(tmp_path / "own", d_in=32)
    with pytest.raises(InputError, match="no TopK transcoder"):
        export_saelens(SparseDictionary(DictionaryConfig(d_in=4, d_out=4, n_latents=8, k=2, input_site="a", output_site="b")), tmp_path / "x")
    with pytest.raises(InputError, match="width 16"):
        import_saelens(tmp_path / "tc", d_in=8)


@pytest.fixture
def synthetic_store(tmp_path):
    x, _ = sparse_data(30_000, seed=5)
    return write_arrays(tmp_path / "store", {"acts": x})


def synthetic_config(store, out, **kw):
    base = dict(model="none", store=store.root, site="acts", k="3", latents=64, tokens=24_576, batch_size=1024,
                eval_tokens=4096, eval_contexts=0, checkpoint_every=6, out=out, warmup_steps=5, lr=3e-3)
    return TrainConfig(**{**base, **kw})


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, synthetic_store, run_until_killed):
    full = train(synthetic_config(synthetic_store, tmp_path / "full"), progress=False)
    run_until_killed(Trainer(synthetic_config(synthetic_store, tmp_path / "cut"), progress=False), 13)  # checkpoints at 6, 12
    assert checkpoint.load(tmp_path / "cut")[1]["step"] == 12
    with pytest.raises(InputError, match="--resume"):
        train(synthetic_config(synthetic_store, tmp_path / "cut"), progress=False)
    resumed = train(synthetic_config(synthetic_store, tmp_path / "cut", resume=True), progress=False)
    name = next(iter(full))
    a, b = load_dictionary(tmp_path / "full" / name), load_dictionary(tmp_path / "cut" / name)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    history = [json.loads((tmp_path / run / "history.json").read_text()) for run in ("full", "cut")]
    assert history[0] == history[1]
    assert resumed[name]["fvu"] == full[name]["fvu"]


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    x, _ = sparse_data(30_000, seed=5)
    return write_arrays(tmp_path_factory.mktemp("shared") / "store", {"acts": x})


@pytest.fixture(scope="module")
def uninterrupted(shared_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    return out, train(synthetic_config(shared_store, out), progress=False)


@pytest.mark.parametrize("fault, step", [  # checkpoints at steps 6, 12, 18, 24; each kill lands in the second
    ("checkpoint.file-written#2", 6),       # its dictionary file written, state.json not yet
    ("checkpoint.files-written#2", 6),      # every file written and flushed in the temporary folder
    ("checkpoint.renamed#2", 6),            # the new version renamed into place, the pointer still on the old one
    ("atomic-write:checkpoint.json#2", 6),  # the new pointer flushed under its temporary name
    ("checkpoint.pointer-replaced#2", 12),  # the pointer on the new version, the old one not deleted yet
    ("checkpoint.old-removed#1", 12),       # the old version deleted
])
def test_sigkill_during_checkpoint_replacement_then_resume_continues_exactly(tmp_path, shared_store, uninterrupted, fault, step):
    out = tmp_path / "run"
    config = synthetic_config(shared_store, out)
    command = [sys.executable, "-m", "interp", "train-sae", "--model", "none", "--store", str(shared_store.root), "--site", "acts",
               "--k", config.k, "--latents", str(config.latents), "--tokens", str(config.tokens), "--batch-size", str(config.batch_size),
               "--eval-tokens", str(config.eval_tokens), "--eval-contexts", "0", "--checkpoint-every", str(config.checkpoint_every),
               "--warmup-steps", str(config.warmup_steps), "--lr", str(config.lr), "--out", str(out)]
    killed = subprocess.run(command, env={**os.environ, "INTERP_FAULT": fault}, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    folder, state = checkpoint.load(out)
    assert state["step"] == step and folder.name == f"step-{step:08d}"

    resumed = train(synthetic_config(shared_store, out, resume=True), progress=False)
    full_out, full = uninterrupted
    name = next(iter(full))
    a, b = load_dictionary(full_out / name), load_dictionary(out / name)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert json.loads((full_out / "history.json").read_text()) == json.loads((out / "history.json").read_text())
    assert resumed[name]["fvu"] == full[name]["fvu"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000024"]  # leftovers cleaned up


def test_sigkill_during_the_first_checkpoint_then_the_same_command_starts_again(tmp_path, shared_store, uninterrupted):
    """Killed before any checkpoint is complete: --resume says to start again, and starting again works."""
    out = tmp_path / "run"
    config = synthetic_config(shared_store, out)
    command = [sys.executable, "-m", "interp", "train-sae", "--model", "none", "--store", str(shared_store.root), "--site", "acts",
               "--k", config.k, "--latents", str(config.latents), "--tokens", str(config.tokens), "--batch-size", str(config.batch_size),
               "--eval-tokens", str(config.eval_tokens), "--eval-contexts", "0", "--checkpoint-every", str(config.checkpoint_every),
               "--warmup-steps", str(config.warmup_steps), "--lr", str(config.lr), "--out", str(out)]
    killed = subprocess.run(command, env={**os.environ, "INTERP_FAULT": "checkpoint.renamed#1"}, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (out / "checkpoints" / "step-00000006").is_dir() and not (out / "checkpoint.json").exists()
    with pytest.raises(InputError, match="without --resume"):
        train(synthetic_config(shared_store, out, resume=True), progress=False)
    again = train(config, progress=False)
    full_out, full = uninterrupted
    name = next(iter(full))
    assert torch.equal(load_dictionary(full_out / name).W_dec, load_dictionary(out / name).W_dec)
    assert again[name]["fvu"] == full[name]["fvu"]


def test_a_second_job_on_the_same_run_folder_is_refused_naming_the_holder(tmp_path, shared_store):
    import os as os_module

    from interp.errors import LockedError
    from interp.paths import file_lock

    out = tmp_path / "run"
    with file_lock(out / "run.lock"):  # as a running job holds it
        with pytest.raises(LockedError, match=f"run folder {out} is being written by pid {os_module.getpid()} "):
            train(synthetic_config(shared_store, out), progress=False)
    assert not (out / "checkpoints").exists()


def test_batchtopk_inference_keeps_about_k_latents_after_a_short_run_and_saelens_agrees(tmp_path):
    from sae_lens import SAE

    g = torch.Generator().manual_seed(9)
    x = torch.randn(30_000, 32, generator=g) @ torch.randn(32, 32, generator=g) + torch.randn(32, generator=g)
    store = write_arrays(tmp_path / "store", {"acts": x})
    out = tmp_path / "run"
    results = train(synthetic_config(store, out, architecture="batchtopk", k="8", latents=128, tokens=10 * 1024), progress=False)
    name = "sae-batchtopk-k8-128"
    assert abs(results[name]["l0"] - 8) < 0.8, results[name]["l0"]  # eval mode, held-out rows: within 10% of k
    held_out = x[-4096:]
    sae = SAE.load_from_disk(str(out / name / "saelens"))
    with torch.no_grad():
        l0_saelens = float((sae.encode(held_out) > 0).sum(-1).double().mean())
    assert l0_saelens == pytest.approx(results[name]["l0"], rel=1e-3)


def test_metrics_do_not_depend_on_the_compute_dtype_or_the_entry_point(tmp_path, shared_store):
    """bfloat16 encoder matmuls in training (what --compute-dtype auto picks on CPUs with native
    bfloat16), float32 everywhere in evaluation: training's final metrics equal eval-sae's."""
    from interp.dictionary.train import EvalConfig, evaluate

    out = tmp_path / "run"
    trained = train(synthetic_config(shared_store, out, compute_dtype="bfloat16", tokens=8192), progress=False)
    name = next(iter(trained))
    evaluated = evaluate(EvalConfig(dictionary=out / name, eval_contexts=0))
    for key in ("fvu", "l0", "mse", "cosine", "dense_1pct"):
        assert evaluated[key] == trained[name][key], key
    d = load_dictionary(out / name)
    d.compute_dtype = torch.bfloat16
    d.eval()
    x = shared_store.read("acts", slice(0, 512))
    with torch.no_grad():
        assert torch.equal(d(x), load_dictionary(out / name)(x))  # inference ignores the training compute dtype


def test_bad_input(tmp_path, synthetic_store):
    with pytest.raises(InputError, match="not in the store"):
        train(synthetic_config(synthetic_store, tmp_path / "a", site="other"), progress=False)
    train(synthetic_config(synthetic_store, tmp_path / "b", tokens=8192), progress=False)
    y, _ = sparse_data(30_000, d=40, seed=6)
    wider = write_arrays(tmp_path / "wider", {"acts": y})
    with pytest.raises(InputError, match="d_in=32.*40"):
        train(synthetic_config(wider, tmp_path / "b", tokens=8192, resume=True), progress=False)
    with pytest.raises(InputError, match="k=0"):
        DictionaryConfig(d_in=4, n_latents=8, k=0)
    exported = export_saelens(SparseDictionary(DictionaryConfig(d_in=32, n_latents=64, k=3, input_site="acts")), tmp_path / "sl")
    with pytest.raises(InputError, match="40"):
        import_saelens(exported, d_in=40)  # a model whose d_model is 40


def test_non_finite_activations_stop_training_and_keep_the_checkpoint(tmp_path):
    from interp.dictionary.train import init_sample_rows

    x, _ = sparse_data(30_000, seed=7)
    bad = next(r for r in range(20_000, 25_000) if r not in set(init_sample_rows(30_000 - 4096, 0).tolist()))
    x[bad, 3] = float("nan")  # a training row that the initialisation sample does not read
    store = write_arrays(tmp_path / "nan", {"acts": x})
    config = synthetic_config(store, tmp_path / "run", checkpoint_every=2)
    trainer = Trainer(config, progress=False)
    saved = {}
    real_save = trainer.save_checkpoint

    def current_checkpoint():
        folder, _ = checkpoint.load(tmp_path / "run")
        return {p.name: p.read_bytes() for p in folder.iterdir()}

    def save_and_remember():
        real_save()
        saved.clear()
        saved.update(current_checkpoint())

    trainer.save_checkpoint = save_and_remember
    with pytest.raises(InputError, match=f"non-finite activation at acts, store row {bad}"):
        trainer.run()
    assert saved and current_checkpoint() == saved


def test_non_finite_rows_in_the_initialisation_sample_are_reported(tmp_path):
    x, _ = sparse_data(10_000, seed=8)
    x[:, 0] = float("inf")
    store = write_arrays(tmp_path / "inf", {"acts": x})
    with pytest.raises(InputError, match="non-finite activation at acts, store row 0"):
        Trainer(synthetic_config(store, tmp_path / "run"), progress=False)


def test_training_from_the_model_end_to_end(tmp_path):
    """Harvest + train + evaluate + export on a tiny model, through the same path as the CLI."""
    model = tiny_model("llama")
    corpus = tmp_path / "text.txt"
    rng = np.random.default_rng(0)
    corpus.write_text(" ".join(rng.choice(["red", "green", "blue", "sky", "sea", "stone", "light"], 40_000)))
    config = TrainConfig(model="tiny:llama", layer=1, site="resid_post", k="4,8", latents=128, tokens=20_480,
                         batch_size=1024, lr=1e-2, eval_tokens=4096, eval_contexts=4, corpus=str(corpus),
                         store=tmp_path / "store", out=tmp_path / "run", context_len=64)
    results = train(config, model=model, progress=False)
    assert set(results) == {"sae-topk-k4-128", "sae-topk-k8-128"}
    for name, metrics in results.items():
        assert metrics["l0"] == pytest.approx(float(name.split("-k")[1].split("-")[0]))
        assert 0 < metrics["fvu"] < 1 and np.isfinite(metrics["ce_spliced"]) and metrics["ce_tokens"] == 4 * 62
        assert (tmp_path / "run" / name / "saelens" / "cfg.json").exists()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["k"] == "4,8"


def test_fvu_inliers_leaves_out_massive_rows(tmp_path):
    x, _ = sparse_data(3000)
    x[::1000] *= 500.0  # three massive rows, as SmolLM2's first token after BOS
    store = write_arrays(tmp_path / "massive", {"acts": x})
    d = SparseDictionary(DictionaryConfig(d_in=32, n_latents=64, k=3, input_site="acts"), seed=0)
    metrics = reconstruction_metrics(d, store, (0, 3000), batch_size=1024)
    with torch.no_grad():
        y_hat = d(x)
    keep = torch.ones(3000, dtype=torch.bool)
    keep[::1000] = False
    direct = float((x[keep] - y_hat[keep]).pow(2).sum() / (x[keep] - x[keep].mean(0)).pow(2).sum())
    assert metrics["outlier_fraction"] == pytest.approx(3 / 3000)
    assert metrics["fvu_inliers"] == pytest.approx(direct, rel=1e-6)
    assert metrics["fvu"] != pytest.approx(direct, rel=1e-2)  # the massive rows dominate the plain FVU


def test_the_outlier_threshold_does_not_depend_on_the_batch_size(tmp_path):
    """The threshold comes from the first MEDIAN_ROWS rows, not from the first batch: a first batch
    of small rows would otherwise call most later rows massive."""
    x, _ = sparse_data(5000, seed=2)
    x[:300] *= 0.01  # a quiet start: the first 256-row batch's median norm is tiny
    x[1000::1500] *= 500.0  # three massive rows (1000, 2500, 4000)
    store = write_arrays(tmp_path / "quiet", {"acts": x})
    d = SparseDictionary(DictionaryConfig(d_in=32, n_latents=64, k=3, input_site="acts"), seed=0)
    small, large = (reconstruction_metrics(d, store, (0, 5000), batch_size=b) for b in (256, 4096))
    assert small["outlier_fraction"] == pytest.approx(3 / 5000) == large["outlier_fraction"]
    assert small["fvu_inliers"] == pytest.approx(large["fvu_inliers"], rel=1e-6)


def test_drop_outliers_leaves_massive_rows_out_of_training(tmp_path):
    x, _ = sparse_data(30_000, seed=5)
    massive = torch.zeros(30_000, dtype=torch.bool)
    massive[::500] = True  # 0.2% of rows, 300x the typical norm
    x[massive] *= 300.0
    store = write_arrays(tmp_path / "store", {"acts": x})
    kept = Trainer(synthetic_config(store, tmp_path / "drop", drop_outliers=10.0), progress=False)
    everything = Trainer(synthetic_config(store, tmp_path / "all"), progress=False)
    typical = float(x[~massive].norm(dim=1).median())
    assert 9.5 * typical < kept.max_norm < 10.5 * typical and everything.max_norm == float("inf")
    batch = {"acts": x[:2000]}
    assert torch.equal(kept._keep(batch)["acts"], x[:2000][~massive[:2000]])
    # input scaling comes from the kept rows: E||x||^2 = d over them, not over the massive ones
    d_kept = next(iter(kept.dictionaries.values()))
    d_all = next(iter(everything.dictionaries.values()))
    assert float(d_kept.input_scale) == pytest.approx((32 / x[~massive].pow(2).sum(1).mean()).sqrt().item(), rel=0.05)
    assert float(d_all.input_scale) < 0.2 * float(d_kept.input_scale)
    with_drop, without = next(iter(kept.run().values())), next(iter(everything.run().values()))
    assert with_drop["outlier_fraction"] == pytest.approx(without["outlier_fraction"]) and with_drop["outlier_fraction"] > 0
    assert with_drop["fvu_inliers"] < 0.95 * without["fvu_inliers"]  # capacity goes to the typical rows
    with pytest.raises(InputError, match="drop_outliers"):
        Trainer(synthetic_config(store, tmp_path / "bad", drop_outliers=-1.0), progress=False)
