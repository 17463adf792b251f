"""Patching tasks: clean / corrupt prompt pairs, their answers, and a metric.

Every task holds prompts of one token length (patching compares positions across prompts), a
clean answer and a competing answer per prompt, and the per-prompt metric: the logit difference
(answer - competitor) at the last position. Scores are normalised so that the clean run scores 1
and the corrupt run 0.

Builders: ``ioi_task`` (two names, symmetric name swap), ``factual_task`` (subject swap), and
``pairs_task`` for your own prompts. Builders keep only prompts that tokenize to the task's
length and whose clean answer the model actually prefers, and report how many they kept.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from interp.errors import InputError
from interp.paths import resource_json
from interp.models.model import Tokens

if TYPE_CHECKING:
    from interp.models.model import Model

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (last-position logits [n, vocab], prompt ids [n]) -> [n]


@dataclass
class PatchingTask:
    name: str
    clean: Tokens
    corrupt: Tokens
    answer: torch.Tensor  # [n] token id the clean prompt should produce
    wrong: torch.Tensor  # [n] the competing token (the corrupt prompt's answer)
    clean_prompts: list[str]
    corrupt_prompts: list[str]
    metric_fn: Metric | None = None  # default: logit difference
    counts: dict[str, int] = field(default_factory=dict)  # how many candidates survived each filter
    clean_value: float = field(default=float("nan"))
    corrupt_value: float = field(default=float("nan"))

    def __len__(self) -> int:
        return int(self.clean.ids.shape[0])

    def metric(self, logits: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Per-row metric of last-position ``logits`` [rows, vocab] for prompts ``prompts`` [rows]."""
        if self.metric_fn is not None:
            values = self.metric_fn(logits, prompts)
            if not isinstance(values, torch.Tensor) or values.shape != (logits.shape[0],):
                shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
                raise InputError(f"the task metric must return one number per prompt (shape [{logits.shape[0]}]), got {shape}")
            return values
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, self.answer[prompts]] - logits[rows, self.wrong[prompts]]

    def normalise(self, value: torch.Tensor | float) -> torch.Tensor | float:
        """1 = the clean run's metric, 0 = the corrupt run's (NaN when the two runs agree)."""
        gap = self.clean_value - self.corrupt_value
        return (value - self.corrupt_value) / gap if gap != 0 else float("nan")

    def position_labels(self, model: Model) -> list[str]:
        """Tokens of the first clean prompt, with their positions (for heatmap axes)."""
        return [f"{i}:{model.to_string([int(t)])}" for i, t in enumerate(self.clean.ids[0])]

    def summary(self) -> str:
        counts = ", ".join(f"{v} {k}" for k, v in self.counts.items())
        return (f"{self.name}: {counts}; {self.clean.ids.shape[1]} tokens per prompt; "
                f"metric clean {self.clean_value:.3f}, corrupt {self.corrupt_value:.3f}")


def _single_token(model: Model, text: str) -> int | None:
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


SPLITS = ("original", "dev", "test")


def templates(task: str, split: str = "original") -> list[str]:
    """The prompt templates of a built-in task (``ioi`` or ``factual``) in one split.

    ``original``: the templates the RelP defaults were first chosen on; ``dev``: held-out templates
    rules and defaults may be chosen on; ``test``: held-out templates for reporting only.
    """
    files = {"ioi": "ioi.json", "factual": "facts.json"}
    if task not in files:
        raise InputError(f"task {task!r} has no templates; choose from {', '.join(files)}")
    if split not in SPLITS:
        raise InputError(f"split {split!r}: choose from {', '.join(SPLITS)}")
    data = resource_json(files[task])
    return data["templates"] if split == "original" else data[split]


def _template(task: str, split: str, template: int) -> str:
    chosen = templates(task, split)
    if not 0 <= template < len(chosen):
        raise InputError(f"template {template}: the {split} split of {task} has templates 0..{len(chosen) - 1}")
    return chosen[template]


def ioi_task(model: Model, n: int = 16, *, template: int = 0, split: str = "original", seed: int = 0,
             max_candidates: int = 400) -> PatchingTask:
    """Indirect-object identification: "When A and B went to the store, B gave a drink to" -> " A".

    The corrupt prompt swaps A and B everywhere, so its answer is B. One template per task, so
    every prompt has the same length; ``split`` picks the template list (see ``templates``).
    """
    pattern = _template("ioi", split, template)
    data = resource_json("ioi.json")
    names = [x for x in data["names"] if _single_token(model, " " + x) is not None]
    places = [x for x in data["places"] if _single_token(model, " " + x) is not None]
    objects = [x for x in data["objects"] if _single_token(model, " " + x) is not None]
    rng = random.Random(seed)
    rows = []
    for _ in range(max_candidates):
        a, b = rng.sample(names, 2)
        fill = {"PLACE": " " + rng.choice(places), "OBJECT": " " + rng.choice(objects)}
        clean = pattern.format(A=" " + a, B=" " + b, **fill)
        corrupt = pattern.format(A=" " + b, B=" " + a, **fill)
        rows.append((clean, corrupt, " " + a, " " + b))
    return _build(model, _task_name("ioi", split, template), rows, n)


def _task_name(task: str, split: str, template: int) -> str:
    return f"{task}[{template}]" if split == "original" else f"{task}[{split} {template}]"


