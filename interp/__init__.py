"""interp: a mechanistic-interpretability workbench.

    import interp
    model = interp.load_model("smollm2-135m")
    cache = model.run_with_cache("The capital of France is", sites="blocks.*.hook_resid_post")
"""

from interp.cache import ActivationCache, run_with_cache
from interp.intervene import Ablate, Add, Affine, Apply, Clamp, Intervention, ProjectOut, Replace
from interp.models import Model, Tokens, load_model, tiny_model

__all__ = [
    "ActivationCache", "Ablate", "Add", "Affine", "Apply", "Clamp", "Intervention", "Model", "ProjectOut",
    "Replace", "Tokens", "load_model", "run_with_cache", "tiny_model",
]
