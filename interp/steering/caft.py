"""CAFT (Casademunt et al. 2025): fine-tuning with concept directions projected out of the residual
stream during training only, to steer which features a fine-tuned model learns to use.

    task = load_task("sentiment_topic")
    tuned = load_model(copy.deepcopy(base.module), tokenizer=base.tokenizer)
    finetune(tuned, task, FinetuneConfig(seed=0))                 # plain fine-tuning (LoRA, merged after)
    comps = pca_directions(base, tuned, task.train_texts(), sites)
    keep = select(comps, interpret_components(base, comps, positive_texts, negative_texts), top=4)
    finetune(fresh, task, FinetuneConfig(seed=0), directions=keep)  # CAFT, on another copy of base

Directions: principal components of the activation differences between a plainly fine-tuned and
the base model (``pca_directions``; the paper's authors then read the components and keep those
of the unintended concept: ``interpret_components`` does that reading automatically, by how well
each component's projection separates texts of the unintended concept), decoder rows of chosen
SAE latents (``sae_directions``), or any given tensors. The control draws random directions of
the same count (``random_directions``). During training every direction set acts as a
``ProjectOut`` intervention at its site; the hooks are removed afterwards and the LoRA weights are
merged, so the model (and what ``save_model`` writes) runs without any hook.

The task (``load_task``) is a two-cue classification: the model answers " A" or " B" after
``PROMPT``; training data pair the intended cue with a spurious one, the out-of-distribution test
set pairs them the other way round.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from interp.data.concepts import BUILTIN
from interp.errors import InputError
from interp.intervene import ProjectOut
from interp.steering.lineas import token_activations
from interp.steering.lora import add_lora, merge_lora

if TYPE_CHECKING:
    from interp.dictionary import SparseDictionary
    from interp.models.model import Model, Tokens

PROMPT = "Sentence: {text}\nGroup:"
ANSWERS = (" B", " A")  # label 0, label 1 (a task file may name others under "answers")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Directions = dict[str, torch.Tensor]  # site -> [k, d]


# ---------------------------------------------------------------- the task


@dataclass
class ClassificationTask:
    """Texts with 0/1 labels: ``train``, ``test_id`` (cues agree, new sentences), ``test_ood`` (cues conflict).

    ``dev_ood``: the training subjects and predicates with the cues conflicting (sentences never
    trained on), to choose settings by, so that the out-of-distribution test stays untouched.
    """

    name: str
    train: list[tuple[str, int]]
    test_id: list[tuple[str, int]]
    test_ood: list[tuple[str, int]]
    answers: tuple[str, str] = ANSWERS
    info: dict[str, Any] = field(default_factory=dict)
    dev_ood: list[tuple[str, int]] = field(default_factory=list)

    def train_texts(self) -> list[str]:
        return [PROMPT.format(text=t) for t, _ in self.train]


def load_task(spec: str | Path = "sentiment_topic", *, n_train: int = 256, seed: int = 0) -> ClassificationTask:
    """A two-cue task from a fragment file (``data/tasks/<name>.json`` or a path); see its description."""
    path = Path(spec) if Path(spec).suffix == ".json" else BUILTIN / "tasks" / f"{spec}.json"
    if not path.is_file():
        names = sorted(p.stem for p in (BUILTIN / "tasks").glob("*.json"))
        raise InputError(f"task {spec!r}: no such file; built-in tasks: {', '.join(names)}")
    spec_data = json.loads(path.read_text())
    subjects, predicates, labels = spec_data["subjects"], spec_data["predicates"], spec_data["labels"]
    pairing = spec_data["train_pairing"]  # intended value -> spurious value, in training
    flipped = dict(zip(pairing, reversed(list(pairing.values())), strict=True))
    topic_first = spec_data["intended"] == "topic"  # subjects carry the topic, predicates the sentiment

    def compose(split: str, pairs: Mapping[str, str]) -> list[tuple[str, int]]:
        out = []
        for intended, spurious in pairs.items():
            topic, sentiment = (intended, spurious) if topic_first else (spurious, intended)
            out += [(f"{s} {p}.", labels[intended]) for s in subjects[topic][split] for p in predicates[sentiment][split]]
        return out

    rng = random.Random(seed)
    train = compose("train", pairing)
    if n_train > len(train):
        raise InputError(f"n_train={n_train}: the task has {len(train)} training sentences")
    train = rng.sample(train, n_train)
    info = {"file": str(path), "intended": spec_data["intended"], "spurious": spec_data["spurious"],
            "train_pairing": pairing, "spurious_concept": spec_data.get("spurious_concept")}
    answers = tuple(spec_data.get("answers", ANSWERS))
    dev = compose("train", flipped)
    dev = random.Random(0).sample(dev, min(128, len(dev)))  # the same dev set for every seed
    return ClassificationTask(path.stem, train, compose("test", pairing), compose("test", flipped), answers, info, dev)  # type: ignore[arg-type]


def _answer_ids(model: Model, answers: Sequence[str]) -> list[int]:
    ids = [model.tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    if any(len(i) != 1 for i in ids) or ids[0] == ids[1]:
        raise InputError(f"the answers {tuple(answers)} must be two different single tokens in {model.cfg.name}'s tokenizer")
    return [i[0] for i in ids]


def answer_logits(model: Model, tokens: Tokens, answer_ids: Sequence[int]) -> torch.Tensor:
    """Logits [batch, 2] of the two answers at each row's last real token (right-padded ``tokens``)."""
    logits = model._logits(tokens)
    last = tokens.real().long().sum(1) - 1
    return logits[torch.arange(logits.shape[0], device=logits.device), last][:, list(answer_ids)].float()


