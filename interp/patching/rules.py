"""LRP rules for relevance patching (RelP, arXiv 2508.21258): the backward pass changes, the forward does not.

Each rule replaces a module's output y by ``y.detach() + (s - s.detach())`` where ``s`` is a
surrogate with the gradient the rule wants. The added term is exactly zero, so forward values stay
bit-identical; only gradients change. Rules are chosen per call (``relevance_rules(model, rules)``
is a context manager) and act through the model's own modules or hook points:

- ``ln``: LayerNorm / RMSNorm with the normalising scale held constant (LN-rule);
- ``identity``: GELU / SiLU as x * stopgrad(f(x) / x) (identity rule);
- ``half``: gated products (SwiGLU's act(gate) * up): each factor receives half (half rule);
- ``attention``: attention patterns held constant (AH-rule).
With all four, a bias-free network is linear in its input along the backward pass, so relevance
(input x gradient) sums to the output (conservation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from interp.errors import InputError
from interp.models.hooks import stop_pattern_gradient

if TYPE_CHECKING:
    from interp.models.model import Model


@dataclass(frozen=True)
class Rules:
    ln: bool = True
    identity: bool = True
    half: bool = True
    attention: bool = False

    @classmethod
    def parse(cls, text: str) -> Rules:
        """'ln,identity,half' -> Rules(...); 'all' and 'none' work too."""
        names = {"ln", "identity", "half", "attention"}
        chosen = names if text == "all" else set() if text == "none" else {t.strip() for t in text.split(",") if t.strip()}
        if chosen - names:
            raise InputError(f"unknown rule(s) {sorted(chosen - names)}; choose from {sorted(names)}, 'all' or 'none'")
        return cls(**{n: n in chosen for n in names})


def _surrogate(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, the gradient of ``surrogate`` in the backward pass."""
    return value.detach() + (surrogate - surrogate.detach())


def _norm_surrogate(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
    xf = x.float()
    if isinstance(module, nn.LayerNorm) or "layernorm" in type(module).__name__.lower() and "rms" not in type(module).__name__.lower():
        centred = xf - xf.mean(-1, keepdim=True)
        scale = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps).detach()
        out = centred * scale
    else:
        scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps).detach()
        out = xf * scale
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    out = out.to(x.dtype)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def _identity_surrogate(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * stopgrad(y / x); at x ~ 0 the ratio is the slope at 0 (0.5 for GELU and SiLU)."""
    small = x.abs() < eps
    ratio = torch.where(small, torch.full_like(x, 0.5), y / torch.where(small, torch.ones_like(x), x))
    return x * ratio.detach()


_ACTIVATIONS = ("silu", "gelu", "swish")


def _is_activation(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return not list(module.parameters()) and any(a in name for a in _ACTIVATIONS)


@contextlib.contextmanager
def relevance_rules(model: Model, rules: Rules) -> Iterator[None]:
    """Apply ``rules`` to every forward pass inside the block."""
    handles: list[Any] = []
    try:
        if model.cfg.backend == "transformer_lens":
            handles += _transformer_lens_rules(model, rules)
        else:
            handles += _hf_rules(model, rules)
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hf_rules(model: Model, rules: Rules) -> list[Any]:
    handles: list[Any] = []
    root = model.module
    layers = root.get_submodule(model.arch.layers)
    if rules.ln:
        for module in root.modules():
            if "norm" in type(module).__name__.lower():
                handles.append(module.register_forward_hook(lambda m, args, out: _surrogate(out, _norm_surrogate(m, args[0]))))
    for layer in layers:
        mlp = layer.get_submodule(model.arch.mlp)
        if rules.identity:
            for module in mlp.modules():
                if _is_activation(module):
                    handles.append(module.register_forward_hook(lambda m, args, out: _surrogate(out, _identity_surrogate(args[0], out))))
        if rules.half:
            handles += _half_rule(model, mlp, layer)
    if rules.attention:
        handles += [stop_pattern_gradient(layer.get_submodule(model.arch.attn), root.config) for layer in layers]
    return handles


def _half_rule(model: Model, mlp: nn.Module, layer: nn.Module) -> list[Any]:
    """SwiGLU-style MLPs (gate_proj, up_proj, down_proj): split the product's gradient in halves."""
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        if any("gate" in name for name, _ in mlp.named_children()):
            raise InputError(f"the half rule knows gated MLPs with gate_proj/up_proj/down_proj; {type(mlp).__name__} differs")
        return []  # not gated: nothing to do
    seen: dict[str, torch.Tensor] = {}
    activation = next((m for m in mlp.modules() if _is_activation(m)), None)
    if activation is None:
        raise InputError(f"no activation module found in {type(mlp).__name__}")

    def split(_m: nn.Module, args: tuple) -> tuple:
        gate, up = seen.pop("gate"), seen.pop("up")
        surrogate = 0.5 * (gate * up.detach()) + 0.5 * (gate.detach() * up)
        return (_surrogate(args[0], surrogate), *args[1:])

    return [activation.register_forward_hook(_keep_output(seen, "gate")), mlp.up_proj.register_forward_hook(_keep_output(seen, "up")),
            mlp.down_proj.register_forward_pre_hook(split)]


def _keep_output(seen: dict[str, torch.Tensor], name: str) -> Any:
    """A forward hook that files the module's output under ``seen[name]`` for a later hook."""

    def hook(_m: nn.Module, _args: Any, out: torch.Tensor) -> None:
        seen[name] = out

    return hook


def _transformer_lens_rules(model: Model, rules: Rules) -> list[Any]:
    points = model.module.hook_dict
    handles: list[Any] = []
    if rules.ln:
        handles += [p.register_forward_hook(lambda m, a, out: out.detach()) for n, p in points.items() if n.endswith("hook_scale")]
    if rules.attention:
        handles += [p.register_forward_hook(lambda m, a, out: out.detach()) for n, p in points.items() if n.endswith("attn.hook_pattern")]
    if rules.identity or rules.half:
        for layer, block in enumerate(model.module.blocks):
            handles += _transformer_lens_mlp_rules(block.mlp, points, layer, rules)
    return handles


def _transformer_lens_mlp_rules(mlp: nn.Module, points: dict, layer: int, rules: Rules) -> list[Any]:
    """TL MLPs: post = act(pre) [* pre_linear]; rebuild post's gradient from hook_pre (and hook_pre_linear)."""
    seen: dict[str, torch.Tensor] = {}
    prefix = f"blocks.{layer}.mlp."

    def rebuild(_m: nn.Module, _a: Any, post: torch.Tensor) -> torch.Tensor:
        pre = seen.pop("pre")
        act = mlp.act_fn(pre)
        gate = _identity_surrogate(pre, act) if rules.identity else act
        if "linear" not in seen:
            return _surrogate(post, gate)
        linear = seen.pop("linear")
        product = 0.5 * (gate * linear.detach()) + 0.5 * (act.detach() * linear) if rules.half else gate * linear
        return _surrogate(post, product)

    handles = [points[prefix + "hook_pre"].register_forward_hook(_keep_output(seen, "pre"))]
    if prefix + "hook_pre_linear" in points:
        handles.append(points[prefix + "hook_pre_linear"].register_forward_hook(_keep_output(seen, "linear")))
    handles.append(points[prefix + "hook_post"].register_forward_hook(rebuild))
    return handles
