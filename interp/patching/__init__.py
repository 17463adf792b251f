"""Patching: batched activation patching, attribution patching and relevance patching (RelP)."""

from interp.patching.activation import DEFAULT_KINDS, Cell, activation_patching, sweep_cells
from interp.patching.atp import atp_star
from interp.patching.attribution import attribution_patching, gradients_at
from interp.patching.result import PatchingResult
from interp.patching.rules import Rules, relevance_rules
from interp.patching.tasks import SPLITS, TASKS, PatchingTask, factual_task, ioi_task, pairs_task, templates

__all__ = [
    "DEFAULT_KINDS", "SPLITS", "TASKS", "Cell", "PatchingResult", "PatchingTask", "Rules", "activation_patching", "atp_star",
    "attribution_patching", "factual_task", "gradients_at", "ioi_task", "pairs_task", "relevance_rules", "sweep_cells", "templates",
]