def factual_task(model: Model, n: int = 16, *, template: int = 0, split: str = "original", seed: int = 0) -> PatchingTask:
    """Factual recall: "The Eiffel Tower is located in the city of" -> " Paris"; the corrupt prompt
    has another subject of the same token length (and another city). ``split`` picks the template
    list (see ``templates``)."""
    pattern = _template("factual", split, template)
    data = resource_json("facts.json")
    facts = [(s, c) for s, c in data["facts"] if _single_token(model, " " + c) is not None]
    length = {s: len(model.tokenizer(pattern.format(subject=s), add_special_tokens=False)["input_ids"]) for s, _ in facts}
    rng = random.Random(seed)
    rows = []
    for subject, city in facts:
        others = [(s, c) for s, c in facts if c != city and length[s] == length[subject]]
        if others:
            other, other_city = rng.choice(others)
            rows.append((pattern.format(subject=subject), pattern.format(subject=other), " " + city, " " + other_city))
    rng.shuffle(rows)
    return _build(model, _task_name("factual", split, template), rows, n)


def pairs_task(model: Model, clean: Sequence[str], corrupt: Sequence[str], answers: Sequence[str],
               wrong: Sequence[str], *, metric: Metric | None = None, name: str = "pairs") -> PatchingTask:
    """Your own prompt pairs. Every pair must tokenize to the same length (one length for all), and
    every answer must be a single token; ``metric`` replaces the logit difference if given."""
    return _with_baselines(model, _make_task(model, clean, corrupt, answers, wrong, metric=metric, name=name))


def _make_task(model: Model, clean: Sequence[str], corrupt: Sequence[str], answers: Sequence[str],
               wrong: Sequence[str], *, metric: Metric | None = None, name: str = "pairs") -> PatchingTask:
    if not (len(clean) == len(corrupt) == len(answers) == len(wrong)) or not clean:
        raise InputError("pairs_task needs equally many (and at least one) clean prompts, corrupt prompts, answers and wrong answers")
    for i, (a, w) in enumerate(zip(answers, wrong, strict=True)):
        for text in (a, w):
            if _single_token(model, text) is None:
                raise InputError(f"pair {i}: answer {text!r} is not a single token")
    clean_tokens = [model.tokenize(t).ids[0] for t in clean]
    corrupt_tokens = [model.tokenize(t).ids[0] for t in corrupt]
    for i, (c, k) in enumerate(zip(clean_tokens, corrupt_tokens, strict=True)):
        if len(c) != len(k):
            raise InputError(f"pair {i}: the clean prompt has {len(c)} tokens and the corrupt prompt {len(k)} "
                             f"({clean[i]!r} vs {corrupt[i]!r}); patching needs aligned tokens")
        if len(c) != len(clean_tokens[0]):
            raise InputError(f"pair {i} has {len(c)} tokens but pair 0 has {len(clean_tokens[0])}; use prompts of one length")
    task = PatchingTask(
        name=name, clean=Tokens(torch.stack(clean_tokens)), corrupt=Tokens(torch.stack(corrupt_tokens)),
        answer=torch.tensor([_single_token(model, a) for a in answers]), wrong=torch.tensor([_single_token(model, w) for w in wrong]),
        clean_prompts=list(clean), corrupt_prompts=list(corrupt), metric_fn=metric, counts={"pairs": len(clean)},
    )
    return task


def _build(model: Model, name: str, rows: list[tuple[str, str, str, str]], n: int) -> PatchingTask:
    """Keep aligned pairs whose clean answer the model prefers, up to ``n``."""
    unique = list(dict.fromkeys(rows))
    aligned = []
    length = None
    for clean, corrupt, answer, wrong in unique:
        c, k = model.tokenize(clean).ids[0], model.tokenize(corrupt).ids[0]
        if len(c) != len(k) or _single_token(model, answer) is None or _single_token(model, wrong) is None:
            continue
        length = length or len(c)
        if len(c) == length:
            aligned.append((clean, corrupt, answer, wrong))
    if not aligned:
        raise InputError(f"{name}: no candidate pair tokenizes into aligned prompts for {model.cfg.name}")
    task = _make_task(model, *zip(*aligned), name=name)
    with torch.no_grad():
        margin = torch.cat([task.metric(model(Tokens(ids))[:, -1], rows)
                            for ids, rows in zip(task.clean.ids.split(64), torch.arange(len(task)).split(64), strict=True)])
    preferred = torch.nonzero(margin > 0).squeeze(1)
    if preferred.numel() == 0:
        raise InputError(f"{name}: {model.cfg.name} prefers the clean answer on none of {len(aligned)} aligned pairs")
    picked = [aligned[i] for i in preferred[:n].tolist()]
    task = pairs_task(model, *zip(*picked), name=name)
    task.counts = {"candidates": len(unique), "aligned": len(aligned), "preferred by the model": int(preferred.numel()), "used": len(picked)}
    return task


def _with_baselines(model: Model, task: PatchingTask) -> PatchingTask:
    prompts = torch.arange(len(task))
    with torch.no_grad():
        task.clean_value = float(task.metric(model(task.clean)[:, -1], prompts).mean())
        task.corrupt_value = float(task.metric(model(task.corrupt)[:, -1], prompts).mean())
    return task


TASKS = {"ioi": ioi_task, "factual": factual_task}
