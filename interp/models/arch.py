"""Where each site lives in a HF decoder-only model: a small table per family plus a fallback.

An ``Arch`` names module paths (dotted, relative to the HF model root, or to one decoder layer
for the per-layer fields). The unembedding is always ``get_output_embeddings()``. Unknown architectures are mapped by structure: the longest
``ModuleList`` of identical blocks is the layer stack, and inside a block the attention, MLP and
norm children are recognised by name and class.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from interp.errors import ArchitectureError


@dataclass(frozen=True)
class Arch:
    family: str
    layers: str  # the ModuleList of decoder layers
    embed: str
    final_norm: str
    # relative to one decoder layer:
    ln1: str
    ln2: str
    attn: str
    attn_out_proj: str  # its input is attn.hook_z (heads concatenated)
    mlp: str
    mlp_out_proj: str  # its input is mlp.hook_post
    pos_embed: str | None = None
    parallel: bool = False  # attention and MLP both read the layer input (no resid_mid)


_LLAMA = Arch(
    family="llama",
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    attn="self_attn",
    attn_out_proj="self_attn.o_proj",
    mlp="mlp",
    mlp_out_proj="mlp.down_proj",
)

_GPT2 = Arch(
    family="gpt2",
    layers="transformer.h",
    embed="transformer.wte",
    pos_embed="transformer.wpe",
    final_norm="transformer.ln_f",
    ln1="ln_1",
    ln2="ln_2",
    attn="attn",
    attn_out_proj="attn.c_proj",
    mlp="mlp",
    mlp_out_proj="mlp.c_proj",
)

_NEOX = Arch(
    family="gpt_neox",
    layers="gpt_neox.layers",
    embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    attn="attention",
    attn_out_proj="attention.dense",
    mlp="mlp",
    mlp_out_proj="mlp.dense_4h_to_h",
)

ARCHS: dict[str, Arch] = {
    "llama": _LLAMA,
    "mistral": replace(_LLAMA, family="mistral"),
    "qwen2": replace(_LLAMA, family="qwen2"),
    "qwen3": replace(_LLAMA, family="qwen3"),
    "gpt2": _GPT2,
    "gpt_neox": _NEOX,
}


def arch_for(model: nn.Module) -> Arch:
    """The table entry for ``model``'s family, or one discovered from its structure."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family in ARCHS:
        arch = ARCHS[family]
        if family == "gpt_neox":
            arch = replace(arch, parallel=bool(getattr(config, "use_parallel_residual", True)))
        return arch
    return discover_arch(model)


_ATTN_NAMES = ("self_attn", "attention", "attn", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block")
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")


def discover_arch(model: nn.Module) -> Arch:
    """Map an unseen decoder-only model by structure (see module docstring)."""
    names = dict(model.named_modules())
    stacks = [
        (path, mod)
        for path, mod in names.items()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1
    ]
    if not stacks:
        raise ArchitectureError(f"{type(model).__name__}: found no ModuleList of decoder layers")
    layers_path, layers = max(stacks, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    block = layers[0]
    children = dict(block.named_children())

    def child(candidates: tuple[str, ...], what: str) -> str:
        for name in candidates:
            if name in children:
                return name
        raise ArchitectureError(
            f"{type(model).__name__}: no {what} found in {type(block).__name__} "
            f"(children: {', '.join(children)})"
        )

    attn, mlp = child(_ATTN_NAMES, "attention module"), child(_MLP_NAMES, "MLP module")
    norms = [name for name, mod in children.items() if "norm" in type(mod).__name__.lower()]
    if len(norms) < 2:
        raise ArchitectureError(f"{type(model).__name__}: expected two norms in each block, found {norms}")
    inside = layers_path + "."
    final_norms = [
        path
        for path, mod in names.items()
        if not path.startswith(inside)
        and path.rsplit(".", 1)[-1] in _FINAL_NORM_NAMES
        and "norm" in type(mod).__name__.lower()
    ]
    if not final_norms:
        raise ArchitectureError(f"{type(model).__name__}: no final norm found")
    embed = _path_of(names, model.get_input_embeddings())
    config = getattr(model, "config", None)
    parallel = bool(getattr(config, "use_parallel_residual", False) or getattr(config, "parallel_attn", False))
    return Arch(
        family=f"generic:{getattr(config, 'model_type', type(model).__name__)}",
        layers=layers_path,
        embed=embed,
        final_norm=final_norms[-1],
        ln1=norms[0],
        ln2=norms[1],
        attn=attn,
        attn_out_proj=f"{attn}.{_output_linear(getattr(block, attn), config)}",
        mlp=mlp,
        mlp_out_proj=f"{mlp}.{_output_linear(getattr(block, mlp), config)}",
        parallel=parallel,
    )


def _path_of(names: dict[str, nn.Module], target: nn.Module | None) -> str:
    for path, mod in names.items():
        if mod is target:
            return path
    raise ArchitectureError("could not locate the input embeddings in the module tree")


def _output_linear(module: nn.Module, config: object) -> str:
    """The output projection: the last linear-like child whose output has the model width.

    (Registration order alone misleads: Phi-3 registers o_proj before its fused qkv_proj.)
    """
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    linear = [
        (name, mod)
        for name, mod in module.named_modules()
        if name and (isinstance(mod, nn.Linear) or type(mod).__name__ in ("Conv1D", "Linear"))
    ]
    if not linear:
        raise ArchitectureError(f"no linear layer inside {type(module).__name__}")
    writes_width = [name for name, mod in linear if _out_features(mod) == width]
    return (writes_width or [name for name, _ in linear])[-1]


def _out_features(module: nn.Module) -> int | None:
    return getattr(module, "out_features", None) or getattr(module, "nf", None)  # nf: GPT-2's Conv1D
