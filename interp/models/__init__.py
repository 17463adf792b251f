"""Models: loading, the embedded default, and TransformerLens-style site naming per architecture."""

from interp.errors import ArchitectureError, MissingPackageError, UnknownSiteError
from interp.models.arch import ARCHS, Arch
from interp.models.embedded import EMBEDDED
from interp.models.hooks import StopForward
from interp.models.loading import load_model, wrap_module
from interp.models.model import HFModel, Model, ModelConfig, TLModel, Tokens, token_cross_entropy
from interp.models.sites import SiteInfo
from interp.models.tiny import TINY_FAMILIES, tiny_model

__all__ = [
    "ARCHS", "Arch", "ArchitectureError", "EMBEDDED", "HFModel", "MissingPackageError", "Model",
    "ModelConfig", "SiteInfo", "StopForward", "TINY_FAMILIES", "TLModel", "Tokens", "UnknownSiteError",
    "load_model", "tiny_model", "token_cross_entropy", "wrap_module",
]
