"""CAFT: projection during training (checked with plain hooks), a hook-free saved model, LoRA,
the two-cue task, directions and bad input."""

from __future__ import annotations

import json

import pytest
import interp
import torch

from interp.errors import InputError
from interp.models import load_model, tiny_model
from interp.steering.caft import (
    FinetuneConfig, accuracy, check_directions, finetune, interpret_components, load_task, pca_directions,
    random_directions, save_model, select,
)
from interp.steering.lora import LoRALinear, add_lora, merge_lora

L = 1
SITE = f"blocks.{L}.hook_resid_post"


@pytest.fixture()
def task(tmp_path):
    """The built-in task with single-byte answers, which the tiny models' byte tokenizer has."""
    spec = json.loads(open(load_task().info["file"]).read())
    spec["answers"] = ["B", "A"]
    path = tmp_path / "bytes_task.json"
    path.write_text(json.dumps(spec))
    return load_task(path, n_train=32)


def count_hooks(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_task_pairs_the_cues_in_training_and_flips_them_out_of_distribution():
    task = load_task()
    spec = json.loads(open(task.info["file"]).read())
    topic_of = {s: t for t, splits in spec["subjects"].items() for part in splits.values() for s in part}
    mood_of = {p: m for m, splits in spec["predicates"].items() for part in splits.values() for p in part}

    def cues(sentence):
        subject = next(s for s in topic_of if sentence.startswith(s + " "))
        return topic_of[subject], mood_of[sentence[len(subject) + 1 : -1]]

    for text, label in task.train + task.test_id:
        topic, mood = cues(text)
        assert label == spec["labels"][topic] and spec["train_pairing"][topic] == mood
    for text, label in task.test_ood:
        topic, mood = cues(text)
        assert label == spec["labels"][topic] and spec["train_pairing"][topic] != mood
    assert not {t for t, _ in task.train} & {t for t, _ in task.test_id + task.test_ood}
    assert {y for _, y in task.test_ood} == {0, 1}
    # dev: training words, cues flipped; never a training or test sentence, the same for every seed
    train_words = {s for t in spec["subjects"].values() for s in t["train"]} | {p for m in spec["predicates"].values() for p in m["train"]}
    for text, label in task.dev_ood:
        topic, mood = cues(text)
        assert label == spec["labels"][topic] and spec["train_pairing"][topic] != mood
        assert {w for w in train_words if w in text} and not any(w in text for w in spec["subjects"][topic]["test"])
    assert len(task.dev_ood) == 128 and not {t for t, _ in task.dev_ood} & {t for t, _ in task.train + task.test_ood}
    assert load_task(seed=3).dev_ood == task.dev_ood


def test_lora_starts_as_the_base_model_and_merges_exactly():
    model = tiny_model("llama", n_layers=2)
    tokens = model.tokenize(["hello there"])
    with torch.no_grad():
        before = model(tokens)
    params = add_lora(model.module, ("q_proj", "down_proj"), rank=4, alpha=8)
    assert len(params) == 2 * 2 * 2 and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.module.named_parameters() if "lora" not in n)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), before)  # B starts at zero
        for p in params[1::2]:
            p.normal_()
        unmerged = model(tokens)
    assert not torch.allclose(unmerged, before)
    assert merge_lora(model.module) == 4
    assert not any(isinstance(m, LoRALinear) for m in model.module.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), unmerged, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="linear layers are"):
        add_lora(model.module, ("c_attn",))


def test_caft_projection_leaves_hooked_activations_orthogonal_during_training(task):
    model = tiny_model("llama", n_layers=3)
    directions = {SITE: torch.randn(3, model.cfg.d_model)}
    basis = torch.linalg.qr(directions[SITE].T).Q
    seen = []

    def capture(_module, args, kwargs):  # the input of the next block = this site after any edit
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((hidden.detach().clone(), torch.is_grad_enabled()))

    handle = model.module.model.layers[L + 1].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        hooks_before = count_hooks(model.module)
        log = finetune(model, task, FinetuneConfig(steps=3, batch_size=4), directions=directions, progress=False)
        assert count_hooks(model.module) == hooks_before  # CAFT's hooks are gone after training
        assert len(seen) == 3 and all(grad for _, grad in seen)  # captured in the training forward passes
        for act, _ in seen:
            assert (act @ basis).abs().max() < 1e-4 * act.abs().max()
            assert act.abs().max() > 0
        seen.clear()
        with torch.no_grad():
            model(model.tokenize(["abc def"]))
        assert (seen[0][0] @ basis).abs().max() > 1e-2  # after training nothing projects any more
    finally:
        handle.remove()
    assert log["directions"] == {SITE: 3} and len(log["losses"]) == 3