def accuracy(model: Model, examples: Sequence[tuple[str, int]], answers: Sequence[str] = ANSWERS, *, batch_size: int = 32) -> float:
    """Share of ``examples`` where the model prefers the right answer (no intervention of its own)."""
    ids = _answer_ids(model, answers)
    right = 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            tokens = model.tokenize([PROMPT.format(text=t) for t, _ in chunk], padding_side="right")
            pred = answer_logits(model, tokens, ids).argmax(1).cpu()
            right += int((pred == torch.tensor([y for _, y in chunk])).sum())
    return right / len(examples)


# ---------------------------------------------------------------- fine-tuning


@dataclass
class FinetuneConfig:
    steps: int = 24
    batch_size: int = 16
    lr: float = 1e-3
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS
    seed: int = 0

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise InputError(f"steps ({self.steps}) and batch_size ({self.batch_size}) must be >= 1 and lr ({self.lr}) > 0")


def check_directions(model: Model, directions: Mapping[str, torch.Tensor] | None) -> Directions:
    """Validated ``site -> [k, d]`` float tensors (a [d] vector becomes [1, d])."""
    out: Directions = {}
    for site, value in (directions or {}).items():
        name = model.site_table.check(site)
        width = model.site_table.info(name).shape[-1]
        dirs = torch.as_tensor(value, dtype=torch.float32)
        dirs = dirs.reshape(-1, dirs.shape[-1]) if dirs.ndim else dirs
        if dirs.ndim != 2 or dirs.shape[1] != width or dirs.shape[0] == 0:
            raise InputError(f"directions at {name}: shape {tuple(torch.as_tensor(value).shape)}, expected [k, {width}] "
                             f"(k directions of the site's width {width})")
        if not torch.isfinite(dirs).all() or (dirs.norm(dim=1) == 0).any():
            raise InputError(f"directions at {name}: a direction is zero or not finite")
        out[name] = dirs
    return out


def finetune(model: Model, task: ClassificationTask, config: FinetuneConfig | None = None, *,
             directions: Mapping[str, torch.Tensor] | None = None, skip_first: bool = False, progress: bool = True) -> dict[str, Any]:
    """LoRA fine-tuning of ``model`` on ``task.train`` (in place; LoRA merged at the end).

    With ``directions`` (CAFT), each set is projected out of its site's activation in every
    training forward pass (``skip_first``: at every position but each sentence's first, where
    SmolLM2 keeps its attention sink); the hooks exist only inside this call.
    """
    config = config or FinetuneConfig()
    config.check()
    dirs = check_directions(model, directions)
    ids = _answer_ids(model, task.answers)
    torch.manual_seed(config.seed)  # the LoRA A matrices
    params = add_lora(model.module, config.targets, config.rank, config.alpha)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    rng = random.Random(config.seed)
    losses = []
    start = time.perf_counter()
    try:
        where = slice(1, None) if skip_first else None  # prompts are right-padded: position 0 is every row's first token
        with model.intervene(*[ProjectOut(site, d, positions=where) for site, d in dirs.items()]):
            for _ in tqdm(range(config.steps), desc="fine-tuning" + (" (CAFT)" if dirs else ""), disable=not progress):
                batch = rng.sample(task.train, min(config.batch_size, len(task.train)))
                losses.append(train_step(model, batch, optimizer, ids))
    finally:
        merge_lora(model.module)
        model.module.eval()
    return {"losses": losses, "seconds": time.perf_counter() - start, "directions": {s: d.shape[0] for s, d in dirs.items()}}


