"""Site names (TransformerLens conventions), their shapes, and how a user's site spec resolves.

A site table maps each name to a ``SiteInfo`` (what the activation looks like, where it sits in
the forward pass) and a ``SiteHook`` (how to read and write it).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from interp.errors import UnknownSiteError

from interp.models.arch import Arch
from interp.models.hooks import InPlaceInputHook, InputHook, OutputHook, PatternHook, SiteHook


@dataclass(frozen=True)
class SiteInfo:
    """One hookable activation.

    ``shape`` uses strings for sizes that depend on the input ("batch", "pos", "query", "key").
    ``pos_dim`` / ``head_dim`` index the position and head dimensions (None where absent).
    ``depth`` orders sites by when the forward pass computes them: (layer, rank in layer), with
    layer -1 before the first block and ``n_layers`` after the last.
    """

    name: str
    layer: int | None
    kind: str
    shape: tuple[str | int, ...]
    pos_dim: int | None
    head_dim: int | None
    depth: tuple[int, int]


# Per-layer sites in the order the forward pass computes them: (suffix, kind).
LAYER_SITES = (
    ("hook_resid_pre", "resid_pre"),
    ("ln1.hook_normalized", "ln1"),
    ("attn.hook_pattern", "pattern"),
    ("attn.hook_z", "z"),
    ("ln1_post.hook_normalized", "ln1_post"),
    ("hook_attn_out", "attn_out"),
    ("hook_resid_mid", "resid_mid"),
    ("ln2.hook_normalized", "ln2"),
    ("mlp.hook_post", "mlp_post"),
    ("ln2_post.hook_normalized", "ln2_post"),
    ("hook_mlp_out", "mlp_out"),
    ("hook_resid_post", "resid_post"),
)
_SUFFIX_OF_KIND = {kind: suffix for suffix, kind in LAYER_SITES}
# Short forms a user may type (TransformerLens's get_act_name names included).
KIND_ALIASES = {
    **{kind: kind for kind in _SUFFIX_OF_KIND},
    "post": "mlp_post",
    "mlp.hook_post": "mlp_post",
    "ln1_normalized": "ln1",
    "ln2_normalized": "ln2",
    "ln1_post_normalized": "ln1_post",
    "ln2_post_normalized": "ln2_post",
    "attn_pattern": "pattern",
}


class SiteTable:
    """All sites of one model, in forward order."""

    def __init__(self, entries: Iterable[tuple[SiteInfo, SiteHook]], n_layers: int, model_name: str):
        self._entries = {info.name: (info, hook) for info, hook in entries}
        self.n_layers = n_layers
        self.model_name = model_name

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def infos(self) -> list[SiteInfo]:
        return [info for info, _ in self._entries.values()]

    def info(self, name: str) -> SiteInfo:
        return self._entries[self.check(name)][0]

    def hook(self, name: str) -> SiteHook:
        return self._entries[self.check(name)][1]

    def reads(self, name: str) -> str:
        """Which tensor of which module the site is, in words (``interp sites`` prints it)."""
        return self.hook(name).reads

    def name_of(self, kind: str, layer: int | None = None) -> str:
        """``("resid_post", 12)`` -> ``"blocks.12.hook_resid_post"``; full names pass through."""
        if layer is None:
            return self.check(kind)
        canonical = KIND_ALIASES.get(kind)
        if canonical is None:
            raise UnknownSiteError(
                f"unknown site kind {kind!r}; valid kinds: {', '.join(sorted(KIND_ALIASES))}"
            )
        return self.check(f"blocks.{layer}.{_SUFFIX_OF_KIND[canonical]}")

    def has(self, kind: str, layer: int | None = None) -> bool:
        """Whether the model has this site (a parallel block has no ``resid_mid``)."""
        try:
            self.name_of(kind, layer)
        except UnknownSiteError:
            return False
        return True

    def check(self, name: str) -> str:
        """Return ``name`` if it is a site, else raise an error naming the closest sites."""
        if name in self._entries:
            return name
        match = re.match(r"blocks\.(-?\d+)\.", name)
        if match and not 0 <= int(match.group(1)) < self.n_layers:
            raise UnknownSiteError(
                f"site {name!r}: layer {match.group(1)} is out of range; {self.model_name} has "
                f"layers 0-{self.n_layers - 1}"
            )
        close = difflib.get_close_matches(name, self._entries, n=5, cutoff=0.5)
        hint = f"closest: {', '.join(close)}" if close else f"valid names look like {self.names()[:3]}"
        raise UnknownSiteError(
            f"unknown site {name!r} for {self.model_name}; {hint} ({len(self)} sites; "
            "`model.sites()` lists them all)"
        )

    def resolve(self, spec: str | Iterable[str] | Callable[[str], bool] | None) -> list[str]:
        """Site names from a name, a glob (``blocks.*.hook_resid_post``), a list, a predicate, or None (all).

        Names come back in forward order, without duplicates.
        """
        if spec is None:
            return self.names()
        if callable(spec):
            return [n for n in self._entries if spec(n)]
        wanted: set[str] = set()
        for item in [spec] if isinstance(spec, str) else spec:
            if any(ch in item for ch in "*?["):
                hits = fnmatch.filter(self._entries, item)
                if not hits:
                    raise UnknownSiteError(f"pattern {item!r} matches no site of {self.model_name}")
                wanted.update(hits)
            else:
                wanted.add(self.check(item))
        return [n for n in self._entries if n in wanted]


def _layer_info(layer: int, rank: int, kind: str, suffix: str, d_model: int, d_mlp: int, n_heads: int, d_head: int) -> SiteInfo:
    shapes = {
        "pattern": (("batch", n_heads, "query", "key"), 2, 1),
        "z": (("batch", "pos", n_heads, d_head), 1, 2),
        "mlp_post": (("batch", "pos", d_mlp), 1, None),
    }
    shape, pos_dim, head_dim = shapes.get(kind, (("batch", "pos", d_model), 1, None))
    return SiteInfo(f"blocks.{layer}.{suffix}", layer, kind, shape, pos_dim, head_dim, (layer, rank))


def hf_site_table(model: nn.Module, arch: Arch, dims: dict[str, int], model_name: str) -> SiteTable:
    """Sites of a HF model: hooks on its own modules, nothing copied or wrapped.

    A site that a block lacks is absent (``SiteTable.has``): resid_mid in parallel blocks, ln1 / ln2
    where attention or MLP read the residual stream directly (OLMo 2), the post-norm sites where
    attention and MLP outputs are not normalised, the pattern where the attention does not run
    through transformers' attention interface.
    """
    get = model.get_submodule
    d_model, d_mlp, n_heads, d_head = dims["d_model"], dims["d_mlp"], dims["n_heads"], dims["d_head"]
    entries: list[tuple[SiteInfo, SiteHook]] = [
        (SiteInfo("hook_embed", None, "embed", ("batch", "pos", d_model), 1, None, (-1, 0)),
         OutputHook(get(arch.embed), f"output of {arch.embed}"))
    ]
    if arch.pos_embed:
        entries.append((SiteInfo("hook_pos_embed", None, "pos_embed", ("batch", "pos", d_model), 1, None, (-1, 1)),
                        OutputHook(get(arch.pos_embed), f"output of {arch.pos_embed}")))
    layers = get(arch.layers)
    for index, block in enumerate(layers):
        hooks = _block_hooks(model, arch, index, block, n_heads)
        for rank, (suffix, kind) in enumerate(LAYER_SITES):
            if kind in hooks:
                entries.append((_layer_info(index, rank, kind, suffix, d_model, d_mlp, n_heads, d_head), hooks[kind]))
    entries.append(
        (
            SiteInfo("ln_final.hook_normalized", None, "ln_final", ("batch", "pos", d_model), 1, None, (len(layers), 0)),
            OutputHook(get(arch.final_norm), f"output of {arch.final_norm}"),
        )
    )
    return SiteTable(entries, len(layers), model_name)


def _block_hooks(model: nn.Module, arch: Arch, index: int, block: nn.Module, n_heads: int) -> dict[str, SiteHook]:
    """Hooks of one decoder block's sites, by kind (see ``Arch`` for what each norm is)."""
    sub = block.get_submodule
    path = f"{arch.layers}.{index}"

    def output(rel: str) -> OutputHook:
        return OutputHook(sub(rel), f"output of {path}.{rel}", mutable=rel in arch.mutated)

    def input_of(rel: str, note: str = "") -> InputHook:
        return InputHook(sub(rel), f"input of {path}.{rel}{note}")

    hooks: dict[str, SiteHook] = {
        "resid_pre": InputHook(block, f"input of {path}"),
        "z": InputHook(sub(arch.attn_out_proj), f"input of {path}.{arch.attn_out_proj}, split into heads", n_heads=n_heads),
        "attn_out": output(arch.ln1_post or arch.attn),
        "mlp_post": input_of(arch.mlp_out_proj),
        "mlp_out": output(arch.ln2_post or arch.mlp),
        "resid_post": OutputHook(block, f"output of {path}", mutable="" in arch.mutated),
    }
    if arch.pattern:
        hooks["pattern"] = PatternHook(sub(arch.attn), model.config, f"softmax inside {path}.{arch.attn} (computed beside its kernel)")
    if arch.shared_norm:  # one norm feeds both: each site reads its own consumer's input, so edits stay apart
        shared = f" (= output of {path}.{arch.ln1}, which feeds attention and MLP)"
        hooks["ln1"], hooks["ln2"] = input_of(arch.attn, shared), input_of(arch.mlp, shared)
    else:
        hooks.update({kind: output(rel) for kind, rel in (("ln1", arch.ln1), ("ln2", arch.ln2)) if rel})
    hooks.update({kind: output(rel) for kind, rel in (("ln1_post", arch.ln1_post), ("ln2_post", arch.ln2_post)) if rel})
    if not arch.parallel:
        entry = arch.ln2 or arch.mlp
        hooks["resid_mid"] = InPlaceInputHook(sub(entry), f"input of {path}.{entry} (the residual stream, written in place)")
    return hooks


