"""Lenses: read the residual stream through the model's own readout.

- ``logit_lens``: every layer's residual through the final norm and unembedding (optionally
  through a tuned or linear-map translator first), per position, with KL to the final output;
- ``AffineLens``: tuned lens (trained on KL, ``train_tuned_lens``) and linear-map lens (least
  squares, ``NormalEquations`` / ``fit_linear_lens``), saved as safetensors + JSON;
- ``evaluate_lenses``: KL, precision@1 and surprisal per layer on store rows.
"""

from interp.lens.logit import NORM_MODES, LensResult, logit_lens, token_ids
from interp.lens.metrics import evaluate_lenses, kl_and_grad
from interp.lens.readout import NormInfo, Readout, norm_info
from interp.lens.train import LensTrainConfig, NormalEquations, fit_linear_lens, held_out_report, train_tuned_lens
from interp.lens.translators import LENS_KINDS, RESID_KINDS, AffineLens, final_site, resid_sites

__all__ = [
    "LENS_KINDS", "NORM_MODES", "RESID_KINDS", "AffineLens", "LensResult", "LensTrainConfig", "NormInfo", "NormalEquations",
    "Readout", "evaluate_lenses", "final_site", "fit_linear_lens", "held_out_report", "kl_and_grad", "logit_lens",
    "norm_info", "resid_sites", "token_ids", "train_tuned_lens",
]
