"""Generation with steering: vectors added (or directions projected out) through ``interp.intervene``.

    steer = steering(vector, 4.0, units="norm", mean_norm=norm, positions="all")
    out = generate(model, prompts, steer, max_new_tokens=40)                    # greedy
    out = generate(model, prompts, steer, temperature=0.8, top_p=0.95, seed=1)  # seeded sampling

Generation runs the model's own ``generate`` with the KV cache; the edit is one ``Add`` (or
``ProjectOut``) hook at the site, or for a LinEAS / AcT map (``AffineSteering``) one ``Affine``
hook per site. Positions: ``"all"`` (every token), ``"prompt"`` (the prompt's tokens only: their
edited keys and values then steer every later token through attention) or ``"generated"`` (the
new tokens only; the first new token, predicted from the prompt, is not affected). Prompts are
left-padded into batches, so positions count the padded prompt length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from tqdm.auto import tqdm

from interp.errors import InputError
from interp.intervene import Add, Affine, Intervention, ProjectOut
from interp.steering.vectors import SteeringVector, Units

if TYPE_CHECKING:
    from interp.models.model import Model

POSITIONS = ("all", "prompt", "generated")
Positions = Literal["all", "prompt", "generated"]


@dataclass
class Steering:
    """One edit for generation: add ``vector`` at ``site``, or (``mode="project-out"``) remove its direction."""

    site: str
    vector: torch.Tensor
    positions: Positions = "all"
    mode: Literal["add", "project-out"] = "add"

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise InputError(f"positions={self.positions!r}: choose one of {', '.join(POSITIONS)}")
        if self.mode not in ("add", "project-out"):
            raise InputError(f"mode={self.mode!r}: choose add or project-out")

    def interventions(self, prompt_len: int) -> list[Intervention]:
        """The intervention for prompts left-padded to ``prompt_len`` tokens."""
        where = _where(self.positions, prompt_len)
        if self.mode == "add":
            return [Add(self.site, self.vector, positions=where)]
        return [ProjectOut(self.site, self.vector, positions=where)]


@dataclass
class AffineSteering:
    """One per-unit affine map ``x -> weight * x + bias`` at ``site`` (LinEAS / AcT, see ``interp.steering.lineas``)."""

    site: str
    weight: torch.Tensor
    bias: torch.Tensor
    positions: Positions = "all"

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise InputError(f"positions={self.positions!r}: choose one of {', '.join(POSITIONS)}")

    def interventions(self, prompt_len: int) -> list[Intervention]:
        return [Affine(self.site, self.weight, self.bias, positions=_where(self.positions, prompt_len))]


Edit = Steering | AffineSteering


def _where(positions: Positions, prompt_len: int) -> slice | None:
    return {"all": None, "prompt": slice(0, prompt_len), "generated": slice(prompt_len, None)}[positions]


def steering(vector: SteeringVector, strength: float, *, units: Units = "norm", mean_norm: float | None = None,
             positions: Positions = "all") -> Steering:
    """Add ``vector`` at ``strength`` (see ``SteeringVector.scaled``)."""
    return Steering(vector.site, vector.scaled(strength, units, mean_norm), positions)


def ablation(vector: SteeringVector, *, positions: Positions = "all") -> Steering:
    """Project ``vector``'s direction out of the site's activation."""
    return Steering(vector.site, vector.direction, positions, mode="project-out")


@dataclass
class Generations:
    """Prompts and their continuations; ``new_ids`` end at (and include) the end-of-sequence token."""

    prompts: list[str]
    texts: list[str]
    prompt_ids: list[list[int]]
    new_ids: list[list[int]]


def generate(model: Model, prompts: Sequence[str], steer: Edit | Sequence[Edit] = (), *,
             max_new_tokens: int = 40, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             batch_size: int = 32, progress: bool = False) -> Generations:
    """Continue ``prompts`` with the steering edits active (greedy when ``temperature == 0``).

    Batches of ``batch_size`` prompts; batch ``i`` samples with seed ``seed + i``, so sampled
    outputs repeat exactly for the same prompts, batch size and seed.
    """
    edits = [steer] if isinstance(steer, Steering | AffineSteering) else list(steer)
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise InputError("no prompts to generate from")
    if max_new_tokens < 1 or batch_size < 1:
        raise InputError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be at least 1")
    for edit in edits:  # an unknown site fails here, before any generation
        model.site_table.check(edit.site)
    eos = getattr(model.tokenizer, "eos_token_id", None)
    out = Generations([], [], [], [])
    starts = range(0, len(prompts), batch_size)
    for batch, start in enumerate(tqdm(starts, desc="generating", disable=not progress, leave=False)):
        chunk = list(prompts[start : start + batch_size])
        tokens = model.tokenize(chunk, padding_side="left")
        interventions = [iv for edit in edits for iv in edit.interventions(tokens.ids.shape[1])]
        _, new = model.generate_tokens(tokens, max_new_tokens, temperature=temperature, top_p=top_p,
                                       seed=seed + batch, interventions=interventions)
        real = tokens.real().cpu()
        for row in range(len(chunk)):
            ids = new[row].tolist()
            if eos is not None and eos in ids:
                ids = ids[: ids.index(eos) + 1]
            out.prompts.append(chunk[row])
            out.prompt_ids.append(tokens.ids[row].cpu()[real[row]].tolist())
            out.new_ids.append(ids)
            out.texts.append(model.tokenizer.decode(ids, skip_special_tokens=True))
    return out