def tl_site_table(model: nn.Module, model_name: str) -> SiteTable:
    """Sites of a TransformerLens model: its own hook points, under their own names.

    Their forward order (needed to stop early) is read off one probe forward of a single token.
    """
    import torch

    cfg = model.cfg
    order: list[str] = []
    handles = [
        point.register_forward_hook(lambda _m, _a, _o, name=name: order.append(name))
        for name, point in model.hook_dict.items()
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, dtype=torch.long, device=cfg.device))
    finally:
        for handle in handles:
            handle.remove()
    order += [name for name in model.hook_dict if name not in order]  # never fired (e.g. hook_attn_in)
    known = dict(LAYER_SITES)
    entries: list[tuple[SiteInfo, SiteHook]] = []
    ranks: dict[int, int] = {}
    seen_blocks = False
    for name in order:
        match = re.match(r"blocks\.(\d+)\.(.+)", name)
        if match:
            seen_blocks = True
            layer, suffix = int(match.group(1)), match.group(2)
            rank = ranks[layer] = ranks.get(layer, -1) + 1
            if suffix in known:
                info = _layer_info(layer, rank, known[suffix], suffix, cfg.d_model, cfg.d_mlp or 0, cfg.n_heads, cfg.d_head)
            else:
                info = SiteInfo(name, layer, suffix, ("...",), None, None, (layer, rank))
        else:
            kind = {"hook_embed": "embed", "hook_pos_embed": "pos_embed", "ln_final.hook_normalized": "ln_final"}.get(name)
            depth = (cfg.n_layers if seen_blocks else -1, len(entries))
            shape, pos_dim = (("batch", "pos", cfg.d_model), 1) if kind else (("...",), None)
            info = SiteInfo(name, None, kind or name, shape, pos_dim, None, depth)
        entries.append((info, OutputHook(model.hook_dict[name], f"TransformerLens hook point {name}")))
    return SiteTable(entries, cfg.n_layers, model_name)
