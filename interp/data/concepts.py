"""Concept files (labelled or contrastive texts) and prompt lists for probes and steering.

A concept file is JSONL, one object per line, in one of two forms (not mixed in one file):

- labelled texts: ``{"text": "I loved it.", "label": 1}`` with ``label`` 1 / 0 (or true /
  false): 1 = the concept is present (e.g. positive sentiment, on topic), 0 = it is absent;
- contrastive pairs: ``{"positive": "Love", "negative": "Hate"}`` (ActAdd-style prompt pairs).

Either form may carry ``"split": "train"`` or ``"test"`` on every line to fix the held-out split;
without it, ``Concept.split`` draws a seeded stratified one. Blank lines and lines starting with
``#`` are skipped. A ``<name>.words.txt`` beside ``<name>.jsonl`` lists the words that mark the
concept in generated text (one per line, ``*`` at the end matches any ending), read by
``interp.steering.LexiconScorer``.

Prompt files are ``.txt`` (one prompt per line) or ``.jsonl`` (``{"prompt": ...}``).

Built-in names (``sentiment``, ``sentiment_pairs``, ``wedding``, ``space``, ``war``; prompts
``neutral_dev``, ``neutral_test``) are files in ``data/concepts/`` and
``data/prompts/``, shipped as package data so every install has them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from interp.errors import InputError
from interp.paths import resource_dir

BUILTIN = resource_dir()  # data/concepts/ and data/prompts/, installed as package data
MIN_PER_CLASS = 4  # difference-in-means and steering need a few examples of each class
SPLITS = ("train", "test")


@dataclass
class Concept:
    """Texts with labels (1 = concept present). For contrastive pairs, ``texts`` holds every
    positive then every negative text, ``labels`` 1s then 0s, and ``pairs`` the pairs."""

    name: str
    texts: list[str]
    labels: list[int]
    splits: list[str] | None = None  # "train" / "test" per text, when the file fixes them
    pairs: list[tuple[str, str]] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise InputError(f"concept {self.name!r}: {len(self.texts)} texts but {len(self.labels)} labels")

    @property
    def positives(self) -> list[str]:
        return [t for t, y in zip(self.texts, self.labels, strict=True) if y == 1]

    @property
    def negatives(self) -> list[str]:
        return [t for t, y in zip(self.texts, self.labels, strict=True) if y == 0]

    def counts(self) -> tuple[int, int]:
        """(positives, negatives)."""
        n_pos = sum(self.labels)
        return n_pos, len(self.labels) - n_pos

    def check(self, minimum: int | None = None, purpose: str = "a steering vector") -> None:
        """Refuse concepts with fewer than ``minimum`` texts in either class (default: one
        contrastive pair, as in ActAdd, or ``MIN_PER_CLASS`` labelled texts)."""
        if minimum is None:
            minimum = 1 if self.pairs is not None else MIN_PER_CLASS
        n_pos, n_neg = self.counts()
        if min(n_pos, n_neg) < minimum:
            raise InputError(
                f"concept {self.name!r} ({self.source or 'in memory'}) has {n_pos} positive and {n_neg} negative "
                f"examples; {purpose} needs at least {minimum} of each"
            )

    def split(self, test_fraction: float = 0.25, seed: int = 0) -> tuple[list[int], list[int]]:
        """Indices of (train, test) texts: the file's own split if it has one, else seeded and
        stratified (``test_fraction`` of each class held out, at least one of each)."""
        if self.splits is not None:
            train = [i for i, s in enumerate(self.splits) if s == "train"]
            test = [i for i, s in enumerate(self.splits) if s == "test"]
            return train, test
        if not 0 < test_fraction < 1:
            raise InputError(f"test_fraction={test_fraction}: choose a value strictly between 0 and 1")
        rng = random.Random(seed)
        train, test = [], []
        for label in (1, 0):
            members = [i for i, y in enumerate(self.labels) if y == label]
            rng.shuffle(members)
            n_test = max(1, round(test_fraction * len(members)))
            test += members[:n_test]
            train += members[n_test:]
        return sorted(train), sorted(test)

    def subset(self, indices: list[int]) -> Concept:
        return Concept(self.name, [self.texts[i] for i in indices], [self.labels[i] for i in indices],
                       None if self.splits is None else [self.splits[i] for i in indices], None, self.source)

    def __repr__(self) -> str:
        n_pos, n_neg = self.counts()
        kind = f"{len(self.pairs)} pairs" if self.pairs is not None else f"{n_pos} positive, {n_neg} negative"
        return f"Concept({self.name!r}, {kind})"


def data_file(kind: str, spec: str | Path, suffixes: tuple[str, ...]) -> Path:
    """A path as given, or a built-in name looked up in ``interp/data/<kind>/``."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    for suffix in suffixes:
        candidate = BUILTIN / kind / f"{spec}{suffix}"
        if candidate.is_file():
            return candidate
    builtin = sorted({p.name.split(".")[0] for p in (BUILTIN / kind).glob("*") if p.suffix in suffixes}) if (BUILTIN / kind).is_dir() else []
    raise InputError(f"{spec!r} is neither a file nor a built-in {kind[:-1]} (built-in: {', '.join(builtin) or 'none found'})")


