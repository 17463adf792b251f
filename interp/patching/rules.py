"""LRP rules for relevance patching (RelP, arXiv 2508.21258): the backward pass changes, the forward does not.

Each rule replaces a module's output y by ``y.detach() + (s - s.detach())`` where ``s`` is a
surrogate with the gradient the rule wants. The added term is exactly zero, so forward values stay
bit-identical; only gradients change. Rules are chosen per call (``relevance_rules(model, rules)``
is a context manager) and act through the model's own modules or hook points:

- ``ln``: every norm (LayerNorm, RMSNorm, gain w or 1 + w) with its normalising scale held constant (LN-rule);
- ``identity``: the MLP's activation (GELU, SiLU, ReLU variants) as x * stopgrad(f(x) / x) (identity rule);
- ``half``: gated products (act(gate) * up, fused gate_up projections too): each factor receives half (half rule);
- ``attention``: attention patterns held constant (AH-rule);
- ``signal`` (instead of ``half``): a gated product passes everything back through ``up``, the gate
  act(gate) held constant (LRP's signal-take-all rule for gates).
``ln_blocks`` / ``ln_final`` apply the LN-rule to the norms inside blocks / the final norm only.
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
from interp.models.hooks import hidden_input, stop_pattern_gradient
from interp.models.structure import is_norm

if TYPE_CHECKING:
    from interp.models.model import Model


@dataclass(frozen=True)
class Rules:
    ln: bool = True
    identity: bool = True
    half: bool = True
    attention: bool = False
    signal: bool = False  # gated products: everything through the linear factor, act(gate) held constant
    final_norm: bool | None = None  # the LN-rule on the final norm; None: as ``ln``

    def __post_init__(self) -> None:
        if self.half and self.signal:
            raise InputError("rules 'half' and 'signal' both set what a gated product passes back; choose one")

    @classmethod
    def parse(cls, text: str) -> Rules:
        """'ln,identity,half' -> Rules(...); 'all' (ln, identity, half, attention) and 'none' work too.

        'ln' covers every norm; 'ln_blocks' the norms inside blocks only, 'ln_final' the final norm only.
        """
        names = {"ln", "ln_blocks", "ln_final", "identity", "half", "signal", "attention"}
        chosen = {"ln", "identity", "half", "attention"} if text == "all" else set() if text == "none" else {
            t.strip() for t in text.split(",") if t.strip()}
        if chosen - names:
            raise InputError(f"unknown rule(s) {sorted(chosen - names)}; choose from {sorted(names)}, 'all' or 'none'")
        blocks, final = bool(chosen & {"ln", "ln_blocks"}), bool(chosen & {"ln", "ln_final"})
        return cls(ln=blocks, final_norm=None if blocks == final else final, identity="identity" in chosen,
                   half="half" in chosen, signal="signal" in chosen, attention="attention" in chosen)

    def __str__(self) -> str:
        """The rule names, as ``parse`` reads them."""
        norms = "ln" if self.ln and self.on_final_norm() else "ln_blocks" if self.ln else "ln_final" if self.on_final_norm() else ""
        names = [norms] + [n for n in ("identity", "half", "signal", "attention") if getattr(self, n)]
        return ",".join(n for n in names if n) or "none"

    def on_final_norm(self) -> bool:
        return self.ln if self.final_norm is None else self.final_norm


def _surrogate(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, the gradient of ``surrogate`` in the backward pass."""
    return value.detach() + (surrogate - surrogate.detach())


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to ``b``'s scale, or inf where shapes differ."""
    if a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max()) / max(float(b.float().abs().max()), 1.0)


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


