"""The training schedule: batch size, learning rate and warm-up chosen from the token budget and
the width, unless given explicitly. The rule (README, "Short budgets"):

- batch size: the power of two nearest to ``tokens / TARGET_STEPS``, within
  [``MIN_BATCH``, ``MAX_BATCH``]: a short budget gets more, smaller steps;
- learning rate: ``2e-4 / sqrt(latents / 16384)`` (the long-run rule, after OpenAI's TopK SAE
  scaling) times ``sqrt(LONG_RUN_STEPS / steps)`` when a run has fewer steps than
  ``LONG_RUN_STEPS``: fewer steps need larger ones; runs of ``LONG_RUN_STEPS`` or more (about
  115M tokens at batch 4096) keep the long-run rate; never above ``MAX_LR``, the largest rate of
  the development sweep (narrow dictionaries on few steps would otherwise get rates near 0.1 that
  nothing tested, and diverge);
- massive activations: where rows whose norm exceeds ``OUTLIER_FACTOR`` (10) x the median hold
  ``MASSIVE_SHARE`` or more of the variance of ``MASSIVE_SAMPLE_ROWS`` training rows (SmolLM2's
  first token after BOS from layer 11 on), the rate is multiplied by ``massive_lr_factor(steps)``
  (``MASSIVE_LR_FACTOR`` up to ``MASSIVE_REF_STEPS``, then falling as ``steps ** -MASSIVE_FALL``, so the
  rate falls as steps^-0.8), but not below the long-run rate: at the plain rule's rate the SAE fits those few rows,
  and so the plain FVU, badly (on development layer 15, a relative error of 0.25 on each of them
  against 0.04 at half the rate). Which rate near it suits a layer differs from layer to layer (at 2M,
  x 0.31 of the plain rate at layers 11-13, 15 and 17, x 0.45-0.62 at 14 and 16; neither a longer decay
  nor a float32 encoder changed that), so that rate r and ``min(2r, plain rate)`` train in lockstep and
  the trainer keeps the one with the lower FVU on ``SELECTION_ROWS`` training rows;
- warm-up: ``steps / WARMUP_DIVISOR`` steps, at most ``MAX_WARMUP``.

``LONG_RUN_STEPS`` was chosen on a development layer (SmolLM2-135M layer 3, 8192 latents, k 32,
200k tokens = 195 steps): the held-out FVU fell from 0.133 at lr 2.8e-4 to 0.085 at 1.1e-3 and
was flat from 2.3e-3 (0.080) to 4.5e-3 (0.078); 28,000 puts the rule at 3.4e-3 there, inside the
flat part. The square-root fall with the step count is assumed, not fitted (no development sweep
at other budgets on layers without massive activations); the test layers 6 and 12 check it against the
rule's own rate halved and doubled.
``MASSIVE_LR_FACTOR`` was chosen on development layer 15 (27 massive rows of 65,536 hold 85% of the
held-out variance) at 200k tokens, and confirmed on development layers 11 and 13 (x 0.5 beat x 0.35
and x 0.25 in mean FVU over five seeds at 200k, on all three). Its fall with the step count was chosen
on the same three layers over two seeds, by rules written down before the runs: first as 1/sqrt(steps)
(x 0.354 at 400k beat x 0.5 on all three), then, after fresh layer 14 showed that too fast at 2M, as
steps^-0.3: at 2M, x 0.316 had the smallest worst shortfall of x 0.223, x 0.316 and x 0.447 (README, "Short
budgets"); the long-run floor was kept on one 10M run of layer 13. All of it at 8192 latents and k 32.
Layers 12 and 14 tested earlier versions of the factor; layers 16 and 17 were kept for this one.
``MASSIVE_SHARE`` separates the development layers 3 (massive rows hold 8-10% of the tested rows'
variance over seeds 0-5, and the plain rate suited it) and 11, 13 and 15 (72-86%). The tested rows
are many because massive rows are rare: at layer 12 the 16,384-row initialisation sample of seed 4
holds none of the largest (3% of its variance), and so kept the plain rate, before the test read more.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from interp.dictionary.metrics import OUTLIER_FACTOR  # a row is massive above this many times the median norm
from interp.errors import InputError

TARGET_STEPS = 1000
MIN_BATCH, MAX_BATCH = 1024, 4096
LONG_RUN_STEPS = 28_000  # chosen on development layer 3 (README, "Short budgets")
WARMUP_DIVISOR = 20
MAX_WARMUP = 50
MAX_LR = 4.5e-3  # the top of the development sweep's flat part
MASSIVE_LR_FACTOR = 0.5  # up to MASSIVE_REF_STEPS; chosen on development layer 15 (README, "Short budgets")
MASSIVE_REF_STEPS = 195  # 200k tokens at batch 1024, where the factor was chosen; past it the factor falls
MASSIVE_FALL = 0.3  # ... as steps^-0.3 (the rate as steps^-0.8); chosen on development layers 11, 13 and 15 at 2M
MASSIVE_SHARE = 0.25  # massive rows matter when they hold this much of the variance (layer 3: 8-10%; 11, 13, 15: 72-86%)
MASSIVE_SAMPLE_ROWS = 2**17  # training rows the test reads: massive rows are about 3 in 10,000 (SmolLM2 layer 12)
SECOND_RATE_MIN_RATIO = 1.5  # a second candidate only where it is this much above r (not for a rate 1% higher)
SELECTION_ROWS = 2**16  # training rows on which the better of two candidate rates is chosen (about 20 massive rows at layer 12)


@dataclass
class Schedule:
    batch_size: int
    steps: int
    lr: float
    warmup_steps: int
    rule: dict[str, str]  # per setting: how it was chosen
    lr_candidates: list[float] = field(default_factory=list)  # rates trained in lockstep, the better kept; [lr] alone by default

    def __post_init__(self) -> None:
        self.lr_candidates = self.lr_candidates or [self.lr]

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        rates = " or ".join(f"{r:.3g}" for r in self.lr_candidates)
        return (f"batch {self.batch_size} x {self.steps} steps ({self.rule['batch_size']}), lr {rates} ({self.rule['lr']}), "
                f"warm-up {self.warmup_steps} steps ({self.rule['warmup_steps']})")


def long_run_lr(latents: int) -> float:
    return 2e-4 / math.sqrt(latents / 2**14)


def massive_lr_factor(steps: int) -> float:
    """The massive-activation factor on the rule's rate: ``MASSIVE_LR_FACTOR`` up to ``MASSIVE_REF_STEPS``
    steps, then falling as ``steps ** -MASSIVE_FALL``."""
    return MASSIVE_LR_FACTOR * min(1.0, MASSIVE_REF_STEPS / steps) ** MASSIVE_FALL


def massive_share(rows: torch.Tensor) -> float:
    """The share of the variance of ``rows`` [n, d] held by the rows above ``OUTLIER_FACTOR`` x the median norm."""
    return massive_share_in(lambda index: rows[torch.from_numpy(index)], np.arange(len(rows)))


def massive_share_in(read: Callable[[np.ndarray], torch.Tensor], rows: np.ndarray, chunk: int = 2**14) -> float:
    """The share of the centred variance of the rows ``read(rows)`` returns held by the rows above
    ``OUTLIER_FACTOR`` x their median norm, read ``chunk`` rows at a time: norms and sums first, then
    the massive rows alone again (few), so memory does not grow with the number of rows tested."""
    norms, total, squares = [], 0.0, 0.0
    for part in np.array_split(rows, max(1, -(-len(rows) // chunk))):
        x = read(part).double()
        norms.append(x.norm(dim=-1))
        total, squares = total + x.sum(0), squares + float(x.pow(2).sum())
    norms = torch.cat(norms)
    massive = (norms > OUTLIER_FACTOR * norms.median()).numpy()
    if not massive.any():
        return 0.0
    mean = total / len(norms)
    variance = squares - len(norms) * float(mean.pow(2).sum())  # sum of ||x - mean||^2
    return float((read(rows[massive]).double() - mean).pow(2).sum()) / variance


def resolve_schedule(tokens: int, latents: int, *, massive: bool = False, batch_size: int = 0, lr: float = 0.0,
                     warmup_steps: int = -1, two_rates: bool = True) -> Schedule:
    """The schedule for ``tokens`` training tokens and ``latents`` latents (``massive``: the
    training rows include massive activations: ``massive_share_in`` >= ``MASSIVE_SHARE``); explicit settings
    (``batch_size`` > 0, ``lr`` > 0, ``warmup_steps`` >= 0) override the rule. ``two_rates``: with massive
    activations, a second candidate rate may train beside the rule's (TopK and BatchTopK: their sparsity does
    not depend on the rate, so the FVU alone can choose)."""
    if batch_size < 0 or lr < 0 or warmup_steps < -1:
        raise InputError(f"batch_size={batch_size}, lr={lr}, warmup_steps={warmup_steps}: give positive values "
                         "(0 for batch_size and lr, -1 for warmup_steps: choose by the rule)")
    rule, candidates = {}, []
    if batch_size:
        rule["batch_size"] = "given"
    else:
        nearest = 2 ** round(math.log2(max(tokens / TARGET_STEPS, 1)))
        batch_size = min(MAX_BATCH, max(MIN_BATCH, nearest))
        rule["batch_size"] = f"rule: power of 2 nearest tokens/{TARGET_STEPS}, within {MIN_BATCH}..{MAX_BATCH}"
    steps = tokens // batch_size
    if steps < 1:
        raise InputError(f"tokens={tokens:,} is less than one batch of {batch_size}")
    if lr:
        rule["lr"] = "given"
    else:
        lr = min(MAX_LR, long_run_lr(latents) * math.sqrt(max(1.0, LONG_RUN_STEPS / steps)))
        rule["lr"] = f"rule: 2e-4/sqrt(latents/16384) x sqrt(max(1, {LONG_RUN_STEPS}/steps)), at most {MAX_LR:g}"
        if massive:  # never below the long-run rate: the factor was fitted on short runs (one 10M run below it did worse)
            factor, floor, plain = massive_lr_factor(steps), long_run_lr(latents), lr
            floored = lr * factor < floor
            lr = max(floor, lr * factor)
            # which of r and 2r suits a layer differs from layer to layer (README, "Short budgets"): train both
            second = min(2 * lr, plain)
            candidates = [lr, second] if two_rates and second >= SECOND_RATE_MIN_RATIO * lr else [lr]
            rule["lr"] += (f", x {MASSIVE_LR_FACTOR:g}*min(1, {MASSIVE_REF_STEPS}/steps)^{MASSIVE_FALL:g} = {factor:.3g} but not below "
                           f"the long-run rate{' (the long-run rate here)' if floored else ''} (massive activations: rows above "
                           f"{OUTLIER_FACTOR:g}x the median norm hold {MASSIVE_SHARE:.0%}+ of the variance)")
            if len(candidates) > 1:
                rule["lr"] += (f"; it and twice it (at most the plain rate: {second:.3g}) train in lockstep, the one with the "
                               f"lower FVU on {SELECTION_ROWS:,} training rows is kept")
    if warmup_steps >= 0:
        rule["warmup_steps"] = "given"
    else:
        warmup_steps = min(MAX_WARMUP, max(1, steps // WARMUP_DIVISOR))
        rule["warmup_steps"] = f"rule: steps/{WARMUP_DIVISOR}, at most {MAX_WARMUP}"
    return Schedule(batch_size=batch_size, steps=steps, lr=lr, warmup_steps=warmup_steps, rule=rule, lr_candidates=candidates)
