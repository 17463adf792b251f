"""How a site is read and written: plain PyTorch forward / forward-pre hooks on the model's modules.

Every consumer (caches, interventions, patching, relevance rules) attaches a function
``fn(activation) -> replacement | None`` to a site through ``SiteHook.attach``; returning None
(or the same tensor) leaves the forward pass untouched, bit for bit.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from interp.errors import ArchitectureError

HookFn = Callable[[torch.Tensor], "torch.Tensor | None"]


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (everything needed has been seen)."""


def hidden_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The hidden-state input of a module call: the first positional tensor, or ``hidden_states=``."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    return value if isinstance(value, torch.Tensor) else None


class SiteHook:
    """Attach point for one site; ``reads`` says in words which tensor of which module it is."""

    #: True where the tensor may change in place after the hook saw it, so readers must copy.
    mutable: bool = False
    reads: str = ""

    def attach(self, fn: HookFn) -> RemovableHandle:
        raise NotImplementedError


class OutputHook(SiteHook):
    """A module's output (the first element when the module returns a tuple).

    ``mutable``: the model changes this output in place after the module returned it (Falcon adds
    the attention output into the MLP's), so a reader must copy it.
    """

    def __init__(self, module: nn.Module, reads: str = "", *, mutable: bool = False):
        self.module = module
        self.reads = reads
        self.mutable = mutable

    def attach(self, fn: HookFn) -> RemovableHandle:
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            value = output[0] if isinstance(output, tuple) else output
            new = fn(value)
            if new is None or new is value:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return self.module.register_forward_hook(hook)


class InputHook(SiteHook):
    """A module's first input; with ``n_heads`` the last dim is viewed as (heads, d_head)."""

    def __init__(self, module: nn.Module, reads: str = "", *, n_heads: int | None = None):
        self.module = module
        self.reads = reads
        self.n_heads = n_heads

    def attach(self, fn: HookFn) -> RemovableHandle:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> Any:
            flat = hidden_input(args, kwargs)
            value = flat.unflatten(-1, (self.n_heads, -1)) if self.n_heads else flat
            new = fn(value)
            if new is None or new is value:
                return None
            return replace_hidden_input(args, kwargs, new.flatten(-2) if self.n_heads else new)

        return self.module.register_forward_pre_hook(hook, with_kwargs=True)