def load_concept(spec: str | Path) -> Concept:
    """Read a concept file (see the module docstring); errors name the line that is wrong."""
    path = data_file("concepts", spec, (".jsonl",))
    texts: list[str] = []
    labels: list[int] = []
    splits: list[str | None] = []
    pairs: list[tuple[str, str]] = []
    pair_splits: list[str | None] = []
    form = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected an object like {{\"text\": ..., \"label\": 1}} or {{\"positive\": ..., \"negative\": ...}}")
        kind = "pairs" if "positive" in row or "negative" in row else "labelled" if "text" in row or "label" in row else None
        if kind is None:
            raise InputError(f"{where}: needs the keys text + label, or positive + negative (found {', '.join(row) or 'none'})")
        if form is not None and kind != form:
            raise InputError(f"{where}: a {kind} line in a file of {form} lines; use one form per file")
        form = kind
        split = row.get("split")
        if split is not None and split not in SPLITS:
            raise InputError(f"{where}: split {split!r}: choose one of {', '.join(SPLITS)}")
        if kind == "labelled":
            texts.append(_text(row, "text", where))
            labels.append(_label(row.get("label", None), where))
            splits.append(split)
        else:
            pairs.append((_text(row, "positive", where), _text(row, "negative", where)))
            pair_splits.append(split)
    if form is None:
        raise InputError(f"{path} holds no examples")
    if form == "pairs":
        texts = [p for p, _ in pairs] + [n for _, n in pairs]
        labels = [1] * len(pairs) + [0] * len(pairs)
        splits = pair_splits + pair_splits
    fixed = [s for s in splits if s is not None]
    if fixed and len(fixed) != len(splits):
        raise InputError(f"{path}: some lines have a split and some do not; give it on every line or none")
    return Concept(path.stem, texts, labels, splits if fixed else None, pairs if form == "pairs" else None, str(path))


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: {key!r} must be a non-empty string")
    return value


def _label(value: object, where: str) -> int:
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return int(value)
    raise InputError(f"{where}: label {value!r}: use 1 (concept present) or 0 (absent), or true / false")


def load_prompts(spec: str | Path) -> list[str]:
    """Prompts from a ``.txt`` file (one per line) or ``.jsonl`` (``{"prompt": ...}``), or a built-in name."""
    path = data_file("prompts", spec, (".txt", ".jsonl"))
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise InputError(f"{path}, line {number}: expected {{\"prompt\": \"...\"}}")
            prompts.append(row["prompt"])
        else:
            prompts.append(line.rstrip("\n"))
    if not prompts:
        raise InputError(f"{path} holds no prompts")
    return prompts


def concept_words(concept: Concept | str | Path) -> Path | None:
    """The ``<name>.words.txt`` beside a concept file, if there is one."""
    source = concept.source if isinstance(concept, Concept) else str(data_file("concepts", concept, (".jsonl",)))
    if not source:
        return None
    path = Path(source)
    words = path.with_name(f"{path.stem}.words.txt")
    return words if words.is_file() else None