def train_step(model: Model, batch: Sequence[tuple[str, int]], optimizer: torch.optim.Optimizer, answer_ids: Sequence[int]) -> float:
    """One optimiser step of cross-entropy over the two answers (interventions active in ``model.intervene`` apply)."""
    tokens = model.tokenize([PROMPT.format(text=t) for t, _ in batch], padding_side="right")
    labels = torch.tensor([y for _, y in batch], device=tokens.ids.device)
    loss = torch.nn.functional.cross_entropy(answer_logits(model, tokens, answer_ids), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def save_model(model: Model, out: str | Path) -> Path:
    """Write the (merged, hook-free) model as a HF folder that ``load_model`` reads."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.module.save_pretrained(out)
    model.tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------- directions


def pca_directions(base: Model, tuned: Model, texts: Sequence[str], sites: Sequence[str], *, n_components: int = 8) -> Directions:
    """Per site, the top ``n_components`` principal components of (tuned - base) activations over the tokens of ``texts``."""
    out: Directions = {}
    a, b = token_activations(base, texts, sites), token_activations(tuned, texts, sites)
    for site in sites:
        diff = (b[site] - a[site]).double()
        diff = diff - diff.mean(0)
        _, _, vh = torch.linalg.svd(diff, full_matrices=False)
        out[site] = vh[:n_components].float()
    return out


def interpret_components(model: Model, directions: Directions, texts_a: Sequence[str], texts_b: Sequence[str]) -> pd.DataFrame:
    """How well each direction separates two sets of texts (the unintended concept's two sides).

    Each text's activation is its mean over tokens (first token left out, as in ``interp.probes``);
    the score is the effect size of its projection on the direction: the difference of the two
    sets' means over their pooled standard deviation. One row per (site, component).
    """
    from interp.probes import concept_activations

    sites = list(directions)
    acts_a = concept_activations(model, list(texts_a), sites, reduce="mean")
    acts_b = concept_activations(model, list(texts_b), sites, reduce="mean")
    rows = []
    for site, dirs in directions.items():
        pa, pb = acts_a[site] @ dirs.T, acts_b[site] @ dirs.T
        effect = (pa.mean(0) - pb.mean(0)) / ((pa.var(0) + pb.var(0)) / 2).sqrt().clamp_min(1e-8)
        rows += [{"site": site, "component": i, "effect_size": float(e)} for i, e in enumerate(effect)]
    return pd.DataFrame(rows)


def select(directions: Directions, table: pd.DataFrame, *, top: int | None = None, min_effect: float = 0.0) -> Directions:
    """The components of ``table`` (from ``interpret_components``) with |effect size| >= ``min_effect``,
    the ``top`` largest of them over all sites (all when ``top`` is None)."""
    rows = table[table["effect_size"].abs() >= min_effect]
    rows = rows.reindex(rows["effect_size"].abs().sort_values(ascending=False).index)
    rows = rows if top is None else rows.head(top)
    out: Directions = {}
    for site, dirs in directions.items():
        chosen = sorted(rows[rows["site"] == site]["component"].tolist())
        if chosen:
            out[site] = dirs[torch.tensor(chosen)]
    return out


def sae_directions(dictionary: SparseDictionary, latents: Sequence[int]) -> Directions:
    """Decoder rows of ``latents`` at the site the dictionary reads (an SAE) or writes (a transcoder)."""
    c = dictionary.config
    bad = [latent for latent in latents if not 0 <= latent < c.n_latents]
    if bad or not latents:
        raise InputError(f"latents {list(latents)}: give one or more in 0..{c.n_latents - 1}")
    site = c.output_site if c.is_transcoder else c.input_site
    return {site: dictionary.W_dec[list(latents)].detach().float().cpu()}


def random_directions(like: Directions, seed: int = 0) -> Directions:
    """Random directions, as many per site as ``like`` has (the CAFT control)."""
    gen = torch.Generator().manual_seed(seed)
    return {site: torch.randn(d.shape, generator=gen) for site, d in like.items()}


def save_directions(directions: Directions, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({site: d.contiguous() for site, d in directions.items()}, str(path))
    return path


def load_directions(path: str | Path) -> Directions:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such directions file (safetensors, one [k, d] tensor per site name)")
    return dict(load_file(str(path)))
