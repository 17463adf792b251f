"""The intervention mechanism: every operation, positions, heads, generation."""

from __future__ import annotations

import pytest
import torch

import interp
from interp.errors import InputError
from interp.models import tiny_model

SITE = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=2)


def resid(model, tokens, *interventions):
    return model.run_with_cache(tokens, SITE, interventions=interventions)[SITE]


def test_each_operation(model):
    tokens = model.tokenize(["abcdef", "ghijkl"])
    clean = resid(model, tokens)
    v = torch.randn(model.cfg.d_model)
    torch.testing.assert_close(resid(model, tokens, interp.Add(SITE, v, scale=2.0)), clean + 2 * v)
    assert torch.equal(resid(model, tokens, interp.Replace(SITE, 3.0)), torch.full_like(clean, 3.0))
    assert torch.equal(resid(model, tokens, interp.Ablate(SITE)), torch.zeros_like(clean))
    mean_ablated = resid(model, tokens, interp.Ablate(SITE, how="mean"))
    torch.testing.assert_close(mean_ablated[0, 0], clean.mean(dim=(0, 1)))
    clamped = resid(model, tokens, interp.Clamp(SITE, unit=[3, 5], value=7.0))
    assert (clamped[..., [3, 5]] == 7.0).all() and torch.equal(clamped[..., 4], clean[..., 4])
    d = torch.randn(2, model.cfg.d_model)
    projected = resid(model, tokens, interp.ProjectOut(SITE, d))
    assert projected.matmul(d.T).abs().max() < 1e-4
    doubled = resid(model, tokens, interp.Apply(SITE, lambda x: 2 * x))
    torch.testing.assert_close(doubled, 2 * clean)


def test_positions_and_heads(model):
    tokens = model.tokenize(["abcdef", "ghijkl"])
    clean = resid(model, tokens)
    edited = resid(model, tokens, interp.Replace(SITE, 0.0, positions=[1, -1]))
    assert (edited[:, [1, 5]] == 0).all() and torch.equal(edited[:, [0, 2, 3, 4]], clean[:, [0, 2, 3, 4]])
    sliced = resid(model, tokens, interp.Replace(SITE, 0.0, positions=slice(2, 4)))
    assert (sliced[:, 2:4] == 0).all() and torch.equal(sliced[:, :2], clean[:, :2])
    rows = torch.zeros(2, 6, dtype=torch.bool)
    rows[1, 0] = True
    masked = resid(model, tokens, interp.Replace(SITE, 0.0, positions=rows))
    assert (masked[1, 0] == 0).all() and torch.equal(masked[0], clean[0])
    z = "blocks.0.attn.hook_z"
    cache = model.run_with_cache(tokens, z, interventions=[interp.Ablate(z, heads=[1], positions=[2])])
    clean_z = model.run_with_cache(tokens, z)[z]
    assert (cache[z][:, 2, 1] == 0).all()
    assert torch.equal(cache[z][:, 2, 0], clean_z[:, 2, 0]) and torch.equal(cache[z][:, 3, 1], clean_z[:, 3, 1])


def test_identity_intervention_changes_nothing(model):
    tokens = model.tokenize("abcdefgh")
    clean = model(tokens)
    with model.intervene(*[interp.Apply(name, lambda x: x) for name in model.site_names()]):
        assert torch.equal(model(tokens), clean)


def test_interventions_are_removed_on_exit_and_on_error(model):
    tokens = model.tokenize("abc")
    clean = model(tokens)
    with pytest.raises(RuntimeError):
        with model.intervene(interp.Ablate(SITE)):
            raise RuntimeError
    assert torch.equal(model(tokens), clean)


def test_bad_interventions_fail_before_running(model):
    with pytest.raises(InputError, match="no head dimension"):
        with model.intervene(interp.Ablate(SITE, heads=[0])):
            pass
    with pytest.raises(interp.models.UnknownSiteError):
        with model.intervene(interp.Ablate("blocks.0.hook_resid_postt")):
            pass
    with pytest.raises(InputError, match="expected shape"):
        with model.intervene(interp.Apply(SITE, lambda x: x[:, :1])):
            model("abc")
    with pytest.raises(InputError, match="choose 'zero' or 'mean'"):
        interp.Ablate(SITE, how="median")


def test_generation_with_positions_uses_absolute_positions():
    model = tiny_model("llama", n_layers=2)
    tokens = model.tokenize("abcd")  # prompt positions 0-3; generated tokens sit at 4, 5, ...
    big = torch.full((model.cfg.d_model,), 50.0)

    def generate(*interventions):
        with model.intervene(*interventions), torch.no_grad():
            return model._generate_ids(tokens, 6, 0.0, 1.0)[0, 4:].tolist()

    plain = generate()
    assert len(plain) == 6 and plain == generate()  # greedy is deterministic
    passes = []
    generate(interp.Apply(SITE, lambda x: (passes.append(x.shape[1]), x)[1]))
    assert passes == [4, 1, 1, 1, 1, 1]  # the prompt, then one token per step through the KV cache
    # Position 5 is the second generated token, seen alone in the third pass: the edit there changes
    # the tokens after it and none before.
    edited = generate(interp.Add(SITE, big, positions=[5]))
    assert edited[:2] == plain[:2] and edited[2:] != plain[2:]
    # Position 100 is never reached: the edit runs on every pass and applies nowhere.
    calls = []
    zeroed = interp.Apply(SITE, lambda x: (calls.append(1), torch.zeros_like(x))[1], positions=[100])
    assert generate(zeroed) == plain and len(calls) == 6
    assert generate(interp.Apply(SITE, torch.zeros_like, positions=[-1])) != plain  # the same edit where it applies


def test_sampling_is_seeded():
    model = tiny_model("gpt2", n_layers=1)
    a = model.generate(["hello", "hi"], max_new_tokens=8, temperature=1.0, seed=3)
    b = model.generate(["hello", "hi"], max_new_tokens=8, temperature=1.0, seed=3)
    c = model.generate(["hello", "hi"], max_new_tokens=8, temperature=1.0, seed=4)
    assert a == b and a != c
