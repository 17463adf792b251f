"""Norms and the residual stream of a decoder block, found by following tensors through one probe forward.

Names and child order mislead: Gemma 2's ``post_attention_layernorm`` normalises the attention
output, GLM-4's feeds the MLP, and OLMo 2 has no norm in front of attention or MLP at all. So the
model runs once on a few tokens with hooks on block 0, its attention, MLP, output projections and
every norm, on the norms outside the blocks and on the unembedding, and each norm is classified by
what it feeds: its output *is* the tensor the attention or the MLP receives (the same object, or a
view of the same memory), or its input is the tensor the attention or the MLP returned. Tensors
are compared by identity, not by value: two norms with equal weights give equal values (untrained
models do), but only one of them feeds the MLP. The final norm is the one whose output the
unembedding reads.

Values then check the arithmetic the sites promise: resid_mid = resid_pre + attention branch and
resid_post = resid_mid + MLP branch (resid_post = resid_pre + both in parallel blocks), the output
projections produce what their modules return, a write into resid_mid in place reaches both the MLP
and the residual stream (a second, partial probe), and the unembedding reproduces the logits.
Whatever cannot be classified, or fails a check, raises an ArchitectureError naming the module.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from interp.errors import ArchitectureError
from interp.models.arch import Arch
from interp.models.hooks import PatternHook, StopForward, hidden_input

PROBE_TOKENS = 6


@dataclass
class _Seen:
    """What one module received and returned in the probe: the tensors, and their values back then."""

    input: torch.Tensor | None = None
    input_value: torch.Tensor | None = None
    output: torch.Tensor | None = None
    output_value: torch.Tensor | None = None


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer (LayerNorm, RMSNorm and their per-family variants)."""
    return "norm" in type(module).__name__.lower() and next(module.children(), None) is None


def _first(output: Any) -> torch.Tensor | None:
    value = output[0] if isinstance(output, (tuple, list)) else output
    return value if isinstance(value, torch.Tensor) else None


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """The same tensor: one object, or views of the same memory with the same layout."""
    if a is None or b is None:
        return False
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    tol = 1e-4 if a.dtype in (torch.float32, torch.float64) else 2e-2
    scale = max(float(b.abs().max()), 1.0)
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=tol, atol=tol * scale)


