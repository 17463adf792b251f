"""The model's readout (final norm + unembedding) as explicit formulas.

Lenses, direct logit attribution and neuron decoding need the final norm split into its parts:
the per-vector scale (recomputed per layer or frozen at another vector's), the gain, and the
bias. ``norm_info`` reads these off the norm module by probing it (so Gemma's ``1 + weight``
gain and TransformerLens's norms need no special case) and checks the formula against the
module on random inputs; a norm it does not understand is refused rather than approximated.

RMSNorm:   y = gain * x / s(x),                s(x) = sqrt(mean(x^2) + eps)
LayerNorm: y = gain * (x - mean(x)) / s(x) + bias,  s(x) = sqrt(var(x) + eps)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import nn

from interp.errors import ArchitectureError

if TYPE_CHECKING:
    from interp.models.model import Model

@dataclass
class NormInfo:
    """A norm as a formula; ``kind="none"`` is the identity (no final norm)."""

    kind: Literal["rms", "layer", "none"]
    eps: float
    gain: torch.Tensor  # [d]
    bias: torch.Tensor | None  # [d]

    def center(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(-1, keepdim=True) if self.kind == "layer" else x

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """The divisor s(x), [..., 1]."""
        if self.kind == "none":
            return torch.ones_like(x[..., :1])
        return (self.center(x).pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def __call__(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The norm of ``x``, with its scale recomputed (``scale=None``) or the given one (frozen)."""
        if self.kind == "none":
            return x
        out = self.gain.to(x) * self.center(x) / (self.scale(x) if scale is None else scale.to(x))
        return out if self.bias is None else out + self.bias.to(x)


def norm_info(module: nn.Module, d: int) -> NormInfo:
    """Read a norm module's kind, epsilon, gain and bias by probing it (see the module docstring)."""
    if isinstance(module, nn.Identity):
        return NormInfo("none", 0.0, torch.ones(d), None)
    param = next(module.parameters(), None)
    dtype, device = (param.dtype, param.device) if param is not None else (torch.float32, torch.device("cpu"))

    def run(x: torch.Tensor) -> torch.Tensor:
        return module(x.to(device, dtype)[None])[0].float().cpu()

    probe = torch.randn(4, d, generator=torch.Generator().manual_seed(0)) * 3 + 1
    signs = torch.ones(d)  # zero mean (odd d: last entry 0), mean square v
    signs[1::2] = -1
    if d % 2:
        signs[-1] = 0
    v, t = float(signs.pow(2).mean()), 1e-3
    with torch.no_grad():
        out = module(probe.to(device, dtype)).float().cpu()
        centers = torch.allclose(out, module((probe + 5.0).to(device, dtype)).float().cpu(), rtol=1e-3, atol=1e-3)
        bias = run(torch.zeros(d)) if centers else None  # LayerNorm(0) = bias
        unit = run(signs) - (bias if bias is not None else 0)
        small = run(t * signs) - (bias if bias is not None else 0)
    # N(t u) / N(u) = t sqrt(v + eps) / sqrt(t^2 v + eps): solve for eps at the largest entry
    at = int(unit.abs().argmax())
    r2 = float(small[at] / unit[at]) ** 2
    eps = max(0.0, t * t * v * (1 - r2) / (r2 - t * t))
    if centers:
        gain = unit * (v + eps) ** 0.5 / torch.where(signs != 0, signs, torch.ones(()))
        info = NormInfo("layer", eps, gain, bias)
    else:
        with torch.no_grad():
            gain = run(torch.ones(d)) * (1 + eps) ** 0.5
        info = NormInfo("rms", eps, gain, None)
    if not torch.allclose(info(probe), out, rtol=1e-3, atol=1e-3 * float(out.abs().max())):
        raise ArchitectureError(
            f"{type(module).__name__} is neither an RMSNorm nor a LayerNorm as far as probing shows; "
            "lenses, DLA and neuron decoding need one of those as the final norm"
        )
    return info


class Readout:
    """Final norm + unembedding of a model as tensors: ``logits(h) = W_U @ norm(h) + b_U``."""

    def __init__(self, model: Model):
        self.model = model
        self.norm = norm_info(model.final_norm, model.cfg.d_model)
        self.W_U, self.b_U = unembedding(model)
        self._converted: dict[torch.dtype, torch.Tensor] = {}

    def weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W_U in ``dtype`` (converted once)."""
        if dtype is None or dtype == self.W_U.dtype:
            return self.W_U
        if dtype not in self._converted:
            self._converted[dtype] = self.W_U.to(dtype)
        return self._converted[dtype]

    def logits(self, h: torch.Tensor, *, scale: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Float32 logits [..., vocab]; ``scale`` freezes the norm's scale; ``dtype`` is the matmul dtype."""
        normed = self.norm(h.float(), scale)
        weight = self.weight(dtype)
        out = (normed.to(weight.dtype) @ weight.T).float()
        return out if self.b_U is None else out + self.b_U


def unembedding(model: Model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W_U [vocab, d_model] (float32, detached) and the unembedding bias (None when absent)."""
    head = model.lm_head
    inner = getattr(head, "unembed", None)  # TransformerLens: W_U is [d_model, vocab]
    if inner is not None and hasattr(inner, "W_U"):
        bias = inner.b_U.detach().float()
        return inner.W_U.detach().float().T.contiguous(), bias if bool(bias.any()) else None
    if isinstance(head, nn.Linear):
        return head.weight.detach().float(), None if head.bias is None else head.bias.detach().float()
    raise ArchitectureError(f"unembedding {type(head).__name__}: expected a linear layer")


_vocabularies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def vocabulary(model: Model) -> np.ndarray:
    """Every token id's text (as ``model.to_string([id])`` gives it), as an object array; cached per tokenizer."""
    tokenizer = model.tokenizer
    if tokenizer not in _vocabularies:
        pieces = tokenizer.convert_ids_to_tokens(list(range(model.cfg.d_vocab)))
        _vocabularies[tokenizer] = np.array([tokenizer.convert_tokens_to_string([p]) if p is not None else "" for p in pieces], dtype=object)
    return _vocabularies[tokenizer]