def replace_hidden_input(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    """(args, kwargs) of a module call with its hidden-state input replaced by ``new``."""
    if args and isinstance(args[0], torch.Tensor):
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


class InPlaceInputHook(InputHook):
    """The residual stream between attention and MLP (``hook_resid_mid``), read where the MLP branch takes it.

    The block computes ``resid_mid = resid_pre + attn_out`` and hands that same tensor to the
    MLP branch (its norm, or the MLP itself where no norm comes first) and to the residual
    connection. Writing into it in place therefore changes both, exactly as replacing the
    residual stream would (``structure.py`` checks this on every model it maps); reading it
    needs no extra hook.
    """

    mutable = True

    def attach(self, fn: HookFn) -> RemovableHandle:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            value = hidden_input(args, kwargs)
            new = fn(value)
            if new is not None and new is not value:
                value.copy_(new)

        return self.module.register_forward_pre_hook(hook, with_kwargs=True)


class PatternHook(SiteHook):
    """Attention probabilities [batch, head, query, key].

    Fast attention kernels never materialise the pattern, so while any pattern hook is
    attached the model's attention runs through ``pattern_attention`` below: it computes the
    pattern explicitly (as HF's eager path does) and shows it to the hooks. If no hook changed
    it, the output still comes from the model's own attention implementation, so reading
    patterns leaves the forward pass bit-identical; if a hook changed it, the output is
    recomputed from the edited pattern. The original implementation is restored when the
    last pattern hook is removed.
    """

    def __init__(self, attn: nn.Module, config: Any, reads: str = ""):
        self.attn = attn
        self.config = config
        self.reads = reads

    def attach(self, fn: HookFn) -> RemovableHandle:
        return _PatternHandle(self.attn, self.config, fn)  # type: ignore[return-value]


_pattern_hooks: weakref.WeakKeyDictionary[nn.Module, dict[int, HookFn]] = weakref.WeakKeyDictionary()
_attention_taps: weakref.WeakKeyDictionary[nn.Module, dict[int, Callable]] = weakref.WeakKeyDictionary()
_pattern_users: dict[int, list] = {}  # id(config) -> [number of attached hooks, saved implementation]
_PREFIX = "interp_pattern:"


class _PatternHandle:
    """Keeps ``fn`` among the module's pattern hooks until ``remove()``."""

    _next_id = 0

    def __init__(self, attn: nn.Module, config: Any, fn: Callable, registry: weakref.WeakKeyDictionary = _pattern_hooks):
        self.hooks = registry.setdefault(attn, {})
        self.config = config
        self.id = _PatternHandle._next_id
        _PatternHandle._next_id += 1
        _switch_attention(config, +1)  # first: it refuses kernels the pattern cannot be read beside
        self.hooks[self.id] = fn

    def remove(self) -> None:
        if self.hooks.pop(self.id, None) is not None:
            _switch_attention(self.config, -1)


def _switch_attention(config: Any, delta: int) -> None:
    entry = _pattern_users.setdefault(id(config), [0, None])
    entry[0] += delta
    if delta > 0 and entry[0] == 1:
        original = config._attn_implementation or "eager"
        if original not in ("eager", "sdpa"):
            # flash / flex kernels get no 4-D mask (None, a padding mask or a BlockMask): the pattern
            # recomputed beside them would be unmasked or wrong, so refuse instead
            _pattern_users.pop(id(config))
            raise ArchitectureError(f"the attention pattern sites need eager or sdpa attention; this model runs {original!r}: "
                                    "load it with attn_implementation='sdpa' (or 'eager') to read or edit hook_pattern")
        entry[1] = original
        config._attn_implementation = _register_pattern_attention(original)
    elif entry[0] == 0:
        config._attn_implementation = _pattern_users.pop(id(config))[1]


def _register_pattern_attention(original: str) -> str:
    """Register ``interp_pattern:<original>``: our attention function, the original's masks."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = _PREFIX + original
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, pattern_attention)
        mask = ALL_MASK_ATTENTION_FUNCTIONS[original] if original in ALL_MASK_ATTENTION_FUNCTIONS else eager_mask
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask)
    return name


def pattern_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with the pattern passed through the module's pattern hooks (see ``PatternHook``).

    The gradient is the eager computation's: where the hooks returned a tensor of their own (a
    cache capturing the pattern), the output's gradient flows through that tensor, so it carries
    d(output)/d(pattern), even when the output's value comes from the model's own kernel.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def masked(scores: torch.Tensor) -> torch.Tensor:
        """What the softmax reads, from the transformed scores [..., query, key]."""
        if attention_mask is None:  # the mask builder left causality to the kernel
            n_q, n_k = scores.shape[-2:]
            future = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).triu(n_k - n_q + 1)
            return scores.masked_fill(future, torch.finfo(scores.dtype).min)
        if attention_mask.dtype == torch.bool:
            return scores.masked_fill(~attention_mask[..., : scores.shape[-1]], torch.finfo(scores.dtype).min)
        return scores + attention_mask[..., : scores.shape[-1]]

    inputs = AttentionInputs(query, key, value, query.shape[-1] ** -0.5 if scaling is None else scaling,
                             kwargs.get("softcap"), masked)
    for tap in list(_attention_taps.get(module, {}).values()):
        tap(inputs)
    hooks = list(_pattern_hooks.get(module, {}).values())
    family_eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    original = ALL_ATTENTION_FUNCTIONS.get_interface(_pattern_users[id(module.config)][1], family_eager)
    frozen = any(fn is _freeze_pattern for fn in hooks)
    if original is not None and all(fn is _freeze_pattern for fn in hooks):
        # Taps and the AH-rule only: the model's own kernel, nothing eager. The pattern is a function of
        # the queries and keys alone, so holding it constant is detaching them.
        if frozen:
            query, key = query.detach(), key.detach()
        return original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    groups = query.shape[1] // key.shape[1]
    keys = key.repeat_interleave(groups, dim=1) if groups > 1 else key  # grouped-query attention
    scores = masked(inputs.transform(torch.matmul(query, keys.transpose(-1, -2))))
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    shown = pattern.detach() if frozen else pattern  # AH-rule: no gradient into queries and keys
    edited = shown
    for fn in hooks:
        new = fn(edited)
        if new is not None:
            edited = new
    values = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    if edited is pattern or torch.equal(edited, pattern):
        # Unchanged: the model's own implementation computes the output, exactly as unhooked.
        # ("eager" is not in the registry: it is each family's own eager_attention_forward.)
        if original is not None:
            out = original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)[0]
            if edited is not pattern and torch.is_grad_enabled():
                # Same values; the gradient flows through the hooks' pattern and the values.
                linear = torch.matmul(edited, values).transpose(1, 2).contiguous()
                out = out.detach() + (linear - linear.detach())
            return out, edited
    edited = nn.functional.dropout(edited, p=dropout, training=module.training)
    return torch.matmul(edited, values).transpose(1, 2).contiguous(), edited


def _freeze_pattern(_pattern: torch.Tensor) -> None:
    """Marker hook: hold the pattern constant in the backward pass (see ``stop_pattern_gradient``)."""
    return None


def stop_pattern_gradient(attn: nn.Module, config: Any) -> RemovableHandle:
    """Until removed, ``attn`` passes no gradient through its attention pattern (values unchanged)."""
    return _PatternHandle(attn, config, _freeze_pattern)  # type: ignore[return-value]


@dataclass(frozen=True)
class AttentionInputs:
    """What an attention kernel is called with, as an attention tap sees it.

    ``query`` [batch, head, position, head_dim] and ``key`` / ``value`` [batch, kv_head, position,
    head_dim], after rotary embeddings and before grouped-query repetition; ``transform`` maps dot
    products q.k to scores (``scale``, then Gemma 2's ``softcap``) and ``masked`` applies the kernel's
    mask to them: ``masked(transform(q @ keys^T))`` is what the softmax reads, keys repeated to the
    query heads.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scale: float
    softcap: float | None
    masked: Callable[[torch.Tensor], torch.Tensor]

    def transform(self, dots: torch.Tensor) -> torch.Tensor:
        return torch.tanh(dots * self.scale / self.softcap) * self.softcap if self.softcap else dots * self.scale


def tap_attention(attn: nn.Module, config: Any, fn: Callable[[AttentionInputs], None]) -> RemovableHandle:
    """Until removed, ``fn(inputs)`` sees every call of ``attn`` before its kernel runs (and may raise
    ``StopForward``). The kernel itself is the model's own: a tap computes nothing extra."""
    return _PatternHandle(attn, config, fn, _attention_taps)  # type: ignore[return-value]