class _NormRule:
    """LN-rule for one norm module: its output's value, the gradient with the normalising scale held constant.

    Norms differ by family: centred (LayerNorm) or not (RMSNorm), gain ``w`` or ``1 + w`` (Gemma,
    Nemotron), with or without gain and bias. The first call tries each form and keeps the one
    that reproduces the module's own output; a norm no form reproduces is refused.
    """

    def __init__(self, name: str):
        self.name = name
        self.form: tuple[bool, bool] | None = None  # (centred, gain is 1 + w)

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = hidden_input(args, {})
        if self.form is None:
            self.form = self._find_form(module, x, output)
        return _surrogate(output, _norm_surrogate(module, x, *self.form))

    def _find_form(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> tuple[bool, bool]:
        has_weight = getattr(module, "weight", None) is not None
        forms = [(centred, one_plus) for centred in (False, True) for one_plus in ((False, True) if has_weight else (False,))]
        with torch.no_grad():
            errors = {form: _relative_error(_norm_surrogate(module, x, *form), output) for form in forms}
        best = min(errors, key=errors.get)
        if errors[best] > _tolerance(output.dtype):
            raise InputError(f"RelP LN-rule: {self.name} ({type(module).__name__}) is not a LayerNorm or RMSNorm with gain w "
                             "or 1 + w (no such form reproduces its output), so the rule cannot hold its scale constant")
        return best


def _norm_surrogate(module: nn.Module, x: torch.Tensor, centred: bool, one_plus: bool) -> torch.Tensor:
    eps = next((float(v) for v in (getattr(module, n, None) for n in ("variance_epsilon", "eps", "epsilon")) if v is not None), 1e-5)
    xf = x.float()
    if centred:
        xf = xf - xf.mean(-1, keepdim=True)
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps).detach()
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if weight is not None:
        out = out * (1.0 + weight.float() if one_plus else weight.float())
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _identity_surrogate(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * stopgrad(y / x); at x ~ 0 the ratio is the slope at 0 (0.5 for GELU and SiLU)."""
    small = x.abs() < eps
    ratio = torch.where(small, torch.full_like(x, 0.5), y / torch.where(small, torch.ones_like(x), x))
    return x * ratio.detach()


_ACTIVATIONS = ("silu", "gelu", "swish", "relu", "activation")


def _is_activation(module: nn.Module) -> bool:
    """An elementwise activation module (nn.SiLU, nn.GELU, transformers' *Activation classes, ReLU variants)."""
    name = type(module).__name__.lower()
    return not list(module.parameters()) and any(a in name for a in _ACTIVATIONS)


@contextlib.contextmanager
def relevance_rules(model: Model, rules: Rules) -> Iterator[None]:
    """Apply ``rules`` to every forward pass inside the block.

    The rules' hooks go in front of every other hook on their modules, so a site read at a rule's
    module (a norm's output, the MLP hidden) is the rule's output, and the gradient reaching it is
    the gradient under the rules, whichever context was entered first.
    """
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
    root, arch = model.module, model.arch
    layers = root.get_submodule(arch.layers)
    if rules.attention and not arch.pattern:
        raise InputError(f"the attention rule holds attention patterns constant, but the attention of {model.cfg.name} "
                         f"({type(layers[0].get_submodule(arch.attn)).__name__}) does not run through transformers' "
                         "attention interface, where interp reaches the pattern")
    handles: list[Any] = []
    final = model.final_norm
    handles += [module.register_forward_hook(_NormRule(name), prepend=True) for name, module in root.named_modules()
                if is_norm(module) and (rules.on_final_norm() if module is final else rules.ln)]
    for index, layer in enumerate(layers):
        if rules.identity or rules.half or rules.signal:
            handles += _mlp_rules(f"{arch.layers}.{index}.{arch.mlp}", layer.get_submodule(arch.mlp),
                                  layer.get_submodule(arch.mlp_out_proj), rules)
    if rules.attention:
        handles += [stop_pattern_gradient(layer.get_submodule(arch.attn), root.config) for layer in layers]
    return handles


def _mlp_rules(name: str, mlp: nn.Module, down: nn.Module, rules: Rules) -> list[Any]:
    """Identity rule on the MLP's activation and half rule on a gated product act(gate) * up.

    Which tensor is ``up`` is found on the first call by data flow: the output of one of the MLP's
    linear layers (or one half of a fused gate_up projection) that, times the activation's output,
    is the down projection's input. A non-gated MLP feeds the activation's output to the down
    projection itself, and the half rule has nothing to do.
    """
    activations = [m for m in mlp.modules() if _is_activation(m)]
    if not activations:
        raise InputError(f"RelP: found no activation module in {name} ({type(mlp).__name__}); the identity and half rules "
                         "need the activation as a module")
    seen: dict[str, Any] = {}

    def activation(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if rules.identity:
            out = _surrogate(out, _identity_surrogate(hidden_input(args, {}), out))
        seen["act"] = out
        return out

    def keep(linear: str):
        def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            seen[linear] = out

        return hook

    def split(_m: nn.Module, args: tuple) -> tuple | None:
        hidden, act = hidden_input(args, {}), seen.pop("act", None)
        if not (rules.half or rules.signal) or act is None or act.shape != hidden.shape or torch.equal(act, hidden):
            return None  # not a gated product
        if "up" not in seen:
            seen["up"] = _find_up(name, seen, act, hidden)
        linear, part = seen["up"]
        up = seen[linear] if part is None else seen[linear].chunk(2, dim=-1)[part]
        product = act.detach() * up if rules.signal else 0.5 * (act * up.detach()) + 0.5 * (act.detach() * up)
        return (_surrogate(hidden, product), *args[1:])

    linears = [(n, m) for n, m in mlp.named_modules() if n and m is not down and isinstance(m, nn.Linear)]
    return ([m.register_forward_hook(activation, prepend=True) for m in activations]
            + [m.register_forward_hook(keep(f"linear:{n}")) for n, m in linears]
            + [down.register_forward_pre_hook(split, prepend=True)])


def _find_up(name: str, seen: dict[str, Any], act: torch.Tensor, hidden: torch.Tensor) -> tuple[str, int | None]:
    """(linear, half) whose output is the ``up`` factor of hidden = act * up (see ``_mlp_rules``)."""
    with torch.no_grad():
        for key, out in seen.items():
            if not key.startswith("linear:"):
                continue
            parts = [None] if out.shape == hidden.shape else [0, 1] if out.shape[-1] == 2 * hidden.shape[-1] else []
            for part in parts:
                up = out if part is None else out.chunk(2, dim=-1)[part]
                if _relative_error(act * up, hidden) <= _tolerance(hidden.dtype):
                    return key, part
    raise InputError(f"RelP half rule: the down projection's input in {name} is neither the activation's output nor the "
                     "activation's output times one linear output; this MLP's gating is not supported")


def _transformer_lens_rules(model: Model, rules: Rules) -> list[Any]:
    points = model.module.hook_dict
    handles: list[Any] = []
    handles += [p.register_forward_hook(_detach, prepend=True) for n, p in points.items() if n.endswith("hook_scale")
                and (rules.on_final_norm() if n.startswith("ln_final") else rules.ln)]
    if rules.attention:
        handles += [p.register_forward_hook(_detach, prepend=True) for n, p in points.items() if n.endswith("attn.hook_pattern")]
    if rules.identity or rules.half or rules.signal:
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
        if rules.signal:
            product = act.detach() * linear
        else:
            product = 0.5 * (gate * linear.detach()) + 0.5 * (act.detach() * linear) if rules.half else gate * linear
        return _surrogate(post, product)

    # hook_pre / hook_pre_linear are sites themselves: their values are kept after the hooks already
    # there (a cache's capture), so the rebuilt gradient reaches what those hooks returned.
    handles = [points[prefix + "hook_pre"].register_forward_hook(_keep_output(seen, "pre"))]
    if prefix + "hook_pre_linear" in points:
        handles.append(points[prefix + "hook_pre_linear"].register_forward_hook(_keep_output(seen, "linear")))
    handles.append(points[prefix + "hook_post"].register_forward_hook(rebuild, prepend=True))
    return handles


def _keep_output(seen: dict[str, torch.Tensor], name: str) -> Any:
    """A forward hook that files the module's output under ``seen[name]`` for a later hook."""

    def hook(_m: nn.Module, _args: Any, out: torch.Tensor) -> None:
        seen[name] = out

    return hook


def _detach(_m: nn.Module, _a: Any, out: torch.Tensor) -> torch.Tensor:
    return out.detach()
