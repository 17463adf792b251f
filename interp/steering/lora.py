"""A small LoRA for fine-tuning (CAFT and its controls); written here because ``peft`` is not a dependency.

``add_lora(module, targets, rank, alpha)`` wraps every ``nn.Linear`` whose name ends with one of
``targets`` so that it computes ``W x + (alpha / rank) * B A x`` with ``A`` random and ``B`` zero
(the model starts exactly as loaded); only ``A`` and ``B`` train. ``merge_lora`` folds ``B A``
into ``W`` and puts the plain ``nn.Linear`` back, so a saved model is an ordinary HF model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from interp.errors import InputError


class LoRALinear(nn.Module):
    """``base(x) + scale * x A^T B^T``; ``base`` is frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * nn.functional.linear(nn.functional.linear(x, self.lora_a), self.lora_b)

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += self.scale * self.lora_b @ self.lora_a
        self.base.weight.requires_grad_(True)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(True)
        return self.base


def add_lora(module: nn.Module, targets: Sequence[str], rank: int = 8, alpha: float = 16.0) -> list[nn.Parameter]:
    """Wrap the targeted linear layers of ``module`` (in place); every other weight is frozen. Returns the LoRA parameters."""
    if rank < 1 or alpha <= 0:
        raise InputError(f"LoRA rank ({rank}) must be >= 1 and alpha ({alpha}) > 0")
    names = [name for name, child in module.named_modules() if isinstance(child, nn.Linear) and name.split(".")[-1] in targets]
    if not names:
        linear = sorted({name.split(".")[-1] for name, child in module.named_modules() if isinstance(child, nn.Linear)})
        raise InputError(f"no linear layer named {', '.join(targets)}; this model's linear layers are: {', '.join(linear)}")
    for p in module.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        wrapped = LoRALinear(getattr(parent, child), rank, alpha)
        setattr(parent, child, wrapped)
        params += [wrapped.lora_a, wrapped.lora_b]
    return params


def merge_lora(module: nn.Module) -> int:
    """Fold every ``LoRALinear`` of ``module`` back into a plain ``nn.Linear`` (in place); unfreeze all weights."""
    names = [name for name, child in module.named_modules() if isinstance(child, LoRALinear)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, child, getattr(parent, child).merged())
    for p in module.parameters():
        p.requires_grad_(True)
    return len(names)
