"""How far steering moved the generations, and what it cost in fluency.

- concept scores per text: ``VaderScorer`` (VADER's compound sentiment, -1 .. 1, from the
  ``vaderSentiment`` package) and ``LexiconScorer`` (topic words per 100 words, word lists in
  ``data/concepts/<name>.words.txt``); ``make_scorer`` picks one from a spec;
- fluency: ``continuation_nll`` scores each continuation under the model with no intervention
  active; ``perplexity`` pools it over continuations (exp of the mean NLL per token);
- repetition: ``distinct_n`` (distinct word n-grams / all n-grams): steering that breaks a model
  often shows up as loops, which a perplexity under the same model can even reward.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from interp.data.concepts import Concept, concept_words
from interp.errors import InputError, MissingPackageError

if TYPE_CHECKING:
    from interp.models.model import Model
    from interp.steering.generation import Generations

SCORERS = ("auto", "vader", "lexicon:PATH", "none")
_WORD = re.compile(r"[a-z']+")


class Scorer(Protocol):
    name: str
    description: str

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


class VaderScorer:
    """VADER compound sentiment of each text: -1 (most negative) .. 1 (most positive)."""

    name = "vader"
    description = "VADER compound sentiment (-1 .. 1)"

    def __init__(self) -> None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise MissingPackageError("VADER scoring needs the vaderSentiment package: pip install vaderSentiment") from None
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([self._analyzer.polarity_scores(t)["compound"] for t in texts], dtype=np.float64)


class LexiconScorer:
    """Concept words per 100 words of each text (0 for a text with no words).

    ``words``: lower-case words or phrases; a trailing ``*`` matches any ending (``marri*``).
    """

    def __init__(self, words: Sequence[str], name: str = "lexicon"):
        entries = [w.strip().lower() for w in words if w.strip() and not w.lstrip().startswith("#")]
        if not entries:
            raise InputError(f"the {name} word list is empty")
        parts = [re.escape(w[:-1]) + r"[a-z']*" if w.endswith("*") else re.escape(w) for w in entries]
        self._pattern = re.compile(r"\b(?:" + "|".join(sorted(parts, key=len, reverse=True)) + r")\b")
        self.name = name
        self.description = f"{name} words per 100 words"
        self.words = entries

    @classmethod
    def from_file(cls, path: str | Path) -> LexiconScorer:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such word list")
        return cls(path.read_text(encoding="utf-8").splitlines(), name=path.name.split(".")[0])

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        scores = []
        for text in texts:
            lower = text.lower()
            n_words = len(_WORD.findall(lower))
            scores.append(100.0 * len(self._pattern.findall(lower)) / n_words if n_words else 0.0)
        return np.array(scores, dtype=np.float64)


def make_scorer(spec: str, concept: Concept | None = None) -> Scorer | None:
    """``vader``, ``lexicon:PATH``, ``none``, or ``auto``: the concept's ``<name>.words.txt`` if it has one, else VADER."""
    if spec == "none":
        return None
    if spec == "vader":
        return VaderScorer()
    if spec.startswith("lexicon:"):
        return LexiconScorer.from_file(spec.split(":", 1)[1])
    if spec == "auto":
        words = concept_words(concept) if concept is not None else None
        return LexiconScorer.from_file(words) if words is not None else VaderScorer()
    raise InputError(f"scorer {spec!r}: choose one of {', '.join(SCORERS)}")


def continuation_nll(model: Model, generations: Generations, *, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Summed next-token NLL (nats) of each continuation given its prompt, and its token count,
    under ``model`` as it is (call it outside any steering)."""
    sums, counts = [], []
    rows = list(zip(generations.prompt_ids, generations.new_ids, strict=True))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        tokens = model.tokenize([p + n for p, n in chunk], padding_side="right")
        with torch.no_grad():
            nll = model.loss(tokens, per_token=True).cpu()  # [batch, pos - 1]: NLL of token t + 1
        for row, (prompt, new) in enumerate(chunk):
            values = nll[row, len(prompt) - 1 : len(prompt) - 1 + len(new)]
            sums.append(float(values.sum()))
            counts.append(len(new))
    return np.array(sums), np.array(counts)


def perplexity(nll_sums: np.ndarray, counts: np.ndarray) -> float:
    """exp(total NLL / total tokens) over all continuations (NaN when there are no tokens)."""
    total = float(np.sum(counts))
    return math.exp(float(np.sum(nll_sums)) / total) if total else float("nan")


def distinct_n(text: str, n: int = 2) -> float:
    """Distinct word n-grams / all word n-grams of ``text`` (NaN when it has fewer than n words)."""
    words = _WORD.findall(text.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")
