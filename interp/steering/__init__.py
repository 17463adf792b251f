"""Steering: vectors from concepts, probes and dictionary latents; generation with them; evaluation.

    from interp.steering import diff_in_means, steering, generate, sweep, VaderScorer
    v = diff_in_means(model, load_concept("sentiment"), "blocks.6.hook_resid_post")
    norm = site_mean_norm(model, v.site, texts)
    out = generate(model, ["The weather today"], steering(v, 0.5, mean_norm=norm))
    result = sweep(model, {"diff-means": v}, [0.25, 0.5, 1], prompts, scorer=VaderScorer(), mean_norms={v.site: norm})
    maps = fit_lineas(model, negative_texts, positive_texts, sites)     # or fit_act(..., kind="mean" / "linear")
    out = generate(model, prompts, maps.steering(0.5))
"""

from interp.steering.evaluation import (
    LexiconScorer, Scorer, VaderScorer, continuation_nll, distinct_n, make_scorer, perplexity,
)
from interp.steering.generation import POSITIONS, AffineSteering, Generations, Steering, ablation, generate, steering
from interp.steering.lineas import (
    METHODS as MAP_METHODS, AffineMaps, fit_act, fit_lineas, fit_maps, prox_sparse_group_lasso, quantile_pairs,
    token_activations, wasserstein_1d,
)
from interp.steering.sweep import UNSTEERED, SweepResult, summarise, sweep
from interp.steering.vectors import (
    UNITS, SteeringVector, check_strength, concept_latents, diff_in_means, latent_vector, probe_vector, site_mean_norm,
)

__all__ = [
    "MAP_METHODS", "AffineMaps", "AffineSteering", "fit_act", "fit_lineas", "fit_maps", "prox_sparse_group_lasso",
    "quantile_pairs", "token_activations", "wasserstein_1d",
    "POSITIONS", "UNITS", "UNSTEERED", "Generations", "LexiconScorer", "Scorer", "Steering", "SteeringVector",
    "SweepResult", "VaderScorer", "ablation", "check_strength", "concept_latents", "continuation_nll", "diff_in_means",
    "distinct_n", "generate", "latent_vector", "make_scorer", "perplexity", "probe_vector", "site_mean_norm",
    "steering", "summarise", "sweep",
]