class _Recorder:
    """Forward-pre and forward hooks that file each watched module's first call."""

    def __init__(self) -> None:
        self.seen: dict[str, _Seen] = {}
        self.handles: list[Any] = []

    def watch(self, name: str, module: nn.Module) -> None:
        def before(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in self.seen:
                x = hidden_input(args, kwargs)
                self.seen[name] = _Seen(x, None if x is None else x.detach().clone())

        def after(_m: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> None:
            record = self.seen[name]
            if record.output is None:
                record.output = _first(output)
                record.output_value = None if record.output is None else record.output.detach().clone()

        self.handles += [module.register_forward_pre_hook(before, with_kwargs=True),
                         module.register_forward_hook(after, with_kwargs=True)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def probe_ids(model: nn.Module) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    return ((torch.arange(PROBE_TOKENS) * 7 + 3) % vocab).unsqueeze(0).to(device)


def check_uniform_blocks(model: nn.Module, arch: Arch) -> None:
    """Refuse a layer stack whose blocks are not built alike: the mapping is found on block 0 and
    applied to every block, so a later block of another kind (a mixture-of-experts MLP after dense
    ones, say) would be read through paths that do not exist there or mean something else."""
    layers = model.get_submodule(arch.layers)

    def layout(block: nn.Module) -> list[tuple[str, str]]:
        return [(path, type(module).__name__) for path, module in block.named_modules()]

    first = layout(layers[0])
    for i, block in enumerate(layers):
        here = layout(block)
        if here != first:
            ours, theirs = (set(here) - set(first)) or set(here), (set(first) - set(here)) or set(first)
            path, kind = min(ours or theirs)
            other = ", ".join(f"{p} ({k})" for p, k in sorted(theirs)[:3])
            raise ArchitectureError(f"{arch.family}: {arch.layers}.{i}.{path} ({kind}) differs from block 0 (which has {other}); "
                                    "blocks of different kinds (dense and mixture-of-experts MLPs, ...) cannot be mapped from one block")


def trace_structure(model: nn.Module, arch: Arch) -> Arch:
    """``arch`` (components known) with its norms, residual layout and unembedding found (module docstring)."""
    config = model.config
    layers = model.get_submodule(arch.layers)
    block = layers[0]
    where = f"{arch.layers}.0"
    attn, mlp = block.get_submodule(arch.attn), block.get_submodule(arch.mlp)
    norms = {path: mod for path, mod in block.named_modules()
             if path and is_norm(mod) and not any(path == p or path.startswith(p + ".") for p in (arch.attn, arch.mlp))}
    outer_norms = {path: mod for path, mod in model.named_modules()
                   if is_norm(mod) and not (path == arch.layers or path.startswith(arch.layers + "."))}
    recorder = _Recorder()
    watched = {"block": block, "last_block": layers[-1], "attn": attn, "mlp": mlp, "lm_head": model.get_output_embeddings(),
               "attn_out_proj": block.get_submodule(arch.attn_out_proj), "mlp_out_proj": block.get_submodule(arch.mlp_out_proj),
               **{f"norm:{p}": m for p, m in norms.items()}, **{f"outer:{p}": m for p, m in outer_norms.items()}}
    for name, module in watched.items():
        recorder.watch(name, module)
    try:
        with torch.no_grad():
            logits = model(input_ids=probe_ids(model), use_cache=False).logits
    finally:
        recorder.remove()
    seen = recorder.seen
    for name in ("block", "attn", "mlp", "attn_out_proj", "mlp_out_proj"):
        if name not in seen or seen[name].input is None or seen[name].output is None:
            path = where if name == "block" else f"{where}.{getattr(arch, name)}"
            raise ArchitectureError(f"{arch.family}: the probe forward did not see {path} take and return a hidden-state tensor")

    roles = _norm_roles(arch, where, seen, norms)
    patterns: list[torch.Tensor] = []
    _forward_block0(model, block, [PatternHook(attn, config).attach(patterns.append)])
    arch = replace(arch, **roles, pattern=bool(patterns))
    arch = _check_residual(arch, where, seen, model)
    arch = _unembedding(arch, model, seen, outer_norms, logits)
    mutated = {path for path, name in _output_modules(arch).items()
               if name in seen and seen[name].output is not None and not torch.equal(seen[name].output, seen[name].output_value)}
    return replace(arch, mutated=frozenset(mutated))


_WORDS = {"ln1": "the attention", "ln2": "the MLP", "ln1_post": "the attention", "ln2_post": "the MLP"}


def _norm_roles(arch: Arch, where: str, seen: dict[str, _Seen], norms: dict[str, nn.Module]) -> dict[str, Any]:
    """ln1 / ln2 / ln1_post / ln2_post by what each norm of the block reads and feeds."""
    attn, mlp = seen["attn"], seen["mlp"]
    roles: dict[str, list[str]] = {"ln1": [], "ln2": [], "ln1_post": [], "ln2_post": []}
    for path in norms:
        record = seen.get(f"norm:{path}")
        if record is None:
            continue  # never called (an optional norm the config turned off)
        feeds = [role for role, target in (("ln1", attn), ("ln2", mlp)) if _same(record.output, target.input)]
        follows = [role for role, source in (("ln1_post", attn), ("ln2_post", mlp)) if _same(record.input, source.output)]
        name = f"{where}.{path} ({type(norms[path]).__name__})"
        if feeds and follows:
            raise ArchitectureError(f"{arch.family}: {name} reads what {_WORDS[follows[0]]} returns and feeds "
                                    f"{_WORDS[feeds[0]]}, so the residual stream cannot be told apart from {_WORDS[follows[0]]}'s "
                                    "output (a module that adds the residual itself?)")
        if not feeds and not follows:
            raise ArchitectureError(
                f"{arch.family}: cannot tell what {name} normalises: its output is not what {where}.{arch.attn} or "
                f"{where}.{arch.mlp} reads, and its input is not what either returns")
        for role in feeds + follows:
            roles[role].append(path)
    for role, paths in roles.items():
        if len(paths) > 1:
            raise ArchitectureError(f"{arch.family}: several norms in {where} take the {role} place: {', '.join(paths)}")
    return {role: paths[0] if paths else None for role, paths in roles.items()}


def _branch_outputs(arch: Arch, seen: dict[str, _Seen]) -> tuple[torch.Tensor, torch.Tensor]:
    """What the attention and the MLP add to the residual stream (after their post-norms, if any)."""
    attn = seen[f"norm:{arch.ln1_post}"] if arch.ln1_post else seen["attn"]
    mlp = seen[f"norm:{arch.ln2_post}"] if arch.ln2_post else seen["mlp"]
    return attn.output_value, mlp.output_value


def _check_residual(arch: Arch, where: str, seen: dict[str, _Seen], model: nn.Module) -> Arch:
    block = seen["block"]
    pre, post = block.input_value, block.output_value
    attn_branch, mlp_branch = _branch_outputs(arch, seen)
    for proj, module in (("attn_out_proj", "attn"), ("mlp_out_proj", "mlp")):
        if not torch.equal(seen[proj].output_value, seen[module].output_value):
            raise ArchitectureError(f"{arch.family}: {where}.{getattr(arch, proj)} does not produce what {where}.{getattr(arch, module)} "
                                    "returns, so it is not the output projection")
    mlp_entry = seen[f"norm:{arch.ln2}"] if arch.ln2 else seen["mlp"]  # where the MLP branch reads the stream
    parallel = _same(mlp_entry.input, block.input)
    multiplier = getattr(model.config, "residual_multiplier", 1.0)
    hint = ("; the block scales what attention and MLP add, or adds the residual inside a module, which the sites "
            "hook_attn_out / hook_mlp_out cannot express" + (f" (config residual_multiplier={multiplier})" if multiplier != 1.0 else ""))
    if parallel:
        if not _close(post, pre + attn_branch + mlp_branch):
            raise ArchitectureError(f"{arch.family}: the output of {where} is not its input plus what {arch.attn} and "
                                    f"{arch.mlp} add{hint}")
        return replace(arch, parallel=True)
    mid = mlp_entry.input_value
    if not _close(mid, pre + attn_branch):
        raise ArchitectureError(f"{arch.family}: what the MLP branch of {where} reads is not the block input plus what "
                                f"{arch.attn} adds{hint}")
    if not _close(post, mid + mlp_branch):
        raise ArchitectureError(f"{arch.family}: the output of {where} is not the residual stream after attention plus what "
                                f"{arch.mlp} adds{hint}")
    _check_in_place_resid_mid(arch, where, model, mid)
    return replace(arch, parallel=False)


def _check_in_place_resid_mid(arch: Arch, where: str, model: nn.Module, mid: torch.Tensor) -> None:
    """hook_resid_mid writes into the tensor the MLP branch reads; it must be the residual stream itself."""
    block = model.get_submodule(arch.layers)[0]
    entry = block.get_submodule(arch.ln2 or arch.mlp)
    exit_ = block.get_submodule(arch.ln2_post or arch.mlp)
    seen: dict[str, torch.Tensor] = {}

    def bump(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden_input(args, kwargs).add_(1.0)

    def keep(_m: nn.Module, _a: tuple, out: Any) -> None:
        seen["branch"] = _first(out).clone()

    def stop(_m: nn.Module, _a: tuple, out: Any) -> None:
        seen["post"] = _first(out).clone()

    _forward_block0(model, block, [entry.register_forward_pre_hook(bump, with_kwargs=True), exit_.register_forward_hook(keep),
                            block.register_forward_hook(stop)])
    if "post" not in seen or not _close(seen["post"], mid + 1.0 + seen["branch"]):
        raise ArchitectureError(f"{arch.family}: the tensor {where}.{arch.ln2 or arch.mlp} reads is a copy of the residual "
                                "stream, so hook_resid_mid could not be written")


def _forward_block0(model: nn.Module, block: nn.Module, handles: list[Any]) -> None:
    """A probe forward that ends after ``block`` (the first), with ``handles`` attached (removed afterwards)."""

    def stop(_m: nn.Module, _a: tuple, _out: Any) -> None:
        raise StopForward

    handles.append(block.register_forward_hook(stop))
    try:
        with torch.no_grad():
            model(input_ids=probe_ids(model), use_cache=False)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


def _unembedding(arch: Arch, model: nn.Module, seen: dict[str, _Seen], outer: dict[str, nn.Module], logits: torch.Tensor) -> Arch:
    """The final norm (the norm whose output the unembedding reads) and the transform after the unembedding."""
    head = seen["lm_head"]
    finals = [path for path in outer if f"outer:{path}" in seen and _same(seen[f"outer:{path}"].output, head.input)]
    if len(finals) != 1:
        raise ArchitectureError(f"{arch.family}: found {len(finals)} norms whose output the unembedding reads "
                                f"(norms outside the blocks: {', '.join(outer) or 'none'})")
    final = seen[f"outer:{finals[0]}"]
    if not torch.equal(final.input_value, seen["last_block"].output_value):
        raise ArchitectureError(f"{arch.family}: {finals[0]} does not read the last block's output")
    config = model.config
    scale = float(getattr(config, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0)
    softcap = getattr(config, "final_logit_softcapping", None)
    arch = replace(arch, final_norm=finals[0], logit_scale=scale, logit_softcap=float(softcap) if softcap else None)
    if not _close(logits, transform_logits(arch, head.output_value)):
        raise ArchitectureError(f"{arch.family}: the logits are not the unembedding of the final norm's output "
                                "(an output transform interp does not know)")
    return arch


def transform_logits(arch: Arch, logits: torch.Tensor) -> torch.Tensor:
    """What the model does after its unembedding (Cohere and Granite scale, Gemma 2/3 soft-cap)."""
    if arch.logit_scale != 1.0:
        logits = logits * arch.logit_scale
    if arch.logit_softcap:
        logits = torch.tanh(logits / arch.logit_softcap) * arch.logit_softcap
    return logits


def _output_modules(arch: Arch) -> dict[str, str]:
    """Block-relative path ("" for the block) -> probe record name, for every module whose output is a site."""
    out = {"": "block", arch.attn: "attn", arch.mlp: "mlp"}
    for path in (arch.ln1, arch.ln2, arch.ln1_post, arch.ln2_post):
        if path:
            out[path] = f"norm:{path}"
    return out
