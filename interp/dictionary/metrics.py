"""Dictionary metrics: reconstruction quality on held-out store rows, and the model's loss with the
dictionary spliced in at its site.

Definitions (all on held-out data; reported by every training run):
- ``l0``: mean number of active latents per token.
- ``mse``: mean over tokens and dimensions of (y - y_hat)^2, in the model's scale.
- ``fvu``: fraction of variance unexplained, sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 (the mean
  per dimension over the evaluation tokens); ``explained_variance`` = 1 - fvu.
- ``fvu_inliers``: the same without the rows whose norm exceeds 10x the median norm, and
  ``outlier_fraction``, the share of such rows. A few massive activations can hold most of the
  variance (SmolLM2's first token after BOS, about 0.03% of rows, has ~180x the median norm at
  layer 12), so a low ``fvu`` alone can flatter a dictionary.
- ``cosine``: mean over tokens of cos(y, y_hat).
- ``dense_1pct`` / ``dense_10pct``: fraction of latents firing on more than 1% / 10% of tokens.
- ``ce_clean`` / ``ce_spliced`` / ``ce_zero``: next-token cross-entropy (nats) of the model, of the
  model with the site replaced by the dictionary's output, and with the site zeroed.
- ``delta_lm_loss`` = ce_spliced - ce_clean.
- ``ce_recovered`` = (ce_zero - ce_spliced) / (ce_zero - ce_clean): 1 is perfect, 0 is no better
  than zero-ablating the site.
- ``kl``: mean KL(clean || spliced) of the next-token distributions, nats.
Splicing and ablation apply at the positions the dictionary was trained on (all but the BOS
position when the store left BOS out).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import interp
from interp.dictionary.sae import SparseDictionary
from interp.errors import InputError

if TYPE_CHECKING:
    from interp.models.model import Model
    from interp.store import ActivationStore


@torch.no_grad()
def reconstruction_metrics(
    dictionary: SparseDictionary, store: ActivationStore, rows: tuple[int, int], *, batch_size: int = 1024,
) -> dict[str, float]:
    """Reconstruction metrics over store rows ``rows = (start, stop)``.

    Besides the FVU over all rows, ``fvu_inliers`` leaves out rows whose norm exceeds
    ``OUTLIER_FACTOR`` x the median norm (of the first ``MEDIAN_ROWS`` rows): a handful of
    massive activations (e.g. SmolLM2's first token after BOS) can hold most of the variance and
    flatter the FVU.
    """
    c = dictionary.config
    in_site, out_site = c.input_site, c.output_site or c.input_site
    sites = [in_site] if out_site == in_site else [in_site, out_site]
    n = 0
    cos_sum = l0_sum = 0.0
    sums = {"all": _VarianceSums(), "inliers": _VarianceSums()}
    start, stop = rows
    if stop <= start:
        raise InputError(f"no rows to evaluate in {rows}")
    threshold = OUTLIER_FACTOR * float(store.read(out_site, slice(start, min(stop, start + MEDIAN_ROWS))).norm(dim=-1).median())
    fires = torch.zeros(c.n_latents, dtype=torch.long)
    dictionary.eval()
    for batch in store.batches(sites, batch_size, rows=rows):
        x, y = batch[in_site], batch[out_site]
        code = dictionary.encode(x)
        y_hat = dictionary.decode(code)
        norms = y.norm(dim=-1)
        sums["all"].add(y, y_hat)
        sums["inliers"].add(y[norms <= threshold], y_hat[norms <= threshold])
        cos_sum += float(torch.nn.functional.cosine_similarity(y, y_hat, dim=-1).sum())
        l0_sum += float(code.l0().sum())
        fires += code.fire_counts(c.n_latents)
        n += y.shape[0]
    frequency = fires.double() / n
    fvu = sums["all"].fvu()
    return {
        "eval_tokens": n,
        "l0": l0_sum / n,
        "mse": sums["all"].sq_err / (n * y.shape[1]),
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "fvu_inliers": sums["inliers"].fvu(),
        "outlier_fraction": 1 - sums["inliers"].n / n,
        "cosine": cos_sum / n,
        "dense_1pct": float((frequency > 0.01).double().mean()),
        "dense_10pct": float((frequency > 0.10).double().mean()),
    }


OUTLIER_FACTOR = 10.0
MEDIAN_ROWS = 4096  # rows whose median norm sets the outlier threshold (whatever the batch size)


@torch.no_grad()
def rows_fvu(dictionaries: list[SparseDictionary], store: ActivationStore, rows: np.ndarray, *,
             batch_size: int = 4096) -> list[float]:
    """The FVU of each of ``dictionaries`` (of the same sites) over the store rows ``rows`` (sorted
    indices), read once, ``batch_size`` at a time."""
    c = dictionaries[0].config
    in_site, out_site = c.input_site, c.output_site or c.input_site
    if any((d.config.input_site, d.config.output_site or d.config.input_site) != (in_site, out_site) for d in dictionaries):
        raise InputError("rows_fvu: the dictionaries read different sites")
    sums = [_VarianceSums() for _ in dictionaries]
    for d in dictionaries:
        d.eval()
    for start in range(0, len(rows), batch_size):
        part = rows[start:start + batch_size]
        x = store.read(in_site, part)
        y = x if out_site == in_site else store.read(out_site, part)
        for d, total in zip(dictionaries, sums):
            total.add(y, d.decode(d.encode(x)))
    return [total.fvu() for total in sums]


class _VarianceSums:
    """Running sums for FVU = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2, in float64."""

    def __init__(self) -> None:
        self.n, self.sq_err, self.y_sq, self.y_sum = 0, 0.0, 0.0, None

    def add(self, y: torch.Tensor, y_hat: torch.Tensor) -> None:
        y64 = y.double()
        self.n += y.shape[0]
        self.sq_err += float((y64 - y_hat.double()).pow(2).sum())
        self.y_sq += float(y64.pow(2).sum())
        self.y_sum = y64.sum(0) if self.y_sum is None else self.y_sum + y64.sum(0)

    def fvu(self) -> float:
        if not self.n:
            return float("nan")
        total_var = self.y_sq - float(self.y_sum.pow(2).sum()) / self.n
        return self.sq_err / total_var


@torch.no_grad()
def splice_metrics(
    model: Model, dictionary: SparseDictionary, tokens: torch.Tensor, *, first_position: int = 1,
    batch_size: int | None = None, logits_bytes: int = 32 * 2**20,
) -> dict[str, float]:
    """CE loss of ``model`` on ``tokens`` [contexts, pos]: clean, with the dictionary spliced, and zero-ablated.

    Contexts run ``batch_size`` at a time, by default as many as keep one logits tensor within
    ``logits_bytes`` (one SmolLM2 context of 128 tokens: its 49,152-token vocabulary makes the
    logits, not the model, the largest tensors here); each run's losses are summed before the
    next one starts, so at most two logits tensors exist at once.
    """
    c = dictionary.config
    out_site = c.output_site or c.input_site
    positions = slice(first_position, None)
    dictionary.eval()
    captured: dict[str, torch.Tensor] = {}

    def capture_input(act: torch.Tensor) -> torch.Tensor:
        captured["x"] = act
        return act

    def replace_output(act: torch.Tensor) -> torch.Tensor:
        source = captured["x"] if c.is_transcoder else act
        return dictionary(source.reshape(-1, source.shape[-1])).reshape(act.shape).to(act.dtype)

    spliced = [interp.Apply(out_site, replace_output, positions=positions)]
    if c.is_transcoder:
        spliced.insert(0, interp.Apply(c.input_site, capture_input))
    zero = [interp.Replace(out_site, 0.0, positions=positions)]
    if batch_size is None:
        per_context = tokens.shape[1] * model.cfg.d_vocab * 4
        batch_size = max(1, logits_bytes // per_context)
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0}
    count = 0
    for chunk in tokens.split(batch_size):
        ids = interp.Tokens(chunk.long().to(model.device))
        # Losses on next-token predictions from the first spliced position on.
        target = ids.ids[:, first_position + 1 :, None]

        def logprobs(logits: torch.Tensor) -> torch.Tensor:
            return logits[:, first_position:-1].float().log_softmax(-1)

        clean = logprobs(model.forward(ids))
        sums["clean"] -= float(clean.gather(-1, target).sum())
        with model.intervene(*spliced):
            edited = logprobs(model.forward(ids))
        sums["spliced"] -= float(edited.gather(-1, target).sum())
        edited.sub_(clean).neg_().mul_(clean.exp_())  # p_clean (log p_clean - log p_spliced), in place
        sums["kl"] += float(edited.sum())
        del clean, edited
        with model.intervene(*zero):
            sums["zero"] -= float(logprobs(model.forward(ids)).gather(-1, target).sum())
        count += target.numel()
    ce = {name: sums[name] / count for name in ("clean", "spliced", "zero")}
    return {
        "ce_tokens": count,
        "ce_clean": ce["clean"],
        "ce_spliced": ce["spliced"],
        "ce_zero": ce["zero"],
        "delta_lm_loss": ce["spliced"] - ce["clean"],
        "ce_recovered": (ce["zero"] - ce["spliced"]) / (ce["zero"] - ce["clean"]),
        "kl": sums["kl"] / count,
    }


def metrics_table(results: dict[str, dict[str, Any]]) -> str:
    """A fixed-width table: one column per dictionary, one row per metric."""
    names = list(results)
    keys = [k for k in results[names[0]] if isinstance(results[names[0]][k], (int, float))]
    width = max(14, *(len(n) for n in names))
    lines = [f"{'metric':22s}" + "".join(f"{n:>{width + 2}s}" for n in names)]
    for key in keys:
        row = f"{key:22s}"
        for name in names:
            value = results[name].get(key, float("nan"))
            row += f"{value:>{width + 2},}" if isinstance(value, int) else f"{value:>{width + 2}{'.3g' if key == 'lr' else '.4f'}}"
        lines.append(row)
    return "\n".join(lines)
