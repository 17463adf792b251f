"""Where each site lives in a HF decoder-only model.

Two steps. First the components: the decoder-layer stack, and in a block the attention and MLP
modules with their output projections, from a small table per family or, for an unseen family,
by structure (the ``ModuleList`` of identical blocks holding the most parameters; attention and
MLP children recognised by name; the output projection is the last linear writing the model
width). Second the norms and the residual stream, which are never read off names or child order:
``structure.trace_structure`` follows the tensors of one probe forward to see which norm feeds
the attention, which the MLP, which normalises their outputs ("sandwich" norms), where the
residual stream between attention and MLP is, and which norm feeds the unembedding.

An ``Arch`` names module paths: dotted, relative to the HF model root, or to one decoder layer
for the per-layer fields. The unembedding is always ``get_output_embeddings()``.
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
    # relative to one decoder layer:
    attn: str
    attn_out_proj: str  # its input is attn.hook_z (heads concatenated)
    mlp: str
    mlp_out_proj: str  # its input is mlp.hook_post
    pos_embed: str | None = None
    # Found by following tensors (structure.py); None where the block has no such norm.
    final_norm: str = ""
    ln1: str | None = None  # its output is what the attention reads
    ln2: str | None = None  # its output is what the MLP reads (== ln1 when one norm feeds both)
    ln1_post: str | None = None  # normalises the attention output before it joins the residual stream
    ln2_post: str | None = None  # normalises the MLP output before it joins the residual stream
    parallel: bool = False  # attention and MLP both read the block input (no resid_mid)
    pattern: bool = True  # the attention runs through transformers' attention interface (pattern site)
    # Outputs the block changes in place after the module returned them (Falcon adds attention
    # into the MLP output): caches must copy these.
    mutated: frozenset[str] = frozenset()
    logit_scale: float = 1.0  # logits = lm_head(final_norm(x)) * logit_scale ...
    logit_softcap: float | None = None  # ... then softcap * tanh(logits / softcap)

    @property
    def shared_norm(self) -> bool:
        """One norm's output feeds both attention and MLP (GPT-J, Cohere, Phi-2)."""
        return self.ln1 is not None and self.ln1 == self.ln2


_LLAMA = Arch(
    family="llama",
    layers="model.layers",
    embed="model.embed_tokens",
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
    attn="attn",
    attn_out_proj="attn.c_proj",
    mlp="mlp",
    mlp_out_proj="mlp.c_proj",
)

_NEOX = Arch(
    family="gpt_neox",
    layers="gpt_neox.layers",
    embed="gpt_neox.embed_in",
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
    """The components from ``model``'s family table (or its structure), norms by data flow."""
    from interp.models.structure import check_uniform_blocks, trace_structure

    family = getattr(getattr(model, "config", None), "model_type", None)
    components = ARCHS[family] if family in ARCHS else discover_components(model)
    check_uniform_blocks(model, components)
    return trace_structure(model, components)


_ATTN_NAMES = ("self_attn", "attention", "attn", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block")
_POS_EMBED_NAMES = ("wpe", "embed_positions", "position_embeddings")


def discover_components(model: nn.Module) -> Arch:
    """Layer stack, attention, MLP and their output projections of an unseen family (see module docstring)."""
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
            f"{type(model).__name__}: no {what} found in {layers_path}.0 ({type(block).__name__}; "
            f"children: {', '.join(children)})"
        )

    attn, mlp = child(_ATTN_NAMES, "attention module"), child(_MLP_NAMES, "MLP module")
    config = getattr(model, "config", None)
    inside = layers_path + "."
    pos_embed = [path for path, mod in names.items()
                 if isinstance(mod, nn.Embedding) and not path.startswith(inside) and path.rsplit(".", 1)[-1] in _POS_EMBED_NAMES]
    return Arch(
        family=f"generic:{getattr(config, 'model_type', type(model).__name__)}",
        layers=layers_path,
        embed=_path_of(names, model.get_input_embeddings()),
        pos_embed=pos_embed[0] if len(pos_embed) == 1 else None,
        attn=attn,
        attn_out_proj=f"{attn}.{_output_linear(getattr(block, attn), config)}",
        mlp=mlp,
        mlp_out_proj=f"{mlp}.{_output_linear(getattr(block, mlp), config)}",
    )


def _path_of(names: dict[str, nn.Module], target: nn.Module | None) -> str:
    for path, mod in names.items():
        if mod is target:
            return path
    raise ArchitectureError("could not locate the input embeddings in the module tree")


def _output_linear(module: nn.Module, config: object) -> str:
    """The output projection: the last linear-like child whose output has the model width.

    (Registration order alone misleads: Phi-3 registers o_proj before its fused qkv_proj.)
    ``structure.trace_structure`` then checks that its output is what the module returns.
    """
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    linear = [
        (name, mod)
        for name, mod in module.named_modules()
        if name and (isinstance(mod, nn.Linear) or type(mod).__name__ in ("Conv1D", "Linear"))
    ]
    if not linear:
        raise ArchitectureError(f"no linear layer inside {type(module).__name__}: mixture-of-experts MLPs (one output "
                                "projection per expert) have no single mlp.hook_post and are not supported")
    writes_width = [name for name, mod in linear if _out_features(mod) == width]
    return (writes_width or [name for name, _ in linear])[-1]


def _out_features(module: nn.Module) -> int | None:
    return getattr(module, "out_features", None) or getattr(module, "nf", None)  # nf: GPT-2's Conv1D
