"""SNMF: interpretable features from MLP activations (Shafran, Geiger and Geva, 2025).

    from interp.snmf import SNMFConfig, StoreActivations, fit_snmf
    snmf = fit_snmf(StoreActivations(store, "blocks.12.mlp.hook_post"), SNMFConfig(k=100), workdir="runs/snmf-k100")
    snmf.neurons(0); snmf.y(slice(0, 10)); snmf.save("runs/snmf-k100")
    reports = feature_reports(snmf, store, model, [0, 1, 2])
    with model.intervene(steer(snmf, model, 0, scale=8.0)):
        model.generate("I think that")

``core`` holds the algorithm, ``factors`` the fitted object and recursive SNMF, ``report`` the
feature reports, ``steer`` the feature directions, ``job`` the ``interp snmf`` command.
"""

from interp.snmf.core import INITS, FitResult, SNMFConfig, fit, multiplicative_update, ridge_solve, winner_take_all
from interp.snmf.data import Activations, StoreActivations, TensorActivations
from interp.snmf.factors import SNMF, evaluate, fit_recursive, fit_snmf, hierarchy_table
from interp.snmf.report import FeatureReport, feature_reports, feature_table, write_feature_page
from interp.snmf.steer import down_projection, output_directions, steer, steering_vector

__all__ = [
    "INITS", "SNMF", "Activations", "FeatureReport", "FitResult", "SNMFConfig", "StoreActivations", "TensorActivations",
    "down_projection", "evaluate", "feature_reports", "feature_table", "fit", "fit_recursive", "fit_snmf",
    "hierarchy_table", "multiplicative_update", "output_directions", "ridge_solve", "steer", "steering_vector",
    "winner_take_all", "write_feature_page",
]