def test_caft_skip_first_leaves_the_first_position_unprojected(task):
    model = tiny_model("llama", n_layers=3)
    directions = {SITE: torch.randn(2, model.cfg.d_model)}
    basis = torch.linalg.qr(directions[SITE].T).Q
    seen = []
    handle = model.module.model.layers[L + 1].register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone()), with_kwargs=True)
    try:
        finetune(model, task, FinetuneConfig(steps=2, batch_size=4), directions=directions, skip_first=True, progress=False)
    finally:
        handle.remove()
    assert len(seen) == 2
    for act in seen:
        assert (act[:, 1:] @ basis).abs().max() < 1e-4 * act.abs().max()
        assert (act[:, 0] @ basis).norm(dim=-1).min() > 1e-3  # every first token keeps its component


def test_saved_model_forward_equals_a_fresh_load_without_hooks(task, tmp_path):
    model = tiny_model("llama", n_layers=3)
    directions = {SITE: torch.randn(2, model.cfg.d_model)}
    finetune(model, task, FinetuneConfig(steps=6, batch_size=8, lr=1e-2), directions=directions, progress=False)
    assert not any(isinstance(m, LoRALinear) for m in model.module.modules())
    save_model(model, tmp_path / "caft")
    fresh = load_model(tmp_path / "caft")
    tokens = model.tokenize(["Sentence: the rocket\nGroup:", "abc"], padding_side="right")
    with torch.no_grad():
        trained, loaded = model(tokens), fresh(tokens)
        with model.intervene(*[interp.ProjectOut(SITE, directions[SITE])]):
            hooked = model(tokens)
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hooked, trained, atol=1e-3)  # the projection would change the forward
    assert count_hooks(fresh.module) == 0
    base = tiny_model("llama", n_layers=3)
    with torch.no_grad():
        assert not torch.allclose(base(tokens), trained, atol=1e-4)  # fine-tuning changed the weights


def test_directions_of_the_wrong_width_are_refused_before_training(task):
    model = tiny_model("llama", n_layers=3)
    with pytest.raises(InputError, match=r"expected \[k, 64\]"):
        finetune(model, task, FinetuneConfig(steps=2), directions={SITE: torch.randn(2, 63)}, progress=False)
    assert not any(isinstance(m, LoRALinear) for m in model.module.modules())  # nothing was touched
    with pytest.raises(InputError, match="zero or not finite"):
        check_directions(model, {SITE: torch.zeros(1, 64)})
    with pytest.raises(Exception, match="hook_resid_postt"):
        check_directions(model, {"blocks.1.hook_resid_postt": torch.randn(64)})
    with pytest.raises(InputError, match="steps"):
        FinetuneConfig(steps=0).check()
    with pytest.raises(InputError, match="built-in tasks: sentiment_topic"):
        load_task("no_such_task")


def test_pca_directions_and_their_reading(task):
    base = tiny_model("llama", n_layers=3)
    tuned = tiny_model("llama", n_layers=3)
    shift = torch.zeros(base.cfg.d_model)
    shift[5] = 3.0
    texts = task.train_texts()[:12]
    # a planted difference: the tuned model's site varies along unit 5 by a token-dependent amount
    with tuned.intervene(interp.Apply(SITE, lambda a: a + a[..., :1] * shift)):
        comps = pca_directions(base, tuned, texts, [SITE], n_components=3)
    assert comps[SITE].shape == (3, base.cfg.d_model)
    assert abs(float(comps[SITE][0, 5])) > 0.99
    torch.testing.assert_close(comps[SITE] @ comps[SITE].T, torch.eye(3), atol=1e-5, rtol=0)
    table = interpret_components(base, comps, ["aaaa bbbb"] * 4, ["zzzz yyyy"] * 4)
    assert len(table) == 3 and set(table.columns) == {"site", "component", "effect_size"}
    planted = table.assign(effect_size=[2.0, 0.1, -1.5])
    assert torch.equal(select(comps, planted, min_effect=1.0)[SITE], comps[SITE][[0, 2]])
    assert torch.equal(select(comps, planted, top=1)[SITE], comps[SITE][[0]])
    assert select(comps, planted, min_effect=3.0) == {}
    kept = select(comps, planted, top=2)
    rand = random_directions(kept, seed=0)
    assert rand[SITE].shape == kept[SITE].shape


@pytest.mark.embedded
def test_answers_are_single_tokens_on_the_embedded_model(embedded):
    task = load_task(n_train=8)
    assert 0.0 <= accuracy(embedded, task.test_id[:4], task.answers) <= 1.0
